"""`profile(..., precision=)`: layers measured as the runtime's stages run them in 16 bits, and the
planner's memory in that precision (one process)."""

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipefold.errors import ConfigError
from pipefold.model import LayerSpec, build_reference
from pipefold.model.zoo import gpt_layers, gpt_loss
from pipefold.plan import ModelCosts, gpt_costs
from pipefold.plan.evaluate import evaluate
from pipefold.plan.space import Config
from pipefold.runtime import profile
from pipefold.runtime.memory import ActivationCounter
from pipefold.runtime.stage import Stage, held_casts
from pipefold.simulate import Link

ROWS, IN, OUT = 8, 24, 40


def _linear(precision):
    # A layer after it, so the linear's output is a boundary a stage sends (the last one's feeds the loss).
    layers = [LayerSpec(nn.Linear, IN, OUT), LayerSpec(nn.ReLU)]
    return profile(layers, torch.randn(ROWS, IN), num_repeats=1, precision=precision)[0]


def test_a_linear_layer_saves_half_the_bytes_in_16_bits_and_its_weight_copy_once():
    fp32, bf16, fp16, pure = (_linear(p) for p in ("fp32", "bf16", "fp16", "bf16-pure"))
    # fp32: the input (rows x in x 4 bytes); the weight is a parameter, not an activation.
    assert fp32.activation_bytes == ROWS * IN * 4 and fp32.cast_bytes == 0
    for half in (bf16, fp16):
        # Autocast: the input's 16-bit copy per micro-batch, and the weight's 16-bit copy, held for
        # the step (the same tensor for every micro-batch), apart from the activations.
        assert half.activation_bytes == fp32.activation_bytes // 2
        assert half.cast_bytes == OUT * IN * 2
        assert half.parameter_bytes == fp32.parameter_bytes == (OUT * IN + OUT) * 4  # fp32 weights
        assert half.output.num_bytes == fp32.output.num_bytes // 2 == ROWS * OUT * 2  # the boundary
    # bf16 weights: nothing to cast, half the parameter bytes.
    assert pure.activation_bytes == fp32.activation_bytes // 2 and pure.cast_bytes == 0
    assert pure.parameter_bytes == fp32.parameter_bytes // 2
    assert pure.output.dtypes == (torch.bfloat16,)


def test_the_last_layer_hands_the_loss_fp32_and_its_saved_bytes_match_fp32s():
    layers = gpt_layers(64, 16, 2, 1, 8)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    fp32 = profile(layers, ids, num_repeats=1, loss_fn=gpt_loss, target=ids)
    bf16 = profile(layers, ids, num_repeats=1, loss_fn=gpt_loss, target=ids, precision="bf16")
    # The last stage casts its 16-bit outputs to fp32 for the loss, as the runtime does: the loss
    # keeps fp32 log-probabilities either way.
    assert bf16[-1].output == fp32[-1].output and bf16[-1].loss_bytes == fp32[-1].loss_bytes > 0
    pairs = zip(bf16[:-1], fp32[:-1], strict=True)
    assert all(b.output.num_bytes * 2 == f.output.num_bytes for b, f in pairs)
    assert sum(p.activation_bytes for p in bf16) < sum(p.activation_bytes for p in fp32)
    assert bf16[2].cast_bytes > 0  # the block's matrix weights


