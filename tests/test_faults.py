"""Faults of the machine, injected: a full disk, a directory where a file goes and a file where a
directory goes, a read-only folder, SIGKILL during a checkpoint write, SIGTERM during training.
Each ends in one line naming the path and the reason, and never in a half-updated pair of
checkpoints; a killed or terminated run resumes."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, SAMPLE_TEST, SAMPLE_TRAIN, run_flags

import atomic
import model
import predict
import train
from cli import run_cli

pytestmark = pytest.mark.numerics


def quick(folder, *extra: str) -> list[str]:
    """Three deterministic epochs of `basic` on 400 sample rows, writing under `folder`."""
    run = ["--train", SAMPLE_TRAIN, "--max-rows", "400", "--arch", "basic", "--epochs", "3"]
    return run_flags(folder, *run, "--deterministic", *extra)


def error_line(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    return exit_info.value.code, line


def fail_writes_under(monkeypatch, folder, error: int, after: int = 0) -> None:
    """From the `after`-th on, every file opened for writing under `folder` fails with `error`
    at its first write (as a full disk does), through the one place everything writes."""
    real_fdopen = os.fdopen
    opened = {"count": 0}

    class Failing:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data):
            raise OSError(error, os.strerror(error))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(folder)):
            opened["count"] += 1
            if opened["count"] > after:
                return Failing(f)
        return f

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def assert_consistent_pair(models) -> None:
    """best.pt and last.pt agree: best.pt's epoch is in last.pt's history as best.pt has it."""
    best, last = (model.load_checkpoint(models / f"{name}.pt") for name in ("best", "last"))
    assert best["epoch"] <= last["epoch"]
    assert last["history"][best["epoch"] - 1] == best["metrics"]


def test_a_full_disk_under_the_model_folder_is_one_line_and_leaves_the_pair(
    tmp_path, monkeypatch, capsys
):
    fail_writes_under(monkeypatch, tmp_path / "models", errno.ENOSPC, after=2)  # epoch 1's pair
    code, line = error_line(train.main, quick(tmp_path), capsys)
    assert code == 1  # not the user's doing
    assert "models/best.pt: cannot write: No space left on device" in line or (
        "models/last.pt: cannot write: No space left on device" in line
    )
    assert_consistent_pair(tmp_path / "models")
    assert model.load_checkpoint(tmp_path / "models" / "last.pt")["epoch"] == 1
    assert list((tmp_path / "models").glob("*.tmp")) == []


def test_a_full_disk_under_the_report_folder_is_one_line(tmp_path, monkeypatch, capsys):
    train.main(quick(tmp_path, "--epochs", "1"))
    fail_writes_under(monkeypatch, tmp_path / "report", errno.ENOSPC)
    argv = ["--checkpoint", str(tmp_path / "models" / "best.pt"), "--input", SAMPLE_TEST]
    argv += ["--output", str(tmp_path / "sub.csv"), "--report-dir", str(tmp_path / "report")]
    code, line = error_line(predict.main, [*argv, "--device", "cpu"], capsys)
    assert code == 1
    assert "cannot write: No space left on device" in line
    assert len((tmp_path / "sub.csv").read_text().splitlines()) == 1001  # written before, whole


def test_a_directory_where_a_checkpoint_goes_is_one_line(tmp_path, capsys):
    (tmp_path / "models" / "last.pt").mkdir(parents=True)
    code, line = error_line(train.main, quick(tmp_path), capsys)
    assert code == 2
    assert "models/last.pt: cannot write: Is a directory" in line
    assert not (tmp_path / "models" / "best.pt").exists()  # the pair is written together


def test_a_refused_run_leaves_no_empty_folders(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("label,a,b\n1,2,3\n")
    code, _ = error_line(
        train.main, [*quick(tmp_path), "--train", str(tmp_path / "bad.csv")], capsys
    )
    assert code == 2
    where = ["--output", str(tmp_path / "subs" / "s.csv"), "--report-dir", str(tmp_path / "rep")]
    missing = ["--checkpoint", str(tmp_path / "none.pt"), "--input", SAMPLE_TEST, *where]
    code, _ = error_line(predict.main, missing, capsys)
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_a_second_run_on_a_model_folder_in_use_is_refused_naming_the_first(tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    with atomic.folder_lock(models, "--model-dir"):  # as a first run holds it
        code, line = error_line(train.main, quick(tmp_path), capsys)
    assert code == 2
    assert f"--model-dir {models}: another run (pid {os.getpid()}) is writing there" in line
    assert sorted(p.name for p in models.iterdir()) == [".lock"]  # nothing of the second run
    train.main(quick(tmp_path))  # once the first has ended, the folder is free again
    assert (models / "best.pt").is_file()


@pytest.mark.parametrize("flag", ["--model-dir", "--out-dir"])
def test_a_file_where_an_output_folder_goes_is_refused_before_training(tmp_path, capsys, flag):
    (tmp_path / "file").write_text("a file, not a folder")
    code, line = error_line(train.main, [*quick(tmp_path), flag, str(tmp_path / "file")], capsys)
    assert code == 2
    assert f"{flag} {tmp_path / 'file'}: cannot write:" in line
    assert not (tmp_path / "out" / "history.csv").exists()


def test_a_file_where_the_report_folder_goes_is_refused_before_predicting(tmp_path, capsys):
    (tmp_path / "report").write_text("a file")
    argv = ["--input", SAMPLE_TEST, "--report-dir", str(tmp_path / "report")]
    code, line = error_line(predict.main, [*argv, "--output", str(tmp_path / "s.csv")], capsys)
    assert code == 2
    assert f"--report-dir {tmp_path / 'report'}: cannot write:" in line
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_a_read_only_output_folder_is_refused_before_training(tmp_path, monkeypatch, capsys, error):
    """A read-only mount or a folder without write permission (as root, chmod cannot show it)."""
    real = atomic.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if str(dir).startswith(str(tmp_path / "models")):
            raise OSError(error, os.strerror(error))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    code, line = error_line(train.main, quick(tmp_path), capsys)
    assert code == 2
    assert f"--model-dir {tmp_path / 'models'}: cannot write: {os.strerror(error)}" in line


def _train_process(folder, *extra: str, inject: str = "") -> subprocess.Popen:
    """train.py in a process of its own; `inject` runs first (to plant a fault)."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
{inject}
import cli, train
cli.run_cli(train.main, sys.argv[1:])
"""
    argv = [sys.executable, "-u", "-c", script, *quick(folder, "--epochs", "4"), *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_during_a_checkpoint_write_loses_nothing_and_resumes(tmp_path):
    kill_mid_write = """
