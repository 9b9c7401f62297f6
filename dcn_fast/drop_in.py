"""A user's model with structured convolutions, and back: :func:`convert_model`, :func:`export_model`.

``convert_model`` follows ``nn.SyncBatchNorm.convert_sync_batchnorm``: it
walks a model, replaces the chosen ``nn.Conv2d`` modules by
:class:`~dcn_fast.SRFConv2d` layers fitted to their weights
(:meth:`SRFConv2d.from_conv2d`) and keeps everything else. ``export_model``
replaces every ``SRFConv2d`` by its frozen ``nn.Conv2d``
(:meth:`SRFConv2d.to_conv2d`), so the model runs without dcn_fast and exports
with ``torch.onnx.export`` / ``torch.export``.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

from .modules import SRFConv2d, UnsupportedConvError, conv2d_geometry

__all__ = ["Conversion", "convert_model", "export_model", "format_report"]

logger = logging.getLogger(__name__)

#: ``include`` / ``exclude``: a glob over qualified module names (``"layer1.*"``;
#: a pattern that matches an enclosing module, e.g. ``"layer1"``, selects the
#: convolutions inside it), a sequence of them, or ``(name, module) -> bool``.
Selector = Union[str, Iterable[str], Callable[[str, nn.Module], bool], None]


@dataclass(frozen=True)
class Conversion:
    """One convolution :func:`convert_model` looked at: replaced, or skipped and why.

    Attributes:
        name: qualified module name (``""`` for the model itself).
        kind: the module's class name.
        in_channels, out_channels, kernel_size, stride, groups: the conv's.
        replaced: whether an SRFConv2d took its place.
        reason: why not, when skipped.
        fit_error: ``[C_out]`` relative L2 error of the fitted filters (``fit=True``), else ``None``.
        parameters: parameter count before and after (after = before when skipped).
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    replaced: bool
    reason: str | None = None
    fit_error: torch.Tensor | None = None
    parameters: tuple[int, int] = (0, 0)

    @property
    def max_error(self) -> float | None:
        """Largest relative fit error over the output channels (``None`` unless fitted)."""
        return None if self.fit_error is None else float(self.fit_error.max())

    @property
    def mean_error(self) -> float | None:
        """Mean relative fit error over the output channels (``None`` unless fitted)."""
        return None if self.fit_error is None else float(self.fit_error.mean())

    def __str__(self) -> str:
        shape = f"{self.in_channels}->{self.out_channels} {'x'.join(map(str, self.kernel_size))}"
        if self.stride and max(self.stride) > 1:
            shape += f" /{'x'.join(map(str, self.stride))}"
        if not self.replaced:
            return f"{self.name or '<model>'}: {self.kind} {shape} kept ({self.reason})"
        fit = "" if self.fit_error is None else f", fit error mean {self.mean_error:.3f} max {self.max_error:.3f}"
        return f"{self.name or '<model>'}: {shape} -> SRFConv2d, {self.parameters[0]} -> {self.parameters[1]} parameters{fit}"


def format_report(rows: Iterable[Conversion]) -> str:
    """The rows of a :func:`convert_model` report, one line each, and a total."""
    rows = list(rows)
    replaced = [r for r in rows if r.replaced]
    before, after = sum(r.parameters[0] for r in replaced), sum(r.parameters[1] for r in replaced)
    total = f"{len(replaced)} of {len(rows)} convolutions replaced: their parameters {before} -> {after}"
    return "\n".join([*map(str, rows), total])


def _selector(value: Selector, name: str) -> tuple[list[str], Callable[[str, nn.Module], bool] | None]:
    """(patterns, predicate) of an ``include`` / ``exclude`` argument."""
    if value is None:
        return [], None
    if callable(value):
        return [], value
    patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be None, a glob pattern, a sequence of them or a callable, got {value!r}")
    return patterns, None


