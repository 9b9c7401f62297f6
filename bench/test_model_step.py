"""One SGD step (forward, backward, update) per model on real CIFAR-10 images.

    pytest bench/test_model_step.py --benchmark-only --benchmark-json bench/results/models-cpu.json
    python bench/report_models.py bench/results/models-cpu.json

Batch 128 on a GPU, 8 on the CPU; dopri5, rtol = atol = 1e-3, at
initialisation, as DESIGN.md §5. ``published-dcn-ode`` is the published layer
stack (bench/published.py). Recorded per case: time (pytest-benchmark), NFE
forward/backward summed over the three blocks, and memory: on a GPU the peak
allocated; on the CPU (no allocator statistics) the peak of the tensors
autograd keeps for the backward (saved-tensor hooks: the graph, or the
checkpoints and the replayed step's graph), the memory the gradient modes trade.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from dcn_fast.data import load_cifar10, normalize
from dcn_fast.models import MODELS, build

from published import published_dcn_ode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BATCH = 128 if DEVICE.type == "cuda" else 8

#: gradient modes, the checkpointed one with either replay ("checkpoint-stage": one evaluation's graph)
GRADIENTS = ("adjoint", "backprop", "checkpoint", "checkpoint-stage")
CASES = [("published-dcn-ode", "adjoint", "auto"), ("published-dcn-ode", "backprop", "auto")]
CASES += [("dcn-ode", gradient, "auto") for gradient in GRADIENTS]
CASES += [("dcn-ode", gradient, "triton") for gradient in GRADIENTS] if DEVICE.type == "cuda" else []
CASES += [("odenet", gradient, "auto") for gradient in GRADIENTS]
CASES += [(name, "adjoint", "auto") for name in MODELS if name not in ("dcn-ode", "odenet")]


@pytest.fixture(scope="module")
def batch():
    data = load_cifar10()
    return normalize(data.train_images[:BATCH]).to(DEVICE), data.train_labels[:BATCH].to(DEVICE)


class SavedTensorPeak:
    """Peak bytes of the tensors autograd holds for backward (saved-tensor hooks), per storage once."""

    def __init__(self) -> None:
        self.alive: dict[int, list[int]] = {}  # storage address -> [bytes, holders]
        self.bytes = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.alive:
            self.alive[key][1] += 1
        else:
            self.alive[key] = [storage.nbytes(), 1]
            self.bytes += storage.nbytes()
            self.peak = max(self.peak, self.bytes)
        # Detached: a saved output holding itself would keep its graph alive in a cycle.
        return _Release(tensor.detach(), key, self)

    def release(self, key: int) -> None:
        entry = self.alive[key]
        entry[1] -= 1
        if not entry[1]:
            self.bytes -= entry[0]
            del self.alive[key]

    @staticmethod
    def unpack(held):
        return held.tensor


class _Release:
    def __init__(self, tensor, key, owner) -> None:
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        self.owner.release(self.key)


@pytest.mark.parametrize("name, gradient, backend", CASES,
                         ids=[f"{n}-{g}{'' if b == 'auto' else '-' + b}" for n, g, b in CASES])
def test_sgd_step(benchmark, batch, name, gradient, backend):
    mode, _, replay = gradient.partition("-")
    solver = dict(gradient=mode, replay=replay or None)
    if name == "published-dcn-ode":
        model = published_dcn_ode(**solver)
    else:
        torch.manual_seed(0)
        model = build(name, backend=backend, **solver)
    time_sgd_step(benchmark, model, *batch, model=name, gradient=gradient, backend=backend)


def time_sgd_step(benchmark, network, x, y, **info) -> None:
    """Benchmark one SGD step of ``network`` at initialisation; ``info`` (with NFE and memory) into extra_info."""
    network.to(DEVICE)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    nfe = {}
    saved = SavedTensorPeak()

    def setup():
        network.load_state_dict(initial)  # every round times the step at initialisation
        optimizer.state.clear()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack) if DEVICE.type == "cpu" \
                else nullcontext():
            loss = F.cross_entropy(network(x), y)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        nfe["forward"] = sum(b.nfe_forward for b in network.ode_blocks())
        nfe["backward"] = sum(b.count_backward() for b in network.ode_blocks())
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = benchmark.group or "sgd step"
    benchmark.pedantic(step, setup=setup, rounds=3, warmup_rounds=1 if DEVICE.type == "cuda" else 0)
    benchmark.extra_info.update(
        **info, batch=x.shape[0], device=str(DEVICE),
        nfe_forward=nfe["forward"], nfe_backward=nfe["backward"],
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if DEVICE.type == "cuda" else None,
        saved_tensors_peak_mib=saved.peak / 2**20 if DEVICE.type == "cpu" else None,
    )
