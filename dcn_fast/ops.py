"""The ``dcn_fast`` ops: schemas, fake kernels, autograd; every algorithm beneath one op.

``dcn_fast::srf_conv2d(input, taps, alpha, bias, shift, stride, padding, groups, algorithm)``
is the one op every backend of :func:`dcn_fast.srf_conv2d` runs through: one
fake kernel (``torch.compile``, meta tensors), one autograd formula and one
backward op, ``srf_conv2d_backward``, whose own backward raises (double
backward is not supported by any algorithm). Its CPU and CUDA kernels look
``algorithm`` up among the implementations registered with
:func:`register_algorithm`:

=============  =========  ======================================  ==================
algorithm      devices    implementation                          taps
=============  =========  ======================================  ==================
``cpu``        CPU        C++, ``csrc/cpu/srf_conv2d_kernel.cpp``  one set (layer σ)
``dense``      CPU, CUDA  ``dcn_fast/dense.py`` → C++/CUDA         any σ sharing
``separable``  CPU, CUDA  ``dcn_fast/separable.py`` (PyTorch)      one set
``triton``     CUDA       ``kernels/srf_conv2d.py``                one set
=============  =========  ======================================  ==================

``taps`` is ``[T_o, T_i, N+1, K]``: ``T_o = T_i = 1`` for one σ per layer,
``[C_out, 1, ...]`` per output channel, ``[C_out, C_in/groups, ...]`` per pair.

The compiled building blocks (``srf_tiled_conv2d``, ``srf_dense_filter``,
``srf_dense_conv2d`` and their backwards) are also defined here, so that their
fake kernels exist before (or without) a build; their kernels come from
``csrc/``, compiled on first use by :mod:`dcn_fast.build`. When no compiler is
available the ``cpu`` algorithm is absent (``auto`` picks another, an explicit
``backend="cpu"`` raises) and ``dense`` builds its filter with PyTorch ops,
each with one warning.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .basis import DOUBLE_BACKWARD_ERROR, constant_while_tracing
from .geometry import output_size

__all__ = [
    "Algorithm",
    "register_algorithm",
    "algorithm_for",
    "cpu_kernel_available",
    "cuda_kernel_available",
    "srf_conv2d",
]

_LIB = torch.library.Library("dcn_fast", "FRAGMENT")

_LIB.define(
    "srf_conv2d(Tensor input, Tensor taps, Tensor alpha, Tensor? bias, Tensor? shift, int[2] stride, int[2] padding, "
    "int groups, str algorithm) -> Tensor"
)
# Gradients of (input, taps, alpha); an entry whose mask is false is None.
_LIB.define(
    "srf_conv2d_backward(Tensor grad_output, Tensor input, Tensor taps, Tensor alpha, int[2] stride, int[2] padding, "
    "int groups, str algorithm, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)
# Compiled building blocks (csrc/): the tiled CPU kernel takes taps [N+1, K].
_LIB.define(
    "srf_tiled_conv2d(Tensor input, Tensor taps, Tensor alpha, Tensor? bias, Tensor? shift, int[2] stride, "
    "int[2] padding, int groups) -> Tensor"
)
_LIB.define(
    "srf_tiled_conv2d_backward(Tensor grad_output, Tensor input, Tensor taps, Tensor alpha, int[2] stride, "
    "int[2] padding, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)
_LIB.define("srf_dense_filter(Tensor taps, Tensor alpha) -> Tensor")
_LIB.define(
    "srf_dense_filter_backward(Tensor grad_filter, Tensor taps, Tensor alpha, bool[2] output_mask) -> (Tensor, Tensor)"
)
_LIB.define(
    "srf_dense_conv2d(Tensor input, Tensor taps, Tensor alpha, Tensor? bias, int[2] stride, int[2] padding, "
    "int groups) -> Tensor"
)
_LIB.define(
    "srf_dense_conv2d_backward(Tensor grad_output, Tensor input, Tensor taps, Tensor alpha, int[2] stride, "
    "int[2] padding, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)


# --- algorithms -------------------------------------------------------------


@dataclass(frozen=True)
class Algorithm:
    """One implementation of ``dcn_fast::srf_conv2d``.

    ``forward(input, taps, alpha, bias, shift, stride, padding, groups) -> out`` and
    ``backward(grad_out, input, taps, alpha, stride, padding, groups, mask) ->
    (grad_input, grad_taps, grad_alpha)`` (None where ``mask`` is false) take
    ``taps [T_o, T_i, N+1, K]``, stride and padding as tuples, and return
    contiguous tensors of the input's dtype.
    """

    forward: Callable[..., torch.Tensor]
    backward: Callable[..., tuple]
    devices: tuple[str, ...]
    any_taps: bool  # False: one tap set only (T_o = T_i = 1)


_ALGORITHMS: dict[str, Algorithm] = {}


def add_shift(out: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``out + shift`` (``[B, C_out, Ho, Wo]`` + ``[C_out, Ho, Wo]``), in place in a fresh output: the
    algorithms that do not fold the shift into their own output pass."""
    return out if shift is None else out.add_(shift)


