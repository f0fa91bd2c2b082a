import argparse
import json
import math
import subprocess
import sys

import pytest

from pipefold.cli import train as train_cli
from pipefold.cli.main import main
from pipefold.device import resolve_device
from pipefold.errors import ConfigError
from pipefold.job.config import TrainConfig, load_config
from pipefold.job.outdir import resolve_out_dir
from pipefold.schedule import build


def _parse(argv):
    parser = argparse.ArgumentParser()
    train_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_flags_override_file_and_set(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('steps = 50\n[schedule]\nname = "gpipe"\nnum_microbatches = 4\n')
    args = _parse(["--config", str(path), "--set", "schedule.num_microbatches=2", "--set", "seed=9",
                   "--microbatches", "8", "--partition", "3,5", "--lr", "0.01", "--d-model", "64"])
    config = train_cli.config_from_args(args)
    assert config.steps == 50
    assert config.schedule.name == "gpipe"
    assert config.schedule.num_microbatches == 8  # explicit flag wins over --set
    assert config.seed == 9
    assert config.partition == (3, 5)
    assert config.optimizer.lr == 0.01
    assert config.model.d_model == 64


def test_no_arguments_gives_the_default_job():
    assert train_cli.config_from_args(_parse([])) == TrainConfig()


def test_named_partition_flag():
    assert train_cli.config_from_args(_parse(["--partition", "parameters"])).partition == "parameters"


def test_bad_flag_value_is_refused_before_any_worker_starts(capsys):
    assert main(["train", "--ranks", "0"]) == 2
    assert "schedule.ranks=0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="schedule.name='gpipe'"):
        train_cli.config_from_args(_parse(["--schedule", "gpipe", "--virtual", "2"]))


# Runs the CLI in a fresh interpreter and reports whether torch was imported by the time it answered.
_DRIVER = """
import sys
from pipefold.cli.main import main
code = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ranks", "0"], "schedule.ranks=0"),
        (["--schedule", "no-such-family"], "schedule.name='no-such-family'"),
        (["--set", "steps=many"], "steps='many' has the wrong type"),
        (["--set", "schedule.num_microbatches=0"], "schedule.num_microbatches=0"),
    ],
)
def test_a_bad_flag_is_refused_before_torch_is_imported(argv, message):
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, "train", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "torch imported: False" in done.stdout


def test_resolve_out_dir_is_fixed_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = resolve_out_dir(TrainConfig())
    assert config.out.startswith("runs/")
    (tmp_path / config.out).mkdir(parents=True)
    assert resolve_out_dir(TrainConfig()).out != config.out
    assert resolve_out_dir(config) is config


def test_resolve_device_without_enough_gpus(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert resolve_device("cpu", 0).type == "cpu"
    assert resolve_device("auto", 1).type == "cpu"
    with pytest.raises(ConfigError, match='device="cuda" but local rank 1 has no GPU'):
        resolve_device("cuda", 1)


def _runtime_missing():
    try:
        from pipefold.runtime import Pipeline  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
@pytest.mark.skipif(_runtime_missing(), reason="pipefold.Pipeline cannot be imported yet")
@pytest.mark.parametrize(
    "extra",
    [[], ["--schedule", "zb-h1", "--partition", "profile", "--recompute", "full"], ["--schedule", "auto-v"]],
    ids=["default-1f1b", "zb-h1-profile-recompute", "searched-auto-v"],
)
def test_train_end_to_end_tiny(tmp_path, capfd, extra):
    out = tmp_path / "run"
    code = main([
        "train", *extra, "--steps", "3", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
        "--seq-len", "32", "--batch-size", "8", "--microbatches", "4", "--out", str(out),
        "--set", "data.max_bytes=100000", "--set", "sample_tokens=16", "--device", "cpu",
    ])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["losses"]) == 3
    assert all(math.isfinite(loss) for loss in summary["losses"])
    assert summary["config"]["schedule"]["ranks"] == 2
    assert summary["step_time"]["predicted_makespan"] > 0
    assert summary["step_time"]["measured_makespan_last"] > 0
    recent = summary["step_time"]["num_recent_steps"]
    assert 1 <= recent <= len(summary["step_seconds"])
    # The prediction's like-for-like measurement: the median of the steps its costs came from.
    import statistics

    last = summary["step_seconds"][-recent:]
    assert summary["step_time"]["measured_wall_median_recent"] == statistics.median(last)
    assert 0 <= summary["measured_timeline"]["bubble_fraction"] < 1
    assert summary["sample"].startswith(summary["sample_prompt"])
    assert (out / "timeline.png").stat().st_size > 0
    trace = json.loads((out / "trace.json").read_text())
    assert trace
    printed = capfd.readouterr().out
    assert "sample" in printed and "loss" in printed
    if "auto-v" in extra:  # searched on the ranks from the probe's measured costs, and reported
        assert "auto schedule for 2 ranks x 4 micro-batches (4 stages)" in " ".join(printed.split())


# Three steps of a tiny GPT on CPU: the runs that parallel layouts are compared on.
_THREE_TINY_STEPS = (
    "train", "--steps", "3", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
    "--seq-len", "32", "--batch-size", "8", "--microbatches", "2", "--set", "data.max_bytes=100000",
    "--set", "sample_tokens=0", "--device", "cpu",
)


@pytest.mark.multiprocess
@pytest.mark.timeout(360)
@pytest.mark.skipif(_runtime_missing(), reason="pipefold.Pipeline cannot be imported yet")
def test_train_parallel_layouts_train_as_two_whole_ranks(tmp_path, capfd):
    """The same three steps as 2 ranks with whole layers, from the CLI: 2 replicas (each on half
    the batch), 2 replicas with AdamW's state sharded over them (ZeRO-1), 2 tensor-parallel
    ranks per stage (heads and MLP split), and the same with sequence parallelism. Resuming
    across these layouts is proven on the runtime's own tests (test_checkpoint, test_zero,
    test_tensor_parallel); here each flag reaches the job and trains exactly."""
    runs = {
        "base": [],
        "dp2": ["--data-parallel", "2"],
        "zero": ["--data-parallel", "2", "--zero"],
        "tp2": ["--tensor-parallel", "2"],
        "sp": ["--tensor-parallel", "2", "--sequence-parallel"],
    }
    losses, memory, config, entries = {}, {}, {}, {}
    for name, extra in runs.items():
        out = tmp_path / name
        code = main([*_THREE_TINY_STEPS, *extra, "--out", str(out)])
        assert code == 0, capfd.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        losses[name], config[name] = summary["losses"], summary["config"]
        memory[name] = {(m["pipeline_rank"], m["replica"]): m for m in summary["memory"]}
        entries[name] = summary["memory"]  # one entry per process (tp ranks included)
        assert (out / "checkpoint" / "pipefold.json").is_file()
    assert len(losses["base"]) == 3
    assert config["dp2"]["schedule"]["data_parallel"] == 2 and config["zero"]["optimizer"]["zero"] is True
    assert config["tp2"]["schedule"]["tensor_parallel"] == 2 and config["sp"]["schedule"]["sequence_parallel"]
    # Same global batches; averaged or split arithmetic: only float32 summation order differs.
    for name in ("dp2", "zero", "tp2", "sp"):
        assert losses[name] == pytest.approx(losses["base"], rel=1e-4), name
    # ZeRO: AdamW's arithmetic per parameter is the same wherever it runs.
    assert losses["zero"] == pytest.approx(losses["dp2"], rel=1e-6)
    # Each replica holds part of a pipeline rank's Adam state; the two parts make the whole.
    for rank in (0, 1):
        whole = memory["dp2"][(rank, 0)]["optimizer"]
        assert whole == 2 * memory["dp2"][(rank, 0)]["weights"] > 0  # two moments per weight
        parts = [memory["zero"][(rank, replica)]["optimizer"] for replica in (0, 1)]
        assert sum(parts) == whole and all(0 < part < whole for part in parts)
    # The tp ranks hold shards of the blocks: 4 processes hold less than 2 whole ranks' twice over.
    def weights(name):
        return sum(m["weights"] for m in entries[name] if m["replica"] == 0)

    def activations(name):
        return max(m["activations_peak"] for m in entries[name])

    assert weights("base") < weights("tp2") < 2 * weights("base")
    # Sequence parallelism: the same weights, fewer activations kept (a tp rank's half of the positions).
    assert weights("sp") == weights("tp2")
    assert activations("sp") < activations("tp2")


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.skipif(_runtime_missing(), reason="pipefold.Pipeline cannot be imported yet")
def test_train_retuning_changes_the_order_not_the_training(tmp_path, capfd):
    """schedule.retune_every=2: whatever orders it tries, the losses are those of the run without."""
    common = [
        "train", "--steps", "6", "--d-model", "64", "--num-layers", "4", "--num-heads", "2",
        "--seq-len", "64", "--batch-size", "8", "--microbatches", "4", "--set", "data.max_bytes=100000",
        "--set", "sample_tokens=0", "--device", "cpu",
    ]
    runs = {}
    for every in (0, 2):
        out = tmp_path / f"every{every}"
        code = main([*common, "--set", f"schedule.retune_every={every}", "--out", str(out)])
        assert code == 0, capfd.readouterr().err
        runs[every] = json.loads((out / "summary.json").read_text())
    assert runs[0]["retunes"] == []
    assert runs[2]["losses"] == pytest.approx(runs[0]["losses"], rel=1e-5)
    for change in runs[2]["retunes"]:
        assert change["step"] in (2, 4) and change["from"] != "" and change["to"] != ""
        assert change["predicted_after_s"] < change["predicted_before_s"]
        assert change.get("kept") in (True, False, None)


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.skipif(_runtime_missing(), reason="pipefold.Pipeline cannot be imported yet")
def test_measured_costs_to_found_schedule_to_training(tmp_path, capfd):
    """train writes costs.json; schedules find searches on it; train runs the saved schedule."""
    common = [
        "--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--seq-len", "32", "--batch-size", "8",
        "--set", "data.max_bytes=100000", "--set", "sample_tokens=0", "--device", "cpu",
    ]
    first = tmp_path / "measure"
    code = main(
        ["train", "--schedule", "zb-h1", "--steps", "4", "--microbatches", "4", "--out", str(first), *common]
    )
    assert code == 0, capfd.readouterr().err
    costs = json.loads((first / "costs.json").read_text())
    assert all(value > 0 for key in ("f", "i", "w", "b") for value in costs[key])
    found = tmp_path / "auto.json"
    code = main(["schedules", "find", "--ranks", "2", "--microbatches", "4", "--costs-file",
                 str(first / "costs.json"), "--save", str(found), "--time-budget", "0.2"])
    assert code == 0 and found.is_file()
    second = tmp_path / "auto-run"
    code = main(["train", "--schedule-file", str(found), "--steps", "3", "--out", str(second), *common])
    assert code == 0, capfd.readouterr().err
    summary = json.loads((second / "summary.json").read_text())
    assert summary["config"]["schedule"]["file"] == str(found)
    assert summary["config"]["schedule"]["num_microbatches"] == 4  # filled from the file
    assert len(summary["losses"]) == 3 and all(math.isfinite(x) for x in summary["losses"])


def test_schedule_file_mismatch_is_refused_before_any_worker(tmp_path):
    from pipefold.files import write_atomic
    from pipefold.schedule.io import dumps

    path = write_atomic(tmp_path / "s.json", dumps(build("1f1b", num_ranks=2, num_microbatches=4)))
    with pytest.raises(ConfigError, match=r"schedule.num_microbatches=8.*set schedule.num_microbatches=4"):
        load_config(overrides={"schedule.file": str(path)})
    with pytest.raises(ConfigError, match="schedule.file='nope.json' cannot be read"):
        load_config(overrides={"schedule.file": "nope.json"})
