"""Training: it learns, checkpoints hold what predicting needs, the recipe follows preset, task
and flags, a killed run resumes exactly, runs are repeatable, every precision trains, and bad
settings get one line and exit code 2. Runs pin the CPU and deterministic algorithms; the
precision is $MNIST_PRECISION's (CI runs these tests on both CPU numerics paths)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE_TEST, SAMPLE_TRAIN, csv_text, make_table, run_flags

import cli
import config
import dataset
import ema
import model
import parallel
import train
from cli import run_cli

pytestmark = pytest.mark.numerics

RECIPE = ("arch", "epochs", "batch_size", "lr", "augment", "augment_strength")


def quick_args(folder, *extra: str) -> list[str]:
    """Flags for a short deterministic run on the sample, writing under `folder`."""
    return run_flags(folder, "--train", SAMPLE_TRAIN, "--deterministic", *extra)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """`strong` for 3 epochs on 1,350 real digits, scored on the sample's 1,000 test digits."""
    folder = tmp_path_factory.mktemp("learned")
    args = quick_args(folder, "--test", SAMPLE_TEST, "--epochs", "3", "--max-rows", "1500")
    return train.main([*args, "--arch", "strong"]), folder


def test_a_short_run_on_real_digits_clearly_learns(learned):
    summary, _ = learned
    # observed: 91-93% validation and test accuracy after 3 epochs on 1,350 digits; chance is 10%
    assert summary["best_val_acc"] > 0.8
    assert summary["test_acc"] > 0.8


def test_metrics_json_holds_the_summary_and_the_config(learned):
    summary, folder = learned
    metrics = json.loads((folder / "out" / "metrics.json").read_text())
    assert metrics["test_acc"] == summary["test_acc"]
    assert metrics["config"]["arch"] == "strong"
    assert metrics["numerics"].startswith("cpu, ")  # the path a figure was measured on
    assert 0 < metrics["train_seconds"] < metrics["wall_seconds"]


def test_calibration_fits_a_temperature_that_lowers_the_validation_nll(learned):
    summary, folder = learned
    fit = summary["calibration"]
    assert fit["val_nll_after"] <= fit["val_nll_before"]
    assert model.load_checkpoint(folder / "models" / "best.pt")["temperature"] == pytest.approx(
        fit["temperature"], rel=1e-3
    )


def test_the_history_has_a_row_per_epoch(learned):
    _, folder = learned
    history = (folder / "out" / "history.csv").read_text().splitlines()
    assert history[0].split(",") == [
        *("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_loss_calibrated"),
        *("lr", "seconds", "images_per_s"),
    ]
    assert len(history) == 1 + 3


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """best.pt and last.pt of one epoch of `basic` on the sample's first 300 rows."""
    folder = tmp_path_factory.mktemp("one-epoch")
    train.main(quick_args(folder, "--epochs", "1", "--max-rows", "300", "--arch", "basic"))
    return {name: folder / "models" / f"{name}.pt" for name in ("best", "last")}


def test_a_checkpoint_names_its_architecture_classes_and_epoch(one_epoch):
    ckpt = model.load_checkpoint(one_epoch["best"])
    assert (ckpt["arch"], ckpt["class_names"], ckpt["epoch"]) == ("basic", list("0123456789"), 1)


def test_a_checkpoint_holds_its_normalization_metrics_and_versions(one_epoch):
    ckpt = model.load_checkpoint(one_epoch["best"])
    assert 0.1 < ckpt["mean"] < 0.16  # MNIST's: 0.1307
    assert "val_acc" in ckpt["metrics"]
    assert ckpt["versions"]["torch"] == str(torch.__version__)


def test_the_network_rebuilt_from_a_checkpoint_computes_what_it_did(one_epoch):
    ckpt = model.load_checkpoint(one_epoch["best"])
    reference = model.build("basic")
    reference.load_state_dict(ckpt["state_dict"])
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(model.model_from_checkpoint(ckpt).eval()(x), reference.eval()(x))


def first_300_split() -> tuple[int, int]:
    """The training and validation rows of the sample's first 300 rows, split as a run does."""
    labels = dataset.load_csv(SAMPLE_TRAIN).labels[:300]
    train_rows, val_rows = dataset.stratified_split(labels, 0.1, seed=0)
    assert len(val_rows) in (29, 30, 31)  # 10%, stratified: rounded per class
    return len(train_rows), len(val_rows)


