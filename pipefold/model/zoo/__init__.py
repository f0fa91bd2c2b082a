"""Ready-made models described as layer lists, for the main job, the examples and the benchmarks."""

from pipefold.model.zoo.gpt import GPT, generate, gpt_layers, gpt_loss, gpt_tensor_parallel_plan
from pipefold.model.zoo.mlp import ResidualMLP, mlp_layers

__all__ = [
    "GPT",
    "ResidualMLP",
    "generate",
    "gpt_layers",
    "gpt_loss",
    "gpt_tensor_parallel_plan",
    "mlp_layers",
]
