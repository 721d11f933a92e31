"""Build the compiled core, ``fastorch._core``, from Cython sources."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("FASTORCH_DEBUG") == "1"

macros = [("FASTORCH_DEBUG", "1")] if debug else []
if debug:
    macros.append(("CYTHON_TRACE_NOGIL", "1"))

extensions = [
    Extension(
        "fastorch._core",
        ["src/fastorch/_core.pyx"],
        depends=["src/fastorch/_wheel.pxi", "src/fastorch/_options.pxi"],
        define_macros=macros,
        extra_compile_args=["-O0", "-g"] if debug else ["-O2"],
    ),
    Extension("fastorch._spawn", ["src/fastorch/_spawn.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        annotate=debug,
        compiler_directives={
            "embedsignature": True,
            "linetrace": debug,
            "profile": debug,
        },
    ),
)
