"""Builds the CPU engine's kernels (plain C++ and the CPython API; no torch headers, so it compiles
in seconds). The build is optional: without a compiler fastlstm installs and runs on its
reference engine."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastlstm.engines._cpu_kernels",
            sources=["src/fastlstm/engines/cpu_kernels.cpp"],
            depends=["src/fastlstm/engines/cpu_kernels.h"],
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"],
            language="c++",
            optional=True,
        )
    ]
)
