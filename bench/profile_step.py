"""Where one DCN-ODE training step (or evaluation) spends its CPU time: the SRF convolution's share.

    python bench/profile_step.py                          # SGD step, batch 8, gradient="checkpoint"
    python bench/profile_step.py --solver torchdiffeq     # the same on torchdiffeq's solver
    python bench/profile_step.py --eval --batch 50        # a no-grad forward

One step on real CIFAR-10 images of the shipped sample (dopri5, rtol = atol =
1e-3, the model at initialisation, seed 0) after one warm-up step, under
``torch.profiler``. Prints the self CPU time per operator (top rows) and the
share of the step spent in the SRF convolution: the ``dcn_fast`` convolution
ops and the GEMMs / convolutions they run (``srf_*`` ops' self time plus the
``mm``/``bmm``/``addmm``/``convolution`` calls inside them, taken from their
children), against the step's total self CPU time.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from dcn_fast.data import load_cifar10, to_inputs
from dcn_fast.models import build


def _srf_share(events) -> tuple[float, float]:
    """(µs in the SRF convolution, µs in all) from a profiler's event list, self CPU time."""
    total = sum(e.self_cpu_time_total for e in events if e.device_type.name == "CPU")
    inside = 0.0

    def visit(event, under_srf: bool) -> None:
        nonlocal inside
        under_srf = under_srf or "srf_" in event.name
        if under_srf:
            inside += event.self_cpu_time_total
        for child in event.cpu_children:
            visit(child, under_srf)

    for event in events:
        if event.cpu_parent is None:
            visit(event, False)
    return inside, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dcn-ode", help="model name (default: dcn-ode)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--gradient", default="checkpoint", help="gradient mode (default: checkpoint)")
    parser.add_argument("--solver", default=None, help="ODE solver: dcn_fast or torchdiffeq (default: the model's)")
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol (default: 1e-3)")
    parser.add_argument("--eval", action="store_true", help="profile a no-grad forward instead of an SGD step")
    parser.add_argument("--rows", type=int, default=15, help="operators listed (default: 15)")
    args = parser.parse_args(argv)

    data = load_cifar10()
    x, y = to_inputs(data.train_images[: args.batch]), data.train_labels[: args.batch]
    torch.manual_seed(0)
    options = {} if args.solver is None else {"solver": args.solver}
    model = build(args.model, gradient=args.gradient, rtol=args.tol, atol=args.tol, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights

    def step() -> None:
        if args.eval:
            with torch.no_grad():
                model(x)
            return
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up: kernel builds, caches
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.events()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    inside, total = _srf_share(events)
    nfe = sum(b.nfe_forward for b in model.ode_blocks())
    what = "no-grad forward" if args.eval else f"SGD step, gradient={args.gradient!r}"
    print(f"{args.model}, {what}, batch {args.batch}, tol {args.tol:g}, {torch.get_num_threads()} threads, "
          f"forward NFE {nfe}: SRF convolution {inside / 1e3:.1f} ms of {total / 1e3:.1f} ms self CPU time "
          f"({100 * inside / total:.1f} %)")


if __name__ == "__main__":
    main()
