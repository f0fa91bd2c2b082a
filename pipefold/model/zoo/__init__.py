"""Ready-made models described as layer lists, for the main job, the examples and the benchmarks."""

from pipefold.model.zoo.gpt import GPT, generate, gpt_layers, gpt_loss, vocab_parallel_cross_entropy
from pipefold.model.zoo.mlp import ResidualMLP, mlp_layers

__all__ = [
    "GPT", "ResidualMLP", "generate", "gpt_layers", "gpt_loss", "mlp_layers", "vocab_parallel_cross_entropy",
]
