"""Prediction speed of `--arch basic`, side by side with the peer's evaluation loop
(../shared/bench/peer_seed.py: pandas, per-row Dataset, DataLoader(batch 100), fp32) on the same
file and the same weights, in one run.

Two figures each: end to end (a fresh process, from start to the predictions CSV written) and the
inference loop alone (images/s). Median of --repeats runs. The project runs on both numerics
paths, its default on this CPU and --precision fp32, and from its ONNX export on onnxruntime
(`predict.py --checkpoint basic.onnx`).

usage: python bench/predict_speed.py [--repeats N] [--device DEV] [CSV]
Default file: ../shared/data/mnist_test.csv.gz (10,000 rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import PEER, ROOT, SHARED, machine, numerics_paths, timed

# The peer's evaluation, as the seed READMEs write a prediction script: its own Dataset and CNN,
# pandas in and out. Prints one JSON line: the loop's seconds and the rows.
PEER_PREDICT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import pandas as pd, torch
from torch.utils.data import DataLoader
from peer_seed import CNN, CSVDataset
net = CNN()
weights = torch.load(sys.argv[3], weights_only=True)["state_dict"]
net.load_state_dict(dict(zip(net.state_dict(), weights.values())))
ds = CSVDataset(pd.read_csv(sys.argv[2]))
net.eval(); preds = []
t = time.perf_counter()
with torch.no_grad():
    for x, _ in DataLoader(ds, batch_size=100):
        preds.append(net(x).argmax(1))
loop = time.perf_counter() - t
labels = torch.cat(preds).numpy()
out = pd.DataFrame({"ImageId": range(1, len(labels) + 1), "Label": labels})
out.to_csv(sys.argv[4], index=False)
print(json.dumps({"loop_s": loop, "rows": len(ds)}))
"""

OUR_LOOP = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import dataset, model, onnx_model, predict
data = dataset.load_csv(sys.argv[2])
if sys.argv[5] == "onnx":
    ens = onnx_model.OnnxEnsemble(sys.argv[3])
else:
    ens = predict.Ensemble([sys.argv[3]], *model.setup_device(sys.argv[4], sys.argv[5]))
t = time.perf_counter()
probs = ens.predict_proba(data.images)
print(json.dumps({"loop_s": time.perf_counter() - t, "rows": len(probs)}))
"""


def run(cmd: list[str], env: dict) -> tuple[float, dict | None]:
    """Wall seconds of a command, and the JSON line it printed last (None when none)."""
    wall, out = timed(
        lambda: subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    )
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return wall, json.loads(last) if last.startswith("{") else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", nargs="?", default=str(SHARED / "data" / "mnist_test.csv.gz"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import torch

    import model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "basic.pt"
        torch.manual_seed(0)
        net = model.build("basic")
        weights = {"arch": "basic", "arch_kwargs": {}, "state_dict": net.state_dict()}
        normalization = {"mean": 0.1307, "std": 0.3081, "class_names": list("0123456789")}
        model.save_checkpoint(ckpt, {**weights, **normalization})
        env = {**os.environ, "MNIST_CACHE_DIR": str(tmp / "cache")}
        py = sys.executable
        peer_cmd = [py, "-c", PEER_PREDICT, str(PEER.parent), args.csv, str(ckpt)]
        peer_cmd.append(str(tmp / "p.csv"))
        ours_cmd = [py, str(ROOT / "predict.py"), "--checkpoint", str(ckpt), "--input", args.csv]
        ours_cmd += ["--output", str(tmp / "o.csv"), "--no-report", "--device", args.device]
        loop_cmd = [py, "-c", OUR_LOOP, str(ROOT), args.csv, str(ckpt), args.device]
        exported = tmp / "basic.onnx"
        run(
            [py, str(ROOT / "predict.py"), "--checkpoint", str(ckpt), "--export", str(exported)],
            env,
        )
        onnx_cmd = [*ours_cmd[:3], str(exported), *ours_cmd[4:]]
        onnx_loop = [*loop_cmd[:5], str(exported), args.device, "onnx"]
        paths = numerics_paths(args.device)
        runs: dict[str, list] = {"peer": []}
        for _ in range(args.repeats):
            runs["peer"].append(run(peer_cmd, env))
            for path in paths:
                precision = ["--precision", path]
                shutil.rmtree(tmp / "cache", ignore_errors=True)
                runs.setdefault(f"cold {path}", []).append(run([*ours_cmd, *precision], env))
                runs.setdefault(f"warm {path}", []).append(run([*ours_cmd, *precision], env))
                runs.setdefault(f"loop {path}", []).append(run([*loop_cmd, path], env))
            runs.setdefault("warm onnx", []).append(run(onnx_cmd, env))
            runs.setdefault("loop onnx", []).append(run(onnx_loop, env))
    rows = runs["peer"][0][1]["rows"]
    median = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    loops = {
        k: statistics.median(j["loop_s"] for _, j in v)
        for k, v in runs.items()
        if printed_loop_time(v)
    }
    print(
        f"machine: {machine()}; device {args.device}; {Path(args.csv).name}, {rows:,} rows; "
        f"median of {args.repeats}"
    )
    print(f"{'contender':64} {'end to end':>10} {'vs peer':>8}")
    lines = [("peer: pandas, per-row Dataset, DataLoader(100), fp32", median["peer"])]
    for path, name in paths.items():
        lines.append(
            (f"predict.py --no-report, {name}, first run (parses)", median[f"cold {path}"])
        )
        lines.append(
            (f"predict.py --no-report, {name}, repeat (parse cache)", median[f"warm {path}"])
        )
    lines.append(
        ("predict.py --no-report, ONNX export on onnxruntime, repeat", median["warm onnx"])
    )
    for name, wall in lines:
        print(f"{name:64} {wall:9.2f}s {median['peer'] / wall:7.2f}x")
    print(f"{'inference loop alone':64} {'images/s':>10} {'vs peer':>8}")
    contenders = [("peer", loops["peer"])]
    contenders += [(f"project, {name}", loops[f"loop {path}"]) for path, name in paths.items()]
    contenders.append(("project, ONNX export on onnxruntime", loops["loop onnx"]))
    for name, loop in contenders:
        print(f"{name:64} {rows / loop:10,.0f} {loops['peer'] / loop:7.2f}x")


def printed_loop_time(runs: list) -> bool:
    """Whether a contender's runs printed their loop time."""
    return runs[0][1] is not None and "loop_s" in runs[0][1]


if __name__ == "__main__":
    main()