def register_algorithm(name: str, algorithm: Algorithm) -> None:
    """Make ``name`` a value of the op's ``algorithm`` argument."""
    _ALGORITHMS[name] = algorithm


def algorithm_for(name: str, device: torch.device, shared_taps: bool) -> Algorithm:
    """The registered ``name``; ValueError if it does not take a call on ``device`` with these taps."""
    if name not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(map(repr, sorted(_ALGORITHMS)))}, got {name!r}")
    algorithm = _ALGORITHMS[name]
    if device.type not in algorithm.devices:
        raise ValueError(f"the {name!r} algorithm runs on {' and '.join(algorithm.devices)}, not {device.type}")
    if not (shared_taps or algorithm.any_taps):
        raise ValueError(
            f"the {name!r} algorithm takes one σ per layer; one σ per output channel or per pair runs on 'dense'"
        )
    return algorithm


def _check(condition, message: Callable[[], str]) -> None:
    """``torch._check``, which fake kernels need for symbolic conditions (dynamic shapes); a true
    Python bool returns at once (torch._check costs ~2.5 µs even then, eight of them per call)."""
    if condition is not True:
        torch._check(condition, message)


def _check_shapes(input, taps, alpha, groups) -> None:
    _check(input.dim() == 4, lambda: f"srf_conv2d: input must be 4-D, got {input.dim()}-D")
    _check(taps.dim() == 4, lambda: f"srf_conv2d: taps must be [T_o, T_i, N+1, K], got {tuple(taps.shape)}")
    _check(
        alpha.dim() == 3 and alpha.shape[1] * groups == input.shape[1],
        lambda: f"srf_conv2d: alpha must be [F, C_in/groups, C_out], got {tuple(alpha.shape)}",
    )
    order1 = taps.shape[2]
    _check(
        alpha.shape[0] == order1 * (order1 + 1) // 2,
        lambda: f"srf_conv2d: alpha.size(0) must be F = {order1 * (order1 + 1) // 2} for {order1} tap rows",
    )


def _output_shape(input, taps, alpha, stride, padding) -> tuple:
    """``(B, C_out, Ho, Wo)`` of a call with ``taps [T_o, T_i, N+1, K]``."""
    k = taps.shape[3]
    ho = output_size(input.shape[2], k, stride[0], padding[0])
    wo = output_size(input.shape[3], k, stride[1], padding[1])
    return input.shape[0], alpha.shape[2], ho, wo


def _check_addends(shape, bias, shift, device) -> None:
    """bias ``[C_out]`` and shift ``[C_out, Ho, Wo]`` (the output's shape without the batch), each optional,
    on the input's device (a meta one would send the call to the fake kernel: an uninitialised result)."""
    for name, t in (("bias", bias), ("shift", shift)):
        _check(t is None or t.device == device,
               lambda: f"srf_conv2d: {name} is on {t.device} but input is on {device}")
    _check(bias is None or tuple(bias.shape) == (shape[1],),
           lambda: f"srf_conv2d: bias must be [C_out] = [{shape[1]}], got {tuple(bias.shape)}")
    _check(shift is None or tuple(shift.shape) == tuple(shape[1:]),
           lambda: f"srf_conv2d: shift must be [C_out, Ho, Wo] = {list(shape[1:])}, got {tuple(shift.shape)}")


def _fake_output(input, taps, alpha, stride, padding, groups, bias=None, shift=None):
    """The output of a call with ``taps [T_o, T_i, N+1, K]``, as an empty tensor (fake kernels)."""
    _check_shapes(input, taps, alpha, groups)
    shape = _output_shape(input, taps, alpha, stride, padding)
    _check_addends(shape, bias, shift, input.device)
    return input.new_empty(shape)


@torch.library.register_fake("dcn_fast::srf_conv2d", lib=_LIB)
def _(input, taps, alpha, bias, shift, stride, padding, groups, algorithm):
    return _fake_output(input, taps, alpha, stride, padding, groups, bias, shift)