def test_best_pt_holds_its_history_and_training_data_for_the_report(one_epoch):
    ckpt = model.load_checkpoint(one_epoch["best"])
    assert [row["epoch"] for row in ckpt["history"]] == [1]
    train_rows, val_rows = first_300_split()
    assert ckpt["data"] == {"source": SAMPLE_TRAIN, "train_rows": train_rows, "val_rows": val_rows}


def test_last_pt_holds_what_resuming_needs(one_epoch):
    last = model.load_checkpoint(one_epoch["last"])
    assert {"optimizer", "scheduler", "scaler", "rng", "history", "epoch"} <= last.keys()


def test_the_fingerprint_holds_a_hash_of_each_row_the_run_learned_from(one_epoch):
    fingerprint = model.load_checkpoint(one_epoch["best"])["seen_rows"]
    rows = dataset.load_csv(SAMPLE_TRAIN).images[:300]
    assert (len(fingerprint["train"]), len(fingerprint["val"])) == first_300_split()
    seen = {*fingerprint["train"].tolist(), *fingerprint["val"].tolist()}
    assert seen == set(dataset.row_hashes(rows).view(np.int64).tolist())


@pytest.mark.parametrize(
    ("precision", "described"),
    [("fp32", "cpu, fp32,"), ("bf16", "cpu, bfloat16,"), ("fp16", "cpu, float16 + grad scaler,")],
)
def test_every_precision_trains_on_the_cpu(tmp_path, capsys, precision, described):
    args = quick_args(tmp_path, "--epochs", "2", "--max-rows", "320", "--batch-size", "32")
    train.main([*args, "--arch", "lenet", "--precision", precision])  # fp16 is slow on a CPU
    assert described in capsys.readouterr().out
    last = model.load_checkpoint(tmp_path / "models" / "last.pt")
    assert last["config"]["precision"] == precision
    assert (last["scaler"] is not None) == (precision == "fp16")  # fp16 scales its loss
    assert all(w.isfinite().all() for w in last["state_dict"].values() if w.is_floating_point())
    first, second = last["history"]
    assert second["train_loss"] < first["train_loss"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Two one-epoch members, seeds 5 and 6, and what the run printed."""
    folder = tmp_path_factory.mktemp("ensemble")
    args = quick_args(folder, "--epochs", "1", "--max-rows", "300", "--arch", "basic")
    printed = io.StringIO()
    with redirect_stdout(printed):
        summary = train.main([*args, "--ensemble", "2", "--seed", "5"])
    return summary, folder, printed.getvalue()


def test_an_ensemble_writes_each_member_into_its_own_folders(ensemble):
    summary, folder, _ = ensemble
    assert len(summary["members"]) == 2
    for seed in (5, 6):
        assert (parallel.member_dir(folder / "models", seed) / "best.pt").is_file()
        assert (parallel.member_dir(folder / "out", seed) / "metrics.json").is_file()


def test_ensemble_members_are_seeded_differently(ensemble):
    _, folder, _ = ensemble
    a, b = (
        model.load_checkpoint(parallel.member_dir(folder / "models", s) / "best.pt") for s in (5, 6)
    )
    assert (a["config"]["seed"], b["config"]["seed"]) == (5, 6)
    assert not torch.equal(a["state_dict"]["0.weight"], b["state_dict"]["0.weight"])


def test_an_ensemble_prints_the_command_that_predicts_with_it(ensemble):
    _, folder, printed = ensemble
    members = f"{folder}/models/seed5/best.pt {folder}/models/seed6/best.pt"
    assert f"python predict.py --checkpoint {members}" in printed


@pytest.mark.parametrize(
    ("flags", "task", "expected"),
    [
        ([], "digits", ("strong", 15, 128, 3e-3, True, 1.0)),
        ([], "fashion", ("wide", 20, 128, 3e-3, True, 1.0)),
        (["--preset", "fast"], "digits", ("small_bn", 4, 256, 1e-2, True, 0.5)),
        (["--preset", "fast"], "fashion", ("basic_bn", 6, 256, 1e-2, False, 1.0)),
        (["--epochs", "3", "--no-augment"], "fashion", ("wide", 3, 128, 3e-3, False, 1.0)),
        (
            ["--preset", "fast", "--lr", "2e-3", "--arch", "basic", "--augment-strength", "0.8"],
            "digits",
            ("basic", 4, 256, 2e-3, True, 0.8),
        ),
    ],
)
def test_the_recipe_follows_preset_and_task_and_a_given_flag_wins(flags, task, expected):
    cfg = config.Config.for_task(config.parse_args(flags), task)
    assert tuple(getattr(cfg, key) for key in RECIPE) == expected


@pytest.mark.parametrize("arch", sorted(model.ARCHITECTURES))
def test_every_architecture_maps_digits_to_one_logit_per_class(arch):
    net = model.build(arch, num_classes=7).eval()
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 7)


def test_the_config_defaults_are_the_digit_recipe():
    defaults = ("strong", 15, 128, 3e-3, True, 1.0)
    assert tuple(getattr(config.Config(), key) for key in RECIPE) == defaults


def test_help_shows_what_each_preset_makes_of_a_recipe_flag(capsys):
    with pytest.raises(SystemExit):
        config.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "best: 15, Fashion-MNIST 20; fast: 4, Fashion-MNIST 6" in shown
    assert "(default: best: 1.0; fast: 0.5, Fashion-MNIST 1.0)" in shown


@pytest.mark.parametrize("script", ["train.py", "predict.py", "tune.py", "serve.py", "dataset.py"])
def test_help_shows_real_defaults_only(script):
    shown = subprocess.run(
        [sys.executable, str(ROOT / script), *(["download"] if script == "dataset.py" else []),
         "--help"], capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    text = " ".join(shown.split())
    assert "(default: None)" not in text
    assert "(default: [" not in text and str(ROOT) not in text  # no list, no machine's path
    assert "None:" not in text


def test_version_names_the_project_python_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config.parse_args(["--version"])
    assert exit_info.value.code == 0
    line = capsys.readouterr().out.strip()
    assert line.split()[1:3] == [cli.VERSION, "(Python"]
    assert f"torch {torch.__version__}" in line


def test_an_unlabelled_test_csv_given_is_named_as_not_scored(tmp_path, capsys):
    (tmp_path / "test.csv").write_text(csv_text(make_table(20, labelled=False), None))
    summary = train.main(quick_args(tmp_path, "--max-rows", "300", "--epochs", "1", "--arch",
                                    "basic", "--test", str(tmp_path / "test.csv")))  # fmt: skip
    assert "test_acc" not in summary
    assert f"note: --test {tmp_path / 'test.csv'}: no labels, so it is not scored" in (
        capsys.readouterr().err
    )


def test_a_dry_run_trains_one_short_epoch_and_keeps_nothing(tmp_path, capsys):
    summary = train.main(quick_args(tmp_path, "--arch", "basic", "--dry-run", "--ensemble", "2"))
    assert summary["best_epoch"] == 1  # one epoch, one model (not an ensemble's summaries)
    assert 0.85 * config.DRY_RUN_ROWS < summary["train_images"] < config.DRY_RUN_ROWS
    assert "dry run done: one epoch on 1,000 rows" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no models/, no out/


def test_a_resumed_run_keeps_its_settings_but_runs_as_told_here():
    saved = asdict(config.Config(epochs=7, seed=3, device="cpu", model_dir="runs/a"))
    given = config.parse_args(["--resume", "runs/a/last.pt", "--quiet"])
    cfg = config.Config.resumed(saved, given, Path("runs/a/last.pt"))
    assert (cfg.epochs, cfg.seed) == (7, 3)  # the run's own
    assert (cfg.device, cfg.quiet, cfg.resume) == (None, True, "runs/a/last.pt")  # this machine's


def test_a_setting_newer_than_a_checkpoint_gets_its_default():
    saved = {
        key: value for key, value in asdict(config.Config(epochs=7)).items() if key != "preset"
    }
    assert config.Config.resumed(saved, {}, Path("last.pt")).preset == "best"


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Short runs on digits, on a Fashion-MNIST CSV, with --preset fast as users run it and
    without its distortions; the curves' titles."""
    import plots

    folder = tmp_path_factory.mktemp("recipes")
    fashion = folder / "fashion.csv"
    header = ",".join(dataset.LAYOUTS["fashion-mnist"][0])
    np.savetxt(fashion, make_table(200), fmt="%d", delimiter=",", header=header, comments="")
    runs = {
        "digits": quick_args(folder / "digits", "--epochs", "1", "--max-rows", "300"),
        "fashion": [*quick_args(folder / "fashion", "--epochs", "1"), "--train", str(fashion)],
        "fast": quick_args(folder / "fast", "--max-rows", "300", "--preset", "fast"),
        "plain": quick_args(folder / "plain", "--max-rows", "300", "--preset", "fast"),
    }
    runs["plain"].append("--no-augment")
    for plotted in ("fast", "plain"):
        runs[plotted].remove("--no-plots")
    titles = []
    draw = plots.training_curves
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            plots,
            "training_curves",
            lambda h, best, p, title: titles.append(title) or draw(h, best, p, title),
        )
        for args in runs.values():
            train.main(args)
    return folder, titles


