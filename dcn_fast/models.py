"""The CIFAR-10 models of the paper (DESIGN.md §4, Table 1), by name.

Every model: stem conv 3→32, stage 32, downsample (GN, act, conv 4x4 stride 2
pad 1) to 64, stage 64, downsample to 128, stage 128, then GN, act, global
average pool, linear 128→num_classes. Stages are ODE blocks (ODE-Net, DCNs)
or one residual block (ResNets). ``build(name).num_parameters()`` gives the
paper's exact counts (:data:`PARAMETER_COUNTS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from .modules import SRFConv2d
from .ode import ODEBlock, ODEFunc, group_norm

__all__ = ["build", "MODELS", "PARAMETER_COUNTS", "ACTIVATIONS", "Classifier", "ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    stage: str  # "ode" or "res"
    conv: str  # TimeConv kind inside ODE blocks; "conv"/"srf" in residual blocks
    srf_everywhere: bool = False  # stem and downsampling too
    activation: str = "celu"  # one of ACTIVATIONS, everywhere in the model
    T: float = 2.0  # end time of every ODE block
    channel_groups: bool = False  # GroupNorm with C groups (DCN-full)


MODELS: dict[str, ModelSpec] = {
    # T = 1 as in the paper's text; the official Table 1 script integrates to 2 (build(..., T=2.0)).
    "odenet": ModelSpec("ode", "conv", activation="relu", T=1.0),
    "resnet-blocks": ModelSpec("res", "conv", activation="relu"),
    "resnet-srf-blocks": ModelSpec("res", "srf", activation="relu"),
    "resnet-srf-full": ModelSpec("res", "srf", srf_everywhere=True, activation="relu"),
    "dcn-ode": ModelSpec("ode", "srf"),
    "dcn-full": ModelSpec("ode", "srf", srf_everywhere=True, channel_groups=True),
    "dcn-sigma-ji": ModelSpec("ode", "srf_pair"),
    "dcn-sigma-t": ModelSpec("ode", "sigma_t"),
    "dcn-sigma-t2": ModelSpec("ode", "sigma_t2"),
    "dcn-sigma-alpha-t": ModelSpec("ode", "sigma_alpha_t"),
}

#: Exact parameter counts of Table 1 (DESIGN.md §4).
PARAMETER_COUNTS = {
    "odenet": 559_562,
    "resnet-blocks": 554_634,
    "resnet-srf-blocks": 425_616,
    "resnet-srf-full": 322_707,
    "dcn-ode": 428_752,
    "dcn-full": 325_843,
    "dcn-sigma-ji": 472_202,
    "dcn-sigma-t": 428_758,
    "dcn-sigma-t2": 428_764,
    "dcn-sigma-alpha-t": 689_494,
}

#: Activations a model can use (``build(..., activation=...)``).
ACTIVATIONS = {"relu": nn.ReLU, "celu": nn.CELU}


class ResBlock(nn.Module):
    """``h + conv2(act(GN(conv1(act(GN(h))))))``, 3x3 convs without bias (or SRF)."""

    def __init__(self, channels: int, conv: str, activation: type[nn.Module], backend: str) -> None:
        super().__init__()

        def make():
            if conv == "srf":
                return SRFConv2d(channels, channels, backend=backend)
            return nn.Conv2d(channels, channels, 3, padding=1, bias=False)

        self.norm1, self.conv1 = group_norm(channels), make()
        self.norm2, self.conv2 = group_norm(channels), make()
        self.act = activation()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act(self.norm1(h)))
        return h + self.conv2(self.act(self.norm2(out)))


class Classifier(nn.Module):
    """Stem, three stages with two downsamplings, and the classification head."""

    def __init__(self, name: str, spec: ModelSpec, num_classes: int, backend: str, solver: dict) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        act = ACTIVATIONS[spec.activation]
        groups = (lambda c: c) if spec.channel_groups else (lambda c: None)
        srf = spec.srf_everywhere
        # The SRF stem keeps the map size ("same"); the 3x3 stem drops the border (32 → 30).
        self.stem = SRFConv2d(3, 32, backend=backend) if srf else nn.Conv2d(3, 32, 3)

        def stage(c: int) -> nn.Module:
            if spec.stage == "res":
                return ResBlock(c, spec.conv, act, backend)
            func = ODEFunc(c, spec.conv, act, norm_groups=groups(c), backend=backend)
            return ODEBlock(func, T=spec.T, **solver)

        def downsample(c_in: int, c_out: int) -> nn.Module:
            conv = (
                SRFConv2d(c_in, c_out, stride=2, backend=backend)
                if srf
                else nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)
            )
            return nn.Sequential(group_norm(c_in, groups(c_in)), act(), conv)

        self.stage1, self.down1 = stage(32), downsample(32, 64)
        self.stage2, self.down2 = stage(64), downsample(64, 128)
        self.stage3 = stage(128)
        self.head = nn.Sequential(
            group_norm(128, groups(128)), act(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-3 feature maps ``[B, 128, H/4, W/4]`` (the reconstruction encoder)."""
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down1(x))
        return self.stage3(self.down2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from images ``[B, 3, H, W]``."""
        return self.head(self.features(x))

    def ode_blocks(self) -> list[ODEBlock]:
        return [m for m in self.modules() if isinstance(m, ODEBlock)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build(
    name: str,
    num_classes: int = 10,
    *,
    backend: str = "auto",
    method: str = "dopri5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    gradient: str = "adjoint",
    adjoint_options: dict | None = None,
    replay: str | None = None,
    solver: str | None = None,
    budget: int | None = None,
    T: float | None = None,
    activation: str | None = None,
) -> Classifier:
    """A model of Table 1 by name (see :data:`MODELS`), freshly initialised.

    Solver arguments apply to the ODE blocks (ignored by the ResNets);
    ``gradient`` is how each solve is differentiated (:data:`~dcn_fast.ode.GRADIENTS`)
    and ``replay`` the checkpointed replay's granularity, ``solver`` which solver
    integrates (``"dcn_fast"``, ``"torchdiffeq"``, or None: dcn_fast's where it
    covers the method) and ``budget`` its sync-free
    step budget (see :class:`~dcn_fast.ode.ODEBlock`).

    ``T`` (end time of every ODE block, ODE models only) and ``activation``
    (``"relu"`` or ``"celu"``, everywhere in the model) override the model's
    defaults, e.g. Table A.1's controls ``build("odenet", T=2.0, activation="celu")``.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    spec = MODELS[name]
    if T is not None:
        if spec.stage != "ode":
            raise ValueError(f"T applies to ODE blocks; {name} has none (it is a ResNet)")
        if isinstance(T, bool) or not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ValueError(f"T must be a finite number > 0, got {T!r}")
        spec = replace(spec, T=float(T))
    if activation is not None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        spec = replace(spec, activation=activation)
    blocks = dict(method=method, rtol=rtol, atol=atol, gradient=gradient, adjoint_options=adjoint_options,
                  replay=replay, solver=solver, budget=budget)
    return Classifier(name, spec, num_classes, backend, blocks)
