"""Data loading, augmentation, training, checkpoint/resume, DDP and the CLI."""

import json
from dataclasses import replace
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from dcn_fast import cli
from dcn_fast import train as train_module
from dcn_fast.runfiles import load_checkpoint, save_checkpoint, write_json
from dcn_fast.data import CLASSES, augment, load_cifar10, per_class_subset, sample_archive, to_inputs
from dcn_fast.models import build
from dcn_fast.train import (SAMPLE_DEFAULTS, TrainConfig, changed_settings, default_epochs, eval_split, evaluate,
                            evaluate_checkpoint, load_model, lr_at, train)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DCN_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_shipped_sample():
    data = load_cifar10()
    assert data.train_images.shape == (2000, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (500, 3, 32, 32)
    assert torch.equal(data.train_labels.bincount(), torch.full((10,), 200))
    assert data.train_images.float().std() > 30  # real pictures, not blanks


def test_jpeg_tree_archive_and_cache_agree(tmp_path):
    with tarfile.open(sample_archive()) as archive:
        archive.extractall(tmp_path / "tree", filter="data")
    from_tree = load_cifar10(tmp_path / "tree")
    from_archive = load_cifar10(sample_archive())
    again = load_cifar10(sample_archive())  # from the uint8 cache
    for a, b in [(from_tree, from_archive), (from_archive, again)]:
        assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)


def test_torchvision_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_cifar10(tmp_path)
    assert data.train_images.shape == (50, 3, 32, 32) and data.test_images.shape == (10, 3, 32, 32)
    with open(folder / "test_batch", "rb") as f:
        first = np.asarray(pickle.load(f)["data"][0]).reshape(3, 32, 32)
    assert torch.equal(data.test_images[0], torch.from_numpy(first))


def test_missing_data_says_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked for torchvision's cifar-10-batches-py/.*JPEG tree"):
        load_cifar10(tmp_path)


def test_per_class_subset_is_seeded_and_balanced():
    labels = load_cifar10().train_labels
    a, b = per_class_subset(labels, 7, seed=3), per_class_subset(labels, 7, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, per_class_subset(labels, 7, seed=4))
    assert torch.equal(labels[a].bincount(), torch.full((10,), 7))
    with pytest.raises(ValueError, match="has only 200 images"):
        per_class_subset(labels, 201, seed=0)


def test_augment_translates_and_flips():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = augment(images, torch.Generator().manual_seed(0), shift=2)
    assert out.shape == images.shape
    for i in range(2):  # each output is a shifted (maybe mirrored) window of the zero-padded input
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    again = augment(images, torch.Generator().manual_seed(0), shift=2)
    assert torch.equal(out, again)


def test_default_epochs_follow_the_small_data_protocol():
    assert [default_epochs(n) for n in (None, 5000, 1024, 512, 103, 52)] == [100, 100, 100, 200, 500, 1000]


def small_config(tmp_path, **kwargs):
    base = dict(model="resnet-srf-blocks", images_per_class=10, epochs=3, batch_size=50, lr=0.05,
                out=str(tmp_path / "run"), eval_batch_size=250, seed=1)
    base.update(kwargs)
    return TrainConfig(**base)


