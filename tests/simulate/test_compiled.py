"""`CompiledSchedule.run` equals `simulate` (makespan and activation peaks) on every family, with
random heterogeneous costs, links, overheads, priced sends and zero-length actions; the order-only peaks equal
the timed ones wherever they are given."""

from __future__ import annotations

import random

import pytest

from pipefold.schedule import build, names
from pipefold.schedule.registry import family
from pipefold.simulate import CostModel, Link, simulate
from pipefold.simulate.compiled import CompiledSchedule
from pipefold.simulate.memory import later_activation_bytes_peak


def _random_costs(rng: random.Random, num_stages: int, num_ranks: int, zeros: bool) -> CostModel:
    def time() -> float:
        if zeros and rng.random() < 0.3:
            return 0.0
        return rng.uniform(0.1, 2.0)

    far = Link(rng.uniform(0, 0.5), rng.uniform(1e3, 1e5))
    # Priced sends from a generator of their own: the other costs stay the draws they were.
    sends = random.Random(f"sends {num_stages} {num_ranks} {zeros}")
    overrides = {(0, num_ranks - 1): far} if num_ranks > 1 else {}
    return CostModel.from_lists(
        [time() for _ in range(num_stages)], [time() for _ in range(num_stages)],
        [time() for _ in range(num_stages)],
        b=[time() for _ in range(num_stages)],
        activation_bytes=[rng.randrange(0, 1000) for _ in range(num_stages)],
        weight_grad_bytes=[rng.randrange(0, 500) for _ in range(num_stages)],
        message_bytes=[rng.randrange(0, 10_000) for _ in range(num_stages - 1)],
        link=Link(rng.uniform(0, 0.2), rng.uniform(1e3, 1e6)),
        link_overrides=overrides,
        action_overhead=rng.choice([0.0, 0.01]),
        send_overhead=sends.choice([0.0, 0.02]),
        send_seconds_per_byte=sends.choice([0.0, 1e-5]),
    )


@pytest.mark.parametrize("name", names())
def test_compiled_run_equals_simulate(name: str) -> None:
    rng = random.Random(name)
    entry = family(name)
    checked = 0
    for num_ranks in (1, 2, 3, 4):
        for num_microbatches in (1, 3, 4, 8):
            num_virtual = entry.default_virtual
            try:
                schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                                 num_virtual=num_virtual)
            except Exception:
                continue  # not a legal size for this family
            compiled = CompiledSchedule(schedule)
            for zeros in (False, True):
                costs = _random_costs(rng, schedule.num_stages, num_ranks, zeros)
                timeline = simulate(schedule, costs)
                run = compiled.run(costs)
                assert run.makespan == timeline.makespan
                assert run.activation_peaks == timeline.activation_bytes_peak
                # The most held from each rank's first backward on (its gradients exist from there).
                later = later_activation_bytes_peak(timeline, costs)
                peaks = timeline.activation_bytes_peak
                assert all(after <= peak for after, peak in zip(later, peaks, strict=True))
                assert run.later_peaks == later
                assert run.bubble_fraction(num_ranks) == pytest.approx(timeline.bubble_fraction, abs=1e-12)
                order = compiled.order_activation_peaks(costs)
                if not zeros:
                    assert order is not None
                if order is not None:
                    assert order == timeline.activation_bytes_peak
                    both = compiled.order_peaks_and_later(costs)
                    assert both is not None and both == (run.activation_peaks, run.later_peaks)
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", names())
def test_level_by_level_equals_one_at_a_time(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The level-by-level timing (used where levels are wide) gives the floats the one-action-at-a-time
    timing gives, and both equal `simulate`: forced either way on small and 16-rank schedules."""
    import pipefold.simulate.compiled as compiled_module

    rng = random.Random(f"levels {name}")
    entry = family(name)
    checked = 0
    for num_ranks, num_microbatches in ((2, 4), (3, 5), (16, 32)):
        try:
            schedule = build(name, num_ranks=num_ranks, num_microbatches=num_microbatches,
                             num_virtual=entry.default_virtual)
        except Exception:
            continue  # not a legal size for this family
        monkeypatch.setattr(compiled_module, "_MIN_PER_LEVEL", 1)
        by_level = CompiledSchedule(schedule)
        monkeypatch.setattr(compiled_module, "_MIN_PER_LEVEL", 10**9)
        in_order = CompiledSchedule(schedule)
        assert by_level._levels is not None and in_order._levels is None
        for zeros in (False, True):
            costs = _random_costs(rng, schedule.num_stages, num_ranks, zeros)
            run = by_level.run(costs)
            assert run == in_order.run(costs)
            if num_ranks * num_microbatches <= 32:
                timeline = simulate(schedule, costs)
                assert run.makespan == timeline.makespan
                assert run.activation_peaks == timeline.activation_bytes_peak
                # The most held from each rank's first backward on (its gradients exist from there).
                later = later_activation_bytes_peak(timeline, costs)
                peaks = timeline.activation_bytes_peak
                assert all(after <= peak for after, peak in zip(later, peaks, strict=True))
                assert run.later_peaks == later
            checked += 1
    assert checked > 0


def test_deadlock_is_named_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipefold.simulate.compiled as compiled_module
    from pipefold.errors import ScheduleError
    from pipefold.schedule.ir import Action, Op, Schedule

    # Rank 0 waits for the gradient rank 1 sends only after rank 0's second forward, which is later.
    f0, f1 = Action(Op.F, 0, 0), Action(Op.F, 1, 0)
    schedule = Schedule("stuck", 2, 2, 1, (0, 1),
                        ((f0, Action(Op.B, 0, 0), Action(Op.F, 0, 1)),
                         (Action(Op.F, 1, 1), f1, Action(Op.B, 1, 0), Action(Op.B, 1, 1))))
    messages = []
    for least in (1, 10**9):
        monkeypatch.setattr(compiled_module, "_MIN_PER_LEVEL", least)
        with pytest.raises(ScheduleError, match="deadlocked") as error:
            CompiledSchedule(schedule)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_sequential_orders_take_the_microbatch_order() -> None:
    """naive's order is a topological order sorted by micro-batch (no walk), and times as `simulate`;
    1F1B's is not (a forward of the next micro-batch precedes a backward), so the walk orders it."""
    import numpy as np

    from pipefold.simulate.compiled import rows_of

    rng = random.Random(11)
    for name, expected in (("naive", True), ("1f1b", False)):
        schedule = build(name, num_ranks=4, num_microbatches=6)
        compiled = CompiledSchedule(schedule)
        microbatches = np.concatenate([np.asarray(row[2], dtype=np.int64) for row in rows_of(schedule)])
        assert (compiled._by_microbatch(microbatches) is not None) == expected
        costs = _random_costs(rng, schedule.num_stages, 4, zeros=False)
        run, timeline = compiled.run(costs), simulate(schedule, costs)
        assert (run.makespan, run.activation_peaks) == (timeline.makespan, timeline.activation_bytes_peak)
