"""Train a CNN on Kaggle's MNIST CSVs.

    python train.py                                  # the found data, the default recipe
    python train.py --arch basic --epochs 15 --no-augment
    python train.py --resume models/last.pt          # continue an interrupted run exactly

Writes models/best.pt (best validation accuracy) and models/last.pt every epoch, and
outputs/history.csv, outputs/training_curves.png and outputs/metrics.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import dataset
import model as models
from atomic import atomic_write, write_json
from dataset import CLIParser, UserError

# Settings every recipe shares; see docs/experiments.md for the experiments behind them.
DEFAULTS = dict(
    optimizer="adamw",
    scheduler="onecycle",
    label_smoothing=0.1,
    val_split=0.1,
    seed=0,
)
# The recipes `--preset` picks from, per task (dataset.task_of: the class names tell digits from
# Fashion-MNIST). A flag given on the command line wins over its recipe's value.
FAST = dict(arch="basic_bn", epochs=6, batch_size=256, lr=1e-2, augment=False)
PRESETS = {
    "best": {
        "digits": dict(arch="strong", epochs=15, batch_size=128, lr=3e-3, augment=True),
        "fashion": dict(arch="wide", epochs=20, batch_size=128, lr=3e-3, augment=True),
    },
    "fast": {"digits": FAST, "fashion": FAST},
}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("onecycle", "cosine", "step", "plateau", "none")
# Flags about how to run on this machine, which a resumed run takes from its command line.
RESUME_OVERRIDES = ("device", "precision", "deterministic", "quiet", "no_plots")


def parse_args(argv: list[str] | None) -> dict:
    p = CLIParser(description="Train a CNN on Kaggle's MNIST CSVs.")
    p.add_argument("--train", help="training CSV (.csv, .csv.gz, .zip[::member]); None: found")
    p.add_argument("--test", help="labelled test CSV, scored once at the end; None: found")
    p.add_argument(
        "--val-split", type=float, default=DEFAULTS["val_split"], help="validation share"
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="best",
        help="recipe: best (most accurate, the default) or fast (shortest time to accuracy); "
        "it sets --arch, --epochs, --batch-size, --lr and --augment per task unless given",
    )
    p.add_argument("--arch", help=f"one of {', '.join(models.ARCHITECTURES)}")
    p.add_argument("--epochs", type=int, help="passes over the data")
    p.add_argument("--batch-size", type=int, help="images a step")
    p.add_argument("--lr", type=float, help="(peak) learning rate")
    p.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=DEFAULTS["optimizer"], help="optimizer"
    )
    p.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default=DEFAULTS["scheduler"],
        help="learning-rate schedule",
    )
    p.add_argument(
        "--augment", action=argparse.BooleanOptionalAction, help="random distortions per batch"
    )
    p.add_argument(
        "--label-smoothing", type=float, default=DEFAULTS["label_smoothing"], help="of the loss"
    )
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="split, init, shuffling")
    p.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help="train N models with seeds SEED..SEED+N-1 into MODEL_DIR/seedK/ (predict.py "
        "averages them: --checkpoint MODEL_DIR/seed*/best.pt)",
    )
    p.add_argument("--device", help="cpu, cuda or mps; None: the best available")
    p.add_argument(
        "--precision",
        choices=models.PRECISIONS,
        default=models.default_precision(),
        help=models.PRECISION_HELP,
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms only (torch.use_deterministic_algorithms)",
    )
    work = dataset.working_root()
    p.add_argument("--out-dir", default=str(work / "outputs"), help="figures, history, metrics")
    p.add_argument("--model-dir", default=str(work / "models"), help="checkpoints")
    p.add_argument("--resume", help="continue from this last.pt; its saved settings apply")
    p.add_argument("--max-rows", type=int, help="use only the first N training rows")
    p.add_argument("--no-plots", action="store_true", help="draw no figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return vars(p.parse_args(argv))


def check_config(cfg: dict) -> None:
    """Reject settings that cannot train, one line each; recipe flags still unset pass."""
    for key in ("epochs", "batch_size", "ensemble"):  # checkpoints older than --ensemble lack it
        if cfg.get(key) is not None and cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} {cfg[key]}: must be at least 1")
    if cfg["lr"] is not None and not cfg["lr"] > 0:
        raise UserError(f"--lr {cfg['lr']}: must be positive")
    if not 0 <= cfg["label_smoothing"] < 1:
        raise UserError(f"--label-smoothing {cfg['label_smoothing']}: must be in [0, 1)")
    if cfg["max_rows"] is not None and cfg["max_rows"] < 20:
        raise UserError(f"--max-rows {cfg['max_rows']}: must be at least 20")
    if cfg["arch"] is not None:
        models.require_arch(cfg["arch"])


def with_recipe(cfg: dict, class_names) -> dict:
    """`cfg` with each unset recipe flag taken from its preset's recipe for this task."""
    recipe = PRESETS[cfg.get("preset", "best")][dataset.task_of(class_names)]
    return {**cfg, **{key: value for key, value in recipe.items() if cfg.get(key) is None}}


