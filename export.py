"""ONNX export of trained checkpoints: an ensemble as one graph with its metadata, written once
onnxruntime's probabilities match PyTorch's on real digits (onnx_model.py runs it).

    python predict.py --export model.onnx                        # models/best.pt as ONNX
    python predict.py --checkpoint a.pt b.pt --export ens.onnx   # an ensemble, averaged inside

The graph holds everything but the pixels: each member's normalization, network and temperature,
and the average over members.
"""

from __future__ import annotations

import base64
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

import dataset
from atomic import atomic_write
from cli import UserError, first_line
from onnx_model import FORMAT, INPUT, OUTPUTS, OnnxEnsemble, pixels

TOLERANCE = 1e-4  # the largest difference in a probability onnxruntime may show against PyTorch


def export(ensemble, path: Path) -> dict:
    """Write `ensemble` (a predict.Ensemble in fp32 on the CPU) as ONNX to `path`, atomically,
    once onnxruntime's probabilities match PyTorch's within TOLERANCE on real digits."""
    data = to_onnx(ensemble, path)
    check = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz")  # real digits
    expected = ensemble.predict_proba(check.images)
    got = OnnxEnsemble.session(data, path).run(OUTPUTS[:1], {INPUT: pixels(check.images)})[0]
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise UserError(
            f"{path}: onnxruntime's probabilities differ from PyTorch's by {difference:.1e} "
            f"(more than {TOLERANCE:g}); nothing written"
        )
    with atomic_write(path) as f:
        f.write(data)
    print(
        f"wrote {path} ({len(data) / 1e6:.1f} MB, {len(ensemble.members)} model(s)): onnxruntime "
        f"matches PyTorch within {difference:.1e} on {len(check):,} real digits"
    )
    return {"export": str(path), "max_difference": difference, "checked_rows": len(check)}


def to_onnx(ensemble, path: Path) -> bytes:
    """The ensemble as one graph (EnsembleGraph) through torch.onnx, for any batch size, with its
    metadata."""
    import onnx

    graph = EnsembleGraph(ensemble.members).eval()
    exporter_log = logging.getLogger("torch.onnx")  # notes of operators this graph does not use
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph,
                (torch.zeros(2, 28, 28),),
                input_names=[INPUT],
                output_names=OUTPUTS,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                dynamo=True,
                verbose=False,
            )
    except Exception as e:  # torch.onnx's own failures, in one line
        raise UserError(f"{path}: torch.onnx could not export: {first_line(e)[:200]}") from None
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, metadata(ensemble))
    return proto.SerializeToString()


def metadata(ensemble) -> dict[str, str]:
    """The export's metadata: the class names, each member's story for the report, whether
    test-time augmentation may mirror, and the leak guard's fingerprint."""
    fingerprint = ensemble.seen_fingerprint()
    return {
        "format": FORMAT,
        "class_names": json.dumps(list(ensemble.class_names)),
        "models": json.dumps(ensemble.stories()),
        "mirror": json.dumps(all(m.mirror for m in ensemble.members)),
        "seen_rows": json.dumps(
            None
            if fingerprint is None
            else {k: base64.b64encode(v.tobytes()).decode() for k, v in fingerprint.items()}
        ),
    }


class EnsembleGraph(torch.nn.Module):
    """An ensemble's members (predict.Member) as one module, what an ONNX export computes: the
    mean calibrated and raw probabilities of pixel values 0..255 [B, 28, 28]."""

    def __init__(self, members: list) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(member.net for member in members)
        self.scales = [(m.normalize.mean, m.normalize.std, m.temperature) for m in members]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pixels.unsqueeze(1) / 255
        calibrated, raw = 0, 0
        for net, (mean, std, temperature) in zip(self.nets, self.scales, strict=True):
            logits = net((x - mean) / std)
            calibrated = calibrated + (logits / temperature).softmax(1)
            raw = raw + logits.softmax(1)
        return calibrated / len(self.nets), raw / len(self.nets)
