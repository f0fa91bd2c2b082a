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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pipefold.schedule import Op, Schedule


def emulate(
    reference: nn.Sequential,
    stage_layers: Sequence[Sequence[int]],
    schedule: Schedule,
    *,
    num_steps: int,
    lag: int,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    lr: float,
) -> tuple[list[list[dict[str, Tensor]]], list[float]]:
    num_stages = len(stage_layers)
    m = schedule.num_microbatches // num_steps
    names = [
        [n for n, _ in reference.named_parameters() if int(n.split(".")[0]) in set(layers)]
        for layers in stage_layers
    ]
    params = dict(reference.named_parameters())
    live = [{n: params[n].detach().clone() for n in names[s]} for s in range(num_stages)]
    versions = [[{n: v.clone() for n, v in live[s].items()}] for s in range(num_stages)]
    summed = [{n: torch.zeros_like(v) for n, v in live[s].items()} for s in range(num_stages)]
    history: list[list[dict[str, Tensor]]] = [[] for _ in range(num_stages)]
    rows = batches[0][0].shape[0]
    chunks = [
        (torch.tensor_split(x, m), torch.tensor_split(y, m)) for x, y in batches[:num_steps]
    ]
    losses = [0.0] * num_steps
    saved: dict[tuple[int, int], Any] = {}
    outputs_of: dict[tuple[int, int], Tensor] = {}
    grad_in: dict[tuple[int, int], Tensor] = {}
    done: set[tuple[Op, int, int]] = set()

    def forward(s: int, i: int) -> None:
        k, j = divmod(i, m)
        version = len(versions[s]) - 1 if lag == 0 else max(k - lag, 0)
        weights = {n: versions[s][version][n].clone().requires_grad_() for n in names[s]}
        x = chunks[k][0][j] if s == 0 else outputs_of[(s - 1, i)].detach().requires_grad_()
        value = x
        for index in stage_layers[s]:
            prefix = f"{index}."
            local = {n[len(prefix):]: w for n, w in weights.items() if n.startswith(prefix)}
            value = torch.func.functional_call(reference[index], local, (value,))
        if s == num_stages - 1:
            y = chunks[k][1][j]
            value = loss_fn(value, y) * (y.shape[0] / rows)
            losses[k] += value.item()
        outputs_of[(s, i)] = value
        saved[(s, i)] = (x, weights, value)

    def backward(s: int, i: int) -> None:
        x, weights, value = saved.pop((s, i))
        grad = None if s == num_stages - 1 else grad_in.pop((s + 1, i))
        wrt = list(weights.values()) + ([x] if s > 0 else [])
        grads = torch.autograd.grad(value, wrt, grad_outputs=grad)
        for n, g in zip(weights, grads, strict=False):
            summed[s][n] += g
        if s > 0:
            grad_in[(s, i)] = grads[-1]

    def step(s: int) -> None:
        for n in names[s]:
            live[s][n] = live[s][n] - lr * summed[s][n]
            summed[s][n].zero_()
        versions[s].append({n: v.clone() for n, v in live[s].items()})
        history[s].append({n: v.clone() for n, v in live[s].items()})

    def ready(op: Op, s: int, i: int) -> bool:
        if op is Op.F:
            return s == 0 or (Op.F, s - 1, i) in done
        if op is Op.B:
            return s == num_stages - 1 or (Op.B, s + 1, i) in done
        return True

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
