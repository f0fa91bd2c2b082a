"""The pipeline call's peak as the CPU allocator showed it (docs/plan.md, "Against the CPU
allocator"): gradients only from a rank's first backward on, the backward's temporaries beside
the activations, and the receive buffers the CPU runtime keeps between steps."""

import json

import pytest

from pipefold.plan.costs import LayerCost, ModelCosts
from pipefold.plan.estimate import GptEstimate
from pipefold.plan.evaluate import evaluate
from pipefold.plan.hardware import load_hardware
from pipefold.plan.memory import RankMemory, kept_receive_bytes, memory_of_peaks
from pipefold.plan.space import Config
from pipefold.plan.stages import StageLayout, backward_temporaries, stage_cost_model, transient_bytes
from pipefold.schedule import build
from pipefold.simulate import CostModel, Link, simulate
from pipefold.simulate.compiled import CompiledSchedule
from pipefold.simulate.memory import later_activation_bytes_peak


def _model(temporaries: tuple[int, ...] = ()) -> CostModel:
    return CostModel.from_lists([1.0, 1.0], [1.0, 1.0], [1.0, 1.0], activation_bytes=[100, 50],
                                weight_bytes=[1000, 1000], message_bytes=[10],
                                backward_temporary_bytes=temporaries)


def test_gradients_count_only_beside_the_activations_held_from_the_first_backward_on() -> None:
    costs = ModelCosts(layers=(LayerCost(1.0, 1.0, 0, 0),))
    # Rank 0 peaks at 400 before its first backward, holds 150 at most after it; rank 1 holds 300 after.
    memory = memory_of_peaks(costs, _model(), (1000, 1000), (400, 300), (0, 1), (0, 0),
                             later_peaks=(150, 300))
    assert memory[0].held_activations == max(400, 150 + 1000)
    assert memory[0].pipeline_total == 1000 + 2000 + 1150
    assert memory[1].held_activations == 300 + 1000
    big = memory_of_peaks(costs, _model(), (1000, 1000), (4000, 300), (0, 1), (0, 0), later_peaks=(150, 300))
    assert big[0].held_activations == 4000  # the first backward's peak, before any gradient exists
    # Without later peaks (plans written before them): the gradients beside the whole peak.
    old = memory_of_peaks(costs, _model(), (1000, 1000), (400, 300), (0, 1), (0, 0))
    assert [rank.pipeline_total for rank in old] == [1000 + 1000 + 2000 + 400, 1000 + 1000 + 2000 + 300]
    assert RankMemory.from_json(old[0].to_json()) == old[0]
    assert RankMemory.from_json(memory[0].to_json()) == memory[0]


def test_a_gpipe_rank_peaks_before_its_gradients_and_a_1f1b_rank_after() -> None:
    model = _model()
    gpipe = simulate(build("gpipe", num_ranks=2, num_microbatches=4), model)
    # GPipe: all four forwards before the first backward; after it, three micro-batches at most.
    assert gpipe.activation_bytes_peak == (400, 200)
    assert later_activation_bytes_peak(gpipe, model) == (300, 150)
    onef = CompiledSchedule(build("1f1b", num_ranks=2, num_microbatches=4)).run(model)
    assert (onef.activation_peaks, onef.later_peaks) == ((200, 50), (200, 50))


def test_a_rank_adds_its_stages_largest_backward_temporary_beyond_the_rebuilt_layer() -> None:
    costs = ModelCosts(layers=(LayerCost(1.0, 1.0, 0, 0),))
    model = _model((70, 300))
    memory = memory_of_peaks(costs, model, (1000, 1000), (100, 50), (0, 0), (0, 0))  # one rank, both stages
    assert memory[0].temporary == 300
    # A recomputed stage's temporary counts its rebuilt layer, which `recompute` holds already.
    rebuilt = memory_of_peaks(costs, model, (1000, 1000), (100, 50), (0, 1), (20, 250))
    assert (rebuilt[0].temporary, rebuilt[1].temporary) == (50, 50)
    assert rebuilt[1].pipeline_total == 1000 + 1000 + 2000 + 50 + 250 + 50


