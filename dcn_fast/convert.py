"""Official Deep Continuous Networks checkpoints → dcn_fast state dicts.

The official scripts (github.com/ntomen/Deep-Continuous-Networks,
``experiments/cifar10_*.py``, ``meta_param_*.py``) save
``{"state_dict": model.state_dict(), "args": argparse.Namespace}`` of an
``nn.Sequential``::

    0 stem · 1 stage · 2 GN · 3 act · 4 conv · 5 stage · 6 GN · 7 act · 8 conv · 9 stage ·
    10 GN · 11 act · 12 pool · 13 flatten · 14 linear

A stage is an ``ODEBlock`` (``odefunc.{norm1,conv1,norm2,conv2,norm3}``, each
conv a ``ConcatConv2d`` holding ``_layer``) or one ``ResBlock``
(``{norm1,conv1,norm2,conv2}``). SRF layers store ``alphas`` and ``scales``;
the σ^ji layer's ``scales`` are ``[C_in, C_out]`` (ours ``[C_out, C_in]``); the
meta layers store ``scales`` (t coefficient), ``scale_bias`` (intercept),
``scales_square`` (σ(t²)'s t² coefficient), and for α(t) ``alphas`` (t
coefficient) and ``alphas_bias`` (intercept).

    python -m dcn_fast.convert OFFICIAL.pt OUT.pt --model dcn-ode

writes a dcn_fast checkpoint holding those weights (no optimizer state, epoch
0; the official ODE-Net's T = 2 in its settings), which
:func:`dcn_fast.train.load_model`, ``dcn-fast eval`` and the experiments'
``--checkpoint`` read like the checkpoint of a run.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from .arguments import OneLineErrors
from .models import MODELS, build
from .modules import scale_from_published
from .runfiles import save_checkpoint
from .train import TrainConfig, weights_checkpoint

__all__ = ["convert_state_dict", "load_official", "main"]

#: Official ``nn.Sequential`` index → our module path.
_TOP_LEVEL = {
    "0": "stem",
    "1": "stage1",
    "2": "down1.0",
    "4": "down1.2",
    "5": "stage2",
    "6": "down2.0",
    "8": "down2.2",
    "9": "stage3",
    "10": "head.0",
    "14": "head.4",
}

#: Parameter names of the published SRF layers → ours (relative to the ``TimeConv`` for the meta laws).
_SRF_NAMES = {"alphas": "alpha", "scales": "scale"}
_META_NAMES = {
    "scales_square": "scale_t2",
    "scales": "scale_t",
    "scale_bias": "layer.scale",
    "alphas": "layer.alpha",
}
_ALPHA_T_NAMES = {**_META_NAMES, "alphas": "alpha_t", "alphas_bias": "layer.alpha"}


def _rename(key: str, name: str) -> str:
    """Our key for one official key of model ``name`` (unchanged when it has no official form)."""
    index, _, rest = key.partition(".")
    if index not in _TOP_LEVEL:
        return key
    prefix = _TOP_LEVEL[index]
    conv = MODELS[name].conv
    time_conv = re.fullmatch(r"odefunc\.(conv[12])\._layer\.(\w+)", rest)
    if time_conv:
        layer, param = time_conv.groups()
        if conv in ("sigma_t", "sigma_t2"):
            return f"{prefix}.func.{layer}.{_META_NAMES.get(param, param)}"
        if conv == "sigma_alpha_t":
            return f"{prefix}.func.{layer}.{_ALPHA_T_NAMES.get(param, param)}"
        return f"{prefix}.func.{layer}.layer.{_SRF_NAMES.get(param, param)}"
    rest = rest.replace("odefunc.", "func.", 1) if rest.startswith("odefunc.") else rest
    head, _, param = rest.rpartition(".")
    return ".".join(part for part in (prefix, head, _SRF_NAMES.get(param, param)) if part)


def convert_state_dict(official: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The state dict of ``build(name)`` holding the weights of an official model's state dict.

    Raises:
        ValueError: unknown ``name``, or keys or shapes that do not make model ``name``
            (naming the first missing, unexpected or mismatched ones).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    expected = build(name).state_dict()
    pair = MODELS[name].conv == "srf_pair"
    ours = {}
    for key, value in official.items():
        new = _rename(key, name)
        if pair and new.endswith(".layer.scale"):
            value = scale_from_published(value, "pair")
        ours[new] = value
    missing = [k for k in expected if k not in ours]
    unexpected = [k for k in ours if k not in expected]
    wrong = [
        f"{k} {tuple(ours[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in ours and ours[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if items
        )
        raise ValueError(f"not an official {name} checkpoint ({details})")
    return {k: ours[k].to(v.dtype) for k, v in expected.items()}


def load_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of an official checkpoint (``{"state_dict", "args"}``) or of a bare
    state dict, loaded weights-only (no code in the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or a pickle with code in it
        raise ValueError(f"{path} is not a readable weights-only checkpoint ({type(exc).__name__})") from exc
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict (expected {{'state_dict': ...}} or a dict of tensors)")
    return state


def main(argv: list[str] | None = None) -> int:
    """``python -m dcn_fast.convert OFFICIAL OUT --model NAME [--force]``; returns the exit status."""
    parser = OneLineErrors(
        prog="python -m dcn_fast.convert", description="Convert an official DCN checkpoint to dcn_fast weights."
    )
    parser.add_argument("official", help="checkpoint saved by the official scripts (model_*.pth)")
    parser.add_argument("out", help="where to write the dcn_fast checkpoint (weights of dcn_fast.models.build(MODEL))")
    parser.add_argument("--model", required=True, choices=list(MODELS), help="which model the checkpoint holds")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise ValueError(f"{out} exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            raise ValueError(f"{out.parent} is not a directory")
        state = convert_state_dict(load_official(args.official), args.model)
        # The official Table 1 ODE-Net script integrates to T = 2 (our default is the paper's 1).
        config = TrainConfig(model=args.model, T=2.0 if args.model == "odenet" else None)
        save_checkpoint(weights_checkpoint(state, config), out)  # atomic: never a half-written OUT
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {args.model}" + (" (T = 2, as the official script)" if config.T else "")
          + f", {sum(v.numel() for v in state.values()):,} values; load it with dcn_fast.train.load_model or "
          f"dcn-fast eval --checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
