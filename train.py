"""Train a CNN on Kaggle's MNIST CSVs.

    python train.py                                  # the found data, the default recipe
    python train.py --arch basic --epochs 15 --no-augment
    python train.py --resume models/last.pt          # continue an interrupted run exactly

Writes models/best.pt (lowest validation loss) and models/last.pt every epoch, and
outputs/history.csv, outputs/training_curves.png and outputs/metrics.json.

Read top to bottom: the configuration (presets, `Config`, the command line), the data, the run
(network, batches, optimization), its checkpoint state, the epoch loop, and the entry points.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataset
import ddp
import model
import report
from atomic import atomic_write, ensure_writable, write_json
from cli import CLIParser, Terminated, UserError, run_cli, working_root

# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Recipe:
    """What --preset chooses for a task: the network, the length and pace of training."""

    arch: str
    epochs: int
    batch_size: int
    lr: float
    augment: bool


# The recipes per preset and task (dataset.task_of: the class names tell digits from
# Fashion-MNIST); docs/experiments.md holds the experiments behind them.
FAST = Recipe(arch="basic_bn", epochs=6, batch_size=256, lr=1e-2, augment=False)
PRESETS = {
    "best": {
        "digits": Recipe(arch="strong", epochs=15, batch_size=128, lr=3e-3, augment=True),
        "fashion": Recipe(arch="wide", epochs=20, batch_size=128, lr=3e-3, augment=True),
    },
    "fast": {"digits": FAST, "fashion": FAST},
}
DIGITS = PRESETS["best"]["digits"]
# Each optimizer with the settings every recipe uses with it.
OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "adam": (torch.optim.Adam, {}),
    "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
}
SCHEDULERS = ("onecycle", "cosine", "step", "plateau", "none")
HERE = {"here": True}  # a setting of how to run on this machine: --resume takes it from its flags
RANK_SEED_STEP = 7919  # torchrun rank r > 0 draws its dropout masks from seed + r * this
PROGRESS_SECONDS = 30.0  # outside a terminal, a progress line this often within an epoch


@dataclass(frozen=True)
class Config:
    """Every setting of one training run. The defaults are what `python train.py` uses on
    digits; the recipe fields (arch to augment) follow --preset and the task unless a flag gives
    them. Saved in every checkpoint; --resume restores all but the fields marked HERE."""

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
    augment_strength: float = 1.0
    ensemble: int = 1
    out_dir: str = field(default_factory=lambda: str(working_root() / "outputs"))
    model_dir: str = field(default_factory=lambda: str(working_root() / "models"))
    device: str | None = field(default=None, metadata=HERE)
    precision: str = field(default_factory=model.default_precision, metadata=HERE)
    deterministic: bool = field(default=False, metadata=HERE)
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
    default from Config, or, for the recipe, from the preset. (--help shows every default.)"""
    build_parser(Config()).parse_args(argv)  # --help and every error, with the defaults shown
    return vars(build_parser(None).parse_args(argv))


def build_parser(default: Config | None) -> CLIParser:
    """The command line's parser: with `default`'s values as defaults, or (None) with every
    flag absent unless given."""

    def value(name: str):
        return argparse.SUPPRESS if default is None else getattr(default, name)

    p = CLIParser(description="Train a CNN on Kaggle's MNIST CSVs.")
    add_data_arguments(p.add_argument_group("data"), value)
    add_recipe_arguments(p.add_argument_group("recipe"), value)
    add_run_arguments(p.add_argument_group("outputs and running"), value)
    return p


def add_data_arguments(group, value) -> None:
    """Which rows train, validate and test; `value(name)` is a flag's default."""
    group.add_argument(
        "--train", default=value("train"), help="training CSV (.csv, .gz, .zip); None: found"
    )
    group.add_argument(
        "--test", default=value("test"), help="labelled test CSV, scored at the end; None: found"
    )
    group.add_argument(
        "--max-rows", type=int, default=value("max_rows"), help="use the first N training rows"
    )
    group.add_argument(
        "--val-split", type=float, default=value("val_split"), help="validation share"
    )
    group.add_argument("--seed", type=int, default=value("seed"), help="split, init, shuffling")


