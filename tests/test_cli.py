"""The command line under bad input and interrupted runs: one-line errors (exit 2),
no code run from files, no empty folders left, resume that resumes."""

import json
import os
from dataclasses import asdict

import pytest
import torch

from dcn_fast import cli
from dcn_fast import train as train_module
from dcn_fast.runfiles import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from dcn_fast.data import sample_archive
from dcn_fast.models import build
from dcn_fast.train import TrainConfig

# A small, fast run: 100 images (2 steps of 50), 500 test images in 2 batches.
# The protocol's lr drops, explicitly: a sample run's default is a constant lr.
SMALL = ["--model", "resnet-srf-blocks", "--images-per-class", "10", "--batch-size", "50", "--lr", "0.05",
         "--lr-drops", "0.4", "0.7", "--seed", "1", "--eval-batch-size", "250", "--no-progress"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DCN_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def one_line_error(capsys, argv, status=2) -> str:
    """Run the CLI, expect ``status`` and a one-line message on stderr; return it."""
    assert cli.main(argv) == status
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def read_metrics(folder):
    with open(folder / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def checkpoint_file(path, model_state, model="resnet-srf-blocks", **config):
    save_checkpoint(
        {"format": CHECKPOINT_FORMAT, "config": asdict(TrainConfig(model=model, **config)), "epoch": 1, "epochs": 1,
         "model_state": model_state, "optimizer_state": {}, "best": {"acc": 0.1, "epoch": 1}, "history": []},
        path,
    )
    return path


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_a_checkpoint_that_would_run_code_is_refused(command, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"model": "dcn-ode"}, "payload": Payload(marker)},
               run / "last.pt")
    argv = (["eval", "--checkpoint", str(run / "last.pt")] if command == "eval"
            else ["train", "--resume", "--out", str(run)])
    err = one_line_error(capsys, argv)
    assert "is not a readable dcn_fast checkpoint" in err and "could run code" in err
    assert not marker.exists()


def test_a_text_file_as_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "junk.pt").write_text("junk\n")
    err = one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path / "junk.pt")])
    assert "is not a readable dcn_fast checkpoint" in err


def test_checkpoints_load_weights_only(tmp_path):
    path = checkpoint_file(tmp_path / "c.pt", build("resnet-srf-blocks").state_dict())
    assert load_checkpoint(path)["config"]["model"] == "resnet-srf-blocks"
    torch.load(path, weights_only=True)  # plain values and tensors only


def test_format_1_checkpoints_were_normalized(tmp_path):
    path = checkpoint_file(tmp_path / "c.pt", {})
    ckpt = torch.load(path, weights_only=True)
    ckpt["format"] = 1
    del ckpt["config"]["normalize"]
    save_checkpoint(ckpt, path)
    assert load_checkpoint(path)["config"]["normalize"] is True


def fake_archive(tmp_path):
    path = tmp_path / "fake.tar.xz"
    path.write_bytes(b"this is no archive" * 100)
    return path


def truncated_archive(tmp_path):
    data = sample_archive().read_bytes()
    path = tmp_path / "truncated.tar.xz"
    path.write_bytes(data[: len(data) // 2])
    return path


def corrupted_archive(tmp_path):
    data = bytearray(sample_archive().read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path = tmp_path / "corrupted.tar.xz"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", [fake_archive, truncated_archive, corrupted_archive])
def test_unreadable_data_is_one_line_and_leaves_no_folder(make, tmp_path, capsys):
    archive = make(tmp_path)
    out = tmp_path / "out"
    err = one_line_error(capsys, ["train", "--data-root", str(archive), "--out", str(out), "--no-progress"])
    assert f"{archive} is not a readable CIFAR-10 JPEG tree or archive" in err
    assert not out.exists()


def test_missing_data_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "out"
    err = one_line_error(capsys, ["train", "--data-root", str(tmp_path / "nothing"), "--out", str(out)])
    assert "no CIFAR-10 under" in err and not out.exists()


def test_out_naming_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    err = one_line_error(capsys, ["train", "--out", str(target)])
    assert f"--out {target} is a file" in err


def test_a_folder_given_as_checkpoint(tmp_path, capsys):
    err = one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path)])
    assert f"checkpoint {tmp_path} is a folder" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--device", "tpu"], "--device 'tpu' is not a device"),
        (["train", "--device", "meta"], "--device meta holds no data"),
        (["train", "--device", "cuda:0"], "--device cuda:0: CUDA is not available"),
        (["bench-layer", "--device", "cuda"], "--device cuda: CUDA is not available"),
        (["bench-layer", "--device", "gpu"], "--device 'gpu' is not a device"),
    ],
)
def test_devices_this_machine_lacks(argv, message, tmp_path, capsys):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "out")]
    assert message in one_line_error(capsys, argv)
    assert not (tmp_path / "out").exists()


