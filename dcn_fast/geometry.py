"""Padding and output size of an SRF convolution, shared by every backend."""

from __future__ import annotations

__all__ = ["resolve_padding", "output_size"]


def resolve_padding(padding: str | tuple[int, int], radius: int) -> tuple[int, int]:
    """Zero padding per side (rows, columns) for ``padding`` and a kernel of radius ``radius``.

    ``"same"`` pads by the radius (the published choice: the output keeps the
    input size at stride 1), ``"valid"`` not at all; a pair passes through.
    """
    if padding == "same":
        return (radius, radius)
    if padding == "valid":
        return (0, 0)
    return tuple(padding)


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a convolution along one axis (as ``nn.Conv2d``)."""
    return (size + 2 * pad - kernel) // stride + 1
