"""The published DCN-ODE layer stack, re-implemented faithfully for side-by-side timing.

Published ``Srf_layer_shared``: every call rebuilds the dense filter from ~30
small tensor ops after reading the radius back to the host, then runs one
dense ``F.conv2d`` (here: ``backend="reference"``, which is that construction).
Published ``ConcatConv2d``: concatenates a constant t channel to the input.
Same architecture, initialisation and parameter count as ``build("dcn-ode")``.
"""

from __future__ import annotations

import torch
from torch import nn

from dcn_fast import SRFConv2d
from dcn_fast.models import build
from dcn_fast.ode import ODEFunc


class ConcatSRF(nn.Module):
    """``Srf_layer_shared`` over ``cat[t·1, x]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layer = SRFConv2d(channels + 1, channels, backend="reference")

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(x[:, :1]) * t
        return self.layer(torch.cat([tt, x], 1))


def published_dcn_ode(**solver) -> nn.Module:
    torch.manual_seed(0)
    model = build("dcn-ode", **solver)
    for func in [m for m in model.modules() if isinstance(m, ODEFunc)]:
        for name in ("conv1", "conv2"):
            ours = getattr(func, name)
            published = ConcatSRF(ours.layer.out_channels)
            published.layer.load_state_dict(ours.layer.state_dict())
            setattr(func, name, published)
    return model
