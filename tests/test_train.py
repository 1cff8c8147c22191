"""Training: it learns, checkpoints round-trip, a killed run resumes exactly, runs are repeatable,
every precision trains, and bad settings get one line and exit code 2. Runs pin the CPU and
deterministic algorithms; the precision is $MNIST_PRECISION's (CI runs these tests under both CPU
numerics paths)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, make_table

import dataset
import model as models
import train

pytestmark = pytest.mark.numerics

SAMPLE_TRAIN = str(dataset.SAMPLE_DIR / "mnist_train.csv.gz")
SAMPLE_TEST = str(dataset.SAMPLE_DIR / "mnist_test.csv.gz")


def quick_args(tmp_path, *extra: str) -> list[str]:
    return [
        "--train", SAMPLE_TRAIN, "--no-plots", "--quiet", "--device", "cpu", "--deterministic",
        "--model-dir", str(tmp_path / "models"), "--out-dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip


def test_a_short_run_on_real_digits_clearly_learns(tmp_path):
    args = quick_args(tmp_path, "--test", SAMPLE_TEST, "--epochs", "3", "--max-rows", "1500")
    summary = train.main([*args, "--arch", "strong"])
    # observed: 91-93% validation and test accuracy after 3 epochs on 1,350 digits; chance is 10%
    assert summary["best_val_acc"] > 0.8 and summary["test_acc"] > 0.8
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["test_acc"] == summary["test_acc"] and metrics["config"]["arch"] == "strong"
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds")
    assert len(history) == 4


def test_checkpoint_holds_what_is_needed_to_use_the_model(tmp_path):
    train.main(quick_args(tmp_path, "--epochs", "1", "--max-rows", "300", "--arch", "basic"))
    ckpt = models.load_checkpoint(tmp_path / "models" / "best.pt")
    assert ckpt["arch"] == "basic" and ckpt["class_names"] == list("0123456789")
    assert 0.1 < ckpt["mean"] < 0.16 and ckpt["epoch"] == 1 and "val_acc" in ckpt["metrics"]
    assert ckpt["versions"]["torch"] == str(torch.__version__)
    net = models.model_from_checkpoint(ckpt).eval()
    x = torch.randn(4, 1, 28, 28)
    reference = models.build("basic")
    reference.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(net(x), reference.eval()(x))
    last = models.load_checkpoint(tmp_path / "models" / "last.pt")
    assert {"optimizer", "scheduler", "rng", "history"} <= last.keys()
    # the leak guard's fingerprint: one hash per distinct row the run learned from
    rows = dataset.load_csv(SAMPLE_TRAIN).images[:300]
    train_hashes, val_hashes = (ckpt["seen_rows"][k].numpy() for k in ("train", "val"))
    assert len(train_hashes) == 270 and len(val_hashes) == 30
    assert set(dataset.row_hashes(rows).view(np.int64)) == {*train_hashes, *val_hashes}


@pytest.mark.parametrize(
    ("precision", "described"),
    [("fp32", "cpu, fp32,"), ("bf16", "cpu, bfloat16,"), ("fp16", "cpu, float16 + grad scaler,")],
)
def test_every_precision_trains_on_the_cpu(tmp_path, capsys, precision, described):
    args = quick_args(tmp_path, "--epochs", "2", "--max-rows", "320", "--batch-size", "32")
    train.main([*args, "--arch", "lenet", "--precision", precision])  # fp16 is slow on a CPU
    assert described in capsys.readouterr().out
    last = models.load_checkpoint(tmp_path / "models" / "last.pt")
    assert last["config"]["precision"] == precision
    assert (last["scaler"] is not None) == (precision == "fp16")  # fp16 scales its loss
    assert all(w.isfinite().all() for w in last["state_dict"].values() if w.is_floating_point())
    first, second = last["history"]
    assert second["train_loss"] < first["train_loss"]


def test_an_ensemble_trains_differently_seeded_members(tmp_path, capsys):
    args = quick_args(tmp_path, "--epochs", "1", "--max-rows", "300", "--arch", "basic")
    summary = train.main([*args, "--ensemble", "2", "--seed", "5"])
    assert len(summary["members"]) == 2
    a, b = (models.load_checkpoint(tmp_path / "models" / f"seed{s}" / "best.pt") for s in (5, 6))
    assert (a["config"]["seed"], b["config"]["seed"]) == (5, 6)
    assert not torch.equal(a["state_dict"]["0.weight"], b["state_dict"]["0.weight"])
    assert (tmp_path / "out" / "seed6" / "metrics.json").is_file()
    out = capsys.readouterr().out
    assert f"--checkpoint {tmp_path}/models/seed5/best.pt {tmp_path}/models/seed6/best.pt" in out


def test_the_recipe_follows_preset_and_task_and_given_flags_win(tmp_path, write_csv, monkeypatch):
    import plots

    curve_titles = []
    draw_curves = plots.training_curves

    def recording_curves(history, path, training_batches):
        curve_titles.append(training_batches)
        return draw_curves(history, path, training_batches)

    monkeypatch.setattr(plots, "training_curves", recording_curves)
    fashion = write_csv("fashion.csv", make_table(200), "fashion-mnist")
    runs = {
        "digits": quick_args(tmp_path / "digits", "--epochs", "1", "--max-rows", "300"),
        "fashion": [*quick_args(tmp_path / "fashion", "--epochs", "1"), "--train", str(fashion)],
        "fast": [
            "--train", SAMPLE_TRAIN, "--quiet", "--device", "cpu", "--deterministic",
            "--model-dir", str(tmp_path / "fast" / "models"),
            "--out-dir", str(tmp_path / "fast" / "out"), "--max-rows", "300",
            "--preset", "fast", "--lr", "2e-3",
        ],
    }  # fmt: skip
    for args in runs.values():
        train.main(args)
    config = {
        name: models.load_checkpoint(tmp_path / name / "models" / "best.pt")["config"]
        for name in runs
    }
    recipe = ("arch", "epochs", "batch_size", "lr", "augment")
    unset = train.with_recipe(train.parse_args([]), dataset.DIGIT_CLASSES)
    assert [unset[k] for k in recipe] == ["strong", 15, 128, 3e-3, True]
    assert [config["digits"][k] for k in recipe] == ["strong", 1, 128, 3e-3, True]
    assert [config["fashion"][k] for k in recipe] == ["wide", 1, 128, 3e-3, True]
    assert [config["fast"][k] for k in recipe] == ["basic_bn", 6, 256, 2e-3, False]
    history = (tmp_path / "fast" / "out" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 6
    figures = {path.name for path in (tmp_path / "fast" / "out").glob("*.png")}
    assert figures == {"sample_images.png", "class_distribution.png", "training_curves.png"}
    assert curve_titles == ["dropout on, label-smoothed loss"]  # no augmented batches to claim


def _history_without_timing(path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    return [row[:-1] for row in rows]  # the last column is seconds


def test_same_seed_gives_the_same_history(tmp_path):
    for run in ("a", "b"):
        train.main(quick_args(tmp_path / run, "--epochs", "2", "--max-rows", "400"))
    a = _history_without_timing(tmp_path / "a" / "out" / "history.csv")
    assert a == _history_without_timing(tmp_path / "b" / "out" / "history.csv")


def _train_process(tmp_path, run: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-u", str(ROOT / "train.py")]
    if not extra:
        cmd += quick_args(tmp_path / run, "--epochs", "6", "--max-rows", "800", "--arch", "basic")
    return subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, text=True, env=os.environ)


def test_a_run_killed_after_an_epoch_resumes_to_identical_weights(tmp_path):
    killed = _train_process(tmp_path, "killed")
    for line in killed.stdout:
        if line.startswith("epoch   2/6"):
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "models" / "last.pt"
    assert 2 <= models.load_checkpoint(last)["epoch"] < 6, "the kill came after the run finished"
    resumed = _train_process(
        tmp_path, "killed", "--resume", str(last), "--quiet", "--no-plots", "--device", "cpu",
        "--deterministic",
    )  # fmt: skip
    assert resumed.wait() == 0
    whole = _train_process(tmp_path, "whole")
    assert whole.wait() == 0
    a = models.load_checkpoint(last)
    b = models.load_checkpoint(tmp_path / "whole" / "models" / "last.pt")
    assert a["epoch"] == b["epoch"] == 6
    for name, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], tensor), name
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


def _bad(tmp_path, write_csv):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(256))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    unlabelled = write_csv("u.csv", make_table(30, labelled=False), "digit-recognizer-test")
    return [
        (["--arch", "resnet999"], "--arch resnet999: unknown architecture"),
        (["--epochs", "0"], "--epochs 0: must be at least 1"),
        (["--ensemble", "0"], "--ensemble 0: must be at least 1"),
        (["--val-split", "1.5"], "--val-split 1.5: must be between 0 and 1"),
        (["--val-split", "0"], "--val-split 0.0: must be between 0 and 1"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--resume", str(tmp_path / "nope.pt")], "nope.pt: no such checkpoint"),
        (["--resume", str(corrupt)], "corrupt.pt: not a loadable checkpoint"),
        (["--resume", str(foreign)], "foreign.pt: not a checkpoint of this project"),
        (["--train", str(unlabelled)], "u.csv: has no label column"),
        (["--device", "tpu"], "--device tpu: unknown device"),
    ]


def test_bad_settings_get_one_line_and_exit_2(tmp_path, write_csv, capsys):
    for extra, expected in _bad(tmp_path, write_csv):
        with pytest.raises(SystemExit) as exit_info:
            dataset.run_cli(train.main, [*quick_args(tmp_path), *extra])
        assert exit_info.value.code == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert expected in err, (extra, err)


def test_resuming_a_best_checkpoint_or_incompatible_weights_is_refused(tmp_path, capsys):
    train.main(quick_args(tmp_path, "--epochs", "1", "--max-rows", "300", "--arch", "basic"))
    best = tmp_path / "models" / "best.pt"
    last = models.load_checkpoint(tmp_path / "models" / "last.pt")
    mismatched = tmp_path / "mismatched.pt"
    models.save_checkpoint(mismatched, {**last, "arch": "lenet"})
    for path, expected in ((best, "not resumable"), (mismatched, "weights do not fit lenet")):
        with pytest.raises(SystemExit) as exit_info:
            dataset.run_cli(train.main, ["--resume", str(path)])
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
