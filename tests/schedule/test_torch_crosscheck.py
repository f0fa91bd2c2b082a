"""Our generators against torch.distributed.pipelining's, through the CSV bridge.

torch's schedule classes compute their `pipeline_order` (rank -> compute actions,
None for an idle step) in the constructor from stage counts alone, so they are
built here with lightweight stand-ins for `PipelineStage`: no process group, no
model. Multi-stage schedules are dumped with torch's own `_dump_csv(...,
format="compute_only")` and read back with `from_torch_csv`; the single-stage
ones (GPipe, 1F1B) have no `_dump_csv`, so their order is written the same way
(one csv row per rank) after dropping torch's REDUCE_GRAD bookkeeping, which is
not a compute action. The other direction, our CSV loaded by torch's
`_load_csv`, runs torch's own validator and lowering on our schedules.
"""

import csv
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
schedules = pytest.importorskip("torch.distributed.pipelining.schedules")

from pipefold.schedule import build, names  # noqa: E402
from pipefold.schedule.io import from_torch_csv, to_torch_csv  # noqa: E402

CASES = [(2, 4), (2, 8), (4, 4), (4, 8)]


def fake_stages(num_ranks, stage_indices, num_stages):
    """What the schedule constructors read from a PipelineStage, for rank 0."""
    return [
        SimpleNamespace(
            num_stages=num_stages,
            group_size=num_ranks,
            group_rank=0,
            stage_index=index,
            is_first=index == 0,
            is_last=index == num_stages - 1,
            submod=torch.nn.Identity(),  # checked for torch.compile compatibility only
        )
        for index in stage_indices
    ]


def loop_stages(num_ranks, num_virtual):
    return fake_stages(num_ranks, range(0, num_ranks * num_virtual, num_ranks), num_ranks * num_virtual)


def v_stages(num_ranks):
    return fake_stages(num_ranks, (0, 2 * num_ranks - 1), 2 * num_ranks)


def dump_multi(schedule_object, tmp_path):
    path = tmp_path / "torch.csv"
    schedule_object._dump_csv(str(path), format="compute_only")
    return path.read_text()


def dump_single(schedule_object, tmp_path):
    path = tmp_path / "torch.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        for rank in sorted(schedule_object.pipeline_order):
            writer.writerow(
                a for a in schedule_object.pipeline_order[rank] if a is None or a.is_compute_op
            )
    return path.read_text()


def ours(name, num_ranks, num_microbatches, num_virtual=None):
    return build(name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual)


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES)
def test_gpipe_matches(num_ranks, num_microbatches, tmp_path):
    theirs = schedules.ScheduleGPipe(fake_stages(num_ranks, [0], num_ranks)[0], num_microbatches)
    text = dump_single(theirs, tmp_path)
    assert from_torch_csv(text).actions == ours("gpipe", num_ranks, num_microbatches).actions


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES)
def test_1f1b_matches_except_torchs_last_rank_numbering(num_ranks, num_microbatches, tmp_path):
    theirs = schedules.Schedule1F1B(fake_stages(num_ranks, [0], num_ranks)[0], num_microbatches)
    mine = ours("1f1b", num_ranks, num_microbatches)
    rows = {
        rank: [str(a) for a in order if a is not None and a.is_compute_op]
        for rank, order in theirs.pipeline_order.items()
    }
    for rank in range(num_ranks - 1):
        assert rows[rank] == to_torch_csv(mine).splitlines()[rank].split(",")
    # The documented difference (PEERS.md): torch's drawing data numbers the last
    # rank's forwards 1..m instead of 0..m-1. Its runtime does not use this list;
    # its own validator rejects it, and accepts ours, so ours is the right one.
    last = num_ranks - 1
    forwards = [int(cell.split("F")[1]) for cell in rows[last] if "F" in cell]
    assert forwards == list(range(1, num_microbatches + 1))
    with pytest.raises(AssertionError):
        schedules._validate_schedule(theirs.pipeline_order, num_ranks, num_ranks, num_microbatches)
    our_order = {
        rank: [schedules._Action.from_str(cell) for cell in line.split(",")]
        for rank, line in enumerate(to_torch_csv(mine).splitlines())
    }
    schedules._validate_schedule(our_order, num_ranks, num_ranks, num_microbatches)


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES)
def test_interleaved_1f1b_matches(num_ranks, num_microbatches, tmp_path):
    theirs = schedules.ScheduleInterleaved1F1B(loop_stages(num_ranks, 2), num_microbatches)
    text = dump_multi(theirs, tmp_path)
    assert from_torch_csv(text).actions == ours("interleaved-1f1b", num_ranks, num_microbatches, 2).actions


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES)
@pytest.mark.parametrize("num_virtual", [1, 2, 3])
def test_looped_bfs_matches(num_ranks, num_microbatches, num_virtual, tmp_path):
    theirs = schedules.ScheduleLoopedBFS(loop_stages(num_ranks, num_virtual), num_microbatches)
    text = dump_multi(theirs, tmp_path)
    mine = ours("looped-bfs", num_ranks, num_microbatches, num_virtual)
    assert from_torch_csv(text).actions == mine.actions


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES)
def test_zb_h1_matches_torchs_zb1p_with_one_stage_per_rank(num_ranks, num_microbatches, tmp_path):
    theirs = schedules.ScheduleInterleavedZeroBubble(loop_stages(num_ranks, 1), num_microbatches)
    text = dump_multi(theirs, tmp_path)
    assert from_torch_csv(text).actions == ours("zb-h1", num_ranks, num_microbatches).actions


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES)
def test_zb_h2_is_zb1p_with_the_longer_warmup(num_ranks, num_microbatches, tmp_path):
    # torch has no ZB-H2. Its ZB1P is ZB-H1 (above); ZB-H2 differs by design: rank r
    # runs 2(p-1-r)+1 forwards before its first input gradient instead of p-r,
    # which is what removes the steady-state bubble (Qi et al., 2023, fig. 4).
    theirs = schedules.ScheduleInterleavedZeroBubble(loop_stages(num_ranks, 1), num_microbatches)
    zb1p = from_torch_csv(dump_multi(theirs, tmp_path))
    mine = ours("zb-h2", num_ranks, num_microbatches)

    def leading_forwards(row):
        count = 0
        while count < len(row) and row[count].op.value == "F":
            count += 1
        return count

    for rank in range(num_ranks):
        assert leading_forwards(zb1p.actions[rank]) == min(num_ranks - rank, num_microbatches)
        assert leading_forwards(mine.actions[rank]) == min(2 * (num_ranks - 1 - rank) + 1, num_microbatches)
        assert sorted(map(str, mine.actions[rank])) == sorted(map(str, zb1p.actions[rank]))