def test_a_stages_temporary_is_its_backwards_largest_moment() -> None:
    layers = (LayerCost(1.0, 1.0, activation_bytes=10, output_bytes=4, backward_temporary_bytes=5),
              LayerCost(1.0, 1.0, activation_bytes=20, output_bytes=6, backward_temporary_bytes=50,
                        backward_temporary_fixed_bytes=30))
    costs = ModelCosts(layers=layers, input_bytes=2, loss_bytes=7, loss_backward_bytes=30)
    one_row = StageLayout((0, 2), 1)
    # Layer 1 (last): its 50 while the loss's 7 saved bytes are freed; layer 0: 5 - 27; the loss: 30.
    assert backward_temporaries(costs, one_row) == [50 - 7]
    # Recomputed: layer 1 rebuilds its 20 beside its temporaries; layer 0 its 10 once layer 1's
    # kept input (4) and the loss's are freed.
    assert backward_temporaries(costs, one_row, recompute=(0,)) == [max(50 + 20 - 7, 5 + 10 - 7 - 4, 30)]
    # At two rows the weight-gradient part (30) does not double; a stage before the last has no loss.
    assert layers[1].backward_temporary_at(2.0) == 30 + 2 * 20
    assert backward_temporaries(costs, StageLayout((0, 1, 2), 2)) == [10, max(70 - 14, 60)]
    model = stage_cost_model(costs, StageLayout((0, 1, 2), 2), (), Link())
    assert model.backward_temporary_bytes == (10, 60)
    # Costs without temporaries (files written before them) price none.
    plain = ModelCosts(layers=tuple(LayerCost(1.0, 1.0, 10, 4) for _ in range(2)))
    assert backward_temporaries(plain, one_row) == []
    # The loss's alone (costs that measured no layer's): on the stage that ends the model.
    loss_only = ModelCosts(layers=plain.layers, loss_bytes=7, loss_backward_bytes=30)
    two = StageLayout((0, 1, 2), 2)
    assert backward_temporaries(loss_only, two) == [0, 60]
    assert backward_temporaries(loss_only, two, recompute=(1,)) == [0, 60]
    # A recomputed stage's moment is then its rebuilt layer (20 at two rows), less what was freed,
    # which the rank's recompute transient holds already: the rank adds nothing beyond it.
    assert backward_temporaries(loss_only, two, recompute=(0, 1)) == [20, 60]
    transient = transient_bytes(loss_only, two, (0, 1), (0, 1), 2)
    assert transient == (20, 20)
    model = stage_cost_model(loss_only, two, (0, 1), Link())
    memory = memory_of_peaks(loss_only, model, (0, 0), (8, 8), (0, 1), transient)
    assert [rank.temporary for rank in memory] == [0, 60 - 20]


def test_the_estimate_prices_the_losss_two_logits_and_cpu_receive_buffers() -> None:
    for preset, keeps in (("cpu", True), ("a100-80gb", False)):
        estimate = GptEstimate(num_layers=2, d_model=64, num_heads=4, seq_len=32, vocab_size=256,
                               hardware=load_hardware(preset))
        costs = estimate.at(4, 1, Link(), False)
        assert costs.loss_backward_bytes == 2 * 4 * 32 * 256 * 4  # fp32 gradients of two logits tensors
        assert costs.keeps_receive_buffers is keeps


def test_the_cpu_runtimes_kept_receive_buffers_beyond_the_activations_in_flight() -> None:
    model = _model()  # a boundary of 10 bytes between rank 0 (stage 0) and rank 1 (stage 1: 50 a micro-batch)
    # Rank 0 keeps every micro-batch's gradient buffer; rank 1 its activation buffers but those in flight.
    assert kept_receive_bytes(model, (0, 1), 2, 4, held=(400, 100)) == [40, 20]
    assert kept_receive_bytes(model, (0, 1), 2, 4, held=(400, 200)) == [40, 0]
    assert kept_receive_bytes(model, (0, 0), 1, 4, held=(150,)) == [0]  # within one rank: none received
    cpu = ModelCosts(layers=(LayerCost(1.0, 1.0, 0, 0),), keeps_receive_buffers=True)
    memory = memory_of_peaks(cpu, model, (1000, 1000), (400, 200), (0, 1), (0, 0), (300, 100),
                             num_microbatches=4)
    assert [rank.received for rank in memory] == [40, 20]
    cuda = ModelCosts(layers=(LayerCost(1.0, 1.0, 0, 0),))
    assert [rank.received for rank in memory_of_peaks(cuda, model, (1000, 1000), (400, 200), (0, 1), (0, 0),
                                                      (300, 100), num_microbatches=4)] == [0, 0]


