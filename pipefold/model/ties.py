"""`layer_ties(layers)`: which pipeline layers hold one weight, found as the Pipeline finds them.

    ties = layer_ties(pipefold.split(model, example_inputs=(ids,)))   # (((0, 13), 38597376),) for GPT-2
    costs = ModelCosts(..., tied_layers=tuple(g for g, _ in ties),
                       tied_parameter_bytes=tuple(4 * n for _, n in ties))

A weight is held by several layers where they are occurrences of one `TiedLayerSpec` key, or
where one parameter object sits in several layers (`pipefold.model.build.shared_parameter_uses`:
a split module's tied embedding and head, `head.weight = embed.weight`). The planner counts such
a weight once on a rank that holds several of its layers (`pipefold.plan.ModelCosts.tied_layers`);
`pipefold.plan.hf_estimate.hf_ties` gives the same groups from a config.json without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from pipefold.model.build import (
    meta_layers,
    name_prefix,
    owner_indices,
    shared_parameter_uses,
    tied_groups,
)
from pipefold.model.spec import LayerLike

__all__ = ["layer_ties"]


def layer_ties(
    layers: Sequence[LayerLike], meta: Sequence[nn.Module] | None = None
) -> tuple[tuple[tuple[int, ...], int], ...]:
    """Groups of layer indices that hold one weight, each with the number of values they share
    (summed where several parameters have the same holders), ordered by their layers. `meta` is
    `meta_layers(layers)` where the caller has it."""
    modules = meta_layers(layers) if meta is None else list(meta)
    found: dict[tuple[int, ...], int] = {}
    for indices in tied_groups(layers).values():
        if len(indices) > 1:
            found[indices] = found.get(indices, 0) + sum(p.numel() for p in modules[indices[0]].parameters())
    owners = owner_indices(layers)
    for uses in shared_parameter_uses(layers, modules).values():
        index, use = uses[0]
        name = use.removeprefix(name_prefix(owners[index], modules[index]))
        parameter = dict(modules[index].named_parameters(remove_duplicate=False))[name]
        group = tuple(holder for holder, _ in uses)
        found[group] = found.get(group, 0) + parameter.numel()
    return tuple(sorted(found.items()))
