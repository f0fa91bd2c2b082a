"""Hugging Face causal LMs in one process: lazy loading (a rank reads and allocates only its
pieces), HF's loss, saving back in the HF format (round trip, sharded by rank), refusals.

Models are built from tiny configs and saved with save_pretrained into tmp_path: no network.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipefold.errors import ConfigError
from pipefold.hf.files import inspect_model
from pipefold.model.build import materialize
from pipefold.model.split import SplitPiece

hf = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
tokenizers = pytest.importorskip("tokenizers")

from pipefold.data.tokens import load_tokens  # noqa: E402
from pipefold.hf.model import (  # noqa: E402
    causal_lm_loss,
    finish_save,
    load_causal_lm,
    next_token_loss,
    save_causal_lm,
    state_dict_of,
)

VOCAB = 64


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore")
    hf.logging.set_verbosity_error()


def gpt2_config(num_layers: int = 3) -> object:
    return hf.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=num_layers, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )


def llama_config(num_layers: int = 3, tie: bool = False) -> object:
    return hf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tie,
    )


def tokenizer_files(directory: Path) -> None:
    """A word-level tokenizer.json with VOCAB - 4 words, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 5)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = hf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")
    fast.save_pretrained(directory)


def saved_model(tmp_path: Path, config: object, name: str = "model", **save: object) -> Path:
    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(config)
    directory = tmp_path / name
    model.save_pretrained(directory, **save)
    tokenizer_files(directory)
    return directory


def run(layers, x):
    value = x
    for layer in layers:
        value = layer(value)
    return value


def param_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if not p.is_meta and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loaded_pieces_are_the_saved_model_and_its_gradients(tmp_path, family):
    config = gpt2_config() if family == "gpt2" else llama_config()
    directory = saved_model(tmp_path, config)
    reference = hf.AutoModelForCausalLM.from_pretrained(directory)
    lm = load_causal_lm(directory)
    assert all(p.is_meta for p in lm.model.parameters())
    built = materialize(lm.layers, range(len(lm.layers)), "cpu")
    assert all(built[i] is lm.layers[i] for i in built)  # materialized in place
    x = torch.randint(0, VOCAB, (2, 9))
    labels = x.clone()
    labels[0, :3] = -100
    logits = run(lm.layers, x)
    expected = reference(x, labels=labels)
    torch.testing.assert_close(logits, expected.logits)
    loss = causal_lm_loss(logits, labels)
    torch.testing.assert_close(loss, expected.loss)
    loss.backward()
    expected.loss.backward()
    mine = dict(lm.model.named_parameters())
    for name, param in reference.named_parameters():
        torch.testing.assert_close(mine[name].grad, param.grad, msg=name)


def test_causal_lm_loss_is_transformers_loss_and_next_token_loss_its_shifted_form():
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(llama_config())
    x = torch.randint(0, VOCAB, (3, 8))
    labels = x.clone()
    labels[1, 5:] = -100
    logits = model(x).logits
    torch.testing.assert_close(causal_lm_loss(logits, labels), model(x, labels=labels).loss)
    torch.testing.assert_close(next_token_loss(logits[:, :-1], labels[:, 1:]), causal_lm_loss(logits, labels))


def test_a_rank_reads_and_allocates_only_its_own_pieces(tmp_path):
    """A model whose parameters exceed a rank's budget: 'rank 1 of 4' materializes its two
    blocks; only their bytes are allocated, and their values are the files'."""
    config = llama_config(num_layers=8)
    directory = saved_model(tmp_path, config, max_shard_size="40KB")
    files = inspect_model(directory)
    assert len(files.weight_files) > 2  # sharded, with an index
    lm = load_causal_lm(directory)
    total = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    budget = total // 3
    mine = [3, 4]  # blocks 2 and 3 of the 10 layers
    materialize(lm.layers, mine, "cpu")
    allocated = param_bytes(lm.model)
    expected = sum(param_bytes(lm.layers[i]) for i in mine)
    assert allocated == expected < budget < total
    assert all(lm.layers[i].is_meta() for i in range(len(lm.layers)) if i not in mine)
    saved = {}
    for path in files.weight_files:
        saved.update(safetensors_torch.load_file(str(path)))
    for index in mine:
        for local, name in lm.layers[index].parameter_names().items():
            torch.testing.assert_close(lm.layers[index].get_parameter(local), saved[name], msg=name)