def _fake_grads(tensors, output_mask):
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(tensors, output_mask))


@torch.library.register_fake("dcn_fast::srf_conv2d_backward", lib=_LIB)
def _(grad_output, input, taps, alpha, stride, padding, groups, algorithm, output_mask):
    return _fake_grads((input, taps, alpha), output_mask)


def _srf_conv2d_kernel(input, taps, alpha, bias, shift, stride, padding, groups, algorithm):
    _check_shapes(input, taps, alpha, groups)
    _check_addends(_output_shape(input, taps, alpha, stride, padding), bias, shift, input.device)
    shared = taps.shape[0] == taps.shape[1] == 1
    run = algorithm_for(algorithm, input.device, shared).forward
    return run(input, taps, alpha, bias, shift, tuple(stride), tuple(padding), groups)


def _srf_conv2d_backward_kernel(grad_output, input, taps, alpha, stride, padding, groups, algorithm, output_mask):
    shared = taps.shape[0] == taps.shape[1] == 1
    run = algorithm_for(algorithm, input.device, shared).backward
    return run(grad_output, input, taps, alpha, tuple(stride), tuple(padding), groups, tuple(output_mask))


for _device in ("cpu", "cuda"):
    torch.library.register_kernel("dcn_fast::srf_conv2d", _device, _srf_conv2d_kernel, lib=_LIB)
    torch.library.register_kernel("dcn_fast::srf_conv2d_backward", _device, _srf_conv2d_backward_kernel, lib=_LIB)


def _setup_context(ctx, inputs, output):
    input, taps, alpha, bias, shift, stride, padding, groups, algorithm = inputs
    need_input, need_taps, need_alpha = ctx.needs_input_grad[:3]
    # The input itself is only needed for the taps and alpha gradients.
    ctx.save_for_backward(input if (need_taps or need_alpha) else None, taps, alpha)
    ctx.input_meta = input.new_empty((1, 1, 1, 1)).expand(input.shape)
    ctx.arguments = (stride, padding, groups, algorithm)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.shift_dtype = None if shift is None else shift.dtype


def _backward(ctx, grad_output):
    input, taps, alpha = ctx.saved_tensors
    if input is None:
        input = ctx.input_meta  # shape only: never read when its gradients are not asked for
    stride, padding, groups, algorithm = ctx.arguments
    mask = list(ctx.needs_input_grad[:3])
    grads = torch.ops.dcn_fast.srf_conv2d_backward(
        grad_output.contiguous(), input, taps, alpha, stride, padding, groups, algorithm, mask
    )
    grad_bias = grad_output.sum((0, 2, 3)).to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None
    grad_shift = grad_output.sum(0).to(ctx.shift_dtype) if ctx.needs_input_grad[4] else None
    return (*grads, grad_bias, grad_shift, None, None, None, None)


torch.library.register_autograd("dcn_fast::srf_conv2d", _backward, setup_context=_setup_context, lib=_LIB)

def _no_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


torch.library.register_autograd(
    "dcn_fast::srf_conv2d_backward", _no_double_backward, setup_context=lambda ctx, inputs, output: None, lib=_LIB
)


# --- fake kernels of the compiled building blocks ---------------------------


@torch.library.register_fake("dcn_fast::srf_tiled_conv2d", lib=_LIB)
def _(input, taps, alpha, bias, shift, stride, padding, groups):
    return _fake_output(input, taps[None, None], alpha, stride, padding, groups, bias, shift)


@torch.library.register_fake("dcn_fast::srf_tiled_conv2d_backward", lib=_LIB)
def _(grad_output, input, taps, alpha, stride, padding, groups, output_mask):
    return _fake_grads((input, taps, alpha), output_mask)


@torch.library.register_fake("dcn_fast::srf_dense_filter", lib=_LIB)
def _(taps, alpha):
    _check(taps.dim() == 4 and alpha.dim() == 3, lambda: "srf_dense_filter: taps [T_o, T_i, N+1, K], alpha 3-D")
    k = taps.shape[3]
    return taps.new_empty((alpha.shape[2], alpha.shape[1], k, k))


@torch.library.register_fake("dcn_fast::srf_dense_filter_backward", lib=_LIB)
def _(grad_filter, taps, alpha, output_mask):
    return _fake_grads((taps, alpha), output_mask)


