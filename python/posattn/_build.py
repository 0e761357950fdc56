"""Build the CUDA C++ extension ``posattn._C`` with CMake + ninja.

Used in two places, so the logic lives once here (stdlib only, importable without torch):

* ``setup.py`` at install time (``pip install -e .``), when nvcc is found and
  ``POSATTN_CUDA`` is not ``0``;
* :func:`jit_build` at first use on a GPU machine with nvcc but no prebuilt ``_C``: the module is
  built into a cache folder keyed by a hash of the sources and the archs.

Environment
-----------
POSATTN_CUDA        ``0`` disables the CUDA build (default: build when nvcc is found).
POSATTN_CUDA_ARCHS  semicolon-separated CMake CUDA architectures (default ``80;90a``).
POSATTN_CACHE_DIR   JIT cache root (default ``~/.cache/posattn``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_ARCHS = "80;90a"


def find_nvcc() -> str | None:
    """Path of nvcc from ``CUDA_HOME``/``CUDA_PATH`` or ``PATH``, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return None


def cuda_enabled() -> bool:
    return os.environ.get("POSATTN_CUDA", "1") != "0" and find_nvcc() is not None


def cuda_archs() -> str:
    return os.environ.get("POSATTN_CUDA_ARCHS", DEFAULT_ARCHS)


def source_root(start: Path | None = None) -> Path | None:
    """The folder holding CMakeLists.txt and csrc/ (a source checkout), or None."""
    here = (start or Path(__file__)).resolve()
    for parent in [here, *here.parents]:
        if (parent / "CMakeLists.txt").exists() and (parent / "csrc").is_dir():
            return parent
    return None


def sources_hash(root: Path, archs: str) -> str:
    h = hashlib.sha256(archs.encode())
    files = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for p in [root / "CMakeLists.txt", *files]:
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cmake_build(root: Path, build_dir: Path, out_dir: Path, *, archs: str | None = None,
                build_tests: bool = False, verbose: bool = True) -> Path:
    """Configure and build ``_C`` (and optionally the host tests); return the built module path.

    Raises ``RuntimeError`` with the tool's output when a step fails.
    """
    import pybind11  # build-time dependency (pyproject's build-system requires it)

    archs = archs or cuda_archs()
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("posattn: nvcc not found; set CUDA_HOME or put nvcc on PATH")
    build_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") or _pip_ninja() else []
    cfg = [
        "cmake", "-S", str(root), "-B", str(build_dir), *generator,
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DPOSATTN_CUDA_ARCHS={archs}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DPOSATTN_OUTPUT_DIR={out_dir}",
        f"-DPOSATTN_BUILD_TESTS={'ON' if build_tests else 'OFF'}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    jobs = str(max(1, min(os.cpu_count() or 1, 8)))
    for cmd in (cfg, ["cmake", "--build", str(build_dir), "-j", jobs]):
        if verbose:
            print("posattn:", " ".join(cmd), flush=True)
        res = subprocess.run(cmd, capture_output=not verbose, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"posattn: build step failed: {' '.join(cmd)}\n"
                               f"{res.stdout or ''}{res.stderr or ''}")
    built = sorted(out_dir.glob("_C*.so")) + sorted(out_dir.glob("_C*.pyd"))
    if not built:
        raise RuntimeError(f"posattn: build finished but no _C module appeared in {out_dir}")
    return built[0]


def _pip_ninja() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    os.environ["PATH"] = os.path.dirname(getattr(ninja, "BIN_DIR", "")) + os.pathsep + os.environ["PATH"]
    return True


def jit_build(verbose: bool = False) -> Path | None:
    """Build ``_C`` into the cache folder keyed by the sources' hash and archs; return the folder.

    Returns None when no source checkout or no nvcc is available.
    """
    root = source_root()
    if root is None or not cuda_enabled():
        return None
    archs = cuda_archs()
    key = sources_hash(root, archs)
    cache = Path(os.environ.get("POSATTN_CACHE_DIR", Path.home() / ".cache" / "posattn")) / key
    if not list(cache.glob("_C*.so")):
        # Build in a private folder and move the module in with one rename, so two processes
        # building at once never load a half-written .so (the loser's rename just replaces it).
        tmp = cache / f"tmp-{os.getpid()}"
        built = cmake_build(root, tmp / "build", tmp, archs=archs, verbose=verbose)
        os.replace(built, cache / built.name)
        shutil.rmtree(tmp, ignore_errors=True)
    return cache
