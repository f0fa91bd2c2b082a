"""Cases the runtime tests run on every rank of a worker pool (see _workers.py).

Each case builds a Pipeline, runs it, checks it against a single-process reference
on the same rank (so no tensors travel back to the test process) and returns a
small, picklable summary.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _split_cases import exact as split_exact  # noqa: F401  (pool.run("split_exact", ...))
from _split_cases import tensor_parallel_exact as split_tp_exact  # noqa: F401
from torch import nn

from pipefold.errors import ConfigError, PeerFailure, PipefoldError
from pipefold.model import LayerSpec, TiedLayerSpec, build_reference
from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions, TransportOptions
from pipefold.schedule import build

VOCAB, SEQ, DIM = 11, 5, 8


class Block(nn.Module):
    """Linear + tanh: one MLP layer."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class Attention(nn.Module):
    """A tiny masked self-attention block; its boundary is (hidden, key mask)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, value):
        hidden, mask = value
        q, k, v = self.qkv(self.norm(hidden)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask[:, None, :], -1e4)
        return hidden + self.out(scores.softmax(-1) @ v), mask


class Sometimes(nn.Module):
    """A layer that fails (raise, exit or hang) on the rank that holds it."""

    def __init__(self, dim: int, how: str) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.how = how

    def forward(self, x):
        if x.device.type == "meta":  # the shape trace must pass; only real steps misbehave
            return self.linear(x)
        if self.how == "raise":
            raise ValueError("injected failure")
        if self.how == "exit":
            os._exit(3)
        if self.how == "hang":
            time.sleep(30)
        return self.linear(x)


class ShapeShifter(nn.Module):
    """Drops a column on the meta device but not on real data: the trace predicts the wrong shape."""

    def forward(self, x):
        return x[:, :-1] if x.device.type == "meta" else x


def _embed(embedding: nn.Module, tokens):
    return embedding(tokens), tokens != 0


def _head(embedding: nn.Module, value):
    hidden, _ = value
    return hidden @ embedding.weight.T


def mlp(num_layers: int = 8) -> list:
    return (
        [LayerSpec(Block, 6, DIM)]
        + [LayerSpec(Block, DIM, DIM) for _ in range(num_layers - 2)]
        + [LayerSpec(nn.Linear, DIM, 3)]
    )


def transformer(num_layers: int = 8) -> list:
    return (
        [TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, forward_fn=_embed)]
        + [LayerSpec(Attention, DIM) for _ in range(num_layers - 2)]
        + [TiedLayerSpec("embed", nn.Embedding, VOCAB, DIM, forward_fn=_head)]
    )


def _batch(model: str, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    if model == "mlp":
        return torch.randn(rows, 6, generator=generator), torch.randn(rows, 3, generator=generator)
    tokens = torch.randint(0, VOCAB, (rows, SEQ), generator=generator)
    tokens[:, 0] = 1  # every row attends to at least one key
    return tokens, torch.randint(0, VOCAB, (rows, SEQ), generator=generator)


def _loss_fn(model: str):
    if model == "mlp":
        return F.mse_loss
    return lambda logits, targets: F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def exact(
    *,
    schedule: str,
    num_microbatches: int,
    model: str = "mlp",
    rows: int = 10,
    recompute: Any = "none",
    num_virtual: int | None = None,
    num_steps: int = 2,
    partition: Any = "uniform",
    device: str | None = None,
    mesh: tuple[int, ...] | None = None,
    shared_memory: bool = True,
    shared_memory_bytes: int = 64 << 20,
    switch_to: str | None = None,
) -> dict:
    """Loss and every local gradient equal the single-process reference, over `num_steps` steps.

    Gradients are not zeroed between steps: both sides accumulate. `switch_to`: after the first
    step the pipeline runs that family instead (`Pipeline.use_schedule`).
    """
    torch.manual_seed(1234)  # only the data generator and the seeded builds may matter
    layers = mlp() if model == "mlp" else transformer()
    loss_fn = _loss_fn(model)
    process_group = None
    if mesh is not None:  # the last mesh dim is "pp"; with two dims every "dp" replica is its own pipeline
        from torch.distributed.device_mesh import init_device_mesh

        process_group = init_device_mesh("cpu", mesh, mesh_dim_names=("dp", "pp")[-len(mesh) :])
    pipe = Pipeline(
        layers,
        loss_fn=loss_fn,
        schedule=schedule,
        num_microbatches=num_microbatches,
        num_virtual=num_virtual,
        layout=LayoutOptions(recompute=recompute, partition=partition, seed=7, device=device),
        parallel=ParallelOptions(process_group=process_group),
        runtime=RuntimeOptions(timeout_s=30),
        transport=TransportOptions(shared_memory=shared_memory, shared_memory_bytes=shared_memory_bytes),
    )
    reference = build_reference(mlp() if model == "mlp" else transformer(), seed=7)
    losses = []
    ran = []
    for step in range(num_steps):
        if step == 1 and switch_to is not None:
            pipe.use_schedule(
                build(switch_to, num_ranks=pipe.schedule.num_ranks, num_microbatches=num_microbatches,
                      num_virtual=num_virtual)
            )
        inputs, targets = _batch(model, rows, seed=step)
        loss = pipe.step(inputs, targets)
        ran.append(pipe.last_timeline.schedule_name)
        expected = loss_fn(reference(inputs), targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    reference_params = dict(reference.named_parameters())
    names = []
    for name, param in pipe.named_parameters():
        assert param.grad is not None, f"{name} has no gradient"
        torch.testing.assert_close(
            param.grad.cpu(), reference_params[name].grad, msg=lambda m, n=name: f"{n}: {m}"
        )
        names.append(name)
    timeline = pipe.last_timeline
    return {
        "rank": pipe.rank,
        "losses": losses,
        "names": names,
        "num_events": [len(row) for row in timeline.events],
        "activation_bytes_peak": list(timeline.activation_bytes_peak),
        "source": timeline.source,
        "same_host_peers": [] if pipe.p2p is None else list(pipe.p2p.same_host_peers),
        "ran": ran,
        "last_ops": sorted({event.action.op.value for row in timeline.events for event in row}),
    }


def switch_refused(*, to: str, num_virtual: int | None = None) -> str | None:
    """use_schedule with another layout or an asynchronous family: the ConfigError's text."""
    pipe = Pipeline(
        mlp(), loss_fn=F.mse_loss, schedule="1f1b", num_microbatches=4, layout=LayoutOptions(seed=7),
        runtime=RuntimeOptions(timeout_s=30),
    )
    try:
        schedule = build(to, num_ranks=pipe.schedule.num_ranks, num_microbatches=4, num_virtual=num_virtual)
        pipe.use_schedule(schedule)
    except ConfigError as error:
        return str(error)
    return None


