"""Speed of the web app's API (serve.py): the server's start from process start to its first
answered request, one client's request latency (p50, p99) and the requests per second of several
concurrent clients, for a checkpoint and for its ONNX export. Each request posts a real digit
drawn as a 280 x 280 PNG, as the page sends it.

usage: python bench/serve_speed.py [--requests N] [--clients K] [CHECKPOINT]
Default checkpoint: a `strong` network with fresh weights (speed does not depend on training).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_png() -> bytes:
    """A real test digit of the bundled sample, scaled to the page's canvas, as PNG bytes."""
    from PIL import Image

    import dataset

    row = dataset.load_csv(dataset.SAMPLE_DIR / "mnist_test.csv.gz").images[0]
    big = Image.fromarray(255 - row).resize((280, 280), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    return buffer.getvalue()


def post(url: str, body: bytes) -> float:
    """Seconds for one POST /predict, answered 200."""
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as r:
        json.loads(r.read())
    return time.perf_counter() - started


def started_server(checkpoint: str) -> tuple[subprocess.Popen, str, float]:
    """serve.py on a free port, and the seconds from its start to its first answered request."""
    port = free_port()
    started = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "serve.py"), "--checkpoint", checkpoint]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    server = subprocess.Popen([*cmd, "--port", str(port)], **quiet)
    url = f"http://127.0.0.1:{port}/health"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return server, f"http://127.0.0.1:{port}/predict", time.perf_counter() - started
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.02)


def measure(checkpoint: str, requests: int, clients: int, body: bytes) -> dict:
    server, url, start = started_server(checkpoint)
    try:
        post(url, body)  # warm up
        latencies = sorted(post(url, body) for _ in range(requests))
        with ThreadPoolExecutor(clients) as pool:
            began = time.perf_counter()
            list(pool.map(lambda _: post(url, body), range(requests)))
            rate = requests / (time.perf_counter() - began)
    finally:
        server.terminate()
        server.wait()
    return {
        "start_s": start,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * len(latencies)))],
        "requests_per_s": rate,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    import model

    body = digit_png()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "strong.pt")
            net = model.build("strong")
            meta = {"arch": "strong", "arch_kwargs": {}, "mean": 0.1307, "std": 0.3081}
            model.save_checkpoint(
                Path(checkpoint),
                {**meta, "state_dict": net.state_dict(), "class_names": list("0123456789")},
            )
        exported = str(Path(tmp) / "model.onnx")
        export = [sys.executable, str(ROOT / "predict.py"), "--checkpoint", checkpoint]
        subprocess.run([*export, "--export", exported], check=True, capture_output=True)
        rows = {
            "checkpoint (.pt, PyTorch)": measure(checkpoint, args.requests, args.clients, body),
            "ONNX export (onnxruntime)": measure(exported, args.requests, args.clients, body),
        }
    print(f"machine: {machine()}; {args.requests} requests, {args.clients} concurrent clients")
    header = f"{'model':28} {'start (s)':>10} {'p50 (ms)':>9} {'p99 (ms)':>9} {'requests/s':>11}"
    print(header)
    for name, r in rows.items():
        print(
            f"{name:28} {r['start_s']:10.2f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} "
            f"{r['requests_per_s']:11.1f}"
        )


if __name__ == "__main__":
    main()