def add_run_arguments(group, value) -> None:
    """Ensembles, where outputs go, how to run here, and --resume."""
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
        ("quiet", "no progress within an epoch (a bar on a terminal, else a line every 30 s)"),
        ("no_plots", "draw no figures"),
    ):
        group.add_argument(
            f"--{flag.replace('_', '-')}", action="store_true", default=value(flag), help=what
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
    """--preset, the five flags it decides (absent unless given), and the rest of the recipe;
    `value(name)` is a flag's default."""
    group.add_argument(
        "--preset",
        choices=PRESETS,
        default=value("preset"),
        help="best (most accurate) or fast (shortest time to accuracy); it sets --arch, "
        "--epochs, --batch-size, --lr and --augment per task unless given",
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
        help="the optimizer's weight decay; None: its setting above",
    )
    group.add_argument(
        "--width",
        type=int,
        default=value("width"),
        help="channels of the first block, for architectures with a width (strong: 32); None: "
        "the architecture's own",
    )
    group.add_argument(
        "--augment-strength",
        type=float,
        default=value("augment_strength"),
        help="multiplies the ranges of rotation, shift, scale and shear",
    )


def check_flags(given: dict) -> None:
    """Reject settings given that cannot train, one line each; defaults and a preset's values
    are valid as they are, and --val-split is checked where the split is made."""
    for key in ("epochs", "batch_size", "ensemble"):
        if key in given and given[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} {given[key]}: must be at least 1")
    if "lr" in given and not 0 < given["lr"] < math.inf:
        raise UserError(f"--lr {given['lr']}: must be a positive number (for example 3e-3)")
    if "label_smoothing" in given and not 0 <= given["label_smoothing"] < 1:
        raise UserError(f"--label-smoothing {given['label_smoothing']}: must be in [0, 1)")
    for key, top in (("weight_decay", 1.0), ("augment_strength", 3.0)):
        if given.get(key) is not None and not 0 <= given[key] <= top:
            raise UserError(f"--{key.replace('_', '-')} {given[key]}: must be in [0, {top:g}]")
    if given.get("width") is not None and not 1 <= given["width"] <= model.MAX_WIDTH:
        raise UserError(f"--width {given['width']}: must be in [1, {model.MAX_WIDTH}]")
    if given.get("max_rows") is not None and given["max_rows"] < dataset.MIN_TRAIN_ROWS:
        raise UserError(
            f"--max-rows {given['max_rows']}: must be at least {dataset.MIN_TRAIN_ROWS}"
        )
    if "arch" in given:
        model.require_arch(given["arch"])
    if given.get("tensorboard") is not None:
        import tensorboard_log

        tensorboard_log.require()


# ---------------------------------------------------------------- data


@dataclass
class Splits:
    """A run's data: the training CSV as parsed, its rows split into training and validation,
    and the labelled test set when there is one."""

    parsed: dataset.CSVData
    train: dataset.CSVData
    val: dataset.CSVData
    test: dataset.CSVData | None

    @property
    def task(self) -> str:
        return dataset.task_of(self.parsed.class_names)

    def seen_rows(self) -> dict[str, torch.Tensor]:
        """The leak guard's fingerprint of the rows the run learns from: the pixel hashes of the
        training and validation rows (8 bytes a row), which predict.py compares its input with."""
        return {
            name: torch.from_numpy(np.unique(dataset.row_hashes(part.images)).view(np.int64))
            for name, part in (("train", self.train), ("val", self.val))
        }


def load_splits(settings: Config) -> Splits:
    """The training CSV (given or found), its first `max_rows` rows split stratified, and the
    test CSV (given, or found when the training CSV was) when it is labelled."""
    train_source = settings.train or dataset.find_data("train")
    test_source = settings.test
    if test_source is None and settings.train is None:
        test_source = dataset.find_data("test", announce=False)
    parsed = dataset.load_csv(train_source)
    if parsed.labels is None:
        raise UserError(f"{parsed.source}: has no label column (training needs labelled rows)")
    rows = slice(settings.max_rows)
    images, labels = parsed.images[rows], parsed.labels[rows]
    if len(labels) < dataset.MIN_TRAIN_ROWS:
        raise UserError(
            f"{parsed.source}: {len(labels)} labelled row; training needs at least "
            f"{dataset.MIN_TRAIN_ROWS} (one to train on, one to validate)"
        )
    if len(np.unique(labels)) < 2:
        name = parsed.class_names[labels[0]]
        print(
            f"warning: {parsed.source}: every training row is class {name}, so the model can "
            f"only learn to answer {name}",
            file=sys.stderr,
        )
    train_rows, val_rows = dataset.stratified_split(labels, settings.val_split, settings.seed)
    test = dataset.load_csv(test_source) if test_source else None

    def part(which: np.ndarray) -> dataset.CSVData:
        return dataset.CSVData(images[which], labels[which], parsed.layout, parsed.source)

    labelled_test = test if test is not None and test.labels is not None else None
    return Splits(parsed, part(train_rows), part(val_rows), labelled_test)


# ---------------------------------------------------------------- the run


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule `cfg` names, and whether it steps per batch (else per epoch)."""
    schedulers = torch.optim.lr_scheduler
    if cfg.scheduler == "onecycle":
        return schedulers.OneCycleLR(optimizer, cfg.lr, total_steps=total_steps), True
    if cfg.scheduler == "cosine":
        return schedulers.CosineAnnealingLR(optimizer, T_max=total_steps), True
    if cfg.scheduler == "step":
        return schedulers.StepLR(optimizer, step_size=max(1, cfg.epochs // 3), gamma=0.1), False
    if cfg.scheduler == "plateau":
        return schedulers.ReduceLROnPlateau(optimizer, factor=0.3, patience=1), False
    return None, False


@dataclass
class Optimization:
    """The optimizer, its learning-rate schedule and (with fp16) the loss scaler: `step(loss)`
    once a batch, `end_epoch(val_loss)` once an epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    schedule_per_batch: bool
    scaler: torch.amp.GradScaler | None

    @classmethod
    def create(cls, cfg: Config, net: nn.Module, steps_per_epoch: int, fp16: bool) -> Optimization:
        """The optimizer and schedule `cfg` names for `net`; a loss scaler for fp16."""
        kind, settings = OPTIMIZERS[cfg.optimizer]
        if cfg.weight_decay is not None:
            settings = {**settings, "weight_decay": cfg.weight_decay}
        optimizer = kind(net.parameters(), lr=cfg.lr, **settings)
        scheduler, per_batch = make_scheduler(cfg, optimizer, cfg.epochs * steps_per_epoch)
        device_type = next(net.parameters()).device.type
        scaler = torch.amp.GradScaler(device_type) if fp16 else None
        return cls(optimizer, scheduler, per_batch, scaler)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        """Backward and one optimizer step; a per-batch schedule steps unless the loss scaler
        skipped the step (an fp16 overflow, which it answers by lowering its scale)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
            stepped = True
        else:
            scale = self.scaler.get_scale()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale
        if self.scheduler is not None and self.schedule_per_batch and stepped:
            self.scheduler.step()

    def end_epoch(self, val_loss: float) -> None:
        """Step a per-epoch schedule; the plateau schedule watches the validation loss."""
        if self.scheduler is None or self.schedule_per_batch:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(val_loss)
        else:
            self.scheduler.step()


@dataclass
class Run:
    """One training run in progress: its settings, network, batches, optimization and record."""

    cfg: Config
    precision: model.Precision
    net: nn.Module
    trained: nn.Module  # `net` as the steps see it: under DistributedDataParallel with torchrun
    ranks: ddp.Ranks
    augment: dataset.Augment | None
    train_batches: dataset.DeviceBatches  # this rank's share of each batch
    val_batches: dataset.DeviceBatches  # the whole validation split
    val_shard: dataset.DeviceBatches  # this rank's share of it, validated every epoch
    optimization: Optimization
    checkpoint_meta: dict  # what every checkpoint holds besides weights and progress
    watchers: list = field(default_factory=list)  # told of each epoch (.epoch) and the end
    history: list[dict] = field(default_factory=list)
    best_val_acc: float = -1.0
    epoch: int = 0  # the last finished epoch
    train_seconds: float = 0.0  # spent in training epochs by this process
    epochs_here: int = 0  # epochs trained by this process (a resumed run counts its own)

    @property
    def device(self) -> torch.device:
        return self.train_batches.device


def build_run(
    cfg: Config,
    splits: Splits,
    device: torch.device,
    precision: model.Precision,
    ranks: ddp.Ranks = ddp.SINGLE,
) -> Run:
    """A freshly initialised network (seeded), the batches on the device (this rank's share),
    the optimization."""
    if cfg.batch_size < ranks.world:
        raise UserError(f"--batch-size {cfg.batch_size}: fewer images than the {ranks.world} ranks")
    mean, std = dataset.pixel_stats(splits.train.images)
    augment = None
    if cfg.augment:
        policy = dataset.Augment.for_classes(splits.parsed.class_names)
        augment = policy.scaled(cfg.augment_strength)
    torch.manual_seed(cfg.seed)
    kwargs = model.arch_kwargs(cfg.arch, len(splits.parsed.class_names), cfg.width)
    net = precision.place(model.build(cfg.arch, **kwargs), device)
    if ranks.rank:  # its own dropout masks; the weights are rank 0's (DDP broadcasts them)
        torch.manual_seed(cfg.seed + RANK_SEED_STEP * ranks.rank)
    normalize = dataset.Normalize(mean, std, precision.channels_last)
    train, val = splits.train, splits.val
    train_batches = dataset.DeviceBatches(
        train.images, train.labels, cfg.batch_size, device, normalize, cfg.seed, augment
    ).share(*ranks.shard)
    val_batches = dataset.DeviceBatches(
        val.images, val.labels, dataset.EVAL_BATCH_SIZE, device, normalize
    )
    val_shard = val_batches
    if ranks.world > 1:
        mine = slice(ranks.rank, None, ranks.world)
        val_shard = dataset.DeviceBatches(
            val.images[mine], val.labels[mine], dataset.EVAL_BATCH_SIZE, device, normalize
        )
    optimization = Optimization.create(cfg, net, len(train_batches), precision.grad_scaler)
    meta = {
        "arch": cfg.arch,
        "arch_kwargs": kwargs,
        "mean": mean,
        "std": std,
        "class_names": list(splits.parsed.class_names),
        "seen_rows": splits.seen_rows(),
        "data": {
            "source": splits.parsed.source,
            "train_rows": len(splits.train),
            "val_rows": len(splits.val),
        },
        "config": asdict(cfg),
        "versions": model.library_versions(),
        "curves": curves_caption(cfg, net),  # how the history's training metrics were measured
    }
    return Run(
        cfg=cfg,
        precision=precision,
        net=net,
        trained=ddp.wrap(net, ranks, device),
        ranks=ranks,
        augment=augment,
        train_batches=train_batches,
        val_batches=val_batches,
        val_shard=val_shard,
        optimization=optimization,
        checkpoint_meta=meta,
    )


# ---------------------------------------------------------------- checkpoint state


def training_state(run: Run, rank_rngs: list[torch.Tensor]) -> dict:
    """What last.pt holds besides the weights, so that --resume continues exactly where the run
    stopped (`rank_rngs`: every torchrun rank's random state, rank 0's first);
    restore_training_state, below, reads back every key (and the history, which every
    checkpoint holds)."""
    opt = run.optimization
    rng = {"torch": rank_rngs[0], "batches": run.train_batches.generator.get_state()}
    if len(rank_rngs) > 1:
        rng["ranks"] = rank_rngs
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": None if opt.scheduler is None else opt.scheduler.state_dict(),
        "scaler": None if opt.scaler is None else opt.scaler.state_dict(),
        "rng": rng,
        "best_val_acc": run.best_val_acc,
    }


def restore_training_state(run: Run, last: dict) -> None:
    """Put back what training_state saved, and the weights and epoch of that last.pt."""
    opt = run.optimization
    run.net.load_state_dict(last["state_dict"])
    opt.optimizer.load_state_dict(last["optimizer"])
    if opt.scheduler is not None:
        opt.scheduler.load_state_dict(last["scheduler"])
    if opt.scaler is not None and last["scaler"]:
        opt.scaler.load_state_dict(last["scaler"])
    rank_rngs = last["rng"].get("ranks", [])
    if len(rank_rngs) == run.ranks.world:
        torch.set_rng_state(rank_rngs[run.ranks.rank])
    elif run.ranks.main:  # other ranks keep their own seeds when the number of ranks changed
        torch.set_rng_state(last["rng"]["torch"])
    run.train_batches.generator.set_state(last["rng"]["batches"])
    if run.device.type == "cuda" and "cuda" in last["rng"]:
        torch.cuda.set_rng_state(last["rng"]["cuda"], run.device)
    run.history, run.best_val_acc, run.epoch = last["history"], last["best_val_acc"], last["epoch"]


def validates_better(row: dict, other: dict) -> bool:
    """Whether an epoch's history row beats another's: lower validation loss, or the same with a
    higher validation accuracy. Accuracy on a small split moves in steps of one image and
    saturates: trained on 4,500 real digits, 500/500 at epoch 8 beat 499/500 at epoch 12 (loss
    0.132 against 0.105) and scored 94.6% on other writers, the later epoch 96.2%."""
    return (-row["val_loss"], row["val_acc"]) > (-other["val_loss"], other["val_acc"])


def save_checkpoints(run: Run, row: dict) -> None:
    """last.pt every epoch; best.pt when the epoch validates better than every earlier one (see
    `validates_better`). Both are written before either is replaced, best.pt first: a failure
    changes neither, and a kill between the two renames leaves a last.pt whose resumed run writes
    the same best.pt again. Under torchrun every rank calls it and rank 0 writes."""
    rank_rngs = ddp.gather(torch.get_rng_state(), run.ranks)
    if not run.ranks.main:
        return
    model_dir = Path(run.cfg.model_dir)
    state = {**run.checkpoint_meta, "state_dict": run.net.state_dict(), "epoch": run.epoch}
    state |= {"metrics": row, "history": run.history}
    checkpoints = {}
    if all(validates_better(row, earlier) for earlier in run.history[:-1]):
        run.best_val_acc = row["val_acc"]
        checkpoints[model_dir / "best.pt"] = state
    checkpoints[model_dir / "last.pt"] = {**state, **training_state(run, rank_rngs)}
    model.save_checkpoints(checkpoints)


# ---------------------------------------------------------------- the epoch loop


class ProgressLines:
    """Progress within an epoch as a plain line on stderr about every PROGRESS_SECONDS, for
    where a bar cannot redraw: a log file, a notebook cell, Kaggle's batch log."""

    def __init__(self, label: str, batches: int) -> None:
        self.label, self.batches, self.every = label, batches, PROGRESS_SECONDS
        self.started = self.last = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.last >= self.every

    def show(self, done: int, seen: int, loss: float, acc: float) -> None:
        self.last = time.perf_counter()
        rate = seen / (self.last - self.started)
        left = (self.last - self.started) * (self.batches - done) / done
        print(
            f"{self.label}  batch {done}/{self.batches}  loss {loss:.4f} acc {acc:6.2%}  "
            f"{rate:,.0f} images/s  {left:.0f}s left in the epoch",
            file=sys.stderr,
            flush=True,
        )


def train_epoch(
    net: nn.Module,
    batches: dataset.DeviceBatches,
    optimization: Optimization,
    precision: model.Precision,
    label_smoothing: float,
    progress: str | None,
) -> torch.Tensor:
    """One pass over the shuffled (and augmented) training batches: the sums of the loss and of
    the right answers, the images seen, and the first batch (from 1) whose loss was not finite
    (0: none), as one tensor for the ranks to reduce. `progress` labels the progress shown: a
    live bar on a terminal, else ProgressLines; None shows none."""
    from tqdm import tqdm

    net.train()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    first_bad = torch.zeros((), device=batches.device, dtype=torch.long)  # no sync a batch
    seen = 0
    live = progress is not None and sys.stderr.isatty()
    lines = ProgressLines(progress, len(batches)) if progress is not None and not live else None
    bar = tqdm(batches, desc=progress, leave=False, disable=not live, unit="batch")
    for i, (xb, yb) in enumerate(bar, 1):
        with precision.autocast(batches.device):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        optimization.step(loss)
        bad = ~torch.isfinite(loss.detach()) & (first_bad == 0)
        first_bad = torch.where(bad, i, first_bad)
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
        if live and i % 20 == 1:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}"
            )
        elif lines is not None and lines.due() and i < len(batches):
            lines.show(i, seen, loss_sum.item() / seen, correct.item() / seen)
    seen = torch.tensor(float(seen), device=batches.device)
    return torch.stack((loss_sum.float(), correct.float(), seen, first_bad.float()))


