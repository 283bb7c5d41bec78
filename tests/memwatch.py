"""Watch a child process's peak RSS (VmHWM) while it runs; kill it past a bound.

``VmHWM`` in /proc/PID/status is the high-water mark of the child's own memory image: it starts
afresh at exec.  ``ru_maxrss`` does not -- a fork+exec'd child inherits the parent's mark, so a
child of a large pytest process would report pytest's peak (tools/bench.py says the same).  The
mark only grows, so sampling every 10 ms sees every peak except one in the child's last few ms
before it exits.  A child that passes the bound is killed at once, so a regression fails in a
second instead of eating the machine.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

LIMIT_KB = 200 << 10  # the bound issue 11 sets: 200 MiB of peak RSS


def vm_hwm_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie: its memory is gone already


@dataclass
class Watched:
    rc: int | None  # None: killed by the watcher
    why: str  # "exited", "proven", "memory", "timeout"
    hwm_kb: int
    seconds: float


def watch(
    p: subprocess.Popen[bytes],
    limit_kb: int = LIMIT_KB,
    timeout: float = 60,
    proven: Callable[[], bool] | None = None,
) -> Watched:
    """Sample ``p``'s VmHWM until it exits; kill it past ``limit_kb``, at ``timeout``, or when
    ``proven()`` says it has done enough to prove the bound."""
    t0 = time.monotonic()
    hwm, why = 0, "exited"
    try:
        while p.poll() is None:
            kb = vm_hwm_kb(p.pid)
            if kb is not None:
                hwm = max(hwm, kb)
            if hwm > limit_kb:
                why = "memory"
            elif time.monotonic() - t0 > timeout:
                why = "timeout"
            elif proven is not None and kb is not None and proven():
                why = "proven"
            if why != "exited":
                p.kill()
                break
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            p.kill()
        rc = p.wait()
    return Watched(rc if why == "exited" else None, why, hwm, time.monotonic() - t0)
