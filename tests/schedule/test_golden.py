"""The exact per-rank order of every family on small cases, drawn as aligned text.

Two kinds of expectation:
- pictures written here by hand (from the papers and torch's generators), one line
  per rank, for the cases a reader checks by eye;
- golden files under tests/schedule/golden/, one per (family, p, m, v), which pin
  every family's output. After an intended change, regenerate them with

      PIPEFOLD_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/schedule/test_golden.py

  and review the diff. The flag is off by default, so a plain run only compares.
"""

import os
import textwrap
from pathlib import Path

import pytest

from pipefold.schedule import build, family, names

GOLDEN_DIR = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("PIPEFOLD_REGEN_GOLDEN") == "1"


def render(schedule):
    """One line per rank, `rank r  A B C …`, cells padded to one width (no idle slots drawn)."""
    width = max(len(str(a)) for row in schedule.actions for a in row)
    return "\n".join(
        f"rank {rank}  " + " ".join(f"{str(a):<{width}}" for a in row).rstrip()
        for rank, row in enumerate(schedule.actions)
    )


def picture(text):
    return textwrap.dedent(text).strip("\n")


HAND_DRAWN = [
    ("naive", 3, 2, 1, """
        rank 0  F0.0 B0.0 F0.1 B0.1
        rank 1  F1.0 B1.0 F1.1 B1.1
        rank 2  F2.0 B2.0 F2.1 B2.1
    """),
    ("gpipe", 3, 4, 1, """
        rank 0  F0.0 F0.1 F0.2 F0.3 B0.0 B0.1 B0.2 B0.3
        rank 1  F1.0 F1.1 F1.2 F1.3 B1.0 B1.1 B1.2 B1.3
        rank 2  F2.0 F2.1 F2.2 F2.3 B2.0 B2.1 B2.2 B2.3
    """),
    ("1f1b", 3, 4, 1, """
        rank 0  F0.0 F0.1 F0.2 B0.0 F0.3 B0.1 B0.2 B0.3
        rank 1  F1.0 F1.1 B1.0 F1.2 B1.1 F1.3 B1.2 B1.3
        rank 2  F2.0 B2.0 F2.1 B2.1 F2.2 B2.2 F2.3 B2.3
    """),
    # Fewer micro-batches than ranks (torch refuses this): the warm-up is cut to m.
    ("1f1b", 4, 2, 1, """
        rank 0  F0.0 F0.1 B0.0 B0.1
        rank 1  F1.0 F1.1 B1.0 B1.1
        rank 2  F2.0 F2.1 B2.0 B2.1
        rank 3  F3.0 B3.0 F3.1 B3.1
    """),
    ("interleaved-1f1b", 2, 4, 2, """
        rank 0  F0.0 F0.1 F2.0 F2.1 F0.2 B2.0 F0.3 B2.1 F2.2 B0.0 F2.3 B0.1 B2.2 B2.3 B0.2 B0.3
        rank 1  F1.0 F1.1 F3.0 B3.0 F3.1 B3.1 F1.2 B1.0 F1.3 B1.1 F3.2 B3.2 F3.3 B3.3 B1.2 B1.3
    """),
    ("looped-bfs", 2, 2, 2, """
        rank 0  F0.0 F0.1 F2.0 F2.1 B2.1 B2.0 B0.1 B0.0
        rank 1  F1.0 F1.1 F3.0 F3.1 B3.1 B3.0 B1.1 B1.0
    """),
    ("zb-h1", 3, 4, 1, """
        rank 0  F0.0 F0.1 F0.2 I0.0 W0.0 F0.3 I0.1 W0.1 I0.2 W0.2 I0.3 W0.3
        rank 1  F1.0 F1.1 I1.0 F1.2 I1.1 W1.0 F1.3 I1.2 W1.1 I1.3 W1.2 W1.3
        rank 2  F2.0 I2.0 F2.1 I2.1 F2.2 I2.2 W2.0 F2.3 I2.3 W2.1 W2.2 W2.3
    """),
    ("zb-h2", 3, 6, 1, """
        rank 0  F0.0 F0.1 F0.2 F0.3 F0.4 I0.0 W0.0 F0.5 I0.1 W0.1 I0.2 W0.2 I0.3 W0.3 I0.4 W0.4 I0.5 W0.5
        rank 1  F1.0 F1.1 F1.2 I1.0 F1.3 I1.1 F1.4 I1.2 W1.0 F1.5 I1.3 W1.1 I1.4 W1.2 I1.5 W1.3 W1.4 W1.5
        rank 2  F2.0 I2.0 F2.1 I2.1 F2.2 I2.2 F2.3 I2.3 F2.4 I2.4 W2.0 F2.5 I2.5 W2.1 W2.2 W2.3 W2.4 W2.5
    """),
    ("zb-v", 2, 4, 2, """
        rank 0  F0.0 F0.1 F0.2 F3.0 I3.0 W3.0 F3.1 I3.1 W3.1 F0.3 I0.0 W0.0 F3.2 I3.2 W3.2 I0.1 W0.1 F3.3 I3.3 W3.3 I0.2 W0.2 I0.3 W0.3
        rank 1  F1.0 F2.0 F1.1 F2.1 I2.0 W2.0 F1.2 I1.0 W1.0 F2.2 I2.1 W2.1 F1.3 I1.1 W1.1 F2.3 I2.2 W2.2 I1.2 I2.3 I1.3 W1.2 W2.3 W1.3
    """),  # noqa: E501 - one line per rank is the point of the picture
    # Each steady-state F directly followed by a B is one of DualPipe's overlapped pairs.
    ("dualpipe-v", 2, 4, 2, """
        rank 0  F0.0 F0.1 F0.2 F3.0 I3.0 W3.0 F3.1 F0.3 B3.1 F3.2 B0.0 B3.2 F3.3 B0.1 B3.3 I0.2 W0.2 I0.3 W0.3
        rank 1  F1.0 F2.0 F1.1 F2.1 F1.2 B2.0 F2.2 B1.0 F1.3 B2.1 F2.3 B1.1 B2.2 B1.2 I2.3 I1.3 W2.3 W1.3
    """),
    ("pipedream", 2, 3, 1, """
        rank 0  F0.0    F0.1    B0.0    STEP0.0 F0.2    B0.1    STEP0.1 B0.2    STEP0.2
        rank 1  F1.0    B1.0    STEP1.0 F1.1    B1.1    STEP1.1 F1.2    B1.2    STEP1.2
    """),
    ("pipedream-2bw", 2, 3, 1, """
        rank 0  F0.0    F0.1    B0.0    F0.2    B0.1    STEP0.0 B0.2    STEP0.1
        rank 1  F1.0    B1.0    F1.1    B1.1    STEP1.0 F1.2    B1.2    STEP1.1
    """),
]


