"""Data-parallel training under torchrun (gloo on the CPU, two processes), its decisions with
CUDA faked, and ensembles trained one member per device."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SAMPLE_TEST, SAMPLE_TRAIN, run_flags

import dataset
import ddp
import model
import parallel
import predict
import train
from cli import UserError


def flags(folder, *extra: str) -> list[str]:
    """A short run on the sample, scored on its test CSV, writing under `folder`."""
    return run_flags(folder, "--train", SAMPLE_TRAIN, "--test", SAMPLE_TEST, *extra)


def torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    """train.py under torchrun with two gloo processes on this CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECIPE = ("--arch", "basic_bn", "--epochs", "3", "--max-rows", "3000")


@pytest.fixture(scope="module")
def single_and_ddp(tmp_path_factory):
    """The same recipe trained by one process and by two under torchrun."""
    folder = tmp_path_factory.mktemp("ddp")
    single = train.main(flags(folder / "single", *RECIPE))
    run = torchrun(flags(folder / "ddp", *RECIPE))
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-8000:]  # the failing rank's error precedes the summary
    metrics = json.loads((folder / "ddp" / "out" / "metrics.json").read_text())
    return single, metrics, out, folder


@pytest.mark.numerics
def test_two_gloo_processes_train_to_the_single_process_accuracy(single_and_ddp):
    single, distributed, _, _ = single_and_ddp
    assert single["test_acc"] > 0.85 and distributed["test_acc"] > 0.85
    assert abs(single["test_acc"] - distributed["test_acc"]) < 0.03  # noise of 3 epochs


