"""SRF layer on the GPU at the DCN block shapes, batch 128 (skipped without CUDA).

    pytest bench/test_layer_gpu.py --benchmark-only --benchmark-json $OUT/layer-gpu.json

Cases: the published layer (``published.PublishedSRFLayer``: filters rebuilt
from ~60 small ops and σ read back every call), ``SRFConv2d`` with the
``separable``, ``triton`` and ``dense`` backends (taps rebuilt every call in
one launch, σ read back only after it changed; ``dense``: the filter in one
launch, then cuDNN), ``triton+graph`` and ``dense+graph`` (the same layer,
forward and backward captured by ``torch.cuda.make_graphed_callables``: kernel
time without launch overhead), and cuDNN with fixed weights (3x3 and the same KxK);
forward, backward and both. Timing is synchronised (pytest-benchmark around
``torch.cuda.synchronize``); peak memory goes to ``extra_info``. Every SRF
case is first checked against the float64 reference.
"""

import math

import pytest
import torch

from dcn_fast import SRFConv2d, num_basis, srf_conv2d
from dcn_fast.functional import truncation_radius
from dcn_fast.shapes import DCN_BLOCK_LAYERS

from published import PublishedSRFLayer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh)")

BATCH = 128
SIGMAS = (0.5, 1.0, 2.0, 4.0)
KINDS = ("published", "separable", "triton", "triton+graph", "dense", "dense+graph", "cudnn3x3", "cudnnKxK")
PASSES = ("forward", "backward", "both")


def _layer(kind, layer, scale, alpha, radius):
    """The module of ``kind`` (its parameters are what the gradient is taken of)."""
    dev = alpha.device
    if kind == "published":
        return PublishedSRFLayer(alpha, scale)
    if kind.split("+")[0] in ("separable", "triton", "dense"):
        srf = SRFConv2d(layer.in_channels, layer.out_channels, backend=kind.split("+")[0], device=dev)
        with torch.no_grad():
            srf.alpha.copy_(alpha)
            srf.scale.copy_(scale)
        return srf
    k = 3 if kind == "cudnn3x3" else 2 * radius + 1
    return torch.nn.Conv2d(layer.in_channels, layer.out_channels, k, padding=k // 2, bias=False, device=dev)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sigma", SIGMAS, ids=lambda s: f"sigma{s:g}")
@pytest.mark.parametrize("layer", DCN_BLOCK_LAYERS, ids=lambda layer: layer.name)
def test_layer_gpu(benchmark, layer, sigma, kind, passes):
    if passes == "forward" and kind.endswith("+graph"):
        pytest.skip("a graphed callable replays forward and backward as captured, with autograd on")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(BATCH, layer.in_channels, layer.size, layer.size, device=dev, requires_grad=True)
    scale = torch.tensor([math.log2(sigma)], device=dev)
    alpha = 0.1 * torch.randn(num_basis(2), layer.in_channels, layer.out_channels, device=dev)
    radius = truncation_radius(scale, 2.0)
    grad = torch.randn(BATCH, layer.out_channels, layer.size, layer.size, device=dev)
    module = _layer(kind, layer, scale, alpha, radius)
    if kind.endswith("+graph"):
        module = torch.cuda.make_graphed_callables(module, (x,))
    inputs = (x, *[p for p in module.parameters() if p.requires_grad])

    if kind not in ("cudnn3x3", "cudnnKxK"):
        want = srf_conv2d(x.detach().double(), scale.double(), alpha.double(), backend="reference")
        got = module(x)
        # float32 with TF32 (cuDNN and the Triton dots follow torch.backends.cudnn.allow_tf32, default on)
        assert float((got.double() - want).abs().max() / want.abs().max()) < 5e-3

    def forward():
        with torch.no_grad():
            module(x)
        torch.cuda.synchronize()

    out_holder = {}

    def setup_backward():
        out_holder["out"] = module(x)
        torch.cuda.synchronize()

    def backward():
        torch.autograd.grad(out_holder["out"], inputs, grad)
        torch.cuda.synchronize()

    def both():
        torch.autograd.grad(module(x), inputs, grad)
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"{layer.name} sigma={sigma:g} {passes}"
    if passes == "backward":
        benchmark.pedantic(backward, setup=setup_backward, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(forward if passes == "forward" else both, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(
        layer=layer.name, sigma=sigma, backend=kind, passes=passes, batch=BATCH, kernel_size=2 * radius + 1,
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20,
    )