@pytest.mark.parametrize("num_ranks,num_microbatches", CASES + [(4, 2)])
def test_zb_v_matches(num_ranks, num_microbatches, tmp_path):
    theirs = schedules.ScheduleZBVZeroBubble(v_stages(num_ranks), num_microbatches)
    text = dump_multi(theirs, tmp_path)
    assert from_torch_csv(text).actions == ours("zb-v", num_ranks, num_microbatches).actions


@pytest.mark.parametrize("num_ranks,num_microbatches", [(2, 4), (2, 8), (4, 8)])
def test_dualpipe_v_matches_with_overlapped_pairs_expanded(num_ranks, num_microbatches, tmp_path):
    theirs = schedules.ScheduleDualPipeV(v_stages(num_ranks), num_microbatches)
    text = dump_multi(theirs, tmp_path)
    assert "OVERLAP_F_B" in text
    assert from_torch_csv(text).actions == ours("dualpipe-v", num_ranks, num_microbatches).actions


def test_dualpipe_v_below_2p_microbatches_where_torch_refuses():
    with pytest.raises(ValueError, match="at least as many microbatches as stages"):
        schedules.ScheduleDualPipeV(v_stages(4), 4)
    # Ours pads to 2p and drops the extra micro-batches; build() has validated it.
    assert ours("dualpipe-v", 4, 4).num_microbatches == 4


def test_1f1b_below_p_microbatches():
    # torch's 1F1B needs m >= p to run; ours cuts the warm-up and stays valid.
    schedule = ours("1f1b", 4, 2)
    assert [len(row) for row in schedule.actions] == [4, 4, 4, 4]


@pytest.mark.parametrize("name", [n for n in names() if n not in ("pipedream", "pipedream-2bw")])
def test_torch_loads_and_lowers_our_csv(name, tmp_path):
    mine = build(name, num_ranks=2, num_microbatches=4)
    path = tmp_path / f"{name}.csv"
    path.write_text(to_torch_csv(mine))
    runtime = schedules._PipelineScheduleRuntime(
        fake_stages(2, [mine.stages_of(0)[i] for i in range(mine.num_virtual)], mine.num_stages), 4
    )
    runtime._load_csv(str(path), format="compute_only")  # runs torch's validator and lowering
    loaded = {rank: [str(a) for a in order] for rank, order in runtime.pipeline_order.items()}
    assert loaded == {rank: line.split(",") for rank, line in enumerate(to_torch_csv(mine).splitlines())}
    assert runtime.pipeline_order_with_comms is not None