def predict_logits(
    net: nn.Module, batches: dataset.DeviceBatches, precision: model.Precision
) -> torch.Tensor:
    """`net`'s logits (float32) for every row of `batches`, in order, in eval mode."""
    net.eval()
    with torch.no_grad(), precision.autocast(batches.device):
        return torch.cat([net(xb).float() for xb, _ in batches])


def score(
    net: nn.Module, batches: dataset.DeviceBatches, precision: model.Precision
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `net` over all batches, in eval mode, no gradients."""
    loss_sum, correct, n = score_sums(net, batches, precision).tolist()
    return loss_sum / n, correct / n


def score_sums(
    net: nn.Module, batches: dataset.DeviceBatches, precision: model.Precision
) -> torch.Tensor:
    """The summed cross-entropy and right answers of `net` over all batches, and their rows."""
    logits = predict_logits(net, batches, precision)
    loss_sum = F.cross_entropy(logits, batches.y, reduction="sum")
    correct = (logits.argmax(1) == batches.y).sum()
    n = torch.tensor(float(len(batches.y)), device=batches.device)
    return torch.stack((loss_sum, correct.float(), n))


def validate(run: Run) -> tuple[float, float]:
    """Validation loss and accuracy of rank 0's network, each rank scoring its share."""
    ddp.share_buffers(run.net, run.ranks)
    loss_sum, correct, n = ddp.reduce(score_sums(run.net, run.val_shard, run.precision), run.ranks)
    return (loss_sum / n).item(), (correct / n).item()


def fit(run: Run) -> None:
    """The epochs left, one after another; a stop by Ctrl-C or SIGTERM says how to resume."""
    try:
        for epoch in range(run.epoch + 1, run.cfg.epochs + 1):
            run_epoch(run, epoch)
    except (KeyboardInterrupt, Terminated):
        if run.epoch and run.ranks.main:
            last = Path(run.cfg.model_dir) / "last.pt"
            print(
                f"stopped in epoch {run.epoch + 1}; {last} holds epoch {run.epoch}: resume with "
                f"python train.py --resume {last}",
                file=sys.stderr,
            )
        raise


def run_epoch(run: Run, epoch: int) -> None:
    """Train an epoch, validate, schedule, then checkpoint, record and print it; stop at a
    non-finite loss before anything of the epoch is saved."""
    cfg = run.cfg
    started = time.perf_counter()
    shown = not cfg.quiet and run.ranks.main
    progress = f"epoch {epoch}/{cfg.epochs}" if shown else None
    sums = train_epoch(
        run.trained,
        run.train_batches,
        run.optimization,
        run.precision,
        cfg.label_smoothing,
        progress,
    )
    bad = ddp.reduce(torch.where(sums[3:] > 0, sums[3:], math.inf), run.ranks, "min")
    loss_sum, correct, seen = ddp.reduce(sums[:3].contiguous(), run.ranks).tolist()
    train_loss, train_acc = loss_sum / seen, correct / seen
    train_seconds = time.perf_counter() - started
    run.train_seconds += train_seconds
    run.epochs_here += 1
    val_loss, val_acc = validate(run)
    bad_batch = int(bad.item()) if math.isfinite(bad.item()) else None
    stop_if_diverged(run, epoch, bad_batch, (train_loss, val_loss))
    lr = run.optimization.lr
    run.optimization.end_epoch(val_loss)
    seconds = time.perf_counter() - started
    row = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_acc": round(train_acc, 5)}
    row |= {"val_loss": round(val_loss, 5), "val_acc": round(val_acc, 5), "lr": lr}
    row |= {"seconds": round(seconds, 2), "images_per_s": round(seen / train_seconds)}
    run.history.append(row)
    run.epoch = epoch
    save_checkpoints(run, row)
    if not run.ranks.main:
        return
    write_history(Path(cfg.out_dir) / "history.csv", run.history)
    print(
        f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:6.2%}  "
        f"val loss {val_loss:.4f} acc {val_acc:6.2%}  lr {lr:.2e}  {seconds:5.1f}s",
        flush=True,
    )
    for watcher in run.watchers:
        watcher.epoch(run, row)


