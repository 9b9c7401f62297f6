"""Kernel times of one SRF layer call on the GPU (torch.profiler), for the floor analysis.

    python bench/profile_layer.py [--backend triton] > $OUT/profile.txt

SRFConv2d at each DCN block shape, batch 128, σ = 1: forward + backward,
10 calls after warm-up; prints the CUDA time per kernel and per call.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dcn_fast import SRFConv2d
from dcn_fast.shapes import DCN_BLOCK_LAYERS

CALLS = 10


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", help="SRFConv2d backend (default: triton)")
    parser.add_argument("--sigma", type=float, default=1.0, help="σ of the layer (default: 1)")
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    for shape in DCN_BLOCK_LAYERS:
        layer = SRFConv2d(shape.in_channels, shape.out_channels, backend=args.backend, device=dev)
        with torch.no_grad():
            layer.scale.fill_(torch.log2(torch.tensor(args.sigma)).item())
        x = torch.randn(128, shape.in_channels, shape.size, shape.size, device=dev, requires_grad=True)
        for _ in range(3):
            layer(x).sum().backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                layer(x).sum().backward()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        total = sum(e.device_time_total for e in kernels) / CALLS
        print(f"\n## {shape.name}, batch 128, σ = {args.sigma:g}, backend {args.backend}: "
              f"{total:.0f} µs of kernels per forward+backward ({len(kernels)} kinds)")
        for e in sorted(kernels, key=lambda e: -e.device_time_total)[:12]:
            print(f"{e.device_time_total / CALLS:9.1f} µs  {e.count // CALLS:3d}×  {e.key[:90]}")


if __name__ == "__main__":
    main()
