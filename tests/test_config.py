import sys
import textwrap

import pytest

import pipefold.job.config as config_module
import pipefold.job.sections as sections_module
from pipefold.errors import ConfigError
from pipefold.files import write_atomic
from pipefold.job.config import TrainConfig, load_config, parse_override
from pipefold.schedule import build
from pipefold.schedule.io import dumps, load

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def test_defaults_are_valid_and_match_the_documented_job():
    config = TrainConfig()
    assert config.schedule.name == "1f1b"
    assert config.schedule.ranks == 2
    assert config.to_dict()["model"]["d_model"] == 128


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(
        'steps = 7\npartition = [3, 5]\n[schedule]\nname = "gpipe"\nnum_microbatches = 4\n'
        "[optimizer]\nlr = 1\n"
    )
    config = load_config(path, {"schedule.num_microbatches": 2, "seed": 5})
    assert config.steps == 7
    assert config.schedule.name == "gpipe"
    assert config.schedule.num_microbatches == 2
    assert config.seed == 5
    assert config.partition == (3, 5)
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.to_dict()["partition"] == [3, 5]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("schedule.ranks=4", ("schedule.ranks", 4)),
        ("optimizer.lr=1e-3", ("optimizer.lr", 1e-3)),
        ("partition=[2, 6]", ("partition", [2, 6])),
        ("schedule.name=zb-h1", ("schedule.name", "zb-h1")),
        ('out="runs/x"', ("out", "runs/x")),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_refuses_missing_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("steps")


