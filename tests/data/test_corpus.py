import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.data import VOCAB_SIZE, BatchSampler, decode, encode, load_corpus, stdlib_files
from pipefold.errors import ConfigError


def test_corpus_is_deterministic_and_capped():
    first = load_corpus(max_bytes=200_000, val_fraction=0.1)
    second = load_corpus(max_bytes=200_000, val_fraction=0.1)
    assert first == second
    assert first.num_bytes == 200_000
    assert len(first.val) == 20_000
    assert first.num_files >= 1


def test_corpus_prefix_is_stable_under_a_larger_cap():
    small = load_corpus(max_bytes=50_000, val_fraction=0.5)
    large = load_corpus(max_bytes=100_000, val_fraction=0.5)
    assert (large.train + large.val)[:50_000] == small.train + small.val


def test_files_are_sorted_and_skip_site_packages():
    files = stdlib_files()
    assert files
    assert all("site-packages" not in path.parts for path in files)
    base = Path(sysconfig.get_paths()["stdlib"])
    assert files == sorted(files, key=lambda p: p.relative_to(base).as_posix())


def test_corpus_from_a_custom_root(tmp_path):
    (tmp_path / "b.py").write_text("second\n")
    (tmp_path / "a.py").write_text("first\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_text("skipped\n")
    corpus = load_corpus(max_bytes=1000, val_fraction=0.5, root=tmp_path)
    assert corpus.train + corpus.val == b"first\n\nsecond\n\n"
    assert corpus.num_files == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_bytes": 1}, "data.max_bytes"), ({"val_fraction": 0.0}, "data.val_fraction"),
     ({"val_fraction": 1.0}, "data.val_fraction")],
)
def test_bad_corpus_arguments_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        load_corpus(**kwargs)


def test_empty_root_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no Python source"):
        load_corpus(root=tmp_path)


@settings(max_examples=30, deadline=None)
@given(st.text(max_size=50))
def test_vocabulary_round_trip(text):
    ids = encode(text)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert decode(list(ids)) == text


def test_sampler_shapes_targets_shift_and_seed():
    tokens = bytes(range(200))
    sampler = BatchSampler(tokens, batch_size=4, seq_len=8, seed=3)
    inputs, targets = next(sampler)
    assert inputs.shape == targets.shape == (4, 8)
    assert inputs.dtype == torch.long
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    torch.testing.assert_close(targets - inputs, torch.ones_like(inputs))
    again = BatchSampler(tokens, batch_size=4, seq_len=8, seed=3).next_batch()
    torch.testing.assert_close(again[0], inputs)
    other = BatchSampler(tokens, batch_size=4, seq_len=8, seed=4).next_batch()
    assert not torch.equal(other[0], inputs)


def test_peek_does_not_advance():
    sampler = BatchSampler(bytes(range(100)), batch_size=3, seq_len=5, seed=1)
    peeked = sampler.peek()
    torch.testing.assert_close(sampler.next_batch()[0], peeked[0])
    assert not torch.equal(sampler.next_batch()[0], peeked[0])


def test_sampler_covers_the_last_window():
    tokens = bytes(range(10))
    sampler = BatchSampler(tokens, batch_size=64, seq_len=9, seed=0)
    inputs, targets = sampler.next_batch()
    assert int(targets.max()) == 9  # the only window ends on the last token


def test_sampler_refuses_too_short_streams():
    with pytest.raises(ConfigError, match="seq_len"):
        BatchSampler(b"abc", batch_size=1, seq_len=3)