def stop_if_diverged(run: Run, epoch: int, bad_batch: int | None, losses: tuple) -> None:
    """One line naming the epoch and batch when the training loss (or, after the last batch,
    the validation loss) stopped being finite, before anything of the epoch is saved."""
    train_loss, val_loss = losses
    if not bad_batch and math.isfinite(val_loss):
        return
    what = f"batch {bad_batch}: the loss is {train_loss}"
    if not bad_batch:
        what = f"batch {len(run.train_batches)} (the last): the weights are no longer finite"
    raise UserError(
        f"epoch {epoch}, {what}: training diverged (try a lower --lr than {run.cfg.lr:g}); "
        "nothing of this epoch was saved"
    )


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------- after the epochs


def score_test(run: Run, net: nn.Module, test: dataset.CSVData) -> dict:
    """best.pt's network scored once on the labelled test set."""
    batches = dataset.DeviceBatches(
        test.images, test.labels, dataset.EVAL_BATCH_SIZE, run.device, run.val_batches.normalize
    )
    loss, acc = score(net, batches, run.precision)
    print(f"test accuracy {acc:.2%} on {len(test):,} images from {test.source}")
    return {"test_loss": loss, "test_acc": acc, "test_source": test.source}


def calibrate(run: Run, logits: np.ndarray, best: dict, best_path: Path) -> dict:
    """Fit the temperature of best.pt (`best`, whose validation logits are `logits`) on the
    validation split (report.fit_temperature) and store it in best.pt, which predict.py then
    applies; the fit's figures, before and after."""
    labels = run.val_batches.y.cpu().numpy()
    temperature = report.fit_temperature(logits, labels)
    model.save_checkpoint(best_path, {**best, "temperature": temperature})
    fit = {"temperature": round(temperature, 4)}
    for name, t in (("before", 1.0), ("after", temperature)):
        probs = report.softmax(logits, t)
        fit[f"val_ece_{name}"] = round(report.expected_calibration_error(probs, labels), 5)
        fit[f"val_nll_{name}"] = round(report.nll(logits, labels, t), 5)
    print(
        f"calibration: temperature {temperature:.3f} fitted on the validation split; its "
        f"expected calibration error {fit['val_ece_before']:.2%} -> {fit['val_ece_after']:.2%}"
    )
    return fit


