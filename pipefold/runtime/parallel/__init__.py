"""The parallel dimensions applied to a pipeline stage besides pipelining itself.

`data_parallel` averages gradients over replicas, `tensor_parallel` shards layers over a
"tp" mesh dimension by a plan, `sequence_parallel` shards activations along the sequence
between tensor-parallel layers, and `zero` shards the optimizer state over replicas.
"""