def test_random_init_does_not_depend_on_the_partition():
    """From a config: each module is initialized under a seed of its path, so a parameter has
    the same values whichever rank materializes it, a tied head's weight included."""
    config = gpt2_config()
    whole = load_causal_lm(config, seed=3)
    for layer in whole.layers:
        layer.materialize_("cpu")
    values = {name: p.detach().clone() for name, p in whole.model.named_parameters()}
    # HF's own init: norms start at one, embeddings are N(0, 0.02)
    assert torch.equal(values["transformer.ln_f.weight"], torch.ones(16))
    assert abs(float(values["transformer.wte.weight"].std()) - 0.02) < 0.005
    last = load_causal_lm(config, seed=3)
    last.layers[-1].materialize_("cpu")  # a rank holding only the suffix: the tied head
    head = last.model.get_parameter("lm_head.weight")
    torch.testing.assert_close(head, values["transformer.wte.weight"])
    middle = load_causal_lm(config, seed=3)
    middle.layers[2].materialize_("cpu")
    for local, name in middle.layers[2].parameter_names().items():
        torch.testing.assert_close(middle.layers[2].get_parameter(local), values[name], msg=name)
    other = load_causal_lm(config, seed=4)
    other.layers[2].materialize_("cpu")
    changed = other.model.transformer.h[1].attn.c_attn.weight
    assert not torch.equal(changed, values["transformer.h.1.attn.c_attn.weight"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_split_points_load_the_same_weights_cut_at_named_points(tmp_path, family):
    """load_causal_lm(split_points=...): graph pieces, each rank materializing its own (read from
    the files, or initialized as the block route initializes them, the tied head included), whose
    logits are the saved model's; a piece holding only its own tensors."""
    config = gpt2_config() if family == "gpt2" else llama_config()
    points = ["transformer.h.1", "transformer.h.2.mlp"]
    if family == "llama":
        points = ["model.layers.1", "model.norm"]
    directory = saved_model(tmp_path, config)
    reference = hf.AutoModelForCausalLM.from_pretrained(directory)
    x = torch.randint(0, VOCAB, (3, 9))
    lm = load_causal_lm(directory, seq_len=9, split_points=points)
    assert len(lm.layers) == 3 and all(p.is_meta for p in lm.model.parameters())
    lm.layers[1].materialize_("cpu")
    assert not lm.layers[1].is_meta() and lm.layers[0].is_meta() and lm.layers[2].is_meta()
    materialize(lm.layers, [0, 2], "cpu")
    torch.testing.assert_close(run(lm.layers, x), reference(x).logits)
    with pytest.raises(ConfigError, match=r"give seq_len"):
        load_causal_lm(directory, split_points=points)
    # Random init: the values the block route gives each tensor, whichever piece holds it.
    blocks = load_causal_lm(config, seed=3)
    graph = load_causal_lm(config, seed=3, seq_len=9, split_points=points)
    materialize(blocks.layers, range(len(blocks.layers)), "cpu")
    materialize(graph.layers, [2, 1, 0], "cpu")
    expected = dict(blocks.model.named_parameters())
    for name, param in graph.model.named_parameters():
        torch.testing.assert_close(param, expected[name], msg=name)


def test_save_round_trip_is_identical_and_loads_with_from_pretrained(tmp_path):
    directory = saved_model(tmp_path, gpt2_config())
    lm = load_causal_lm(directory)
    materialize(lm.layers, range(len(lm.layers)), "cpu")
    out = save_causal_lm(lm.layers, tmp_path / "out", lm.config, tokenizer_dir=directory)
    original = safetensors_torch.load_file(str(directory / "model.safetensors"))
    written = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(original)  # the tied lm_head is not written, as HF does
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    assert (out / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()
    assert not (tmp_path / ".out.partial").exists()
    reloaded = hf.AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(0, VOCAB, (2, 7))
    torch.testing.assert_close(reloaded(x).logits, run(lm.layers, x))


def test_ranks_write_their_own_shards_and_one_writes_the_index(tmp_path):
    """Two 'ranks' each hold half the layers of a separately loaded model (as processes do) and
    write their shard; the result is the model, loadable with from_pretrained."""
    directory = saved_model(tmp_path, llama_config(num_layers=4, tie=True))
    target = tmp_path / "sharded"
    halves = [[0, 1, 2], [3, 4, 5]]
    for rank, owned in enumerate(halves):
        lm = load_causal_lm(directory)
        materialize(lm.layers, owned, "cpu")
        state = state_dict_of(lm.layers, owned=owned)
        save_causal_lm(state, target, lm.config, shard=(rank, len(halves)))
    finish_save(target, lm.config, tokenizer_dir=directory)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert set(index["weight_map"].values()) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, as the embedding
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors"
    reference = hf.AutoModelForCausalLM.from_pretrained(directory)
    reloaded = hf.AutoModelForCausalLM.from_pretrained(target)
    for (name, a), (_, b) in zip(reference.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_token_files_and_text_become_batches(tmp_path):
    directory = saved_model(tmp_path, gpt2_config())
    ids = np.arange(200, dtype=np.uint16) % VOCAB
    ids.tofile(tmp_path / "train.bin")
    data = load_tokens(tmp_path / "train.bin", vocab_size=VOCAB, val_fraction=0.1)
    assert isinstance(data.train, np.memmap) and data.num_tokens == 200
    np.testing.assert_array_equal(np.concatenate([data.train, data.val]), ids)
    from pipefold.data import BatchSampler

    inputs, targets = BatchSampler(data.train, batch_size=4, seq_len=8, seed=0).next_batch()
    assert inputs.dtype == torch.long and inputs.shape == (4, 8)
    torch.testing.assert_close(targets[:, :-1], inputs[:, 1:])
    text = tmp_path / "text"
    (text / "sub").mkdir(parents=True)
    (text / "a.txt").write_text("w1 w2 w3 w4 " * 10)
    (text / "sub" / "b.txt").write_text("w5 w6 " * 10)
    tokens = load_tokens(text, vocab_size=VOCAB, tokenizer_file=directory / "tokenizer.json")
    assert tokens.num_files == 2
    assert list(np.concatenate([tokens.train, tokens.val])[:5]) == [2, 3, 4, 5, 2]
    with pytest.raises(ConfigError, match=r"token id 199 but the model's vocab_size is 64"):
        np.arange(200, dtype=np.uint16).tofile(tmp_path / "big.bin")
        load_tokens(tmp_path / "big.bin", vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"data.path='.*nope' does not exist"):
        load_tokens(tmp_path / "nope", vocab_size=VOCAB)


def test_bad_model_sources_are_refused_naming_the_file(tmp_path):
    directory = saved_model(tmp_path, llama_config(num_layers=4), max_shard_size="40KB")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConfigError, match=rf"shard\(s\) but 1 are missing .*{shard.name}.*copy every shard"):
        load_causal_lm(directory)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ConfigError, match=r"model_type='bert'.*supported: gpt2, llama, mistral, qwen2"):
        load_causal_lm(bert)
    with pytest.raises(ConfigError, match=r"supported: gpt2"):
        load_causal_lm(hf.BertConfig())
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_causal_lm(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"no model.safetensors .*config.json to train from a random"):
        load_causal_lm(empty)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    from pipefold.hf.files import check_tokenizer

    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({**gpt2_config().to_dict(), "vocab_size": 20}))
    tokenizer_files(small)
    with pytest.raises(ConfigError, match=r"tokenizer .*tokenizer.json produces ids up to 59 .* is 20"):
        check_tokenizer(inspect_model(small / "config.json"))


def test_pieces_of_a_meta_module_without_a_fill_are_refused():
    with torch.device("meta"):
        model = hf.GPT2LMHeadModel(gpt2_config())
    from pipefold.model.split import split

    layers = split(model)
    assert isinstance(layers[1], SplitPiece)
    with pytest.raises(ConfigError, match=r"on the meta device and the piece has no fill"):
        materialize(layers, [1], "cpu")
