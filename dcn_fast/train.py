"""Training and evaluation of the paper's models on CIFAR-10 (paper A.2).

SGD with momentum 0.9, batch 128, lr 0.1 divided by 10 at 40 % and 70 % of the
epochs (epochs 40 and 70 of 100), random ±4 px translation and horizontal
flip. With ``images_per_class`` (the small-data protocol of Table 2) the
default epochs grow as the data shrinks (:func:`default_epochs`).

Every epoch ends with an atomic checkpoint (``last.pt``; ``best.pt`` keeps the
best test accuracy) and one JSON line in ``metrics.jsonl``; ``summary.json``
closes the run. The data order and the augmentation of epoch e depend only on
(seed, e), so ``resume`` continues exactly where the run stopped. Under
``torchrun`` the run is data-parallel (DistributedDataParallel): each process
takes its share of every global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .data import CIFAR10, augment, load_cifar10, normalize, per_class_subset
from .models import MODELS, build

__all__ = ["TrainConfig", "train", "evaluate_checkpoint", "default_epochs", "SAMPLE_DEFAULTS"]

#: The quick run on the shipped sample (``dcn-fast train`` with no arguments).
SAMPLE_DEFAULTS = {"images_per_class": 20, "epochs": 1, "batch_size": 50}

CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    model: str = "dcn-ode"
    data_root: str | None = None
    images_per_class: int | None = None
    epochs: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    out: str = "runs/dcn-ode"  # the CLI defaults to runs/<model>-<date>-<time>
    amp: str | None = None
    device: str | None = None
    gradient: str = "adjoint"  # how ODE solves are differentiated (dcn_fast.ode.GRADIENTS)
    seminorm: bool = False  # adjoint step control on the state only (fewer backward steps)
    rtol: float = 1e-3
    atol: float = 1e-3
    backend: str = "auto"
    eval_batch_size: int = 500
    resume: bool = False  # continue from out/last.pt
    download: bool = False  # fetch CIFAR-10 into data_root (torchvision) if absent

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if self.images_per_class is not None and not 1 <= self.images_per_class <= 5000:
            raise ValueError(f"--images-per-class must be in 1..5000 (CIFAR-10 has 5000), got {self.images_per_class}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"--amp must be bf16 or fp16, got {self.amp!r}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ValueError(f"--rtol and --atol must be > 0, got {self.rtol}, {self.atol}")


def default_epochs(images_per_class: int | None) -> int:
    """100 epochs on the full set; ×10 / ×5 / ×2 at ≤ 52 / ≤ 103 / ≤ 512 images per class (Table 2)."""
    if images_per_class is None or images_per_class > 512:
        return 100
    if images_per_class <= 52:
        return 1000
    if images_per_class <= 103:
        return 500
    return 200


def _lr_at(config: TrainConfig, epoch: int, epochs: int) -> float:
    """Step schedule: ×0.1 at 40 % and 70 % of the run (epochs 40 and 70 of 100), never at epoch 0."""
    return config.lr * 0.1 ** sum(epoch >= max(1, int(epochs * f)) for f in (0.4, 0.7))


class _Distributed:
    """Rank and world of a torchrun launch (one process otherwise)."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _device(name: str | None) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _autocast(config: TrainConfig, device: torch.device):
    if config.amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _build_model(config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return build(
        config.model,
        backend=config.backend,
        rtol=config.rtol,
        atol=config.atol,
        gradient=config.gradient,
        adjoint_options={"norm": "seminorm"} if config.seminorm else None,
    )


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def _load_checkpoint(path: Path, model_name: str | None = None) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated file, not a torch checkpoint, ...
        raise ValueError(f"{path} is not a readable dcn_fast checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dcn_fast checkpoint (format {CHECKPOINT_FORMAT})")
    if model_name is not None and ckpt["config"]["model"] != model_name:
        raise ValueError(
            f"checkpoint {path} holds model {ckpt['config']['model']!r}, not {model_name!r}; "
            "pass --model accordingly or choose another --out"
        )
    return ckpt


@torch.no_grad()
def _evaluate(model, images, labels, config, device, ranks: _Distributed) -> dict:
    model.eval()
    loss_sum, correct, count, nfe = 0.0, 0.0, 0.0, 0
    shard = torch.arange(ranks.rank, images.shape[0], ranks.world)
    blocks = _unwrap(model).ode_blocks()
    for start in range(0, shard.numel(), config.eval_batch_size):
        idx = shard[start : start + config.eval_batch_size]
        x = normalize(images[idx].to(device))
        y = labels[idx].to(device)
        with _autocast(config, device):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        count += idx.numel()
        nfe = max(nfe, sum(b.nfe_forward for b in blocks))
    loss_sum, correct, count = ranks.sum([loss_sum, correct, count], device)
    model.train()
    return {"loss": loss_sum / count, "acc": correct / count, "nfe_forward": nfe}


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def train(config: TrainConfig, progress: bool = True, log=print) -> dict:
    """Train ``config.model``; returns the summary (also written to ``out/summary.json``).

    With ``config.resume``, continues from ``out/last.pt``.
    """
    config.validate()
    from tqdm.auto import tqdm

    device = _device(config.device)
    ranks = _Distributed(device)
    try:
        out = Path(config.out)
        resume = config.resume
        ckpt = _load_checkpoint(out / "last.pt", config.model) if resume else None
        if not resume and (out / "last.pt").exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)

        data: CIFAR10 = load_cifar10(config.data_root, download=config.download)
        train_images, train_labels = data.train_images, data.train_labels
        if config.images_per_class is not None:
            idx = per_class_subset(train_labels, config.images_per_class, config.seed)
            train_images, train_labels = train_images[idx], train_labels[idx]
        epochs = config.epochs or default_epochs(config.images_per_class)

        model = _build_model(config).to(device)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        start_epoch, best, history = 0, {"acc": -1.0, "epoch": -1}, []
        if ckpt is not None:
            model.load_state_dict(ckpt["model_state"])
            optimizer.load_state_dict(ckpt["optimizer_state"])
            start_epoch, best, history = ckpt["epoch"], ckpt["best"], ckpt["history"]
            if ranks.main:
                log(f"resuming {config.model} from {out / 'last.pt'} after epoch {start_epoch}")
        net = model
        if ranks.active:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        blocks = model.ode_blocks()
        images_dev, labels_dev = train_images.to(device), train_labels.to(device)
        n_train = images_dev.shape[0]
        steps = math.ceil(n_train / config.batch_size)
        if ranks.main:
            log(
                f"training {config.model} ({model.num_parameters():,} parameters) on {n_train} images from "
                f"{data.source}, {epochs} epochs of {steps} steps, batch {config.batch_size}, {device}"
                + (f", {ranks.world} processes" if ranks.active else "")
            )

        for epoch in range(start_epoch, epochs):
            lr = _lr_at(config, epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            gen = _generator(device, config.seed * 100_003 + epoch)
            order = torch.randperm(n_train, generator=gen, device=device)
            started = time.perf_counter()
            loss_sum = correct = count = 0.0
            nfe_f = nfe_b = 0
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", disable=not (progress and ranks.main),
                       leave=False, dynamic_ncols=True)
            for step in bar:
                batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                # The augmentation is drawn for the whole global batch, then sharded,
                # so a data-parallel run sees exactly the single-process batches.
                x = normalize(augment(images_dev[batch], gen))[ranks.rank :: ranks.world]
                y = labels_dev[batch][ranks.rank :: ranks.world]
                with _autocast(config, device):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                # Mean over the global batch: DDP averages the shard means.
                loss.backward()
                optimizer.step()
                nfe_f = sum(b.nfe_forward for b in blocks)
                nfe_b = sum(b.count_backward() for b in blocks)
                loss_sum += float(loss.detach()) * y.numel()
                correct += float((logits.detach().argmax(1) == y).sum())
                count += y.numel()
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", acc=f"{correct / count:.3f}", nfe=f"{nfe_f}/{nfe_b}")
            bar.close()
            loss_sum, correct, count = ranks.sum([loss_sum, correct, count], device)
            test = _evaluate(net, data.test_images, data.test_labels, config, device, ranks)
            record = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": loss_sum / count,
                "train_acc": correct / count,
                "test_loss": test["loss"],
                "test_acc": test["acc"],
                "nfe_forward": nfe_f,
                "nfe_backward": nfe_b,
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            is_best = test["acc"] > best["acc"]
            if is_best:
                best = {"acc": test["acc"], "epoch": epoch + 1}
            if ranks.main:
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "config": asdict(config),
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "model_state": model.state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "best": best,
                    "history": history,
                }
                _save_atomic(state, out / "last.pt")
                if is_best:
                    _save_atomic(state, out / "best.pt")
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                log(
                    f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}"
                    f" | test loss {record['test_loss']:.4f} acc {record['test_acc']:.4f}"
                    f" | NFE {nfe_f}/{nfe_b} | {record['seconds']:.1f}s"
                )

        final = history[-1] if history else None
        summary = {
            "model": config.model,
            "parameters": model.num_parameters(),
            "epochs": epochs,
            "train_images": n_train,
            "data": data.source,
            "best_test_acc": best["acc"],
            "best_epoch": best["epoch"],
            "final_test_acc": final["test_acc"] if final else None,
            "out": str(out.resolve()),
            "checkpoint": str((out / "best.pt").resolve()),
        }
        if ranks.main:
            with open(out / "summary.json", "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        return summary
    finally:
        ranks.close()


def evaluate_checkpoint(path: str, data_root: str | None = None, device: str | None = None,
                        batch_size: int = 500) -> dict:
    """Test accuracy of a checkpoint written by :func:`train`."""
    ckpt = _load_checkpoint(Path(path))
    config = TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in TrainConfig.__dataclass_fields__})
    config.eval_batch_size = batch_size
    dev = _device(device)
    model = _build_model(config).to(dev)
    model.load_state_dict(ckpt["model_state"])
    data = load_cifar10(data_root if data_root is not None else config.data_root)
    result = _evaluate(model, data.test_images, data.test_labels, config, dev, _Distributed(dev))
    return {"model": config.model, "epoch": ckpt["epoch"], "test_acc": result["acc"], "test_loss": result["loss"],
            "nfe_forward": result["nfe_forward"], "data": data.source}