@torch.library.register_fake("dcn_fast::srf_dense_conv2d", lib=_LIB)
def _(input, taps, alpha, bias, stride, padding, groups):
    return _fake_output(input, taps, alpha, stride, padding, groups)


@torch.library.register_fake("dcn_fast::srf_dense_conv2d_backward", lib=_LIB)
def _(grad_output, input, taps, alpha, stride, padding, groups, output_mask):
    return _fake_grads((input, taps, alpha), output_mask)


# --- building the compiled kernels ------------------------------------------

_lock = threading.Lock()
_state: dict[str, dict[str, object]] = {"cpu": {}, "cuda": {}}


def _build(target: str) -> None:
    from . import build

    build.build_cpu() if target == "cpu" else build.build_cuda()


_FALLBACK = {
    "cpu": "backend='auto' uses another algorithm, 'dense' builds its filter with PyTorch ops",
    "cuda": "CUDA calls use 'triton' or 'separable' under backend='auto', 'dense' builds its filter with PyTorch ops",
}


# torch.compile cannot trace the lock (dynamo: "Unsupported context manager"), and a
# build has no place in a graph: dynamo calls this function at trace time and keeps
# its result as a constant of the graph. That is exact, since the answer is decided
# once per process and never changes.
@constant_while_tracing
def _kernels_available(target: str) -> bool:
    """Build (once) and load the ``target`` kernels; False, after one RuntimeWarning naming the cause, if impossible."""
    state = _state[target]
    if "ok" in state:  # decided: no lock
        return bool(state["ok"])
    with _lock:
        if "ok" not in state:
            try:
                _build(target)
                state["ok"] = True
            except Exception as exc:  # no compiler, no ninja, no nvcc, read-only cache...
                state["ok"] = False
                state["error"] = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
                warnings.warn(
                    f"dcn_fast: the C++/CUDA {target} kernels could not be built ({state['error']}); "
                    f"{_FALLBACK[target]}. `python -m dcn_fast.build {target}` shows the build.",
                    RuntimeWarning,
                    stacklevel=4,
                )
    return bool(state["ok"])


def cpu_kernel_available() -> bool:
    """Build (once) and load the C++ CPU kernels (tiled and dense); False if that is impossible."""
    return _kernels_available("cpu")


def cuda_kernel_available() -> bool:
    """Build (once) and load the CUDA dense kernels; False if that is impossible (e.g. no nvcc).

    They need the CPU build's sibling ops only through the schemas above, so
    the two build independently.
    """
    return _kernels_available("cuda")


def kernel_error(target: str) -> Optional[str]:
    """Why the ``target`` build failed, if it did."""
    return _state[target].get("error")  # type: ignore[return-value]


# --- the cpu (tiled) algorithm ----------------------------------------------


def require_kernels(target: str) -> None:
    """Raise unless the ``target`` kernels are built (building them on the first call)."""
    if not (_state[target].get("ok") or _kernels_available(target)):
        raise RuntimeError(f"dcn_fast: the {target} kernels are not built: {kernel_error(target)}")


def _tiled_forward(input, taps, alpha, bias, shift, stride, padding, groups):
    require_kernels("cpu")
    # The kernel reads its addends in the input's dtype (as this algorithm cast the bias before the fold).
    bias, shift = (None if t is None else t.to(input.dtype) for t in (bias, shift))
    return torch.ops.dcn_fast.srf_tiled_conv2d(input, taps[0, 0], alpha, bias, shift, stride, padding, groups)


def _tiled_backward(grad_output, input, taps, alpha, stride, padding, groups, mask):
    grad_input, grad_taps, grad_alpha = torch.ops.dcn_fast.srf_tiled_conv2d_backward(
        grad_output, input, taps[0, 0], alpha, stride, padding, groups, list(mask)
    )
    return grad_input, None if grad_taps is None else grad_taps[None, None], grad_alpha


register_algorithm("cpu", Algorithm(_tiled_forward, _tiled_backward, devices=("cpu",), any_taps=False))