def curves_caption(cfg: Config, net: nn.Module) -> str:
    """How the training metrics were measured, for the curves' title."""
    measured = ["augmented batches"] if cfg.augment else []
    if any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in net.modules()):
        measured.append("dropout on")
    if cfg.label_smoothing:
        measured.append("label-smoothed loss")
    return ", ".join(measured) or "as in evaluation"


def finish(run: Run, splits: Splits, started: float) -> dict:
    """The test score of best.pt, metrics.json and the training curves; the run's summary."""
    cfg = run.cfg
    best_path = Path(cfg.model_dir) / "best.pt"
    best = model.load_checkpoint(best_path)
    net = run.precision.place(model.model_from_checkpoint(best), run.device)
    val_logits = predict_logits(net, run.val_batches, run.precision).cpu().numpy()
    fit = calibrate(run, val_logits, best, best_path)
    images_per_s = len(splits.train) * run.epochs_here / max(run.train_seconds, 1e-9)
    summary = {
        "best_epoch": best["epoch"],
        "best_val_acc": best["metrics"]["val_acc"],
        "calibration": fit,
        "train_images_per_s": round(images_per_s),
        "train_seconds": round(run.train_seconds, 1),
        "numerics": f"{run.device.type}, {run.precision.describe()}",
        "train_images": len(splits.train),
        "train_source": splits.parsed.source,
    }
    if splits.test is not None:
        summary.update(score_test(run, net, splits.test))
    summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    versions = run.checkpoint_meta["versions"]
    write_json(
        Path(cfg.out_dir) / "metrics.json", {**summary, "config": asdict(cfg), "versions": versions}
    )
    if not cfg.no_plots:
        import plots

        path = Path(cfg.out_dir) / "training_curves.png"
        plots.training_curves(run.history, best["epoch"], path, run.checkpoint_meta["curves"])
    print(
        f"best epoch {summary['best_epoch']} (validation loss {best['metrics']['val_loss']:.4f}, "
        f"accuracy {summary['best_val_acc']:.2%}) -> {Path(cfg.model_dir) / 'best.pt'}; "
        f"{summary['train_images_per_s']:,} training images/s"
    )
    for watcher in run.watchers:
        watcher.finish(run, summary, best["epoch"], val_logits)
    return summary


