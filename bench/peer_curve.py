"""The peer's run (../shared/bench/peer_seed.py) scored on the test set after every epoch.

Its own classes and its loop, step for step (seed 0, pandas, DataLoader(100), Adam 1e-3), with a
test score after each epoch. A score saves and restores the random state (a DataLoader iterator
draws a seed from it), so the training is the peer's own; each point's clock is the time from
process start to the end of that score, less the earlier scores (which the peer never runs).
Prints one JSON line: {"points": [[seconds, test accuracy], ...], "train_rows": N}.

usage: python bench/peer_curve.py TRAIN_CSV TEST_CSV EPOCHS
"""

import time

T0 = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from common import PEER  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(PEER.parent))
from peer_seed import CNN, CSVDataset  # noqa: E402


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """The peer's own evaluation, leaving the random state as it was."""
    state = torch.get_rng_state()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
    torch.set_rng_state(state)
    return correct / len(loader.dataset)


def main(train_csv: str, test_csv: str, epochs: str) -> None:
    torch.manual_seed(0)
    train_ds, test_ds = CSVDataset(pd.read_csv(train_csv)), CSVDataset(pd.read_csv(test_csv))
    train_loader = DataLoader(train_ds, batch_size=100, shuffle=True)
    test_loader = DataLoader(test_ds, batch_size=100)
    model = CNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    points, scoring = [], 0.0
    for _ in range(int(epochs)):
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        started = time.perf_counter()
        acc = accuracy(model, test_loader)
        points.append([round(time.perf_counter() - T0 - scoring, 2), acc])
        scoring += time.perf_counter() - started
    print(json.dumps({"points": points, "train_rows": len(train_ds)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
