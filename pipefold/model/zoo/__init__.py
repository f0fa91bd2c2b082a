"""Ready-made models described as layer lists, for the main job and the examples."""

from pipefold.model.zoo.gpt import GPT, generate, gpt_layers, gpt_loss

__all__ = ["GPT", "generate", "gpt_layers", "gpt_loss"]