@pytest.mark.parametrize(("weights_fixed", "recompute"), [(True, False), (True, True), (False, False)])
def test_profiled_bytes_are_what_a_stage_under_autocast_holds_for_its_micro_batches(weights_fixed, recompute):
    """Two micro-batches through one runtime `Stage` in bf16 with the step's held casts: the saved-
    tensor counter of the runtime sees each micro-batch's activations, and the weight copies the
    step holds are measured apart (`Stage.held_cast_bytes`), recomputed or not.
    Where the runtime holds no casts (full sharding gathers the weights anew, `weights_fixed`
    false), each micro-batch's forward casts again and keeps its own copies, as the planner prices
    it (`pipefold.plan.precision_costs.recast_every_forward`)."""
    layers = [LayerSpec(nn.Linear, IN, OUT), LayerSpec(nn.GELU), LayerSpec(nn.LayerNorm, OUT),
              LayerSpec(nn.Linear, OUT, IN)]
    sample = torch.randn(ROWS, IN)
    profiles = profile(layers, sample, num_repeats=1, precision="bf16")
    modules = list(build_reference(layers, torch.device("cpu"), seed=0))
    stage = Stage(0, range(len(layers)), layers, modules, is_first=True, is_last=False,
                  recompute_all=recompute, recompute_layers=frozenset())
    stage.compute_dtype = torch.bfloat16
    counter = ActivationCounter(stage.parameters)
    outputs = []
    with counter.counting(), held_casts([stage], weights_fixed=weights_fixed):
        for microbatch in range(2):
            outputs.append(stage.forward(sample.clone().requires_grad_(True), microbatch))
        held = counter.current
    per_microbatch = sum(p.activation_bytes for p in profiles)
    casts = sum(p.cast_bytes for p in profiles)
    assert casts == (OUT * IN + IN * OUT) * 2
    if recompute:
        assert held == 2 * ROWS * IN * 4  # a checkpointed forward keeps its fp32 input, no copy
    else:
        assert held == 2 * per_microbatch + (0 if weights_fixed else 2 * casts)
    if not weights_fixed:
        # The plan under full sharding prices each micro-batch in flight what its forward keeps:
        # the weights' copies (`LayerCost.saved_casts`), not the biases' the cache also held.
        costs = ModelCosts.from_profile(profiles, rows=ROWS)
        assert [layer.saved_casts for layer in costs.layers] == [p.cast_bytes for p in profiles]
        plan = evaluate(costs, Config("gpipe", 1, 2, ROWS, shard="full"), 1, (0, len(layers)), (), Link(),
                        num_data_parallel=2, shard="full", price_exposure=False)
        assert plan.memory[0].activations == held and plan.memory[0].casts == 0
    # Measured at the step's end from autocast's cache: the copies it holds once, recomputed or not;
    # the cache holds the biases' copies too, which no backward saves (so the profile has not them).
    biases = (OUT + IN) * 2
    assert stage.held_cast_bytes == (casts + biases if weights_fixed else None)
    # The profile measures those held copies per layer too (the planner prices a step's from them).
    assert [p.held_cast_bytes for p in profiles] == [(OUT * IN + OUT) * 2, 0, 0, (IN * OUT + IN) * 2]
    assert outputs[0].dtype == torch.bfloat16  # a stage that is not the last sends 16 bits


def test_pure_bf16_leaves_the_callers_modules_in_fp32():
    plain = nn.Linear(3, 3)
    profile([plain], torch.ones(2, 3), num_repeats=1, precision="bf16-pure")
    assert plain.weight.dtype == torch.float32 and plain.weight.grad is None


@pytest.mark.parametrize("precision", ["bf32", "auto", "", None])
def test_an_unknown_precision_is_refused_with_the_choices(precision):
    expected = rf"precision = {precision!r}; use one of fp32, bf16, fp16, bf16-pure"
    with pytest.raises(ConfigError, match=expected):
        profile([nn.ReLU()], torch.zeros(1), num_repeats=1, precision=precision)


def _plan_memory(costs):
    """Per rank, the planner's memory for 1f1b, 2 ranks, 4 micro-batches of the profiled rows."""
    config = Config("1f1b", 1, 4, costs.reference_rows)
    return evaluate(costs, config, 2, (0, 3, len(costs.layers)), (), Link()).memory


