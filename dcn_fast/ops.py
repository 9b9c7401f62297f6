"""The ``dcn_fast::srf_conv2d`` custom op: loading, fake kernel, autograd.

The schema and the CPU kernel live in C++ (``csrc/srf_conv2d.cpp``,
``csrc/cpu/srf_conv2d_kernel.cpp``). They are compiled on first use with
``torch.utils.cpp_extension.load`` and cached by PyTorch (under
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so the package
installs without a build step and always matches the installed torch. When
no compiler is available the op is absent and callers fall back to the
``separable`` backend, with one warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from .geometry import output_size

__all__ = ["cpu_kernel_available", "srf_conv2d", "source_dir"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def source_dir() -> Path:
    """Where the C++ sources are: inside the installed package, or the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "srf_conv2d.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"dcn_fast C++ sources not found next to {here}")


def _cpu_tag() -> str:
    """Short hash of this CPU's instruction-set flags.

    The kernel is compiled with ``-march=native``; naming the build after the
    CPU keeps a shared cache from handing one machine's binary to another.
    """
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags += next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _build() -> None:
    # cpp_extension logs a warning about CUDA_HOME on CPU-only machines when it
    # is imported; the CPU kernel does not need CUDA, so keep that quiet.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils.cpp_extension import load

        src = source_dir()
        load(
            name=f"dcn_fast_cpu_{_cpu_tag()}",
            sources=[str(src / "srf_conv2d.cpp"), str(src / "cpu" / "srf_conv2d_kernel.cpp")],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=os.environ.get("DCN_FAST_VERBOSE_BUILD") == "1",
        )
    finally:
        logger.setLevel(level)
    _register_python_side()


def cpu_kernel_available(warn: bool = False) -> bool:
    """Build (once) and load the C++ CPU kernel; False if that is impossible.

    The first failure emits one ``RuntimeWarning`` naming the cause.
    """
    with _lock:
        if "ok" not in _state:
            try:
                _build()
                _state["ok"] = True
            except Exception as exc:  # no compiler, no ninja, read-only cache...
                _state["ok"] = False
                _state["error"] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                warnings.warn(
                    "dcn_fast: the C++ CPU kernel could not be built "
                    f"({_state['error']}); using the 'separable' backend instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return bool(_state["ok"])


def _register_python_side() -> None:
    @torch.library.register_fake("dcn_fast::srf_conv2d")
    def _(input, taps, alpha, stride, padding, groups):
        torch._check(input.dim() == 4, lambda: "input must be 4-D")
        torch._check(taps.dim() == 2, lambda: "taps must be [order+1, K]")
        torch._check(alpha.dim() == 3 and alpha.shape[1] * groups == input.shape[1], lambda: "alpha shape")
        k = taps.shape[1]
        ho = output_size(input.shape[2], k, stride[0], padding[0])
        wo = output_size(input.shape[3], k, stride[1], padding[1])
        return input.new_empty((input.shape[0], alpha.shape[2], ho, wo))

    @torch.library.register_fake("dcn_fast::srf_conv2d_backward")
    def _(grad_output, input, taps, alpha, stride, padding, groups, output_mask):
        return tuple(t.new_empty(t.shape) if need else None for t, need in zip((input, taps, alpha), output_mask))

    def setup_context(ctx, inputs, output):
        input, taps, alpha, stride, padding, groups = inputs
        need_input, need_taps, need_alpha = ctx.needs_input_grad[:3]
        # The input itself is only needed for the taps and alpha gradients.
        ctx.save_for_backward(input if (need_taps or need_alpha) else None, taps, alpha)
        ctx.input_meta = input.new_empty((1, 1, 1, 1)).expand(input.shape)
        ctx.geometry = (stride, padding, groups)

    def backward(ctx, grad_output):
        input, taps, alpha = ctx.saved_tensors
        if input is None:
            input = ctx.input_meta  # shape only: never read when its gradients are not asked for
        stride, padding, groups = ctx.geometry
        mask = list(ctx.needs_input_grad[:3])
        grads = torch.ops.dcn_fast.srf_conv2d_backward(
            grad_output.contiguous(), input, taps, alpha, stride, padding, groups, mask
        )
        return (*grads, None, None, None)

    torch.library.register_autograd("dcn_fast::srf_conv2d", backward, setup_context=setup_context)


def srf_conv2d(
    input: torch.Tensor,
    taps: torch.Tensor,
    alpha: torch.Tensor,
    order: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Run ``torch.ops.dcn_fast.srf_conv2d`` (same contract as
    :func:`dcn_fast.separable.separable_srf_conv2d`; ``order`` is implied by ``taps``)."""
    if taps.shape[0] != order + 1:
        raise ValueError(f"taps must have order+1 = {order + 1} rows, got {taps.shape[0]}")
    return torch.ops.dcn_fast.srf_conv2d(input, taps, alpha, list(stride), list(padding), groups)
