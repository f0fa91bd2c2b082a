"""Starting and placing the processes of a job.

`launch` spawns and joins the ranks of a local job (and its rendezvous store); `orphan`
makes a rank die with its parent; `cores` finds which ranks share CPU cores; `allocator`
tunes the C heap so freed activation memory is kept for the next step.
"""