def test_the_plans_memory_follows_the_precision():
    layers = gpt_layers(64, 32, 2, 2, 16)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    memory = {}
    for precision, optimizer in (("fp32", 2.0), ("bf16", 2.0), ("bf16-pure", 6.0)):
        profiles = profile(layers, ids, num_repeats=1, loss_fn=gpt_loss, target=ids, precision=precision)
        costs = ModelCosts.from_profile(profiles, rows=2, optimizer_bytes_per_parameter_byte=optimizer)
        memory[precision] = _plan_memory(costs)
        casts = [p.held_cast_bytes for p in profiles]
        assert [layer.cast_bytes for layer in costs.layers] == casts
        assert costs.cast_bytes_per_parameter_byte == pytest.approx(sum(casts) / costs.parameter_bytes)
        # Each rank is priced its own layers' copies (layers 0-2 | 3-6 at these bounds).
        assert [m.casts for m in memory[precision]] == [sum(casts[:3]), sum(casts[3:])]
    for rank in range(2):
        fp32, bf16, pure = (memory[p][rank] for p in ("fp32", "bf16", "bf16-pure"))
        # Autocast keeps fp32 weights, gradients and moments; it adds the held 16-bit copies.
        state = ("weights", "gradients", "optimizer")
        assert [getattr(bf16, kind) for kind in state] == [getattr(fp32, kind) for kind in state]
        assert fp32.casts == 0 < bf16.casts < bf16.weights // 2 + 1
        assert bf16.activations < fp32.activations
        # bf16 weights: half the weights and gradients, fp32 master and moments (12 bytes a weight).
        assert pure.weights * 2 == fp32.weights and pure.gradients == pure.weights
        assert pure.optimizer == 6 * pure.weights and pure.casts == 0
        # (The gradients, pure.weights, beside the activations held from the first backward on.)
        assert pure.pipeline_total == pure.weights * 7 + pure.held_activations + pure.temporary


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_the_gpt_estimate_prices_the_weight_copies_a_bf16_profile_measures(tie_embeddings):
    layers = gpt_layers(64, 32, 2, 2, 16, tie_embeddings=tie_embeddings)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    profiles = profile(layers, ids, num_repeats=1, precision="bf16")
    measured = [p.held_cast_bytes for p in profiles]
    sizes = {"num_layers": 2, "d_model": 32, "num_heads": 2, "seq_len": 16, "vocab_size": 64,
             "tie_embeddings": tie_embeddings}
    mixed = gpt_costs(**sizes, bytes_per_value=2, parameter_bytes_per_value=4)
    # Layer by layer (the blocks' weights and biases, the head's weight; no norm, no embedding).
    assert [layer.cast_bytes for layer in mixed.layers] == measured
    # ... of which a forward keeps the weights' copies for its backward (full sharding: per micro-batch).
    assert [layer.saved_casts for layer in mixed.layers] == [p.cast_bytes for p in profiles]
    assert mixed.cast_bytes_per_parameter_byte * mixed.parameter_bytes == pytest.approx(sum(measured))
    assert gpt_costs(**sizes, bytes_per_value=2).cast_bytes_per_parameter_byte == 0  # bf16 weights
    assert gpt_costs(**sizes).cast_bytes_per_parameter_byte == 0


def test_the_once_a_step_cast_is_timed_where_autocast_casts_fp32_weights():
    # A wide weight and one row: casting it (8M values) dwarfs the 16-bit product with one row; the
    # fastest of 5 casting forwards less the fastest of 5 holding ones (a loaded host only adds).
    layers = [LayerSpec(nn.Linear, 2048, 4096), LayerSpec(nn.ReLU)]
    sample = torch.randn(1, 2048)
    timed = {p: profile(layers, sample, num_repeats=5, precision=p)[0] for p in ("fp32", "bf16", "bf16-pure")}
    assert timed["bf16"].cast_s > 0
    assert timed["fp32"].cast_s == 0 and timed["bf16-pure"].cast_s == 0  # nothing cast
    costs = ModelCosts.from_profile([timed["bf16"]], rows=1)
    per_byte = timed["bf16"].cast_s / timed["bf16"].parameter_bytes
    assert costs.cast_s_per_parameter_byte == pytest.approx(per_byte)


