"""What a training run is: the recipes per preset and task, the one `Config` of a run, the
command line that gives it (parsed once) with every flag checked before any data is read, and
the merge of a resumed run's saved settings with the flags given."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import dataset
import model
from cli import PROGRESS_SECONDS, CLIParser, UserError, working_root


@dataclass(frozen=True)
class Recipe:
    """What --preset chooses for a task: the network, the length and pace of training, and how
    strongly its batches are distorted."""

    arch: str
    epochs: int
    batch_size: int
    lr: float
    augment: bool
    augment_strength: float = 1.0


# The recipes per preset and task (dataset.task_of: the class names tell digits from
# Fashion-MNIST); docs/experiments.md holds the experiments behind them.
PRESETS = {
    "best": {
        "digits": Recipe(arch="strong", epochs=15, batch_size=128, lr=3e-3, augment=True),
        "fashion": Recipe(arch="wide", epochs=20, batch_size=128, lr=3e-3, augment=True),
    },
    "fast": {
        # four epochs gain more from half-strength distortions than from full ones
        "digits": Recipe(
            arch="small_bn", epochs=4, batch_size=256, lr=1e-2, augment=True, augment_strength=0.5
        ),
        "fashion": Recipe(arch="basic_bn", epochs=6, batch_size=256, lr=1e-2, augment=False),
    },
}
DIGITS = PRESETS["best"]["digits"]
DRY_RUN_ROWS = 1000  # --dry-run trains one epoch on at most this many training rows
# Each optimizer with the settings every recipe uses with it.
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
}
SCHEDULERS = ("onecycle", "cosine", "step", "plateau", "none")
HERE = {"here": True}  # a setting of how to run on this machine: --resume takes it from its flags


@dataclass(frozen=True)
class Config:
    """Every setting of one training run. The defaults are what `python train.py` uses on
    digits; the recipe fields (arch to augment, and augment_strength) follow --preset and the
    task unless a flag gives them. Saved in every checkpoint; --resume restores all but the
    fields marked HERE."""

    train: str | None = None
    test: str | None = None
    max_rows: int | None = None
    val_split: float = 0.1
    seed: int = 0
    preset: str = "best"
    arch: str = DIGITS.arch
    epochs: int = DIGITS.epochs
    batch_size: int = DIGITS.batch_size
    lr: float = DIGITS.lr
    augment: bool = DIGITS.augment
    optimizer: str = "adamw"
    scheduler: str = "onecycle"
    label_smoothing: float = 0.1
    weight_decay: float | None = None
    width: int | None = None
    augment_strength: float = DIGITS.augment_strength
    elastic: float = 0.0
    ema: float = 0.0
    ensemble: int = 1
    out_dir: str = field(default_factory=lambda: str(working_root() / "outputs"))
    model_dir: str = field(default_factory=lambda: str(working_root() / "models"))
    device: str | None = field(default=None, metadata=HERE)
    precision: str = field(default_factory=model.default_precision, metadata=HERE)
    deterministic: bool = field(default=False, metadata=HERE)
    compile: bool = field(default=False, metadata=HERE)
    log_interval: float = field(default=PROGRESS_SECONDS, metadata=HERE)
    dry_run: bool = field(default=False, metadata=HERE)
    quiet: bool = field(default=False, metadata=HERE)
    no_plots: bool = field(default=False, metadata=HERE)
    tensorboard: str | None = field(default=None, metadata=HERE)
    resume: str | None = field(default=None, metadata=HERE)

    @classmethod
    def for_task(cls, given: dict, task: str) -> Config:
        """The settings given, the rest of the recipe from their preset for this task, and
        every other setting its default."""
        preset = given.get("preset", cls.preset)
        return cls(**{**asdict(PRESETS[preset][task]), **given})

    @classmethod
    def resumed(cls, saved: dict, given: dict, last: Path) -> Config:
        """The run a last.pt saved (a setting older than the checkpoint gets its default), run
        as this command line says (the HERE fields) and writing where it says: by default beside
        `last`, or where the run wrote when `last` is still in its own model folder. --epochs
        may change; a changed setting of what to train is refused in one line."""
        names = {f.name for f in fields(cls)}
        here = {f.name for f in fields(cls) if f.metadata == HERE}
        may_change = here | {"epochs", "model_dir", "out_dir"}
        default = cls()
        for name in sorted(given.keys() - may_change):
            if given[name] != saved.get(name, getattr(default, name)):
                flag = f"--{name.replace('_', '-')}"
                raise UserError(
                    f"{flag} {given[name]}: a resumed run keeps its settings ({flag} "
                    f"{saved.get(name)}); start a new run to change it"
                )
        kept = {name: saved[name] for name in names & saved.keys() - here}
        in_place = Path(saved.get("model_dir", "")).resolve() == last.parent.resolve()
        where = {"model_dir": str(last.parent), "out_dir": str(last.parent)}
        if in_place:
            where["out_dir"] = saved.get("out_dir", default.out_dir)
        here_given = {name: value for name, value in given.items() if name in may_change}
        return cls(**{**kept, **where, **here_given, "resume": str(last)})


def recipe_default(name: str) -> str:
    """What a recipe flag defaults to, per preset and task, for --help."""
    values = []
    for preset, by_task in PRESETS.items():
        digits, fashion = getattr(by_task["digits"], name), getattr(by_task["fashion"], name)
        values.append(
            f"{preset}: {digits}" + ("" if digits == fashion else f", Fashion-MNIST {fashion}")
        )
    return "; ".join(values)


def parse_args(argv: list[str] | None) -> dict:
    """The settings given on the command line, and only those: one not given takes its
    default from Config, or, for the recipe, from the preset. One parse: --help shows every
    default, and a namespace holding a placeholder for each setting keeps argparse from filling
    in the defaults, so that what is left there was given."""
    parser = build_parser()
    absent = object()
    namespace = argparse.Namespace(**dict.fromkeys(CONFIG_FIELDS, absent))
    parsed = vars(parser.parse_args(argv, namespace))
    return {name: value for name, value in parsed.items() if value is not absent}


def build_parser() -> CLIParser:
    """The command line's parser, with Config's defaults shown in --help."""
    default = Config()

    def value(name: str):
        return getattr(default, name)

    p = CLIParser(description="Train a CNN on Kaggle's MNIST CSVs.")
    add_data_arguments(p.add_argument_group("data"), value)
    add_recipe_arguments(p.add_argument_group("recipe"), value)
    add_run_arguments(p.add_argument_group("outputs and running"), value)
    return p


def add_data_arguments(group, value) -> None:
    """Which rows train, validate and test; `value(name)` is a flag's default."""
    group.add_argument(
        "--train",
        default=value("train"),
        help="training CSV (.csv, .gz, .zip) (default: found, see docs/data.md)",
    )
    group.add_argument(
        "--test",
        default=value("test"),
        help="labelled test CSV, scored at the end (default: found beside the training CSV)",
    )
    group.add_argument(
        "--max-rows", type=int, default=value("max_rows"), help="use the first N training rows"
    )
    group.add_argument(
        "--val-split", type=float, default=value("val_split"), help="validation share"
    )
    group.add_argument("--seed", type=int, default=value("seed"), help="split, init, shuffling")


