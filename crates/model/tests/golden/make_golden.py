#!/usr/bin/env python3
"""Golden vectors for MixNN's ops and optimisers, computed with PyTorch.

    python3 crates/model/tests/golden/make_golden.py > crates/model/tests/golden/ops.json

Each case gives a stage's ops (MixNN's model format), its input `x`, its
parameters in PyTorch's layout, an output gradient `r` (the backward runs
on `sum(y * r)`, or on the loss itself for a loss stage) and what PyTorch
computes: the output `y`, the input gradient `dx`, each parameter's
gradient, and for batch norm the running statistics after the forward
and the evaluation output with them. Optimiser cases give a parameter,
a gradient per step and the parameter after each step.

crates/model/tests/golden.rs checks MixNN against these within float
tolerance (the sums run in another order, so bits differ). Inputs come
from torch's seeded generator; the file records them, so the test does
not need PyTorch. Made with PyTorch 2.15.0 (CPU).
"""

import json
import sys

import torch
from torch import nn
import torch.nn.functional as F

torch.manual_seed(20261207)
torch.set_num_threads(1)


def t(v):
    return [float(x) for x in v.detach().reshape(-1).tolist()]


def conv_op(i, o, k, s=1, p=0, bias=True):
    return {"op": "conv2d", "in": i, "out": o, "kernel": k, "stride": s, "padding": p, "bias": bias}


def module_of(op):
    kind = op["op"]
    if kind == "conv2d":
        return nn.Conv2d(op["in"], op["out"], op["kernel"], op.get("stride", 1), op.get("padding", 0), bias=op.get("bias", True))
    if kind == "linear":
        return nn.Linear(op["in"], op["out"])
    if kind == "relu":
        return nn.ReLU()
    if kind == "max_pool2d":
        return nn.MaxPool2d(op["kernel"], op.get("stride", op["kernel"]), op.get("padding", 0))
    if kind == "avg_pool2d":
        return nn.AvgPool2d(op["kernel"], op.get("stride", op["kernel"]), op.get("padding", 0), count_include_pad=True)
    if kind == "global_avg_pool":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "batch_norm2d":
        return nn.BatchNorm2d(op["channels"], eps=op.get("eps", 1e-5), momentum=op.get("momentum", 0.1))
    if kind == "flatten":
        return nn.Flatten()
    if kind == "log_softmax":
        return nn.LogSoftmax(dim=1)
    if kind == "normalize":
        return Normalize(op["mean"], op["std"])
    if kind == "residual":
        return Residual(op["ops"], op.get("shortcut", []))
    raise SystemExit(f"no module for {kind}")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, ops, shortcut):
        super().__init__()
        self.ops = nn.Sequential(*[module_of(o) for o in ops])
        self.shortcut = nn.Sequential(*[module_of(o) for o in shortcut])

    def forward(self, x):
        return self.ops(x) + self.shortcut(x)


def randomise(model):
    # Non-trivial parameters everywhere (batch norm's γ = 1, β = 0 would
    # hide half its gradient).
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))


def op_case(name, ops, input_shape, batch, labels=None):
    mods = [module_of(o) for o in ops if o["op"] != "nll_loss"]
    model = nn.Sequential(*mods)
    randomise(model)
    model.train()
    x = torch.randn(batch, *input_shape, requires_grad=True)
    y = model(x)
    if labels is not None:
        lab = torch.tensor(labels)
        out = F.nll_loss(y, lab)
        out.backward()
        y_list, r = [float(out.detach())], None
    else:
        r = torch.randn_like(y)
        (y * r).sum().backward()
        y_list = t(y)
    params = {}
    grads = {}
    for pname, p in model.named_parameters():
        params[pname] = {"shape": list(p.shape), "values": t(p)}
        grads[pname] = t(p.grad)
    buffers = {}
    for bname, b in model.named_buffers():
        if b.dtype == torch.float32:
            buffers[bname] = t(b)
    case = {
        "name": name,
        "ops": ops,
        "input": list(input_shape),
        "batch": batch,
        "x": t(x),
        "y": y_list,
        "dx": t(x.grad),
        "params": params,
        "grads": grads,
        "buffers_after": buffers,
    }
    if labels is not None:
        case["labels"] = labels
    else:
        case["r"] = t(r)
    if buffers:
        model.eval()
        with torch.no_grad():
            case["y_eval"] = t(model(x))
    return case


