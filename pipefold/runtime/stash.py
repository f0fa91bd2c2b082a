"""Weight versions for asynchronous schedules (PipeDream stashing, PipeDream-2BW).

In an asynchronous schedule a stage's optimizer steps while micro-batches are still in
flight, yet a micro-batch's backward must use the weights its forward saw. PipeDream
(`WeightUpdate.STASH`) steps after every backward, so a stage with `k` micro-batches in
flight holds up to `k` versions; PipeDream-2BW (`DOUBLE_BUFFER`) steps every few
micro-batches and holds at most two.

Design notes: docs/decisions.md, "weight stash".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from pipefold.errors import ConfigError, PipelineError
from pipefold.model.dropout import replay_scope

__all__ = ["WeightStash"]

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class _StaleWeight(torch.autograd.Function):
    """Forward: the stashed values. Backward: the gradient goes to the live parameter."""

    @staticmethod
    def forward(live: Tensor, stashed: Tensor) -> Tensor:
        # A view, not `stashed` itself: autograd gives a custom function's output its own
        # graph identity only when it is not one of the inputs.
        return stashed.view_as(stashed)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _stale_weight(live: Tensor, stashed: Tensor) -> Tensor:
    output: Tensor = _StaleWeight.apply(live, stashed)  # type: ignore[no-untyped-call]
    return output


@dataclass(eq=False)
class _Version:
    index: int
    values: dict[str, Tensor]
    """Parameter name -> the weight's values for this version."""