def add_run_arguments(group, value) -> None:
    """Ensembles, where outputs go, how to run here, how to report, and --resume."""
    group.add_argument(
        "--ensemble",
        type=int,
        default=value("ensemble"),
        help="train N models with seeds SEED..SEED+N-1 into MODEL_DIR/seedK/ (predict.py "
        "averages them: --checkpoint MODEL_DIR/seed*/best.pt)",
    )
    group.add_argument("--out-dir", default=value("out_dir"), help="figures, history, metrics")
    group.add_argument("--model-dir", default=value("model_dir"), help="checkpoints")
    model.add_device_arguments(group, value("device"), value("precision"))
    for flag, what in (
        ("deterministic", "deterministic algorithms only (torch.use_deterministic_algorithms)"),
        (
            "compile",
            "torch.compile the network's forward and backward passes (a GPU's option: on a "
            "CPU compiling costs more than it saves, bench/compile_cost.py)",
        ),
        ("quiet", "no progress within an epoch (a bar on a terminal, else a line now and then)"),
        ("no_plots", "draw no figures"),
        (
            "dry_run",
            f"check the run in seconds: one epoch on the first {DRY_RUN_ROWS:,} training "
            "rows, written into a temporary folder and removed (nothing kept)",
        ),
    ):
        group.add_argument(
            f"--{flag.replace('_', '-')}", action="store_true", default=value(flag), help=what
        )
    add_logging_arguments(group, value)