def test_a_weight_two_stages_of_a_rank_hold_is_one_held_copy():
    from types import SimpleNamespace

    from pipefold.runtime.held_copies import holding, measure_held_copies

    shared = nn.Linear(IN, IN)
    stages = [SimpleNamespace(held_cast_bytes=None, compute_dtype=torch.bfloat16, device_type="cpu",
                              parameters=tuple(shared.parameters())) for _ in range(2)]
    torch.autocast_increment_nesting()
    try:
        with holding():
            for _ in stages:  # each stage's forward: the second takes the first's cached copies
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    shared(torch.randn(ROWS, IN))
            measure_held_copies(stages)
    finally:
        torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
    assert [stage.held_cast_bytes for stage in stages] == [(IN * IN + IN) * 2, 0]


class _RerunBytes(TorchDispatchMode):
    """Live bytes of what a backward's recomputations make (the ops that run with grad enabled
    inside a backward: the rerun forwards), each storage once until its last tensor dies, and
    of those the stage's weights' 16-bit copies; with the current and peak bytes of both."""

    def __init__(self, parameters):
        super().__init__()
        self._weights = {p.untyped_storage().data_ptr() for p in parameters}
        self._held = {}  # storage pointer -> [live tensors, bytes, is a weight's copy]
        self.current = self.copies = self.peak = self.copies_at_peak = self.peak_copies = 0

    def _release(self, key):
        entry = self._held[key]
        entry[0] -= 1
        if not entry[0]:
            del self._held[key]
            self.current -= entry[1]
            self.copies -= entry[1] if entry[2] else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        making = torch.is_grad_enabled()  # a rerun forward (a backward's own ops run without grad)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        cast = func is torch.ops.aten._to_copy.default
        copy = cast and tensors[0].untyped_storage().data_ptr() in self._weights
        for tensor in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            key = tensor.untyped_storage().data_ptr()
            if key in self._held:  # an alias (a view, the detached tensor a checkpoint keeps) holds it too
                self._held[key][0] += 1
            elif making and key and key not in inputs:
                size = tensor.untyped_storage().nbytes()
                self._held[key] = [1, size, copy]
                self.current += size
                self.copies += size if copy else 0
            else:
                continue
            weakref.finalize(tensor, self._release, key)
            if self.current > self.peak:
                self.peak, self.copies_at_peak = self.current, self.copies
            self.peak_copies = max(self.peak_copies, self.copies)
        return out


