"""``SRFConv2d``: a drop-in ``nn.Conv2d`` with a learnable-scale Gaussian N-jet basis."""

from __future__ import annotations

import torch
from torch import nn

from .basis import OUTGROWN_RADIUS_ERROR, SCALE_SHARING, HostReadback, num_basis, srf_taps
from .fit import FIXED_FROM_WEIGHT, fit_srf, filter_error
from .functional import (BACKENDS, IntPair, Padding, SRFCall, _radius_tensor, check_options, checked_radius,
                         plan_srf_conv2d, truncation_radius)
from .geometry import resolve_padding
from .separable import dense_filters

__all__ = ["SRFConv2d", "SCALE_SHARING", "scale_from_published", "conv2d_geometry", "UnsupportedConvError"]

#: Published initialisation: α ~ N(0, 0.1²); learned log2 σ ~ N(init_scale, (2/3)²).
ALPHA_INIT_STD = 0.1
SCALE_INIT_STD = 2.0 / 3.0


class UnsupportedConvError(ValueError):
    """An ``nn.Conv2d`` whose geometry SRFConv2d cannot reproduce (dilation, padding mode,
    kernel shape, or padding for the chosen support): :func:`dcn_fast.convert_model` skips it."""


class SRFConv2d(nn.Module):
    """Structured-receptive-field convolution: ``nn.Conv2d`` whose filters are
    Gaussian-derivative (N-jet) expansions at a learnable scale σ = 2^scale.

    The filter of output o and input i is ``Σ_f alpha[f, i, o] · B_f(σ)`` with
    the published basis (DESIGN.md §1); its size follows σ:
    ``K = 2·ceil(truncate·σ + 0.5) + 1`` unless ``kernel_size`` fixes it.

    Args:
        in_channels, out_channels: channel counts (≥ 1).
        order: highest derivative order N (F = (N+1)(N+2)/2 basis functions).
        init_scale: initial log2 σ. A learned scale is drawn from
            N(init_scale, (2/3)²) as in the published code; a fixed one equals it.
        learn_scale: whether ``scale`` receives gradients.
        truncate: ``k`` of the radius ``ceil(k σ + 0.5)``.
        stride, padding, groups: as in ``nn.Conv2d``; padding ``"same"`` is the
            radius (as published), ``"valid"`` none.
        bias: add a learnable bias (initialised to zero).
        scale_sharing: ``"layer"`` (one σ, shape [1]), ``"channel"`` (one per
            output channel) or ``"pair"`` (σ^ji, one per (output, input) pair;
            needs ``kernel_size``, published: 7).
        kernel_size: fixed odd K instead of the σ-dependent size.
        backend: see :func:`dcn_fast.srf_conv2d`.

    Shapes: input ``[B, C_in, H, W]`` → output ``[B, C_out, Ho, Wo]``.
    Parameters: ``alpha`` ``[F, C_in/groups, C_out]`` and ``scale``.

    State dicts of the published ``Srf_layer_shared`` and ``Srf_layer_ind``
    (keys ``alphas`` and ``scales``) load directly: the σ^ji scales, stored
    ``[C_in, C_out]`` there, are transposed (:func:`scale_from_published`).

    The kernel size needs σ on the host: it is read back only after ``scale``
    changed (:class:`~dcn_fast.basis.HostReadback`), so between updates a
    forward has no host sync and can be captured in a CUDA graph. Writes
    through ``scale.data`` are seen on the CPU; on an accelerator a σ grown
    past the cached kernel gives NaN, never a silently truncated filter. With
    a learned σ and ``padding`` other than ``"same"`` on an accelerator, σ is
    read every call (K sets the output size there).

    Under ``torch.compile`` σ is read once, while dynamo traces: the graph is
    specialised on that radius (``fullgraph=True`` holds). A σ that outgrows
    it raises on the CPU (:data:`~dcn_fast.basis.OUTGROWN_RADIUS_ERROR`) and
    gives NaN on an accelerator; retrace with ``torch.compiler.reset()``.

    Example:
        >>> layer = SRFConv2d(3, 16, init_scale=0.0)
        >>> layer(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 16, 32, 32])
    """

    #: Relative L2 error per output channel (``[C_out]``, float64, CPU) of the filters
    #: :meth:`from_conv2d` fitted, against the conv's weights at conversion (``None`` unless
    #: fitted; not updated by training, not in the state dict).
    fit_error: torch.Tensor | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        order: int = 2,
        init_scale: float = 0.0,
        learn_scale: bool = True,
        truncate: float = 2.0,
        stride: IntPair = 1,
        padding: Padding = "same",
        groups: int = 1,
        bias: bool = False,
        scale_sharing: str = "layer",
        kernel_size: int | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        stride, padding = check_options(
            order=order, truncate=truncate, stride=stride, padding=padding, groups=groups, kernel_size=kernel_size
        )
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels ({in_channels}) and out_channels ({out_channels})"
            )
        if scale_sharing not in SCALE_SHARING:
            raise ValueError(f"scale_sharing must be one of {SCALE_SHARING}, got {scale_sharing!r}")
        if scale_sharing == "pair" and kernel_size is None:
            raise ValueError("scale_sharing='pair' (σ^ji) needs a fixed kernel_size (published: 7)")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if not isinstance(learn_scale, bool):
            raise TypeError(f"learn_scale must be True or False, got {learn_scale!r}")
        if not isinstance(init_scale, (int, float)) or not torch.isfinite(torch.tensor(float(init_scale))):
            raise ValueError(f"init_scale must be a finite number, got {init_scale!r}")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.order, self.truncate, self.stride, self.padding = order, float(truncate), stride, padding
        self.groups, self.scale_sharing, self.fixed_kernel_size = groups, scale_sharing, kernel_size
        self.init_scale, self.learn_scale, self.backend = float(init_scale), learn_scale, backend

        factory = {"device": device, "dtype": dtype}
        self.alpha = nn.Parameter(torch.empty(num_basis(order), in_channels // groups, out_channels, **factory))
        scale_shape = {"layer": (1,), "channel": (out_channels,), "pair": (out_channels, in_channels // groups)}
        self.scale = nn.Parameter(torch.empty(scale_shape[scale_sharing], **factory), requires_grad=learn_scale)
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self._radius_readback = HostReadback()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Published initialisation (see the class docstring)."""
        with torch.no_grad():
            nn.init.normal_(self.alpha, 0.0, ALPHA_INIT_STD)
            if self.learn_scale:
                nn.init.normal_(self.scale, self.init_scale, SCALE_INIT_STD)
            else:
                self.scale.fill_(self.init_scale)
            if self.bias is not None:
                self.bias.zero_()

    @property
    def sigma(self) -> torch.Tensor:
        """σ = 2^scale (detached), shaped like ``scale``."""
        return 2.0 ** self.scale.detach()

    @property
    def radius(self) -> int:
        """Current tap radius r (K = 2r + 1); reads σ back to the host."""
        if self.fixed_kernel_size is not None:
            return self.fixed_kernel_size // 2
        return truncation_radius(self.scale, self.truncate)

    @property
    def kernel_size(self) -> tuple[int, int]:
        """Current (K, K), as ``nn.Conv2d.kernel_size``."""
        k = 2 * self.radius + 1
        return (k, k)

    def taps(self) -> torch.Tensor:
        """The 1-D taps ``[*scale.shape, order+1, K]`` for the current σ (differentiable in
        ``scale``); σ is read back only after it changed (see the class docstring)."""
        return self.taps_at(self.scale, self._current_radius())

    def _current_radius(self) -> int:
        # With padding other than "same", K sets the output size: the radius must be σ's own.
        exact = self.padding != "same" and self.fixed_kernel_size is None
        if exact and self.scale.device.type != "cpu":
            # Read every call (under torch.compile: a graph break, see the class docstring).
            return checked_radius(self.scale, self.truncate, self.fixed_kernel_size)
        radius = self._radius_readback.get(
            (self.scale,), checked_radius, truncate=self.truncate, kernel_size=self.fixed_kernel_size
        )
        if exact and torch.compiler.is_compiling():
            # The graph holds the radius it was traced with; a σ that shrank would change eager's K too.
            torch._assert_async(_radius_tensor(self.scale, self.truncate) == radius, OUTGROWN_RADIUS_ERROR)
        return radius

    def taps_at(self, scale: torch.Tensor, radius: int) -> torch.Tensor:
        """This layer's taps (its order and truncation) for any ``scale``, laid out at ``radius``:
        ``[*scale.shape, order+1, 2·radius+1]``. σ(t) layers pass a radius bound valid at every t."""
        truncate = self.truncate if self.fixed_kernel_size is None else None
        return srf_taps(scale, self.order, radius, truncate)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.convolve(input, self.taps())

    def _restrict(
        self, in_channels: slice, scale: torch.Tensor, alpha: torch.Tensor, taps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """scale, alpha and taps of the input channels ``in_channels`` only."""
        if in_channels == slice(None):
            return scale, alpha, taps
        if self.groups != 1:
            raise ValueError(f"in_channels needs groups=1, this layer has groups={self.groups}")
        if self.scale_sharing == "pair":
            scale, taps = scale[:, in_channels], taps[:, in_channels]
        return scale, alpha[:, in_channels], taps

    def convolve(
        self,
        input: torch.Tensor,
        taps: torch.Tensor,
        *,
        scale: torch.Tensor | None = None,
        alpha: torch.Tensor | None = None,
        in_channels: slice = slice(None),
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This layer's convolution (order, truncation, stride, padding, kernel size, bias,
        backend) with given taps and, optionally, other weights or part of the input channels.

        ``forward(x)`` is ``convolve(x, self.taps())``. Layers whose weights are
        functions of time (σ(t), α(t)) pass theirs; an ODE block convolves the
        state without its time channel (``in_channels=slice(1, None)``).

        Args:
            input: ``[B, n, H, W]``, the ``n`` input channels selected by ``in_channels``.
            taps: from :meth:`taps` or :meth:`taps_at` for ``scale``, all input channels.
            scale: log2 σ shaped like the layer's ``scale``; default the layer's.
            alpha: ``[F, C_in, C_out]``; default the layer's.
            in_channels: the layer's input channels ``input`` holds (groups = 1 only).
            shift: optional ``[C_out, Ho, Wo]`` added to every image's output (an
                ODE block's time map; see :func:`~dcn_fast.functional.srf_conv2d`).

        Returns:
            ``[B, C_out, Ho, Wo]``.
        """
        return self.plan(input, taps, scale=scale, alpha=alpha, in_channels=in_channels)(input, shift)

    def plan(
        self,
        input: torch.Tensor,
        taps: torch.Tensor,
        *,
        scale: torch.Tensor | None = None,
        alpha: torch.Tensor | None = None,
        in_channels: slice = slice(None),
    ) -> SRFCall:
        """:meth:`convolve`'s call checked once, to run again on inputs like ``input`` while these
        weights last (an ODE solve's evaluations): ``plan(x, taps, ...)(x, shift)`` equals
        ``convolve(x, taps, ..., shift=shift)``. See :func:`~dcn_fast.functional.plan_srf_conv2d`."""
        scale, alpha, taps = self._restrict(
            in_channels, self.scale if scale is None else scale, self.alpha if alpha is None else alpha, taps
        )
        return plan_srf_conv2d(input, scale, alpha, taps=taps, order=self.order, truncate=self.truncate,
                               stride=self.stride, padding=self.padding, groups=self.groups, bias=self.bias,
                               kernel_size=self.fixed_kernel_size, backend=self.backend)

    def filters(
        self, taps: torch.Tensor | None = None, *, alpha: torch.Tensor | None = None, in_channels: slice = slice(None)
    ) -> torch.Tensor:
        """The dense filters ``[C_out, n, K, K]`` (differentiable) of the ``n`` input channels
        ``in_channels`` (default all: n = C_in/groups); arguments as in :meth:`convolve`."""
        taps = self.taps() if taps is None else taps
        _, alpha, taps = self._restrict(in_channels, self.scale, self.alpha if alpha is None else alpha, taps)
        if self.scale_sharing == "layer":
            taps = taps.reshape(taps.shape[-2:])
        else:
            taps = taps.reshape(self.out_channels, -1, *taps.shape[-2:])
        return dense_filters(taps.to(alpha.dtype), alpha, self.order)

    def to_conv2d(self) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d`` with the current filters, frozen (for export)."""
        weight = self.filters().detach()
        k = weight.shape[-1]
        padding = resolve_padding(self.padding, k // 2)
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            k,
            stride=self.stride,
            padding=padding,
            groups=self.groups,
            bias=self.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.requires_grad_(False)
        return conv

    @classmethod
    def from_conv2d(
        cls,
        conv: nn.Conv2d,
        *,
        order: int = 2,
        scale_sharing: str = "layer",
        fit: bool = True,
        kernel_size: int | str | None = FIXED_FROM_WEIGHT,
        truncate: float = 2.0,
        learn_scale: bool = True,
        init_scale: float = 0.0,
        backend: str = "auto",
        **fit_options,
    ) -> "SRFConv2d":
        """An ``SRFConv2d`` in place of ``conv``: its channels, groups, stride, bias and output
        shape, and with ``fit=True`` its filters fitted to ``conv.weight`` (:func:`dcn_fast.fit_srf`).

        The conv's K×K kernel is fixed while σ is learned, so the SRF's support is
        chosen by ``kernel_size``:

        - ``"conv"`` (default): the conv's own K, taps over all of it (normalised
          there, as the published σ^ji layer), padding the conv's: the SRF filter
          lives on exactly the conv's support and the outputs have its shape.
        - an odd int K': a fixed K'×K' support, padding ``p + (K' - K)/2`` per
          side (must stay ≥ 0), the same output shape.
        - ``None``: the σ-dependent size ``2·ceil(truncate·σ + 0.5) + 1`` with
          ``padding="same"``; it keeps the output shape at every σ only when the
          conv pads by K//2 (as most do), which is required.

        Args:
            conv: an ``nn.Conv2d`` (not transposed, dilation 1, ``padding_mode="zeros"``,
                square odd kernel).
            order, scale_sharing, learn_scale, backend: as in :class:`SRFConv2d`.
            fit: fit σ and α to the conv's weights; ``False``: the published random
                initialisation (``init_scale``).
            kernel_size, truncate: the SRF's support (above).
            fit_options: ``scale_range``, ``grid_step``, ``starts``, ``tol`` of
                :func:`dcn_fast.fit_srf`.

        Returns:
            The layer, on the conv's device and dtype, in its training mode; with
            ``fit=True`` its :attr:`fit_error` holds the relative L2 error of its
            filters per output channel (on the larger of the two supports). The
            conv's bias is copied; if its weight is frozen, so are α and σ.

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d`` (e.g. ``Conv3d``, ``ConvTranspose2d``).
            UnsupportedConvError: a conv SRFConv2d cannot express (a ``ValueError`` naming the
                attribute and the allowed values).
            ValueError: bad options.

        Example:
            >>> conv = nn.Conv2d(3, 16, 3, padding=1)
            >>> srf = SRFConv2d.from_conv2d(conv, order=2)
            >>> srf(torch.randn(1, 3, 8, 8)).shape, srf.fit_error.shape
            (torch.Size([1, 16, 8, 8]), torch.Size([16]))
        """
        if not isinstance(fit, bool):
            raise TypeError(f"fit must be True or False, got {fit!r}")
        if fit_options and not fit:
            raise ValueError(f"fit options {sorted(fit_options)} need fit=True")
        k, conv_padding = conv2d_geometry(conv)
        padding: Padding
        if kernel_size == FIXED_FROM_WEIGHT:
            fixed, padding = k, conv_padding
        elif kernel_size is None:
            if conv_padding != (k // 2, k // 2):
                raise UnsupportedConvError(
                    f"kernel_size=None (σ-dependent size, padding 'same') keeps the conv's output shape only when "
                    f"it pads by K//2 = {k // 2}; this conv pads by {conv_padding}: use kernel_size={FIXED_FROM_WEIGHT!r}"
                )
            fixed, padding = None, "same"
        else:
            if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % 2 == 0:
                raise ValueError(
                    f"kernel_size must be {FIXED_FROM_WEIGHT!r}, None or an odd int >= 1, got {kernel_size!r}"
                )
            shift = (kernel_size - k) // 2
            fixed, padding = kernel_size, (conv_padding[0] + shift, conv_padding[1] + shift)
            if min(padding) < 0:
                raise UnsupportedConvError(
                    f"kernel_size={kernel_size} with the conv's {k}x{k} kernel and padding {conv_padding} needs "
                    f"padding {padding} (< 0) for the same output shape; the smallest fixed size is "
                    f"{k - 2 * min(conv_padding)}"
                )
        weight = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            order=order,
            init_scale=init_scale,
            learn_scale=learn_scale,
            truncate=truncate,
            stride=conv.stride,
            padding=padding,
            groups=conv.groups,
            bias=conv.bias is not None,
            scale_sharing=scale_sharing,
            kernel_size=fixed,
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            if fit:
                result = fit_srf(
                    weight, order=order, scale_sharing=scale_sharing, kernel_size=fixed, truncate=truncate, **fit_options
                )
                layer.scale.copy_(result.scale)
                layer.alpha.copy_(result.alpha)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        if fit:
            with torch.no_grad():
                layer.fit_error = filter_error(layer.filters(), weight)
        if not weight.requires_grad:
            layer.alpha.requires_grad_(False)
            layer.scale.requires_grad_(False)
        if conv.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        return layer.train(conv.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The published layers name their parameters alphas / scales.
        if prefix + "alphas" in state_dict and prefix + "alpha" not in state_dict:
            state_dict[prefix + "alpha"] = state_dict.pop(prefix + "alphas")
        if prefix + "scales" in state_dict and prefix + "scale" not in state_dict:
            state_dict[prefix + "scale"] = scale_from_published(state_dict.pop(prefix + "scales"), self.scale_sharing)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        parts = [
            f"{self.in_channels}, {self.out_channels}",
            f"order={self.order}",
            f"scale_sharing={self.scale_sharing!r}",
            f"learn_scale={self.learn_scale}",
        ]
        if self.scale.numel() == 1:
            parts.append(f"sigma={float(self.sigma):.4g}")
        parts.append(f"kernel_size={self.kernel_size}")
        if self.stride != (1, 1):
            parts.append(f"stride={self.stride}")
        parts.append(f"padding={self.padding!r}")
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        if self.bias is None:
            parts.append("bias=False")
        parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def scale_from_published(scales: torch.Tensor, scale_sharing: str) -> torch.Tensor:
    """``scale`` of an :class:`SRFConv2d` from the published layer's ``scales``.

    The published σ^ji layer (``Srf_layer_ind``) stores ``[C_in, C_out]``
    (its filters read σ in that order), SRFConv2d ``[C_out, C_in]``: transposed.
    One σ per layer (``Srf_layer_shared``, ``[1]``) is the same in both.
    """
    if scale_sharing == "pair":
        if scales.dim() != 2:
            raise ValueError(f"published σ^ji scales must be 2-D [C_in, C_out], got shape {tuple(scales.shape)}")
        return scales.t().contiguous()
    return scales


def conv2d_geometry(conv: nn.Module) -> tuple[int, tuple[int, int]]:
    """``(K, (pad_rows, pad_cols))`` of a convolution :meth:`SRFConv2d.from_conv2d` can replace.

    Raises:
        TypeError: ``conv`` is not an ``nn.Conv2d``.
        UnsupportedConvError (a ValueError): what SRFConv2d cannot express: dilation > 1, a padding mode
            other than zeros, a non-square or even kernel, an uninitialised lazy conv.
    """
    if not isinstance(conv, nn.Conv2d):
        kind = type(conv).__name__
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            why = "transposed convolutions have no SRF form"
        elif isinstance(conv, nn.modules.conv._ConvNd):
            why = "SRFConv2d replaces 2-D convolutions only"
        else:
            why = "not a convolution"
        raise TypeError(f"conv must be an nn.Conv2d, got {kind} ({why})")
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise UnsupportedConvError("conv is an uninitialised lazy conv: run one forward pass first")
    if tuple(conv.dilation) != (1, 1):
        raise UnsupportedConvError(f"conv.dilation must be 1 (SRFConv2d has no dilation), got {tuple(conv.dilation)}")
    if conv.padding_mode != "zeros":
        raise UnsupportedConvError(f"conv.padding_mode must be 'zeros' (SRFConv2d zero-pads), got {conv.padding_mode!r}")
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        raise UnsupportedConvError(
            f"conv.kernel_size must be square and odd (the SRF basis is centred, taps -r..r), got {(kh, kw)}"
        )
    if conv.padding == "same":
        return kh, (kh // 2, kh // 2)
    if conv.padding == "valid":
        return kh, (0, 0)
    return kh, tuple(conv.padding)