def _matches(pattern: str, name: str) -> bool:
    """Whether ``pattern`` matches module ``name`` or one of the modules enclosing it."""
    parts = name.split(".") if name else [""]
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _check_patterns(patterns: list[str], argument: str, convs: list[tuple[str, nn.Module]]) -> None:
    """Every pattern must match at least one ``nn.Conv2d`` (a typo would otherwise do nothing)."""
    for pattern in patterns:
        hits = [(n, m) for n, m in convs if _matches(pattern, n)]
        if any(isinstance(m, nn.Conv2d) for _, m in hits):
            continue
        names = [n or "<model>" for n, m in convs if isinstance(m, nn.Conv2d)]
        listed = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        other = f"; it matched only {', '.join(f'{n} ({type(m).__name__})' for n, m in hits)}" if hits else ""
        raise ValueError(
            f"{argument} pattern {pattern!r} matched no nn.Conv2d module{other}; "
            f"the model's nn.Conv2d modules: {listed or 'none'}"
        )


def _selected(name: str, module: nn.Module, patterns: list[str], predicate) -> bool:
    if predicate is not None:
        return bool(predicate(name, module))
    return any(_matches(p, name) for p in patterns)


def _num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Swap modules by identity everywhere they are held (shared modules stay shared)."""
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
    return replacements.get(id(model), model)


def convert_model(
    model: nn.Module,
    *,
    include: Selector = None,
    exclude: Selector = None,
    min_kernel_size: int = 3,
    fit: bool = True,
    inplace: bool = True,
    strict: bool = False,
    report: list[Conversion] | None = None,
    **srf_options,
) -> nn.Module:
    """Replace the ``nn.Conv2d`` modules of ``model`` by :class:`~dcn_fast.SRFConv2d` layers.

    Each replacement keeps the conv's channels, groups, stride, bias and output
    shape and, with ``fit=True``, is fitted to its weights
    (:meth:`SRFConv2d.from_conv2d`); everything else in the model is kept. The
    result trains, saves and loads (``state_dict``, ``torch.save``) like any
    model; :func:`export_model` turns it back into plain convolutions.

    Skipped, with the reason in ``report`` (or an error with ``strict=True``):
    kernels smaller than ``min_kernel_size`` (1×1 by default: an SRF of a 1×1
    support is one number), dilated convs, padding modes other than zeros,
    non-square or even kernels, subclasses of ``nn.Conv2d`` (their forward may
    differ), and other convolutions (``Conv1d``, ``Conv3d``, ``ConvTranspose2d``).
    Forward hooks registered on a replaced conv do not carry over.

    Args:
        model: the model (an ``nn.Conv2d`` itself is replaced and returned).
        include: which convolutions to consider: a glob over qualified module
            names (``"layer1.*"``; ``"layer1"`` also selects what is inside it),
            a sequence of globs, or ``(name, module) -> bool``; default all. A
            glob matching no ``nn.Conv2d`` is an error (so is one in ``exclude``).
        exclude: convolutions to keep as they are; same forms.
        min_kernel_size: convolutions with a smaller kernel are kept (int >= 1).
        fit: fit σ and α to each conv's weights (else the published random init).
        inplace: modify ``model`` (``True``) or a deep copy.
        strict: raise instead of skipping a selected conv that cannot be
            converted (those below ``min_kernel_size`` are still skipped).
        report: a list that receives one :class:`Conversion` per convolution
            considered (see :func:`format_report`); the same lines are logged
            at INFO level by ``dcn_fast.drop_in``.
        srf_options: for :meth:`SRFConv2d.from_conv2d` (``order``,
            ``scale_sharing``, ``kernel_size``, ``learn_scale``, ``backend``,
            ``scale_range``, ...).

    Returns:
        The converted model (``model`` itself when ``inplace``). Nothing is
        changed when an error is raised.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
        >>> rows = []
        >>> net = convert_model(net, order=2, report=rows)
        >>> [type(m).__name__ for m in net]
        ['SRFConv2d', 'ReLU', 'Conv2d']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(min_kernel_size, int) or isinstance(min_kernel_size, bool) or min_kernel_size < 1:
        raise ValueError(f"min_kernel_size must be an int >= 1, got {min_kernel_size!r}")
    if report is not None and not isinstance(report, list):
        raise TypeError(f"report must be None or a list, got {type(report).__name__}")
    include_patterns, include_fn = _selector(include, "include")
    exclude_patterns, exclude_fn = _selector(exclude, "exclude")

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    _check_patterns(include_patterns, "include", convs)
    _check_patterns(exclude_patterns, "exclude", convs)
    if inplace:
        target = model
    else:
        target = copy.deepcopy(model)
        convs = [(n, m) for n, m in target.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]

    rows: list[Conversion] = []
    replacements: dict[int, nn.Module] = {}
    failures: list[str] = []
    for name, conv in convs:
        if (include is not None and not _selected(name, conv, include_patterns, include_fn)) or (
            exclude is not None and _selected(name, conv, exclude_patterns, exclude_fn)
        ):
            continue
        info = dict(
            name=name,
            kind=type(conv).__name__,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            kernel_size=tuple(conv.kernel_size),
            stride=tuple(conv.stride),
            groups=conv.groups,
        )
        before = _num_parameters(conv)
        reason, layer = None, None
        if isinstance(conv, nn.Conv2d) and max(conv.kernel_size) < min_kernel_size:
            rows.append(Conversion(**info, replaced=False, parameters=(before, before),
                                   reason=f"kernel {'x'.join(map(str, conv.kernel_size))} < min_kernel_size={min_kernel_size}"))
            continue
        try:
            conv2d_geometry(conv)
            if type(conv) is not nn.Conv2d:
                raise UnsupportedConvError(
                    f"{type(conv).__name__} is a subclass of nn.Conv2d: its forward may differ from a plain convolution"
                )
            layer = SRFConv2d.from_conv2d(conv, fit=fit, **srf_options)
        except (TypeError, UnsupportedConvError) as exc:
            if isinstance(exc, TypeError) and isinstance(conv, nn.Conv2d):
                raise  # a bad option, not a property of this conv
            reason = str(exc)
            failures.append(f"{name or '<model>'}: {reason}")
        if layer is None:
            rows.append(Conversion(**info, replaced=False, reason=reason, parameters=(before, before)))
            continue
        replacements[id(conv)] = layer
        rows.append(Conversion(**info, replaced=True, fit_error=layer.fit_error,
                               parameters=(before, _num_parameters(layer))))
    if strict and failures:
        raise ValueError("convert_model(strict=True): cannot convert " + "; ".join(failures))

    for row in rows:
        logger.info("%s", row)
    if report is not None:
        report.extend(rows)
    return _replace(target, replacements)


