"""The profile's I, W and B per layer (`GptProfile.layer_split`), which `plan --profile` pools the
calibration's split share with: one process, a tiny GPT."""

import argparse
from dataclasses import replace

from pipefold.cli.profile import measure
from pipefold.plan.split_fit import profile_split_share


def _args():
    return argparse.Namespace(model=None, num_layers=2, d_model=16, num_heads=2, seq_len=8, vocab_size=256,
                              untied=False, device="cpu", threads=1, repeats=2, precision="fp32",
                              batch_size=4, microbatches=2, rows=None)


def test_every_layer_gives_its_timed_i_w_and_b_and_a_share_follows():
    measured = measure(_args(), 2)
    split = measured.layer_split()
    # Embedding, positions, 2 blocks, norm, head.
    assert split is not None and len(split) == len(measured.profiles) == 6
    for (i, w, b), profile in zip(split, measured.profiles, strict=True):
        assert (i, w, b) == (profile.input_grad_s, profile.weight_grad_s, profile.backward_s)
        assert min(i, w, b) >= 0
    share = profile_split_share(split, (0, 3, 6), {1})
    assert share is not None and 0 <= share <= 0.45
    # A profile without the I/W split (an older profile-like source) gives none.
    untimed = replace(measured, profiles=tuple(replace(p, input_grad_s=None) for p in measured.profiles))
    assert untimed.layer_split() is None
