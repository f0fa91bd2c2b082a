"""The four identical layers the held-memory, I-state and deferred-W pricing tests price on."""

from pipefold.plan import LayerCost, ModelCosts

MB = 2**20


def four_layer_costs(**options: object) -> ModelCosts:
    """Four layers of 1 MiB activations, F 10 ms, B 20 ms (W 10 ms) at one row; `options` go to
    `ModelCosts`."""
    layer = LayerCost(forward_s=0.01, backward_s=0.02, activation_bytes=MB, output_bytes=1000,
                      parameter_bytes=4000, weight_grad_s=0.01)
    return ModelCosts(layers=(layer,) * 4, reference_rows=1, **options)  # type: ignore[arg-type]
