"""Describing and splitting models: lazy layer specs, meta-device builds, partitions, and
`split(module)`, which cuts your own `nn.Module` into pipeline layers at its repeated blocks.

>>> from torch import nn
>>> from pipefold.model import LayerSpec, partition
>>> layers = [LayerSpec(nn.Linear, 8, 8) for _ in range(6)]
>>> str(partition(layers, 3))
'[0:2 | 2:4 | 4:6]'
"""

from pipefold.model.build import (
    ReferenceModel,
    TensorMeta,
    apply_layer,
    as_layers,
    build_reference,
    materialize,
    meta_layers,
    named_parameters,
    owner_indices,
    tied_groups,
    trace_boundaries,
)
from pipefold.model.partition import METHODS, Partition, balance, partition, stage_times
from pipefold.model.spec import ForwardFn, LayerLike, LayerSpec, TiedLayerSpec, layer_name
from pipefold.model.split import split

__all__ = [
    "ForwardFn",
    "LayerLike",
    "METHODS",
    "Partition",
    "LayerSpec",
    "ReferenceModel",
    "TensorMeta",
    "TiedLayerSpec",
    "apply_layer",
    "as_layers",
    "balance",
    "build_reference",
    "layer_name",
    "materialize",
    "meta_layers",
    "named_parameters",
    "owner_indices",
    "partition",
    "split",
    "stage_times",
    "tied_groups",
    "trace_boundaries",
]