def add_logging_arguments(group, value) -> None:
    """How the run reports: --log-interval, --tensorboard; and --resume."""
    group.add_argument(
        "--log-interval",
        type=float,
        default=value("log_interval"),
        metavar="SECONDS",
        help="seconds between progress lines within an epoch where stderr is not a terminal (a "
        "log file, a notebook cell)",
    )
    group.add_argument(
        "--tensorboard",
        nargs="?",
        const=str(working_root() / "outputs" / "tensorboard"),
        default=value("tensorboard"),
        metavar="DIR",
        help="log the run for TensorBoard into DIR/<run> (DIR without a value: "
        "outputs/tensorboard); needs the tensorboard package",
    )
    group.add_argument(
        "--resume",
        default=value("resume"),
        help="continue from this last.pt with its saved settings, writing beside it unless "
        "--model-dir/--out-dir say otherwise; --epochs extends a run whose schedule allows it",
    )


def add_recipe_arguments(group, value) -> None:
    """--preset, the flags it decides (absent unless given), and the rest of the recipe;
    `value(name)` is a flag's default."""
    group.add_argument(
        "--preset",
        choices=PRESETS,
        default=value("preset"),
        help="best (most accurate) or fast (shortest time to accuracy); it sets --arch, "
        "--epochs, --batch-size, --lr, --augment and --augment-strength per task unless given",
    )
    for flag, kind, what in (
        ("arch", str, ", ".join(model.ARCHITECTURES)),
        ("epochs", int, "passes over the data"),
        ("batch_size", int, "images a step"),
        ("lr", float, "(peak) learning rate"),
    ):
        help_text = f"{what} (default: {recipe_default(flag)})"
        group.add_argument(
            f"--{flag.replace('_', '-')}", type=kind, default=argparse.SUPPRESS, help=help_text
        )
    group.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help=f"random distortions per batch (default: {recipe_default('augment')})",
    )
    add_optimization_arguments(group, value)
    add_distortion_and_averaging_arguments(group, value)


def add_optimization_arguments(group, value) -> None:
    """The recipe's optimizer, schedule, loss and regularisation flags."""
    settings = "; ".join(
        f"{name}: {', '.join(f'{k} {v}' for k, v in kw.items()) or 'defaults'}"
        for name, (_, kw) in OPTIMIZERS.items()
    )
    group.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=value("optimizer"), help=f"with {settings}"
    )
    group.add_argument(
        "--scheduler", choices=SCHEDULERS, default=value("scheduler"), help="learning-rate schedule"
    )
    group.add_argument(
        "--label-smoothing", type=float, default=value("label_smoothing"), help="of the loss"
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=value("weight_decay"),
        help="the optimizer's weight decay (default: its setting above)",
    )
    group.add_argument(
        "--width",
        type=int,
        default=value("width"),
        help="channels of the first block, for architectures with a width (default: the "
        "architecture's own; strong: 32)",
    )


def add_distortion_and_averaging_arguments(group, value) -> None:
    """The recipe's flags of how strongly to distort, and of the weights' average."""
    group.add_argument(
        "--augment-strength",
        type=float,
        default=argparse.SUPPRESS,
        help="multiplies the ranges of rotation, shift, scale and shear (default: "
        f"{recipe_default('augment_strength')})",
    )
    group.add_argument(
        "--elastic",
        type=float,
        default=value("elastic"),
        metavar="PIXELS",
        help="with --augment, also an elastic distortion: a smooth random displacement of the "
        "pixels, at most this many pixels at its control points (0: none)",
    )
    group.add_argument(
        "--ema",
        type=float,
        default=value("ema"),
        metavar="DECAY",
        help="validate, keep and score an exponential moving average of the weights, with this "
        "decay a step, reached after a warm-up: step t's decay is at most (1 + t) / (10 + t) "
        "(0: none)",
    )


MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take this range
MAX_ENSEMBLE = 100
# The numeric flags' ranges: (lowest, highest, whether the highest is allowed).
RANGES = {
    "seed": (0, MAX_SEED, True),
    "epochs": (1, model.MAX_EPOCHS, True),
    "batch_size": (1, math.inf, False),
    "ensemble": (1, MAX_ENSEMBLE, True),
    "max_rows": (dataset.MIN_TRAIN_ROWS, math.inf, False),
    "label_smoothing": (0, 1, False),
    "weight_decay": (0, 1.0, True),
    "augment_strength": (0, 3.0, True),
    "elastic": (0, 8.0, True),
    "ema": (0, 1, False),
    "width": (1, model.MAX_WIDTH, True),
    "log_interval": (0, math.inf, False),
}


def range_problem(name: str, value: float) -> str | None:
    """Why `value` is outside the range of the flag `name`, or None."""
    low, high, closed = RANGES[name]
    if value >= low and (value <= high if closed else value < high):
        return None
    if high == math.inf:
        return f"must be at least {low}"
    return (
        f"must be in [{low:g}, {high:{'d' if type(high) is int else 'g'}}{']' if closed else ')'}"
    )


def check_flags(given: dict) -> None:
    """Reject settings given that cannot train, one line each, before any data is read;
    defaults and a preset's values are valid as they are."""
    for name in (name for name in RANGES if name in given):
        problem = given[name] is not None and range_problem(name, given[name])
        if problem:
            raise UserError(f"--{name.replace('_', '-')} {given[name]}: {problem}")
    if "val_split" in given:
        dataset.check_val_split(given["val_split"])
    if "lr" in given and not 0 < given["lr"] < math.inf:
        raise UserError(f"--lr {given['lr']}: must be a positive number (for example 3e-3)")
    if "arch" in given:
        model.require_arch(given["arch"])
    preset = given.get("preset", "best")
    augments = given.get("augment", all(r.augment for r in PRESETS[preset].values()))
    if given.get("elastic") and not augments:  # the task is not known yet: every one must augment
        why = "" if "augment" in given else f", and --preset {preset} does not augment every task"
        raise UserError(
            f"--elastic {given['elastic']:g}: distorts augmented batches{why} (add --augment)"
        )
    if given.get("tensorboard") is not None:
        import tensorboard_log

        tensorboard_log.require()


# Config's annotations as the types a saved setting may have
SAVED_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}
SAVED_TYPES["None"] = (type(None),)


def check_saved(saved: dict, where: str) -> None:
    """Refuse the settings of a last.pt that this project cannot have written (a setting of the
    wrong type, out of its flag's range, or not one of its choices), one line naming `where`."""
    recipe = {}
    for f in fields(Config):
        if f.name not in saved or f.metadata == HERE:
            continue  # what this machine runs with comes from the command line, not the file
        value = saved[f.name]
        allowed = tuple(t for part in f.type.split(" | ") for t in SAVED_TYPES[part])
        if not isinstance(value, allowed) or (type(value) is bool and bool not in allowed):
            raise UserError(f"{where}: its setting {f.name} {str(value)[:40]!r} is not {f.type}")
        recipe[f.name] = value
    for name, choices in (
        ("preset", PRESETS),
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
    ):
        if name in recipe and recipe[name] not in choices:
            raise UserError(f"{where}: its setting {name} {recipe[name][:40]!r} is not a choice")
    try:
        check_flags(recipe)
    except UserError as e:
        raise UserError(f"{where}: its saved setting {e}") from None


def check_extension(cfg: Config, last: dict) -> None:
    """Refuse an --epochs that a resumed run cannot reach: fewer than it has trained, or more
    or fewer than a schedule laid out for the whole run (onecycle, cosine, step) was made for."""
    planned = last["config"]["epochs"]
    if cfg.epochs < last["epoch"]:
        raise UserError(f"--epochs {cfg.epochs}: {last['epoch']} epochs are trained already")
    if cfg.epochs != planned and cfg.scheduler in ("onecycle", "cosine", "step"):
        raise UserError(
            f"--epochs {cfg.epochs}: the {cfg.scheduler} schedule of this run was laid out for "
            f"{planned} epochs (extend runs trained with --scheduler plateau or none, or start a "
            "new run)"
        )


CONFIG_FIELDS = tuple(f.name for f in fields(Config))