@pytest.mark.parametrize(
    ("run", "expected"),
    [
        ("digits", ("strong", 1, 128, 3e-3, True, 1.0)),
        ("fashion", ("wide", 1, 128, 3e-3, True, 1.0)),
        ("fast", ("small_bn", 4, 256, 1e-2, True, 0.5)),
        ("plain", ("small_bn", 4, 256, 1e-2, False, 0.5)),
    ],
)
def test_a_checkpoint_saves_the_recipe_its_run_used(recipes, run, expected):
    folder, _ = recipes
    config = model.load_checkpoint(folder / run / "models" / "best.pt")["config"]
    assert tuple(config[key] for key in RECIPE) == expected


@pytest.mark.parametrize(("run", "augmented"), [("fast", True), ("plain", False)])
def test_a_run_draws_its_augmentation_only_when_it_augments(recipes, run, augmented):
    folder, _ = recipes
    figures = {path.name for path in (folder / run / "out").glob("*.png")}
    drawn = {"sample_images.png", "class_distribution.png", "training_curves.png"}
    assert figures == drawn | ({"augmented_digits.png"} if augmented else set())


def test_the_curves_say_how_training_metrics_were_measured(recipes):
    _, titles = recipes
    # small_bn has no dropout
    assert titles == ["augmented batches, label-smoothed loss", "label-smoothed loss"]


