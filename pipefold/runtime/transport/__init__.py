"""Moving tensors between ranks: point-to-point transfers and collectives with deadlines.

`comm` is the interface the runtime uses (`P2P`, `Collectives`, `Transfer`); `shm` and
`shm_exchange` are its shared-memory paths between ranks on one host, and `doorbell` is the
wake-up signal they wait on.
"""
