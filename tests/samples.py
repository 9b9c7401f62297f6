"""One set of sample calls of ``srf_conv2d`` shared by every backend's tests (CPU and GPU)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dcn_fast.basis import num_basis


@dataclass
class Sample:
    """One call: ``srf_conv2d(input, scale, alpha, bias=bias, shift=shift, **kwargs)``; ``sharing`` is how σ is shared."""

    name: str
    input: torch.Tensor
    scale: torch.Tensor
    alpha: torch.Tensor
    bias: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)
    sharing: str = "layer"
    shift: torch.Tensor | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        """input, scale, alpha, then the bias and the shift where given."""
        return [t for t in (self.input, self.scale, self.alpha, self.bias, self.shift) if t is not None]

    def optional(self, tensors) -> dict:
        """``bias=`` / ``shift=`` keywords from the tensors past the first three (as :attr:`tensors` lists them)."""
        names = [n for n in ("bias", "shift") if getattr(self, n) is not None]
        return dict(zip(names, tensors[3:]))


# name, (batch, c_in, c_out, height, width), order, scale (one per layer unless a shape is given),
# stride, padding, groups, bias, kernel_size, non-contiguous input
_SPECS = [
    ("sigma1-odd", (2, 3, 4, 9, 11), 2, 0.0, 1, "same", 1, False, None, False),
    ("batch1-stride2-groups-bias", (1, 4, 6, 13, 12), 3, 0.6, 2, "valid", 2, True, None, False),
    ("order0-small-sigma-int-pad", (2, 2, 3, 7, 7), 0, -1.74, 1, 1, 1, False, None, False),
    ("order4-depthwise-mixed-stride", (2, 4, 4, 8, 9), 4, 0.7, (2, 1), "same", 4, True, None, False),
    ("kernel-larger-than-map", (1, 3, 2, 5, 6), 1, 2.585, 2, "same", 1, False, None, False),
    ("padding-pair", (3, 5, 7, 10, 10), 2, 1.0, 2, (1, 2), 1, True, None, False),
    ("non-contiguous", (2, 4, 5, 9, 11), 2, 0.3, 1, "same", 1, True, None, True),
    ("batch0", (0, 3, 4, 8, 8), 2, 0.0, 1, "same", 1, True, None, False),
    ("fixed-kernel", (2, 3, 4, 9, 9), 2, -0.4, 1, "same", 1, False, 5, False),
    ("per-channel", (2, 4, 6, 9, 8), 2, (6,), 2, "same", 2, True, None, False),
    ("per-channel-order3", (1, 3, 5, 12, 13), 3, (5,), 1, 1, 1, False, None, True),
    ("per-pair", (2, 4, 6, 9, 8), 2, (6, 2), 2, "same", 2, True, 7, False),
    ("per-pair-order1", (1, 2, 3, 8, 8), 1, (3, 2), (1, 2), 1, 1, False, 5, False),
]

SAMPLE_NAMES = [spec[0] for spec in _SPECS]

#: Samples that also add a shift [C_out, Ho, Wo] (an ODE block's time map) to the output.
SHIFTED = ("sigma1-odd", "batch1-stride2-groups-bias", "non-contiguous", "batch0", "per-pair")


def sample_inputs(device="cpu", dtype=torch.float64, requires_grad=False, names=None) -> list[Sample]:
    """Sample calls on ``device``: orders 0-4, strides, padding modes, groups, σ per layer / channel / pair,
    batch 0, a non-contiguous input, a fixed kernel size; bias and alpha included as inputs."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for name, (batch, c_in, c_out, h, w), order, scale, stride, padding, groups, bias, k, strided in _SPECS:
        if names is not None and name not in names:
            continue
        if strided:  # channels-last storage: [B, H, W, C] permuted to [B, C, H, W]
            x = torch.randn(batch, h, w, c_in, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2)
        else:
            x = torch.randn(batch, c_in, h, w, generator=gen, dtype=torch.float64)
        if isinstance(scale, tuple):
            s = torch.linspace(-1.4, 1.1, math.prod(scale), dtype=torch.float64).reshape(scale)
            sharing = "channel" if len(scale) == 1 else "pair"
        else:
            s, sharing = torch.tensor([scale], dtype=torch.float64), "layer"
        a = torch.randn(num_basis(order), c_in // groups, c_out, generator=gen, dtype=torch.float64)
        b = torch.randn(c_out, generator=gen, dtype=torch.float64) if bias else None
        x, s, a, b = [None if t is None else t.to(device=device, dtype=dtype) for t in (x, s, a, b)]
        if requires_grad:
            for t in (x, s, a, b):
                if t is not None:
                    t.requires_grad_()
        kwargs = dict(order=order, stride=stride, padding=padding, groups=groups, kernel_size=k)
        shift = None
        if name in SHIFTED:  # its own generator: the other samples' draws stay as they were
            from dcn_fast.functional import srf_conv2d

            shape = srf_conv2d(x.detach(), s.detach(), a.detach(), backend="reference", **kwargs).shape[1:]
            shift = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            shift = shift.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        out.append(Sample(name, x, s, a, b, kwargs, sharing, shift))
    return out


def serves(backend: str, sample: Sample) -> bool:
    """Whether ``backend`` takes ``sample`` (the one-σ-per-layer algorithms do not take per-channel σ)."""
    return sample.sharing == "layer" or backend in ("dense", "reference", "auto")