def failing(*, how: str, fail_rank: int, step_timeout_s: float = 30.0) -> dict:
    """Layer 3 misbehaves on its rank (2 ranks, gpipe); every rank reports what it raised."""
    layers = [LayerSpec(Block, 6, DIM), LayerSpec(Block, DIM, DIM)]
    layers += [LayerSpec(Sometimes, DIM, how) if fail_rank == 1 else LayerSpec(Block, DIM, DIM)]
    layers += [LayerSpec(nn.Linear, DIM, 3)]
    if fail_rank == 0:
        layers[1] = LayerSpec(Sometimes, DIM, how)
    pipe = Pipeline(
        layers, loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2,
        runtime=RuntimeOptions(timeout_s=step_timeout_s),
    )
    inputs, targets = _batch("mlp", 4, seed=0)
    start = time.monotonic()
    try:
        pipe.step(inputs, targets)
    except PipefoldError as error:
        return {
            "type": type(error).__name__,
            "message": str(error),
            "elapsed": time.monotonic() - start,
            "peer_failure": isinstance(error, PeerFailure),
        }
    return {"type": None, "message": "", "elapsed": time.monotonic() - start, "peer_failure": False}


def mismatch() -> dict:
    """Stage 0 (rank 0) produces a shape its meta trace did not predict."""
    layers = [LayerSpec(Block, 6, DIM), LayerSpec(ShapeShifter), LayerSpec(nn.Linear, DIM - 1, 3)]
    pipe = Pipeline(
        layers, loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2,
        layout=LayoutOptions(partition=[2, 1]),
    )
    inputs, targets = _batch("mlp", 4, seed=0)
    try:
        pipe.step(inputs, targets)
    except PipefoldError as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


