"""A stage: a contiguous chunk of layers on this rank, and how its forward runs.

Values between layers follow the calling convention of pipefold.model.build:
each layer receives exactly what the previous one returned (a tensor or a tuple).

Recomputation (`recompute`):
- "none": autograd keeps every activation of the stage until its backward.
- "full": the stage forward runs under non-reentrant `torch.utils.checkpoint`, so only
  the stage input is kept and the forward is recomputed during the backward.
- a set of layer indices (selective): only those layers are checkpointed (under a weight
  stash with the stashed version's weights as arguments, so the recomputation uses them).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.utils.checkpoint
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.model import LayerLike, TiedLayerSpec
from pipefold.model.dropout import MicrobatchScope, replay_scope
from pipefold.runtime.held_copies import casts_kept, holding, measure_held_copies
from pipefold.runtime.parallel.tensor_parallel import is_sharded
from pipefold.runtime.stash import WeightStash

__all__ = ["Stage", "as_leaves", "cast_floating", "flatten", "held_casts"]


class _Chain(nn.Module):
    """The stage's layers as one module, so a weight stash can swap all its weights at once."""

    def __init__(self, stage: Stage, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(modules)
        self._stage = [stage]  # a list, so nn.Module does not register the stage as a child

    def forward(self, value: Any) -> Any:
        return self._stage[0]._run(value)


class Stage:
    """Stage `index` (virtual, model order) owning the layers `layer_indices`."""

    def __init__(
        self,
        index: int,
        layer_indices: range,
        layers: Sequence[LayerLike],
        modules: Sequence[nn.Module],
        *,
        is_first: bool,
        is_last: bool,
        recompute_all: bool,
        recompute_layers: frozenset[int],
        compile_layers: bool = False,
    ) -> None:
        self.index = index
        self.layer_indices = layer_indices
        self.is_first = is_first
        self.is_last = is_last
        self._calls = tuple(
            _layer_call(layer, module, compile_layers) for layer, module in zip(layers, modules, strict=True)
        )
        self._recompute_all = recompute_all
        self._checkpointed = tuple(i in recompute_layers for i in layer_indices)
        self._any_checkpointed = any(self._checkpointed)
        self.recomputes = recompute_all or self._any_checkpointed
        """Whether some of this stage's forward is recomputed in its backward."""
        seen: set[int] = set()
        params: list[nn.Parameter] = []
        for module in modules:  # a tied module held twice by one stage counts once
            for param in module.parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    params.append(param)
        self.parameters: tuple[nn.Parameter, ...] = tuple(params)
        """The stage's parameters as its layers hold them now (full sharding swaps in the
        gathered ones for a step: runtime/parallel/full_shard.py refreshes this)."""
        self.modules = tuple(modules)
        self.module: nn.Module = _Chain(self, modules)
        self.stash: WeightStash | None = None
        """Set for asynchronous schedules: forwards then run on the stashed weight version."""
        self.check_plain_output = False
        """Set under tensor parallelism: a forward whose output is a DTensor (a layer plan that
        does not end replicated) raises instead of sending a shard to the next stage."""
        self.compute_dtype: torch.dtype | None = None
        """Set for mixed precision: the forward runs under autocast in this dtype on
        `device_type`; fp32 outputs of a stage other than the last leave in this dtype (the
        boundary), the last stage's outputs in this dtype leave in fp32 (for the loss)."""
        self.device_type = "cpu"
        self.held_cast_bytes: int | None = None
        """Bytes of autocast's weight copies the step holds for this stage, measured at the end of
        the first step that holds them (`runtime.held_copies`); None until then."""

    def set_recompute(self, recompute_all: bool) -> None:
        """Recompute the whole stage in its backward from the next step on, or stop (selective
        layers stay as built); between steps only, and not with a weight stash."""
        if self.stash is not None:
            raise ConfigError(
                f"stage {self.index} steps a weight stash; its recomputation is fixed when the "
                "pipeline is built"
            )
        self._recompute_all = recompute_all
        self.recomputes = recompute_all or any(self._checkpointed)

    def _run(self, value: Any) -> Any:
        for call, module, checkpointed in zip(self._calls, self.modules, self._checkpointed, strict=True):
            if not checkpointed:
                value = call(value)
            elif self.stash is not None:
                value = _checkpoint_on_version(call, module, value)
            else:
                value = torch.utils.checkpoint.checkpoint(
                    call, value, use_reentrant=False, context_fn=replay_scope
                )
        return value

    def forward(self, value: Any, microbatch: int) -> Any:
        dtype = self.compute_dtype
        # Seeded dropout draws this micro-batch's masks (pipefold.model.dropout): the scope is
        # set and restored here, as is a plain stage's `_forward` and `_run` inlined (once per
        # micro-batch on the executor's path, where each Python call counts).
        scope = MicrobatchScope
        outer = scope.microbatch
        scope.microbatch = microbatch
        try:
            if dtype is None:
                if (
                    self.stash is None
                    and not self._recompute_all
                    and not self._any_checkpointed
                    and not self.check_plain_output
                ):
                    for call in self._calls:
                        value = call(value)
                    return value
                return self._forward(value, microbatch)
            with torch.autocast(self.device_type, dtype=dtype):
                output = self._forward(value, microbatch)
        finally:
            scope.microbatch = outer
        return self._cast_output(output, dtype)

    def forward_only(self, value: Any) -> Any:
        """The stage's output without recording for a backward (`Pipeline.evaluate`, under
        no_grad): the current weights, the same autocast and boundary casts as `forward`, so
        a boundary travels in the dtype its receiver expects."""
        dtype = self.compute_dtype
        if dtype is None:
            return self.module(value)
        with torch.autocast(self.device_type, dtype=dtype):
            output = self.module(value)
        return self._cast_output(output, dtype)

    def _cast_output(self, output: Any, dtype: torch.dtype) -> Any:
        if self.is_last:
            return cast_floating(output, dtype, torch.float32)
        return cast_floating(output, torch.float32, dtype)

    def _forward(self, value: Any, microbatch: int) -> Any:
        if self.stash is not None:
            # The stash calls the module with its version's weights swapped in
            # (torch.func.functional_call), which runs self._run through _Chain; full
            # recomputation checkpoints that call with the version's weights as arguments.
            return self.stash.forward(microbatch, value, recompute=self._recompute_all)
        if self._recompute_all:
            output = torch.utils.checkpoint.checkpoint(
                self._run, value, use_reentrant=False, context_fn=replay_scope
            )
        else:
            output = self._run(value)
        if self.check_plain_output and not self.is_last:
            # The last stage's output goes to the loss, not across a boundary: a vocabulary-
            # parallel head leaves its logits split (a DTensor) for the loss to reduce.
            self._check_plain(output)
        return output

    def _check_plain(self, output: Any) -> None:
        for tensor in flatten(output):
            if is_sharded(tensor):
                last = self.layer_indices[-1]
                placements = getattr(tensor, "placements", "?")
                raise ConfigError(
                    f"tensor_parallel: layer {last} (the last of stage {self.index}) returns a DTensor "
                    f"{tuple(tensor.shape)} placed {placements}, not a plain replicated tensor; end each "
                    "layer's plan replicated (a RowwiseParallel() after a ColwiseParallel(), "
                    "use_local_output=True)"
                )


def _layer_call(layer: LayerLike, module: nn.Module, compile_layer: bool) -> Callable[[Any], Any]:
    """One layer as a function of its input, run through torch.compile if `compile_layer`.

    The module is wrapped, not copied: its parameters stay the stage's, under their names.
    Compiling the module (not a function that calls it) lets layers of one class share their
    compiled code: dynamo treats a module's parameters as inputs, so a second block of the same
    shapes reuses the first one's graph instead of recompiling.
    """
    forward_fn = layer.forward_fn if isinstance(layer, TiedLayerSpec) else None
    call: Callable[[Any], Any] = module if forward_fn is None else functools.partial(forward_fn, module)
    if not compile_layer:
        return call
    compiled = torch.compile(call)

    def run_compiled(value: Any) -> Any:
        # A backward compiled with donated buffers refuses retain_graph=True, which the split
        # backward's I needs (W runs after it on the same graph); the graph is built on the
        # first call, so compiling it without them is enough. The on-disk AOTAutograd cache is
        # bypassed: its key does not hold this setting, so it could hand back a graph compiled
        # with donated buffers by another program on the host.
        with torch._functorch.config.patch(donated_buffer=False, enable_autograd_cache=False):
            return compiled(value)

    return run_compiled


def _checkpoint_on_version(call: Callable[[Any], Any], module: nn.Module, value: Any) -> Any:
    """A selectively recomputed layer under a weight stash: its weights (the stashed version,
    swapped in by the stash's functional call) are arguments of the checkpointed function, so
    the recomputation in the backward runs on that version, not on the live weights."""
    named = dict(module.named_parameters())
    bound = _Bound(module, call)

    def run(value: Any, *weights: Any) -> Any:
        swapped = {f"module.{name}": weight for name, weight in zip(named, weights, strict=True)}
        return torch.func.functional_call(bound, swapped, (value,))

    return torch.utils.checkpoint.checkpoint(
        run, value, *named.values(), use_reentrant=False, context_fn=replay_scope
    )


class _Bound(nn.Module):
    """A layer's call (its forward, or a tied layer's `forward_fn`) as a module holding the layer."""

    def __init__(self, module: nn.Module, call: Callable[[Any], Any]) -> None:
        super().__init__()
        self.module = module
        self._call = [call]  # a list, so a compiled call's module is not registered twice

    def forward(self, value: Any) -> Any:
        return self._call[0](value)


def cast_floating(value: Any, source: torch.dtype, target: torch.dtype) -> Any:
    """`value` (a tensor or tuple of them) with its `source`-dtype tensors cast to `target`
    (a differentiable cast: their gradients come back cast the other way)."""
    if isinstance(value, Tensor):
        return value.to(target) if value.dtype == source else value
    if isinstance(value, tuple):
        return tuple(t.to(target) if isinstance(t, Tensor) and t.dtype == source else t for t in value)
    return value


def flatten(value: Any) -> tuple[Tensor, ...]:
    """The tensors of a boundary value, in order (a tensor is a 1-tuple)."""
    if isinstance(value, Tensor):
        return (value,)
    return tuple(value)


def as_leaves(value: Any) -> tuple[Any, tuple[Tensor, ...]]:
    """Detach a stage input so the stage's graph starts here; differentiable entries require grad.

    Returns the value to feed the stage (same structure) and its tensors. The handoff
    from a stage on the same rank goes through here too, so each stage's graph stays
    separate and the backward of one stage never runs into the previous one.
    """
    if isinstance(value, Tensor):  # `_leaf`, inlined: once per received micro-batch
        leaf = value.detach()
        dtype = leaf.dtype  # attribute reads, not the two method calls
        if dtype.is_floating_point or dtype.is_complex:
            leaf.requires_grad_(True)
        return leaf, (leaf,)
    leaves = tuple(_leaf(tensor) for tensor in value)
    return leaves, leaves


def _leaf(tensor: Tensor) -> Tensor:
    leaf = tensor.detach()
    if leaf.is_floating_point() or leaf.is_complex():
        leaf.requires_grad_(True)
    return leaf


@contextlib.contextmanager
def held_casts(stages: Sequence[Stage], *, weights_fixed: bool) -> Iterator[None]:
    """Keep autocast's cache of 16-bit weight casts for the whole step, not one forward.

    Each stage forward enters its own autocast region, and leaving the outermost region drops
    the cache, so every micro-batch would cast every weight again. An autocast nesting level
    held around the step (without enabling autocast outside the forwards) keeps the casts of
    the first forward for the others and for recomputation. Only where the weights do not
    change inside the step and stay gathered (`weights_fixed`: a flush schedule without full
    sharding, no weight stash): the cache is keyed by the weight, not its values, and holds a
    16-bit copy of each weight until the step ends.
    """
    fixed = weights_fixed and all(stage.stash is None for stage in stages)
    if not fixed or all(stage.compute_dtype is None for stage in stages):
        yield
        return
    with casts_kept(), holding():
        yield
        measure_held_copies(stages)  # once per stage: what the cache holds for the step
