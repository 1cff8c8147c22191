"""The runs of bench/gpu_check.sh on a CUDA GPU, each a process timed from start to exit, and
their figures as one JSON.

On the real split (54,113 training digits, the 10,000 test digits): `--preset fast` and the
default recipe in bf16 and fp16 autocast (channels_last, as the CUDA path runs), each eager and
with --compile; `torchrun --nproc_per_node 1` (NCCL); predict.py on the GPU with and without
--tta; predict.py --export to ONNX. Per run: wall seconds, training images/s, test accuracy,
peak GPU memory, the numerics train.py reports.

usage: python bench/gpu_runs.py OUT_DIR   ($MNIST_TRAIN / $MNIST_TEST name other CSVs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED

TRAIN = os.environ.get("MNIST_TRAIN", str(SHARED / "data" / "mnist_train.csv.gz"))
TEST = os.environ.get("MNIST_TEST", str(SHARED / "data" / "mnist_test.csv.gz"))
TRAININGS = {  # name: train.py flags
    "fast_bf16": ["--preset", "fast", "--precision", "bf16"],
    "fast_fp16": ["--preset", "fast", "--precision", "fp16"],
    "fast_bf16_compile": ["--preset", "fast", "--precision", "bf16", "--compile"],
    "default_bf16": ["--precision", "bf16"],
    "default_fp16": ["--precision", "fp16"],
    "default_bf16_compile": ["--precision", "bf16", "--compile"],
}


def timed_run(cmd: list[str], log: Path) -> dict:
    """Run `cmd` with its output in `log`: wall seconds and exit code."""
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return {"seconds": round(time.perf_counter() - started, 1), "exit": code, "log": log.name}


def training(name: str, flags: list[str], out: Path, launcher: list[str]) -> dict:
    folder = out / name
    cmd = [*launcher, str(ROOT / "train.py"), "--train", TRAIN, "--test", TEST, "--device", "cuda"]
    cmd += ["--out-dir", str(folder), "--model-dir", str(folder), "--no-plots", *flags]
    result = timed_run(cmd, out / f"{name}.log")
    metrics = folder / "metrics.json"
    if result["exit"] == 0 and metrics.is_file():
        m = json.loads(metrics.read_text())
        keep = ("test_acc", "train_images_per_s", "train_seconds", "wall_seconds", "best_epoch")
        result |= {k: m.get(k) for k in (*keep, "peak_gpu_memory_mb", "numerics")}
    return result


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = [sys.executable]
    figures: dict = {"train": TRAIN, "test": TEST}
    import torch

    figures["torch"] = torch.__version__
    figures["gpu"] = torch.cuda.get_device_name(0)
    for name, flags in TRAININGS.items():
        figures[name] = training(name, flags, out, py)
        print(name, figures[name], flush=True)
    torchrun = [*py, "-m", "torch.distributed.run", "--nproc_per_node", "1"]
    figures["torchrun_fast"] = training("torchrun_fast", ["--preset", "fast"], out, torchrun)
    best = str(out / "default_bf16" / "best.pt")
    ask = [*py, str(ROOT / "predict.py"), "--checkpoint", best, "--input", TEST, "--device", "cuda"]
    for name, extra in (("predict", []), ("predict_tta", ["--tta"])):
        where = ["--output", str(out / f"{name}.csv"), "--report-dir", str(out / name)]
        figures[name] = timed_run([*ask, *where, *extra], out / f"{name}.log")
        metrics = out / name / "metrics.json"
        if metrics.is_file():
            figures[name]["accuracy"] = json.loads(metrics.read_text()).get("accuracy")
    export = [*py, str(ROOT / "predict.py"), "--checkpoint", best]
    figures["export"] = timed_run(
        [*export, "--export", str(out / "model.onnx")], out / "export.log"
    )
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