@pytest.mark.parametrize("split", [False, True])
def test_a_recomputing_backward_under_full_sharding_holds_one_layers_copies_as_the_plan_prices(split):
    """Under full sharding (no casts held) a recomputed stage's backward reruns each checkpointed
    layer's forward, which casts that layer's weights again: the copies live at the backward's peak
    are one block's (freed before the next), its biases' too (the rerun's cache holds them until
    it ends), and the plan's recompute transient prices exactly them beside the block's activations
    (`pipefold.plan.precision_costs.rerun_copies`). B, or I and W of a split backward."""
    from pipefold.runtime.backward import backward_input, backward_weight

    num_blocks = 2
    layers = gpt_layers(64, 32, 2, num_blocks, 16)
    rows = 2
    ids = torch.randint(0, 64, (rows, 16), generator=torch.Generator().manual_seed(0))
    profiles = profile(layers, ids, num_repeats=1, loss_fn=gpt_loss, target=ids, precision="bf16")
    blocks = range(2, 2 + num_blocks)
    modules = list(build_reference(layers, torch.device("cpu"), seed=0))
    # Each block under its own checkpoint, as the plan's recompute runs (`recompute=[layers]`).
    stage = Stage(1, blocks, layers[2:2 + num_blocks], modules[2:2 + num_blocks], is_first=False,
                  is_last=False, recompute_all=False, recompute_layers=frozenset(blocks))
    stage.compute_dtype = torch.bfloat16
    sample = torch.randn(rows, 16, 32, requires_grad=True)
    with held_casts([stage], weights_fixed=False):  # full sharding: the step holds no casts
        output = stage.forward(sample, 0)
    counted = _RerunBytes(stage.parameters)
    with counted:
        if split:
            _, state = backward_input([output], [torch.ones_like(output)], [sample], stage.parameters,
                                      direct=False)
        else:
            output.backward(torch.ones_like(output))
    seed = output.numel() * output.element_size()  # I's count holds its `ones_like` seed too
    del output
    counted_weight = _RerunBytes(stage.parameters)  # W's reruns (see the next test)
    if split:
        with counted_weight:
            backward_weight(state)
    block_copies = [profiles[index].held_cast_bytes for index in blocks]
    # Freed between layers: the peak holds one block's copies, weights' and biases', not the stage's.
    assert counted.peak_copies == counted.copies_at_peak == max(block_copies) < sum(block_copies)
    assert max(block_copies) > profiles[blocks[0]].cast_bytes  # ... the biases' with the weights'

    costs = ModelCosts.from_profile(profiles, rows=rows)
    config = {"num_data_parallel": 2, "price_exposure": False}
    whole = (0, len(layers))
    replicated = evaluate(costs, Config("gpipe", 1, 2, rows), 1, whole, (0,), Link(), **config)
    sharded = evaluate(costs, Config("gpipe", 1, 2, rows, shard="full"), 1, whole, (0,), Link(), shard="full",
                       **config)
    # The plan adds to the recompute transient exactly the copies live at the counted peak.
    assert sharded.memory[0].recompute - replicated.memory[0].recompute == counted.copies_at_peak
    # ... beside the block's activations, which the plan counts with the block's input (kept anyway
    # among the checkpointed inputs, not rebuilt): the count lies between.
    block_input = profiles[blocks[0] - 1].output.num_bytes
    assert sharded.memory[0].recompute - block_input <= counted.peak <= sharded.memory[0].recompute
    if split:  # W reruns each block once more, one at a time too: I's rerun, within the same price
        assert counted_weight.peak_copies == max(block_copies)
        assert counted_weight.peak == counted.peak - seed <= sharded.memory[0].recompute


def _split_backward_reruns(num_blocks, precision):
    """A recomputed stage of `num_blocks` d = 32 GPT blocks (each under its own checkpoint), its
    split backward's I then W counted apart by `_RerunBytes`: (I's count, W's count). In bf16
    under full sharding (no casts held: each rerun casts its layer's weights again), or fp32."""
    from pipefold.runtime.backward import backward_input, backward_weight

    layers = gpt_layers(64, 32, 2, num_blocks, 16)
    blocks = range(2, 2 + num_blocks)
    modules = list(build_reference(layers, torch.device("cpu"), seed=0))
    stage = Stage(1, blocks, layers[2:2 + num_blocks], modules[2:2 + num_blocks], is_first=False,
                  is_last=False, recompute_all=False, recompute_layers=frozenset(blocks))
    stage.compute_dtype = torch.bfloat16 if precision == "bf16" else None
    sample = torch.randn(2, 16, 32, requires_grad=True)
    with held_casts([stage], weights_fixed=False):
        output = stage.forward(sample, 0)
    counted_input, counted_weight = _RerunBytes(stage.parameters), _RerunBytes(stage.parameters)
    seed = torch.ones_like(output)  # made outside the counts: they hold the reruns alone
    with counted_input:  # as the runtime runs a recomputed stage: W on autograd's path
        _, state = backward_input([output], [seed], [sample], stage.parameters, direct=False)
    del output  # the executor drops the outputs after I
    with counted_weight:
        backward_weight(state)
    assert counted_weight.current == 0  # W frees every rerun tensor by its end
    return counted_input, counted_weight


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_split_backwards_w_holds_one_layers_rerun_however_many_layers_it_reruns(precision):
    """W of a recomputed stage reruns each checkpointed layer once more, and the checkpoint keeps
    a rerun tensor until W unpacks it or the node holding its slot dies; what only I's nodes read
    W never unpacks. W runs its groups one layer at a time, the last first
    (`PlanShape.rerun_order`), so a layer's nodes and leftovers die before the next layer's rerun:
    its peak is one layer's, on one, two or three blocks, as I's is. (In the walk's order, which
    interleaves the layers, W held every layer's rerun at once: 137024 bytes on two blocks in
    bf16, 196928 on three, against 68928 on one.)"""
    counts = {n: _split_backward_reruns(n, precision) for n in (1, 2, 3)}
    one_input, one_weight = counts[1]
    for num_blocks in (2, 3):
        counted_input, counted_weight = counts[num_blocks]
        assert counted_weight.peak == one_weight.peak  # not growing with the layers
        assert counted_weight.peak_copies == one_weight.peak_copies  # one block's copies (bf16)
        assert counted_input.peak == one_input.peak
    assert one_weight.peak == one_input.peak > 0  # I's one layer, which the plan prices
    assert (one_weight.peak_copies > 0) == (precision == "bf16")


