"""Is the split backward bit for bit what another checkout computes? A digest of every gradient.

    .venv/bin/python benchmarks/split_digest.py --baseline /tmp/base    # e.g. git archive <commit>

Runs `backward_input` then `backward_weight` (and `backward_full` for scale) over four
micro-batches of several stages (the per-action table's residual MLP at one and four rows, a
linear without bias, a weight used twice, a checkpointed region, three checkpointed blocks with
dropout under `direct=False` (a recomputed stage's W), `direct=False`, a first stage
whose input needs no gradient, an output that reaches a parameter directly, a hooked parameter,
a non-contiguous gradient slot, two outputs one of which gets no gradient, an addmm whose
alpha is not 1 beside a float64 linear), each checkout in its
own process with its own `pipefold` first on the path, and prints per stage the SHA-256 of every
input gradient and every parameter's `.grad` (as bytes), and whether the checkouts agree. Exit
status 1 when any digest differs. Without `--baseline` it prints this checkout's digests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import hashlib, json, sys
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
import pipefold.runtime.backward as bw

torch.set_num_threads(1)
D = 8


class Residual(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, 2 * D, bias=bias)
        self.fc2 = nn.Linear(2 * D, D, bias=bias)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return torch.tanh(x @ self.weight + self.bias) @ self.weight


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Residual()
        self.out = nn.Linear(D, D)

    def forward(self, x):
        return self.out(checkpoint(self.inner, x, use_reentrant=False))


class Rerun(nn.Module):
    # Three blocks each under its own checkpoint, W on autograd's path (`direct=False`), as a
    # recomputed stage runs: W reruns one layer at a time, the last first (dropout included:
    # each rerun restores its forward's random state).
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Residual() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(lambda h, b=block: torch.nn.functional.dropout(b(h), 0.25), x, use_reentrant=False)
        return x


class OutputSeed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.shift = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return self.fc(x), self.shift * 2.0


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)

    def forward(self, x):
        h = self.a(x)
        return h, self.b(torch.relu(h))


class Scaled(nn.Module):
    # A linear, then an addmm whose alpha is not 1 (a direct form by its graph, refused by its
    # values in W), then a linear (in float64 for "scaled-mixed"): W's checks fail part way.

    def __init__(self, dtype):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.c = nn.Linear(D, D).to(dtype)

    def forward(self, x):
        h = torch.addmm(self.b.bias, torch.relu(self.a(x)), self.b.weight.t(), alpha=2.0)
        return self.c(h.to(self.c.weight.dtype)).float()


def stage(name):
    if name in ("mlp", "mlp-rows4", "no-direct", "first", "hooked", "odd-slot"):
        return nn.Sequential(*[Residual() for _ in range(4)])
    if name == "no-bias":
        return nn.Sequential(Residual(bias=False), Residual(bias=False))
    kinds = {"tied": Tied, "checkpointed": Checkpointed, "rerun": Rerun, "output-seed": OutputSeed,
             "two-outputs": TwoOutputs,
             "scaled": lambda: Scaled(torch.float32), "scaled-mixed": lambda: Scaled(torch.float64)}
    return kinds[name]()


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(b"none" if t is None else t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run(name, split):
    torch.manual_seed(0)
    module = stage(name)
    params = tuple(module.parameters())
    cache = bw.GroupCache()
    if name == "hooked":
        module[1].fc1.weight.register_hook(lambda g: g * 1.0)
    if name == "odd-slot":
        w = module[2].fc2.weight
        w.grad = torch.zeros(w.shape[1], w.shape[0]).t()
    rows = 4 if name == "mlp-rows4" else 1
    found = []
    for mb in range(4):
        x = torch.randn(rows, D).requires_grad_(name != "first")
        outputs = module(x)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = tuple(torch.randn(o.shape) for o in outputs)
        if name == "two-outputs" and mb % 2:
            grads = (None, grads[1])
        if split:
            direct = name not in ("no-direct", "rerun")
            got, state = bw.backward_input(outputs, grads, (x,), params, direct=direct, cache=cache)
            del outputs
            bw.backward_weight(state)
        else:
            got = bw.backward_full(outputs, grads, (x,))
        found.extend(got)
    return digest(found + [p.grad for p in params])


NAMES = ["mlp", "mlp-rows4", "no-bias", "tied", "checkpointed", "rerun", "no-direct", "first", "output-seed",
         "hooked", "odd-slot", "two-outputs", "scaled", "scaled-mixed"]
print(json.dumps({f"{n} {'I+W' if s else 'B'}": run(n, s) for n in NAMES for s in (True, False)}))
"""


def _digests(checkout: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", _WORKER]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=checkout)
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: the digest run failed:\n{out.stderr}")
    result: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/split_digest.py", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of another commit")
    args = parser.parse_args(argv)
    new = _digests(ROOT)
    base = _digests(args.baseline) if args.baseline is not None else None
    differ = 0
    for name, value in new.items():
        if base is None:
            print(f"{name:24s} {value}")
            continue
        same = base.get(name) == value
        differ += not same
        print(f"{name:24s} {value} {base.get(name)} {'equal' if same else 'DIFFERENT'}")
    if base is not None:
        print(f"{len(new) - differ} of {len(new)} equal")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
