"""posattn build: the Python package always; the CUDA C++ module ``posattn._C`` when nvcc is found.

``POSATTN_CUDA=0`` skips the CUDA build; ``POSATTN_CUDA_ARCHS`` (default ``80;90a``) picks the
architectures. The CMake logic lives in python/posattn/_build.py (shared with the JIT build).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_posattn_build", ROOT / "python" / "posattn" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        built = _build.cmake_build(ROOT, build_dir, target.parent, verbose=True)
        if built.resolve() != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(built, target)


ext_modules, cmdclass = [], {}
if _build.cuda_enabled():
    print(f"posattn: nvcc found ({_build.find_nvcc()}); building posattn._C for CUDA archs {_build.cuda_archs()}")
    ext_modules = [CMakeExtension("posattn._C")]
    cmdclass = {"build_ext": CMakeBuild}
else:
    why = "POSATTN_CUDA=0" if os.environ.get("POSATTN_CUDA") == "0" else "nvcc not found"
    print(f"posattn: {why}; installing the Python package alone (no posattn._C)")

setup(
    package_dir={"posattn": "python/posattn", "posattn.triton_kernels": "triton_kernels"},
    packages=["posattn", "posattn.ops", "posattn.nn", "posattn.integrations", "posattn.benchmarks", "posattn.triton_kernels"],
    package_data={"posattn": ["data/*.txt"]},  # varlen: sample sentences (python/posattn/data)
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