def export_model(model: nn.Module, *, inplace: bool = True, strict: bool = True) -> nn.Module:
    """Replace every :class:`~dcn_fast.SRFConv2d` of ``model`` by its equivalent frozen ``nn.Conv2d``.

    The filters are those of the current σ and α (:meth:`SRFConv2d.to_conv2d`),
    so the model computes the same outputs, runs without dcn_fast (its pickle
    references no dcn_fast class when nothing else in it is one) and exports
    with ``torch.onnx.export`` / ``torch.export.export``.

    Args:
        model: the model (an ``SRFConv2d`` itself is replaced and returned).
        inplace: modify ``model`` (``True``) or a deep copy.
        strict: raise if an ``SRFConv2d`` cannot be replaced: the layers of
            dcn_fast's ODE blocks (``TimeConv``), which call them with their own
            weights and time channel rather than through ``forward``. ``False``
            leaves those in place.

    Returns:
        The exported model (``model`` itself when ``inplace``; unchanged on error).

    Example:
        >>> net = nn.Sequential(SRFConv2d(3, 8), nn.ReLU())
        >>> type(export_model(net)[0]).__name__
        'Conv2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # Imported here: ode pulls in torchdiffeq and the solvers (~0.3 s), which
    # `import dcn_fast` need not pay for.
    from .ode import TimeConv

    target = model if inplace else copy.deepcopy(model)
    driven = {
        id(child): f"{parent_name}.{child_name}".lstrip(".")
        for parent_name, parent in target.named_modules()
        if isinstance(parent, TimeConv)
        for child_name, child in parent.named_children()
        if isinstance(child, SRFConv2d)
    }
    if strict and driven:
        raise ValueError(
            "export_model: these SRFConv2d layers are driven by an ODE block's TimeConv (its own weights and "
            f"time channel), not by their forward, and cannot become nn.Conv2d: {', '.join(driven.values())}; "
            "pass strict=False to leave them in place"
        )
    replacements = {}
    for _, module in target.named_modules():
        if isinstance(module, SRFConv2d) and id(module) not in driven:
            replacements[id(module)] = module.to_conv2d().train(module.training)
    return _replace(target, replacements)
