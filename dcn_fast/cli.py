"""``dcn-fast`` command line.

- ``dcn-fast train``: train a model of the paper on CIFAR-10 (no arguments: a
  DCN-ODE, briefly, on the sample shipped with the package);
- ``dcn-fast eval --checkpoint PATH``: test accuracy of a checkpoint;
- ``dcn-fast bench-layer``: check and time SRFConv2d against the published layer;
- ``dcn-fast experiment NAME``: an experiment of the paper, with figures (:mod:`dcn_fast.experiments`);
- ``dcn-fast plot RUN_DIR``: the training curves of a run as PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import fields
from typing import Callable, Sequence

import torch

from .arguments import OneLineErrors, positive_int, sigma_value
from .functional import BACKENDS, srf_conv2d
from .checkpoint import REPLAYS
from .ode import GRADIENTS, SOLVERS
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
    from .distributed import resolve_device

    device = resolve_device(args.device)
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
                # cuDNN convolutions (the reference, separable) use TF32 by default on CUDA.
                if error > (5e-3 if device.type == "cuda" else 1e-4):
                    print(f"error: {backend} differs from the reference by {error:.2e}", file=sys.stderr)
                    return 1
                step = lambda b=backend: torch.autograd.grad(  # noqa: E731
                    srf_conv2d(x, scale, alpha, backend=b), (x, scale, alpha), grad
                )
                row.append(_time(step, args.repeats, device))
            cells = [layer.name, f"{sigma:g}"] + [f"{t:.2f}" for t in row] + [f"{row[0] / t:.1f}x" for t in row[1:]]
            print(" | ".join(f"{c:>14}" for c in cells), flush=True)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from .train import SAMPLE_DEFAULTS, TrainConfig, train

    # Options left out are None: a new run takes TrainConfig's defaults (and the
    # sample's quick settings without --data-root); a resumed run keeps its own.
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name not in ("resume", "out") and getattr(args, f.name, None) is not None}
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out (the folder of the run to continue)")
        config = TrainConfig.from_run(args.out, **given)
    else:
        settings = {**(SAMPLE_DEFAULTS if args.data_root is None else {}), **given}
        out = args.out or time.strftime(f"runs/{settings.get('model', TrainConfig.model)}-%Y%m%d-%H%M%S")
        config = TrainConfig(**settings, out=out)
    summary = train(config, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"best test accuracy {summary['best_test_acc']:.4f} (epoch {summary['best_epoch']} of "
            f"{summary['epochs']}); outputs in {summary['out']} (metrics.jsonl, summary.json, best.pt, last.pt)"
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data_root=args.data_root, device=args.device,
                                 batch_size=args.batch_size, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    return 0


def run_experiment(args: argparse.Namespace) -> int:
    from .experiments import load
    from .experiments.common import Experiment

    exp = Experiment.from_args(args.experiment, args)
    exp.finish(load(args.experiment).run(exp, args), args)
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    print(f"curves: {plot_run(args.run_dir, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="dcn-fast", description="Fast SRF convolutions and Deep Continuous Networks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)
    bench = sub.add_parser(
        "bench-layer",
        help="check and time SRFConv2d against the published layer at the DCN block shapes",
        description="Checks every backend against the published construction, then times forward+backward "
        "at the three DCN block shapes (33->32 @30x30, 65->64 @15x15, 129->128 @7x7).",
    )
    bench.add_argument("--batch", type=positive_int, default=8, help="batch size (default: 8)")
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    bench.add_argument(
        "--backends",
        nargs="+",
        choices=[b for b in BACKENDS if b != "auto"],
        default=["separable", "cpu"] if not torch.cuda.is_available() else ["separable", "triton"],
        help="backends to compare with the reference",
    )
    bench.add_argument("--sigmas", nargs="+", type=sigma_value, default=list(BENCH_SIGMAS), help="σ values (default: 0.5 1 2)")
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed repetitions (default: 5)")
    bench.set_defaults(run=bench_layer)

    from .models import MODELS

    train = sub.add_parser(
        "train",
        help="train a model of the paper on CIFAR-10",
        description="Train on CIFAR-10 with the paper's protocol (SGD 0.9, lr 0.1, x0.1 at 40% and 70% of the "
        "epochs, σ^ji at 80%, 140%, 200%; ±4 px translation + flips; inputs in [0, 1]). Without --data-root: a short run on the sample shipped with the "
        f"package ({', '.join(_sample_options())}).",
    )
    # Every setting defaults to None ("not given"): see run_train.
    train.add_argument("--model", help=f"one of: {', '.join(MODELS)} (default: dcn-ode)")
    train.add_argument("--data-root", help="CIFAR-10: torchvision folder, JPEG tree or .tar.xz (default: shipped sample)")
    train.add_argument("--download", action="store_true", default=None,
                       help="download CIFAR-10 into --data-root (torchvision)")
    train.add_argument("--images-per-class", type=positive_int, help="small-data subset, n images per class")
    train.add_argument("--test-images-per-class", type=positive_int,
                       help="evaluate on this many test images per class (default: the whole test set)")
    train.add_argument("--epochs", type=positive_int, help="default: 100, more for small subsets")
    train.add_argument("--batch-size", type=positive_int, help="global batch size (default: 128)")
    train.add_argument("--lr", type=float, help="initial learning rate (default: 0.1)")
    train.add_argument("--lr-drops", type=float, nargs="*", metavar="FRACTION",
                       help="x0.1 at these fractions of the epochs; none: a constant lr (default: the paper's, "
                       "0.4 0.7, dcn-sigma-ji 0.8 1.4 2.0; without --data-root none, at any --epochs)")
    train.add_argument("--momentum", type=float, help="SGD momentum (default: 0.9)")
    train.add_argument("--weight-decay", type=float, help="SGD weight decay (default: 0)")
    train.add_argument("--seed", type=int, help="seed of init, subset, order, augmentation (default: 0)")
    train.add_argument("--normalize", action=argparse.BooleanOptionalAction,
                       help="standardise inputs with CIFAR-10's mean/std (default: off, inputs in [0, 1] as the "
                            "official code)")
    train.add_argument("--out", help="output folder (default: runs/<model>-<date>-<time>)")
    train.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    train.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--gradient", choices=GRADIENTS,
                       help="how ODE solves are differentiated: checkpoint (exact: accepted steps replayed, "
                            "one step's graph at a time), adjoint (adjoint ODE solved backwards, least memory, "
                            "approximate), backprop (exact, memory grows with every evaluation) "
                            "(default: checkpoint)")
    train.add_argument("--replay", choices=REPLAYS,
                       help="with --gradient checkpoint: hold one step's graph (step, default) or one "
                            "evaluation's (stage: less memory, slower)")
    train.add_argument("--solver", choices=SOLVERS,
                       help="the ODE solver: dcn_fast (its own Runge-Kutta solver, torchdiffeq's steps with fused "
                            "stage arithmetic) or torchdiffeq (default: dcn_fast; the adjoint's backward solve "
                            "is always torchdiffeq's)")
    train.add_argument("--seminorm", action=argparse.BooleanOptionalAction,
                       help="adjoint with torchdiffeq's seminorm: step control ignores the parameter adjoints")
    train.add_argument("--T", type=float, dest="T",
                       help="end time of the ODE blocks (default: the model's: 2 for DCNs, 1 for ODE-Net)")
    train.add_argument("--activation", choices=["relu", "celu"],
                       help="activation everywhere in the model (default: the model's; Table A.1's controls: "
                            "--model odenet --T 2 --activation celu)")
    train.add_argument("--rtol", type=float, help="solver relative tolerance (default: 1e-3)")
    train.add_argument("--atol", type=float, help="solver absolute tolerance (default: 1e-3)")
    train.add_argument("--backend", choices=BACKENDS, help="SRF backend (default: auto)")
    train.add_argument("--eval-batch-size", type=positive_int, help="test-set batch (default: 500)")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from last.pt with its saved settings; options given "
                            "explicitly override them")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(run=run_train)

    evaluate = sub.add_parser("eval", help="test accuracy of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by dcn-fast train")
    evaluate.add_argument("--data-root", help="CIFAR-10 location (default: the one the run used)")
    evaluate.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    evaluate.add_argument("--batch-size", type=positive_int, default=500, help="evaluation batch (default: 500)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=run_eval)

    from .experiments import EXPERIMENTS, load
    from .experiments.common import add_common_arguments

    experiment = sub.add_parser("experiment", help="run an experiment of the paper (result.json and PNG figures)",
                                description="The paper's experiments beyond Table 1. Each writes result.json and "
                                "PNG figures under --out; --quick runs it on the shipped sample in about a minute.")
    kinds = experiment.add_subparsers(dest="experiment", required=True, metavar="NAME", parser_class=OneLineErrors)
    for name in EXPERIMENTS:
        module = load(name)
        parser_ = kinds.add_parser(name, help=module.HELP, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(parser_)
        add_common_arguments(parser_, name)
        parser_.set_defaults(run=run_experiment)

    plot = sub.add_parser("plot", help="training curves of a run (loss, accuracy, NFE, learning rate) as PNG")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by dcn-fast train (holds metrics.jsonl)")
    plot.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    plot.set_defaults(run=run_plot)
    return parser


def _sample_options() -> list[str]:
    """The sample run's settings as options: ``["--images-per-class 200", ..., "--lr-drops (none)", ...]``."""
    from .train import SAMPLE_DEFAULTS, shown_setting

    return [f"--{k.replace('_', '-')} {shown_setting(v)}" for k, v in SAMPLE_DEFAULTS.items()]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "experiment", None))))
    try:
        return args.run(args)
    except KeyboardInterrupt:
        # Every file is written atomically: the last checkpoint is whole, and the run can go on from it.
        how = {"train": "; continue from the last checkpoint with dcn-fast train --resume --out <its folder>",
               "experiment": "; run the same command (same --out) again to continue from the last checkpoint"}
        print(f"dcn-fast {command}: interrupted{how.get(args.command, '')}", file=sys.stderr)
        return 130
    # User errors and a run that cannot go on: one line, not a traceback.
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        message = " ".join(str(exc).split())
        print(f"dcn-fast {command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
