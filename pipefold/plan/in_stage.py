"""What a stage keeps per micro-batch where its layers see other dtypes than the profile's chain.

A profile runs the layers one after another from the model's input; a stage's layers start
from its received boundary. Under autocast the two differ: a stage sends and receives its
boundary in the 16-bit dtype, while inside a stage the GPT's residual stream is fp32 from the
embeddings on (an fp32 tensor plus a 16-bit one is fp32), and a block handed a 16-bit stream
passes it on in 16 bits (the sum of two 16-bit tensors; on CPU a layer norm too, whose autocast
keeps its input's dtype). Two things follow, per stage:

- **Kept inputs.** A recomputed stage runs each layer under its own checkpoint, which keeps the
  layer's input (docs/plan.md, "Memory model"): the stage's first layer keeps the boundary
  (`ModelCosts.input_bytes` for layer 0, else the previous layer's `output_bytes`); a later
  layer whose stage's 16-bit input every layer before it passed on
  (`LayerCost.stage_output_bytes_from_boundary` differs from `stage_output_bytes`) the previous
  layer's `stage_output_bytes_from_boundary`; any other the previous layer's
  `stage_output_bytes`, its output on the model's own chain. A layer whose forward saves nothing
  (`activation_bytes` 0) keeps no input: torch's non-reentrant checkpoint holds its inputs only
  through the saved tensors it packs.
- **Activations.** A layer handed that 16-bit input saves `LayerCost.activation_bytes_from_boundary`
  (on CPU a layer norm saves its 16-bit input as it is, where from the fp32 chain it saves fp32),
  the others `activation_bytes`.

The first stage starts from the model's own input, the profile's chain. Costs without these
fields (written before them, or in fp32) price as before: every input at `output_bytes`, every
layer's `activation_bytes`. No torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipefold.plan.layer_cost import LayerCost

__all__ = ["InStageBytes"]


@dataclass(frozen=True)
class InStageBytes:
    """Per layer, what it keeps under its own checkpoint and what it saves, as running sums over
    the layers, so a stage's totals cost O(1) (`stage_bytes`, `stage_activations`)."""

    first: np.ndarray
    """Per layer, what it keeps as its stage's first layer (float64)."""
    inner_prefix: np.ndarray
    """Running sums (layers + 1) of what each layer keeps inside a stage on the model's chain."""
    passed_prefix: np.ndarray
    """Running sums of what each keeps where its stage's 16-bit input reached it."""
    passed_until: np.ndarray
    """Per layer s, the first layer after s whose input no longer comes from a 16-bit stage input
    starting at s (intp, at most the number of layers; 1 for s = 0, whose stage starts from the
    model's input)."""
    activation_prefix: np.ndarray
    """Running sums of the layers' `activation_bytes`, on the model's chain."""
    passed_activation_prefix: np.ndarray
    """Running sums of what each saves from a 16-bit input (`activation_bytes_from_boundary`)."""

    @classmethod
    def of(cls, layers: Sequence[LayerCost], input_bytes: int) -> InStageBytes:
        count = len(layers)
        first = np.zeros(count)
        inner = np.zeros(count)
        passed = np.zeros(count)
        for index, layer in enumerate(layers):
            if not layer.activation_bytes:  # saves nothing: its checkpoint keeps no input
                continue
            if index == 0:
                first[index] = inner[index] = passed[index] = input_bytes
                continue
            before = layers[index - 1]
            first[index] = before.output_bytes
            inner[index] = before.stage_output
            passed[index] = before.stage_output_from_boundary
        # Layer m passes a 16-bit input on where its output from one differs from its chain output;
        # a run starting at s reaches layer m + 1 for the first m >= s that does not.
        passes = [layer.stage_output_from_boundary != layer.stage_output for layer in layers]
        until = np.empty(count, dtype=np.intp)
        following = count
        for index in range(count - 1, -1, -1):
            if not passes[index]:
                following = index + 1
            until[index] = following
        # The first stage's input is the model's own, not a 16-bit boundary: the chain throughout.
        until[0] = 1

        def running(values: Sequence[float] | np.ndarray) -> np.ndarray:
            return np.concatenate(([0.0], np.cumsum(np.asarray(values, dtype=np.float64))))

        return cls(first, running(inner), running(passed), until,
                   running([layer.activation_bytes for layer in layers]),
                   running([layer.activations_from_boundary for layer in layers]))

    def stage_bytes(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Per stage [start, stop), the bytes its layers keep per `ModelCosts.reference_rows` samples."""
        ends = np.minimum(self.passed_until[starts], stops)
        result: np.ndarray = (self.first[starts] + self.passed_prefix[ends] - self.passed_prefix[starts + 1]
                              + self.inner_prefix[stops] - self.inner_prefix[ends])
        return result

    def _passed_end(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Per stage, the end of its layers handed its 16-bit input: none in the first stage."""
        ends: np.ndarray = np.where(starts > 0, np.minimum(self.passed_until[starts], stops), starts)
        return ends

    def stage_activations(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Per stage [start, stop), the bytes its layers' forwards save per `ModelCosts.reference_rows`
        samples."""
        ends = self._passed_end(starts, stops)
        chain, passed = self.activation_prefix, self.passed_activation_prefix
        result: np.ndarray = chain[stops] - chain[ends] + passed[ends] - passed[starts]
        return result

    def layer_activations(self, start: int, stop: int) -> list[float]:
        """What each layer of the stage [start, stop) saves, first to last."""
        end = int(self._passed_end(np.array([start]), np.array([stop]))[0])
        chain, passed = self.activation_prefix, self.passed_activation_prefix
        return [float(passed[j + 1] - passed[j]) for j in range(start, end)] + [
            float(chain[j + 1] - chain[j]) for j in range(end, stop)]

    def layer_bytes(self, start: int, stop: int) -> list[float]:
        """What each layer of the stage [start, stop) keeps, first to last."""
        end = min(int(self.passed_until[start]), stop)
        return [float(self.first[start]),
                *(float(self.passed_prefix[j + 1] - self.passed_prefix[j]) for j in range(start + 1, end)),
                *(float(self.inner_prefix[j + 1] - self.inner_prefix[j]) for j in range(end, stop))]
