"""Hypothesis profiles for the fuzz tests (``tests/test_fuzz_*.py``).

Two profiles, picked by ``LAYERSTORE_FUZZ_PROFILE``:

``ci`` (the default)
    what ``./dev test`` and CI run: few examples per property, ``derandomize=True`` so every run
    tries the same inputs (a red CI is reproducible, never a flake), no example database (CI
    starts from a fresh clone anyway).
``long``
    what ``./dev fuzz`` runs: a hundred times the examples, new random inputs on every run, and a
    database under ``~/.cache/layerstore-fuzz`` so a failure found once is tried first next time.

Each property names its own CI budget with :func:`examples` (a GNU tar oracle case costs a
subprocess and a store, a codec case microseconds), so the whole fuzz set stays within about a
minute of CI time on two cores.  Every failure a run finds becomes a fixed ``@example`` (or a
plain regression test) next to the property, so CI keeps checking it whatever the profile.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

PROFILE = os.environ.get("LAYERSTORE_FUZZ_PROFILE", "ci")
LONG_FACTOR = 100

# Real subprocesses, stores and LMDB syncs make examples slow and their timing noisy: no
# deadline, and no "too slow" health check (the budgets below are what bounds the time).
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=50 * LONG_FACTOR,
    deadline=None,
    derandomize=False,
    database=DirectoryBasedExampleDatabase(
        os.path.join(os.path.expanduser("~"), ".cache", "layerstore-fuzz")
    ),
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
if PROFILE not in ("ci", "long"):
    raise RuntimeError(f"LAYERSTORE_FUZZ_PROFILE={PROFILE!r}: use 'ci' or 'long'")
settings.load_profile(PROFILE)


def examples(ci: int) -> settings:
    """Settings for one property: ``ci`` examples in CI, ``LONG_FACTOR`` times that in the long
    profile (the rest comes from the loaded profile)."""
    return settings(max_examples=ci if PROFILE == "ci" else ci * LONG_FACTOR)
