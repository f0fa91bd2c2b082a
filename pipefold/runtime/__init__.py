"""The runtime: execute a lowered schedule across processes, exactly, and loudly on failure.

    >>> from pipefold.runtime import Pipeline   # also re-exported as pipefold.Pipeline

`Pipeline` (pipeline.py) owns the stages of this rank (stage.py) and runs each step through
the executor (executor.py), which dispatches every action of the rank's lowered program to
one handler. Its option groups live in options.py, its transport is set up by
transport/setup.py, its data/tensor-parallel wiring is parallel/dims.py. Transfers and
collectives (comm.py) never wait without a deadline (failure.py); activation memory is
counted with saved-tensor hooks (memory.py). `measured_cost_model` (measured.py) turns a
measured timeline into a `pipefold.simulate.CostModel`; `tune_schedule` (tune.py) measures a
model's costs in probe steps and searches a schedule for them. `save_checkpoint` /
`load_checkpoint` (checkpoint.py) write and read sharded, atomic checkpoints that load into
any partition; `sharded_optimizer` (zero.py) shards the optimizer state over data-parallel
replicas (ZeRO-1); `fp32_master_weights` (master.py) steps fp32 master copies of bf16 weights
(`RuntimeOptions(precision="bf16-pure")`).
"""

from pipefold.runtime.checkpoint import CheckpointInfo, load_checkpoint, read_checkpoint_info, save_checkpoint
from pipefold.runtime.master import fp32_master_weights
from pipefold.runtime.measured import measured_cost_model
from pipefold.runtime.options import LayoutOptions, ParallelOptions, RuntimeOptions, TransportOptions
from pipefold.runtime.parallel.plans import gpt_tensor_parallel_plan, hf_tensor_parallel_plan
from pipefold.runtime.parallel.zero import sharded_optimizer
from pipefold.runtime.pipeline import Pipeline
from pipefold.runtime.profiling import LayerProfile, profile
from pipefold.runtime.step_batch import Microbatches
from pipefold.runtime.tune import TunedSchedule, tune_schedule

__all__ = [
    "CheckpointInfo",
    "LayerProfile",
    "LayoutOptions",
    "Microbatches",
    "ParallelOptions",
    "Pipeline",
    "RuntimeOptions",
    "TransportOptions",
    "TunedSchedule",
    "fp32_master_weights",
    "gpt_tensor_parallel_plan",
    "hf_tensor_parallel_plan",
    "load_checkpoint",
    "measured_cost_model",
    "profile",
    "read_checkpoint_info",
    "save_checkpoint",
    "sharded_optimizer",
    "tune_schedule",
]