def test_new_cost_fields_round_trip_and_old_files_write_as_before() -> None:
    layers = (LayerCost(1.0, 1.0, 10, 4, backward_temporary_bytes=9, backward_temporary_fixed_bytes=3),)
    costs = ModelCosts(layers=layers, loss_backward_bytes=8, keeps_receive_buffers=True)
    assert ModelCosts.from_json(json.loads(json.dumps(costs.to_json()))) == costs
    old = ModelCosts(layers=(LayerCost(1.0, 1.0, 10, 4),)).to_json()
    assert not {"loss_backward_bytes", "keeps_receive_buffers"} & set(old)
    assert "backward_temporary_bytes" not in old["layers"][0]
    with pytest.raises(Exception, match="keeps_receive_buffers"):
        ModelCosts(layers=layers, keeps_receive_buffers=1)  # type: ignore[arg-type]


def test_evaluate_prices_gpipe_without_gradients_at_its_first_backward() -> None:
    layers = tuple(LayerCost(1.0, 1.0, activation_bytes=1000, output_bytes=10, parameter_bytes=100)
                   for _ in range(4))
    costs = ModelCosts(layers=layers)
    config = Config("gpipe", 1, 4, 1)
    candidate = evaluate(costs, config, num_ranks=2, bounds=(0, 2, 4), recompute=(), link=Link())
    for rank in candidate.memory:
        # Four micro-batches of 2000 before the first backward, three after it, beside 200 of gradients.
        assert (rank.activations, rank.later_activations) == (8000, 6000)
        assert rank.pipeline_total == rank.weights + rank.optimizer + 8000


def test_the_later_peaks_of_huge_bytes_take_pythons_integers_alike() -> None:
    # Bytes whose sums could overflow 64 bits: the compiled schedule counts them one action at a time.
    huge = 2**61
    model = CostModel.from_lists([1.0, 1.5], [1.0, 1.2], [0.5, 0.7], activation_bytes=[3 * huge, huge],
                                 weight_grad_bytes=[huge, 2 * huge])
    for name in ("gpipe", "1f1b", "zb-h1"):
        schedule = build(name, num_ranks=2, num_microbatches=4)
        run = CompiledSchedule(schedule).run(model)
        timeline = simulate(schedule, model)
        assert run.activation_peaks == timeline.activation_bytes_peak
        assert run.later_peaks == later_activation_bytes_peak(timeline, model)


def test_a_first_backward_that_releases_nothing_starts_the_later_peak() -> None:
    # Interleaved 1F1B, 2 ranks, v=2: rank 0's first backward is B2.0, and stage 2 keeps nothing,
    # so it releases 0 bytes. The gradients exist from its end on, and rank 0 then runs F0.3 while
    # holding three of stage 0's micro-batches: 400 bytes after its first backward, not the 300
    # left once stage 0's first release comes.
    schedule = build("interleaved-1f1b", num_ranks=2, num_microbatches=4, num_virtual=2)
    costs = CostModel.from_lists([1.0] * 4, [1.0] * 4, [1.0] * 4, b=[2.0] * 4,
                                 activation_bytes=[100, 10, 0, 1], weight_grad_bytes=[0] * 4)
    timeline = simulate(schedule, costs)
    assert later_activation_bytes_peak(timeline, costs) == (400, 30)
    assert CompiledSchedule(schedule).run(costs).later_peaks == (400, 30)
