"""A torchvision ResNet-18 with structured receptive fields, and back; and fitting a filter bank.

1. Convert every 3x3 and 7x7 ``nn.Conv2d`` of a ResNet-18 (random weights: no
   downloads) into an ``SRFConv2d`` fitted to its weights
   (``dcn_fast.convert_model``), count the parameters before and after, take
   one SGD step, and export it back to plain ``nn.Conv2d`` layers
   (``dcn_fast.export_model``), checking the outputs agree.
2. Fit a bank of smooth oriented filters (Gabor filters, the kind of first
   layer trained CNNs learn) with N-jets of order 0..4, one σ per layer or per
   output channel (``dcn_fast.fit_srf``), and print the errors.

    python examples/convert_resnet.py [--size 64] [--batch 4]

Takes a few seconds on a CPU. ``main`` returns the numbers it prints.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
import torchvision

from dcn_fast import convert_model, export_model, fit_srf, format_report


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gabor_bank(size: int = 7, orientations: int = 8, wavelengths=(3.0, 5.0), phases=(0.0, math.pi / 2)) -> torch.Tensor:
    """``[orientations·len(wavelengths)·len(phases), 1, size, size]`` unit-norm Gabor filters (float64)."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    filters = []
    for k in range(orientations):
        theta = math.pi * k / orientations
        u = x * math.cos(theta) + y * math.sin(theta)
        for wavelength in wavelengths:
            envelope = torch.exp(-(x**2 + y**2) / (2 * (0.45 * wavelength) ** 2))
            for phase in phases:
                g = envelope * torch.cos(2 * math.pi * u / wavelength + phase)
                g = g - g.mean() * (phase == 0.0)  # even filters without their DC response
                filters.append(g / g.norm())
    return torch.stack(filters)[:, None]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image size of the training step")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--order", type=int, default=2, help="N-jet order of the converted ResNet")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results: dict = {}

    # 1. ResNet-18 -> SRF ResNet-18 -> plain ResNet-18.
    model = torchvision.models.resnet18(num_classes=10)
    results["parameters_before"] = count_parameters(model)
    rows: list = []
    start = time.perf_counter()
    convert_model(model, order=args.order, report=rows)
    results["convert_seconds"] = time.perf_counter() - start
    results["parameters_after"] = count_parameters(model)
    results["fit_error_mean"] = sum(r.mean_error for r in rows if r.replaced) / sum(r.replaced for r in rows)
    results["replaced"] = sum(r.replaced for r in rows)
    print(format_report(rows))
    print(
        f"ResNet-18 parameters: {results['parameters_before']:,} -> {results['parameters_after']:,} "
        f"({results['parameters_after'] / results['parameters_before']:.1%}); "
        f"converted in {results['convert_seconds']:.1f} s"
    )

    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    results["loss"] = float(loss.detach())
    print(f"one SGD step: loss {results['loss']:.4f}, conv1 σ now {float(model.conv1.sigma):.4f}")

    model.eval()
    with torch.no_grad():
        expected = model(images)
        plain = export_model(model, inplace=False)
        results["export_max_difference"] = float((plain(images) - expected).abs().max())
    results["exported_srf_layers"] = sum(type(m).__name__ == "SRFConv2d" for m in plain.modules())
    print(
        f"exported to nn.Conv2d: largest output difference {results['export_max_difference']:.2e} "
        f"(outputs up to {float(expected.abs().max()):.2f})"
    )

    # 2. Fitting a filter bank.
    bank = gabor_bank()
    print(f"\nGabor bank {tuple(bank.shape)}: mean relative L2 fit error (K fixed at 7)")
    print("order | " + " | ".join(f"{s:>7}" for s in ("layer", "channel")))
    errors = {}
    for order in range(5):
        row = [float(fit_srf(bank, order=order, scale_sharing=s).error.mean()) for s in ("layer", "channel")]
        errors[order] = row
        print(f"{order:>5} | " + " | ".join(f"{e:7.3f}" for e in row))
    results["gabor_errors"] = errors
    return results


if __name__ == "__main__":
    main()
