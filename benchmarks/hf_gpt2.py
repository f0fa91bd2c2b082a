"""A Hugging Face GPT-2 pipelined by pipefold and by torch.distributed.pipelining, alternated.

The model is a `GPT2LMHeadModel` built from a small config (random init, no download; the
head tied to the token embedding, no dropout). Both libraries cut it at the same block
boundary (`transformer.h.<n_layer/2>`: embeddings and the first half of the blocks on rank 0,
the rest, the final norm and the head on rank 1) and run the same 1F1B order on the same
batch and micro-batches:

- pipefold: `pipefold.split(model)` and `Pipeline(..., schedule="1f1b")` with the partition
  that puts the cut there;
- torch: `torch.distributed.pipelining.pipeline(model, split_spec={"transformer.h.<k>":
  SplitPoint.BEGINNING})` (its torch.export tracing splitter), `build_stage`, `Schedule1F1B`.
  Where that tracer fails on this model, the script prints why and runs torch's manual
  `PipelineStage` on pipefold's split pieces (the same modules, the same cut) instead.
  torch's stages do not tie the embedding and the head across ranks; the torch side sums
  that weight's gradient over the two ranks after each step (an all-reduce, inside the timed
  step), as pipefold does.

Each side is first checked against one process (the loss and every gradient,
`assert_close`); then the two alternate step by step (warm-up, then timed), each step timed
between barriers as its slowest rank. Prints the median step time of each and the median
ratio torch / pipefold (> 1: pipefold faster).

Run (2 ranks):
    .venv/bin/python benchmarks/hf_gpt2.py
    .venv/bin/python benchmarks/hf_gpt2.py --layers 8 --hidden 256 --vocab 8192 --seq 128 --batch 16 \
        --microbatches 8 --steps 12
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness.orchestrate import free_port  # noqa: E402

Batch = tuple[Any, Any]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="GPT-2 n_layer (blocks)")
    parser.add_argument("--hidden", type=int, default=256, help="n_embd")
    parser.add_argument("--heads", type=int, default=4, help="n_head")
    parser.add_argument("--vocab", type=int, default=8192, help="vocab_size")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed alternated steps per side")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side")
    parser.add_argument("--torch-splitter", choices=("trace", "manual"), default="trace",
                        help="trace: torch's pipeline() (falls back to manual where it fails); "
                        "manual: PipelineStage on pipefold's split pieces")
    args = parser.parse_args()
    if args.layers < 2 or args.batch % args.microbatches:
        parser.error("--layers must be >= 2 and --batch a multiple of --microbatches")
    return args


def _model(args: argparse.Namespace) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=args.vocab, n_positions=max(args.seq, 16), n_embd=args.hidden, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )
    return transformers.GPT2LMHeadModel(config)


def _loss_fn(logits: Any, targets: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _batch(args: argparse.Namespace) -> Batch:
    import torch

    generator = torch.Generator().manual_seed(1)
    shape = (args.batch, args.seq)
    return (
        torch.randint(0, args.vocab, shape, generator=generator),
        torch.randint(0, args.vocab, shape, generator=generator),
    )


class _Logits:
    """`model(x).logits` as an nn.Module (what torch's tracer and the reference run)."""

    @staticmethod
    def wrap(model: Any) -> Any:
        from torch import nn

        class Logits(nn.Module):
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.model = inner

            def forward(self, tokens: Any) -> Any:
                return self.model(tokens, use_cache=False).logits

        return Logits(model)


def _canonical(model: Any) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


class PipefoldSide:
    label = "pipefold"

    def __init__(self, model: Any, args: argparse.Namespace, batch: Batch) -> None:
        import torch

        from pipefold.model import split
        from pipefold.runtime import LayoutOptions, Pipeline

        half = args.layers // 2
        layers = split(model, example_inputs=(batch[0][: args.batch // args.microbatches],))
        partition = [1 + half, len(layers) - 1 - half]  # prefix + h[:half] | h[half:] + suffix
        self.pipe: Any = Pipeline(
            layers, loss_fn=_loss_fn, schedule="1f1b", num_microbatches=args.microbatches,
            layout=LayoutOptions(partition=partition, device=torch.device("cpu")),
        )

    def step(self, inputs: Any, targets: Any) -> float | None:
        return float(self.pipe.step(inputs, targets))

    def gradients(self) -> dict[str, Any]:
        return {name: p.grad for name, p in self.pipe.named_parameters() if p.grad is not None}

    def zero_grad(self) -> None:
        for parameter in self.pipe.parameters():
            parameter.grad = None


class _StageOf:
    """An nn.Module that chains split pieces, taking the boundary tuple as separate arguments
    (torch's PipelineStage passes a stage's received tensors positionally)."""

    @staticmethod
    def make(pieces: list[Any]) -> Any:
        from torch import nn

        class Stage(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.pieces = nn.ModuleList(pieces)

            def forward(self, *values: Any) -> Any:
                value: Any = values[0] if len(values) == 1 else tuple(values)
                for piece in self.pieces:
                    value = piece(value)
                return value

        return Stage()


class TorchSide:
    label = "torch"

    def __init__(self, model: Any, args: argparse.Namespace, batch: Batch, rank: int) -> None:
        import torch
        import torch.distributed as dist
        from torch.distributed import pipelining

        self.rank = rank
        half = args.layers // 2
        rows = args.batch // args.microbatches
        wrapped = _Logits.wrap(model)
        names = {key: "model." + value for key, value in _canonical(model).items()}
        # Every name a parameter has in the model -> its first one (the tied head's weight is
        # `transformer.wte.weight`), for a tracer that copies parameters under their own names.
        first = _canonical(model)
        aliases = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
        self.splitter = "pipeline() tracing"
        self.trace_error: str | None = None
        stage_module: Any = None
        stage: Any = None
        if args.torch_splitter == "trace":
            try:
                pipe = pipelining.pipeline(
                    wrapped, mb_args=(batch[0][:rows],),
                    split_spec={f"model.transformer.h.{half}": pipelining.SplitPoint.BEGINNING},
                )
                if pipe.num_stages != 2:
                    raise RuntimeError(f"pipeline() made {pipe.num_stages} stages, not 2")
                stage = pipe.build_stage(rank, torch.device("cpu"))
                stage_module = stage.submod
            except Exception as error:  # noqa: BLE001 - any tracer failure is reported, then the fallback runs
                self.trace_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
        # Every rank must agree on the path taken.
        errors: list[Any] = [None, None]
        dist.all_gather_object(errors, self.trace_error)
        first_error = next((e for e in errors if e is not None), None)
        if args.torch_splitter == "manual" or first_error is not None:
            self.trace_error = first_error
            self.splitter = "manual PipelineStage on pipefold.split pieces"
            from pipefold.model import split

            pieces = split(model, example_inputs=(batch[0][:rows],))
            own = pieces[: 1 + half] if rank == 0 else pieces[1 + half :]
            stage_module = _StageOf.make(own)
            stage = pipelining.PipelineStage(stage_module, rank, 2, torch.device("cpu"))
        self.module = stage_module
        # Canonical name -> the parameter objects under it: the tracer may hold a tied weight under
        # two names as two objects, of which the graph uses one (the one that gets a gradient).
        self.names: dict[str, list[Any]] = {}
        for local, parameter in stage_module.named_parameters(remove_duplicate=True):
            canonical = names.get(id(parameter))
            if canonical is None:
                canonical = local  # a tracer that copied the parameter: its own name, checked below
            canonical = canonical.removeprefix("model.")
            self.names.setdefault(aliases.get(canonical, canonical), []).append(parameter)
        # The parameters both ranks hold (the tied embedding / head): summed after each step.
        held: list[Any] = [None, None]
        dist.all_gather_object(held, sorted(self.names))
        self.shared = sorted(set(held[0]) & set(held[1]))
        self.schedule = pipelining.Schedule1F1B(stage, args.microbatches, loss_fn=_loss_fn)

    def step(self, inputs: Any, targets: Any) -> float | None:
        import torch.distributed as dist

        loss: float | None = None
        if self.rank == 0:
            self.schedule.step(inputs)
        else:
            losses: list[Any] = []
            self.schedule.step(target=targets, losses=losses)
            loss = float(sum(float(x) for x in losses) / len(losses))
        for name in self.shared:
            dist.all_reduce(self._grad(name))
        return loss

    def _grad(self, name: str) -> Any:
        holders = [p.grad for p in self.names[name] if p.grad is not None]
        if len(holders) > 1:
            raise RuntimeError(f"torch side: {name} has {len(holders)} gradients on one rank")
        return holders[0] if holders else None

    def gradients(self) -> dict[str, Any]:
        grads = {name: self._grad(name) for name in self.names}
        return {name: grad for name, grad in grads.items() if grad is not None}

    def zero_grad(self) -> None:
        for parameters in self.names.values():
            for parameter in parameters:
                parameter.grad = None


def _check(side: Any, batch: Batch, reference_loss: float, reference: dict[str, Any]) -> str:
    """One step from zero gradients against one process: loss (on the rank that has it) and
    every local gradient. Returns a line; raises AssertionError on a mismatch."""
    import torch

    side.zero_grad()
    loss = side.step(*batch)
    if loss is not None:
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{side.label}: loss differs from one process: {m}")
    grads = side.gradients()
    unknown = sorted(set(grads) - set(reference))
    if unknown:
        raise AssertionError(f"{side.label}: gradients with no counterpart in the model: {unknown[:5]}")
    worst = 0.0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{side.label}: gradient of {n}: {m}")
        worst = max(worst, float((grad - reference[name]).abs().max()))
    return f"{len(grads)} gradients, max |error| {worst:.2e}" + ("" if loss is None else f", loss {loss:.6f}")


def _timed(side: Any, batch: Batch) -> float:
    import torch
    import torch.distributed as dist

    side.zero_grad()
    dist.barrier()
    start = time.perf_counter()
    side.step(*batch)
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def _rank(rank: int, port: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pipefold.runtime.processes.orphan import die_with_parent

    die_with_parent()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    try:
        batch = _batch(args)
        model = _model(args)
        reference_model = copy.deepcopy(model)
        reference_loss_tensor = _loss_fn(reference_model(batch[0], use_cache=False).logits, batch[1])
        reference_loss_tensor.backward()
        reference_loss = float(reference_loss_tensor)
        reference = {
            name: p.grad for name, p in reference_model.named_parameters(remove_duplicate=True)
        }
        say(f"one process: loss {reference_loss:.6f}")
        sides: list[Any] = [PipefoldSide(copy.deepcopy(model), args, batch),
                            TorchSide(copy.deepcopy(model), args, batch, rank)]
        torch_side = sides[1]
        if torch_side.trace_error is not None:
            say(f"torch pipeline() could not trace the model: {torch_side.trace_error}")
        say(f"torch side: {torch_side.splitter}; summed across ranks after each step: {torch_side.shared}")
        for side in sides:
            line = _check(side, batch, reference_loss, reference)
            lines: list[Any] = [None, None]
            dist.all_gather_object(lines, line)
            say(f"check {side.label}: rank 0 {lines[0]}; rank 1 {lines[1]}")
        for _ in range(args.warmup):
            for side in sides:
                _timed(side, batch)
        times: dict[str, list[float]] = {side.label: [] for side in sides}
        for _ in range(args.steps):
            for side in sides:
                times[side.label].append(_timed(side, batch))
        ratios = [t / p for t, p in zip(times["torch"], times["pipefold"], strict=True)]
        for label, samples in times.items():
            say(f"{label:9s} median {statistics.median(samples):.4f} s/step "
                f"(min {min(samples):.4f}, max {max(samples):.4f}, {len(samples)} steps)")
        say(f"median ratio torch / pipefold: {statistics.median(ratios):.3f} "
            f"(pipefold faster in {sum(r > 1 for r in ratios)} of {len(ratios)} alternated pairs)")
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # the peer is blocked in gloo; the parent sees the exit and stops it
    finally:
        dist.destroy_process_group()


def main() -> None:
    args = _parse()
    print(
        f"HF GPT2LMHeadModel n_layer={args.layers} n_embd={args.hidden} n_head={args.heads} "
        f"vocab={args.vocab} seq={args.seq} batch={args.batch} microbatches={args.microbatches} "
        f"1f1b 2 ranks, 1 thread each, cut at transformer.h.{args.layers // 2}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per side, alternated",
        flush=True,
    )
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_rank, args=(rank, port, args)) for rank in range(2)]
    for process in processes:
        process.start()
    while any(p.is_alive() for p in processes):
        if any(p.exitcode not in (None, 0) for p in processes):
            for process in processes:
                if process.is_alive():
                    process.terminate()
            break
        time.sleep(0.2)
    for process in processes:
        process.join()
    codes = [p.exitcode for p in processes]
    if any(code != 0 for code in codes):
        raise SystemExit(f"a rank failed (exit codes {codes}); its traceback is above")


if __name__ == "__main__":
    main()
