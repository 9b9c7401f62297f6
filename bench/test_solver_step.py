"""The ODE solve: dcn_fast's solver against the torchdiffeq path, same model, same weights, same run.

    pytest bench/test_solver_step.py --benchmark-only --benchmark-json bench/results/solver-cpu.json
    python bench/report_models.py bench/results/solver-cpu.json

Cases: one DCN-ODE SGD step (batch 8 on the CPU, 128 on a GPU; real CIFAR-10
images, dopri5, rtol = atol = 1e-3, at initialisation) per gradient mode and
solver, beside the published layer stack with the official code's adjoint
(bench/published.py); and a no-grad forward (evaluation) at batch 50, per
solver. NFE and memory are recorded as in bench/test_model_step.py.
"""

import pytest
import torch

from dcn_fast.data import load_cifar10, normalize
from dcn_fast.models import build

from published import published_dcn_ode
from test_model_step import BATCH, DEVICE, time_sgd_step

SOLVERS = ("dcn_fast", "torchdiffeq")
EVAL_BATCH = 50


@pytest.fixture(scope="module")
def images():
    data = load_cifar10()
    return normalize(data.train_images[:EVAL_BATCH]).to(DEVICE), data.train_labels[:EVAL_BATCH].to(DEVICE)


def test_published_step(benchmark, images):
    """The official code's training step: published SRF layers, torchdiffeq's adjoint."""
    x, y = images
    benchmark.group = "dcn-ode sgd step"
    time_sgd_step(benchmark, published_dcn_ode(gradient="adjoint"), x[:BATCH], y[:BATCH],
                  model="published-dcn-ode", gradient="adjoint", solver="torchdiffeq")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("gradient", ["checkpoint", "backprop", "adjoint"])
def test_sgd_step(benchmark, images, gradient, solver):
    x, y = images
    torch.manual_seed(0)
    benchmark.group = "dcn-ode sgd step"
    time_sgd_step(benchmark, build("dcn-ode", gradient=gradient, solver=solver), x[:BATCH], y[:BATCH],
                  model="dcn-ode", gradient=gradient, solver=solver)


@pytest.mark.parametrize("solver", SOLVERS)
def test_eval_forward(benchmark, images, solver):
    x, _ = images
    torch.manual_seed(0)
    model = build("dcn-ode", solver=solver).to(DEVICE).eval()

    def forward():
        with torch.no_grad():
            model(x)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "dcn-ode eval forward"
    benchmark.pedantic(forward, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(model="dcn-ode", solver=solver, batch=x.shape[0], device=str(DEVICE),
                                nfe_forward=sum(b.nfe_forward for b in model.ode_blocks()))
