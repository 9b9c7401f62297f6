"""One SGD step (forward, backward, update) per model on real CIFAR-10 images.

    pytest bench/test_model_step.py --benchmark-only --benchmark-json bench/results/models-cpu.json
    python bench/report_models.py bench/results/models-cpu.json

Batch 128 on a GPU, 8 on the CPU; dopri5, rtol = atol = 1e-3, at
initialisation, as DESIGN.md §5. ``published-dcn-ode`` is the published layer
stack (bench/published.py). Recorded per case: time (pytest-benchmark), NFE
forward/backward summed over the three blocks, peak GPU memory.
"""

import pytest
import torch
import torch.nn.functional as F

from dcn_fast.data import load_cifar10, normalize
from dcn_fast.models import MODELS, build

from published import published_dcn_ode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 128 if DEVICE.type == "cuda" else 8

CASES = [("published-dcn-ode", True, "auto"), ("dcn-ode", True, "auto"), ("dcn-ode", False, "auto")]
CASES += [("dcn-ode", True, "triton"), ("dcn-ode", False, "triton")] if DEVICE.type == "cuda" else []
CASES += [(name, True, "auto") for name in MODELS if name != "dcn-ode"]


@pytest.fixture(scope="module")
def batch():
    data = load_cifar10()
    return normalize(data.train_images[:BATCH]).to(DEVICE), data.train_labels[:BATCH].to(DEVICE)


@pytest.mark.parametrize(
    "name, adjoint, backend", CASES,
    ids=[f"{n}-{'adjoint' if a else 'direct'}{'' if b == 'auto' else '-' + b}" for n, a, b in CASES],
)
def test_sgd_step(benchmark, batch, name, adjoint, backend):
    x, y = batch
    if name == "published-dcn-ode":
        model = published_dcn_ode(gradient="adjoint" if adjoint else "backprop")
    else:
        torch.manual_seed(0)
        model = build(name, gradient="adjoint" if adjoint else "backprop", backend=backend)
    model.to(DEVICE)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nfe = {}

    def setup():
        model.load_state_dict(initial)  # every round times the step at initialisation
        optimizer.state.clear()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        nfe["forward"] = sum(b.nfe_forward for b in model.ode_blocks())
        nfe["backward"] = sum(b.count_backward() for b in model.ode_blocks())
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "sgd step"
    benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=1 if DEVICE.type == "cuda" else 0)
    benchmark.extra_info.update(
        model=name, adjoint=adjoint, backend=backend, batch=BATCH, device=str(DEVICE),
        nfe_forward=nfe["forward"], nfe_backward=nfe["backward"],
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None,
    )
