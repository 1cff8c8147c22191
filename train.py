"""Train a CNN on Kaggle's MNIST CSVs.

    python train.py                                  # the found data, the default recipe
    python train.py --arch basic --epochs 15 --no-augment
    python train.py --resume models/last.pt          # continue an interrupted run exactly

Writes models/best.pt (lowest calibrated validation loss) and models/last.pt every epoch, and
outputs/history.csv, outputs/training_curves.png and outputs/metrics.json.

Read top to bottom: the data, the run (network, batches, optimization), its checkpoint state,
the epoch loop, what follows the epochs, and the entry points. What a run is (recipes, `Config`,
the command line) is config.py; several runs at once (ensembles on several GPUs) parallel.py.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack, nullcontext, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import dataset
import ddp
import ema
import model
import parallel
import report
import tensorboard_log
from atomic import atomic_write, ensure_writable, folder_lock, write_json
from cli import EVAL_BATCH_SIZE, Progress, Terminated, UserError, first_line, run_cli
from config import Config

# ---------------------------------------------------------------- constants

RANK_SEED_STEP = 7919  # torchrun rank r > 0 draws its dropout masks from seed + r * this
# Where the optimizers step every parameter in one fused kernel: on the CPU a fraction of the time
# of torch's default there, a loop over the parameters (bench/optimizer_step.py). Not with fp16's
# loss scaler: a step it skips still runs fused SGD's first step, which leaves the momentum
# buffers it allocated unset, and the next step reads them.
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunEnd:
    """What a finished run tells its watchers: its settings, record and results, and the kept
    network's validation logits with their labels."""

    config: dict
    history: list[dict]
    best_epoch: int
    summary: dict
    class_names: list[str]
    curves: str  # how the history's training metrics were measured
    val_labels: np.ndarray
    val_logits: np.ndarray


class Watcher(Protocol):
    """Sees a run from outside the loop (TensorBoard, a tune.py trial): each epoch's history
    row with the run's length, and the end."""

    def epoch(self, row: dict, epochs: int) -> None: ...

    def finish(self, end: RunEnd) -> None: ...


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
    """The optimizer, its learning-rate schedule, (with fp16) the loss scaler and (with --ema)
    the weights' average: `step(loss)` once a batch, `end_epoch(val_loss)` once an epoch."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    schedule_per_batch: bool
    scaler: torch.amp.GradScaler | None
    average: ema.WeightAverage | None

    @classmethod
    def create(cls, cfg: Config, net: nn.Module, steps_per_epoch: int, fp16: bool) -> Optimization:
        """The optimizer and schedule `cfg` names for `net`; a loss scaler for fp16; the
        average of `net`'s weights with --ema."""
        kind, settings = config.OPTIMIZERS[cfg.optimizer]
        if cfg.weight_decay is not None:
            settings = {**settings, "weight_decay": cfg.weight_decay}
        device_type = next(net.parameters()).device.type
        if device_type in FUSED_OPTIMIZER_DEVICES and not fp16:
            settings = {**settings, "fused": True}
        optimizer = kind(net.parameters(), lr=cfg.lr, **settings)
        scheduler, per_batch = make_scheduler(cfg, optimizer, cfg.epochs * steps_per_epoch)
        scaler = torch.amp.GradScaler(device_type) if fp16 else None
        average = ema.WeightAverage(net, cfg.ema) if cfg.ema else None
        return cls(optimizer, scheduler, per_batch, scaler, average)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        """Backward and one optimizer step; a per-batch schedule and the weights' average
        step unless the loss scaler skipped the step (an fp16 overflow, which it answers by
        lowering its scale)."""
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
        if self.average is not None and stepped:
            self.average.update()

    def end_epoch(self, val_loss: float) -> None:
        """Step a per-epoch schedule; the plateau schedule watches the (plain) validation loss."""
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
    raw_net: nn.Module  # the network trained; checkpoints hold it, or its average (kept_net)
    net: nn.Module  # `raw_net` as the steps see it: under DistributedDataParallel with torchrun,
    # compiled with --compile
    ranks: ddp.Ranks
    augment: dataset.Augment | None
    train_batches: dataset.DeviceBatches  # this rank's share of each batch
    val_batches: dataset.DeviceBatches  # the whole validation split
    val_shard: dataset.DeviceBatches  # this rank's share of it, validated every epoch
    optimization: Optimization
    checkpoint_meta: dict  # what every checkpoint holds besides weights and progress
    watchers: list[Watcher] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    epoch: int = 0  # the last finished epoch
    train_seconds: float = 0.0  # spent in training epochs by this process
    epochs_here: int = 0  # epochs trained by this process (a resumed run counts its own)

    @property
    def device(self) -> torch.device:
        return self.train_batches.device

    @property
    def kept_net(self) -> nn.Module:
        """The network validated and checkpointed: the weights' average with --ema, else the
        weights trained."""
        average = self.optimization.average
        return self.raw_net if average is None else average.net