# Every validation path: (overrides, text the message must contain: the field and the value).
BAD = [
    ({"steps": 0}, "steps=0"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": 4}, "batch_size=4"),
    ({"timeout_s": 0}, "timeout_s=0"),
    ({"sample_tokens": -1}, "sample_tokens=-1"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"model.d_model": 0}, "model.d_model=0"),
    ({"model.num_heads": 3}, "model.num_heads=3"),
    ({"model.num_layers": 0}, "model.num_layers=0"),
    ({"model.seq_len": 1}, "model.seq_len=1"),
    ({"data.max_bytes": 10}, "data.max_bytes=10"),
    ({"data.val_fraction": 1.5}, "data.val_fraction=1.5"),
    ({"schedule.ranks": 0}, "schedule.ranks=0"),
    ({"schedule.num_microbatches": 0}, "schedule.num_microbatches=0"),
    ({"schedule.virtual": -1}, "schedule.virtual=-1"),
    ({"schedule.name": "auto-v", "schedule.virtual": 1}, "schedule.virtual=1"),
    ({"schedule.name": "nope"}, "schedule.name='nope'"),
    ({"schedule.ranks": 9}, "model.num_layers=4"),
    ({"optimizer.lr": 0}, "optimizer.lr=0"),
    ({"optimizer.weight_decay": -1}, "optimizer.weight_decay=-1"),
    ({"optimizer.beta1": 1.0}, "optimizer.beta1=1.0"),
    ({"optimizer.beta2": -0.1}, "optimizer.beta2=-0.1"),
    ({"optimizer.warmup_steps": -1}, "optimizer.warmup_steps=-1"),
    ({"partition": "random"}, "partition='random'"),
    ({"partition": "type:("}, "partition='type:('"),
    ({"partition": [1, 1]}, "partition=[1, 1]"),
    ({"partition": [0, 8]}, "partition=[0, 8]"),
    ({"recompute": "some"}, "recompute='some'"),
    ({"recompute": [99]}, "recompute=[99]"),
    ({"model.d_model": "wide"}, "model.d_model='wide'"),
    ({"steps": True}, "steps=True"),
    ({"partition": [1.5, 2]}, "partition=[1.5, 2]"),
    ({"schedule.name": "1f1b", "schedule.streaming": True}, "schedule.streaming=True"),
    ({"model.tie_embeddings": 1}, "model.tie_embeddings=1"),
    ({"schedule.data_parallel": 0}, "schedule.data_parallel=0"),
    ({"schedule.data_parallel": 3}, "batch_size=32"),
    ({"schedule.data_parallel": 8}, "batch_size=32"),
    (
        {"schedule.data_parallel": 2, "schedule.name": "pipedream", "optimizer.zero": True},
        "optimizer.zero=True",
    ),
    ({"optimizer.zero": True}, "optimizer.zero=True"),  # nothing to shard without replicas
    ({"optimizer.zero": True, "schedule.data_parallel": 2, "schedule.tensor_parallel": 2, "batch_size": 32},
     "optimizer.zero=True"),
    ({"schedule.retune_every": -1}, "schedule.retune_every=-1"),
    (
        {"schedule.retune_every": 2, "schedule.name": "pipedream", "model.tie_embeddings": False},
        "schedule.retune_every=2",
    ),
    ({"schedule.tensor_parallel": 0}, "schedule.tensor_parallel=0"),
    ({"schedule.sequence_parallel": True}, "schedule.sequence_parallel=True"),  # nothing to split over
    (
        {"schedule.sequence_parallel": True, "schedule.tensor_parallel": 2, "model.seq_len": 127},
        "model.seq_len=127",
    ),
    ({"schedule.tensor_parallel": 3}, "model.num_heads=4"),  # attention splits by heads: 3 does not divide 4
    (
        {"schedule.tensor_parallel": 2, "schedule.name": "pipedream", "model.tie_embeddings": False},
        "schedule.tensor_parallel=2",
    ),
    ({"precision": "fp8"}, "precision='fp8'"),
    ({"compile": True, "schedule.tensor_parallel": 2}, "compile=True"),
    ({"precision": "fp16", "loss_scale": 0.0}, "loss_scale=0.0"),
    ({"precision": "fp16", "schedule.name": "pipedream", "model.tie_embeddings": False}, "precision='fp16'"),
    ({"nope": 1}, "nope"),
    ({"model.nope": 1}, "model.nope"),
    ({"nope.x": 1}, "nope.x"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD, ids=[next(iter(o)) + f"={v}" for o, v in BAD])
def test_every_bad_value_names_the_field_and_value(overrides, names):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert names in str(info.value)


def test_searched_schedules_are_accepted_with_their_layout():
    assert load_config(overrides={"schedule.name": "auto"}).schedule.num_virtual == 1
    searched = load_config(overrides={"schedule.name": "auto-v"}).schedule
    assert searched.num_virtual == 2 and searched.searched_placement == "v"
    assert load_config().schedule.searched_placement is None


def test_illegal_schedule_combination_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"schedule.name='gpipe' with schedule.ranks=2.*num_virtual=2"):
        load_config(overrides={"schedule.name": "gpipe", "schedule.virtual": 2})