def test_eval_device_tpu(tmp_path, capsys):
    path = checkpoint_file(tmp_path / "c.pt", build("resnet-srf-blocks").state_dict())
    assert "--device 'tpu' is not a device" in one_line_error(capsys, ["eval", "--checkpoint", str(path), "--device", "tpu"])


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0, got nan"),
        ("--momentum", "2", "--momentum must be in [0, 1), got 2.0"),
        ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
        ("--rtol", "nan", "--rtol must be a finite number > 0, got nan"),
    ],
)
def test_cli_settings_out_of_range(option, value, message, tmp_path, capsys):
    assert message in one_line_error(capsys, ["train", option, value, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_eval_of_weights_that_belong_to_another_model(tmp_path, capsys):
    path = checkpoint_file(tmp_path / "c.pt", build("resnet-blocks").state_dict(), model="resnet-srf-blocks")
    err = one_line_error(capsys, ["eval", "--checkpoint", str(path)])
    assert f"the weights in {path} do not fit model 'resnet-srf-blocks'" in err


def test_solver_underflow_names_the_block_and_the_cause(tmp_path, capsys):
    model = build("odenet")
    with torch.no_grad():
        model.stage2.func.conv1.layer.weight.fill_(float("nan"))
    path = checkpoint_file(tmp_path / "c.pt", model.state_dict(), model="odenet")
    err = one_line_error(capsys, ["eval", "--checkpoint", str(path), "--batch-size", "10", "--no-progress"])
    assert "step size underflowed in ODE block 'stage2' while evaluating: its weights are not finite" in err


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    real, calls = train_module.to_inputs, []

    def poison_epoch_2_step_1(images, standardize=False):
        calls.append(images.shape[0])
        x = real(images, standardize)
        # Calls per epoch: 2 training steps of 50, then 2 test batches of 250.
        return x * float("nan") if len(calls) == 5 else x

    monkeypatch.setattr(train_module, "to_inputs", poison_epoch_2_step_1)
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", *SMALL, "--epochs", "3", "--out", str(out)])
    assert calls[4] == 50
    assert "training loss is nan at epoch 2, step 1 of 2: stopped" in err
    assert f"the last good checkpoint, {out / 'last.pt'}, holds epoch 1" in err
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert len(read_metrics(out)) == 1 and not (out / "summary.json").exists()
    assert "best test accuracy" not in capsys.readouterr().out


def test_resume_restores_the_run_and_its_metrics(tmp_path, capsys, monkeypatch):
    """The issue's case: resnet-srf-blocks, 4 epochs, killed after epoch 2 between
    writing the checkpoint and appending the metrics line, resumed with --resume --out only."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli.main(["train", *SMALL, "--epochs", "4", "--out", str(straight)]) == 0

    real_append, appended = train_module.append_metrics, []

    def append_or_die(record, path):
        appended.append(record["epoch"])
        if record["epoch"] == 2:
            raise KeyboardInterrupt("killed after the checkpoint of epoch 2, before its metrics line")
        real_append(record, path)

    monkeypatch.setattr(train_module, "append_metrics", append_or_die)
    # Interrupted: one line that says how to go on, exit status 130.
    assert cli.main(["train", *SMALL, "--epochs", "4", "--out", str(killed)]) == 130
    assert capsys.readouterr().err == ("dcn-fast train: interrupted; continue from the last checkpoint with "
                                       "dcn-fast train --resume --out <its folder>\n")
    monkeypatch.setattr(train_module, "append_metrics", real_append)
    assert load_checkpoint(killed / "last.pt")["epoch"] == 2 and len(read_metrics(killed)) == 1
    capsys.readouterr()

    assert cli.main(["train", "--resume", "--out", str(killed), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming resnet-srf-blocks" in out and "after epoch 2" in out and "changed settings" not in out
    assert "4 epochs of 2 steps" in out and "(epoch" in out and "of 4)" in out

    def without_time(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert without_time(read_metrics(killed)) == without_time(read_metrics(straight))
    a = load_checkpoint(straight / "last.pt")["model_state"]
    b = load_checkpoint(killed / "last.pt")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["epochs"] == 4 and summary["epochs_done"] == 4 and summary["train_images"] == 100

    # Finished: says so, trains nothing, exit 0.
    assert cli.main(["train", "--resume", "--out", str(killed), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has finished (4 of 4 epochs); nothing to train" in out and "epoch 5" not in out
    assert len(read_metrics(killed)) == 4

    # Options given explicitly override the saved ones, and the change is reported.
    assert cli.main(["train", "--resume", "--out", str(killed), "--epochs", "5", "--lr", "0.01", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming with changed settings: --epochs 4 -> 5, --lr 0.05 -> 0.01" in out
    assert [m["epoch"] for m in read_metrics(killed)] == [1, 2, 3, 4, 5]
    assert read_metrics(killed)[-1]["lr"] == pytest.approx(0.01 * 0.1**2)  # epoch 5 of 5: past both drops


def test_resume_cannot_change_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *SMALL, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["train", "--resume", "--out", str(out), "--model", "resnet-blocks"])
    assert "holds model 'resnet-srf-blocks', not 'resnet-blocks'" in err


def test_a_run_stopped_in_its_first_epoch_leaves_no_folder(tmp_path, capsys, monkeypatch):
    real = train_module.to_inputs
    monkeypatch.setattr(train_module, "to_inputs", lambda images, standardize=False: real(images, standardize) * float("nan"))
    out = tmp_path / "run"
    err = one_line_error(capsys, ["train", *SMALL, "--epochs", "2", "--out", str(out)])
    assert "training loss is nan at epoch 1, step 1 of 2: stopped; no checkpoint was written" in err
    assert not out.exists()


# --- argument types (dcn_fast/arguments.py), shared by the CLI, the experiments and convert ---------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench-layer", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["bench-layer", "--sigmas", "40"], "argument --sigmas: sigma must be in [0.1, 30], got 40.0"),
        (["train", "--epochs", "-3"], "argument --epochs: must be >= 1, got -3"),
        (["experiment", "scales", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["experiment", "scales", "--lr", "-1"], "argument --lr: must be a finite number > 0, got -1"),
    ],
)
def test_argument_types_give_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "(see dcn-fast" in err, err


def _imports(path, package: str) -> set[str]:
    """The dcn_fast modules ``path`` imports, anywhere in it (inside functions too)."""
    import ast

    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            modules.add(name)
            modules.update(f"{name}.{alias.name}" for alias in node.names)
    return {m for m in modules if m.split(".")[0] == "dcn_fast"}


def test_the_package_has_no_import_circle():
    """No dcn_fast module imports, even lazily, one that leads back to it (the CLI imports the experiments,
    which take their argument types from dcn_fast.arguments, not from the CLI)."""
    import pathlib

    import dcn_fast

    root = pathlib.Path(dcn_fast.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = (path, name if parts[-1] == "__init__" else ".".join(parts[:-1]))
    graph = {name: {m for m in _imports(path, package) if m in files and m != name}
             for name, (path, package) in files.items()}
    # A package's own __init__ is imported on the way to any of its modules: not an edge of a circle.
    graph = {name: {m for m in edges if not name.startswith(m + ".")} for name, edges in graph.items()}
    state, circle = {}, []

    def visit(name, path):
        state[name] = "open"
        for nxt in sorted(graph[name]):
            if state.get(nxt) == "open":
                circle.extend(path[path.index(nxt):] + [nxt])
                return True
            if nxt not in state and visit(nxt, path + [nxt]):
                return True
        state[name] = "done"
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert not circle, " -> ".join(circle)
    assert "dcn_fast.arguments" in graph["dcn_fast.experiments.common"]
    assert "dcn_fast.cli" not in graph["dcn_fast.experiments.common"]
