"""Only for the optional C fast path; everything else is in pyproject.toml.

``layerstore._fastpath`` runs materialization's per-file syscalls without the GIL
(src/layerstore/_fastpath.c explains why).  It is optional: without a C compiler the build
skips it and layerstore uses the pure-Python path, with the same results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "layerstore._fastpath",
            ["src/layerstore/_fastpath.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
