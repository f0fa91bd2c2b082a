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

With `precision` ("bf16", "fp16", "bf16-pure"; default "fp32") each layer runs as a stage of
`Pipeline(..., runtime=RuntimeOptions(precision=...))` runs it: its forward under autocast in
the 16-bit dtype (the backward outside it), with autocast's weight casts held for the whole
measurement as the runtime holds them for a step (`runtime.stage.held_casts`); "bf16-pure"
holds the weights in bf16 too. Times and saved bytes are then the precision's own; the 16-bit
weight copies autocast saves (the same tensors for every micro-batch) are `cast_bytes`, apart
from the per-micro-batch `activation_bytes` (all the copies its cache holds, biases' too, are
`held_cast_bytes`: what a step holds), and `output` is the boundary as a stage sends it
(fp32 floats in the 16-bit dtype; the last layer's output in fp32, for the loss).
"""

from __future__ import annotations

import contextlib
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
from pipefold.runtime.allocations import AllocationRecorder
from pipefold.runtime.backward import backward_input, backward_weight
from pipefold.runtime.held_copies import casts_kept, held_copy_bytes
from pipefold.runtime.options import COMPUTE_DTYPES, PRECISIONS, PURE_PRECISIONS
from pipefold.runtime.stage import cast_floating

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
    cast_bytes: int = 0
    """Under autocast: bytes the layer saves for its backward that are the same tensors for every
    micro-batch (held once per step, not per micro-batch in flight): autocast's 16-bit weight
    copies, and a buffer saved as it is; 0 in fp32 (where a saved buffer counts as an activation)."""
    held_cast_bytes: int = 0
    """Under autocast: bytes of the 16-bit copies of the layer's weights autocast's cache holds once
    a forward has run (`pipefold.runtime.held_copies.held_copy_bytes`): `cast_bytes`' weight copies
    and those no backward saves (a linear layer's bias), what a step holds for the layer; 0 in fp32."""
    cast_s: float = 0.0
    """Under autocast: seconds a step's first forward spends casting the layer's weights to 16 bits
    (once a step: later forwards take the held copies); the fastest forward with an empty cast
    cache less the fastest with the casts held, 0 where that is not above 0 or in fp32."""
    backward_temporary_bytes: int = 0
    """The most bytes the layer's backward holds at once beyond what its forward saved: the gradient
    it is handed (made by the layer above), the input gradient it hands on, a new weight gradient
    before it is added into the held one, and its own temporaries (the gradient of an MLP's
    hidden activation); what autograd frees of the saved tensors as it goes comes off. Measured
    from the allocator (`_backward_peak_bytes`); no saved-tensor hook sees these."""
    loss_backward_bytes: int = 0
    """With `loss_fn`, the last layer's: the most bytes the loss's backward holds at once (a
    cross-entropy's gradients of the log-probabilities and of the logits, each as large as the
    logits), measured as `backward_temporary_bytes`."""

    stage_output_bytes: int | None = None
    """Under autocast: bytes of the layer's output as it leaves the layer (`output` is cast to the
    boundary's dtype), on the profile's chain from the model's input: what the next layer of a
    stage keeps under its own checkpoint (a GPT's fp32 residual stream). None in fp32."""
    stage_output_bytes_from_boundary: int | None = None
    """Under autocast: the same from the layer's input cast to the 16-bit dtype, as a stage's
    first layer receives it (a residual block then returns 16 bits, an embedding fp32).
    None in fp32."""
    activation_bytes_from_boundary: int | None = None
    """Under autocast: `activation_bytes` from that 16-bit input (on CPU a layer norm saves a
    16-bit input as it is, where it saves fp32 from the fp32 chain). None in fp32."""

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


def _apply(dtype: torch.dtype | None, layer: LayerLike, module: nn.Module, value: Any) -> Any:
    """The layer's forward as a stage runs it: under autocast in `dtype` (None: as it is)."""
    if dtype is None:
        return apply_layer(layer, module, value)
    device_type = next((t.device.type for t in _tensors(value)), "cpu")
    with torch.autocast(device_type, dtype=dtype):
        return apply_layer(layer, module, value)


def _held_casts(dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    # As `runtime.stage.held_casts` around a step: autocast's weight casts outlive one forward.
    return contextlib.nullcontext() if dtype is None else casts_kept()


def _storages(tensors: Sequence[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _tensors(value: Any) -> tuple[Tensor, ...]:
    return (value,) if isinstance(value, Tensor) else tuple(value)


def _detached_input(value: Any) -> Any:
    # Float inputs require grad so each layer's backward includes its input gradient, as in a pipeline.
    fresh = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in _tensors(value))
    return fresh[0] if isinstance(value, Tensor) else fresh


def _forward_saving(
    forward: Callable[..., Any], layer: LayerLike, module: nn.Module, value: Any, parameter_ptrs: set[int],
    loss: Callable[[Any], Any] | None = None,
) -> tuple[Any, dict[int, int], dict[int, int]]:
    """Run one forward; the storages autograd saves for backward (pointer -> bytes), each once: the
    layer's, and with `loss` what the loss saves beyond them (the last stage holds both per micro-batch)."""
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameter_ptrs:
            saved[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward(layer, module, _detached_input(value))
        own = dict(saved)
        if loss is not None:
            loss(output)
    return output, own, {pointer: size for pointer, size in saved.items() if pointer not in own}


def _saved_bytes(
    forward: Callable[..., Any], dtype: torch.dtype | None, layer: LayerLike, module: nn.Module, value: Any,
    parameter_ptrs: set[int], loss: Callable[[Any], Any] | None, kept: set[int],
) -> tuple[Any, int, int, int]:
    """(output, activation bytes, loss bytes, cast bytes) of one forward. Under autocast a second
    forward tells the weight casts apart: what both forwards save, other than the storages in `kept`
    (the input and the targets, the same tensors in both), are autocast's held weight copies."""
    output, own, beyond = _forward_saving(forward, layer, module, value, parameter_ptrs, loss)
    if dtype is None:
        return output, sum(own.values()), sum(beyond.values()), 0
    # The first output stays alive, so none of its storages is reused by the second forward.
    second, again, beyond = _forward_saving(forward, layer, module, value, parameter_ptrs, loss)
    casts = {pointer: size for pointer, size in again.items() if pointer in own and pointer not in kept}
    del output
    return second, sum(again.values()) - sum(casts.values()), sum(beyond.values()), sum(casts.values())


def _apply_loss(
    loss_fn: Callable[[Any, Any], Tensor], target: Tensor, dtype: torch.dtype | None, output: Any
) -> Tensor:
    # Outside autocast, on fp32 outputs: as the last stage's loss runs (runtime.stage.Stage).
    return loss_fn(output if dtype is None else cast_floating(output, dtype, torch.float32), target)


def _backward(output: Any) -> None:
    outputs = [t for t in _tensors(output) if t.requires_grad]
    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])


def _split_backward(
    where: torch.device, forward: Callable[..., Any], layer: LayerLike, module: nn.Module, value: Any,
    parameters: Sequence[Tensor],
) -> tuple[float, float]:
    """One forward (untimed), then the timed I and W of it, as the runtime's executor runs them."""
    inputs = _tensors(_detached_input(value))
    output = forward(layer, module, inputs[0] if isinstance(value, Tensor) else inputs)
    outputs = [t for t in _tensors(output) if t.requires_grad]
    grads = [torch.ones_like(t) for t in outputs]
    input_s, (_, state) = _timed(where, backward_input, outputs, grads, inputs, parameters)
    weight_s, _ = _timed(where, backward_weight, state)
    return input_s, weight_s


def _backward_peak_bytes(where: torch.device, prepare: Callable[[], Any], run: Callable[[Any], None]) -> int:
    """The most bytes allocated while `run(prepare())` runs, beyond those allocated when it starts.
    On CUDA from the caching allocator's counters; on CPU, which keeps none, from the allocations
    and frees torch's profiler records (as `pipefold.job.allocator_peaks`), around `prepare` too:
    a free of a block allocated before the profiler started would not be seen, and a backward
    frees the tensors its forward saved."""
    if where.type == "cuda":
        state = prepare()
        torch.cuda.synchronize(where)
        start = torch.cuda.memory_allocated(where)
        torch.cuda.reset_peak_memory_stats(where)
        run(state)
        torch.cuda.synchronize(where)
        return max(torch.cuda.max_memory_allocated(where) - start, 0)
    recorder = AllocationRecorder("pipefold::backward_peak")
    recorder.start()
    try:
        state = prepare()
        recorder.mark()
        run(state)
        del state
    finally:
        deltas, marks = recorder.stop()
    if not marks:
        return 0
    live = start = peak = 0
    for time_ns, nbytes in deltas:
        live += nbytes
        if time_ns < marks[0]:
            start = peak = live
        else:
            peak = max(peak, live)
    return max(peak - start, 0)


def _layer_backward_bytes(where: torch.device, forward: Callable[..., Any], layer: LayerLike,
                          module: nn.Module, value: Any) -> int:
    """`LayerProfile.backward_temporary_bytes`: one forward, then its backward from a gradient of
    ones, as the layer above would hand it (allocated inside, so it counts). Called with the
    parameters' gradients held, as every backward but a step's first meets them."""

    def prepare() -> list[Tensor]:
        output = forward(layer, module, _detached_input(value))
        return [t for t in _tensors(output) if t.requires_grad]

    def run(outputs: list[Tensor]) -> None:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])

    return _backward_peak_bytes(where, prepare, run)


def _loss_backward_bytes(where: torch.device, loss: Callable[[Any], Any], output: Any) -> int:
    """`LayerProfile.loss_backward_bytes`: the loss's backward alone, on the layer's output."""

    def prepare() -> Tensor:
        scalar: Tensor = loss(_detached_input(output))
        return scalar

    return _backward_peak_bytes(where, prepare, lambda scalar: scalar.backward())


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
    precision: str = "fp32",
) -> list[LayerProfile]:
    """Measure every layer on `device` for an input like `sample`; element i is layer i.

    With `loss_fn` and `target` (a micro-batch of targets), the last layer's `loss_bytes` is
    what `loss_fn(output, target)` saves for its backward beyond the layer's own (a cross-entropy
    keeps its log-probabilities: as large as the logits), which the pipeline's last stage holds
    per micro-batch in flight. Times stay the layers' own.

    Each layer is warmed up once, then timed `num_repeats` times (the median is
    kept). With `split_backward`, the I and W halves of each backward are timed too
    (`LayerProfile.input_grad_s`, `weight_grad_s`; 0.0 for a layer with no backward).
    `precision` is `RuntimeOptions.precision`'s: the layers run as the runtime's stages run
    them in it (module docstring). The caller's RNG state and modules are left untouched.
    """
    if not isinstance(num_repeats, int) or isinstance(num_repeats, bool) or num_repeats < 1:
        raise ConfigError(f"num_repeats = {num_repeats!r}; it must be an integer >= 1")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision = {precision!r}; use one of {', '.join(PRECISIONS)} "
                          "(as RuntimeOptions.precision and pipefold train --precision)")
    description = as_layers(layers)
    if (loss_fn is None) != (target is None):
        raise ConfigError(
            "profile: loss_fn and target go together (the loss's saved tensors are measured on a "
            f"micro-batch of targets); got loss_fn={loss_fn!r}, "
            f"target={'given' if target is not None else None}"
        )
    TensorMeta.of(sample, what="sample", fix="pass a batch tensor, or a tuple of them, as the sample")
    where = torch.device(device)
    dtype = COMPUTE_DTYPES[precision]
    forward = functools.partial(_apply, dtype)
    with torch.random.fork_rng(devices=[where.index or 0] if where.type == "cuda" else []):
        model = build_reference(description, where, seed=seed)
        if precision in PURE_PRECISIONS:
            model.to(torch.bfloat16)  # as the runtime's stages hold them (runtime.local_stages)
        value: Any = tuple(t.to(where) for t in _tensors(sample))
        value = value[0] if isinstance(sample, Tensor) else value
        result = []
        last = len(description) - 1
        for index, (layer, module) in enumerate(zip(description, model, strict=True)):
            parameters = list(module.parameters())
            loss: Callable[[Any], Any] | None = None
            kept = _storages(_tensors(value))
            if loss_fn is not None and target is not None and index == last:
                targets = target.to(where)
                kept |= _storages([targets])
                loss = functools.partial(_apply_loss, loss_fn, targets, dtype)
            with _held_casts(dtype):
                measured, output = _measure_layer(
                    where, forward, dtype, layer, module, value, parameters, loss, kept, num_repeats,
                    split_backward, is_last=index == last,
                )
            result.append(measured)
            value = tuple(t.detach() for t in _tensors(output))
            value = value[0] if isinstance(output, Tensor) else value
    return result


