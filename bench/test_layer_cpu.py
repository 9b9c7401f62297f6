"""SRF layer forward + backward on the CPU at the DCN block shapes, batch 32.

    pytest bench/test_layer_cpu.py --benchmark-only --benchmark-json bench/results/cpu.json
    python bench/report.py bench/results/cpu.json

Each case first checks the backend's gradients against the float64 reference,
so no time is reported for a wrong result.
"""

import math

import pytest
import torch

from dcn_fast import num_basis, ops, srf_conv2d
from dcn_fast.shapes import BENCH_SIGMAS, DCN_BLOCK_LAYERS

BATCH = 32
BACKENDS = ("reference", "separable", "cpu", "dense")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", BENCH_SIGMAS, ids=lambda s: f"sigma{s:g}")
@pytest.mark.parametrize("layer", DCN_BLOCK_LAYERS, ids=lambda layer: layer.name)
def test_layer_forward_backward(benchmark, layer, sigma, backend):
    if backend in ("cpu", "dense") and not ops.cpu_kernel_available():
        pytest.skip("C++ CPU kernels unavailable (no compiler)")
    torch.manual_seed(0)
    x = torch.randn(BATCH, layer.in_channels, layer.size, layer.size, requires_grad=True)
    scale = torch.tensor([math.log2(sigma)], requires_grad=True)
    alpha = (0.1 * torch.randn(num_basis(2), layer.in_channels, layer.out_channels)).requires_grad_()
    grad = torch.randn(BATCH, layer.out_channels, layer.size, layer.size)

    def step():
        out = srf_conv2d(x, scale, alpha, backend=backend)
        return torch.autograd.grad(out, (x, scale, alpha), grad)

    # Checked against float64: the scale gradient is one sum over every pixel and
    # can nearly cancel (|grad| ~ 1 where it is usually ~ 100), where float32
    # results differ from the truth by up to ~1e-3 — the dense ones (reference
    # and dense: a K×K filter gradient summed over every pixel first) by up to
    # ~2e-3 (65to64@15x15, σ = 0.5, batch 32: reference 1.4e-3, dense 2.2e-3).
    if backend != "reference":
        wide = [t.detach().double().requires_grad_() for t in (x, scale, alpha)]
        expected = torch.autograd.grad(srf_conv2d(*wide, backend="reference"), wide, grad.double())
        for name, got, want, tol in zip(("input", "scale", "alpha"), step(), expected, (1e-4, 3e-3, 1e-4)):
            error = float((got.double() - want).abs().max() / want.abs().max())
            assert error < tol, f"{backend}: gradient of {name} off by {error:.2e} (relative)"

    benchmark.group = f"{layer.name} sigma={sigma:g}"
    benchmark.extra_info.update(layer=layer.name, sigma=sigma, backend=backend, batch=BATCH)
    benchmark.pedantic(step, rounds=11, warmup_rounds=1)
