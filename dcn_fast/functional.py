"""``srf_conv2d``: the SRF convolution with validated arguments and backend dispatch."""

from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Union

import torch

from . import dense, ops, separable  # noqa: F401  (dense and separable register their algorithms)
from .basis import MAX_RADIUS, MIN_SCALE, num_basis, srf_taps
from .geometry import output_size, resolve_padding
from .reference import srf_conv2d_reference

__all__ = ["srf_conv2d", "plan_srf_conv2d", "SRFCall", "srf_taps_for", "BACKENDS", "MIN_SCALE", "check_options", "resolve_backend", "truncation_radius"]

BACKENDS = ("auto", "reference", "cpu", "dense", "separable", "triton")

IntPair = Union[int, tuple[int, int]]
Padding = Union[str, int, tuple[int, int]]


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    items = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None or len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items


def _radius_tensor(scale: torch.Tensor, truncate: float) -> torch.Tensor:
    # Same tensor arithmetic as the taps' own truncation, so both agree at the edges.
    return torch.ceil(truncate * (2.0 ** scale.detach()).max() + 0.5)


def truncation_radius(scale: torch.Tensor, truncate: float) -> int:
    """Published radius ``ceil(truncate · σ + 0.5)`` of the largest σ (reads σ back to the host)."""
    return int(_radius_tensor(scale, truncate).item())


#: Smallest scale (log2 σ) accepted. Below about -5.3 (σ < 0.026) every tap past
#: the centre is exp(-1/(2σ²)) = 0 even in float64: the filter is a discrete delta
#: and a smaller scale changes nothing, while the σ gradient's powers of 1/σ
#: overflow float32 (NaN outputs and gradients from about -24 at order 4).

def checked_radius(scale: torch.Tensor, truncate: float, kernel_size: int | None) -> int:
    """Tap radius for ``scale``, after checking it is finite and within [MIN_SCALE, cap]: one host read."""
    s = scale.detach()
    low, high, radius = torch.stack([s.min(), s.max(), _radius_tensor(s, truncate).to(s.dtype)]).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("scale (log2 σ) must be finite, got NaN or inf")
    if low < MIN_SCALE:
        raise ValueError(
            f"scale too small: scale = {low:.4g} (σ = 2^scale); the allowed range is scale >= {MIN_SCALE:g} "
            "(below about -5.3 the taps are already a discrete delta, and the σ gradient overflows)"
        )
    if kernel_size is not None:
        return kernel_size // 2
    if radius > MAX_RADIUS:
        limit = math.log2((MAX_RADIUS - 0.5) / truncate)
        taps = f"{2 * int(radius) + 1}" if math.isfinite(radius) else "infinitely many"
        raise ValueError(
            f"scale too large: scale = {high:.4g} (σ = 2^scale) with truncate={truncate} gives a kernel of "
            f"{taps} taps; the cap is {2 * MAX_RADIUS + 1} (scale <= {limit:.3f})"
        )
    return int(radius)


def srf_taps_for(
    scale: torch.Tensor, *, order: int = 2, truncate: float = 2.0, kernel_size: int | None = None
) -> torch.Tensor:
    """The 1-D taps ``[*scale.shape, order+1, K]`` that :func:`srf_conv2d` would build for ``scale``.

    Pass them as ``srf_conv2d(..., taps=taps)`` to share them between calls with
    the same scale (e.g. every evaluation of one ODE solve): the call then
    neither rebuilds them nor reads σ back to the host. Differentiable in ``scale``.
    The call takes K from ``taps``: taps built with a larger radius (zeros past
    σ's own radius, see :func:`dcn_fast.srf_taps`) are exact too under
    ``padding="same"`` (with other paddings K also sets the output size).
    """
    check_options(order=order, truncate=truncate, stride=1, padding="same", groups=1, kernel_size=kernel_size)
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"scale must be a floating-point torch.Tensor, got {type(scale).__name__}")
    radius = checked_radius(scale, truncate, kernel_size)
    return srf_taps(scale, order, radius, truncate if kernel_size is None else None)


@dataclass(frozen=True)
class _Spec:
    """Validated geometry of one call."""

    sharing: str  # "layer" | "channel" | "pair"
    radius: int
    stride: tuple[int, int]
    padding: tuple[int, int]


