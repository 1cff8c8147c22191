"""Several training runs at once: the members of an ensemble, one per GPU on a machine with
several (a worker pool handed the function that trains one run), with each member's lines
prefixed by its seed; else one after another."""

from __future__ import annotations

import io
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from functools import partial
from pathlib import Path

import torch

import model
from config import Config

Train = Callable[[dict], dict]  # train.train: the settings given -> the run's summary


def member_dir(root: str | Path, seed: int) -> Path:
    """Where an ensemble member of this seed writes, inside `root`."""
    return Path(root) / f"seed{seed}"


def train_ensemble(given: dict, train: Train) -> dict:
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
        members = train_in_parallel(runs, devices, train)
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


def train_in_parallel(runs: list[dict], devices: list[str], train: Train) -> list[dict]:
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
        futures = [pool.submit(partial(_train_on_my_device, train), run) for run in runs]
        try:
            return [future.result() for future in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


_worker_device: list[str] = []  # the device of this worker process of train_in_parallel


def _take_device(free) -> None:
    _worker_device.append(free.get())


def _train_on_my_device(train: Train, run: dict) -> dict:
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
