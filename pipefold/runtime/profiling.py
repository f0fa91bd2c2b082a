"""Per-layer measurements: forward and backward time, activation and parameter bytes.

    >>> from pipefold.runtime import profile
    >>> costs = [p.total_s for p in profile(layers, sample)]   # partition(..., "profile", costs=costs)

`profile(layers, sample)` builds the whole model on one device (with the weights
`materialize` would give it), pushes `sample` through it layer by layer, and times
each layer alone: its input is detached, so a layer's backward time is its own.
The result feeds `partition(method="profile", costs=...)`, the simulator's cost model and the
planner (`pipefold.plan.ModelCosts.from_profile`).

With `split_backward=True` each layer's backward is also timed split into its input
half (I) and weight half (W), with the runtime's own `backward_input` and
`backward_weight`, so the shares are those a zero-bubble schedule will see. The split
is timed on a forward of its own, after the whole backward: B is still a plain
`autograd.backward`, and I + W exceeds it by what the split itself costs (a walk of
the layer's graph in I, one autograd call per group of parameters in W; see
docs/decisions.md, "measured split" for how the planner uses the two).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.model.build import TensorMeta, apply_layer, as_layers, build_reference
from pipefold.model.spec import LayerLike
from pipefold.runtime.backward import backward_input, backward_weight

__all__ = ["LayerProfile", "profile"]


@dataclass(frozen=True)
class LayerProfile:
    """What one layer costs for one micro-batch shaped like the profiled sample."""

    forward_s: float
    """Median forward time, seconds."""
    backward_s: float
    """Median backward time (input and weight gradients), seconds; 0.0 if nothing needs a gradient."""
    activation_bytes: int
    """Bytes autograd saves for the backward (parameters excluded): held per in-flight micro-batch."""
    parameter_bytes: int
    """Bytes of the layer's parameters (a tied module counts at each occurrence: each holder stores it)."""
    output: TensorMeta
    """What the layer returns: the boundary after it."""
    input_grad_s: float | None = None
    """Median I time (input gradients only), seconds; None unless profiled with `split_backward=True`."""
    weight_grad_s: float | None = None
    """Median W time (weight gradients, after I), seconds; None unless profiled with `split_backward=True`."""
    loss_bytes: int = 0
    """Bytes the loss saves for its backward (beyond `activation_bytes`); the last layer's, with `loss_fn`."""

    @property
    def total_s(self) -> float:
        """Forward plus backward time: the layer's cost for `partition(method="profile", costs=...)`."""
        return self.forward_s + self.backward_s


def _synchronize(device: torch.device) -> None:
    # GPU kernels are asynchronous: without a sync the clock would measure only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, work: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    _synchronize(device)
    start = time.perf_counter()
    result = work(*args)
    _synchronize(device)
    return time.perf_counter() - start, result


def _tensors(value: Any) -> tuple[Tensor, ...]:
    return (value,) if isinstance(value, Tensor) else tuple(value)


def _detached_input(value: Any) -> Any:
    # Float inputs require grad so each layer's backward includes its input gradient, as in a pipeline.
    fresh = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in _tensors(value))
    return fresh[0] if isinstance(value, Tensor) else fresh


