#!/usr/bin/env python3
"""A MixNN model file as a PyTorch module, trained on the paper's protocol
and timed like `mixnn bench local`.

    python3 bench/pytorch_model.py --model models/vgg-fmnist.toml --data DIR --threads 2 --epochs 3

Builds the `torch.nn.Sequential` that the model file describes (every
stage's ops in order; `residual` blocks as a small module), trains it on
the first 30,000 training images (batch 64, the model file's optimiser or
SGD lr 0.01 momentum 0.9), tests on 10,000 after each epoch, and prints
one JSON object: per-epoch training seconds (test excluded), test
accuracy and their medians, per thread count.

`build(model)` and `load_mixnn_weights(module, path)` are what README's
"Using the weights in PyTorch" imports: a MixNN weights export
(`mixnn train … --export-torch FILE`) loads with `load_state_dict`.
"""

import argparse
import gzip
import json
import os
import statistics
import struct
import time
import tomllib

import torch
from torch import nn


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    """y = ops(x) + shortcut(x), as MixNN's `residual` op."""

    def __init__(self, ops, shortcut):
        super().__init__()
        self.ops = nn.Sequential(*[module(o) for o in ops])
        self.shortcut = nn.Sequential(*[module(o) for o in shortcut])

    def forward(self, x):
        return self.ops(x) + self.shortcut(x)


class Identity(nn.Module):
    def forward(self, x):
        return x


def module(op):
    kind = op["op"]
    if kind == "linear":
        return nn.Linear(op["in"], op["out"])
    if kind == "conv2d":
        return nn.Conv2d(op["in"], op["out"], op["kernel"], op.get("stride", 1), op.get("padding", 0), bias=op.get("bias", True))
    if kind == "relu":
        return nn.ReLU()
    if kind == "normalize":
        return Normalize(op["mean"], op["std"])
    if kind == "max_pool2d":
        return nn.MaxPool2d(op["kernel"], op.get("stride", op["kernel"]), op.get("padding", 0))
    if kind == "avg_pool2d":
        return nn.AvgPool2d(op["kernel"], op.get("stride", op["kernel"]), op.get("padding", 0), count_include_pad=True)
    if kind == "global_avg_pool":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "batch_norm2d":
        return nn.BatchNorm2d(op["channels"], eps=op.get("eps", 1e-5), momentum=op.get("momentum", 0.1))
    if kind == "dropout":
        return nn.Dropout(op["p"])
    if kind == "flatten":
        return nn.Flatten()
    if kind == "log_softmax":
        return nn.LogSoftmax(dim=1)
    if kind == "identity":
        return Identity()
    if kind == "residual":
        return Residual(op["ops"], op.get("shortcut", []))
    raise SystemExit(f"error: no PyTorch module for op {kind!r}")


def build(model):
    """The model file (a dict from tomllib) as nn.Sequential, without the loss."""
    ops = [op for stage in model["stage"] for op in stage["ops"] if op["op"] != "nll_loss"]
    return nn.Sequential(*[module(op) for op in ops])


def load_mixnn_weights(net, path):
    """Loads a `--export-torch` safetensors file into `build(model)`."""
    from safetensors.torch import load_file

    net.load_state_dict(load_file(path))
    return net


def optimiser(model, params):
    opt = model.get("optimizer", {"kind": "sgd", "lr": 0.01, "momentum": 0.9})
    kind = opt["kind"]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt.get("momentum", 0.0), dampening=opt.get("dampening", 0.0),
                               weight_decay=opt.get("weight_decay", 0.0), nesterov=opt.get("nesterov", False))
    betas = (opt.get("beta1", 0.9), opt.get("beta2", 0.999))
    if kind == "adam":
        return torch.optim.Adam(params, lr=opt["lr"], betas=betas, eps=opt.get("eps", 1e-8), weight_decay=opt.get("weight_decay", 0.0))
    return torch.optim.AdamW(params, lr=opt["lr"], betas=betas, eps=opt.get("eps", 1e-8), weight_decay=opt.get("weight_decay", 0.01))


def idx(path):
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rb") as f:
                data = f.read()
            break
    else:
        raise SystemExit(f"error: {path}[.gz]: no such file")
    (magic,) = struct.unpack(">I", data[:4])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    return torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def load(data, shape, train_limit, test_limit):
    x = idx(os.path.join(data, "train-images-idx3-ubyte"))[:train_limit]
    y = idx(os.path.join(data, "train-labels-idx1-ubyte"))[:train_limit]
    tx = idx(os.path.join(data, "t10k-images-idx3-ubyte"))[:test_limit]
    ty = idx(os.path.join(data, "t10k-labels-idx1-ubyte"))[:test_limit]
    f = lambda t: t.reshape(t.shape[0], *shape).float() / 255.0
    return f(x), y.long(), f(tx), ty.long()


def run(threads, args, model, data):
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    x, y, tx, ty = data
    net = build(model)
    opt = optimiser(model, net.parameters())
    loss_fn = nn.NLLLoss()
    train_s, acc = [], []
    for _ in range(args.epochs):
        net.train()
        order = torch.randperm(x.shape[0])
        start = time.perf_counter()
        for i in range(0, x.shape[0], args.batch):
            idx_ = order[i : i + args.batch]
            opt.zero_grad()
            loss = loss_fn(net(x[idx_]), y[idx_])
            loss.backward()
            opt.step()
        train_s.append(time.perf_counter() - start)
        net.eval()
        with torch.no_grad():
            correct = 0
            for i in range(0, tx.shape[0], 1000):
                correct += (net(tx[i : i + 1000]).argmax(1) == ty[i : i + 1000]).sum().item()
            acc.append(correct / tx.shape[0])
    return {"threads": threads, "train_s": train_s, "median_train_s": statistics.median(train_s), "test_acc": acc}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", default="2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=30000)
    p.add_argument("--test-limit", type=int, default=10000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with open(args.model, "rb") as f:
        model = tomllib.load(f)
    shape = model["input"] if isinstance(model["input"], list) else [model["input"]]
    data = load(args.data, shape, args.train_limit, args.test_limit)
    runs = [run(int(t), args, model, data) for t in args.threads.split(",")]
    print(json.dumps({"model": model.get("name", args.model), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
