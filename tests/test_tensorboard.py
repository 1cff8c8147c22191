"""train.py --tensorboard: the event files hold the scalars, hyperparameters and images (read back
with TensorBoard's own reader); without the package the flag is refused in one line."""

from __future__ import annotations

import builtins
import sys

import pytest
from conftest import ROOT, SAMPLE_TRAIN, run_flags

import tensorboard_log
import train
from cli import UserError


def run_args(folder, *extra: str) -> list[str]:
    recipe = ["--arch", "basic", "--epochs", "3", "--max-rows", "600", "--scheduler", "plateau"]
    return run_flags(folder, "--train", SAMPLE_TRAIN, *recipe, *extra)


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.mark.numerics
def test_the_event_files_hold_scalars_hyperparameters_and_images(tmp_path):
    board = tmp_path / "tb"
    summary = train.main(run_args(tmp_path, "--tensorboard", str(board)))
    (run_dir,) = board.iterdir()
    assert run_dir.name.endswith("-basic-seed0")
    events = read_events(run_dir)
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()[1:]
    val_acc = [float(row.split(",")[4]) for row in history]
    logged = events.Scalars("accuracy/validation")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx(val_acc, abs=1e-5)
    for tag in tensorboard_log.SCALARS.values():
        assert len(events.Scalars(tag)) == 3, tag
    assert events.Scalars("hparam/best_val_acc")[0].value == pytest.approx(summary["best_val_acc"])
    assert set(events.PluginTagToContent("hparams")) >= {"_hparams_/experiment"}
    for tag in ("training_curves", "confusion_matrix/validation"):
        (image,) = events.Images(tag)
        assert image.width > 300 and image.height > 200 and image.step == 3
        assert image.encoded_image_string.startswith(b"\x89PNG")


@pytest.mark.numerics
def test_a_resumed_run_continues_its_own_tensorboard_run(tmp_path):
    board = tmp_path / "tb"
    train.main(run_args(tmp_path, "--tensorboard", str(board), "--epochs", "2"))
    last = tmp_path / "models" / "last.pt"
    train.main(["--resume", str(last), "--epochs", "3", "--tensorboard", str(board), "--quiet"])
    (run_dir,) = board.iterdir()  # the same run, not a second one
    steps = [e.step for e in read_events(run_dir).Scalars("loss/validation")]
    assert steps == [1, 2, 3]


def test_without_tensorboard_the_flag_names_the_install(monkeypatch, tmp_path, capsys):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    for name in [m for m in sys.modules if "tensorboard" in m and m != "tensorboard_log"]:
        monkeypatch.delitem(sys.modules, name)  # imported again, through no_tensorboard
    with pytest.raises(UserError, match=r"pip install tensorboard==") as error:
        train.main(run_args(tmp_path, "--tensorboard"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "models").exists()  # refused before anything was trained


def test_the_install_command_pins_what_the_tests_use():
    pinned = tensorboard_log.INSTALL.removeprefix("pip install ")
    assert pinned in (ROOT / "requirements-dev.txt").read_text().splitlines()
