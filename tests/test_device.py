"""Device and precision choice, with the CUDA queries faked: a GPU that this torch build has no
kernels for (a P100 under Kaggle's torch) falls back to the CPU with one line, each GPU and CPU
gets its precision, and $MNIST_PRECISION sets --precision's default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SAMPLE_TRAIN

import config
import dataset
import model
import predict
import train
from cli import UserError, run_cli

# torch.cuda.get_arch_list() of Kaggle's torch 2.10.0+cu128 (Kaggle/docker-python#1546)
KAGGLE_ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
P100 = ((6, 0), "Tesla P100-PCIE-16GB")
T4 = ((7, 5), "Tesla T4")
A100 = ((8, 0), "NVIDIA A100-SXM4-40GB")

FAKE_P100 = f"""
import sys
from unittest import mock
sys.path.insert(0, {str(ROOT)!r})
import torch, model
with mock.patch("torch.cuda.is_available", return_value=True), \\
     mock.patch("torch.cuda.get_device_capability", return_value={P100[0]!r}), \\
     mock.patch("torch.cuda.get_device_name", return_value={P100[1]!r}), \\
     mock.patch("torch.cuda.get_arch_list", return_value={KAGGLE_ARCHS!r}), \\
     mock.patch("torch.version.cuda", "12.8"):
    print(model.pick_device())
"""


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(capability, name, archs): torch.cuda answers as if that GPU were present."""

    def install(capability, name, archs=KAGGLE_ARCHS) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
        monkeypatch.setattr(torch.version, "cuda", "12.8")

    return install


def test_a_gpu_without_kernels_in_this_build_falls_back_to_the_cpu(fake_gpu):
    fake_gpu(*P100)
    assert model.pick_device() == torch.device("cpu")


def test_the_fallback_says_why_in_one_line(fake_gpu, capsys):
    fake_gpu(*P100)
    model.pick_device()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("note: not using the GPU: Tesla P100-PCIE-16GB (sm_60) is not supported")
    assert "(it has kernels for sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120)" in line
    assert line.endswith('pick the T4 x2 accelerator: "machine_shape": "NvidiaTeslaT4")')


def test_forcing_a_gpu_without_kernels_is_a_user_error(fake_gpu):
    fake_gpu(*P100)
    with pytest.raises(UserError, match=r"--device cuda: Tesla P100-PCIE-16GB \(sm_60\)"):
        model.pick_device("cuda")


def test_forcing_a_missing_device_is_a_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--device cuda: not available"):
        model.pick_device("cuda")


def test_forcing_a_gpu_index_the_machine_lacks_is_a_user_error(fake_gpu):
    fake_gpu(*T4)
    with pytest.raises(UserError, match="--device cuda:3: not available"):
        model.pick_device("cuda:3")


def test_python_c_with_faked_cuda_queries_shows_the_fallback_line():
    done = subprocess.run(
        [sys.executable, "-c", FAKE_P100], capture_output=True, text=True, check=True
    )
    assert done.stdout == "cpu\n"
    (line,) = done.stderr.splitlines()
    assert line.startswith("note: not using the GPU: Tesla P100-PCIE-16GB (sm_60) is not")


@pytest.mark.parametrize(
    ("gpu", "dtype", "grad_scaler"),
    [(T4, torch.float16, True), (A100, torch.bfloat16, False)],
)
def test_a_supported_gpu_is_used_in_the_precision_it_computes_natively(
    fake_gpu, capsys, gpu, dtype, grad_scaler
):
    fake_gpu(*gpu)
    device = model.pick_device()
    assert device == torch.device("cuda")
    assert capsys.readouterr().err == ""
    precision = model.precision_for(device)
    assert (precision.dtype, precision.grad_scaler, precision.channels_last) == (
        dtype,
        grad_scaler,
        True,
    )
    assert model.precision_for(device, "fp32").dtype is None


