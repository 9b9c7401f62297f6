"""``dcn-fast`` command line: ``dcn-fast bench-layer`` times SRFConv2d against the published layer."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Sequence

import torch

from .functional import BACKENDS, srf_conv2d
from .shapes import BENCH_SIGMAS, DCN_BLOCK_LAYERS

__all__ = ["main"]


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def bench_layer(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    backends = ["reference"] + [b for b in args.backends if b != "reference"]
    print(
        f"SRF layer forward+backward, batch {args.batch}, {device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}; median of {args.repeats}, ms"
    )
    header = ["layer", "sigma"] + backends + [f"ref/{b}" for b in backends[1:]]
    print(" | ".join(f"{h:>14}" for h in header))
    for layer in DCN_BLOCK_LAYERS:
        for sigma in args.sigmas:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, layer.in_channels, layer.size, layer.size, generator=gen).to(device)
            alpha = (0.1 * torch.randn(6, layer.in_channels, layer.out_channels, generator=gen)).to(device)
            scale = torch.tensor([math.log2(sigma)], device=device)
            grad = torch.randn(args.batch, layer.out_channels, layer.size, layer.size, generator=gen).to(device)
            for t in (x, alpha, scale):
                t.requires_grad_()
            expected = srf_conv2d(x, scale, alpha, backend="reference")
            row = []
            for backend in backends:
                out = srf_conv2d(x, scale, alpha, backend=backend)
                error = float((out - expected).detach().abs().max() / expected.detach().abs().max())
                if error > 1e-4:
                    print(f"error: {backend} differs from the reference by {error:.2e}", file=sys.stderr)
                    return 1
                step = lambda b=backend: torch.autograd.grad(  # noqa: E731
                    srf_conv2d(x, scale, alpha, backend=b), (x, scale, alpha), grad
                )
                row.append(_time(step, args.repeats, device))
            cells = [layer.name, f"{sigma:g}"] + [f"{t:.2f}" for t in row] + [f"{row[0] / t:.1f}x" for t in row[1:]]
            print(" | ".join(f"{c:>14}" for c in cells), flush=True)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _sigma(text: str) -> float:
    value = float(text)
    if not (0.1 <= value <= 30):
        raise argparse.ArgumentTypeError(f"sigma must be in [0.1, 30], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcn-fast", description="Fast SRF convolutions and Deep Continuous Networks")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench-layer",
        help="check and time SRFConv2d against the published layer at the DCN block shapes",
        description="Checks every backend against the published construction, then times forward+backward "
        "at the three DCN block shapes (33->32 @30x30, 65->64 @15x15, 129->128 @7x7).",
    )
    bench.add_argument("--batch", type=_positive_int, default=8, help="batch size (default: 8)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    bench.add_argument(
        "--backends",
        nargs="+",
        choices=[b for b in BACKENDS if b != "auto"],
        default=["separable", "cpu"] if not torch.cuda.is_available() else ["separable"],
        help="backends to compare with the reference",
    )
    bench.add_argument("--sigmas", nargs="+", type=_sigma, default=list(BENCH_SIGMAS), help="σ values (default: 0.5 1 2)")
    bench.add_argument("--repeats", type=_positive_int, default=5, help="timed repetitions (default: 5)")
    bench.set_defaults(run=bench_layer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as exc:  # bad arguments caught by the op: a message, not a traceback
        print(f"dcn-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