# ---------------------------------------------------------------- entry points


def train(
    given: dict, resume: dict | None = None, ranks: ddp.Ranks = ddp.SINGLE, watchers=()
) -> dict:
    """One training run from the settings given, or the continuation of `resume`, a last.pt
    whose settings `given` then holds in full; this process is rank `ranks` of it, and every
    `watchers` item sees each epoch (.epoch) and the end (.finish). Returns the run's summary
    (on rank 0; the others return {})."""
    started = time.perf_counter()
    draft = Config(**given)  # the recipe waits for the task
    for directory, flag in ((draft.model_dir, "--model-dir"), (draft.out_dir, "--out-dir")):
        ensure_writable(directory, flag)
    name = ddp.device_name(draft.device, ranks, torch.cuda.is_available())
    device, precision = model.setup_device(name, draft.precision)
    ddp.start(ranks, device)
    splits = load_splits(draft)
    cfg = Config.for_task(given, splits.task)
    run = build_run(cfg, splits, device, precision, ranks)
    if resume is not None:
        restore_training_state(run, resume)
    processes = f"; {ranks.world} processes (torchrun)" if ranks.world > 1 else ""
    print(
        f"training {cfg.arch} (--preset {cfg.preset}, {splits.task}) on {len(splits.train):,} "
        f"images ({len(splits.val):,} for validation) from {splits.parsed.source}; "
        f"{device.type}, {precision.describe()}{processes}"
    )
    if ranks.main:
        run.watchers.extend([*watchers, *board(run, resume)])
    if not cfg.no_plots and resume is None and ranks.main:
        import plots

        plots.exploration_figures(splits.parsed, run.augment, Path(cfg.out_dir))
    fit(run)
    summary = finish(run, splits, started) if ranks.main else {}
    ddp.wait_for_all(ranks)
    return summary


