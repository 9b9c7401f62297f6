"""Building the compiled kernels: on first use (``dcn_fast.ops``) or on request.

    python -m dcn_fast.build cpu                # the C++ CPU kernels (tiled and dense)
    python -m dcn_fast.build cuda [--arch 9.0]  # the CUDA dense kernels; needs nvcc, no GPU

Both compile with ``torch.utils.cpp_extension.load`` against the installed
torch and are cached by PyTorch under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``). Exit status 0 on success, 1 on a failed build
(the compiler's message on stderr), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

__all__ = ["source_dir", "build_cpu", "build_cuda", "find_cuda_home", "main"]


def source_dir() -> Path:
    """Where the C++/CUDA sources are: inside the installed package, or the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "srf_dense.h").is_file():
            return candidate
    raise FileNotFoundError(f"dcn_fast C++ sources not found next to {here}")


def _cpu_tag() -> str:
    """Short hash of this CPU's instruction-set flags.

    The CPU kernels are compiled with ``-march=native``; naming the build after
    the CPU keeps a shared cache from handing one machine's binary to another.
    """
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _is_toolkit(root: Path) -> bool:
    """A CUDA toolkit folder: nvcc in bin/ and the runtime library to link against."""
    libraries = [root / "lib64", root / "lib", *root.glob("targets/*/lib")]
    return (root / "bin" / "nvcc").is_file() and any((lib / "libcudart.so").exists() for lib in libraries)


def find_cuda_home() -> Path | None:
    """The CUDA toolkit to compile with, or None.

    ``CUDA_HOME`` (or ``CUDA_PATH``) when set; else the folder of the real
    ``nvcc`` on PATH (symlinks resolved); else ``/usr/local/cuda*``. An ``nvcc``
    that is a wrapper script elsewhere (no ``libcudart`` beside it, where
    torch's own guess fails to link) is skipped.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return Path(os.environ[variable])
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates += [Path(p) for p in ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]]
    return next((root for root in candidates if _is_toolkit(root)), None)


def _quiet_cpp_extension():
    """``torch.utils.cpp_extension``, imported without its CUDA_HOME warning on CPU-only machines."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _verbose() -> bool:
    return os.environ.get("DCN_FAST_VERBOSE_BUILD") == "1"


def build_cpu(verbose: bool | None = None) -> None:
    """Compile (or load from the cache) and load the CPU kernels; raises on failure."""
    src = source_dir()
    _quiet_cpp_extension().load(
        name=f"dcn_fast_cpu_{_cpu_tag()}",
        sources=[str(src / "cpu" / name) for name in ("srf_conv2d_kernel.cpp", "srf_dense_kernel.cpp",
                                                        "rk_step_kernel.cpp", "group_norm_act_kernel.cpp")],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=_verbose() if verbose is None else verbose,
    )


def build_cuda(arch: str | None = None, verbose: bool | None = None) -> None:
    """Compile (or load from the cache) and load the CUDA kernels; raises on failure.

    Args:
        arch: compute capability to compile for, e.g. ``"9.0"``; default: the
            visible GPU's (``TORCH_CUDA_ARCH_LIST`` when set, else torch's choice).
            No GPU is needed when it is given.
    """
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise FileNotFoundError("no CUDA toolkit found (nvcc with libcudart): set CUDA_HOME")
    os.environ["CUDA_HOME"] = str(cuda_home)
    cpp_extension = _quiet_cpp_extension()
    cpp_extension.CUDA_HOME = str(cuda_home)  # read when the build runs; set before import it may be stale
    import torch

    if arch is None and not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.is_available():
        arch = "{}.{}".format(*torch.cuda.get_device_capability())
    if arch is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        raise ValueError("no GPU visible to choose the architecture: pass --arch (e.g. --arch 9.0 for an H100)")
    if arch is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "default")
    tag = "".join(ch if ch.isalnum() else "_" for ch in arch_list)
    src = source_dir()
    cpp_extension.load(
        name=f"dcn_fast_cuda_{tag}",
        sources=[str(src / "cuda" / "srf_dense_kernel.cu")],
        extra_cuda_cflags=["-O3"],
        is_python_module=False,
        verbose=_verbose() if verbose is None else verbose,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcn_fast.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=["cpu", "cuda"], help="which kernels to build")
    parser.add_argument("--arch", help="CUDA compute capability, e.g. 9.0 (cuda only; no GPU needed)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's commands")
    args = parser.parse_args(argv)
    if args.arch is not None and (args.target != "cuda" or not _valid_arch(args.arch)):
        parser.error(f"--arch takes a compute capability such as 9.0 or 8.6 (cuda only), got {args.arch!r}")
    try:
        if args.target == "cpu":
            build_cpu(verbose=args.verbose)
        else:
            build_cuda(args.arch, verbose=args.verbose)
    except Exception as exc:  # compiler errors, missing toolkit: one message, exit 1
        print(f"error: the {args.target} build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"dcn_fast: {args.target} kernels built")
    return 0


def _valid_arch(arch: str) -> bool:
    major, _, minor = arch.partition(".")
    return major.isdigit() and minor.rstrip("a").isdigit()


if __name__ == "__main__":
    sys.exit(main())
