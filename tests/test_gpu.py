"""Training and prediction on a CUDA GPU: each precision (bf16 and fp16 autocast, fp32),
torch.compile, and a model trained there predicting alike on the CPU. Skipped where no CUDA GPU
is usable; bench/gpu_check.sh runs them on a GPU machine (`pytest -m gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEST, SAMPLE_TRAIN, run_flags

import predict
import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no usable CUDA GPU"),
]


def train_on_cuda(folder, *extra: str) -> dict:
    """Two epochs of basic_bn on the sample on the GPU; the run's summary."""
    flags = ["--train", SAMPLE_TRAIN, "--test", SAMPLE_TEST, "--arch", "basic_bn"]
    return train.main(run_flags(folder, *flags, "--epochs", "2", "--device", "cuda", *extra))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_learns_in_each_precision(tmp_path, precision):
    summary = train_on_cuda(tmp_path, "--precision", precision)
    assert summary["test_acc"] > 0.85


def test_compiled_training_on_cuda_learns_and_saves_plain_weights(tmp_path):
    summary = train_on_cuda(tmp_path, "--compile")
    assert summary["test_acc"] > 0.85
    weights = torch.load(tmp_path / "models" / "best.pt", weights_only=False)["state_dict"]
    assert not any(key.startswith("_orig_mod.") for key in weights)


def test_a_model_trained_on_cuda_predicts_alike_on_the_cpu(tmp_path):
    train_on_cuda(tmp_path)
    best = str(tmp_path / "models" / "best.pt")
    ask = ["--checkpoint", best, "--input", SAMPLE_TEST, "--no-report"]
    labels = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"{device}.csv"
        predict.main([*ask, "--device", device, "--output", str(out)])
        labels[device] = np.loadtxt(out, delimiter=",", skiprows=1, dtype=int)[:, 1]
    assert (labels["cuda"] == labels["cpu"]).mean() > 0.99
