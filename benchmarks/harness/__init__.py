"""The side-by-side benchmark harness: pipefold against torch.distributed.pipelining (and DeepSpeed).

`python benchmarks/run.py` (`cli.main`) runs one matrix of configurations (`runner`) in one
set of spawned ranks (`orchestrate`, `worker`), every library (`pipefold_side`,
`torch_side`, `deepspeed_side`, and the one-process baseline `single_side`) alternating
step by step on the same zoo model and batch (`workloads`), after a gradient check against
one process (`reference`); it writes JSON results that `report` renders as BENCHMARKS.md
(`python benchmarks/render.py`).

The harness imports pipefold; nothing under `pipefold/` imports it. Only the modules that
run the ranks import torch; importing this package does not.
"""