def board(run: Run, resume: dict | None) -> list:
    """The TensorBoard watcher --tensorboard asks for, in the folder of the run (a resumed run
    continues its own), or none."""
    if run.cfg.tensorboard is None:
        return []
    import tensorboard_log

    name = (resume or {}).get("tensorboard_run") or tensorboard_log.run_name(
        run.cfg.arch, run.cfg.seed
    )
    run.checkpoint_meta["tensorboard_run"] = name
    log_dir = Path(run.cfg.tensorboard) / name
    print(f"TensorBoard: {log_dir} (tensorboard --logdir {run.cfg.tensorboard})")
    return [tensorboard_log.Board(log_dir, first_epoch=run.epoch + 1)]


def member_dir(root: str | Path, seed: int) -> Path:
    """Where an ensemble member of this seed writes, inside `root`."""
    return Path(root) / f"seed{seed}"


def train_ensemble(given: dict) -> dict:
    """`ensemble` runs, each with its own seed (split, init, order) and folders: one after
    another, or at once, one per GPU, on a machine with several (`member_devices`)."""
    settings = Config(**given)
    seeds = range(settings.seed, settings.seed + settings.ensemble)
    runs = []
    for seed in seeds:
        member = {"seed": seed, "ensemble": 1}
        member["model_dir"] = str(member_dir(settings.model_dir, seed))
        member["out_dir"] = str(member_dir(settings.out_dir, seed))
        runs.append({**given, **member})
    devices = member_devices(settings.device, len(runs), usable_gpus())
    if devices:
        print(f"ensemble of {len(runs)}: training {len(devices)} at once, on {', '.join(devices)}")
        members = train_in_parallel(runs, devices)
    else:
        members = []
        for k, run in enumerate(runs, 1):
            print(f"ensemble member {k}/{len(runs)}: {run['model_dir']}")
            members.append(train(run))
    checkpoints = [str(Path(run["model_dir"]) / "best.pt") for run in runs]
    print(
        f"ensemble of {len(runs)}; predict with: python predict.py --checkpoint "
        + " ".join(checkpoints)
    )
    return {"members": members, "checkpoints": checkpoints}


