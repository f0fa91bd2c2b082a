"""Property: the memory-aware lower bound (`pipefold.plan.held`) never exceeds the simulated step of
any family order, under any recomputed stages, on ranks whose activation peak fits the headroom
the bound was given; so pruning by it never drops a configuration that could have fit and won."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipefold.errors import ScheduleError
from pipefold.plan.held import held_terms
from pipefold.schedule import build, names
from pipefold.simulate import CostModel, Link, simulate

times = st.floats(0.0, 4.0)


def _model(f, i, w, b, kept, messages, link):
    return CostModel.from_lists(f, i, w, b=b, activation_bytes=kept, weight_grad_bytes=kept,
                                message_bytes=messages, link=link)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(names()),
    p=st.integers(1, 4),
    m=st.integers(1, 10),
    v=st.integers(1, 3),
    data=st.data(),
)
def test_held_bound_holds_for_every_recompute_choice_that_fits(name, p, m, v, data):
    try:
        schedule = build(name, num_ranks=p, num_microbatches=m, num_virtual=v)
    except ScheduleError:
        return
    n = schedule.num_stages
    per_stage = st.lists(times, min_size=n, max_size=n)
    f, i, w = data.draw(per_stage), data.draw(per_stage), data.draw(per_stage)
    b = [x + y for x, y in zip(i, w, strict=True)]
    full = data.draw(st.lists(st.integers(0, 1000), min_size=n, max_size=n))
    lean = [data.draw(st.integers(0, kept)) for kept in full]
    messages = data.draw(st.lists(st.integers(0, 1000), min_size=n - 1, max_size=n - 1))
    link = Link(latency=data.draw(st.floats(0.0, 1.0)), bandwidth=data.draw(st.floats(100.0, 1e4)))
    plain = _model(f, i, w, b, full, messages, link)
    recomputed = _model(f, [x + y for x, y in zip(i, f, strict=True)],
                        [x + y for x, y in zip(w, f, strict=True)],
                        [x + y for x, y in zip(b, f, strict=True)], lean, messages, link)
    subset = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    chosen = CostModel.from_lists(
        [plain.f[s] for s in range(n)],
        *([getattr(recomputed if subset[s] else plain, name)[s] for s in range(n)] for name in ("i", "w")),
        b=[(recomputed if subset[s] else plain).b[s] for s in range(n)],
        activation_bytes=[(lean if subset[s] else full)[s] for s in range(n)],
        weight_grad_bytes=[(lean if subset[s] else full)[s] for s in range(n)],
        message_bytes=messages, link=link,
    )
    timeline = simulate(schedule, chosen)
    # The rank fits exactly, or with room to spare.
    slack = data.draw(st.floats(1.0, 3.0))
    headroom = [max(peak, 1) * slack for peak in timeline.activation_bytes_peak]
    allowed = ["auto"] + (["none"] if not any(subset) else []) + (["full"] if all(subset) else [])
    for choice in allowed:
        bound = held_terms(plain, recomputed, schedule.placement, headroom, choice).at(m)
        assert bound <= timeline.makespan * (1 + 1e-9) + 1e-9, (choice, bound, timeline.makespan)


def test_held_bound_grows_with_micro_batches_that_do_not_fit():
    # 1f1b on 4 equal stages, 1 s per F and per B: rank 0 holds 4 micro-batches of 100 bytes at the
    # peak. With room for one, Little's law: each micro-batch is held 6 s (the round trip through 3
    # stages), so 8 micro-batches need 8 * 100 * 6 / 100 = 48 s; the step itself is (8 + 3) * 2 = 22 s.
    schedule = build("1f1b", num_ranks=4, num_microbatches=8)
    plain = CostModel.from_lists([1.0] * 4, [1.0] * 4, [0.0] * 4, b=[1.0] * 4, activation_bytes=[100] * 4,
                                 weight_grad_bytes=[100] * 4)
    roomy = held_terms(plain, plain, schedule.placement, [400.0] * 4, "none").at(8)
    tight = held_terms(plain, plain, schedule.placement, [100.0] * 4, "none").at(8)
    assert roomy <= simulate(schedule, plain).makespan == 22.0
    assert tight == 48.0
