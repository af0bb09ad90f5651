"""Builds the CPU engine's kernels (plain C++ and the CPython API; no torch headers, so it compiles
in seconds). With OpenMP the kernels run on torch's own thread pool; a compiler without it builds
them with threads of their own. The build is optional: without a compiler fastlstm installs and
runs on its reference engine."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"


class BuildWithOptionalOpenMP(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:  # noqa: BLE001 - any compiler or linker refusal: retry without OpenMP
            if OPENMP not in ext.extra_compile_args:
                raise
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            super().build_extension(ext)


setup(
    cmdclass={"build_ext": BuildWithOptionalOpenMP},
    ext_modules=[
        Extension(
            "fastlstm.engines.cpu._kernels",
            sources=["src/fastlstm/engines/cpu/kernels.cpp"],
            depends=["src/fastlstm/engines/cpu/kernels.h"],
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", OPENMP],
            extra_link_args=[OPENMP],
            language="c++",
            optional=True,
        )
    ],
)