@pytest.mark.parametrize(
    ("arch", "augment", "expected"),
    [
        ("basic_bn", False, "dropout on, label-smoothed loss"),
        ("small_bn", True, "augmented batches, label-smoothed loss"),
    ],
)
def test_the_curves_caption_names_what_the_training_metrics_include(arch, augment, expected):
    cfg = config.Config(arch=arch, augment=augment)
    assert train.curves_caption(cfg, model.build(arch)) == expected


@pytest.mark.parametrize(
    ("row", "other", "better"),
    [
        ((0.998, 0.105), (1.0, 0.132), True),  # the lower loss wins over one image's accuracy
        ((1.0, 0.12), (0.99, 0.10), False),
        ((1.0, 0.10), (0.99, 0.10), True),  # a tie in loss: the higher accuracy wins
        ((1.0, 0.10), (1.0, 0.10), False),  # no better than an equal epoch: the earlier stays
    ],
)
def test_best_pt_is_the_epoch_that_validates_best(row, other, better):
    rows = [{"val_acc": acc, "val_loss_calibrated": loss} for acc, loss in (row, other)]
    assert train.validates_better(*rows) == better
    plain = [{"val_acc": acc, "val_loss": loss} for acc, loss in (row, other)]
    assert train.validates_better(*plain) == better  # rows of runs from before calibrated loss


def test_the_calibrated_loss_judges_over_the_plain_one():
    surer = {"val_acc": 0.9948, "val_loss": 0.0939, "val_loss_calibrated": 0.0210}
    better = {"val_acc": 0.9974, "val_loss": 0.0996, "val_loss_calibrated": 0.0140}
    assert train.validates_better(better, surer)
    assert not train.validates_better(better, {k: surer[k] for k in ("val_acc", "val_loss")})


