"""Lowering derives communication: sends after producers, receives posted FIFO per peer."""

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.schedule import Action, Op, Schedule, build, lower, names, v_placement
from pipefold.schedule.lower import messages_of


def rows_text(program):
    return ["  ".join(str(a) for a in row) for row in program.instructions]


def test_gpipe_two_ranks_lowered():
    program = lower(build("gpipe", num_ranks=2, num_microbatches=2), lookahead=0)
    assert rows_text(program) == [
        "F0.0  SEND_F0.0  F0.1  SEND_F0.1  RECV_B0.0  B0.0  RECV_B0.1  B0.1",
        "RECV_F1.0  F1.0  RECV_F1.1  F1.1  B1.0  SEND_B1.0  B1.1  SEND_B1.1",
    ]


def test_lookahead_posts_one_action_early():
    program = lower(build("gpipe", num_ranks=2, num_microbatches=2), lookahead=1)
    assert rows_text(program)[1] == "RECV_F1.0  RECV_F1.1  F1.0  F1.1  B1.0  SEND_B1.0  B1.1  SEND_B1.1"


def test_same_rank_handoff_has_no_messages():
    # V placement on one rank: both stages local, nothing to send.
    schedule = Schedule(
        "v1", 1, 2, 1, v_placement(1, 2),
        ((Action.parse("F0.0"), Action.parse("F1.0"), Action.parse("B1.0"), Action.parse("B0.0")),),
    )
    assert lower(schedule).instructions == schedule.actions


def test_fifo_forces_early_post():
    # Rank 1 consumes micro-batch 1's activation before micro-batch 0's; rank 0 sends 0 first.
    rows = (
        tuple(Action.parse(t) for t in ["F0.0", "F0.1", "B0.0", "B0.1"]),
        tuple(Action.parse(t) for t in ["F1.1", "F1.0", "B1.0", "B1.1"]),
    )
    program = lower(Schedule("t", 2, 2, 2, (0, 1), rows), lookahead=0)
    assert rows_text(program)[1].startswith("RECV_F1.0  RECV_F1.1  F1.1")


def _check_fifo(program):
    sent = defaultdict(list)
    posted = defaultdict(list)
    for rank, row in enumerate(program.instructions):
        for action in row:
            if action.op in (Op.SEND_F, Op.SEND_B):
                sent[(rank, program.peer_of(action))].append(action)
            elif action.op in (Op.RECV_F, Op.RECV_B):
                posted[(program.peer_of(action), rank)].append(action)
    assert sent.keys() == posted.keys()
    for pair, sends in sent.items():
        kinds = [
            (Op.RECV_F if s.op is Op.SEND_F else Op.RECV_B,
             s.stage + 1 if s.op is Op.SEND_F else s.stage - 1, s.microbatch)
            for s in sends
        ]
        assert kinds == [(r.op, r.stage, r.microbatch) for r in posted[pair]], pair


def _check_recv_before_consumer(program):
    for row in program.instructions:
        posted = set()
        for action in row:
            if action.op in (Op.RECV_F, Op.RECV_B):
                posted.add((Op.F if action.op is Op.RECV_F else Op.B, action.stage, action.microbatch))
            elif action.op is Op.F and any(
                a.op is Op.RECV_F and a.stage == action.stage and a.microbatch == action.microbatch
                for r in program.instructions for a in r
            ):
                assert (Op.F, action.stage, action.microbatch) in posted, action


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(names()),
    num_ranks=st.integers(1, 6),
    num_microbatches=st.integers(1, 12),
    num_virtual=st.integers(1, 3),
    lookahead=st.integers(0, 3),
)
def test_every_family_lowers_fifo_consistently(name, num_ranks, num_microbatches, num_virtual, lookahead):
    try:
        schedule = build(
            name, num_ranks=num_ranks, num_microbatches=num_microbatches, num_virtual=num_virtual
        )
    except ScheduleError:
        return  # illegal combination for this family; families' own tests cover the refusal
    program = lower(schedule, lookahead=lookahead)
    _check_fifo(program)
    _check_recv_before_consumer(program)
    compute = [tuple(a for a in row if a.op.is_compute) for row in program.instructions]
    assert tuple(compute) == schedule.actions
    assert len(messages_of(schedule)) == sum(
        1 for row in program.instructions for a in row if a.op in (Op.SEND_F, Op.SEND_B)
    )


def test_fusion_keeps_early_gradients_and_fuses_the_rest():
    from pipefold.schedule import validate
    from pipefold.schedule.lower import fuse_adjacent_split_backward

    fused = fuse_adjacent_split_backward(build("zb-h1", num_ranks=2, num_microbatches=4))
    validate(fused)
    assert [" ".join(map(str, row)) for row in fused.actions] == [
        # stage 0 sends no input gradient: its adjacent I/W pairs become B
        "F0.0 F0.1 B0.0 F0.2 B0.1 F0.3 B0.2 B0.3",
        # stage 1's I ships the gradient rank 0 waits for: kept split
        "F1.0 I1.0 F1.1 I1.1 W1.0 F1.2 I1.2 W1.1 F1.3 I1.3 W1.2 W1.3",
    ]


def test_fusion_leaves_schedules_without_pairs_alone():
    from pipefold.schedule.lower import fuse_adjacent_split_backward

    schedule = build("1f1b", num_ranks=3, num_microbatches=5)
    assert fuse_adjacent_split_backward(schedule) is schedule


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["zb-h1", "zb-h2", "zb-v", "v-half", "v-min", "dualpipe-v"]),
       num_ranks=st.integers(1, 6), num_microbatches=st.integers(1, 12))
def test_fusion_stays_valid_and_only_merges_local_pairs(name, num_ranks, num_microbatches):
    from pipefold.schedule import validate
    from pipefold.schedule.lower import fuse_adjacent_split_backward

    schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches)
    fused = fuse_adjacent_split_backward(schedule)
    validate(fused)
    for row in fused.actions:
        for action in row:
            if action.op is Op.B and Action(Op.I, action.stage, action.microbatch) in {
                a for r in schedule.actions for a in r
            }:
                assert action.stage == 0 or (
                    schedule.rank_of(action.stage - 1) == schedule.rank_of(action.stage)
                )
