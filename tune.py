"""Search the training recipe with Optuna, on the validation split only (never a test set).

    python tune.py --trials 20                       # the found training CSV
    python tune.py --trials 20 --storage postgresql://host/db   # workers on several machines

Each trial trains `train.py` with a recipe drawn by the TPE sampler (learning rate, batch size,
epochs, weight decay, label smoothing, augmentation strength, width) and reports the validation
accuracy after every epoch; the median pruner stops trials that trail. The first trial of a new
study is the default recipe. The study lives in an Optuna storage, SQLite by default: run the
command again to resume a killed search, or start several workers on one storage. At the end it
prints the best trial as a train.py command and writes Optuna's history and importance plots
and tune.json into --out-dir.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import config
import dataset
import model
import train
from atomic import ensure_writable, write_json
from cli import CLIParser, UserError, first_line, run_cli, working_root

# The search space: flag -> how Optuna draws it.
SPACE = {
    "lr": ("float", 1e-3, 1e-2, True),
    "batch_size": ("categorical", (64, 128, 256)),
    "epochs": ("int", 6, 20, False),
    "weight_decay": ("float", 1e-4, 0.1, True),
    "label_smoothing": ("float", 0.0, 0.2, False),
    "augment_strength": ("float", 0.0, 2.0, False),
    "width": ("categorical", (16, 24, 32, 48)),
}
ARCH = "strong"  # the searched architecture, whose width the search sets
HEARTBEAT_S = 30  # a trial whose worker is silent for twice this is marked failed
FINISHED = ("COMPLETE", "PRUNED")
PROGRESS_STEPS = 10  # the pruner compares trials at tenths of their schedules


@dataclass(frozen=True)
class TuneConfig:
    """The search's settings; every trial trains on `train` with `val_split` and `seed`."""

    trials: int = 20
    train: str | None = None
    max_rows: int | None = None
    val_split: float = 0.1
    seed: int = 0
    study: str = "mnist-recipe"
    storage: str | None = None
    sampler_seed: int | None = None
    max_epochs: int = 20
    warmup: float = 0.5
    out_dir: str = field(default_factory=lambda: str(working_root() / "outputs" / "tune"))
    device: str | None = None
    precision: str = field(default_factory=model.default_precision)


def parse_args(argv: list[str] | None) -> TuneConfig:
    default = TuneConfig()
    p = CLIParser(description="Search the training recipe with Optuna (validation split only).")
    p.add_argument("--trials", type=int, default=default.trials, help="finished trials wanted")
    p.add_argument("--train", default=None, help="training CSV (default: found, see docs/data.md)")
    p.add_argument("--max-rows", type=int, default=None, help="use the first N training rows")
    p.add_argument("--val-split", type=float, default=default.val_split, help="validation share")
    p.add_argument("--seed", type=int, default=default.seed, help="the trials' split and init")
    p.add_argument("--study", default=default.study, help="study name inside the storage")
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna storage: an RDB URL (sqlite:///..., postgresql://..., mysql://...) or a "
        "SQLite file (default: OUT_DIR/study.db)",
    )
    p.add_argument("--sampler-seed", type=int, default=None, help="TPE's seed (default: random)")
    p.add_argument(
        "--max-epochs",
        type=int,
        default=default.max_epochs,
        help="the most epochs a trial trains (bounds the search's cost)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=default.warmup,
        help="no trial is pruned before this share of its epochs (its one-cycle schedule "
        "peaks at 0.3)",
    )
    p.add_argument("--out-dir", default=default.out_dir, help="trials, plots, tune.json")
    model.add_device_arguments(p, default.device, default.precision)
    cfg = TuneConfig(**vars(p.parse_args(argv)))
    for name in ("trials", "max_epochs"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if not 0 <= cfg.warmup <= 1:
        raise UserError(f"--warmup {cfg.warmup}: must be a share of the epochs, in [0, 1]")
    if not 0 <= cfg.seed <= config.MAX_SEED:
        raise UserError(f"--seed {cfg.seed}: {config.range_problem('seed', cfg.seed)}")
    return cfg


def storage_url(cfg: TuneConfig) -> str:
    """The storage's URL: as given, a file path as SQLite, or OUT_DIR/study.db; an in-memory
    SQLite database (which each of Optuna's threads would see empty) is refused."""
    given = cfg.storage or str(Path(cfg.out_dir) / "study.db")
    if given.rstrip("/") == "sqlite:" or given.endswith(":memory:"):
        raise UserError(
            f"--storage {given}: an in-memory database cannot hold a study (give a file, as "
            "--storage study.db, or a database server's URL)"
        )
    return given if "://" in given else f"sqlite:///{Path(given).resolve()}"


class QuietUserErrors(logging.Filter):
    """Drops Optuna's log record of a trial that failed on a UserError: that error's own line
    is what the user sees, not a traceback before it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


QUIET_USER_ERRORS = QuietUserErrors()


def quiet_user_errors() -> None:
    """QUIET_USER_ERRORS on the handlers of Optuna's logger: a handler's filter sees the records
    of every child logger (a logger's own filter would not: Optuna logs a failed trial from
    optuna.study._optimize). Adding it twice adds it once."""
    import optuna

    for handler in optuna.logging.get_logger("optuna").handlers:
        handler.addFilter(QUIET_USER_ERRORS)


def open_study(cfg: TuneConfig, task: str):
    """The study in its storage (made if new, with the default recipe as its first trial)."""
    import optuna

    storage = open_storage(storage_url(cfg))
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed),
        # no trial is pruned before 4 have finished, nor before --warmup of its schedule
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=4, n_warmup_steps=round(cfg.warmup * PROGRESS_STEPS)
        ),
        load_if_exists=True,
    )
    if not study.trials:
        study.enqueue_trial(default_params(task, cfg.max_epochs), skip_if_exists=True)
    return study


def open_storage(url: str, attempts: int = 5):
    """Optuna's storage at `url`. Workers that start together race to make its tables: the
    loser's error is retried, after a pause, a few times."""
    import optuna
    import sqlalchemy.exc

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError) as e:
            error = e
            time.sleep(0.5 * (attempt + 1))
        except Exception as e:  # SQLAlchemy's errors for a bad URL or driver are many
            error = e
            break
    raise UserError(f"--storage {url}: cannot open it ({first_line(error)})")


