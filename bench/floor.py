"""Distance to the floor of an SRF layer forward+backward, from a GPU benchmark JSON.

    python bench/floor.py bench/results/layer-gpu-7449fbe.json [--bandwidth 3.35e12 --flops 67e12]

The floor of one call is the larger of its unavoidable memory traffic (read x,
write y in the forward; read x and gy, write grad x in the backward: 3|x| + 2|y|
in float32) over the memory bandwidth, and the arithmetic of the separable
algorithm (forward: the H pass 2·(N+1)·K, the W pass 2·F·K, the mix 2·F·C_out
multiply-adds per input channel and output pixel; the backward twice that)
over the float32 peak. Defaults: H100 SXM (HBM3 3.35 TB/s, 67 TFLOP/s
float32 without tensor cores).
"""

from __future__ import annotations

import argparse
import json


def floor_us(c_in: int, c_out: int, size: int, k: int, batch: int, bandwidth: float, flops: float,
             order: int = 2) -> tuple[float, float]:
    """(memory floor, arithmetic floor) in µs of one forward+backward at stride 1, 'same' padding."""
    n_basis = (order + 1) * (order + 2) // 2
    pixels = batch * size * size
    traffic = 4 * pixels * (3 * c_in + 2 * c_out)
    forward = 2 * pixels * c_in * ((order + 1) * k + n_basis * k + n_basis * c_out)
    return traffic / bandwidth * 1e6, 3 * forward / flops * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file", help="output of pytest bench/test_layer_gpu.py --benchmark-json")
    parser.add_argument("--bandwidth", type=float, default=3.35e12, help="bytes/s (default: H100 SXM HBM3)")
    parser.add_argument("--flops", type=float, default=67e12, help="float32 FLOP/s (default: H100 SXM, no tensor cores)")
    args = parser.parse_args(argv)
    data = json.load(open(args.json_file, encoding="utf-8"))
    print(f"GPU {data['machine_info'].get('gpu')}, commit {data['machine_info'].get('commit')}; "
          f"floor at {args.bandwidth / 1e12:.2f} TB/s and {args.flops / 1e12:.0f} TFLOP/s\n")
    print("| layer | σ | K | backend | fwd+bwd µs | memory floor µs | arithmetic floor µs | × floor |")
    print("|---|---|---|---|---|---|---|---|")
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("passes") != "both" or info["backend"].startswith("cudnn"):
            continue  # the floor is the SRF layer's; cuDNN runs another op (and TF32 by default)
        c_in, rest = info["layer"].split("to")
        c_out, size = rest.split("@")
        memory, arithmetic = floor_us(int(c_in), int(c_out), int(size.split("x")[0]), info["kernel_size"],
                                      info["batch"], args.bandwidth, args.flops)
        measured = bench["stats"]["median"] * 1e6
        print(f"| {info['layer']} | {info['sigma']:g} | {info['kernel_size']} | {info['backend']} | {measured:.0f} | "
              f"{memory:.1f} | {arithmetic:.1f} | {measured / max(memory, arithmetic):.0f}× |")


if __name__ == "__main__":
    main()