def build_run(
    cfg: Config,
    splits: dataset.Splits,
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
        augment = replace(policy.scaled(cfg.augment_strength), elastic=cfg.elastic)
    torch.manual_seed(cfg.seed)
    kwargs = model.arch_kwargs(cfg.arch, len(splits.parsed.class_names), cfg.width)
    net = precision.place(model.build(cfg.arch, **kwargs), device)
    if ranks.rank:  # its own dropout masks; the weights are rank 0's (DDP broadcasts them)
        torch.manual_seed(cfg.seed + RANK_SEED_STEP * ranks.rank)
    normalize = dataset.Normalize(mean, std, precision.channels_last)
    batches = device_batches(cfg, splits, (normalize, augment), device, ranks)
    train_batches, val_batches, val_shard = batches
    meta = checkpoint_meta(cfg, splits, kwargs, (mean, std), curves_caption(cfg, net))
    wrapped = ddp.wrap(net, ranks, device)
    return Run(
        cfg=cfg,
        precision=precision,
        raw_net=net,
        net=torch.compile(wrapped) if cfg.compile else wrapped,
        ranks=ranks,
        augment=augment,
        train_batches=train_batches,
        val_batches=val_batches,
        val_shard=val_shard,
        optimization=Optimization.create(cfg, net, len(train_batches), precision.grad_scaler),
        checkpoint_meta=meta,
    )


def checkpoint_meta(
    cfg: Config, splits: dataset.Splits, arch_kwargs: dict, stats: tuple[float, float], curves: str
) -> dict:
    """What every checkpoint of the run holds besides weights and progress: how to rebuild and
    feed the network, its classes, the leak guard's fingerprint, the data, the settings."""
    mean, std = stats
    return {
        "arch": cfg.arch,
        "arch_kwargs": arch_kwargs,
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
        "curves": curves,  # how the history's training metrics were measured
    }


def device_batches(
    cfg: Config, splits: dataset.Splits, transforms: tuple, device: torch.device, ranks: ddp.Ranks
) -> tuple[dataset.DeviceBatches, dataset.DeviceBatches, dataset.DeviceBatches]:
    """The splits on the device, normalized (and the training batches augmented) by
    `transforms`: this rank's share of each shuffled training batch, the whole validation split,
    and this rank's share of it."""
    normalize, augment = transforms
    train, val = splits.train, splits.val
    train_batches = dataset.DeviceBatches(
        train.images, train.labels, cfg.batch_size, device, normalize, cfg.seed, augment
    ).share(*ranks.shard)
    val_batches = dataset.DeviceBatches(val.images, val.labels, EVAL_BATCH_SIZE, device, normalize)
    if ranks.world == 1:
        return train_batches, val_batches, val_batches
    mine = slice(ranks.rank, None, ranks.world)
    val_shard = dataset.DeviceBatches(
        val.images[mine], val.labels[mine], EVAL_BATCH_SIZE, device, normalize
    )
    return train_batches, val_batches, val_shard


# ---------------------------------------------------------------- checkpoint state


def training_state(run: Run, rank_rngs: list[torch.Tensor]) -> dict:
    """What last.pt holds besides the kept weights, so that --resume continues exactly where the
    run stopped (`rank_rngs`: every torchrun rank's random state, rank 0's first); with --ema,
    the weights trained and the steps averaged, since the kept weights are their average.
    restore_training_state, below, reads back every key (and the history, which every
    checkpoint holds)."""
    opt = run.optimization
    rng = {"torch": rank_rngs[0], "batches": run.train_batches.generator.get_state()}
    if len(rank_rngs) > 1:
        rng["ranks"] = rank_rngs
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    state = {
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": None if opt.scheduler is None else opt.scheduler.state_dict(),
        "scaler": None if opt.scaler is None else opt.scaler.state_dict(),
        "rng": rng,
    }
    if opt.average is not None:
        state["trained_state_dict"] = run.raw_net.state_dict()
        state["average_updates"] = opt.average.updates
    return state


def restore_training_state(run: Run, last: dict) -> None:
    """Put back what training_state saved, and the weights and epoch of that last.pt; a saved
    state that does not fit this run (damaged or edited by hand) is one UserError line."""
    try:
        restore_saved_state(run, last)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise UserError(
            f"{run.cfg.resume}: its training state does not fit this run ({first_line(e)[:120]}); "
            "resume from a last.pt this project wrote, or start a new run"
        ) from None
    rates = [group["lr"] for group in run.optimization.optimizer.param_groups]
    if not rates or not all(type(lr) is float and 0 <= lr < math.inf for lr in rates):
        raise UserError(
            f"{run.cfg.resume}: its optimizer's learning rates {rates[:3]} are not "
            "numbers (a damaged or hand-edited last.pt; start a new run)"
        )


def restore_saved_state(run: Run, last: dict) -> None:
    """restore_training_state without its checks."""
    opt = run.optimization
    if opt.average is None:
        run.raw_net.load_state_dict(last["state_dict"])
    else:
        run.raw_net.load_state_dict(last["trained_state_dict"])
        opt.average.net.load_state_dict(last["state_dict"])
        updates = last["average_updates"]
        if type(updates) is not int or updates < 0:
            raise ValueError(f"average_updates {str(updates)[:20]} is not a count of steps")
        opt.average.updates = updates
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
    run.history, run.epoch = last["history"], last["epoch"]


def validates_better(row: dict, other: dict) -> bool:
    """Whether an epoch's history row beats another's: lower calibrated validation loss (the
    loss at the temperature fitted to that epoch's validation logits), or the same with a higher
    validation accuracy; rows from before that loss was recorded compare their plain loss.

    Accuracy on a small split moves in steps of one image and saturates: trained on 4,500 real
    digits, 500/500 at epoch 8 beat 499/500 at epoch 12 (loss 0.132 against 0.105) and scored
    94.6% on other writers, the later epoch 96.2%. The plain loss mixes how well a network tells
    the digits apart with how sure it is, and label smoothing keeps it unsure by a changing
    amount: on the real job with --ema it was lowest at epoch 4 (0.0939, 99.48% right; epoch 15:
    0.1003, 99.74%). Calibrating takes out that one overall factor of confidence: calibrated,
    epoch 4 scores 0.0156 and epoch 15 0.0099."""
    key = "val_loss_calibrated"
    if key not in row or key not in other:
        key = "val_loss"
    return (-row[key], row["val_acc"]) > (-other[key], other["val_acc"])


def save_checkpoints(run: Run, row: dict) -> None:
    """last.pt every epoch; best.pt when the epoch validates better than every earlier one (see
    `validates_better`). Both are written before either is replaced, best.pt first: a failure
    changes neither, and a kill between the two renames leaves a last.pt whose resumed run writes
    the same best.pt again. Under torchrun every rank calls it and rank 0 writes."""
    rank_rngs = ddp.gather(torch.get_rng_state(), run.ranks)
    if not run.ranks.main:
        return
    model_dir = Path(run.cfg.model_dir)
    state = {**run.checkpoint_meta, "state_dict": run.kept_net.state_dict(), "epoch": run.epoch}
    state |= {"metrics": row, "history": run.history}
    checkpoints = {}
    if all(validates_better(row, earlier) for earlier in run.history[:-1]):
        checkpoints[model_dir / "best.pt"] = state
    checkpoints[model_dir / "last.pt"] = {**state, **training_state(run, rank_rngs)}
    model.save_checkpoints(checkpoints)


# ---------------------------------------------------------------- the epoch loop


def train_epoch(
    net: nn.Module,
    batches: dataset.DeviceBatches,
    optimization: Optimization,
    precision: model.Precision,
    label_smoothing: float,
    progress: tuple[str | None, float],
) -> torch.Tensor:
    """One pass over the shuffled (and augmented) training batches: the sums of the loss and of
    the right answers, the images seen, and the first batch (from 1) whose loss was not finite
    (0: none), as one tensor for the ranks to reduce. `progress`: the label of the progress
    shown (None: none), a live bar on a terminal, else a line about every so many seconds."""
    net.train()
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    first_bad = torch.zeros((), device=batches.device, dtype=torch.long)  # no sync a batch
    seen = 0

    def stats() -> dict[str, str]:
        return {"loss": f"{loss_sum.item() / seen:.4f}", "acc": f"{correct.item() / seen:6.2%}"}

    label, every = progress
    with Progress(label, len(batches), every) as shown:
        for i, (xb, yb) in enumerate(batches, 1):
            with precision.autocast(batches.device):
                logits = net(xb)
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
            optimization.step(loss)
            bad = ~torch.isfinite(loss.detach()) & (first_bad == 0)
            first_bad = torch.where(bad, i, first_bad)
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            shown.step(i, seen, stats)
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
    logits = predict_logits(net, batches, precision)
    right = (logits.argmax(1) == batches.y).float().mean()
    return F.cross_entropy(logits, batches.y).item(), right.item()


def validate(run: Run) -> dict:
    """Validation loss, accuracy and calibrated loss (at the temperature fitted to these logits,
    as `calibrate` fits best.pt's) of rank 0's kept network, each rank scoring its share."""
    ddp.share_buffers(run.raw_net, run.ranks)
    if run.kept_net is not run.raw_net:
        ddp.share_buffers(run.kept_net, run.ranks)
    logits = predict_logits(run.kept_net, run.val_shard, run.precision).cpu()
    shares = ddp.gather((logits, run.val_shard.y.cpu()), run.ranks)
    logits = torch.cat([share[0] for share in shares]).numpy()
    labels = torch.cat([share[1] for share in shares]).numpy()
    temperature = report.fit_temperature(logits, labels)
    return {
        "val_loss": report.nll(logits, labels),
        "val_acc": float((logits.argmax(1) == labels).mean()),
        "val_loss_calibrated": report.nll(logits, labels, temperature),
    }


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
        run.net,
        run.train_batches,
        run.optimization,
        run.precision,
        cfg.label_smoothing,
        (progress, cfg.log_interval),
    )
    bad = ddp.reduce(torch.where(sums[3:] > 0, sums[3:], math.inf), run.ranks, "min")
    loss_sum, correct, seen = ddp.reduce(sums[:3].contiguous(), run.ranks).tolist()
    train_loss, train_acc = loss_sum / seen, correct / seen
    train_seconds = time.perf_counter() - started
    run.train_seconds += train_seconds
    run.epochs_here += 1
    val = validate(run)
    val_loss, val_acc = val["val_loss"], val["val_acc"]
    bad_batch = int(bad.item()) if math.isfinite(bad.item()) else None
    stop_if_diverged(run, epoch, bad_batch, (train_loss, val_loss))
    lr = run.optimization.lr
    run.optimization.end_epoch(val_loss)
    seconds = time.perf_counter() - started
    row = {"epoch": epoch, "train_loss": round(train_loss, 5), "train_acc": round(train_acc, 5)}
    row |= {name: round(value, 5) for name, value in val.items()} | {"lr": lr}
    row |= {"seconds": round(seconds, 2), "images_per_s": round(seen / train_seconds)}
    run.history.append(row)
    run.epoch = epoch
    save_checkpoints(run, row)
    if not run.ranks.main:
        return
    write_history(Path(cfg.out_dir) / "history.csv", run.history)
    print(
        f"epoch {epoch:>3}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:6.2%}  "
        f"val loss {val_loss:.4f} (calibrated {row['val_loss_calibrated']:.4f}) acc "
        f"{val_acc:6.2%}  lr {lr:.2e}  {seconds:5.1f}s",
        flush=True,
    )
    for watcher in run.watchers:
        watcher.epoch(row, cfg.epochs)


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
    """history.csv: a column for every figure any epoch recorded (a resumed run's earlier
    epochs may lack figures recorded since: their cells stay empty)."""
    buf = io.StringIO()
    columns = list(dict.fromkeys(name for row in history for name in row))
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


