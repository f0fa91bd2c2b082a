"""`pipefold train`: train the built-in GPT on the stdlib corpus, pipelined over local ranks.

    pipefold train                                   # 2 ranks on CPU, 1F1B, 300 steps, a few minutes
    pipefold train --schedule zb-h1 --ranks 4 --microbatches 8 --steps 50
    pipefold train --config job.toml --set optimizer.lr=1e-3 --out runs/lr1e-3
    pipefold train --steps 600 --resume runs/lr1e-3/checkpoint   # continue to step 600
    pipefold train --model models/gpt2 --data corpus/ --seq-len 256   # a Hugging Face model -> <out>/hf
    torchrun --nproc-per-node 4 -m pipefold train --ranks 4   # ranks started by torchrun

The configuration (see pipefold.job.config) is validated whole, the schedule included,
before torch is imported, so a bad flag is answered at once. Under torchrun (WORLD_SIZE
set) the job runs in this process; otherwise `--ranks` workers are spawned here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from pipefold.device import DEVICE_CHOICES
from pipefold.job.config import (
    NONFINITE_CHOICES,
    PRECISION_CHOICES,
    TrainConfig,
    load_config,
    parse_override,
)
from pipefold.job.outdir import check_out_dir, resolve_out_dir
from pipefold.job.recovery import resume_after_restart
from pipefold.job.sections import (
    ATTENTION_CHOICES,
    LR_SCHEDULES,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    load_schedule_file,
)
from pipefold.parallel_config import SHARD_MODES

# Flag -> config key; flags left unset keep the file's or the default value.
_FLAGS: dict[str, str] = {
    "model": "model.path",
    "data": "data.path",
    "bucket_by_length": "data.bucket_by_length",
    "adaptive": "schedule.adaptive",
    "memory_limit": "schedule.memory_limit",
    "schedule": "schedule.name",
    "ranks": "schedule.ranks",
    "data_parallel": "schedule.data_parallel",
    "tensor_parallel": "schedule.tensor_parallel",
    "sequence_parallel": "schedule.sequence_parallel",
    "vocab_parallel": "schedule.vocab_parallel",
    "streaming": "schedule.streaming",
    "num_microbatches": "schedule.num_microbatches",
    "virtual": "schedule.virtual",
    "schedule_file": "schedule.file",
    "steps": "steps",
    "batch_size": "batch_size",
    "seed": "seed",
    "out": "out",
    "lr": "optimizer.lr",
    "lr_schedule": "optimizer.lr_schedule",
    "min_lr": "optimizer.min_lr",
    "warmup_steps": "optimizer.warmup_steps",
    "weight_decay": "optimizer.weight_decay",
    "clip_grad_norm": "optimizer.clip_grad_norm",
    "grad_accumulation": "grad_accumulation",
    "eval_every": "eval_every",
    "eval_batches": "eval_batches",
    "zero": "optimizer.zero",
    "shard": "schedule.shard",
    "free_between_microbatches": "schedule.free_between_microbatches",
    "gather_lookahead": "schedule.gather_lookahead",
    "d_model": "model.d_model",
    "num_layers": "model.num_layers",
    "num_heads": "model.num_heads",
    "seq_len": "model.seq_len",
    "dropout": "model.dropout",
    "attention": "model.attention",
    "recompute": "recompute",
    "device": "device",
    "timeout": "timeout_s",
    "checkpoint_every": "checkpoint_every",
    "resume": "resume",
    "on_nonfinite": "on_nonfinite",
    "precision": "precision",
    "loss_scale": "loss_scale",
    "compile": "compile",
    "hardware": "hardware",
    "overwrite": "overwrite",
    "max_restarts": "max_restarts",
    "async_checkpoint": "async_checkpoint",
    "memory_peaks": "memory_peaks",
}


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the built-in GPT on the stdlib corpus (the main job), or a Hugging Face model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="a TOML file (layout: pipefold.job.config)")
    parser.add_argument("--model", metavar="DIR_OR_CONFIG",
                        help="a Hugging Face causal LM to train instead of the built-in GPT: a directory "
                        "(config.json + safetensors) or a config.json (random init); saved to <out>/hf")
    parser.add_argument("--data", metavar="PATH",
                        help="with --model: a text file or directory (tokenized with the model's tokenizer) "
                        "or a token file <name>.bin (flat uint16/uint32 ids); default: the stdlib corpus")
    parser.add_argument("--schedule",
                        help="schedule family (see `pipefold schedules`), or auto / auto-v: searched on the "
                        "ranks from costs measured in probe steps (contiguous / V layout); "
                        f"default {ScheduleConfig.name}")
    parser.add_argument("--ranks", type=int,
                        help=f"pipeline ranks = worker processes; default {ScheduleConfig.ranks}")
    parser.add_argument("--schedule-file", metavar="FILE",
                        help="run this schedule JSON (e.g. from `pipefold schedules find --save`) instead "
                        "of a family; --ranks and --microbatches default to the file's")
    parser.add_argument("--microbatches", dest="num_microbatches", type=int, metavar="MICROBATCHES",
                        help=f"micro-batches per step; default {ScheduleConfig.num_microbatches}")
    parser.add_argument("--data-parallel", type=int, metavar="N",
                        help="replicas of the pipeline, each on its shard of the batch "
                        f"(ranks x N processes); default {ScheduleConfig.data_parallel}")
    parser.add_argument("--zero", action="store_true", default=None,
                        help="shard AdamW's state over the --data-parallel replicas (ZeRO stage 1); "
                        "the same as --shard zero1")
    parser.add_argument("--shard", choices=SHARD_MODES,
                        help="what the --data-parallel replicas shard: replicate (nothing), zero1 (AdamW's "
                        "state) or full (each stage's weights, gradients and AdamW state: FSDP2, gathered "
                        "once per step); default replicate")
    parser.add_argument("--free-between-microbatches", action="store_true", default=None,
                        help="with --shard full: free a stage's gathered weights whenever its rank turns to "
                        "another of its stages, and gather them again (less memory, more gathers)")
    parser.add_argument("--gather-lookahead", type=int, metavar="K",
                        help="with --shard full: start each weight gather K actions before the action "
                        "that needs it; default 0")
    parser.add_argument("--tensor-parallel", type=int, metavar="N",
                        help="ranks per stage: each block's heads and MLP are split over N ranks (ranks x "
                        f"data-parallel x N processes); default {ScheduleConfig.tensor_parallel}")
    parser.add_argument("--sequence-parallel", action="store_true", default=None,
                        help="with --tensor-parallel: split the norms, the residual stream and the stage "
                        "boundaries by position over the tp ranks (Megatron's sequence parallelism)")
    parser.add_argument("--vocab-parallel", action="store_true", default=None,
                        help="with --tensor-parallel: split the token embedding, the head (tied or not) "
                        "and the loss by vocabulary over the tp ranks (Megatron's vocabulary-parallel "
                        "embedding)")
    parser.add_argument("--streaming", action="store_true", default=None,
                        help="with --schedule pipedream or pipedream-2bw: overlap consecutive steps "
                        "(Pipeline.train), draining only before a checkpoint, an evaluation, the end "
                        "or every 50 steps")
    parser.add_argument("--bucket-by-length", action="store_true", default=None,
                        help="batch lines of the corpus of similar length: each step its own length "
                        "(up to the model's seq_len), about batch-size x seq_len tokens, none padded")
    parser.add_argument("--adaptive", action="store_true", default=None,
                        help="choose each batch's micro-batch count, flush family (of the schedule's "
                        "placement) and recomputation from the cost model at its length, within "
                        "--memory-limit, re-checked against measured steps; use with --bucket-by-length")
    parser.add_argument("--memory-limit", metavar="BYTES",
                        help='with --adaptive: what each rank may use, e.g. "2GiB" (default: no limit)')
    parser.add_argument("--virtual", type=int, help="stages per rank (default: the family's own)")
    parser.add_argument("--steps", type=int, help=f"optimizer steps; default {TrainConfig.steps}")
    parser.add_argument("--batch-size", type=int,
                        help=f"sequences per step; default {TrainConfig.batch_size}")
    parser.add_argument("--seed", type=int, help=f"weights and batch order; default {TrainConfig.seed}")
    parser.add_argument("--out", metavar="DIR", help="output directory; default runs/<timestamp>")
    parser.add_argument("--lr", type=float, help=f"AdamW peak learning rate; default {OptimizerConfig.lr:g}")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES,
                        help=f"after the warm-up: constant lr, or cosine / linear decay to --min-lr; "
                        f"default {OptimizerConfig.lr_schedule}")
    parser.add_argument("--min-lr", type=float,
                        help=f"where a decaying --lr-schedule ends; default {OptimizerConfig.min_lr:g}")
    parser.add_argument("--warmup-steps", type=int,
                        help=f"linear warm-up steps; default {OptimizerConfig.warmup_steps}")
    parser.add_argument("--weight-decay", type=float,
                        help=f"AdamW weight decay (not on norms, biases, embeddings); "
                        f"default {OptimizerConfig.weight_decay:g}")
    parser.add_argument("--clip-grad-norm", type=float, metavar="X",
                        help="clip the global gradient norm (all stages, replicas, tp shards) to X; "
                        "0 = no clipping; default: 1.0 for flush schedules, off for asynchronous ones "
                        "(pipedream*), which cannot clip (the norm is reported either way)")
    parser.add_argument("--grad-accumulation", type=int, metavar="K",
                        help="pipeline steps per optimizer step (global batch = K x --batch-size); "
                        f"default {TrainConfig.grad_accumulation}")
    parser.add_argument("--eval-every", type=int, metavar="N",
                        help="validation loss through the pipeline (forward only, every rank) every N "
                        f"steps and at the end; default {TrainConfig.eval_every}; 0 = only the end-of-run "
                        "one on rank 0")
    parser.add_argument("--eval-batches", type=int, metavar="K",
                        help=f"held-out batches per evaluation; default {TrainConfig.eval_batches}")
    parser.add_argument("--d-model", type=int, help=f"model width; default {ModelConfig.d_model}")
    parser.add_argument("--num-layers", type=int, help=f"decoder blocks; default {ModelConfig.num_layers}")
    parser.add_argument("--num-heads", type=int, help=f"attention heads; default {ModelConfig.num_heads}")
    parser.add_argument("--seq-len", type=int,
                        help=f"context length in bytes; default {ModelConfig.seq_len}")
    parser.add_argument("--dropout", type=float, metavar="P",
                        help="dropout of the built-in GPT while training: its blocks' residual dropout, or "
                        f"with --attention unfused Megatron-LM's (seeded); default {ModelConfig.dropout:g}")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES,
                        help="the built-in GPT's attention: fused (torch's scaled-dot-product) or unfused "
                        "(Megatron-LM's: QK^T, softmax, dropout on the probabilities; what `pipefold plan "
                        f"--megatron` prices); default {ModelConfig.attention}")
    parser.add_argument(
        "--partition",
        help='"flops" (default: stages of even estimated FLOPs), "uniform" (even layer counts), '
        '"parameters", "profile", "type:<regex>" or per-stage counts "3,5"'
    )
    parser.add_argument("--recompute", choices=("none", "full", "selective"),
                        help="activation recomputation: full (each stage keeps its input) or selective "
                        "(each block's attention core: QK^T, softmax, attention over V)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, help=f"default {TrainConfig.device}")
    parser.add_argument("--timeout", type=float,
                        help=f"seconds a rank waits for a peer; default {TrainConfig.timeout_s:g}")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="also save <out>/checkpoint every N steps; default 0 = only at the end")
    parser.add_argument("--resume", metavar="PATH",
                        help="continue from a checkpoint (e.g. runs/x/checkpoint): weights, optimizer, step")
    parser.add_argument("--on-nonfinite", choices=NONFINITE_CHOICES,
                        help="a NaN/inf loss: raise (stop, naming the step) or skip that step's update; "
                        f"default {TrainConfig.on_nonfinite}")
    parser.add_argument("--precision", choices=PRECISION_CHOICES,
                        help="auto: bf16 where it measured not slower than fp32 (a GPU with bf16; a CPU "
                        "with AMX/AVX512-BF16 for the built-in GPT at --d-model >= 128), else fp32; "
                        "bf16/fp16: autocast compute with fp32 weights and optimizer state, "
                        "boundaries in 16 bits (half the bytes); fp16 adds a dynamic loss scale; bf16-pure: "
                        "bf16 weights and gradients, fp32 master copies and state in the optimizer; "
                        f"default {TrainConfig.precision} (docs/training.md says why)")
    parser.add_argument("--loss-scale", type=float, metavar="S",
                        help=f"fp16's initial dynamic loss scale; default {TrainConfig.loss_scale:g}")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="run each layer of each stage through torch.compile (inductor; needs a C++ "
                        "compiler); works with every schedule, the split-backward ones included")
    parser.add_argument("--hardware", metavar="FILE_OR_PRESET",
                        help="a hardware preset (a100-80gb, h100-80gb, cpu) or TOML file, as `pipefold plan "
                        "--hardware` takes: metrics.jsonl then reports mfu (model FLOPs utilization) "
                        "against its peak FLOP/s x processes (FLOPs per token: the built-in GPT's, or "
                        "the --model config.json's sizes)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the checkpoint an earlier run left in --out (refused otherwise, "
                        "unless --resume continues that run)")
    parser.add_argument("--max-restarts", type=int, metavar="N",
                        help="after a rank fails, restart all ranks up to N times, each resuming from the "
                        "latest checkpoint in <out>/checkpoint (needs --checkpoint-every); default 0. "
                        "Under torchrun give torchrun --max-restarts N instead")
    parser.add_argument("--async-checkpoint", action="store_true", default=None,
                        help="write checkpoints in the background: the step loop waits only for the copy "
                        "to host memory (not with --data-parallel / --tensor-parallel)")
    parser.add_argument("--memory-peaks", action="store_true", default=None,
                        help="on CPU, record each rank's allocated-bytes peaks with torch's profiler "
                        "(summary.json's memory: cpu_allocated_*; slows the steps: a check of a few steps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, e.g. --set optimizer.warmup_steps=50 (repeatable)")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated config: defaults < --config file < --set < explicit flags. Torch-free."""
    overrides: dict[str, Any] = dict(parse_override(text) for text in args.overrides)
    for flag, key in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    loaded = None
    if args.schedule_file is not None:
        # The file fixes the pipeline's shape; fill what the user did not pin. Read once: the
        # configuration takes the schedule read here.
        loaded = load_schedule_file(args.schedule_file)
        overrides.setdefault("schedule.ranks", loaded.num_ranks)
        overrides.setdefault("schedule.num_microbatches", loaded.num_microbatches)
    if args.partition is not None:
        text = args.partition.strip()
        is_counts = text.replace(",", "").replace(" ", "").isdigit()
        overrides["partition"] = [int(part) for part in text.split(",")] if is_counts else text
    return load_config(args.config, overrides, schedule_file=loaded)


def run(args: argparse.Namespace) -> int:
    # Restarted by torchrun (--max-restarts): continue from this run's latest checkpoint.
    config = resume_after_restart(resolve_out_dir(config_from_args(args)))
    # A run directory that cannot be written, or holds an earlier run, is refused now, not after
    # the run (torch-free, like the configuration's own checks).
    check_out_dir(config)
    # Deferred: torch (seconds to import) only once the configuration is known to be good.
    from pipefold.job.loop import run_local, train_worker
    from pipefold.job.setup import check_resume

    check_resume(config)  # a bad --resume is refused here, before any worker starts
    if "WORLD_SIZE" in os.environ:
        # Started by torchrun (or `pipefold launch`): this process is one rank.
        from pipefold.runtime.processes.launch import write_failure_note

        try:
            train_worker(config)
        except BaseException as error:
            write_failure_note(error)  # for `pipefold launch` and torchrun, which name the root cause
            raise
        return 0
    result = run_local(config)
    if not result.ok:
        print(f"pipefold train: {result.describe()}", file=sys.stderr)
    return result.exit_code