def test_section_must_be_a_table(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("model = 3\n")
    with pytest.raises(ConfigError, match=r"\[model\]"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_asynchronous_schedule_with_tied_or_untied_head_is_accepted():
    config = load_config(overrides={"schedule.name": "pipedream", "model.tie_embeddings": False})
    assert config.model.tie_embeddings is False
    streaming = load_config(overrides={"schedule.name": "pipedream-2bw", "schedule.streaming": True})
    assert streaming.model.tie_embeddings is True and streaming.schedule.streaming is True
    assert parse_override("model.tie_embeddings=false") == ("model.tie_embeddings", False)



@pytest.mark.parametrize(
    "zero", [{"optimizer.zero": True}, {"schedule.shard": "zero1"}, {"schedule.shard": "full"}]
)
def test_pure_bf16_with_zero1_or_full_sharding_is_accepted(zero):
    overrides = {"precision": "bf16-pure", "schedule.data_parallel": 2, "batch_size": 16, **zero}
    config = load_config(overrides=overrides)
    assert config.precision == "bf16-pure" and config.schedule.data_parallel == 2


@pytest.mark.parametrize(
    "schedule",
    [{"schedule.name": "pipedream"}, {"schedule.name": "pipedream-2bw", "schedule.streaming": True}],
)
def test_pure_bf16_with_an_asynchronous_schedule_is_accepted(schedule):
    """Each stage's AdamW keeps the fp32 masters (`job.setup._adamw`); tied embedding included."""
    overrides = {"precision": "bf16-pure", "schedule.data_parallel": 2, "batch_size": 16, **schedule}
    config = load_config(overrides=overrides)
    assert config.compute_precision == "bf16-pure" and config.schedule.name == schedule["schedule.name"]


def test_the_documented_toml_layout_is_the_defaults():
    """The module docstring's layout documents the defaults; it must not drift from them."""
    doc = config_module.__doc__ or ""
    layout = textwrap.dedent(doc[doc.index("::\n") + 3 :])
    documented = tomllib.loads(layout)
    defaults = TrainConfig().to_dict()
    for key, value in documented.items():
        if isinstance(value, dict):
            for name, item in value.items():
                assert defaults[key][name] == item, f"{key}.{name}"
        else:
            assert defaults[key] == value, key
    assert load_config(overrides={k: v for k, v in documented.items() if k != "schedule"}) == TrainConfig()


def test_the_schedule_is_built_once_and_a_schedule_file_read_once(tmp_path, monkeypatch):
    built, reads = [], []
    monkeypatch.setattr(sections_module, "build", lambda *a, **k: built.append(a) or build(*a, **k))
    monkeypatch.setattr(sections_module, "load", lambda path: reads.append(path) or load(path))
    config = load_config(overrides={"schedule.name": "zb-h1", "schedule.retune_every": 2})
    assert config.schedule_label == "zb-h1" and config.schedule.built.name == "zb-h1"
    assert len(built) == 1
    path = tmp_path / "s.json"
    write_atomic(path, dumps(build("1f1b", num_ranks=2, num_microbatches=8)))
    config = load_config(overrides={"schedule.file": str(path), "schedule.retune_every": 2})
    assert config.schedule_label == f"{path} (1f1b)" and config.schedule.built.num_microbatches == 8
    assert len(reads) == 1
    # Given the file's contents (the CLI reads it to fill ranks and micro-batches), no second read.
    again = load_config(overrides={"schedule.file": str(path)}, schedule_file=config.schedule.built)
    assert again.schedule.built is config.schedule.built and len(reads) == 1


def test_compile_without_a_cpp_compiler_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    refusal = "compile=True is not allowed: .*'no-such-compiler\\+\\+' is not on the PATH"
    with pytest.raises(ConfigError, match=refusal):
        load_config(None, {"compile": True})
    monkeypatch.setenv("CXX", sys.executable)  # any program on the PATH passes the check
    assert load_config(None, {"compile": True}).compile


def test_the_default_clip_applies_where_the_schedule_can_clip():
    """optimizer.clip_grad_norm = "auto": 1.0 for flush schedules, off for asynchronous ones;
    an explicit clip with an asynchronous schedule is still refused."""
    assert TrainConfig().optimizer.clip_grad_norm == "auto" and TrainConfig().clip_norm == 1.0
    assert load_config(overrides={"schedule.name": "zb-h1"}).clip_norm == 1.0
    assert load_config(overrides={"optimizer.clip_grad_norm": 0.5}).clip_norm == 0.5
    assert load_config(overrides={"optimizer.clip_grad_norm": 0}).clip_norm == 0.0
    for name in ("pipedream", "pipedream-2bw"):
        untied = {"schedule.name": name, "model.tie_embeddings": False}
        assert load_config(overrides=untied).clip_norm == 0.0
        with pytest.raises(ConfigError, match=r"clip_grad_norm=1.0 is not allowed.*inside the step"):
            load_config(overrides={**untied, "optimizer.clip_grad_norm": 1.0})
    with pytest.raises(ConfigError, match=r"optimizer.clip_grad_norm='always'.*\"auto\""):
        load_config(overrides={"optimizer.clip_grad_norm": "always"})
    with pytest.raises(ConfigError, match=r"optimizer.clip_grad_norm=-1.0"):
        load_config(overrides={"optimizer.clip_grad_norm": -1.0})
    assert TrainConfig().optimizer.lr_schedule == "cosine" and TrainConfig().eval_every == 50


def test_the_default_precision_is_bf16_where_it_was_measured_faster(monkeypatch):
    """precision = "auto": bf16 for the built-in GPT at d_model >= 128 on a CPU with bf16 matrix
    units (AMX / AVX512-BF16), and on a CUDA GPU with bf16; fp32 otherwise; resolved once."""
    assert TrainConfig().precision == "auto"
    asked: list[str] = []

    def native(device_type: str, native_cpu: bool = True, native_cuda: bool = True) -> bool:
        asked.append(device_type)
        return native_cpu if device_type == "cpu" else native_cuda

    monkeypatch.setattr(config_module, "native_bf16", native)
    monkeypatch.setattr(config_module, "has_cuda", lambda: False)
    config = TrainConfig()
    assert config.compute_precision == "bf16" and config.compute_dtype_name == "bf16"
    assert asked == ["cpu"]  # the answer is kept: it is asked once
    assert config.compute_precision == "bf16" and asked == ["cpu"]
    assert load_config(overrides={"model.d_model": 64}).compute_precision == "fp32"  # measured slower
    # The cpu hardware preset has an fp32 peak only: the refusal names what "auto" chose.
    with pytest.raises(ConfigError, match=r'hardware=.cpu. .*precision "auto" chose bf16.*--precision fp32'):
        load_config(overrides={"hardware": "cpu"})
    for explicit in ("fp32", "bf16", "bf16-pure"):
        assert load_config(overrides={"precision": explicit}).compute_precision == explicit
    monkeypatch.setattr(config_module, "native_bf16", lambda device_type: native(device_type, False))
    assert TrainConfig().compute_precision == "fp32"  # a CPU that emulates bf16
    assert load_config(overrides={"device": "cpu"}).compute_precision == "fp32"
    monkeypatch.setattr(config_module, "has_cuda", lambda: True)
    assert TrainConfig().compute_precision == "bf16"  # device "auto" finds the GPU
    assert load_config(overrides={"model.d_model": 64}).compute_precision == "bf16"
    monkeypatch.setattr(config_module, "native_bf16", lambda device_type: native(device_type, False, False))
    assert TrainConfig().compute_precision == "fp32"  # a GPU without bf16
    # The real probe answers without torch on Linux (the configuration resolves it before any
    # rank starts): /proc/cpuinfo's flags.
    code = (
        "import sys; from pipefold.device import native_bf16; native_bf16('cpu'); "
        "assert 'torch' not in sys.modules or sys.platform != 'linux'"
    )
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_evaluation_without_held_out_data_is_refused_before_any_rank_starts(tmp_path):
    """eval_every > 0 needs one sequence (model.seq_len + 1 tokens) in the validation split, sized
    from the files: the built-in corpus's tail (data.val_fraction of data.max_bytes)."""
    from pipefold.data import corpus_split_sizes, load_corpus

    small = {"data.max_bytes": 2000, "data.val_fraction": 0.01}  # 20 held-out bytes
    corpus = load_corpus(2000, 0.01)
    assert corpus_split_sizes(2000, 0.01) == (len(corpus.train), len(corpus.val)) == (1980, 20)
    with pytest.raises(ConfigError, match=r"eval_every=50 is not allowed: .* holds 20, fewer than one "
                       r"sequence of model.seq_len \+ 1 = 129; raise data.val_fraction"):
        load_config(overrides=small)
    assert load_config(overrides={**small, "eval_every": 0}).eval_every == 0  # no evaluation: fine
    assert load_config(overrides={**small, "model.seq_len": 16}).eval_every == 50  # 17 <= 20


def test_token_file_split_sizes_are_what_load_tokens_returns(tmp_path):
    """The size check of a Hugging Face model's token file (data.path=<name>.bin) without reading it."""
    import numpy as np

    from pipefold.data.tokens import load_tokens, token_split_sizes

    path = tmp_path / "ids.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    data = load_tokens(path, vocab_size=1000, val_fraction=0.03)
    sizes = token_split_sizes(path, vocab_size=1000, val_fraction=0.03)
    assert sizes == (len(data.train), len(data.val)) == (970, 30)
