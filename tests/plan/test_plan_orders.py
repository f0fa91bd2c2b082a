"""The cached held counts of a family order give the activation peaks the compiled schedule reads
from the same order, under any per-stage bytes (so the planner reads memory without compiling)."""

import random

from pipefold.errors import ScheduleError
from pipefold.plan.orders import compiled_family, order_peaks, order_peaks_and_later
from pipefold.schedule import build, names
from pipefold.schedule.ir import WeightUpdate
from pipefold.simulate import CostModel


def test_order_peaks_equal_the_compiled_order_peaks_for_every_flush_family():
    rng = random.Random(0)
    checked = 0
    for name in names():
        for p, m, v in [(1, 3, 1), (2, 2, 2), (3, 5, 1), (4, 8, 2), (4, 8, 3), (2, 7, 1)]:
            try:
                schedule = build(name, num_ranks=p, num_microbatches=m, num_virtual=v)
            except ScheduleError:
                continue
            if schedule.weight_update is not WeightUpdate.FLUSH:
                continue
            n = schedule.num_stages

            def draw() -> list[float]:
                return [rng.uniform(0.1, 2.0) for _ in range(n)]  # noqa: B023

            costs = CostModel.from_lists(
                draw(), draw(), draw(), activation_bytes=[rng.randint(0, 1000) for _ in range(n)],
                weight_grad_bytes=[rng.randint(0, 1000) for _ in range(n)],
            )
            assert (order_peaks(name, p, m, v, costs)
                    == compiled_family(name, p, m, v).order_activation_peaks(costs))
            assert (order_peaks_and_later(name, p, m, v, costs)
                    == compiled_family(name, p, m, v).order_peaks_and_later(costs))
            checked += 1
    assert checked > 30


def test_order_peaks_say_none_where_a_duration_vanishes():
    costs = CostModel.from_lists([1.0, 0.0], [1.0, 1.0], [1.0, 1.0], activation_bytes=[1, 1],
                                 weight_grad_bytes=[1, 1])
    assert order_peaks("1f1b", 2, 4, 1, costs) is None