def _measure_layer(
    where: torch.device, forward: Callable[..., Any], dtype: torch.dtype | None, layer: LayerLike,
    module: nn.Module, value: Any, parameters: Sequence[Tensor], loss: Callable[[Any], Any] | None,
    kept: set[int], num_repeats: int, split_backward: bool, *, is_last: bool,
) -> tuple[LayerProfile, Any]:
    """One layer's profile, and its output (the next layer's input, as it leaves the layer)."""
    output, activation_bytes, loss_bytes, cast_bytes = _saved_bytes(
        forward, dtype, layer, module, value, _storages(parameters), loss, kept
    )
    # Still inside the profile's held casts: the copies the two forwards left in autocast's cache.
    held_cast_bytes = 0 if dtype is None else held_copy_bytes(parameters, where.type, dtype)
    needs_backward = any(t.requires_grad for t in _tensors(output))
    split = split_backward and needs_backward
    if needs_backward:
        _backward(output)  # warm-up: first calls allocate and pick kernels
    if split:
        _split_backward(where, forward, layer, module, value, parameters)  # warm-up of the split path
    forward_times, backward_times = [], []
    input_times, weight_times = [], []
    for _ in range(num_repeats):
        seconds, output = _timed(where, forward, layer, module, _detached_input(value))
        forward_times.append(seconds)
        if needs_backward:
            seconds, _ = _timed(where, _backward, output)
            backward_times.append(seconds)
        if split:
            input_s, weight_s = _split_backward(where, forward, layer, module, value, parameters)
            input_times.append(input_s)
            weight_times.append(weight_s)
    cast_s = _cast_seconds(where, forward, layer, module, value, num_repeats) if held_cast_bytes else 0.0
    # After the timed backwards: the parameters hold their gradients.
    backward_bytes = _layer_backward_bytes(where, forward, layer, module, value) if needs_backward else 0
    loss_backward_bytes = 0
    if loss is not None and any(t.is_floating_point() for t in _tensors(output)):
        loss_backward_bytes = _loss_backward_bytes(where, loss, output)
    for parameter in parameters:
        parameter.grad = None
    # What crosses the boundary after the layer: a stage sends fp32 floats in the compute dtype,
    # and the last stage hands the loss its 16-bit outputs in fp32 (runtime.stage.Stage).
    boundary = output
    inside: dict[str, int] = {}
    if dtype is not None:
        inside = _from_boundary(forward, dtype, layer, module, value, parameters, output)
        boundary = cast_floating(output, dtype, torch.float32) if is_last else cast_floating(
            output, torch.float32, dtype)
    measured = LayerProfile(
        forward_s=statistics.median(forward_times),
        backward_s=statistics.median(backward_times) if backward_times else 0.0,
        activation_bytes=activation_bytes,
        parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
        output=TensorMeta.of(boundary, what="the output of a profiled layer"),
        input_grad_s=_median_or_zero(input_times) if split_backward else None,
        weight_grad_s=_median_or_zero(weight_times) if split_backward else None,
        loss_bytes=loss_bytes,
        cast_bytes=cast_bytes,
        held_cast_bytes=held_cast_bytes,
        cast_s=cast_s,
        backward_temporary_bytes=backward_bytes,
        loss_backward_bytes=loss_backward_bytes,
        **inside,
    )
    return measured, output