def test_every_epoch_records_its_calibrated_validation_loss(learned):
    _, folder = learned
    with open(folder / "out" / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:  # at about 90% right the fitted temperature is the loss's own minimum
        assert 0 < float(row["val_loss_calibrated"]) <= float(row["val_loss"])


def _history_without_timing(path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    return [row[:-2] for row in rows]  # the last columns are timings: seconds, images/s


def test_same_seed_gives_the_same_history(tmp_path):
    for run in ("a", "b"):
        train.main(quick_args(tmp_path / run, "--epochs", "2", "--max-rows", "400"))
    a = _history_without_timing(tmp_path / "a" / "out" / "history.csv")
    assert a == _history_without_timing(tmp_path / "b" / "out" / "history.csv")


def _train_process(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-u", str(ROOT / "train.py"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=os.environ)


@pytest.mark.parametrize(
    "recipe", [["--arch", "basic"], ["--arch", "basic_bn", "--ema", "0.9"]], ids=["plain", "ema"]
)
def test_a_run_killed_after_an_epoch_resumes_to_identical_weights(tmp_path, recipe):
    run = ["--epochs", "6", "--max-rows", "800", *recipe]
    killed = _train_process(*quick_args(tmp_path / "killed", *run))
    for line in killed.stdout:
        if line.startswith("epoch   2/6"):
            killed.send_signal(signal.SIGKILL)
            break
    assert killed.wait() == -signal.SIGKILL
    last = tmp_path / "killed" / "models" / "last.pt"
    assert 2 <= model.load_checkpoint(last)["epoch"] < 6, "the kill came after the run finished"
    here = ["--quiet", "--no-plots", "--device", "cpu", "--deterministic"]
    assert _train_process("--resume", str(last), *here).wait() == 0
    assert _train_process(*quick_args(tmp_path / "whole", *run)).wait() == 0
    resumed = model.load_checkpoint(last)
    whole = model.load_checkpoint(tmp_path / "whole" / "models" / "last.pt")
    assert resumed["epoch"] == whole["epoch"] == 6
    assert [h["val_loss"] for h in resumed["history"]] == [h["val_loss"] for h in whole["history"]]
    for weights in ("state_dict", "trained_state_dict") if "--ema" in recipe else ("state_dict",):
        different = [
            k for k, w in whole[weights].items() if not torch.equal(resumed[weights][k], w)
        ]
        assert different == [], weights


def test_ema_keeps_the_average_and_leaves_training_as_it_was(tmp_path):
    run = ["--epochs", "2", "--max-rows", "400", "--arch", "basic_bn", "--quiet", "--no-plots"]
    train.main(quick_args(tmp_path / "plain", *run))
    train.main(quick_args(tmp_path / "ema", *run, "--ema", "0.9"))
    plain = model.load_checkpoint(tmp_path / "plain" / "models" / "last.pt")
    last = model.load_checkpoint(tmp_path / "ema" / "models" / "last.pt")
    best = model.load_checkpoint(tmp_path / "ema" / "models" / "best.pt")
    trained, kept = last["trained_state_dict"], last["state_dict"]
    assert all(torch.equal(w, trained[k]) for k, w in plain["state_dict"].items())
    assert last["average_updates"] == 2 * 2  # two epochs of 360 rows: 2 full batches of 128
    assert any(not torch.equal(w, trained[k]) for k, w in kept.items() if w.is_floating_point())
    # the history validated the average: the same weights trained, other validation losses
    assert [h["val_loss"] for h in last["history"]] != [h["val_loss"] for h in plain["history"]]
    # and best.pt holds the average validated: calibrating it gives its epoch's calibrated loss
    metrics = json.loads((tmp_path / "ema" / "out" / "metrics.json").read_text())
    kept_row = best["history"][best["epoch"] - 1]
    fitted = metrics["calibration"]["val_nll_after"]
    assert kept_row["val_loss_calibrated"] == pytest.approx(fitted, abs=2e-5)


def test_a_skipped_fp16_step_is_not_averaged():
    net = torch.nn.Linear(4, 2)
    cfg = config.Config(ema=0.5, scheduler="none")
    optimization = train.Optimization.create(cfg, net, steps_per_epoch=1, fp16=True)
    before = optimization.average.net.weight.clone()
    optimization.step(net(torch.full((3, 4), float("inf"))).sum())  # the scaler skips it
    assert optimization.average.updates == 0
    assert torch.equal(optimization.average.net.weight, before)
    optimization.step(net(torch.ones(3, 4)).sum())
    assert optimization.average.updates == 1


def optimization_beside_the_loop(name: str, fp16: bool, skipped_first: bool):
    """train.Optimization for `name` on a small net, and the same optimizer as torch's loop
    implementation on a copy of it; after an optional first step the loss scaler skips, both
    take three steps on the same batch, and the nets are returned."""
    torch.manual_seed(0)
    net, twin = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    twin.load_state_dict(net.state_dict())
    cfg = config.Config(optimizer=name, scheduler="none")
    optimization = train.Optimization.create(cfg, net, steps_per_epoch=1, fp16=fp16)
    kind, settings = config.OPTIMIZERS[name]
    loop = kind(twin.parameters(), lr=cfg.lr, foreach=False, **settings)
    if skipped_first:
        optimization.step(net(torch.full((3, 8), float("inf"))).sum())  # the scaler skips it
    x = torch.randn(16, 8)
    for _ in range(3):
        optimization.step(net(x).square().mean())
        loop.zero_grad()
        twin(x).square().mean().backward()
        loop.step()
    return optimization, net, twin


@pytest.mark.parametrize("name", sorted(config.OPTIMIZERS))
def test_the_optimizer_is_fused_on_the_cpu_with_the_loops_arithmetic(name):
    torch.manual_seed(0)
    start = torch.nn.Linear(8, 4).weight.detach().clone()  # the helper's net, as it starts
    optimization, net, twin = optimization_beside_the_loop(name, fp16=False, skipped_first=False)
    assert optimization.optimizer.param_groups[0]["fused"] is True
    assert not torch.allclose(net.weight, start)  # the steps moved the weights
    for fused, looped in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(fused, looped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(config.OPTIMIZERS))
def test_with_the_loss_scaler_a_skipped_first_step_leaves_no_state_behind(name):
    # fused SGD's first step allocates its momentum unset and, skipped, leaves it so
    _, net, twin = optimization_beside_the_loop(name, fp16=True, skipped_first=True)
    for scaled, looped in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(scaled, looped, rtol=1e-5, atol=1e-6)


def test_history_csv_has_every_column_when_earlier_epochs_lack_one(tmp_path):
    older = {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4}
    newer = {**older, "epoch": 2, "val_loss_calibrated": 0.3}
    train.write_history(tmp_path / "history.csv", [older, newer])
    with open(tmp_path / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["val_loss_calibrated"] for row in rows] == ["", "0.3"]


def test_the_kept_line_names_the_loss_that_chose_the_epoch():
    summary = {"train_images_per_s": 1000}
    old = {"epoch": 3, "metrics": {"val_loss": 0.1, "val_acc": 0.99}}
    new = {"epoch": 4, "metrics": {**old["metrics"], "val_loss_calibrated": 0.02}}
    assert "(validation loss 0.1000, accuracy 99.00%)" in train.kept_line(old, summary, Path("b"))
    assert "(calibrated validation loss 0.0200," in train.kept_line(new, summary, Path("b"))


def test_the_weight_average_warms_up_then_follows_at_its_decay():
    torch.manual_seed(0)
    trained = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = ema.WeightAverage(trained, decay=0.5)
    start = average.net[0].weight.clone()
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    trained[1].num_batches_tracked += 7
    average.update()  # decay min(0.5, 1/10): mostly the new weights
    assert torch.allclose(average.net[0].weight, 0.1 * start + 0.9 * trained[0].weight)
    assert average.net[1].num_batches_tracked.item() == 7
    before = average.net[0].weight.clone()
    average.update()  # decay min(0.5, 2/11)
    assert torch.allclose(average.net[0].weight, 2 / 11 * before + 9 / 11 * trained[0].weight)
    for _ in range(20):
        average.update()
    assert average.decay_now() == 0.5
    assert not average.net.training
    assert not any(p.requires_grad for p in average.net.parameters())


def _bad_checkpoints(folder) -> None:
    (folder / "corrupt.pt").write_bytes(os.urandom(256))
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    header = ",".join(dataset.LAYOUTS["digit-recognizer-test"][0])
    table = make_table(30, labelled=False)
    np.savetxt(folder / "u.csv", table, fmt="%d", delimiter=",", header=header, comments="")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--arch", "resnet999"], "--arch resnet999: unknown architecture"),
        (["--epochs", "0"], "--epochs 0: must be in [1, 10000]"),
        (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
        (["--ensemble", "0"], "--ensemble 0: must be in [1, 100]"),
        (["--ensemble", "99999999999999999999"], "--ensemble 99999999999999999999: must be in"),
        (["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
        (["--seed", "18446744073709551616"], "--seed 18446744073709551616: must be in [0, "),
        (["--lr", "0"], "--lr 0.0: must be a positive number"),
        (["--lr", "inf"], "--lr inf: must be a positive number"),
        (["--label-smoothing", "1"], "--label-smoothing 1.0: must be in [0, 1)"),
        (["--ema", "1"], "--ema 1.0: must be in [0, 1)"),
        (["--elastic", "9"], "--elastic 9.0: must be in [0, 8]"),
        (["--no-augment", "--elastic", "2"], "--elastic 2: distorts augmented batches"),
        (["--preset", "fast", "--elastic", "2"], "--preset fast does not augment every task"),
        (["--max-rows", "1"], "--max-rows 1: must be at least 2"),
        (["--val-split", "1.5"], "--val-split 1.5: must be between 0 and 1"),
        (["--val-split", "0"], "--val-split 0.0: must be between 0 and 1"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--resume", "{folder}/nope.pt"], "nope.pt: no such checkpoint"),
        (["--resume", "{folder}/corrupt.pt"], "corrupt.pt: not a loadable checkpoint"),
        (["--resume", "{folder}/foreign.pt"], "foreign.pt: not a checkpoint of this project"),
        (["--train", "{folder}/u.csv"], "u.csv: has no label column"),
        (["--device", "tpu"], "--device tpu: unknown device"),
    ],
)
def test_a_bad_setting_gets_one_line_and_exit_2(tmp_path, capsys, flags, expected):
    _bad_checkpoints(tmp_path)
    flags = [flag.format(folder=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, [*quick_args(tmp_path), *flags])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ")
    assert expected in line


@pytest.mark.parametrize(
    ("checkpoint", "expected"),
    [("best.pt", "not resumable"), ("mismatched.pt", "weights do not fit lenet")],
)
def test_resuming_a_best_checkpoint_or_incompatible_weights_is_refused(
    one_epoch, tmp_path, capsys, checkpoint, expected
):
    last = model.load_checkpoint(one_epoch["last"])
    model.save_checkpoint(tmp_path / "mismatched.pt", {**last, "arch": "lenet"})
    path = one_epoch["best"] if checkpoint == "best.pt" else tmp_path / checkpoint
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, ["--resume", str(path)])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def progress_lines(tmp_path, monkeypatch, capsys, *extra: str) -> list[str]:
    """What a one-epoch run prints on stderr (not a terminal here) with a progress line due
    after every batch."""
    args = [a for a in quick_args(tmp_path, "--arch", "basic", "--epochs", "1") if a != "--quiet"]
    args += ["--log-interval", "0"]
    train.main([*args, "--max-rows", "1000", "--batch-size", "100", *extra])
    return [line for line in capsys.readouterr().err.splitlines() if " images/s  " in line]


def test_outside_a_terminal_progress_is_a_line_within_the_epoch(tmp_path, monkeypatch, capsys):
    lines = progress_lines(tmp_path, monkeypatch, capsys)
    # 900 training rows in batches of 100: a line after each of batches 1..8, none after the last
    assert [line.split("  ")[1] for line in lines] == [f"batch {i}/9" for i in range(1, 9)]
    assert all(line.startswith("epoch 1/1  ") and line.endswith("s left") for line in lines)


def test_quiet_shows_no_progress_lines(tmp_path, monkeypatch, capsys):
    assert progress_lines(tmp_path, monkeypatch, capsys, "--quiet") == []
