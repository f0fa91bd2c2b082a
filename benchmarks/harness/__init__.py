"""Side-by-side benchmarks of pipefold against torch.distributed.pipelining (and DeepSpeed).

`pipefold bench` and `python benchmarks/run.py` run one matrix of configurations in
one set of worker ranks, both libraries alternating step by step on the same model and
batch, and write JSON results that `benchmarks.harness.report` renders as BENCHMARKS.md.

Only the orchestration modules import torch; importing this package does not.
"""