# ---------------------------------------------------------------- after the epochs


def score_test(run: Run, net: nn.Module, test: dataset.CSVData) -> dict:
    """best.pt's network scored once on the labelled test set."""
    batches = dataset.DeviceBatches(
        test.images, test.labels, EVAL_BATCH_SIZE, run.device, run.val_batches.normalize
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
    averaged = "; validation: the weights' average (--ema)" if cfg.ema else ""
    return (", ".join(measured) or "as in evaluation") + averaged


def peak_gpu_memory(device: torch.device) -> dict:
    """{"peak_gpu_memory_mb": the most the process held on `device`} on a GPU, else {}."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20)}


def kept_line(best: dict, summary: dict, best_path: Path) -> str:
    """The line naming the epoch kept, what chose it, where it is and the training rate."""
    kept = best["metrics"]
    name, loss = report.judging_loss(kept)
    return (
        f"best epoch {best['epoch']} ({name} {loss:.4f}, accuracy {kept['val_acc']:.2%}) "
        f"-> {best_path}; {summary['train_images_per_s']:,} training images/s"
    )


def finish(run: Run, splits: dataset.Splits, started: float) -> dict:
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
        **peak_gpu_memory(run.device),
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
    print(kept_line(best, summary, Path(cfg.model_dir) / "best.pt"))
    end = RunEnd(
        asdict(cfg),
        run.history,
        best["epoch"],
        summary,
        run.checkpoint_meta["class_names"],
        run.checkpoint_meta["curves"],
        run.val_batches.y.cpu().numpy(),
        val_logits,
    )
    for watcher in run.watchers:
        watcher.finish(end)
    return summary


# ---------------------------------------------------------------- entry points


def train(
    given: dict,
    resume: dict | None = None,
    ranks: ddp.Ranks = ddp.SINGLE,
    watchers: tuple[Watcher, ...] = (),
) -> dict:
    """One training run from the settings given, or the continuation of `resume`, a last.pt
    whose settings `given` then holds in full; this process is rank `ranks` of it, and every
    `watchers` item sees each epoch (.epoch) and the end (.finish). Returns the run's summary
    (on rank 0; the others return {})."""
    started = time.perf_counter()
    draft = Config(**given)  # the recipe waits for the task
    # rank 0 alone writes there; another rank's probe could find a folder rank 0's just removed
    for directory, flag in ((draft.model_dir, "--model-dir"), (draft.out_dir, "--out-dir")):
        if ranks.main:
            ensure_writable(directory, flag)
    with folder_lock(draft.model_dir, "--model-dir") if ranks.main else nullcontext():
        name = ddp.device_name(draft.device, ranks, torch.cuda.is_available())
        device, precision = model.setup_device(name, draft.precision)
        ddp.start(ranks, device)
        splits = dataset.load_splits(
            draft.train, draft.test, draft.max_rows, draft.val_split, draft.seed
        )
        cfg = Config.for_task(given, splits.task)
        run = build_run(cfg, splits, device, precision, ranks)
        if resume is not None:
            restore_training_state(run, resume)
        processes = f"; {ranks.world} processes (torchrun)" if ranks.world > 1 else ""
        print(
            f"training {cfg.arch} (--preset {cfg.preset}, {splits.task}) on "
            f"{len(splits.train):,} images ({len(splits.val):,} for validation) from "
            f"{splits.parsed.source}; {device.type}, {precision.describe()}{processes}"
        )
        if ranks.main:
            attach_watchers(run, watchers, (resume or {}).get("tensorboard_run"))
        if not cfg.no_plots and resume is None and ranks.main:
            import plots

            plots.exploration_figures(splits.parsed, run.augment, Path(cfg.out_dir))
        fit(run)
        summary = finish(run, splits, started) if ranks.main else {}
        ddp.wait_for_all(ranks)
    return summary


def attach_watchers(run: Run, watchers: tuple[Watcher, ...], earlier_board: str | None) -> None:
    """`watchers` and the TensorBoard log (continuing `earlier_board` when resumed) watch `run`."""
    boards = tensorboard_log.boards(run.cfg, earlier_board, first_epoch=run.epoch + 1)
    for board in boards:  # every checkpoint names its folder, for --resume
        run.checkpoint_meta["tensorboard_run"] = board.name
    run.watchers.extend([*watchers, *boards])


def resume_run(given: dict, ranks: ddp.Ranks = ddp.SINGLE) -> dict:
    """Continue the run a last.pt saved, as Config.resumed says."""
    path = Path(given["resume"])
    last = model.load_checkpoint(path)
    if "optimizer" not in last or "rng" not in last:
        raise UserError(f"{path}: not resumable (resume from last.pt, not best.pt)")
    model.model_from_checkpoint(last, path)  # incompatible weights fail here, at once
    epoch = last.get("epoch")
    if "config" not in last or "epochs" not in last["config"]:
        raise UserError(f"{path}: its settings are missing (a damaged last.pt; start a new run)")
    if type(epoch) is not int or not 0 <= epoch <= model.MAX_EPOCHS:
        raise UserError(f"{path}: epoch {str(epoch)[:20]!r} is not a count of epochs trained")
    config.check_saved(last["config"], str(path))
    if last["config"].get("arch", last["arch"]) != last["arch"]:
        raise UserError(
            f"{path}: its settings name arch {last['config']['arch']!r}, its weights "
            f"{last['arch']!r} (a damaged or hand-edited last.pt; start a new run)"
        )
    cfg = Config.resumed(last["config"], given, path)
    config.check_extension(cfg, last)
    if last["epoch"] >= cfg.epochs:
        print(f"{path}: training already finished ({last['epoch']} epochs)")
        return {}
    return train(asdict(cfg), resume=last, ranks=ranks)


def dry_run(given: dict, ranks: ddp.Ranks) -> dict:
    """--dry-run: the run as asked, but one epoch on the first config.DRY_RUN_ROWS rows, one
    model, everything written into a temporary folder that is removed at the end: data, flags
    and device checked in seconds, nothing kept."""
    if given.get("resume") is not None:
        raise UserError("--dry-run with --resume: a resumed run is checked by resuming it")
    rows = min(given.get("max_rows") or config.DRY_RUN_ROWS, config.DRY_RUN_ROWS)
    with tempfile.TemporaryDirectory(prefix="mnist-dry-run.") as tmp:
        short = {"epochs": 1, "max_rows": rows, "ensemble": 1, "model_dir": tmp, "out_dir": tmp}
        summary = train({**given, **short}, ranks=ranks)
    print(f"dry run done: one epoch on {rows:,} rows ran end to end; nothing was kept")
    return summary


def main(argv: list[str] | None = None) -> dict:
    given = config.parse_args(argv)
    config.check_flags(given)
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
        if settings.dry_run:
            return dry_run(given, ranks)
        if settings.resume is not None:
            return resume_run(given, ranks)
        if settings.ensemble > 1:
            return parallel.train_ensemble(given, train)
        return train(given, ranks=ranks)


if __name__ == "__main__":
    run_cli(main)
