"""Time to accuracy on the real job: the peer against the project's presets, in one run.

The peer (bench/peer_curve.py: ../shared/bench/peer_seed.py scored after each epoch) and, on each
numerics path of this CPU (its default and fp32), `python train.py --preset P [--epochs E]
[--max-rows R]` for each point of the plan, each from an empty parse cache, timed from process
start to exit; its test accuracy is what train.py prints at the end (best.pt, calibrated).
Writes the figure, a JSON of every point, and prints the table with the ratios:

- `--preset fast` (its own epochs) against the peer's last point: time ratio (target 10x) and
  whether it reached the peer's accuracy;
- for each of the peer's points, the quickest project point at least as accurate, and the
  ratio of times (target 5x).

usage: python bench/time_to_accuracy.py [--train CSV] [--test CSV] [--peer-epochs 15]
           [--plan fast:1,2,3,4,6,8 fast:1@30000 best:2] [--figure docs/time_to_accuracy.png]
           [--out F.json]
A plan item PRESET:E1,E2@R trains the preset for E1, then E2 epochs on the first R training rows
(a fraction of an epoch of the whole file); a bare PRESET: its own epochs, on every row.
Default files: ../shared/data/mnist_{train,test}.csv.gz (54,113 + 10,000 MNIST digits).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, SHARED, machine, numerics_paths

import config

BENCH = Path(__file__).resolve().parent


def wall(cmd: list[str], env: dict) -> tuple[float, str]:
    """Seconds from process start to exit, and stdout; a failure ends the bench with its tail."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:4])}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def own_epochs(preset: str) -> int:
    """A preset's epochs for digits."""
    return config.PRESETS[preset]["digits"].epochs


def parse_plan(items: list[str]) -> list[tuple[str, int, int | None]]:
    """`fast:1,2 fast:1@30000 best:15` as (preset, epochs, rows) triples, each once; a bare
    preset: its own epochs; rows None: every row."""
    plan = []
    for item in items:
        spec, _, rows = item.partition("@")
        preset, _, epochs = spec.partition(":")
        if preset not in config.PRESETS:
            sys.exit(f"--plan {item}: no preset {preset!r} (one of {', '.join(config.PRESETS)})")
        given = [int(e) for e in epochs.split(",")] if epochs else [own_epochs(preset)]
        points = [(preset, e, int(rows) if rows else None) for e in given]
        plan += [point for point in points if point not in plan]
    return plan


def project_point(args, point: tuple[str, int, int | None], precision: str, tmp: Path) -> dict:
    """One train.py run as a user types it, from an empty parse cache."""
    preset, epochs, rows = point
    folder = Path(tempfile.mkdtemp(dir=tmp))
    env = {**os.environ, "MNIST_CACHE_DIR": str(folder / "cache")}
    cmd = [sys.executable, str(ROOT / "train.py"), "--train", args.train, "--test", args.test]
    cmd += ["--preset", preset, "--precision", precision, "--device", "cpu"]
    cmd += ["--out-dir", str(folder), "--model-dir", str(folder), "--epochs", str(epochs)]
    cmd += ["--max-rows", str(rows)] if rows else []
    seconds, _ = wall(cmd, env)
    metrics = json.loads((folder / "metrics.json").read_text())
    return {
        "preset": preset,
        "epochs": epochs,
        "max_rows": rows,
        "precision": precision,
        "seconds": round(seconds, 1),
        "test_acc": metrics["test_acc"],
        "arch": metrics["config"]["arch"],
        "train_images_per_s": metrics["train_images_per_s"],
    }


def ratios(peer: list[list[float]], ours: list[dict]) -> list[dict]:
    """For each peer point, the quickest of `ours` at least as accurate, and the time ratio."""
    rows = []
    for epoch, (seconds, acc) in enumerate(peer, 1):
        good = [p for p in ours if p["test_acc"] >= acc]
        best = min(good, key=lambda p: p["seconds"], default=None)
        ratio = None if best is None else round(seconds / best["seconds"], 2)
        rows.append(
            {"peer_epoch": epoch, "peer_s": seconds, "peer_acc": acc, "ours": best, "x": ratio}
        )
    return rows


def label(point: dict) -> str:
    rows = f" --max-rows {point['max_rows']}" if point.get("max_rows") else ""
    return f"--preset {point['preset']} --epochs {point['epochs']}{rows}"


def series(ours: list[dict]) -> dict[tuple, list[dict]]:
    """The project's points by preset, numerics path and rows trained on, each in time order."""
    lines = {}
    for point in sorted(ours, key=lambda p: p["seconds"]):
        key = (point["preset"], point["precision"], point.get("max_rows"))
        lines.setdefault(key, []).append(point)
    return lines