def _from_boundary(forward: Callable[..., Any], dtype: torch.dtype, layer: LayerLike, module: nn.Module,
                   value: Any, parameters: Sequence[Tensor], output: Any) -> dict[str, int]:
    """`LayerProfile.stage_output_bytes`, `stage_output_bytes_from_boundary` and
    `activation_bytes_from_boundary`: the output as it leaves the layer, and the output and saved
    bytes from the layer's input cast to the 16-bit dtype, as a stage's first layer receives it
    (`_saved_bytes` tells autocast's held weight copies apart, as for the chain's input)."""
    received = cast_floating(value, torch.float32, dtype)
    from_received, activations, _, _ = _saved_bytes(
        forward, dtype, layer, module, received, _storages(parameters), None, _storages(_tensors(received)))
    what = "a profiled layer's output"
    return {"stage_output_bytes": TensorMeta.of(output, what=what).num_bytes,
            "stage_output_bytes_from_boundary": TensorMeta.of(from_received, what=what).num_bytes,
            "activation_bytes_from_boundary": activations}


def _cast_seconds(
    where: torch.device, forward: Callable[..., Any], layer: LayerLike, module: nn.Module, value: Any,
    num_repeats: int,
) -> float:
    """A step's first forward less a later one: autocast's weight casts, made once a step. Called
    under `_held_casts`: emptying the cache makes the next forward cast again, as a step's first."""
    fresh, held = [], []
    with torch.no_grad():  # the casts are the same with or without a graph; nothing is saved
        for _ in range(num_repeats + 1):  # alternated, so a change of load meets both alike
            torch.clear_autocast_cache()
            fresh.append(_timed(where, forward, layer, module, value)[0])
            held.append(_timed(where, forward, layer, module, value)[0])
    # The fastest of each (the first pair warms up): the host's other work only ever adds time.
    return max(min(fresh[1:]) - min(held[1:]), 0.0)
