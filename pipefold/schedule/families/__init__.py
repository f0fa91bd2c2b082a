"""One module per schedule family, each defining `FAMILY`; `FAMILIES` lists them in registry order."""

from pipefold.schedule.families import (
    dualpipe_v,
    gpipe,
    interleaved_1f1b,
    looped_bfs,
    naive,
    one_f_one_b,
    pipedream,
    pipedream_2bw,
    v_half,
    v_min,
    zb_h1,
    zb_h2,
    zb_v,
)
from pipefold.schedule.family import Family

__all__ = ["FAMILIES"]

FAMILIES: tuple[Family, ...] = (
    naive.FAMILY,
    gpipe.FAMILY,
    one_f_one_b.FAMILY,
    interleaved_1f1b.FAMILY,
    looped_bfs.FAMILY,
    zb_h1.FAMILY,
    zb_h2.FAMILY,
    zb_v.FAMILY,
    v_half.FAMILY,
    v_min.FAMILY,
    dualpipe_v.FAMILY,
    pipedream.FAMILY,
    pipedream_2bw.FAMILY,
)
"""Every built-in family in the order `names()` reports them: simplest first."""