def nonfinite(*, mode: str) -> dict:
    """A NaN target in micro-batch 1: every rank raises NonFiniteLoss, or the step is skipped."""
    pipe = Pipeline(
        mlp(4), loss_fn=F.mse_loss, schedule="gpipe", num_microbatches=2,
        runtime=RuntimeOptions(on_nonfinite=mode),
    )
    inputs, targets = _batch("mlp", 4, seed=0)
    pipe.step(inputs, targets)
    before = {name: p.grad.clone() for name, p in pipe.named_parameters()}
    targets = targets.clone()
    targets[3, 0] = float("nan")
    try:
        loss = pipe.step(inputs, targets)
    except PipefoldError as error:
        return {"type": type(error).__name__, "message": str(error)}
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, before[name])
    # The pipeline stays usable after a skipped step.
    pipe.step(inputs, _batch("mlp", 4, seed=0)[1])
    return {"type": None, "message": str(loss)}


def asynchronous(*, schedule: str, num_microbatches: int, rows: int = 8, lr: float = 0.1) -> dict:
    """An asynchronous schedule (PipeDream / 2BW) with SGD.

    On one rank the result is checked against a replay of the schedule: every F uses
    the weights current at that moment, every B adds its gradient at those weights,
    every STEP applies the sum (plain SGD).
    """
    from pipefold.schedule import Op

    layers = mlp(4)
    factory = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    pipe = Pipeline(
        layers,
        loss_fn=F.mse_loss,
        schedule=schedule,
        num_microbatches=num_microbatches,
        layout=LayoutOptions(seed=3),
        parallel=ParallelOptions(optimizer=factory),
    )
    reference = build_reference(mlp(4), seed=3)
    initial = {name: p.detach().clone() for name, p in pipe.named_parameters()}
    inputs, targets = _batch("mlp", rows, seed=0)
    loss = pipe.step(inputs, targets)
    result = {
        "loss": loss,
        "versions": list(pipe.last_timeline.weight_versions_peak),
        "changed": all(not torch.equal(initial[n], p) for n, p in pipe.named_parameters()),
    }
    if pipe.schedule.num_ranks == 1:
        x_mb, y_mb = (
            torch.tensor_split(inputs, num_microbatches),
            torch.tensor_split(targets, num_microbatches),
        )
        live = {n: p.detach().clone() for n, p in reference.named_parameters()}
        seen: dict[int, dict] = {}
        summed = {n: torch.zeros_like(v) for n, v in live.items()}
        total = 0.0
        for action in pipe.schedule.actions[0]:
            mb = action.microbatch
            if action.op is Op.F:
                seen[mb] = {n: v.clone() for n, v in live.items()}
            elif action.op is Op.B:
                weights = {n: v.clone().requires_grad_() for n, v in seen.pop(mb).items()}
                out = torch.func.functional_call(reference, weights, (x_mb[mb],))
                mb_loss = F.mse_loss(out, y_mb[mb]) * (len(x_mb[mb]) / rows)
                total += mb_loss.item()
                grads = torch.autograd.grad(mb_loss, list(weights.values()))
                for name, grad in zip(weights, grads, strict=True):
                    summed[name] += grad
            elif action.op is Op.STEP:
                for name in live:
                    live[name] -= lr * summed[name]
                    summed[name].zero_()
        torch.testing.assert_close(loss, total, rtol=1e-5, atol=1e-6)
        for name, param in pipe.named_parameters():
            torch.testing.assert_close(param.detach(), live[name], msg=lambda m, n=name: f"{n}: {m}")
    return result


