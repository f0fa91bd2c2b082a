"""A one-process emulation of a streaming run's weight-version schedule (PipeDream, 2BW).

Independent of the runtime's stash: every stage keeps its own list of weight versions
(index = updates done), plain SGD is written out, and each forward picks its version by
the rule the paper states:
- PipeDream (`lag` 0): the stage's newest weights when the forward runs;
- PipeDream-2BW (`lag` 1): every micro-batch of step k uses the weights after max(k-1, 0)
  updates, so update k+1 applies a gradient computed on version k-1 (one step stale).
The actions run in any order that respects the data dependencies, rank by rank as the
unrolled schedule lists them. Returns the weights after every update of every stage and
the per-step losses.

Tied layers (one module at several stages): every holder keeps its own versions of the
tied weight, and its update n applies the sum of every holder's gradient of its update n
(a holder's STEP waits until every holder has reached the same STEP), so the copies agree
version by version. Data parallelism: `batches` holds one list of steps per replica; every
replica runs on the same weights, and each update applies the replicas' mean gradient.

`weight_dtype=torch.bfloat16` (`precision="bf16-pure"`): the weights kept and updated are fp32
masters; every version a forward uses is the masters rounded to bf16, each stage runs under
bf16 autocast, a stage's fp32 outputs cross to the next in bf16 and the last stage's output
reaches the loss in fp32 (the runtime's casts); gradients are summed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipefold.schedule import Op, Schedule


def _tensors(value: Any) -> tuple[Tensor, ...]:
    return (value,) if isinstance(value, Tensor) else tuple(value)


def _detached(value: Any) -> Any:
    def leaf(t: Tensor) -> Tensor:
        t = t.detach()
        return t.requires_grad_() if t.is_floating_point() else t

    return leaf(value) if isinstance(value, Tensor) else tuple(leaf(t) for t in value)


def emulate(
    reference: nn.Sequential,
    stage_layers: Sequence[Sequence[int]],
    schedule: Schedule,
    *,
    num_steps: int,
    lag: int,
    batches: Sequence[Sequence[tuple[Tensor, Tensor]]],
    loss_fn: Callable[[Any, Tensor], Tensor],
    lr: float,
    weight_dtype: torch.dtype | None = None,
) -> tuple[list[list[dict[str, Tensor]]], list[float]]:
    """`batches[replica][step]` is that replica's (inputs, targets) of the step. Returns the
    weights (fp32 masters under `weight_dtype`) after every update of every stage."""
    from pipefold.runtime.stage import cast_floating

    def as_used(value: Tensor) -> Tensor:  # the weight version a forward computes with
        return value.clone() if weight_dtype is None else value.to(weight_dtype)

    num_stages = len(stage_layers)
    num_replicas = len(batches)
    m = schedule.num_microbatches // num_steps
    forward_fns = getattr(reference, "_forward_fns", (None,) * len(reference))
    canonical = {id(p): n for n, p in reference.named_parameters()}
    # Per layer: (its own name for a parameter, the reference's name for it).
    local_names = [
        [(n, canonical[id(p)]) for n, p in layer.named_parameters()] for layer in reference
    ]
    names = [
        list(dict.fromkeys(full for index in layers for _, full in local_names[index]))
        for layers in stage_layers
    ]
    holders: dict[str, list[int]] = {}
    for s in range(num_stages):
        for n in names[s]:
            holders.setdefault(n, []).append(s)
    params = dict(reference.named_parameters())
    # The masters start from the weights as the stages hold them (rounded to bf16).
    start = {
        n: p.detach().clone() if weight_dtype is None else p.detach().to(weight_dtype).float()
        for n, p in params.items()
    }
    live = [{n: start[n].clone() for n in names[s]} for s in range(num_stages)]
    versions = [[{n: as_used(v) for n, v in live[s].items()}] for s in range(num_stages)]
    summed = [{n: torch.zeros_like(v) for n, v in live[s].items()} for s in range(num_stages)]
    history: list[list[dict[str, Tensor]]] = [[] for _ in range(num_stages)]
    updates_done = [0] * num_stages
    deposited: dict[tuple[int, int], dict[str, Tensor]] = {}  # (stage, update) -> its tied gradients
    rows = batches[0][0][0].shape[0]
    chunks = [
        [(torch.tensor_split(x, m), torch.tensor_split(y, m)) for x, y in replica[:num_steps]]
        for replica in batches
    ]
    losses = [0.0] * num_steps
    saved: dict[tuple[int, int, int], Any] = {}
    outputs_of: dict[tuple[int, int, int], Any] = {}
    grad_in: dict[tuple[int, int, int], tuple[Tensor, ...]] = {}
    done: set[tuple[Op, int, int]] = set()

    def forward(s: int, i: int) -> None:
        k, j = divmod(i, m)
        version = len(versions[s]) - 1 if lag == 0 else max(k - lag, 0)
        for r in range(num_replicas):
            weights = {n: versions[s][version][n].clone().requires_grad_() for n in names[s]}
            x = chunks[r][k][0][j] if s == 0 else _detached(outputs_of[(r, s - 1, i)])
            value = x
            pure = weight_dtype is not None
            autocast = torch.autocast("cpu", dtype=weight_dtype or torch.bfloat16, enabled=pure)
            with autocast:
                for index in stage_layers[s]:
                    local = {own: weights[full] for own, full in local_names[index]}
                    layer, fn = reference[index], forward_fns[index]
                    if fn is None:
                        value = torch.func.functional_call(layer, local, (value,))
                    else:
                        value = _call_with(layer, local, fn, value)
            if weight_dtype is not None:
                last = s == num_stages - 1
                source, target = (weight_dtype, torch.float32) if last else (torch.float32, weight_dtype)
                value = cast_floating(value, source, target)
            if s == num_stages - 1:
                y = chunks[r][k][1][j]
                value = loss_fn(value, y) * (y.shape[0] / rows)
                losses[k] += value.item() / num_replicas
            outputs_of[(r, s, i)] = value
            saved[(r, s, i)] = (x, weights, value)

    def backward(s: int, i: int) -> None:
        for r in range(num_replicas):
            x, weights, value = saved.pop((r, s, i))
            outputs = [t for t in _tensors(value) if t.requires_grad]
            grad = None if s == num_stages - 1 else list(grad_in.pop((r, s + 1, i)))
            inputs = [t for t in _tensors(x) if t.requires_grad] if s > 0 else []
            wrt = list(weights.values()) + inputs
            grads = torch.autograd.grad(outputs, wrt, grad_outputs=grad, allow_unused=True)
            for n, g in zip(weights, grads, strict=False):
                if g is not None:
                    summed[s][n] += g.float() / num_replicas
            if s > 0:
                grad_in[(r, s, i)] = tuple(grads[len(weights) :])

    def deposit(s: int) -> bool:
        """The tied gradients of stage s's next update are in; whether every holder's are."""
        update = updates_done[s]
        tied = [n for n in names[s] if len(holders[n]) > 1]
        deposited.setdefault((s, update), {n: summed[s][n].clone() for n in tied})
        return all((h, update) in deposited for n in tied for h in holders[n])

    def step(s: int) -> None:
        update = updates_done[s]
        for n in names[s]:
            if len(holders[n]) > 1:
                gradient = sum(deposited[(h, update)][n] for h in holders[n])
            else:
                gradient = summed[s][n]
            live[s][n] = live[s][n] - lr * gradient
            summed[s][n].zero_()
        updates_done[s] += 1
        versions[s].append({n: as_used(v) for n, v in live[s].items()})
        history[s].append({n: v.clone() for n, v in live[s].items()})

    def ready(op: Op, s: int, i: int) -> bool:
        if op is Op.F:
            return s == 0 or (Op.F, s - 1, i) in done
        if op is Op.B:
            return s == num_stages - 1 or (Op.B, s + 1, i) in done
        return deposit(s)

    positions = [0] * schedule.num_ranks
    while any(p < len(row) for p, row in zip(positions, schedule.actions, strict=True)):
        progressed = False
        for rank, row in enumerate(schedule.actions):
            while positions[rank] < len(row):
                action = row[positions[rank]]
                op, s, i = action.op, action.stage, action.microbatch
                if not ready(op, s, i):
                    break
                {Op.F: forward, Op.B: backward}.get(op, lambda s, i: step(s))(s, i)
                done.add((op, s, i))
                positions[rank] += 1
                progressed = True
        assert progressed, "the emulation is stuck: the schedule deadlocks"
    return history, losses


def _call_with(layer: nn.Module, weights: dict[str, Tensor], fn: Callable[..., Any], value: Any) -> Any:
    """A tied occurrence's `forward_fn(module, value)` on the given weights."""

    class Bound(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, value: Any) -> Any:
            return fn(self.layer, value)

    return torch.func.functional_call(Bound(), {f"layer.{n}": w for n, w in weights.items()}, (value,))