def kernel_args(args: list[str], gpus: int) -> list[str]:
    """The notebook's train.py flags: `args`, or, when none are given on a machine with several
    usable GPUs (Kaggle's T4 x2), an ensemble of one member per GPU, trained at once."""
    return ["--ensemble", str(gpus)] if not args and gpus > 1 else list(args)


def usable_gpus() -> int:
    """How many GPUs this torch build can train on (0 without CUDA, or on a GPU it lacks
    kernels for, as a P100 under Kaggle's torch)."""
    if not torch.cuda.is_available() or model.cuda_unsupported_reason() is not None:
        return 0
    return torch.cuda.device_count()


def member_devices(device: str | None, members: int, gpus: int) -> list[str]:
    """The GPUs that train ensemble members at once, one member on each at a time: every GPU
    (up to one per member) when there are several and --device is unset or `cuda`; else none,
    and the members train one after another on --device."""
    if device not in (None, "cuda") or gpus < 2 or members < 2:
        return []
    return [f"cuda:{index}" for index in range(min(gpus, members))]


def train_in_parallel(runs: list[dict], devices: list[str]) -> list[dict]:
    """Train `runs` in one worker process per device (each takes the next run when its last
    ends); their summaries in the order of `runs`. The first failure cancels the runs not
    started and is raised."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be used in forked processes
    free = context.Queue()
    for device in devices:
        free.put(device)
    pool = ProcessPoolExecutor(
        len(devices), mp_context=context, initializer=_take_device, initargs=(free,)
    )
    with pool:
        futures = [pool.submit(_train_on_my_device, run) for run in runs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


_worker_device: list[str] = []  # the device of this worker process of train_in_parallel


def _take_device(free) -> None:
    _worker_device.append(free.get())


def _train_on_my_device(run: dict) -> dict:
    with redirect_stdout(LinePrefix(sys.stdout, f"[seed {run['seed']}] ")):
        return train({**run, "device": _worker_device[0], "quiet": True})


class LinePrefix(io.TextIOBase):
    """A text stream that writes into `stream` with `prefix` before every line: which ensemble
    member said what, when several train at once."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix, self.line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            self.stream.write(self.prefix + piece if self.line_start else piece)
            self.line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def resume_run(given: dict, ranks: ddp.Ranks = ddp.SINGLE) -> dict:
    """Continue the run a last.pt saved, as Config.resumed says."""
    path = Path(given["resume"])
    last = model.load_checkpoint(path)
    if "optimizer" not in last or "rng" not in last:
        raise UserError(f"{path}: not resumable (resume from last.pt, not best.pt)")
    model.model_from_checkpoint(last, path)  # incompatible weights fail here, at once
    cfg = Config.resumed(last["config"], given, path)
    check_extension(cfg, last)
    if last["epoch"] >= cfg.epochs:
        print(f"{path}: training already finished ({last['epoch']} epochs)")
        return {}
    return train(asdict(cfg), resume=last, ranks=ranks)


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


def main(argv: list[str] | None = None) -> dict:
    given = parse_args(argv)
    check_flags(given)
    settings = Config(**given)
    ranks = ddp.from_environment()
    if ranks.world > 1 and settings.ensemble > 1:
        raise UserError(
            f"--ensemble {settings.ensemble} under torchrun: train the members with plain "
            "python train.py --ensemble (one per GPU), or one model with torchrun"
        )
    with ExitStack() as stack:
        stack.callback(ddp.stop, ranks)
        if not ranks.main:  # only rank 0 prints (an error still ends the rank with its line)
            devnull = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(redirect_stdout(devnull))
            stack.enter_context(redirect_stderr(devnull))
        stack.enter_context(model.deterministic_algorithms(settings.deterministic))
        if settings.resume is not None:
            return resume_run(given, ranks)
        if settings.ensemble > 1:
            return train_ensemble(given)
        return train(given, ranks=ranks)


if __name__ == "__main__":
    run_cli(main)
