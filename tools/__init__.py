"""Developer tools (benchmarks, the import-graph check, the demo), run from the repository root
as ``python -m tools.NAME``.

A regular package, not a namespace one, so that ``tools`` always means this directory when the
repository root is on ``sys.path`` (pytest's ``pythonpath`` option puts it there; ``python -m``
run from the root does too) and no unrelated ``tools`` elsewhere on the path can shadow it.
Nothing here ships in the wheel: setuptools packages only ``src/``.
"""