def timeline(
    *, schedule: str, num_microbatches: int, recompute: Any = "none", fuse_backward: bool = True
) -> dict:
    """The measured timeline: which actions ran on which rank, waits, memory peaks."""
    pipe = Pipeline(
        mlp(8), loss_fn=F.mse_loss, schedule=schedule, num_microbatches=num_microbatches,
        layout=LayoutOptions(recompute=recompute), runtime=RuntimeOptions(fuse_backward=fuse_backward),
    )
    inputs, targets = _batch("mlp", 2 * num_microbatches, seed=0)
    pipe.step(inputs, targets)
    line = pipe.last_timeline
    return {
        "events": [[str(e.action) for e in row] for row in line.events],
        "ordered": all(e.start <= e.end for row in line.events for e in row),
        "waits_ok": all(w.start <= w.end for row in line.waits for w in row),
        "num_waits": [len(row) for row in line.waits],
        "activation_bytes_peak": list(line.activation_bytes_peak),
        "weight_versions_peak": list(line.weight_versions_peak),
        "json_roundtrip": type(line).from_json(line.to_json()).num_ranks == line.num_ranks,
        "json": line.to_json(),
        "transport": _transport(pipe),
    }


def _transport(pipe: Pipeline) -> dict:
    """How this rank's messages and step exchanges travel (shared memory, doorbells)."""
    p2p, collectives = pipe.p2p, pipe.collectives
    return {
        "shm_peers": list(p2p.same_host_peers) if p2p is not None else [],
        "doorbell_peers": list(p2p.doorbell_peers) if p2p is not None else [],
        "exchange": collectives is not None and collectives.uses_shared_memory,
        "exchange_doorbells": collectives is not None and collectives.uses_doorbells,
    }


