"""Rank-side cases for `pipefold.split` and shared parameters in a `Pipeline`.

Every rank builds the same module (same seed), keeps an unsplit deep copy as the one-process
reference, and checks its own pipeline's loss, every local gradient and, after each optimizer
step, every local weight against it. Run by tests/runtime/test_split_pipeline.py (2 ranks) and
through `_cases.split_exact` by tests/runtime/test_runtime_exact.py (4 ranks).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import split
from pipefold.model.build import materialize
from pipefold.runtime import ParallelOptions, Pipeline, RuntimeOptions, hf_tensor_parallel_plan

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/, for model.split_models

from model.split_models import (  # noqa: E402
    DIM,
    HF_VOCAB,
    SEQ,
    SKIP_POINTS,
    VOCAB,
    NaturalTransformer,
    SkipTransformer,
    gpt2_model,
    llama_model,
)

ROWS = 8

HF_POINTS = {
    # Cut through a graph capture: one cut inside a block, one before the final norm.
    "gpt2-points": ["transformer.h.1", "transformer.h.2.mlp", "transformer.ln_f"],
}


def _module(model: str, num_blocks: int = 3) -> tuple[nn.Module, int]:
    """The module (built from seed 0, alike on every rank) and its vocabulary."""
    torch.manual_seed(0)
    if model == "natural":
        return NaturalTransformer(num_blocks=num_blocks), VOCAB
    if model.startswith("skip"):
        return SkipTransformer(num_blocks=num_blocks), VOCAB
    if model.startswith("gpt2"):
        return gpt2_model(num_blocks), HF_VOCAB
    if model.startswith("llama"):
        return llama_model(num_blocks), HF_VOCAB
    raise ValueError(model)


def _plain() -> nn.Sequential:
    """A plain layer list whose head shares the embedding's weight (`head.weight = embed.weight`)."""
    torch.manual_seed(0)
    embed, head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, VOCAB, bias=False)
    head.weight = embed.weight
    return nn.Sequential(embed, nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM), head)


def _loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _batch(vocab: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return (
        torch.randint(0, vocab, (ROWS, SEQ), generator=generator),
        torch.randint(0, vocab, (ROWS, SEQ), generator=generator),
    )


def _expected_keys(module: nn.Module) -> list[str]:
    """`module.state_dict()`'s keys, a tensor held under several names listed under its first."""
    seen: set[int] = set()
    keys = []
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            keys.append(key)
    return keys


def _lazy_init(path: str, module: nn.Module) -> None:
    if path == "":
        nn.init.normal_(module.position)  # set on the top module, which has no reset_parameters
    else:
        module.reset_parameters()


def _lazy_split(num_blocks: int) -> tuple[nn.Module, list[nn.Module]]:
    with torch.device("meta"):
        module = NaturalTransformer(num_blocks=num_blocks)
    return module, split(module, example_inputs=(_batch(VOCAB, 0)[0],), init=_lazy_init, seed=1)


def _bytes(module: nn.Module, *, real_only: bool) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()] if not (real_only and t.is_meta)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def exact(
    *, model: str, schedule: str, num_virtual: int | None = None, num_steps: int = 3, num_blocks: int = 3
) -> dict[str, Any]:
    """Loss, every gradient and (after each SGD step) every weight equal the unsplit module's.
    `num_blocks`: the module's blocks (its layers are these and two more: prefix and suffix)."""
    if model == "plain":
        module: nn.Module = _plain()
        vocab = VOCAB
        reference = copy.deepcopy(module)
        layers: Any = module
        forward = reference
    elif model == "lazy":
        # Built on the meta device: each rank materializes only its own pieces (initialized by
        # the modules' own reset_parameters, under seeds from their paths); the reference
        # materializes every piece of another meta build the same way.
        vocab = VOCAB
        module, layers = _lazy_split(num_blocks)
        reference, reference_layers = _lazy_split(num_blocks)
        materialize(reference_layers, range(len(reference_layers)), "cpu")
        forward = reference
    else:
        module, vocab = _module(model, num_blocks)
        reference = copy.deepcopy(module)
        # "skip": cut at named points (one inside a block) through a graph capture; "skip-blocks":
        # no points, the skip connection around the blocks sends it through the graph route too.
        points = SKIP_POINTS if model == "skip" else HF_POINTS.get(model)
        layers = split(module, split_points=points, example_inputs=(_batch(vocab, 0)[0],))
        forward = (
            reference
            if model in ("natural", "skip", "skip-blocks")
            else (lambda x: reference(x, use_cache=False).logits)
        )
    pipe = Pipeline(
        layers, loss_fn=_loss_fn, schedule=schedule, num_microbatches=4, num_virtual=num_virtual,
        runtime=RuntimeOptions(timeout_s=60),
    )
    optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    expected = dict(reference.named_parameters())
    losses = []
    for step in range(num_steps):
        inputs, targets = _batch(vocab, step)
        loss = pipe.step(inputs, targets)
        reference_loss = _loss_fn(forward(inputs), targets)
        reference_loss.backward()
        torch.testing.assert_close(loss, reference_loss.item(), rtol=1e-5, atol=1e-6)
        for name, param in pipe.named_parameters():
            torch.testing.assert_close(param.grad, expected[name].grad, msg=lambda m, n=name: f"{n}: {m}")
        optimizer.step()
        reference_optimizer.step()
        optimizer.zero_grad()
        reference_optimizer.zero_grad()
        for name, param in pipe.named_parameters():
            message = f"after step {step}, {name}"
            torch.testing.assert_close(param, expected[name], msg=lambda m, where=message: f"{where}: {m}")
        losses.append(loss)
    return {
        "losses": losses,
        "held_bytes": _bytes(module, real_only=True),
        "whole_bytes": _bytes(module, real_only=False),
        "state_keys": list(pipe.state_dict()),
        "expected_keys": _expected_keys(reference),
        "tied_ranks": [list(owners) for owners, _ in pipe.tied.groups],
    }


