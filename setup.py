"""Build script: the package plus the C++ permutohedral lattice extension (pybind11, OpenMP).

The schema `proto/caffe.proto` needs no code generation step: `rloss.proto.caffe_pb2` reads it
with our own small .proto reader at import time, so no protoc is needed anywhere.
"""

import os
import shutil
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _compiler_accepts(compiler, flag: str) -> bool:
    """True when the C++ compiler builds a tiny OpenMP program with `flag`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=[flag])
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=[flag])
        except Exception:
            return False
    return True


class BuildExtWithOpenMP(build_ext):
    """Adds OpenMP flags when the compiler supports them; otherwise builds single-threaded and says so.

    MSVC is refused up front: the lattice kernels use GCC/Clang vector extensions, builtins and
    target pragmas that it cannot compile."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            from setuptools.errors import PlatformError

            raise PlatformError(
                "rloss: the C++ permutohedral lattice needs GCC or Clang (it uses their vector extensions "
                "and builtins); MSVC cannot compile it. On Windows build with MinGW-w64 GCC or under WSL."
            )
        flag = "-fopenmp"
        if _compiler_accepts(self.compiler, flag):
            for ext in self.extensions:
                ext.extra_compile_args.append(flag)
                ext.extra_link_args.append(flag)
        else:
            sys.stderr.write(
                "rloss: WARNING: the C++ compiler does not support OpenMP; the permutohedral lattice "
                "is built single-threaded (correct but slower). Install an OpenMP-capable compiler "
                "(gcc, or clang with libomp) and reinstall for full speed.\n"
            )
        super().build_extensions()


class BuildPyWithSchema(build_py):
    """Ships proto/caffe.proto inside the package so an installed rloss finds its schema."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "rloss", "proto", "caffe.proto")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(HERE, "proto", "caffe.proto"), target)


def _csrc(*suffixes: str) -> list[str]:
    return sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(HERE, "csrc")) if f.endswith(suffixes))


ext_modules = [
    Pybind11Extension(
        "rloss._lattice",
        _csrc(".cpp"),
        # Headers too: a changed class layout must rebuild every object, or stale ones crash at run time.
        depends=_csrc(".h"),
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    )
]

setup(
    packages=find_packages(include=["rloss", "rloss.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtWithOpenMP, "build_py": BuildPyWithSchema},
    zip_safe=False,
)