def tuned(*, placement: str, num_microbatches: int, model: str = "mlp", rows: int = 10) -> dict:
    """`tune_schedule` then a `Pipeline` on its schedule: exact against one process, and the probe
    leaves no gradient behind."""
    from pipefold.runtime import tune_schedule
    from pipefold.schedule import validate
    from pipefold.schedule.io import to_json

    torch.manual_seed(1234)
    layers = mlp() if model == "mlp" else transformer()
    loss_fn = _loss_fn(model)
    inputs, targets = _batch(model, rows, seed=0)
    options = {"layout": LayoutOptions(seed=7), "runtime": RuntimeOptions(timeout_s=30)}
    result = tune_schedule(
        layers, loss_fn=loss_fn, inputs=inputs, targets=targets, num_microbatches=num_microbatches,
        placement=placement, time_budget_s=0.2, **options,
    )
    validate(result.schedule)
    pipe = Pipeline(layers, loss_fn=loss_fn, schedule=result.schedule, **options)
    reference = build_reference(mlp() if model == "mlp" else transformer(), seed=7)
    loss = pipe.step(inputs, targets)
    expected = loss_fn(reference(inputs), targets)
    expected.backward()
    torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
    reference_params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        torch.testing.assert_close(param.grad, reference_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    costs = result.costs
    return {
        "schedule": to_json(result.schedule),
        "probe": result.probe.name,
        "predicted_step_s": result.predicted_step_s,
        "probe_predicted_step_s": result.probe_predicted_step_s,
        "costs_positive": all(v > 0 for v in (*costs.f, *costs.b, *costs.i, *costs.w)),
        "num_probe_steps_kept": len(result.probe_step_s),
        "summary": result.summary(),
        "trials": [list(trial) for trial in result.trials],
        "trial_rounds": result.trial_rounds,
    }


def streaming(
    *,
    schedule: str,
    num_microbatches: int,
    steps: int,
    rows: int = 8,
    lr: float = 0.1,
    recompute: Any = "none",
    model: str = "mlp",
    mesh: tuple[int, int] | None = None,
    shared_memory: bool = True,
    calls: str = "train",
    precision: str = "fp32",
) -> dict:
    """`Pipeline.train` (a streaming run) against a one-process emulation of the same weight-version
    schedule (_stream_reference.py): every update of every stage on this rank, and every step's loss.
    `model="transformer"` ties the embedding and the head (first and last stage); `mesh=(dp, pp)`
    runs dp replicas, each on its own batches; `shared_memory=False` sends every message through
    the process group (the tied exchange at a STEP then runs on the owners' own group while
    boundaries are in flight on the pipeline's).
    `calls="step"`: `steps` calls of `Pipeline.step` instead (each drains; a forward uses its
    stage's newest weights), against the emulation of those calls one after the other.
    `precision="bf16-pure"`: bf16 weights, each stage's SGD stepping fp32 masters
    (`fp32_master_weights`), against the emulation with fp32 masters (`_check_pure`)."""
    from _stream_reference import emulate

    from pipefold.runtime import fp32_master_weights
    from pipefold.schedule import stream

    pure = precision == "bf16-pure"
    sgd: Any = fp32_master_weights(torch.optim.SGD) if pure else torch.optim.SGD

    class Recording(sgd):  # type: ignore[misc,valid-type]
        """SGD that keeps the weights (and under bf16-pure its fp32 masters) after each update."""

        def __init__(self, params: Any) -> None:
            super().__init__(params, lr=lr)
            self.snapshots: list[list[torch.Tensor]] = []
            self.masters: list[list[torch.Tensor]] = []

        def step(self, closure: Any = None) -> Any:
            result = super().step(closure)
            params = [p for g in self.param_groups for p in g["params"]]
            self.snapshots.append([p.detach().clone() for p in params])
            if pure:
                self.masters.append([self.state[p]["master"].clone() for p in params])
            return result

    optimizers: list[Recording] = []

    def factory(params: Any) -> Recording:
        optimizers.append(Recording(params))
        return optimizers[-1]

    layers = mlp(4) if model == "mlp" else transformer(4)
    loss_fn = _loss_fn(model)
    process_group = None
    if mesh is not None:
        from torch.distributed.device_mesh import init_device_mesh

        process_group = init_device_mesh("cpu", mesh, mesh_dim_names=("dp", "pp"))
    pipe = Pipeline(
        layers,
        loss_fn=loss_fn,
        schedule=schedule,
        num_microbatches=num_microbatches,
        layout=LayoutOptions(seed=3, recompute=recompute),
        parallel=ParallelOptions(optimizer=factory, process_group=process_group),
        runtime=RuntimeOptions(timeout_s=60, precision="bf16-pure" if pure else "fp32"),
        transport=TransportOptions(shared_memory=shared_memory),
    )
    reference = build_reference(mlp(4) if model == "mlp" else transformer(4), seed=3)
    num_replicas = 1 if mesh is None else mesh[0]
    replica_batches = [
        [_batch(model, rows, seed=100 * replica + k) for k in range(steps)] for replica in range(num_replicas)
    ]
    batches = replica_batches[pipe.data_parallel_rank]
    plan = stream(schedule, num_ranks=pipe.schedule.num_ranks, num_microbatches=num_microbatches)
    initial = {name: p.detach().float().clone() for name, p in pipe.named_parameters()}
    reduced: list[torch.dtype] = []  # what the per-update sums over replicas and tied owners carry
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        reduced.append(tensor.dtype)
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        if calls == "train":
            losses = pipe.train(iter(batches), steps=steps)
            unrolled, version_lag = plan.unroll(steps), plan.version_lag
            updates_per_step = plan.updates_per_step
        else:
            losses = [pipe.step(*batch) for batch in batches]
            unrolled, version_lag = _calls_one_after_another(pipe.schedule, steps), 0
            updates_per_step = sum(1 for a in pipe.schedule.actions[0] if a.op.value == "STEP")
    finally:
        dist.all_reduce = all_reduce
    if pure:  # bf16 gradients are summed in fp32 (rounded once, into bf16)
        assert torch.bfloat16 not in reduced, reduced
    stage_layers = [list(pipe.partition.layers_of(s)) for s in range(pipe.schedule.num_stages)]

    def run_emulation(lag: int):
        return emulate(
            reference, stage_layers, unrolled, num_steps=steps, lag=lag, batches=replica_batches,
            loss_fn=loss_fn, lr=lr, weight_dtype=torch.bfloat16 if pure else None,
        )

    history, expected_losses = run_emulation(version_lag)
    names_of = {id(p): n for n, p in pipe.named_parameters()}
    # The pipeline calls the factory once on a probe parameter first (check_stashable).
    optimizers = [o for o in optimizers if id(o.param_groups[0]["params"][0]) in names_of]
    assert len(optimizers) == len(pipe.stages)
    other_history, _ = run_emulation(1 - version_lag)
    tolerance = {"rtol": PURE_LOSS_RTOL, "atol": 0} if pure else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(losses, expected_losses, **tolerance)
    num_updates = steps * updates_per_step
    if pure:
        other_rule_differs = _check_pure(
            pipe, optimizers, names_of, initial, history, other_history, num_updates
        )
    else:
        other_rule_differs = _check_fp32_stream(
            pipe, optimizers, names_of, history, other_history, num_updates
        )
    timeline = pipe.last_timeline
    return {
        "losses": losses,
        "events": [[str(e.action) for e in row] for row in timeline.events],
        "unrolled": [[str(a) for a in row] for row in unrolled.actions],
        "weight_versions_peak": list(timeline.weight_versions_peak),
        "other_rule_differs": other_rule_differs,
        "then_step": pipe.step(*batches[0]),
        "reduced": sorted({str(dtype) for dtype in reduced}),
    }


PURE_LOSS_RTOL = 2e-2
"""The losses of a bf16-pure run against the emulation's: the bf16 tests' BF16_RTOL
(tests/runtime/test_training.py: a GEMM over other rows may move an output by a bf16 step)."""

PURE_UPDATE_RTOL = 0.08
"""The weights' change since the start (fp32 masters) against the emulation's, per tensor: L2
distance within 8% of the change's norm, the bf16-pure tests' PURE_RTOL (test_training.py:
gradients are bf16 sums, over micro-batches here and over rows in one GEMM there); measured at
most 0.3% at pp2 and dp2 x pp2, while the other version rule's emulation lies outside it."""


def _check_pure(pipe, optimizers, names_of, initial, history, other_history, num_updates) -> bool:
    """bf16-pure streaming: every stage's weights stay bf16 and its optimizer's masters fp32;
    after every update the bf16 weights are the masters rounded to nearest; the masters'
    change since the start equals the emulation's within PURE_UPDATE_RTOL. Returns whether the
    other version rule's emulation lies outside that tolerance for some tensor."""
    other_rule_differs = False
    for stage, optimizer in zip(pipe.stages, optimizers, strict=True):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        names = [names_of[id(p)] for p in params]
        assert all(p.dtype == torch.bfloat16 for p in params), [p.dtype for p in params]
        assert stage.stash is not None
        assert {v.dtype for v in stage.stash._current.values.values()} == {torch.bfloat16}
        expected, other = history[stage.index], other_history[stage.index]
        assert len(optimizer.snapshots) == len(optimizer.masters) == len(expected) == num_updates
        for update in range(num_updates):
            for i, name in enumerate(names):
                where = f"stage {stage.index} update {update} {name}"
                weight, master = optimizer.snapshots[update][i], optimizer.masters[update][i]
                assert weight.dtype == torch.bfloat16 and master.dtype == torch.float32, where
                # The stash's next version is what the stage computes with: the master rounded.
                assert torch.equal(weight, master.to(torch.bfloat16)), where
                change, want = master - initial[name], expected[update][name] - initial[name]
                distance = ((change - want).norm() / want.norm().clamp_min(1e-12)).item()
                assert distance < PURE_UPDATE_RTOL, (where, distance)
                other_change = other[update][name] - initial[name]
                if ((other_change - want).norm() / want.norm().clamp_min(1e-12)).item() > PURE_UPDATE_RTOL:
                    other_rule_differs = True
        # Some update smaller than a bf16 step stays in a master only (no rounding away).
        last = optimizer.masters[-1]
        assert any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in last)
    return other_rule_differs


