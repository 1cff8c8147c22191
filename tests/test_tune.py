"""tune.py: a tiny Optuna search on the sample (trials finish, the median pruner stops a trailing
trial, the best trial is a train.py command), a killed study resumed, two workers on one SQLite
study."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import ROOT, SAMPLE_TRAIN

import config
import tune


def tune_args(folder, *extra: str) -> list[str]:
    """A search on 400 sample rows, trials of at most 3 epochs, on the CPU, under `folder`."""
    where = ["--out-dir", str(folder), "--storage", str(folder / "study.db")]
    small = ["--train", SAMPLE_TRAIN, "--max-rows", "400", "--max-epochs", "3"]
    return [*small, "--device", "cpu", "--sampler-seed", "0", *where, *extra]


def states(folder) -> list[str]:
    url = tune.storage_url(tune.parse_args(tune_args(folder)))
    study = optuna.load_study(study_name="mnist-recipe", storage=url)
    return [t.state.name for t in sorted(study.trials, key=lambda t: t.number)]


def launch(folder, trials: int) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "tune.py"), *tune_args(folder, "--trials", str(trials))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.numerics
def test_a_tiny_search_prunes_a_trailing_trial_and_reports_the_best(tmp_path, monkeypatch, capsys):
    """Four trials that learn, then one whose learning rate cannot: the median pruner stops it
    once its warm-up is over, before its last epoch."""
    good = {"lr": 3e-3, "batch_size": 64, "epochs": 4, "weight_decay": 0.01}
    good |= {"label_smoothing": 0.1, "augment_strength": 0.0, "width": 16}
    monkeypatch.setattr(tune, "default_params", lambda task, max_epochs: good)
    args = tune_args(tmp_path, "--trials", "5", "--max-epochs", "4", "--warmup", "0.3")
    study = tune.open_study(tune.parse_args(args), "digits")
    for _ in range(3):
        study.enqueue_trial(good)
    study.enqueue_trial({**good, "lr": 1e-9})  # learns nothing
    summary = tune.main(args)
    assert states(tmp_path) == ["COMPLETE"] * 4 + ["PRUNED"]
    history = (tmp_path / "trials" / "trial-4" / "out" / "history.csv").read_text()
    assert len(history.splitlines()) < 1 + 4  # stopped before its last epoch
    assert summary["trials"] == {"complete": 4, "pruned": 1}
    assert summary["best"]["trial"] in range(4)
    # the best trial's command is train.py's, with the trial's settings
    command = shlex.split(summary["command"])
    assert command[:2] == ["python", "train.py"]
    given = config.parse_args(command[2:])
    assert given["lr"] == pytest.approx(good["lr"]) and given["width"] == 16
    assert not given["augment"]
    assert summary["command"] in capsys.readouterr().out
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved["best"] == summary["best"]
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / plot).read_bytes().startswith(b"\x89PNG")


@pytest.mark.numerics
def test_a_killed_search_resumes_to_its_trials(tmp_path):
    first = launch(tmp_path, trials=3)
    second_started = tmp_path / "trials" / "trial-1"
    deadline = time.monotonic() + 300
    while not second_started.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # no chance to tidy up: trial 1 stays RUNNING
    first.communicate(timeout=60)
    before = states(tmp_path)
    assert before[0] in ("COMPLETE", "PRUNED") and before[1] == "RUNNING"
    summary = tune.main(tune_args(tmp_path, "--trials", "3"))
    after = states(tmp_path)
    assert after[:2] == before[:2]  # the finished trial kept, the killed one left as it was
    assert sum(state in ("COMPLETE", "PRUNED") for state in after) == 3
    assert sum(summary["trials"].get(s, 0) for s in ("complete", "pruned")) == 3


@pytest.mark.numerics
def test_two_workers_share_one_sqlite_study(tmp_path):
    workers = [launch(tmp_path, trials=4) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-2000:]
    finished = [s for s in states(tmp_path) if s in ("COMPLETE", "PRUNED")]
    assert 4 <= len(finished) <= 5  # both may start a trial when the third finishes
    folders = sorted(p.name for p in (tmp_path / "trials").iterdir())
    assert len(folders) == len(states(tmp_path))  # one folder per trial, none shared
    for folder in folders:
        assert (tmp_path / "trials" / folder / "models" / "best.pt").is_file()


def test_storage_is_an_rdb_url_or_a_sqlite_file(tmp_path):
    default = tune.parse_args(["--out-dir", str(tmp_path)])
    assert tune.storage_url(default) == f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    url = "postgresql://user@host/optuna"
    assert tune.storage_url(tune.parse_args(["--storage", url])) == url


@pytest.mark.parametrize("flag", ["--trials", "--max-epochs"])
def test_bad_counts_are_refused(flag):
    with pytest.raises(tune.UserError, match=f"{flag} 0: must be at least 1"):
        tune.parse_args([flag, "0"])
    with pytest.raises(tune.UserError, match=r"--warmup 1.5: must be a share"):
        tune.parse_args(["--warmup", "1.5"])


@pytest.mark.parametrize("seed", ["-1", "18446744073709551616"])
def test_a_seed_out_of_range_is_refused_before_any_trial(seed):
    with pytest.raises(tune.UserError, match=rf"--seed {seed}: must be in \[0, 4294967295\]"):
        tune.parse_args(["--seed", seed])


@pytest.mark.parametrize(
    ("epochs", "steps"),
    [
        (4, [2, 5, 7, 10]),
        (6, [1, 3, 5, 6, 8, 10]),
        (15, [0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 10]),
    ],
)
def test_trials_are_compared_at_the_same_share_of_their_schedules(epochs, steps):
    assert [tune.progress_step(e, epochs) for e in range(1, epochs + 1)] == steps


def test_an_unreachable_storage_is_one_line(tmp_path):
    with pytest.raises(tune.UserError, match="--storage nosuchdriver://x: cannot open it"):
        tune.main(tune_args(tmp_path, "--storage", "nosuchdriver://x"))


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_storage_is_refused_in_one_line(tmp_path, url):
    with pytest.raises(tune.UserError, match=f"--storage {url}: an in-memory database cannot"):
        tune.main(tune_args(tmp_path, "--storage", url))


def test_a_flag_that_fails_every_trial_fails_before_the_first_is_saved(tmp_path):
    with pytest.raises(tune.UserError, match="1 labelled row; training needs at least 2"):
        tune.main([*tune_args(tmp_path), "--max-rows", "1"])
    assert not (tmp_path / "study.db").exists()  # no study, so no failed trial in it


def test_optuna_logs_no_traceback_of_a_trial_that_failed_on_a_user_error():
    tune.quiet_user_errors()
    child = optuna.logging.get_logger("optuna.study._optimize")  # where Optuna logs a failure
    handlers = optuna.logging.get_logger("optuna").handlers
    assert handlers
    for exc in (tune.UserError("bad data"), ValueError("a fault")):
        info = (type(exc), exc, None)
        record = child.makeRecord(child.name, 30, __file__, 1, "Trial 0 failed", None, info)
        shown = [bool(handler.filter(record)) for handler in handlers]
        assert shown == [isinstance(exc, ValueError)] * len(handlers)