def check_options(
    *, order: int, truncate: float, stride: IntPair, padding: Padding, groups: int, kernel_size: int | None
) -> tuple[tuple[int, int], str | tuple[int, int]]:
    """Validate the tensor-independent arguments; returns stride and padding normalised."""
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise ValueError(f"order must be an int >= 0, got {order!r}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if isinstance(truncate, bool) or not (isinstance(truncate, (int, float)) and math.isfinite(truncate) and truncate > 0):
        raise ValueError(f"truncate must be a finite number > 0, got {truncate!r}")
    if kernel_size is not None:
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be None or an odd int >= 1, got {kernel_size!r}")
        if kernel_size > 2 * MAX_RADIUS + 1:
            raise ValueError(f"kernel_size must be <= {2 * MAX_RADIUS + 1}, got {kernel_size}")
    stride = _pair(stride, "stride", 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int >= 0 or a pair, got {padding!r}")
    else:
        padding = _pair(padding, "padding", 0)
    return stride, padding


def _validate(input, scale, alpha, order, truncate, stride, padding, groups, bias, kernel_size, taps) -> _Spec:
    stride, padding = check_options(
        order=order, truncate=truncate, stride=stride, padding=padding, groups=groups, kernel_size=kernel_size
    )
    for name, t in (("input", input), ("scale", scale), ("alpha", alpha)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [batch, channels, height, width], got shape {tuple(input.shape)}")
    c_in = input.shape[1]
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels ({c_in})")
    n_basis = num_basis(order)
    if alpha.dim() != 3 or alpha.shape[0] != n_basis or alpha.shape[1] * groups != c_in:
        raise ValueError(
            f"alpha must have shape [F, C_in/groups, C_out] = [{n_basis}, {c_in // groups}, C_out] for order={order}, "
            f"groups={groups} and {c_in} input channels, got {tuple(alpha.shape)}"
        )
    c_out = alpha.shape[2]
    if c_out < 1 or c_out % groups:
        raise ValueError(f"groups={groups} must divide the output channels (alpha.shape[2] = {c_out})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c_out,)):
        raise ValueError(f"bias must be None or a tensor of shape [{c_out}], got {getattr(bias, 'shape', bias)!r}")
    for name, t in (("scale", scale), ("alpha", alpha), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")

    if scale.numel() == 1 and scale.dim() <= 1:
        sharing = "layer"
    elif tuple(scale.shape) == (c_out,):
        sharing = "channel"
    elif tuple(scale.shape) == (c_out, c_in // groups):
        sharing = "pair"
    else:
        raise ValueError(
            f"scale must have shape [1] (one σ per layer), [C_out] = [{c_out}] or "
            f"[C_out, C_in/groups] = [{c_out}, {c_in // groups}], got {tuple(scale.shape)}"
        )
    if sharing == "pair" and kernel_size is None:
        raise ValueError("one σ per (output, input) pair needs a fixed kernel_size (published σ^ji: 7)")
    if taps is None:
        radius = checked_radius(scale, truncate, kernel_size)
    else:
        if not isinstance(taps, torch.Tensor):
            raise TypeError(f"taps must be a torch.Tensor from srf_taps_for(scale, ...), got {type(taps).__name__}")
        radius = taps.shape[-1] // 2
        expected = (*scale.shape, order + 1, 2 * radius + 1)
        if tuple(taps.shape) != expected:
            raise ValueError(
                f"taps must come from srf_taps_for(scale, ...) with this scale and order: expected shape "
                f"{expected}, got {tuple(taps.shape)}"
            )

    pad = resolve_padding(padding, radius)
    height, width = input.shape[-2:]
    k = 2 * radius + 1
    if height + 2 * pad[0] < k or width + 2 * pad[1] < k:
        raise ValueError(
            f"input of {height}x{width} with padding {pad} is smaller than the {k}x{k} kernel; "
            "use padding='same' or a smaller scale"
        )
    return _Spec(sharing, radius, stride, pad)


def _check_shift(shift, input_shape: tuple, c_out: int, device: torch.device, spec: _Spec) -> None:
    """``shift`` must be a floating tensor ``[C_out, Ho, Wo]`` on the input's device."""
    k = 2 * spec.radius + 1
    shape = (c_out, *(output_size(n, k, s, p) for n, s, p in zip(input_shape[-2:], spec.stride, spec.padding)))
    if not isinstance(shift, torch.Tensor) or tuple(shift.shape) != shape:
        raise ValueError(f"shift must be None or a tensor of shape [C_out, Ho, Wo] = {list(shape)}, "
                         f"got {getattr(shift, 'shape', shift)!r}")
    if not shift.is_floating_point():
        raise TypeError(f"shift must be a floating-point tensor, got dtype {shift.dtype}")
    if shift.device != device:
        raise ValueError(f"shift is on {shift.device} but input is on {device}")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed and working); importing registers the algorithm."""
    try:
        from .kernels import srf_conv2d  # noqa: F401
    except ImportError:
        return False
    return True


#: ``auto`` on CUDA runs ``dense`` up to this kernel size (provisional, see :func:`resolve_backend`).
AUTO_DENSE_MAX_KERNEL = 11


def resolve_backend(
    backend: str,
    input: torch.Tensor,
    dtype: torch.dtype | None = None,
    alpha: torch.Tensor | None = None,
    groups: int = 1,
    sharing: str = "layer",
    kernel: int | None = None,
) -> str:
    """The algorithm that runs for ``backend`` on ``input``'s device.

    ``auto``: one σ per output channel or per pair → ``dense`` (the one
    algorithm that takes them). One σ per layer, as measured (README,
    Benchmarks): float32/float64 CPU tensors → ``cpu`` (the C++ kernel, when it
    builds), other CPU dtypes → ``separable``; CUDA → ``dense`` for kernels of
    at most :data:`AUTO_DENSE_MAX_KERNEL` taps when its CUDA kernels are built
    (a provisional rule: cuDNN with fixed K×K weights beat the fused Triton
    layer at σ ≤ 2 on an H100; ``dense`` itself awaits GPU measurements), else
    ``triton`` where its kernels take the call (groups = 1, at most 256 output
    channels, float32/bf16/fp16, Triton installed), else ``separable``.

    An explicit backend that cannot serve the call raises ValueError (it is
    never silently replaced).

    Args:
        sharing: ``"layer"``, ``"channel"`` or ``"pair"`` (how σ is shared).
        kernel: the kernel size K of the call, when known.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    device = input.device.type
    dtype = dtype or input.dtype
    # The C++ tiled kernel computes in float32 and float64; lower precisions (autocast,
    # bf16 models) take other algorithms, whose convolutions support them.
    full_precision = dtype in (torch.float32, torch.float64)
    if backend == "auto":
        if sharing != "layer":
            return "dense"
        if device == "cpu":
            return "cpu" if full_precision and ops.cpu_kernel_available() else "separable"
        if device == "cuda":
            if kernel is not None and kernel <= AUTO_DENSE_MAX_KERNEL and ops.cuda_kernel_available():
                return "dense"
            if triton_available():
                from .kernels.srf_conv2d import supports

                alpha_shape = alpha.shape if alpha is not None else (1, input.shape[1], 1)
                if supports(input.shape, dtype, alpha_shape, groups) is None:
                    return "triton"
        return "separable"
    if sharing != "layer" and backend in ("cpu", "separable", "triton"):
        raise ValueError(
            f"backend={backend!r} takes one σ per layer; one σ per output channel or per pair runs on "
            "backend='dense' (or 'auto', or 'reference')"
        )
    if backend == "cpu":
        if device != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got input on {input.device}")
        if not full_precision:
            raise ValueError(f"backend='cpu' computes in float32 or float64, got {dtype}")
        if not ops.cpu_kernel_available():
            raise ValueError(
                f"backend='cpu' needs the C++ kernel, which could not be built ({ops.kernel_error('cpu')}); "
                "use backend='auto' or 'separable'"
            )
    if backend == "triton":
        if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter), "
                f"got input on {input.device}"
            )
        _import_triton()
    return backend


def _import_triton() -> None:
    try:
        from .kernels import srf_conv2d  # noqa: F401  (registers the algorithm)
    except ImportError as exc:  # triton missing or broken
        raise ValueError(f"backend='triton' needs Triton ({type(exc).__name__}: {exc})") from exc


def srf_conv2d(
    input: torch.Tensor,
    scale: torch.Tensor,
    alpha: torch.Tensor,
    *,
    order: int = 2,
    truncate: float = 2.0,
    stride: IntPair = 1,
    padding: Padding = "same",
    groups: int = 1,
    bias: torch.Tensor | None = None,
    kernel_size: int | None = None,
    backend: str = "auto",
    taps: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Structured-receptive-field convolution (Gaussian-derivative N-jet basis).

    The filter is ``W[o, i] = Σ_f alpha[f, i, o] · B_f`` with the published
    2-D basis ``B_(l,m) = b_l ⊗ b_m`` of scale-normalised Gaussian derivatives
    at σ = 2^scale (``../shared/DESIGN.md`` §1), applied as a cross-correlation.

    Args:
        input: ``[B, C_in, H, W]``.
        scale: log2 σ: ``[1]`` one σ per layer, ``[C_out]`` one per output
            channel, or ``[C_out, C_in/groups]`` one per pair (σ^ji, needs
            ``kernel_size``).
        alpha: coefficients ``[F, C_in/groups, C_out]``, F = (order+1)(order+2)/2.
        order: highest derivative order N ≥ 0.
        truncate: radius ``r = ceil(truncate·σ + 0.5)``, K = 2r + 1 (with several
            σ: K from the largest, each σ zeroed past its own r).
        stride: int or (sH, sW), ≥ 1.
        padding: ``"same"`` (= r, as published), ``"valid"``, an int or a pair.
        groups: as in ``nn.Conv2d``; must divide C_in and C_out.
        bias: optional ``[C_out]``.
        kernel_size: fixed odd K instead of the σ-dependent one (no truncation).
        backend: the algorithm: ``"auto"`` (see :func:`resolve_backend`),
            ``"reference"`` (the published construction), ``"cpu"`` (C++, tiled
            separable passes; CPU), ``"dense"`` (dense filter + oneDNN/cuDNN;
            any σ sharing), ``"separable"`` (PyTorch convolutions) or
            ``"triton"`` (CUDA). One that cannot serve the call raises ValueError.
        taps: optional taps from :func:`srf_taps_for` for this ``scale`` (and
            the same order, truncate, kernel_size), to reuse them across calls
            (the ``reference`` backend rebuilds its filter regardless, at their radius).
        shift: optional ``[C_out, Ho, Wo]`` added to every image's output after
            the bias (an ODE block's time map ``t·conv_t(1)``); the ``cpu``
            backend adds it, and the bias, as it writes the output (no pass of their own).

    Returns:
        ``[B, C_out, Ho, Wo]`` with ``Ho = (H + 2 pH - K) // sH + 1``.

    Example:
        >>> x = torch.randn(2, 3, 16, 16)
        >>> alpha = torch.randn(6, 3, 8) * 0.1
        >>> srf_conv2d(x, torch.zeros(1), alpha).shape
        torch.Size([2, 8, 16, 16])
    """
    call = plan_srf_conv2d(input, scale, alpha, order=order, truncate=truncate, stride=stride, padding=padding,
                           groups=groups, bias=bias, kernel_size=kernel_size, backend=backend, taps=taps)
    return call(input, shift)


def _versions(tensors: tuple) -> tuple | None:
    """The tensors' version counters (bumped by every in-place change; inference tensors have none),
    or None while torch.compile traces (which reads neither, and guards on its inputs itself)."""
    if torch.compiler.is_compiling():
        return None
    return tuple(None if t.is_inference() else getattr(t, "_version", None) for t in tensors)


class SRFCall:
    """A validated :func:`srf_conv2d` call (from :func:`plan_srf_conv2d`), to run on inputs like the planned one.

    ``call(input, shift=None)`` convolves without checking the weights and
    options or resolving the backend again: an ODE solve convolves every
    evaluation's state with the same weights, and those checks were ~50 µs of
    each call (2-core CPU, batch 1-8). ``input`` must have the planned input's
    shape, dtype and device, and the weights must be as planned: a call after
    one of them changed in place (an optimizer step), or with gradients enabled
    on a plan made without them (its taps would carry no graph to σ), raises
    and asks for a new plan. ``shift`` is checked as in :func:`srf_conv2d`.
    """

    # A plain class, not a dataclass: torch 2.11's dynamo lost a frozen dataclass's fields
    # built inside a compiled function ("'SRFCall' object has no attribute 'spec'").
    def __init__(self, spec: _Spec, backend: str, dtype: torch.dtype, *, arguments: tuple, input_shape: tuple,
                 input_dtype: torch.dtype, device: torch.device, c_out: int, weights: tuple,
                 versions: tuple | None, planned_with_grad: bool) -> None:
        self.spec = spec
        self.backend = backend  # the resolved algorithm, or "reference"
        self.dtype = dtype  # the dtype the convolution runs in
        self.arguments = arguments  # the op's weights and options, or the reference's arguments
        self.input_shape, self.input_dtype, self.device = input_shape, input_dtype, device
        self.c_out = c_out
        self.weights = weights  # the tensors given (scale, alpha, bias, taps), to detect in-place changes
        self.versions = versions
        self.planned_with_grad = planned_with_grad

    def __call__(self, input: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        if (not isinstance(input, torch.Tensor) or tuple(input.shape) != self.input_shape
                or input.dtype != self.input_dtype or input.device != self.device):
            got = (f"{list(input.shape)} {input.dtype} on {input.device}" if isinstance(input, torch.Tensor)
                   else type(input).__name__)
            raise ValueError(f"input must match the planned input ({list(self.input_shape)} {self.input_dtype} "
                             f"on {self.device}), got {got}")
        if self.versions is not None and not torch.compiler.is_compiling() and _versions(self.weights) != self.versions:
            raise RuntimeError("a weight of this SRFCall (scale, alpha, bias or taps) changed in place since it "
                               "was planned: plan again (plan_srf_conv2d) after the weights change")
        if not self.planned_with_grad and torch.is_grad_enabled() and any(w.requires_grad for w in self.weights):
            raise RuntimeError("this SRFCall was planned with gradients disabled and is called with them enabled "
                               "(its taps carry no graph to scale): plan again with gradients enabled")
        if shift is not None:
            _check_shift(shift, self.input_shape, self.c_out, self.device, self.spec)
        if self.backend == "reference":
            out = srf_conv2d_reference(input, *self.arguments)
            return out if shift is None else out + shift.to(out.dtype)
        taps, alpha, bias, groups = self.arguments
        input = input.to(self.dtype)
        # The op runs in the promoted dtype of the inputs: autocast would recast the
        # separable algorithm's grouped 1-D convolutions, which oneDNN cannot run in
        # bf16. The Triton kernels read the input in the autocast dtype (as cuDNN
        # would), keep taps and α in float32, accumulate in float32 and return the
        # autocast dtype.
        device = input.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast and self.backend == "triton" and input.dtype == torch.float32:
            input = input.to(torch.get_autocast_dtype(device))
        shift = None if shift is None else shift.to(self.dtype)
        with torch.autocast(device, enabled=False) if autocast else nullcontext():
            return ops.srf_conv2d(input, taps, alpha, bias, shift, self.spec.stride, self.spec.padding, groups,
                                  self.backend)


def plan_srf_conv2d(
    input: torch.Tensor,
    scale: torch.Tensor,
    alpha: torch.Tensor,
    *,
    order: int = 2,
    truncate: float = 2.0,
    stride: IntPair = 1,
    padding: Padding = "same",
    groups: int = 1,
    bias: torch.Tensor | None = None,
    kernel_size: int | None = None,
    backend: str = "auto",
    taps: torch.Tensor | None = None,
) -> SRFCall:
    """Check the arguments of :func:`srf_conv2d` (without ``shift``) and resolve its backend once.

    Returns an :class:`SRFCall` that convolves inputs of ``input``'s shape,
    dtype and device with these weights; it keeps them (and their graph, when
    they need gradients), so plan again after they change.
    """
    spec = _validate(input, scale, alpha, order, truncate, stride, padding, groups, bias, kernel_size, taps)
    dtype = torch.promote_types(input.dtype, alpha.dtype)
    name = resolve_backend(backend, input, dtype, alpha, groups, spec.sharing, 2 * spec.radius + 1)
    weights = tuple(t for t in (scale, alpha, bias, taps) if t is not None)
    planned = dict(input_shape=tuple(input.shape), input_dtype=input.dtype, device=input.device,
                   c_out=alpha.shape[2], weights=weights, versions=_versions(weights),
                   planned_with_grad=torch.is_grad_enabled())
    if name == "reference":
        # "same" stays symbolic: the reference pads by its own filter's radius, which is
        # smaller than spec's when taps were laid out at a bound (σ(t) layers).
        same_or_pad = "same" if padding == "same" else spec.padding
        # Given taps fix the radius: no host read of σ (torch.compile traces it as one graph).
        arguments = (scale, alpha, order, truncate, spec.stride, same_or_pad, groups, bias, kernel_size,
                     None if taps is None else spec.radius)
        return SRFCall(spec, name, dtype, arguments=arguments, **planned)
    alpha = alpha.to(dtype)
    if taps is None:
        taps = srf_taps(scale.to(dtype), order, spec.radius, truncate if kernel_size is None else None)
    # [T_o, T_i, N+1, K]: one tap set per layer, per output channel or per pair.
    taps = taps.to(dtype).reshape(*(alpha.shape[2], -1) if spec.sharing != "layer" else (1, 1), *taps.shape[-2:])
    bias = None if bias is None else bias.to(dtype)
    return SRFCall(spec, name, dtype, arguments=(taps, alpha, bias, groups), **planned)