def _forward_saving(
    layer: LayerLike, module: nn.Module, value: Any, parameter_ptrs: set[int],
    loss: Callable[[Any], Any] | None = None,
) -> tuple[Any, int, int]:
    """Run one forward; count the bytes autograd saves for backward, each storage once: the layer's,
    and with `loss` what the loss saves beyond them (the last stage holds both per micro-batch)."""
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameter_ptrs:
            saved[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = apply_layer(layer, module, _detached_input(value))
        own = sum(saved.values())
        if loss is not None:
            loss(output)
    return output, own, sum(saved.values()) - own


def _apply_loss(loss_fn: Callable[[Any, Any], Tensor], target: Tensor, output: Any) -> Tensor:
    return loss_fn(output, target)


def _backward(output: Any) -> None:
    outputs = [t for t in _tensors(output) if t.requires_grad]
    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _split_backward(
    where: torch.device, layer: LayerLike, module: nn.Module, value: Any, parameters: Sequence[Tensor]
) -> tuple[float, float]:
    """One forward (untimed), then the timed I and W of it, as the runtime's executor runs them."""
    inputs = _tensors(_detached_input(value))
    output = apply_layer(layer, module, inputs[0] if isinstance(value, Tensor) else inputs)
    outputs = [t for t in _tensors(output) if t.requires_grad]
    grads = [torch.ones_like(t) for t in outputs]
    input_s, (_, state) = _timed(where, backward_input, outputs, grads, inputs, parameters)
    weight_s, _ = _timed(where, backward_weight, state)
    return input_s, weight_s


def _median_or_zero(times: Sequence[float]) -> float:
    return statistics.median(times) if times else 0.0


def profile(
    layers: nn.Sequential | Sequence[LayerLike],
    sample: Tensor | tuple[Tensor, ...],
    *,
    device: torch.device | str = "cpu",
    num_repeats: int = 3,
    seed: int = 0,
    split_backward: bool = False,
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    target: Tensor | None = None,
) -> list[LayerProfile]:
    """Measure every layer on `device` for an input like `sample`; element i is layer i.

    With `loss_fn` and `target` (a micro-batch of targets), the last layer's `loss_bytes` is
    what `loss_fn(output, target)` saves for its backward beyond the layer's own (a cross-entropy
    keeps its log-probabilities: as large as the logits), which the pipeline's last stage holds
    per micro-batch in flight. Times stay the layers' own.

    Each layer is warmed up once, then timed `num_repeats` times (the median is
    kept). With `split_backward`, the I and W halves of each backward are timed too
    (`LayerProfile.input_grad_s`, `weight_grad_s`; 0.0 for a layer with no backward).
    The caller's RNG state and modules are left untouched.
    """
    if not isinstance(num_repeats, int) or isinstance(num_repeats, bool) or num_repeats < 1:
        raise ConfigError(f"num_repeats = {num_repeats!r}; it must be an integer >= 1")
    description = as_layers(layers)
    if (loss_fn is None) != (target is None):
        raise ConfigError(
            "profile: loss_fn and target go together (the loss's saved tensors are measured on a "
            f"micro-batch of targets); got loss_fn={loss_fn!r}, target={'given' if target is not None else None}"
        )
    TensorMeta.of(sample, what="sample", fix="pass a batch tensor, or a tuple of them, as the sample")
    where = torch.device(device)
    with torch.random.fork_rng(devices=[where.index or 0] if where.type == "cuda" else []):
        model = build_reference(description, where, seed=seed)
        value: Any = tuple(t.to(where) for t in _tensors(sample))
        value = value[0] if isinstance(sample, Tensor) else value
        result = []
        last = len(description) - 1
        for index, (layer, module) in enumerate(zip(description, model, strict=True)):
            parameters = list(module.parameters())
            parameter_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
            loss: Callable[[Any], Any] | None = None
            if loss_fn is not None and target is not None and index == last:
                loss = functools.partial(_apply_loss, loss_fn, target.to(where))
            output, activation_bytes, loss_bytes = _forward_saving(layer, module, value, parameter_ptrs, loss)
            needs_backward = any(t.requires_grad for t in _tensors(output))
            split = split_backward and needs_backward
            if needs_backward:
                _backward(output)  # warm-up: first calls allocate and pick kernels
            if split:
                _split_backward(where, layer, module, value, parameters)  # warm-up of the split path
            forward_times, backward_times = [], []
            input_times, weight_times = [], []
            for _ in range(num_repeats):
                seconds, output = _timed(where, apply_layer, layer, module, _detached_input(value))
                forward_times.append(seconds)
                if needs_backward:
                    seconds, _ = _timed(where, _backward, output)
                    backward_times.append(seconds)
                if split:
                    input_s, weight_s = _split_backward(where, layer, module, value, parameters)
                    input_times.append(input_s)
                    weight_times.append(weight_s)
            for parameter in parameters:
                parameter.grad = None
            result.append(
                LayerProfile(
                    forward_s=statistics.median(forward_times),
                    backward_s=statistics.median(backward_times) if backward_times else 0.0,
                    activation_bytes=activation_bytes,
                    parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
                    output=TensorMeta.of(output, what="the output of a profiled layer"),
                    input_grad_s=_median_or_zero(input_times) if split_backward else None,
                    weight_grad_s=_median_or_zero(weight_times) if split_backward else None,
                    loss_bytes=loss_bytes,
                )
            )
            value = tuple(t.detach() for t in _tensors(output))
            value = value[0] if isinstance(output, Tensor) else value
    return result