@pytest.mark.parametrize("recompute", [True, False])
def test_a_stage_keeps_what_its_layers_see_in_their_dtype_inside_the_stage(recompute):
    """Two stages of a GPT in bf16. Each layer under its own checkpoint, as a recomputed stage runs
    them: the first keeps the block's fp32 input (the embeddings' fp32 stream), the second its
    16-bit boundary and what its layers pass on from it. Without recomputation, the second's
    layers save what they save from that 16-bit stream (on CPU its layer norms keep 16 bits). The
    plan prices what the runtime's saved-tensor counter sees, from the profile's in-stage bytes
    (`pipefold.plan.in_stage`)."""
    layers = gpt_layers(64, 16, 2, 2, 8)  # token and position embeddings, 2 blocks, norm, head
    rows, cut = 2, 3
    ids = torch.randint(0, 64, (rows, 8), generator=torch.Generator().manual_seed(0))
    profiles = profile(layers, ids, num_repeats=1, precision="bf16")
    costs = ModelCosts.from_profile(profiles, rows=rows, input_bytes=ids.numel() * ids.element_size())
    modules = list(build_reference(layers, torch.device("cpu"), seed=0))
    received = torch.randn(rows, 8, 16, dtype=torch.bfloat16, requires_grad=True)  # a 16-bit boundary
    for start, stop, value in ((0, cut, ids), (cut, len(layers), received)):
        stage = Stage(start, range(start, stop), layers[start:stop], modules[start:stop],
                      is_first=start == 0, is_last=stop == len(layers), recompute_all=False,
                      recompute_layers=frozenset(range(start, stop) if recompute else ()))
        stage.compute_dtype = torch.bfloat16
        counter = ActivationCounter(stage.parameters)
        with counter.counting(), held_casts([stage], weights_fixed=True):
            output = stage.forward(value, 0)
            held = counter.current
        assert output is not None
        planned = costs.stage_kept_input_bytes if recompute else costs.stage_activation_bytes
        assert held == sum(planned(start, stop))
    stream = rows * 8 * 16
    # From the 16-bit boundary the second stage's layer norms (two per block, and the final one)
    # save 16-bit inputs where the profile's fp32 chain saved fp32 ones.
    saved = costs.stage_activation_bytes(cut, len(layers))
    assert [p.activation_bytes for p in profiles[cut:]] == [saved[0] + 2 * stream * 2, saved[1] + stream * 2,
                                                            saved[2]]
    # The first stage: the ids, nothing for the position embedding (it saves nothing), and the
    # block's fp32 input, where the boundary's 16-bit size was priced before.
    assert costs.stage_kept_input_bytes(0, cut) == [ids.numel() * 8, 0, stream * 4]
    # The second: every input 16-bit, passed on from its boundary (a block and, on CPU, the norm).
    assert costs.stage_kept_input_bytes(cut, len(layers)) == [stream * 2] * 3
