#!/usr/bin/env python3
"""The paper's protocol in PyTorch, timed like `mixnn bench local`.

First 30,000 training images, 10,000 test images, batch 64, SGD lr 0.01
momentum 0.9, MLP 784-128-64-10 + LogSoftmax + NLLLoss. Prints one JSON
object: per-epoch training seconds (test excluded) and test accuracy, and
their medians, for each thread count asked for.

    python3 bench/pytorch_paper.py --data DIR --threads 1,2 --epochs 3

DIR holds the IDX files (optionally .gz), as `mixnn --data` takes them.
The batch order comes from torch's generator (seeded), not MixNN's: the
time per epoch does not depend on the order.
"""

import argparse
import gzip
import json
import os
import statistics
import struct
import time

import torch
from torch import nn


def idx(path):
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rb") as f:
                data = f.read()
            break
    else:
        raise SystemExit(f"error: {path}[.gz]: no such file")
    magic, = struct.unpack(">I", data[:4])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def load(data, train_limit, test_limit):
    x = idx(os.path.join(data, "train-images-idx3-ubyte"))[:train_limit]
    y = idx(os.path.join(data, "train-labels-idx1-ubyte"))[:train_limit]
    tx = idx(os.path.join(data, "t10k-images-idx3-ubyte"))[:test_limit]
    ty = idx(os.path.join(data, "t10k-labels-idx1-ubyte"))[:test_limit]
    f = lambda t: t.reshape(t.shape[0], -1).float() / 255.0
    return f(x), y.long(), f(tx), ty.long()


def run(threads, args, data):
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    x, y, tx, ty = data
    model = nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10), nn.LogSoftmax(dim=1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.NLLLoss()
    train_s, acc = [], []
    for _ in range(args.epochs):
        order = torch.randperm(x.shape[0])
        start = time.perf_counter()
        for i in range(0, x.shape[0], args.batch):
            idx_ = order[i : i + args.batch]
            opt.zero_grad()
            loss = loss_fn(model(x[idx_]), y[idx_])
            loss.backward()
            opt.step()
        train_s.append(time.perf_counter() - start)
        with torch.no_grad():
            acc.append((model(tx).argmax(1) == ty).float().mean().item())
    return {"threads": threads, "train_s": train_s, "median_train_s": statistics.median(train_s), "test_acc": acc}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=30000)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    data = load(args.data, args.train_limit, args.test_limit)
    runs = [run(int(t), args, data) for t in args.threads.split(",")]
    print(json.dumps({"torch": torch.__version__, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
