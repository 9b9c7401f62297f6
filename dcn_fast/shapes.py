"""Layer shapes benchmarked and tested: the convolutions inside the DCN ODE blocks.

Each ODE block convolves [h, t] (C + 1 channels, the time channel included) to
C channels at the stage's resolution (DESIGN.md §4, §5).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerShape", "DCN_BLOCK_LAYERS", "BENCH_SIGMAS"]


@dataclass(frozen=True)
class LayerShape:
    in_channels: int
    out_channels: int
    size: int  # square map, height = width

    @property
    def name(self) -> str:
        return f"{self.in_channels}to{self.out_channels}@{self.size}x{self.size}"


DCN_BLOCK_LAYERS = (LayerShape(33, 32, 30), LayerShape(65, 64, 15), LayerShape(129, 128, 7))

#: σ of the published measurements (K = 5, 7, 11).
BENCH_SIGMAS = (0.5, 1.0, 2.0)