def _check_fp32_stream(pipe, optimizers, names_of, history, other_history, num_updates) -> bool:
    """fp32 streaming: losses and every update of every stage equal the emulation's. Returns
    whether the other version rule's emulation differs somewhere."""
    other_rule_differs = False
    for stage, optimizer in zip(pipe.stages, optimizers, strict=True):
        names = [names_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
        expected = history[stage.index]
        assert len(optimizer.snapshots) == len(expected) == num_updates
        for update, (got, want) in enumerate(zip(optimizer.snapshots, expected, strict=True)):
            for name, value in zip(names, got, strict=True):
                where = f"stage {stage.index} update {update} {name}"
                torch.testing.assert_close(value, want[name], msg=lambda m, w=where: f"{w}: {m}")
                if not torch.allclose(value, other_history[stage.index][update][name]):
                    other_rule_differs = True
    return other_rule_differs


def _calls_one_after_another(schedule, num_calls: int):
    """`num_calls` calls of `schedule` as one schedule (call k's micro-batch j is k·m + j)."""
    from pipefold.schedule import Action, Op, Schedule

    m = schedule.num_microbatches
    steps_per_call = [sum(1 for a in row if a.op is Op.STEP) for row in schedule.actions]
    rows = tuple(
        tuple(
            Action(a.op, a.stage, a.microbatch + k * (steps if a.op is Op.STEP else m))
            for k in range(num_calls)
            for a in row
        )
        for row, steps in zip(schedule.actions, steps_per_call, strict=True)
    )
    return Schedule(
        name=schedule.name, num_ranks=schedule.num_ranks, num_stages=schedule.num_stages,
        num_microbatches=num_calls * m, placement=schedule.placement, actions=rows,
        weight_update=schedule.weight_update,
    )


def varlen(
    *,
    schedule: str,
    lengths: list,
    num_microbatches: int = 2,
    num_virtual: int | None = None,
    rows: int = 4,
    shared_memory_bytes: int = 64 << 20,
) -> dict:
    """A tiny GPT whose batches change length from step to step (`lengths[k]`: an int) or from
    micro-batch to micro-batch (`lengths[k]`: one length per micro-batch, passed as
    `Microbatches`): the loss and every gradient equal one process's, step by step."""
    from pipefold.model.zoo import gpt_layers, gpt_loss
    from pipefold.runtime import Microbatches

    def layers() -> list:
        return gpt_layers(vocab_size=13, d_model=8, num_heads=2, num_layers=4, seq_len=64)

    pipe = Pipeline(
        layers(), loss_fn=gpt_loss, schedule=schedule, num_microbatches=num_microbatches,
        num_virtual=num_virtual, layout=LayoutOptions(seed=7), runtime=RuntimeOptions(timeout_s=30),
        transport=TransportOptions(shared_memory_bytes=shared_memory_bytes),
    )
    reference = build_reference(layers(), seed=7)
    reference_params = dict(reference.named_parameters())
    generator = torch.Generator().manual_seed(5)
    losses, sent, shm_active = [], [], []
    for length in lengths:
        per_microbatch = [length] * num_microbatches if isinstance(length, int) else list(length)
        sizes = [len(c) for c in torch.tensor_split(torch.empty(rows), num_microbatches)]
        xs = [torch.randint(0, 13, (size, n), generator=generator)
              for size, n in zip(sizes, per_microbatch, strict=True)]
        ys = [torch.randint(0, 13, (size, n), generator=generator)
              for size, n in zip(sizes, per_microbatch, strict=True)]
        for param in (*pipe.parameters(), *reference.parameters()):
            param.grad = None
        if isinstance(length, int):
            loss = pipe.step(torch.cat(xs), torch.cat(ys))
        else:
            loss = pipe.step(Microbatches(xs), Microbatches(ys))
        expected = sum(gpt_loss(reference(x), y) * (len(x) / rows) for x, y in zip(xs, ys, strict=True))
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        for name, param in pipe.named_parameters():
            assert param.grad is not None, f"{name} has no gradient at length {length}"
            torch.testing.assert_close(
                param.grad, reference_params[name].grad, msg=lambda m, n=name, l=length: f"{n} at {l}: {m}"
            )
        losses.append(loss)
        sent.append(pipe.last_sent_bytes)
        channels = [] if pipe.p2p is None else pipe.p2p._send_channels.values()
        shm_active += [channel.active for channel in channels]
    return {"losses": losses, "sent_bytes": sent, "shm_active": shm_active}