class WeightStash:
    """Runs one stage's forwards on the weight version each micro-batch must keep.

    Usage, for every micro-batch `mb` of the stage, in schedule order::

        output = stash.forward(mb, *inputs)
        backward_full(outputs, grads, inputs)  # or backward_input(..., stash.params_for(mb)) ... W
        stash.after_backward(mb)               # after B, or after W when the backward is split
        stash.step()                           # at each STEP action

    Parameters with `requires_grad=False` are not versioned: they never change here.
    """

    def __init__(self, module: nn.Module, optimizer_factory: OptimizerFactory) -> None:
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(
                f"WeightStash got a {type(module).__name__} with no parameter that requires grad; "
                "a stage without trainable weights needs no weight stash"
            )
        self._module = module
        self._names = [name for name, _ in named]
        self._params = [p for _, p in named]
        self.optimizer = optimizer_factory(iter(self._params))
        self._current = self._snapshot(index=0)
        self._version_of: dict[int, _Version] = {}
        self._peak = 0
        # Streaming with a version lag (PipeDream-2BW): see `stream`.
        self._lag = 0
        self._per_step = 1
        self._base = 0
        self._kept: dict[int, _Version] = {}

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The live (optimizer's) parameters that are versioned."""
        return list(self._params)

    @property
    def version(self) -> int:
        """Index of the current version: how many times `step` ran."""
        return self._current.index

    @property
    def num_versions_held(self) -> int:
        """Distinct weight versions that in-flight micro-batches use now."""
        return len({id(version) for version in self._version_of.values()})

    @property
    def peak_versions_held(self) -> int:
        """The largest `num_versions_held` seen so far."""
        return self._peak

    def forward(self, microbatch: int, *args: Any, recompute: bool = False, **kwargs: Any) -> Any:
        """Run the module on the current weight version and remember it for `microbatch`.

        `recompute`: keep only the inputs and the version's weights and run the forward again
        in the backward (non-reentrant checkpointing), on those same weights."""
        if microbatch in self._version_of:
            raise PipelineError(
                f"micro-batch {microbatch} already ran its forward on weight version "
                f"{self._version_of[microbatch].index} and its backward is not done; "
                "call after_backward(microbatch) before running it again"
            )
        version = self._current if not self._lag else self._lagged(microbatch)
        weights = [
            _stale_weight(live, version.values[name])
            for name, live in zip(self._names, self._params, strict=True)
        ]
        if recompute:
            # The weights are arguments of the checkpointed function, so the recomputation
            # runs on this version's values, not on whatever the live weights are by then.
            num_args = len(args)

            def run(*values: Any) -> Any:
                named = dict(zip(self._names, values[num_args:], strict=True))
                return torch.func.functional_call(self._module, named, values[:num_args], kwargs)

            # The recomputation draws the forward's dropout masks (pipefold.model.dropout).
            output = torch.utils.checkpoint.checkpoint(
                run, *args, *weights, use_reentrant=False, context_fn=replay_scope
            )
        else:
            named = dict(zip(self._names, weights, strict=True))
            output = torch.func.functional_call(self._module, named, args, kwargs)
        self._version_of[microbatch] = version
        self._peak = max(self._peak, self.num_versions_held)
        return output

    def version_of(self, microbatch: int) -> int:
        """Index of the weight version that `microbatch`'s forward used."""
        return self._in_flight(microbatch).index

    def params_for(self, microbatch: int) -> list[nn.Parameter]:
        """The tensors the backward functions should treat as the weights of `microbatch`.

        These are the live parameters for every micro-batch: the graph of each forward
        already routes through that micro-batch's version (see docs/decisions.md, "weight stash").
        """
        self._in_flight(microbatch)
        return list(self._params)

    def after_backward(self, microbatch: int) -> None:
        """Mark `microbatch`'s backward done (B, or W of a split backward)."""
        self._in_flight(microbatch)
        del self._version_of[microbatch]

    def stream(self, num_microbatches: int, version_lag: int) -> None:
        """Run the following micro-batches as a streaming run (`pipefold.schedule.stream`):
        micro-batch i belongs to step i // num_microbatches, counted from now, and with
        `version_lag` n > 0 its forward uses the weights after (step - n) of the run's updates
        (at least the weights the run started from). `version_lag` 0 is the default rule
        (the newest weights). Call with (1, 0) after the run to restore it."""
        if self._version_of:
            raise PipelineError(
                f"micro-batches {sorted(self._version_of)} are still in flight on this stage; "
                "a streaming run starts and ends with the pipeline drained"
            )
        self._lag = version_lag
        self._per_step = num_microbatches
        self._base = self._current.index
        self._kept = {}

    def step(self) -> None:
        """The STEP action: apply the summed gradients, clear them, start a new version."""
        current = self._current
        if self._lag or any(version is current for version in self._version_of.values()):
            # In-flight graphs saved views of the live storage through the current
            # version (and with a version lag, later forwards still need it); give the
            # live weights a new buffer so the update cannot reach them. Once every
            # micro-batch that ran on it has finished its backward, its graphs are freed
            # and the update may happen in place.
            with torch.no_grad():
                for param in self._params:
                    param.data = param.data.clone()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._lag:
            self._kept[self._current.index] = self._current
            oldest = self._current.index + 1 - self._lag
            # Older versions are no forward's any more; in-flight micro-batches hold their own.
            self._kept = {i: v for i, v in self._kept.items() if i >= oldest}
        self._current = self._snapshot(index=self._current.index + 1)
        logger.debug("weight version %d; %d held", self._current.index, self.num_versions_held)

    def _lagged(self, microbatch: int) -> _Version:
        wanted = self._base + max(microbatch // self._per_step - self._lag, 0)
        if wanted == self._current.index:
            return self._current
        version = self._kept.get(wanted)
        if version is None:
            raise PipelineError(
                f"micro-batch {microbatch} (step {microbatch // self._per_step} of the run) needs weight "
                f"version {wanted}, but the stage is at version {self._current.index} and keeps "
                f"{sorted(self._kept)}: its schedule stepped too few or too many times before this forward"
            )
        return version

    def _snapshot(self, index: int) -> _Version:
        # `.data` shares the storage but not the version counter, so the optimizer's later
        # in-place update of a (moved) live weight does not invalidate saved activations.
        return _Version(index, {name: p.data for name, p in zip(self._names, self._params, strict=True)})

    def _in_flight(self, microbatch: int) -> _Version:
        version = self._version_of.get(microbatch)
        if version is None:
            in_flight = sorted(self._version_of)
            raise PipelineError(
                f"micro-batch {microbatch} has no forward in flight on this stage "
                f"(in flight: {in_flight}); run forward(microbatch, ...) first and after_backward once"
            )
        return version