import os, signal, atomic
real = atomic.os.replace
calls = []
def replace(src, dst):
    calls.append(str(dst))
    if sum(c.endswith("last.pt") for c in calls) == 2:  # epoch 2's last.pt, still temporary
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
atomic.os.replace = replace
"""
    killed = _train_process(tmp_path, inject=kill_mid_write)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    models = tmp_path / "models"
    assert model.load_checkpoint(models / "last.pt")["epoch"] == 1  # the last whole one
    assert len(list(models.glob(".last.pt.*.tmp"))) == 1  # what the kill left
    resumed = _train_process(tmp_path, "--resume", str(models / "last.pt"))
    assert resumed.wait() == 0
    assert model.load_checkpoint(models / "last.pt")["epoch"] == 4
    assert_consistent_pair(models)
    assert list(models.glob("*.tmp")) == []  # swept up


def test_sigterm_during_training_stops_with_a_message_and_resumes(tmp_path):
    running = _train_process(tmp_path)
    for line in running.stdout:
        if line.startswith("epoch   1/4"):
            running.send_signal(signal.SIGTERM)
            break
    _, err = running.communicate()
    assert running.returncode == 143
    models = tmp_path / "models"
    assert f"{models / 'last.pt'} holds epoch 1: resume with" in err
    assert err.splitlines()[-1] == "terminated"
    resumed = _train_process(tmp_path, "--resume", str(models / "last.pt"))
    assert resumed.wait() == 0
    assert model.load_checkpoint(models / "last.pt")["epoch"] == 4