def default_params(task: str, max_epochs: int) -> dict:
    """train.py's default recipe for `task` in the search's terms (its epochs at most
    `max_epochs`)."""
    recipe, defaults = config.PRESETS["best"][task], config.Config()
    width = model.first_width(recipe.arch)
    optimizer_decay = config.OPTIMIZERS[defaults.optimizer][1].get("weight_decay", 0.01)
    return {
        "lr": recipe.lr,
        "batch_size": recipe.batch_size,
        "epochs": min(recipe.epochs, max_epochs),
        "weight_decay": optimizer_decay,
        "label_smoothing": defaults.label_smoothing,
        "augment_strength": recipe.augment_strength if recipe.augment else 0.0,
        "width": width,
    }


def suggest(trial, max_epochs: int) -> dict:
    """One recipe drawn from SPACE, its epochs at most `max_epochs`."""
    drawn = {}
    for name, (kind, *bounds) in SPACE.items():
        if kind == "categorical":
            drawn[name] = trial.suggest_categorical(name, bounds[0])
        elif kind == "int":
            high = min(bounds[1], max_epochs)
            drawn[name] = trial.suggest_int(name, min(bounds[0], high), high, log=bounds[2])
        else:
            drawn[name] = trial.suggest_float(name, bounds[0], bounds[1], log=bounds[2])
    return drawn


def progress_step(epoch: int, epochs: int) -> int:
    """Where an epoch ends in its run's schedule, in tenths: trials of different lengths are
    compared at the same point of their learning-rate schedules, not at the same epoch (at
    epoch 5 a 6-epoch run has annealed and a 20-epoch one is at its peak rate)."""
    return PROGRESS_STEPS * epoch // epochs