def make_optimizer(cfg: dict, net: nn.Module) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(
            net.parameters(), lr=cfg["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=0.01)
    return torch.optim.Adam(net.parameters(), lr=cfg["lr"])


def make_scheduler(cfg: dict, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The schedule and whether it steps per batch (True) or per epoch (False)."""
    total = cfg["epochs"] * steps_per_epoch
    name = cfg["scheduler"]
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, cfg["lr"], total_steps=total), True
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total), True
    if name == "step":
        step = max(1, cfg["epochs"] // 3)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=0.1), False
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.3, patience=1), False
    return None, False


def evaluate(net, batches, precision, device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all batches."""
    net.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with torch.no_grad(), precision.autocast(device):
        for xb, yb in batches:
            logits = net(xb).float()
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    n = len(batches.x)
    return loss_sum.item() / n, correct.item() / n


def train_epoch(net, batches, opt, sched, per_batch, scaler, precision, device, cfg, bar_desc):
    """One pass over the shuffled, augmented training batches; mean loss and accuracy."""
    from tqdm import tqdm

    net.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    show = not cfg["quiet"] and sys.stderr.isatty()
    bar = tqdm(batches, desc=bar_desc, leave=False, disable=not show, unit="batch")
    for i, (xb, yb) in enumerate(bar):
        with precision.autocast(device):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        stepped = True
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            stepped = scaler.get_scale() >= scale  # a lowered scale: overflow, step skipped
        else:
            loss.backward()
            opt.step()
        if per_batch and stepped:
            sched.step()
        loss_sum += loss.detach() * len(yb)
        correct += (logits.argmax(1) == yb).sum()
        seen += len(yb)
        if show and i % 20 == 0:
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.2%}"
            )
    return loss_sum.item() / seen, correct.item() / seen


def load_split(cfg: dict) -> dict:
    """Train/validation tensors (and the test set when labelled test data is known)."""
    explicit = cfg["train"] is not None
    train_src = cfg["train"] or dataset.find_data("train")
    test_src = cfg["test"] or (None if explicit else dataset.find_data("test", announce=False))
    data = dataset.load_csv(train_src)
    if data.labels is None:
        raise UserError(f"{data.source}: has no label column (training needs labelled rows)")
    images, labels = data.images, data.labels
    if cfg["max_rows"]:
        images, labels = images[: cfg["max_rows"]], labels[: cfg["max_rows"]]
    tr, va = dataset.stratified_split(labels, cfg["val_split"], cfg["seed"])
    test = dataset.load_csv(test_src) if test_src else None
    if test is not None and test.labels is None:
        test = None  # unlabelled test data is for predict.py
    return {
        "data": data,
        "train": (images[tr], labels[tr]),
        "val": (images[va], labels[va]),
        "test": test,
    }


def rng_states(device: torch.device, batches: dataset.DeviceBatches) -> dict:
    """Every random stream a resumed run must continue: global CPU (and CUDA), and the batches'."""
    states = {"torch": torch.get_rng_state(), "batches": batches.generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def seen_rows(split: dict) -> dict[str, torch.Tensor]:
    """The leak guard's fingerprint of the rows a run learns from: the pixel hashes of its
    training and validation rows (8 bytes a row), which predict.py compares its input against."""
    return {
        name: torch.from_numpy(np.unique(dataset.row_hashes(split[name][0])).view(np.int64))
        for name in ("train", "val")
    }


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path, "w") as f:
        f.write(buf.getvalue())


def train(cfg: dict, resume: dict | None = None) -> dict:
    """Run (or continue) one training run; return its summary."""
    t_start = time.perf_counter()
    check_config(cfg)
    device = models.pick_device(cfg["device"])
    if device.type == "cpu":
        models.keep_freed_memory()
    precision = models.precision_for(device, cfg["precision"])
    split = load_split(cfg)
    data = split["data"]
    cfg = with_recipe(cfg, data.class_names)
    check_config(cfg)
    out_dir, model_dir = Path(cfg["out_dir"]), Path(cfg["model_dir"])
    mean, std = dataset.pixel_stats(split["train"][0])
    policy = dataset.Augment.for_classes(data.class_names) if cfg["augment"] else None

    torch.manual_seed(cfg["seed"])
    net = precision.place(models.build(cfg["arch"], num_classes=len(data.class_names)), device)
    common = dict(device=device, mean=mean, std=std, channels_last=precision.channels_last)
    train_batches = dataset.DeviceBatches(
        *split["train"],
        cfg["batch_size"],
        shuffle=True,
        augment=policy,
        seed=cfg["seed"],
        drop_last=len(split["train"][0]) > cfg["batch_size"],
        **common,
    )
    val_batches = dataset.DeviceBatches(*split["val"], 1024, **common)
    opt = make_optimizer(cfg, net)
    sched, per_batch = make_scheduler(cfg, opt, len(train_batches))
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    history, best_acc, start = [], -1.0, 1
    if resume is not None:
        net.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        if sched is not None:
            sched.load_state_dict(resume["scheduler"])
        if scaler is not None and resume["scaler"]:
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng"]["torch"])
        if device.type == "cuda" and "cuda" in resume["rng"]:
            torch.cuda.set_rng_state(resume["rng"]["cuda"], device)
        train_batches.generator.set_state(resume["rng"]["batches"])
        history, best_acc, start = resume["history"], resume["best_val_acc"], resume["epoch"] + 1

    print(
        f"training {cfg['arch']} (--preset {cfg.get('preset', 'best')}, "
        f"{dataset.task_of(data.class_names)}) on {len(split['train'][0]):,} images "
        f"({len(split['val'][0]):,} for validation) from {data.source}; "
        f"{device.type}, {precision.describe()}"
    )
    if not cfg["no_plots"] and resume is None:
        import plots

        plots.exploration_figures(data, policy, out_dir)

    meta = {
        "arch": cfg["arch"],
        "arch_kwargs": {"num_classes": len(data.class_names)},
        "mean": mean,
        "std": std,
        "class_names": list(data.class_names),
        "seen_rows": seen_rows(split),
        "config": cfg,
        "versions": models.library_versions(),
    }
    train_seconds = 0.0
    for epoch in range(start, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        tr_loss, tr_acc = train_epoch(
            net, train_batches, opt, sched, per_batch, scaler, precision, device, cfg,
            f"epoch {epoch}/{cfg['epochs']}",
        )  # fmt: skip
        train_seconds += time.perf_counter() - t0
        va_loss, va_acc = evaluate(net, val_batches, precision, device)
        lr = opt.param_groups[0]["lr"]
        if sched is not None and not per_batch:
            sched.step(va_loss) if cfg["scheduler"] == "plateau" else sched.step()
        seconds = time.perf_counter() - t0
        row = dict(epoch=epoch, train_loss=round(tr_loss, 5), train_acc=round(tr_acc, 5),
                   val_loss=round(va_loss, 5), val_acc=round(va_acc, 5), lr=lr,
                   seconds=round(seconds, 2))  # fmt: skip
        history.append(row)
        state = {**meta, "state_dict": net.state_dict(), "epoch": epoch, "metrics": row}
        if va_acc > best_acc:
            best_acc = va_acc
            models.save_checkpoint(model_dir / "best.pt", state)
        models.save_checkpoint(
            model_dir / "last.pt",
            {
                **state,
                "optimizer": opt.state_dict(),
                "scheduler": None if sched is None else sched.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
                "rng": rng_states(device, train_batches),
                "history": history,
                "best_val_acc": best_acc,
            },
        )
        write_history(out_dir / "history.csv", history)
        print(
            f"epoch {epoch:>3}/{cfg['epochs']}  train loss {tr_loss:.4f} acc {tr_acc:6.2%}  "
            f"val loss {va_loss:.4f} acc {va_acc:6.2%}  lr {lr:.2e}  {seconds:5.1f}s",
            flush=True,
        )

    best = models.load_checkpoint(model_dir / "best.pt")
    summary = {
        "best_epoch": best["epoch"],
        "best_val_acc": best["metrics"]["val_acc"],
        "train_images_per_s": round(len(split["train"][0]) * (cfg["epochs"] - start + 1)
                                    / max(train_seconds, 1e-9)),
        "train_images": len(split["train"][0]),
        "train_source": data.source,
    }  # fmt: skip
    if split["test"] is not None:
        test_net = precision.place(models.model_from_checkpoint(best), device)
        test = split["test"]
        test_batches = dataset.DeviceBatches(test.images, test.labels, 1024, **common)
        summary["test_loss"], summary["test_acc"] = evaluate(
            test_net, test_batches, precision, device
        )
        summary["test_source"] = test.source
        print(f"test accuracy {summary['test_acc']:.2%} on {len(test):,} images from {test.source}")
    summary["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write_json(out_dir / "metrics.json", {**summary, "config": cfg, "versions": meta["versions"]})
    if not cfg["no_plots"]:
        import plots

        measured = ["augmented batches"] if policy else []
        measured.append("dropout on")
        if cfg["label_smoothing"]:
            measured.append("label-smoothed loss")
        plots.training_curves(history, out_dir / "training_curves.png", ", ".join(measured))
    print(
        f"best validation accuracy {summary['best_val_acc']:.2%} at epoch {summary['best_epoch']} "
        f"-> {model_dir / 'best.pt'}; {summary['train_images_per_s']:,} training images/s"
    )
    return summary


def train_ensemble(cfg: dict) -> dict:
    """Train `ensemble` models, each with its own seed (split, init, order), each in its own
    folder; return their summaries."""
    check_config(cfg)
    members = []
    for seed in range(cfg["seed"], cfg["seed"] + cfg["ensemble"]):
        member = f"seed{seed}"
        print(f"ensemble member {seed - cfg['seed'] + 1}/{cfg['ensemble']}: {member}")
        members.append(train({
            **cfg, "seed": seed, "ensemble": 1,
            "model_dir": str(Path(cfg["model_dir"]) / member),
            "out_dir": str(Path(cfg["out_dir"]) / member),
        }))  # fmt: skip
    checkpoints = " ".join(str(Path(cfg["model_dir"]) / f"seed{s}" / "best.pt")
                           for s in range(cfg["seed"], cfg["seed"] + cfg["ensemble"]))  # fmt: skip
    print(
        f"ensemble of {cfg['ensemble']}; predict with: python predict.py --checkpoint {checkpoints}"
    )
    return {"members": members}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(argv)
    with models.deterministic_algorithms(cfg["deterministic"]):
        return run(cfg)


def run(cfg: dict) -> dict:
    """A new run, an ensemble, or the continuation of `--resume`."""
    if cfg["resume"] is None:
        return train(cfg) if cfg["ensemble"] == 1 else train_ensemble(cfg)
    ckpt = models.load_checkpoint(cfg["resume"])
    if "optimizer" not in ckpt or "rng" not in ckpt:
        raise UserError(f"{cfg['resume']}: not resumable (resume from last.pt, not best.pt)")
    models.model_from_checkpoint(ckpt, cfg["resume"])  # incompatible weights fail here, at once
    saved = {**ckpt["config"], **{k: cfg[k] for k in RESUME_OVERRIDES}, "resume": cfg["resume"]}
    if ckpt["epoch"] >= saved["epochs"]:
        print(f"{cfg['resume']}: training already finished ({ckpt['epoch']} epochs)")
        return {}
    return train(saved, resume=ckpt)


if __name__ == "__main__":
    dataset.run_cli(main)