def draw(peer: list[list[float]], ours: list[dict], names: dict, rows: int, path: Path) -> None:
    """Test error against wall time, both axes logarithmic: the peer's curve, the same at a
    fifth of its times (a point of the project's left of and below it meets the 5x goal), and
    one line per preset and numerics path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    xs, ys = zip(*peer, strict=True)
    errors = [100 * (1 - y) for y in ys]
    ax.plot(xs, errors, "o-", color="0.5", label="peer (seed pipeline), fp32")
    fifths = [x / 5 for x in xs]
    ax.plot(fifths, errors, ":", color="0.6", label="the peer at a fifth of its time (the 5x goal)")
    for (preset, precision, first), line in series(ours).items():
        name = f"--preset {preset}, {names[precision]}" + (
            f", first {first:,} rows" if first else ""
        )
        errors = [100 * (1 - p["test_acc"]) for p in line]
        ax.plot([p["seconds"] for p in line], errors, "s-" if first is None else "D", label=name)
        for p, error in zip(line, errors, strict=True):
            ax.annotate(
                f"{p['epochs']}",
                (p["seconds"], error),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="wall time from process start (s)",
        ylabel="MNIST test error (%)",
    )
    ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 3, 5)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title(f"Time to accuracy, {rows:,} training digits (numbers: epochs)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, machine(), fontsize=6, color="0.4")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(peer: list[list[float]], ours: list[dict], names: dict) -> None:
    """The table of points, then the ratios of the 10x and 5x targets."""
    print(f"machine: {machine()}")
    print("\n| run | numerics | epochs | seconds | MNIST test accuracy |\n|---|---|---|---|---|")
    for epoch, (seconds, acc) in enumerate(peer, 1):
        print(f"| peer | fp32 | {epoch} | {seconds:.1f} | {acc:.2%} |")
    for p in ours:
        print(
            f"| {label(p)} | {names[p['precision']]} | {p['epochs']} | "
            f"{p['seconds']:.1f} | {p['test_acc']:.2%} |"
        )
    peer_s, peer_acc = peer[-1]
    for precision, name in names.items():
        for p in ours:
            if (p["preset"], p["precision"], p["epochs"], p.get("max_rows")) == (
                "fast",
                precision,
                own_epochs("fast"),
                None,
            ):
                met = "reached" if p["test_acc"] >= peer_acc else "did NOT reach"
                print(
                    f"\n--preset fast, {name}: {p['seconds']:.1f} s, {peer_s / p['seconds']:.1f}x "
                    f"the peer's {peer_s:.1f} s (target 10x); {met} its {peer_acc:.2%}"
                )
        print(f"\n{name}: each peer point against the quickest preset at least as accurate")
        print(
            "| peer epoch | peer s | peer acc | project | s | x (target 5) |\n"
            "|---|---|---|---|---|---|"
        )
        for row in ratios(peer, [p for p in ours if p["precision"] == precision]):
            best = row["ours"]
            what = "none as accurate" if best is None else label(best)
            seconds = "" if best is None else f"{best['seconds']:.1f}"
            print(
                f"| {row['peer_epoch']} | {row['peer_s']:.1f} | {row['peer_acc']:.2%} | "
                f"{what} | {seconds} | {row['x'] or ''} |"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(SHARED / "data/mnist_train.csv.gz"))
    p.add_argument("--test", default=str(SHARED / "data/mnist_test.csv.gz"))
    p.add_argument("--peer-epochs", type=int, default=15)
    p.add_argument("--plan", nargs="+", default=["fast:1,2,3,4,6,8", "fast:1@30000", "best:2"])
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "time_to_accuracy.png")
    p.add_argument("--out", type=Path, help="every point as JSON here")
    args = p.parse_args()
    plan = parse_plan(args.plan)
    names = numerics_paths("cpu")
    env = {**os.environ}
    _, out = wall(
        [
            sys.executable,
            str(BENCH / "peer_curve.py"),
            args.train,
            args.test,
            str(args.peer_epochs),
        ],
        env,
    )
    peer_run = json.loads(out.strip().splitlines()[-1])
    peer = peer_run["points"]
    with tempfile.TemporaryDirectory() as tmp:
        ours = [
            project_point(args, point, precision, Path(tmp))
            for precision in names
            for point in plan
        ]
    report(peer, ours, names)
    draw(peer, ours, names, peer_run["train_rows"], args.figure)
    print(f"\nwrote {args.figure}")
    if args.out:
        args.out.write_text(
            json.dumps({"machine": machine(), "peer": peer, "project": ours}, indent=1)
        )


if __name__ == "__main__":
    main()