class Reporter:
    """A training run's watcher (train.Watcher) that reports the validation accuracy after each
    epoch to the trial, at its progress step (the first epoch to reach a step reports it), and
    stops the trial when the pruner says so."""

    def __init__(self, trial) -> None:
        self.trial, self.reported = trial, set()

    def epoch(self, row: dict, epochs: int) -> None:
        import optuna

        step = progress_step(row["epoch"], epochs)
        if step in self.reported or row["epoch"] == epochs:  # the last: nothing to save
            return
        self.reported.add(step)
        self.trial.report(row["val_acc"], step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(
                f"validation accuracy {row['val_acc']:.2%} at epoch {row['epoch']} of {epochs}"
            )

    def finish(self, end) -> None:
        """Nothing to add at the end: the objective returns the summary's figure."""


def recipe_flags(params: dict) -> dict:
    """train.py's settings for a trial's parameters."""
    return {"arch": ARCH, "augment": params["augment_strength"] > 0, **params}


def objective(cfg: TuneConfig, train_csv: str, trial) -> float:
    """Train the trial's recipe; its kept epoch's validation accuracy (the loss recorded too)."""
    folder = Path(cfg.out_dir) / "trials" / f"trial-{trial.number}"
    given = {
        "train": train_csv,  # given, so no test CSV is looked for: the search never sees one
        "max_rows": cfg.max_rows,
        "val_split": cfg.val_split,
        "seed": cfg.seed,
        "device": cfg.device,
        "precision": cfg.precision,
        "model_dir": str(folder / "models"),
        "out_dir": str(folder / "out"),
        "no_plots": True,
        "quiet": True,
        **recipe_flags(suggest(trial, cfg.max_epochs)),
    }
    print(f"trial {trial.number}: python train.py {command_flags(recipe_flags(trial.params))}")
    summary = train.train(given, watchers=[Reporter(trial)])
    trial.set_user_attr("val_loss", summary["calibration"]["val_nll_before"])
    trial.set_user_attr("best_epoch", summary["best_epoch"])
    return summary["best_val_acc"]


def command_flags(flags: dict) -> str:
    """train.py flags for settings: --name value, and --augment/--no-augment."""
    parts = []
    for name, value in flags.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name}")
        else:
            parts.append(f"{flag} {value:.4g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def best_trial(study):
    """The finished trial with the highest validation accuracy, the lowest validation loss
    among equals; None before any finished."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return None
    return max(done, key=lambda t: (t.value, -t.user_attrs.get("val_loss", float("inf"))))


def search(cfg: TuneConfig) -> dict:
    """Run trials until the study holds `trials` finished ones; report the best."""
    import optuna

    storage_url(cfg)  # an in-memory storage is refused before anything is made
    train_csv = cfg.train or dataset.find_data("train")
    model.setup_device(cfg.device, cfg.precision)  # what would fail every trial fails here,
    splits = dataset.load_splits(train_csv, None, cfg.max_rows, cfg.val_split, cfg.seed)
    ensure_writable(cfg.out_dir, "--out-dir", create=True)  # the SQLite study goes there
    study = open_study(cfg, splits.task)  # before a trial is saved as failed
    quiet_user_errors()
    states = tuple(getattr(optuna.trial.TrialState, name) for name in FINISHED)
    done = sum(t.state in states for t in study.trials)
    print(f"study {cfg.study} in {storage_url(cfg)}: {done} of {cfg.trials} trials finished")
    if done < cfg.trials:
        study.optimize(
            lambda trial: objective(cfg, train_csv, trial),
            callbacks=[optuna.study.MaxTrialsCallback(cfg.trials, states=states)],
            gc_after_trial=True,
        )
    return report(cfg, study, train_csv)


def report(cfg: TuneConfig, study, train_csv: str) -> dict:
    """Print the best trial as a train.py command; write tune.json and the plots."""
    best = best_trial(study)
    if best is None:
        raise UserError(f"study {cfg.study}: no trial completed (every one was pruned or failed)")
    counts = dict(Counter(t.state.name.lower() for t in study.trials))
    command = f"python train.py --train {train_csv} {command_flags(recipe_flags(best.params))}"
    summary = {
        "study": cfg.study,
        "storage": storage_url(cfg),
        "trials": counts,
        "best": {
            "trial": best.number,
            "val_acc": best.value,
            "val_loss": best.user_attrs.get("val_loss"),
            "params": best.params,
        },
        "command": command,
        "config": asdict(cfg),
    }
    import plots

    summary["plots"] = [str(p) for p in plots.search_figures(study, Path(cfg.out_dir))]
    write_json(Path(cfg.out_dir) / "tune.json", summary)
    print(
        f"best: trial {best.number}, validation accuracy {best.value:.2%} (loss "
        f"{summary['best']['val_loss']:.4f}); trials: "
        + ", ".join(f"{n} {state}" for state, n in counts.items())
    )
    print(f"train it with: {command}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return search(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