def srf_conv2d(
    input: torch.Tensor,
    taps: torch.Tensor,
    alpha: torch.Tensor,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    algorithm: str,
) -> torch.Tensor:
    """Run ``torch.ops.dcn_fast.srf_conv2d``.

    Args:
        input: ``[B, C_in, H, W]``.
        taps: ``[T_o, T_i, N+1, K]`` (see the module docstring), input's dtype.
        alpha: ``[F, C_in/groups, C_out]``, input's dtype.
        bias: None or ``[C_out]``, input's dtype.
        shift: None or ``[C_out, Ho, Wo]``, input's dtype, added to every image's output
            (an ODE block's time map ``t·M``); the ``cpu`` algorithm adds it, and the
            bias, as it writes the output.
        algorithm: a registered algorithm (``cpu``, ``dense``, ``separable``, ``triton``).
    Returns:
        ``[B, C_out, Ho, Wo]``, contiguous.
    """
    return torch.ops.dcn_fast.srf_conv2d(input, taps, alpha, bias, shift, list(stride), list(padding), groups,
                                         algorithm)


# --- the Runge–Kutta step's arithmetic (dcn_fast/solver.py) -----------------
#
# ``rk_combine(base, terms, coeffs) = base + Σ_j coeffs[j]·terms[j]`` (``base``
# None: 0) and the RMS error ratio of ``Σ_j coeffs[j]·terms[j]`` over
# ``atol + rtol·max(|y0|, |y1|)``, each one pass over memory in the C++ CPU
# kernel (csrc/cpu/rk_step_kernel.cpp); the references below are the oracle in
# tests and the path on other devices. ``coeffs`` is a float64 tensor so that
# time-dependent coefficients never need a host read (the sync-free solve).

_LIB.define("rk_combine(Tensor? base, Tensor[] terms, Tensor coeffs) -> Tensor")
_LIB.define("rk_error_ratio(Tensor y0, Tensor y1, Tensor[] terms, Tensor coeffs, float rtol, float atol) -> Tensor")


def rk_combine_reference(base: torch.Tensor | None, terms, coeffs: torch.Tensor) -> torch.Tensor:
    """``base + Σ_j coeffs[j]·terms[j]`` with PyTorch ops (differentiable), in the terms' dtype."""
    like = base if base is not None else terms[0]
    out = base
    for coefficient, term in zip(coeffs.to(device=like.device, dtype=like.dtype).unbind(), terms):
        out = term * coefficient if out is None else out + term * coefficient
    return out if out is not None else torch.zeros_like(like)


def rk_error_ratio_reference(y0, y1, terms, coeffs, rtol: float, atol: float) -> torch.Tensor:
    """torchdiffeq's ``_compute_error_ratio`` with the RMS norm, as a 0-d float64 tensor."""
    error = rk_combine_reference(None, terms, coeffs)
    tolerance = atol + rtol * torch.max(y0.abs(), y1.abs())
    return (error / tolerance).double().pow(2).mean().sqrt()


def _check_terms(like, terms, coeffs) -> None:
    _check(coeffs.dim() == 1 and coeffs.shape[0] == len(terms),
           lambda: f"rk_combine: {len(terms)} terms need {len(terms)} coefficients, got {tuple(coeffs.shape)}")
    for term in terms:
        _check(term.shape == like.shape and term.dtype == like.dtype,
               lambda: f"rk_combine: every term must be shaped and typed like the first, got {term.shape}")


@torch.library.register_fake("dcn_fast::rk_combine", lib=_LIB)
def _(base, terms, coeffs):
    like = base if base is not None else terms[0]
    _check_terms(like, terms, coeffs)
    return torch.empty_like(like, memory_format=torch.contiguous_format)


@torch.library.register_fake("dcn_fast::rk_error_ratio", lib=_LIB)
def _(y0, y1, terms, coeffs, rtol, atol):
    _check_terms(y0, terms, coeffs)
    return y0.new_empty((), dtype=torch.float64)


def _combine_setup_context(ctx, inputs, output):
    base, terms, coeffs = inputs
    ctx.has_base, ctx.coeffs = base is not None, coeffs


def _combine_backward(ctx, grad_output):
    # Linear: the base's gradient is the output's, each term's that times its coefficient.
    scales = ctx.coeffs.to(device=grad_output.device, dtype=grad_output.dtype).unbind()
    return grad_output if ctx.has_base else None, [grad_output * c for c in scales], None


torch.library.register_autograd("dcn_fast::rk_combine", _combine_backward, setup_context=_combine_setup_context,
                                lib=_LIB)


# --- GroupNorm followed by an activation (dcn_fast/ode.py's ODE function) ----
#
# ``act(group_norm(x))`` with ``act`` one of ACTIVATIONS_FUSED: one statistics
# pass and one normalise–affine–activate pass in the C++ CPU kernel
# (csrc/cpu/group_norm_act_kernel.cpp), a fused backward; the reference below is
# the oracle in tests and the path on other devices and dtypes.

