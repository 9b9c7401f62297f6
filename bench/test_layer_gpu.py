"""SRF layer on the GPU at the DCN block shapes, batch 128 (skipped without CUDA).

    pytest bench/test_layer_gpu.py --benchmark-only --benchmark-json $OUT/layer-gpu.json

Cases: published-style ``reference``, ``separable``, ``triton``, and cuDNN with fixed
weights (3x3 and the same KxK); forward, backward and both. Timing is
synchronised (pytest-benchmark around ``torch.cuda.synchronize``); peak memory
goes to ``extra_info``. Every SRF case is first checked against the float64
reference.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from dcn_fast import srf_conv2d
from dcn_fast.functional import truncation_radius
from dcn_fast.shapes import DCN_BLOCK_LAYERS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh)")

BATCH = 128
SIGMAS = (0.5, 1.0, 2.0, 4.0)
KINDS = ("reference", "separable", "triton", "cudnn3x3", "cudnnKxK")
PASSES = ("forward", "backward", "both")


def _run(kind, x, scale, alpha, weight3, weightk, radius):
    if kind in ("reference", "separable", "triton"):
        return srf_conv2d(x, scale, alpha, backend=kind)
    if kind == "cudnn3x3":
        return F.conv2d(x, weight3, padding=1)
    return F.conv2d(x, weightk, padding=radius)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma", SIGMAS, ids=lambda s: f"sigma{s:g}")
@pytest.mark.parametrize("layer", DCN_BLOCK_LAYERS, ids=lambda layer: layer.name)
def test_layer_gpu(benchmark, layer, sigma, kind, passes):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(BATCH, layer.in_channels, layer.size, layer.size, device=dev, requires_grad=True)
    scale = torch.tensor([math.log2(sigma)], device=dev, requires_grad=True)
    alpha = (0.1 * torch.randn(6, layer.in_channels, layer.out_channels, device=dev)).requires_grad_()
    radius = truncation_radius(scale, 2.0)
    k = 2 * radius + 1
    weight3 = torch.randn(layer.out_channels, layer.in_channels, 3, 3, device=dev, requires_grad=True)
    weightk = torch.randn(layer.out_channels, layer.in_channels, k, k, device=dev, requires_grad=True)
    grad = torch.randn(BATCH, layer.out_channels, layer.size, layer.size, device=dev)
    inputs = (x, scale, alpha) if kind in ("reference", "separable", "triton") else (x, weight3 if kind == "cudnn3x3" else weightk)

    if kind in ("separable", "triton"):
        wide = [t.detach().double().requires_grad_() for t in (x, scale, alpha)]
        want = srf_conv2d(*wide, backend="reference")
        got = srf_conv2d(x, scale, alpha, backend=kind)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-3  # TF32 allowed

    def forward():
        with torch.no_grad():
            _run(kind, x, scale, alpha, weight3, weightk, radius)
        torch.cuda.synchronize()

    out_holder = {}

    def setup_backward():
        out_holder["out"] = _run(kind, x, scale, alpha, weight3, weightk, radius)
        torch.cuda.synchronize()

    def backward():
        torch.autograd.grad(out_holder["out"], inputs, grad)
        torch.cuda.synchronize()

    def both():
        torch.autograd.grad(_run(kind, x, scale, alpha, weight3, weightk, radius), inputs, grad)
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"{layer.name} sigma={sigma:g} {passes}"
    if passes == "backward":
        benchmark.pedantic(backward, setup=setup_backward, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(forward if passes == "forward" else both, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(
        layer=layer.name, sigma=sigma, backend=kind, passes=passes, batch=BATCH, kernel_size=k,
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20,
    )
