"""The training job behind `pipefold train`, in four parts that run in order:

    config   the TOML/flags configuration, checked whole before torch is imported (torch-free);
             sections holds its [model], [data], [schedule] and [optimizer] tables
    setup    device, process group and mesh, data, model, optimizer, resume
    loop     the step loop (`train` on every rank; `run_local` spawns the ranks)
    report   progress, memory, the final report and the files in <out>/
    retune   re-tuning the schedule's order during training (schedule.retune_every)

Nothing is imported here, so `pipefold.job.config` (and `sections`) stay torch-free.
"""