#: Activations ``group_norm_act`` fuses (``alpha`` is CELU's).
ACTIVATIONS_FUSED = ("identity", "relu", "celu")

_LIB.define(
    "group_norm_act(Tensor input, Tensor? weight, Tensor? bias, int groups, float eps, str activation, "
    "float alpha) -> (Tensor, Tensor, Tensor)"
)
_LIB.define(
    "group_norm_act_backward(Tensor grad, Tensor input, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, "
    "int groups, str activation, float alpha, bool[3] output_mask) -> (Tensor, Tensor, Tensor)"
)


def group_norm_act_reference(input, weight, bias, groups: int, eps: float, activation: str, alpha: float = 1.0):
    """``act(F.group_norm(input, groups, weight, bias, eps))`` with PyTorch ops (differentiable to any order)."""
    out = torch.nn.functional.group_norm(input, groups, weight, bias, eps)
    if activation == "relu":
        return torch.relu(out)
    if activation == "celu":
        # Not torch.celu: its backward rounds 1/alpha to float32 (2e-8 off in float64 for alpha != 1).
        return torch.where(out > 0, out, alpha * torch.expm1(out.clamp(max=0) / alpha))
    return out


def group_norm_act_is_fused(input: torch.Tensor) -> bool:
    """Whether :func:`group_norm_act` runs the fused kernel on ``input`` (float32/64 on the CPU)."""
    return input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64) and cpu_kernel_available()


def group_norm_act(input, weight, bias, groups: int, eps: float, activation: str, alpha: float = 1.0):
    """``act(group_norm(input))``: the fused CPU kernel for float32/float64 CPU tensors, else the reference.

    Args:
        input: ``[N, C, *]``; weight, bias: None or ``[C]``; groups: divides C.
        activation: one of :data:`ACTIVATIONS_FUSED`; alpha: CELU's α (≠ 0).
    """
    if activation not in ACTIVATIONS_FUSED:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS_FUSED))}, got {activation!r}")
    if activation == "celu" and alpha == 0:
        raise ValueError("alpha must not be 0 for activation='celu'")
    if group_norm_act_is_fused(input):
        return torch.ops.dcn_fast.group_norm_act(input, weight, bias, groups, eps, activation, alpha)[0]
    return group_norm_act_reference(input, weight, bias, groups, eps, activation, alpha)


@torch.library.register_fake("dcn_fast::group_norm_act", lib=_LIB)
def _(input, weight, bias, groups, eps, activation, alpha):
    stats = input.new_empty((input.shape[0], groups))
    return torch.empty_like(input, memory_format=torch.contiguous_format), stats, stats.clone()


@torch.library.register_fake("dcn_fast::group_norm_act_backward", lib=_LIB)
def _(grad, input, mean, rstd, weight, bias, groups, activation, alpha, output_mask):
    return (torch.empty_like(input, memory_format=torch.contiguous_format) if output_mask[0] else None,
            torch.empty_like(weight) if output_mask[1] and weight is not None else None,
            torch.empty_like(bias) if output_mask[2] and bias is not None else None)


def _norm_act_setup_context(ctx, inputs, output):
    input, weight, bias, groups, eps, activation, alpha = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, mean, rstd, weight, bias)
    ctx.arguments = (groups, eps, activation, alpha)
    ctx.mark_non_differentiable(mean, rstd)


def _norm_act_backward(ctx, grad, _grad_mean, _grad_rstd):
    input, mean, rstd, weight, bias = ctx.saved_tensors
    groups, eps, activation, alpha = ctx.arguments
    mask = list(ctx.needs_input_grad[:3])
    if torch.is_grad_enabled():
        # create_graph=True: the reference's autograd on the saved (graph-connected)
        # tensors gives a gradient that differentiates again.
        operands = (input, weight, bias)
        asked = [t for t, need in zip(operands, mask) if need]
        with torch.enable_grad():
            out = group_norm_act_reference(input, weight, bias, groups, eps, activation, alpha)
            grads = iter(torch.autograd.grad(out, asked, grad, create_graph=True))
        return (*(next(grads) if need else None for need in mask), None, None, None, None)
    grads = torch.ops.dcn_fast.group_norm_act_backward(
        grad.contiguous(), input, mean, rstd, weight, bias, groups, activation, alpha, mask
    )
    return (*grads, None, None, None, None)


torch.library.register_autograd("dcn_fast::group_norm_act", _norm_act_backward,
                                setup_context=_norm_act_setup_context, lib=_LIB)