def refused() -> dict[str, str]:
    """Shared parameters the pipeline cannot tie: the ConfigError's text per case."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel

    messages = {}
    module, _ = _module("gpt2")
    layers = split(module, example_inputs=(_batch(HF_VOCAB, 0)[0],))
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    try:
        Pipeline(layers, loss_fn=_loss_fn, schedule="pipedream", parallel=ParallelOptions(optimizer=sgd))
    except ConfigError as error:
        messages["asynchronous"] = str(error)
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("pp", "tp"))
    head_split = lambda index, layer: {"": ColwiseParallel()} if index == 4 else None  # noqa: E731
    try:
        Pipeline(
            _plain(), loss_fn=_loss_fn, num_microbatches=2,
            parallel=ParallelOptions(process_group=mesh, tensor_parallel=head_split),
        )
    except ConfigError as error:
        messages["tensor parallel"] = str(error)
    return messages



def tensor_parallel_exact(
    *, model: str, schedule: str, num_virtual: int | None = None, num_steps: int = 2
) -> dict[str, Any]:
    """A Hugging Face Llama (4 heads, 2 key/value heads) or GPT-2 (2 heads, tied head) of 4
    blocks cut by `pipefold.split`, at pp=2 x tp=2 with `hf_tensor_parallel_plan`, against the
    unsplit module on one process: the loss of each step and every gradient (gathered whole),
    accumulated over the steps, then every weight after an Adam step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    module = llama_model(4, num_heads=4, num_kv_heads=2) if model == "llama" else gpt2_model(4)
    reference = copy.deepcopy(module)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pipe = Pipeline(
        split(module, example_inputs=(_batch(HF_VOCAB, 0)[0],)), loss_fn=_loss_fn, schedule=schedule,
        num_microbatches=4, num_virtual=num_virtual,
        parallel=ParallelOptions(process_group=mesh, tensor_parallel=hf_tensor_parallel_plan()),
        runtime=RuntimeOptions(timeout_s=60),
    )
    losses = []
    for step in range(num_steps):
        inputs, targets = _batch(HF_VOCAB, step)
        loss = pipe.step(inputs, targets)
        expected = _loss_fn(reference(inputs, use_cache=False).logits, targets)
        expected.backward()
        torch.testing.assert_close(loss, expected.item(), rtol=1e-5, atol=1e-6)
        losses.append(loss)
    reference_params = dict(reference.named_parameters())
    sharded, query_shards = [], []
    for name, param in pipe.named_parameters():
        grad = param.grad
        assert grad is not None, f"{name} has no gradient"
        if isinstance(param, DTensor):
            sharded.append(name)
            assert isinstance(grad, DTensor)
            halved = grad.to_local().numel() * 2 == reference_params[name].numel()
            assert halved or all(placement.is_replicate() for placement in param.placements), name
            grad = grad.full_tensor()
        torch.testing.assert_close(grad, reference_params[name].grad, msg=lambda m, n=name: f"{n}: {m}")
    # An Adam step on the shards lands where the unsplit module's step does.
    optimizer = torch.optim.Adam(pipe.parameters(), lr=0.01)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    optimizer.step()
    reference_optimizer.step()
    for name, param in pipe.named_parameters():
        weight = param.full_tensor() if isinstance(param, DTensor) else param
        where = f"after Adam, {name}"
        torch.testing.assert_close(weight, reference_params[name], msg=lambda m, w=where: f"{w}: {m}")
    for layer in pipe.local_modules.values():
        for path, sub in layer.named_modules():
            if path.endswith(("self_attn.q_proj", "attn.c_attn")):
                query_shards.append(tuple(sub.weight.to_local().shape))
    return {"losses": losses, "sharded": sharded, "query_shards": query_shards}