@pytest.mark.parametrize(
    ("capability", "archs", "usable"),
    [
        ((8, 6), ["sm_80"], True),  # binary compatible within a major version
        ((8, 0), ["sm_86"], False),  # but not with a newer minor version
        ((9, 0), ["sm_80"], False),
        ((9, 0), ["sm_80", "compute_80"], True),  # PTX compiles for newer GPUs
        ((12, 0), ["sm_90", "sm_120"], True),
        ((9, 0), ["sm_90a"], True),
    ],
)
def test_compute_capability_against_the_builds_arch_list(fake_gpu, capability, archs, usable):
    fake_gpu(capability, "GPU", archs)
    assert (model.cuda_unsupported_reason() is None) == usable


@pytest.mark.parametrize(
    ("native_bf16", "name", "dtype"),
    [
        (True, "auto", torch.bfloat16),
        (False, "auto", None),
        (True, "fp32", None),
        (False, "bf16", torch.bfloat16),
        (False, "fp16", torch.float16),
    ],
)
def test_cpu_precision(monkeypatch, native_bf16, name, dtype):
    monkeypatch.setattr(model, "cpu_has_native_bf16", lambda: native_bf16)
    precision = model.precision_for(torch.device("cpu"), name)
    assert (precision.dtype, precision.grad_scaler) == (dtype, name == "fp16")


@pytest.mark.parametrize(
    ("capability", "cpuinfo", "native"),
    [
        ("AVX512", "flags : avx2 avx512f avx512_bf16 amx_bf16", True),
        ("AVX512", "flags : avx2 avx512f", False),
        ("AVX2", "flags : avx2 avx512f avx512_bf16 amx_bf16", False),
    ],
)
def test_native_bf16_needs_the_flag_and_a_cpu_not_held_to_avx2(
    monkeypatch, capability, cpuinfo, native
):
    monkeypatch.setattr(model.platform, "system", lambda: "Linux")
    monkeypatch.setattr(model.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(model.Path, "read_text", lambda self: cpuinfo)
    assert model.cpu_has_native_bf16() is native


@pytest.mark.parametrize(("variable", "default"), [(None, "auto"), ("fp32", "fp32")])
def test_the_precision_variable_sets_the_default_of_both_clis(monkeypatch, variable, default):
    if variable is None:
        monkeypatch.delenv(model.PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(model.PRECISION_ENV, variable)
    trained = config.Config(**config.parse_args([])).precision
    assert (trained, predict.parse_args([]).precision) == (default, default)


def test_the_precision_flag_wins_over_the_variable(monkeypatch):
    monkeypatch.setenv(model.PRECISION_ENV, "fp32")
    assert config.Config(**config.parse_args(["--precision", "bf16"])).precision == "bf16"


@pytest.mark.parametrize("cli", [train.main, predict.main])
def test_a_bad_precision_variable_is_one_error_line_and_exit_2(monkeypatch, capsys, cli):
    monkeypatch.setenv(model.PRECISION_ENV, "fp8")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(cli, [])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: $MNIST_PRECISION fp8: not a precision")


def test_the_gpu_check_stops_at_its_first_cuda_step_with_one_line_where_there_is_no_gpu(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        env={**env, "GPU_CHECK_INSTALL": "0"},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: skipped: torch ") and done.stdout.count("\n") == 1
    assert "no usable CUDA GPU" in done.stdout
    assert list((tmp_path / "out").iterdir()) == []  # nothing ran, so nothing written


def test_compile_wraps_the_steps_network_and_checkpoints_keep_plain_weights(tmp_path):
    splits = dataset.load_splits(SAMPLE_TRAIN, None, 300, 0.1, 0)
    cfg = config.Config.for_task({"arch": "basic", "compile": True}, splits.task)
    precision = model.precision_for(torch.device("cpu"), "fp32")
    run = train.build_run(cfg, splits, torch.device("cpu"), precision)
    assert isinstance(run.net, torch._dynamo.eval_frame.OptimizedModule)
    assert run.net._orig_mod is run.raw_net  # the steps run it; checkpoints keep raw_net's names
    assert not isinstance(run.raw_net, torch._dynamo.eval_frame.OptimizedModule)


def test_no_accel_is_the_cpu_for_both_clis():
    assert config.parse_args(["--no-accel"])["device"] == "cpu"
    assert predict.parse_args(["--no-accel"]).device == "cpu"


def test_a_negative_log_interval_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"--log-interval -1\.0: must be at least 0"):
        config.check_flags(config.parse_args(["--log-interval", "-1"]))