def optim_case(name, spec, steps=4, n=7):
    p = torch.randn(n, requires_grad=True)
    start = t(p)
    kind = spec["kind"]
    args = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "sgd":
        opt = torch.optim.SGD([p], **args)
    elif kind == "adam":
        betas = (args.pop("beta1", 0.9), args.pop("beta2", 0.999))
        opt = torch.optim.Adam([p], betas=betas, **args)
    else:
        betas = (args.pop("beta1", 0.9), args.pop("beta2", 0.999))
        opt = torch.optim.AdamW([p], betas=betas, **args)
    grads, after = [], []
    for _ in range(steps):
        g = torch.randn(n)
        p.grad = g.clone()
        opt.step()
        grads.append(t(g))
        after.append(t(p))
    return {"name": name, "optimizer": spec, "start": start, "grads": grads, "after": after}


def main():
    ops = [
        op_case("conv2d 3x3 pad 1", [conv_op(2, 3, 3, 1, 1)], (2, 6, 6), 2),
        op_case("conv2d 3x3 stride 2 no bias", [conv_op(3, 4, 3, 2, 1, False)], (3, 7, 6), 2),
        op_case("conv2d 5x5 stride 3 pad 2", [conv_op(2, 2, 5, 3, 2)], (2, 9, 8), 2),
        op_case("conv2d 1x1", [conv_op(4, 2, 1)], (4, 3, 3), 3),
        op_case("max_pool2d 2", [{"op": "max_pool2d", "kernel": 2}], (2, 6, 6), 2),
        op_case("max_pool2d 3 stride 2 pad 1", [{"op": "max_pool2d", "kernel": 3, "stride": 2, "padding": 1}], (2, 7, 7), 2),
        op_case("avg_pool2d 2", [{"op": "avg_pool2d", "kernel": 2}], (2, 6, 6), 2),
        op_case("avg_pool2d 3 stride 2 pad 1", [{"op": "avg_pool2d", "kernel": 3, "stride": 2, "padding": 1}], (2, 7, 7), 2),
        op_case("global_avg_pool, flatten", [{"op": "global_avg_pool"}, {"op": "flatten"}], (3, 5, 4), 2),
        op_case("batch_norm2d", [{"op": "batch_norm2d", "channels": 3}], (3, 4, 4), 4),
        op_case("batch_norm2d momentum 0.3", [{"op": "batch_norm2d", "channels": 2, "eps": 0.001, "momentum": 0.3}], (2, 3, 5), 3),
        op_case(
            "residual basic block",
            [
                {"op": "residual", "ops": [conv_op(3, 3, 3, 1, 1, False), {"op": "batch_norm2d", "channels": 3}, {"op": "relu"}, conv_op(3, 3, 3, 1, 1, False), {"op": "batch_norm2d", "channels": 3}]},
                {"op": "relu"},
            ],
            (3, 5, 5),
            2,
        ),
        op_case(
            "residual with projection",
            [{"op": "residual", "ops": [conv_op(2, 4, 3, 2, 1, False), {"op": "relu"}], "shortcut": [conv_op(2, 4, 1, 2, 0, False)]}],
            (2, 6, 6),
            2,
        ),
        op_case(
            "cnn to the loss",
            [
                {"op": "normalize", "mean": 0.5, "std": 0.5},
                conv_op(1, 4, 3, 1, 1),
                {"op": "relu"},
                {"op": "max_pool2d", "kernel": 2},
                {"op": "flatten"},
                {"op": "linear", "in": 64, "out": 5},
                {"op": "log_softmax"},
                {"op": "nll_loss"},
            ],
            (1, 8, 8),
            4,
            labels=[3, 0, 4, 1],
        ),
    ]
    optims = [
        optim_case("sgd momentum", {"kind": "sgd", "lr": 0.1, "momentum": 0.9}),
        optim_case("sgd nesterov weight decay", {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
        optim_case("sgd dampening", {"kind": "sgd", "lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
        optim_case("adam", {"kind": "adam", "lr": 0.01}),
        optim_case("adam weight decay", {"kind": "adam", "lr": 0.01, "weight_decay": 0.1, "beta2": 0.99}),
        optim_case("adamw", {"kind": "adamw", "lr": 0.01, "weight_decay": 0.05}),
    ]
    json.dump({"torch": torch.__version__, "ops": ops, "optimizers": optims}, sys.stdout, indent=None)
    print()


if __name__ == "__main__":
    main()
