"""Device and process group of a run: one process, or a ``torchrun`` launch.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins one process group
(NCCL on GPUs, gloo on CPUs), takes the GPU of its ``LOCAL_RANK`` and trains
on its share of every global batch (:class:`~torch.nn.parallel.DistributedDataParallel`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["resolve_device", "Ranks", "unwrap"]


def resolve_device(name: str | None, option: str = "--device") -> torch.device:
    """The device called ``name`` (``None``: this process's GPU if CUDA is available, else the CPU).

    Raises:
        ValueError: naming ``option``, if ``name`` is no device torch knows or
            this machine cannot allocate memory on it.
    """
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{option} {name!r} is not a device (examples: cpu, cuda, cuda:1)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name}: CUDA is not available on this machine")
    if device.type == "meta":
        raise ValueError(f"{option} meta holds no data; use cpu or cuda")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:  # e.g. cuda:7 on a one-GPU machine, mps off macOS
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{option} {name}: not usable on this machine ({reason})") from exc
    return device


class Ranks:
    """Rank and world size of a ``torchrun`` launch (rank 0 of 1 otherwise); joins the process group."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """``values`` summed over all processes (unchanged in a single process)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` under DistributedDataParallel in a launch, else itself."""
        if not self.active:
            return model
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    def barrier(self) -> None:
        """Wait for every process (nothing in a single process)."""
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