@pytest.mark.parametrize(
    "name,num_ranks,num_microbatches,num_virtual,expected",
    HAND_DRAWN,
    ids=[f"{c[0]}-p{c[1]}-m{c[2]}-v{c[3]}" for c in HAND_DRAWN],
)
def test_hand_drawn(name, num_ranks, num_microbatches, num_virtual, expected):
    schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
    assert render(schedule) == picture(expected)


def golden_cases():
    cases = []
    for name in names():
        virtual = family(name).default_virtual
        for num_ranks, num_microbatches in ((2, 4), (3, 6), (4, 8), (4, 5)):
            cases.append((name, num_ranks, num_microbatches, virtual))
        if name in ("interleaved-1f1b", "looped-bfs"):
            # m = 9 on 4 ranks: 2 rounds of 5, the second padded by one micro-batch.
            cases.append((name, 4, 9, 3))
    return cases


@pytest.mark.parametrize("name,num_ranks,num_microbatches,num_virtual", golden_cases())
def test_golden_file(name, num_ranks, num_microbatches, num_virtual):
    schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)
    path = GOLDEN_DIR / f"{name}-p{num_ranks}-m{num_microbatches}-v{num_virtual}.txt"
    drawn = render(schedule) + "\n"
    if REGENERATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(drawn)
    assert path.exists(), f"{path.name} is missing; regenerate: PIPEFOLD_REGEN_GOLDEN=1 (module docstring)"
    assert drawn == path.read_text(), f"{name} changed; if intended, regenerate {path.name}, review the diff"