@pytest.mark.numerics
def test_only_rank_0_prints_and_writes(single_and_ddp):
    _, _, out, folder = single_and_ddp
    assert "2 processes (torchrun)" in out
    assert sum(line.startswith("epoch   1/3") for line in out.splitlines()) == 1
    history = (folder / "ddp" / "out" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # the global figures once per epoch, not once per rank
    last = model.load_checkpoint(folder / "ddp" / "models" / "last.pt")
    assert len(last["rng"]["ranks"]) == 2  # each rank's random state, for --resume


@pytest.mark.numerics
def test_the_ddp_checkpoint_predicts(single_and_ddp, tmp_path):
    _, _, _, folder = single_and_ddp
    checkpoint = str(folder / "ddp" / "models" / "best.pt")
    output = tmp_path / "submission.csv"
    args = ["--checkpoint", checkpoint, "--input", SAMPLE_TEST, "--output", str(output)]
    predict.main([*args, "--device", "cpu", "--no-report"])
    assert len(output.read_text().splitlines()) == 1 + 1000


@pytest.mark.numerics
def test_a_killed_ddp_run_resumes_and_finishes(tmp_path):
    recipe = ["--arch", "strong", "--epochs", "6", "--max-rows", "3000", "--ema", "0.9"]
    run = torchrun(flags(tmp_path, *recipe), start_new_session=True)
    last = tmp_path / "models" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)  # torchrun and both ranks
    run.communicate(timeout=120)
    assert run.returncode != 0  # it was stopped before its last epoch
    stopped_at = model.load_checkpoint(last)["epoch"]
    assert 1 <= stopped_at < 6
    resumed = torchrun(["--resume", str(last), "--quiet"])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-8000:]
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == [1, 2, 3, 4, 5, 6]
    finished = model.load_checkpoint(last)
    assert finished["epoch"] == 6
    assert finished["average_updates"] == 6 * (2700 // 128)  # every step of both processes' run
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_the_ranks_come_from_torchruns_environment():
    assert ddp.from_environment({}) == ddp.Ranks(0, 1, 0)
    found = ddp.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert found == ddp.Ranks(3, 4, 1) and not found.main and found.shard == (3, 4)
    for bad in ({"RANK": "4", "WORLD_SIZE": "4"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(UserError, match=r"RANK|WORLD_SIZE"):
            ddp.from_environment(bad)


def test_each_rank_drives_the_gpu_of_its_local_rank():
    two = ddp.Ranks(rank=3, world=4, local_rank=1)
    assert ddp.device_name(None, two, cuda_available=True) == "cuda:1"
    assert ddp.device_name("cuda", two, cuda_available=True) == "cuda:1"
    assert ddp.device_name("cpu", two, cuda_available=True) == "cpu"  # gloo on the CPU
    assert ddp.device_name(None, two, cuda_available=False) is None  # the CPU
    assert ddp.device_name("cuda:1", ddp.SINGLE, cuda_available=True) == "cuda:1"


@pytest.mark.parametrize("augment", [None, dataset.Augment(), dataset.Augment(elastic=2.0)])
def test_the_ranks_shares_make_up_the_single_process_batch(augment):
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.arange(50) % 10

    def batches(rank: int = 0, world: int = 1):
        made = dataset.DeviceBatches(images, labels, 16, "cpu", shuffle_seed=7, augment=augment)
        return list(made.share(rank, world))

    whole, shares = batches(), [batches(rank, 3) for rank in range(3)]
    assert len(whole) == len(shares[0]) == 3  # the last partial batch dropped by every rank
    for k, (x, y) in enumerate(whole):
        parts = [share[k] for share in shares]
        assert [len(p[1]) for p in parts] == [6, 5, 5]
        for rank, (xs, ys) in enumerate(parts):
            assert torch.equal(ys, y[rank::3])
            torch.testing.assert_close(xs, x[rank::3])  # the same distortion of the same image


def test_ensemble_is_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="--ensemble 2 under torchrun"):
        train.main(flags(tmp_path, "--ensemble", "2"))


@pytest.mark.parametrize(
    ("device", "members", "gpus", "expected"),
    [
        (None, 3, 2, ["cuda:0", "cuda:1"]),  # Kaggle's two T4s
        ("cuda", 2, 4, ["cuda:0", "cuda:1"]),  # no more GPUs than members
        (None, 3, 1, []),  # one GPU: one member after another
        (None, 1, 2, []),
        ("cuda:1", 3, 2, []),  # a GPU named: all there
        ("cpu", 3, 2, []),
    ],
)
def test_ensemble_members_spread_over_the_gpus(device, members, gpus, expected):
    assert parallel.member_devices(device, members, gpus) == expected


def test_usable_gpus_counts_the_gpus_torch_can_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(model, "cuda_unsupported_reason", lambda index=0: None)
    assert parallel.usable_gpus() == 2
    monkeypatch.setattr(model, "cuda_unsupported_reason", lambda index=0: "sm_60 (a P100)")
    assert parallel.usable_gpus() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.usable_gpus() == 0


def test_two_gpus_train_the_members_at_once(monkeypatch, tmp_path, capfd):
    """With two GPUs faked, --ensemble 3 goes to train_in_parallel with both (stood in for by
    CPU worker processes), and the members come back in seed order."""
    monkeypatch.setattr(parallel, "usable_gpus", lambda: 2)
    given = {}

    def on_cpu(runs, devices, train_one):
        given["devices"] = devices
        return real(runs, ["cpu"] * len(devices), train_one)

    real = parallel.train_in_parallel
    monkeypatch.setattr(parallel, "train_in_parallel", on_cpu)
    args = flags(tmp_path, "--arch", "basic", "--epochs", "1", "--max-rows", "400")
    summary = train.main([*args, "--ensemble", "3", "--device", "cuda"])
    assert given["devices"] == ["cuda:0", "cuda:1"]
    seeds = [
        json.loads((tmp_path / "out" / f"seed{s}" / "metrics.json").read_text()) for s in range(3)
    ]
    assert [m["config"]["seed"] for m in seeds] == [0, 1, 2]
    assert summary["checkpoints"] == [
        str(tmp_path / "models" / f"seed{s}" / "best.pt") for s in range(3)
    ]
    for checkpoint in summary["checkpoints"]:
        model.load_checkpoint(checkpoint)
    out = capfd.readouterr().out
    for seed in range(3):  # each member's lines say whose they are
        assert f"[seed {seed}] epoch   1/1" in out


@pytest.mark.parametrize(
    ("args", "gpus", "expected"),
    [
        ([], 2, ["--ensemble", "2"]),  # Kaggle's T4 x2: both GPUs busy
        ([], 1, []),
        ([], 0, []),
        (["--epochs", "3"], 2, ["--epochs", "3"]),  # what the user asked for, as it is
    ],
)
def test_the_notebook_trains_one_member_per_gpu_unless_told_otherwise(args, gpus, expected):
    assert parallel.kernel_args(args, gpus) == expected