def read_metrics(folder):
    with open(folder / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_short_run_lowers_the_loss_and_writes_outputs(tmp_path):
    summary = train(small_config(tmp_path, epochs=4), progress=False, log=lambda *_: None)
    metrics = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert summary["best_test_acc"] == max(m["test_acc"] for m in metrics)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "summary.json"}
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (written["gradient"], written["replay"]) == ("checkpoint", "step") and written == summary
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["gradient"] == "checkpoint"
    result = evaluate_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert result["test_acc"] == pytest.approx(summary["best_test_acc"])


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(small_config(tmp_path, out=str(straight)), progress=False, log=lambda *_: None)

    crashed = tmp_path / "crashed"
    real_evaluate, calls = train_module._evaluate, []

    def evaluate_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash in epoch 2")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "_evaluate", evaluate_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(tmp_path, out=str(crashed)), progress=False, log=lambda *_: None)
    monkeypatch.setattr(train_module, "_evaluate", real_evaluate)
    assert len(read_metrics(crashed)) == 1  # epoch 1 survived in the checkpoint
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(small_config(tmp_path, out=str(crashed)), progress=False, log=lambda *_: None)
    train(small_config(tmp_path, out=str(crashed), resume=True), progress=False, log=lambda *_: None)

    assert read_metrics(crashed) == [m | {"seconds": c["seconds"]} for m, c in zip(read_metrics(straight), read_metrics(crashed))]
    a = torch.load(straight / "last.pt", weights_only=True)["model_state"]
    b = torch.load(crashed / "last.pt", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    train(small_config(tmp_path, epochs=1), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="holds model 'resnet-srf-blocks', not 'resnet-blocks'"):
        train(small_config(tmp_path, model="resnet-blocks", resume=True), progress=False)


def test_distributed_data_parallel_two_processes(tmp_path):
    """torchrun, 2 CPU processes (gloo): the same run as one process, to float rounding."""
    args = ["--model", "resnet-srf-blocks", "--images-per-class", "4", "--epochs", "1", "--batch-size", "20",
            "--no-progress", "--seed", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dcn_fast",
         "train", *args, "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes" in ddp.stdout
    single = subprocess.run(
        [sys.executable, "-m", "dcn_fast", "train", *args, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    (m_ddp,), (m_one,) = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert m_ddp[key] == pytest.approx(m_one[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model", "dcn-fastest"], "unknown model 'dcn-fastest'; choose one of"),
        (["train", "--data-root", "/nonexistent/cifar"], "no CIFAR-10 under /nonexistent/cifar: looked for"),
        (["train", "--lr", "-1"], "--lr must be a finite number > 0"),
        (["train", "--images-per-class", "6000"], "--images-per-class must be in 1..5000"),
        (["eval", "--checkpoint", "/nonexistent.pt"], "checkpoint /nonexistent.pt does not exist"),
    ],
)
def test_cli_errors_are_messages(argv, message, capsys, tmp_path):
    argv = argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_eval_rejects_a_file_that_is_no_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    assert cli.main(["eval", "--checkpoint", str(bogus)]) == 2
    assert "is not a readable dcn_fast checkpoint" in capsys.readouterr().err


def test_cli_argparse_rejects_impossible_sizes(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--batch-size", "0"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err == ("dcn-fast train: error: argument --batch-size: must be >= 1, got 0 "
                                           "(see dcn-fast train --help)\n")


def test_classes_match_folder_names():
    assert CLASSES[0] == "airplane" and CLASSES[-1] == "truck" and len(CLASSES) == 10


def test_bf16_autocast_run(tmp_path):
    summary = train(small_config(tmp_path, images_per_class=2, epochs=1, batch_size=10, amp="bf16"),
                    progress=False, log=lambda *_: None)
    assert 0.0 <= summary["best_test_acc"] <= 1.0
    assert read_metrics(tmp_path / "run")[0]["train_loss"] > 0


def test_cli_resume_needs_out(capsys):
    assert cli.main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_jpeg_tree_cache_follows_deleted_images_and_class_folders(tmp_path):
    tree = tmp_path / "tree"
    with tarfile.open(sample_archive()) as archive:
        archive.extractall(tree, filter="data")
    before = load_cifar10(tree)  # decoded and cached
    for image in sorted((tree / "train" / "cat").iterdir())[:5]:
        image.unlink()
    for folder in (tree / "train" / "truck", tree / "test" / "truck"):
        for image in folder.iterdir():
            image.unlink()
        folder.rmdir()
    with pytest.raises(ValueError, match="has no train images of class truck: every class of CIFAR-10 needs"):
        load_cifar10(tree)
    (tree / "train" / "truck").mkdir()
    (tree / "test" / "truck").mkdir()
    for i, image in enumerate(sorted((tree / "train" / "ship").iterdir())[:3]):
        image.rename(tree / "train" / "truck" / f"x{i}.jpg")
    with pytest.raises(ValueError, match="has no test images of class truck"):
        load_cifar10(tree)
    for i, image in enumerate(sorted((tree / "test" / "ship").iterdir())[:2]):
        image.rename(tree / "test" / "truck" / f"x{i}.jpg")
    after = load_cifar10(tree)
    assert before.train_images.shape[0] == 2000
    assert after.train_images.shape[0] == 2000 - 200 - 5 and after.test_images.shape[0] == 450
    assert after.train_labels.bincount()[CLASSES.index("truck")] == 3


def test_torchvision_batches_that_would_run_code_are_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": Payload(), "labels": [0]}, f)
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 python batch.*refusing to load posix.mkdir"):
        load_cifar10(tmp_path)
    assert not marker.exists()


def test_inputs_are_in_unit_range_unless_normalized():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.equal(to_inputs(images), images.float() / 255)
    standardized = to_inputs(images, standardize=True)
    assert standardized.min() < 0 and standardized.max() > 1  # mean/std standardisation


def test_normalize_is_recorded_in_the_checkpoint_and_used_by_eval(tmp_path):
    summary = train(small_config(tmp_path, epochs=1, normalize=True), progress=False, log=lambda *_: None)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["config"]["normalize"] is True
    result = evaluate_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert result["test_acc"] == pytest.approx(summary["best_test_acc"])
    ckpt["config"]["normalize"] = False  # the same weights fed [0, 1] inputs: another loss
    save_checkpoint(ckpt, tmp_path / "flipped.pt")
    assert evaluate_checkpoint(str(tmp_path / "flipped.pt"))["test_loss"] != pytest.approx(result["test_loss"])


def test_learning_rate_schedules():
    paper = TrainConfig(model="dcn-ode", lr=0.1)
    sigma_ji = TrainConfig(model="dcn-sigma-ji", lr=0.1)
    assert [lr_at(paper, e, 100) for e in (0, 39, 40, 69, 70, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3])
    # The official σ^ji script: x0.1 at epochs 80, 140, 200 of its 100 (only the first falls inside the run).
    assert [lr_at(sigma_ji, e, 100) for e in (0, 79, 80, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    # Another length scales the drops with it: 80 %, 140 %, 200 % of the epochs.
    assert [lr_at(sigma_ji, e, 10) for e in (7, 8)] == pytest.approx([0.1, 0.01])
    assert [lr_at(paper, e, 10) for e in (3, 4, 7)] == pytest.approx([0.1, 0.01, 1e-3])
    # --lr-drops: the run's own fractions, or none (the sample's default: a constant lr).
    assert [lr_at(TrainConfig(lr=0.1, lr_drops=[0.5]), e, 4) for e in (0, 1, 2, 3)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert [lr_at(TrainConfig(lr=0.1, lr_drops=()), e, 2) for e in (0, 1)] == pytest.approx([0.1, 0.1])
    assert [lr_at(TrainConfig(lr=0.1, lr_drops=[0.25, 0.5]), e, 4) for e in (0, 1, 2)] == pytest.approx([0.1, 0.01, 1e-3])
    # An explicit schedule (the reconstruction experiment's) wins over the run's.
    assert lr_at(TrainConfig(lr=0.1, lr_drops=()), 1, 2, (0.5,)) == pytest.approx(0.01)
    assert TrainConfig(lr_drops=[0.5]).lr_drops == (0.5,)  # lists (CLI, checkpoints) as tuples
    # A fraction whose product rounds just below an integer drops at that integer (0.57 × 100 = 56.999…).
    drop = TrainConfig(lr=0.1, lr_drops=(0.57,))
    assert [lr_at(drop, e, 100) for e in (56, 57)] == pytest.approx([0.1, 0.01])


def test_changed_lr_drops_are_compared_as_they_act():
    """The model's default schedule spelled out is no change; a real one is shown as the CLI takes it."""
    assert changed_settings(TrainConfig(), TrainConfig(lr_drops=[0.4, 0.7])) == []
    sigma_ji = TrainConfig(model="dcn-sigma-ji")
    assert changed_settings(sigma_ji, TrainConfig(model="dcn-sigma-ji", lr_drops=(0.8, 1.4, 2))) == []
    assert changed_settings(TrainConfig(lr_drops=(0.5,)), TrainConfig(lr_drops=())) == ["--lr-drops 0.5 -> (none)"]


def test_sample_run_keeps_its_learning_rate():
    """The sample's two epochs at a constant lr (2 × 100 steps: 26.4 %, README); the paper's drops would
    put its second epoch at 1e-3 (21.4 %)."""
    config = TrainConfig(**SAMPLE_DEFAULTS)
    assert config.lr_drops == () and config.epochs == 2
    assert [lr_at(config, e, config.epochs) for e in (0, 1)] == [config.lr, config.lr]


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"weight_decay": float("nan")}, "--weight-decay must be a finite number >= 0, got nan"),
        ({"weight_decay": float("inf")}, "--weight-decay must be a finite number >= 0, got inf"),
        ({"weight_decay": -1e-4}, "--weight-decay must be a finite number >= 0"),
        ({"momentum": float("nan")}, "--momentum must be in [0, 1), got nan"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"lr": float("inf")}, "--lr must be a finite number > 0, got inf"),
        ({"rtol": float("nan")}, "--rtol must be a finite number > 0, got nan"),
        ({"atol": float("inf")}, "--atol must be a finite number > 0, got inf"),
        ({"seed": -1}, "--seed must be in 0..2**32-1"),
        ({"gradient": "guess"}, "--gradient must be one of checkpoint, adjoint, backprop"),
        ({"gradient": "adjoint", "replay": "stage"}, "--replay must be one of step, stage and needs --gradient"),
        ({"replay": "all"}, "--replay must be one of step, stage"),
        ({"gradient": "backprop", "seminorm": True}, "--seminorm applies to --gradient adjoint only"),
        ({"solver": "scipy"}, "--solver must be one of dcn_fast, torchdiffeq, got 'scipy'"),
        ({"T": 0.0}, "--T must be a finite number > 0"),
        ({"T": float("nan")}, "--T must be a finite number > 0"),
        ({"model": "resnet-blocks", "T": 2.0}, "--T sets the end time of ODE blocks; resnet-blocks has none"),
        ({"test_images_per_class": 0}, "--test-images-per-class must be in 1..1000"),
        ({"lr_drops": [0.4, -0.7]}, "--lr-drops must be fractions of the epochs > 0, got [0.4, -0.7]"),
        ({"lr_drops": [float("nan")]}, "--lr-drops must be fractions of the epochs > 0, got [nan]"),
        ({"lr_drops": 0.5}, "--lr-drops must be fractions of the epochs > 0, got 0.5"),
        ({"lr_drops": "0.5"}, "--lr-drops must be fractions of the epochs > 0, got '0.5'"),
        ({"lr_drops": [True]}, "--lr-drops must be fractions of the epochs > 0, got [True]"),
    ],
)
def test_settings_out_of_range_are_refused(setting, message, tmp_path):
    with pytest.raises(ValueError) as exc:
        train(small_config(tmp_path, **setting), progress=False, log=lambda *_: None)
    assert message in str(exc.value)
    assert not (tmp_path / "run").exists()


def test_finished_run_trains_nothing(tmp_path):
    train(small_config(tmp_path, epochs=1), progress=False, log=lambda *_: None)
    before = (tmp_path / "run" / "last.pt").read_bytes()
    messages = []
    summary = train(TrainConfig.from_run(str(tmp_path / "run")), progress=False, log=messages.append)
    assert any("has finished (1 of 1 epochs); nothing to train" in m for m in messages)
    assert not any(m.startswith("epoch ") for m in messages)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before
    assert summary["epochs"] == 1 and summary["epochs_done"] == 1


def test_the_kernel_build_is_announced_before_training(tmp_path):
    messages = []
    train(small_config(tmp_path, images_per_class=2, epochs=1, batch_size=20), progress=False, log=messages.append)
    kernel = next(i for i, m in enumerate(messages) if m.startswith("loading the C++ CPU kernel"))
    first_epoch = next(i for i, m in enumerate(messages) if m.startswith("epoch 1/1"))
    assert kernel < first_epoch


def test_summary_json_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_json({"run": 1}, path)

    def dump_then_fail(obj, f, **kwargs):
        f.write('{"run": ')
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(json, "dump", dump_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_json({"run": 2}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_model_options_and_gradient_mode_reach_the_model(tmp_path):
    """--T / --activation (Table A.1's controls) and --gradient / --replay build what they say."""
    from dcn_fast.train import _build_model

    model = _build_model(small_config(tmp_path, model="odenet", T=2.0, activation="celu", replay="stage"))
    assert TrainConfig.gradient == "checkpoint"
    assert [(b.T, b.gradient, b.replay) for b in model.ode_blocks()] == [(2.0, "checkpoint", "stage")] * 3
    assert any(isinstance(m, torch.nn.CELU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert {b.solver for b in model.ode_blocks()} == {"dcn_fast"}  # the default
    model = _build_model(small_config(tmp_path, model="dcn-ode", solver="torchdiffeq"))
    assert {b.solver for b in model.ode_blocks()} == {"torchdiffeq"}


def test_test_images_per_class_evaluates_a_fixed_subset(tmp_path):
    """The run evaluates n test images of each class (the same for every seed); eval takes the whole set."""
    summary = train(small_config(tmp_path, epochs=1, test_images_per_class=7), progress=False, log=lambda *_: None)
    acc = summary["best_test_acc"]
    assert round(acc * 70) == pytest.approx(acc * 70, abs=1e-9)
    model, config, _ = load_model(tmp_path / "run" / "best.pt")
    images, labels = eval_split(load_cifar10(None), config)
    assert torch.bincount(labels).tolist() == [7] * 10
    assert evaluate(model, images, labels, config)["acc"] == pytest.approx(acc)
    other = eval_split(load_cifar10(None), replace(config, seed=5))[1]
    assert torch.equal(other, labels)


def test_evaluate_applies_the_transform_and_counts_nfe():
    data = load_cifar10(None)
    images, labels = data.test_images[:40], data.test_labels[:40]
    torch.manual_seed(0)
    model = build("odenet", rtol=0.1, atol=0.1).eval()
    config = TrainConfig(model="odenet", eval_batch_size=16)
    plain = evaluate(model, images, labels, config)
    assert evaluate(model, images, labels, config, transform=lambda x: x) == plain
    flipped = evaluate(model, images, labels, config, transform=lambda x: x.flip(-1))
    assert flipped["loss"] != plain["loss"]
    # Three batches (16, 16, 8): the mean NFE is at most the largest, and both count all three blocks.
    assert 3 * 2 <= plain["nfe_forward_mean"] <= plain["nfe_forward"]


def test_load_model_refuses_a_model_not_accepted(tmp_path):
    train(small_config(tmp_path, epochs=1), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="holds model 'resnet-srf-blocks'; this needs one of: dcn-ode, odenet"):
        load_model(tmp_path / "run" / "last.pt", models=("dcn-ode", "odenet"))
    model, config, ckpt = load_model(tmp_path / "run" / "last.pt", models=("resnet-srf-blocks",))
    assert not model.training and config.model == "resnet-srf-blocks" and ckpt["epoch"] == 1


def test_triton_backend_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="--backend triton runs on CUDA devices only, got --device cpu"):
        train(small_config(tmp_path, backend="triton", device="cpu"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
