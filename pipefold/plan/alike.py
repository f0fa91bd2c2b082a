"""Layers of one kind priced alike: `pool_alike` gives every layer of a group of identical layers
(the blocks of a decoder) the group's mean times.

    costs = pool_alike(costs)          # before at_run_prices, and for a profile's own prices
    alike_groups(costs)                # ((2, 3, 4, 5),) for the built-in GPT of four blocks

A one-process profile times each block apart, and identical blocks come out tens of percent
apart (which block runs after the embedding, caches, the host's other work): noise, not a
property of the block, since the runtime measures a stage of one block alike wherever it sits.
The planner prices a stage by summing its layers, and the calibration (`at_run_prices`) shares a
measured stage's time out over its layers by the profile's times, so that noise moves between
stages that cut a calibrated stage, and can rank one placement of the stages ahead of another
that runs faster (docs/plan.md, "Layers of one kind"). Pooling keeps the model's total time and
each group's total; it leaves a layer that has no identical peer as measured. `pipefold plan
--profile` pools the profile before its calibration run prices it.

Identical: the same weight, saved-activation, output and cast bytes and the same parallel
splits (every field of `LayerCost` but its times), and not tied to other layers. The profile
measures those sizes exactly, so two layers that match in all of them are the same layer type.
"""

from __future__ import annotations

from dataclasses import fields, replace
from statistics import fmean
from typing import Any

from pipefold.plan.costs import LayerCost, ModelCosts

__all__ = ["alike_groups", "pool_alike"]

_TIMES = frozenset({"forward_s", "backward_s", "weight_grad_s", "fixed_s"})


def _signature(layer: LayerCost) -> tuple[Any, ...]:
    """Everything of a layer but its times (and whether its W part was measured)."""
    return (*(getattr(layer, field.name) for field in fields(LayerCost) if field.name not in _TIMES),
            layer.weight_grad_s is None)


def alike_groups(costs: ModelCosts) -> tuple[tuple[int, ...], ...]:
    """The groups of two or more identical layers (see the module's docstring), each in layer
    order, ordered by their first layer."""
    tied = {index for group in costs.tied_layers for index in group}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, layer in enumerate(costs.layers):
        if index not in tied:
            groups.setdefault(_signature(layer), []).append(index)
    return tuple(tuple(group) for group in groups.values() if len(group) > 1)


def pool_alike(costs: ModelCosts) -> ModelCosts:
    """`costs` with each layer of an `alike_groups` group at the group's mean forward, backward,
    weight-gradient and fixed seconds."""
    layers = list(costs.layers)
    for group in alike_groups(costs):
        members = [costs.layers[index] for index in group]
        forward = fmean(layer.forward_s for layer in members)
        backward = fmean(layer.backward_s for layer in members)
        weight = None if members[0].weight_grad_s is None else min(
            backward, fmean(layer.weight_s for layer in members))
        fixed = fmean(layer.fixed_s for layer in members)
        for index in group:
            layers[index] = replace(layers[index], forward_s=forward, backward_s=backward,
                                    weight_grad_s=weight, fixed_s=fixed)
    return replace(costs, layers=tuple(layers))
