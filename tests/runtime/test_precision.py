"""Mixed precision in one process: the options' refusals, the loss-scale rule, the boundary casts,
and a bf16 / fp16 pipeline of two stages on one rank against the unsplit model under the same
autocast. The multi-rank checks (bf16 at pp2 and dp2 x pp2 with the split backward, one fp16
overflow agreed by every rank) are in test_training.py."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from _cases import _batch, _loss_fn, mlp, transformer
from test_training import BF16_RTOL, _autocast_forward

from pipefold.errors import ConfigError
from pipefold.model import TensorMeta, build_reference
from pipefold.plan import gpt_costs
from pipefold.runtime import LayoutOptions, ParallelOptions, Pipeline, RuntimeOptions
from pipefold.runtime.loss_scale import DynamicLossScale
from pipefold.runtime.stage import cast_floating


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"precision": "fp8"}, "precision = 'fp8'"),
        ({"precision": "fp16"}, "loss_scale = None"),
        ({"precision": "fp16", "loss_scale": 0.0}, "loss_scale = 0.0"),
        ({"precision": "fp16", "loss_scale": math.inf}, "loss_scale = inf"),
        ({"precision": "bf16", "loss_scale": 1024.0}, "loss_scale = 1024.0"),
        ({"precision": "fp16", "loss_scale": 1024.0, "loss_scale_growth_interval": 0}, "growth_interval = 0"),
    ],
)
def test_bad_precision_options_name_the_field(options, names):
    with pytest.raises(ConfigError) as info:
        RuntimeOptions(**options)
    assert names in str(info.value)


def test_fp16_with_an_asynchronous_schedule_is_refused():
    with pytest.raises(ConfigError, match="flush schedule for fp16"):
        Pipeline(
            mlp(4), loss_fn=_loss_fn("mlp"), schedule="pipedream", num_microbatches=2,
            runtime=RuntimeOptions(precision="fp16", loss_scale=1024.0),
        )


def test_cast_floating_casts_only_the_source_dtype():
    hidden, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    cast = cast_floating((hidden, mask), torch.float32, torch.bfloat16)
    assert cast[0].dtype == torch.bfloat16 and cast[1] is mask
    assert cast_floating(hidden, torch.bfloat16, torch.float32) is hidden


def test_loss_scale_rule_and_set_aside_gradients():
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    scaler = DynamicLossScale(8.0, growth_interval=2, group=None, watchdog=None)  # type: ignore[arg-type]
    scaler.set_aside([param])
    assert param.grad is None
    param.grad = torch.tensor([8.0, 16.0, 24.0])  # this step's contribution, times the scale
    assert not scaler.overflowed([param], torch.device("cpu"))
    scaler.unscale_and_add_back([param])
    assert torch.equal(param.grad, torch.tensor([2.0, 4.0, 6.0]))
    scaler.update(False)
    assert scaler.scale == 8.0 and not scaler.skipped
    scaler.update(False)
    assert scaler.scale == 16.0  # two clean steps: doubled
    previous = param.grad
    scaler.set_aside([param])
    param.grad = torch.tensor([1.0, math.inf, 0.0])
    assert scaler.overflowed([param], torch.device("cpu"))
    scaler.restore([param])
    assert param.grad is previous
    scaler.update(True)
    assert scaler.scale == 8.0 and scaler.skipped and scaler.num_skipped == 1


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_two_stages_on_one_rank_equal_the_model_under_autocast(precision, dtype):
    """Interleaved, two stages on this one rank: the handoff between them carries the 16-bit
    boundary; loss and fp32 gradients equal the unsplit model making the same casts."""
    kind = "transformer"
    scale = 1024.0 if precision == "fp16" else None
    pipe = Pipeline(
        transformer(), loss_fn=_loss_fn(kind), schedule="interleaved-1f1b", num_microbatches=2, num_virtual=2,
        layout=LayoutOptions(seed=7), runtime=RuntimeOptions(precision=precision, loss_scale=scale),
    )
    reference = build_reference(transformer(), seed=7)
    inputs, targets = _batch(kind, 4, seed=0)
    loss = pipe.step(inputs, targets)
    expected = _loss_fn(kind)(_autocast_forward(reference, inputs, pipe, dtype), targets)
    (expected * (scale or 1.0)).backward()
    torch.testing.assert_close(loss, expected.item(), rtol=BF16_RTOL, atol=0)
    # The forward-only pass makes the step's casts (autocast, 16-bit boundaries): the same loss,
    # which the fp32 forward misses by far more than float rounding.
    assert pipe.evaluate(inputs, targets) == pytest.approx(loss, rel=1e-6, abs=0)
    params = dict(reference.named_parameters())
    for name, param in pipe.named_parameters():
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32
        want = params[name].grad / (scale or 1.0)
        torch.testing.assert_close(param.grad, want, rtol=BF16_RTOL, atol=BF16_RTOL * want.abs().max().item())
    # Every boundary but the loss's input travels in the 16-bit dtype (the bool mask as is).
    boundaries = pipe._boundaries(TensorMeta.of(inputs), 2)
    assert {d for meta in boundaries[:-1] for d in meta.dtypes} == {dtype, torch.bool}
    assert boundaries[-1].dtypes == (torch.float32,)
    if scale is not None:
        # An overflow in one process: the step is skipped and the scale halved.
        handle = next(pipe.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
        before = [p.grad.clone() for p in pipe.parameters()]
        pipe.step(inputs, targets)
        handle.remove()
        assert pipe.loss_scale is not None and pipe.loss_scale.skipped and pipe.loss_scale.scale == scale / 2
        assert all(torch.equal(p.grad, b) for p, b in zip(pipe.parameters(), before, strict=True))
    else:
        assert pipe.loss_scale is None


def test_gpt_estimate_prices_16_bit_activations_and_fp32_weights():
    sizes = {"num_layers": 2, "d_model": 32, "num_heads": 4, "seq_len": 16}
    fp32 = gpt_costs(**sizes)
    mixed = gpt_costs(**sizes, bytes_per_value=2, parameter_bytes_per_value=4)
    pure = gpt_costs(**sizes, bytes_per_value=2, parameter_bytes_per_value=2)
    for full, half, autocast in zip(fp32.layers, pure.layers, mixed.layers, strict=True):
        assert half.activation_bytes * 2 == full.activation_bytes  # one 16-bit dtype throughout
        assert autocast.output_bytes * 2 == half.output_bytes * 2 == full.output_bytes
        assert autocast.parameter_bytes == full.parameter_bytes
    # Under autocast over fp32 weights the layer norms save the fp32 residual stream: each block's
    # two norms 2 more bytes a value than 16 bits (T x d values each), the final norm its fp32 input.
    tokens_by_width = 16 * 32
    embeddings, blocks = mixed.layers[:2], mixed.layers[2:4]
    final_norm, head = mixed.layers[4], mixed.layers[5]
    assert [layer.activation_bytes for layer in embeddings] == [0, 0]
    assert all(layer.activation_bytes == pure.layers[2].activation_bytes + 2 * tokens_by_width * 2
               for layer in blocks)
    assert final_norm.activation_bytes == fp32.layers[4].activation_bytes
    assert head.activation_bytes == pure.layers[5].activation_bytes
    # Adam's fp32 moments: 8 bytes per weight; with bf16 weights (bf16-pure) also the fp32
    # masters, 12 bytes per weight, 6 per byte of a bf16 weight (what the job report measures).
    assert fp32.optimizer_bytes_per_parameter_byte == mixed.optimizer_bytes_per_parameter_byte == 2.0
    assert pure.optimizer_bytes_per_parameter_byte == 6.0
    def optimizer_bytes(costs):
        return costs.parameter_bytes * costs.optimizer_bytes_per_parameter_byte

    assert optimizer_bytes(pure) == 1.5 * optimizer_bytes(mixed)  # + a 4-byte master on 8 bytes


def test_a_resumed_fp16_run_continues_with_the_saved_loss_scale(tmp_path):
    """The scale, its clean-step count and the skipped steps travel in the checkpoint: the run
    resumed from it skips, grows and trains exactly as the uninterrupted one."""
    from pipefold.runtime.checkpoint import load_checkpoint, save_checkpoint

    kind = "transformer"

    def make(scale: float) -> Pipeline:
        return Pipeline(
            transformer(), loss_fn=_loss_fn(kind), schedule="interleaved-1f1b", num_microbatches=2,
            num_virtual=2, layout=LayoutOptions(seed=7),
            runtime=RuntimeOptions(precision="fp16", loss_scale=scale, loss_scale_growth_interval=3),
        )

    def train(
        pipe: Pipeline, optimizer: torch.optim.Optimizer, steps: range, overflow_at: int = -1
    ) -> list[float]:
        losses = []
        for step in steps:
            handle = None
            if step == overflow_at:
                handle = next(pipe.parameters()).register_hook(lambda grad: torch.full_like(grad, math.inf))
            inputs, targets = _batch(kind, 4, seed=step)
            losses.append(pipe.step(inputs, targets))
            if handle is not None:
                handle.remove()
            assert pipe.loss_scale is not None
            if not pipe.loss_scale.skipped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return losses

    straight = make(1024.0)
    straight_optimizer = torch.optim.AdamW(straight.parameters(), lr=1e-3)
    first = make(1024.0)
    first_optimizer = torch.optim.AdamW(first.parameters(), lr=1e-3)
    # Step 0 overflows (scale 1024 -> 512), steps 1-2 are clean: two of the three clean steps
    # that double the scale are behind at the save.
    train(first, first_optimizer, range(3), overflow_at=0)
    assert first.loss_scale is not None and first.loss_scale.state_dict() == {
        "scale": 512.0, "good_steps": 2, "num_skipped": 1,
    }
    save_checkpoint(first, tmp_path / "ckpt", optimizer=first_optimizer, step=3)
    expected = train(straight, straight_optimizer, range(5), overflow_at=0)[3:]
    resumed = make(65536.0)  # another initial scale: the saved one wins
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    load_checkpoint(resumed, tmp_path / "ckpt", optimizer=resumed_optimizer)
    assert resumed.loss_scale is not None and resumed.loss_scale.state_dict() == first.loss_scale.state_dict()
    losses = train(resumed, resumed_optimizer, range(3, 5))
    assert losses == expected  # same weights, moments, scale: bit-identical steps
    assert resumed.loss_scale.state_dict() == {"scale": 1024.0, "good_steps": 1, "num_skipped": 1}
    assert straight.loss_scale is not None
    assert straight.loss_scale.state_dict() == resumed.loss_scale.state_dict()
    # A bf16 pipeline loads the same checkpoint and has no scale; a damaged scale is refused.
    bf16 = Pipeline(
        transformer(), loss_fn=_loss_fn(kind), schedule="interleaved-1f1b", num_microbatches=2, num_virtual=2,
        layout=LayoutOptions(seed=7), runtime=RuntimeOptions(precision="bf16"),
    )
    load_checkpoint(bf16, tmp_path / "ckpt")
    assert bf16.loss_scale is None
    with pytest.raises(ConfigError, match="not a saved dynamic loss scale"):
        resumed.loss_scale.load_state_dict({"scale": -1.0, "good_steps": 0, "num_skipped": 0})


def test_fp32_master_weights_step_the_fp32_copy_and_round_it_into_the_weight():
    from pipefold.runtime import fp32_master_weights

    torch.manual_seed(0)
    start = torch.randn(64)
    low = torch.nn.Parameter(start.to(torch.bfloat16))
    reference = torch.nn.Parameter(start.to(torch.bfloat16).to(torch.float32))
    master_adamw = fp32_master_weights(torch.optim.AdamW)
    assert fp32_master_weights(torch.optim.AdamW) is master_adamw
    optimizer = master_adamw([low], lr=1e-3, weight_decay=0.1)
    expected = torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.1)
    for step in range(3):
        grad = torch.randn(64, generator=torch.Generator().manual_seed(step))
        low.grad, reference.grad = grad.to(torch.bfloat16), grad.to(torch.bfloat16).to(torch.float32)
        optimizer.step()
        expected.step()
        state = optimizer.state[low]
        assert low.dtype == torch.bfloat16 and low.grad.dtype == torch.bfloat16
        assert state["master"].dtype == state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state["master"], reference.detach(), rtol=0, atol=0)
        want = expected.state[reference]["exp_avg_sq"]
        torch.testing.assert_close(state["exp_avg_sq"], want, rtol=0, atol=0)
        assert torch.equal(low.detach(), reference.detach().to(torch.bfloat16))
    # 1e-3 steps on weights near 1 are below bf16's resolution (2^-8): the master keeps them.
    assert not torch.equal(state["master"], low.detach().to(torch.float32))
    # Loaded (as a checkpoint does): the state stays fp32 (torch would cast it to the weight's dtype).
    again = master_adamw([low], lr=1e-3, weight_decay=0.1)
    again.load_state_dict(optimizer.state_dict())
    assert torch.equal(again.state[low]["master"], state["master"])
    assert again.state[low]["exp_avg"].dtype == torch.float32


PURE_BF16_RTOL = 0.01
"""bf16-pure against bf16 with fp32 weights, per step over 6 AdamW steps (relative loss; measured 0.2%)."""


def test_pure_bf16_weights_train_like_fp32_master_weights(tmp_path):
    """Two stages on one rank, 6 AdamW steps: bf16 weights with fp32 masters against fp32
    weights under the same autocast; the losses agree within PURE_BF16_RTOL, and the masters
    lie close to the fp32 weights (squared distance under 5% of how far training moved them;
    measured 2.9%)."""
    from pipefold.runtime import fp32_master_weights

    kind = "transformer"
    pipes = {
        precision: Pipeline(
            transformer(), loss_fn=_loss_fn(kind), schedule="interleaved-1f1b", num_microbatches=2,
            num_virtual=2, layout=LayoutOptions(seed=7), runtime=RuntimeOptions(precision=precision),
        )
        for precision in ("bf16", "bf16-pure")
    }
    optimizers = {
        "bf16": torch.optim.AdamW(pipes["bf16"].parameters(), lr=3e-3),
        "bf16-pure": fp32_master_weights(torch.optim.AdamW)(pipes["bf16-pure"].parameters(), lr=3e-3),
    }
    assert {p.dtype for p in pipes["bf16-pure"].parameters()} == {torch.bfloat16}
    losses: dict[str, list[float]] = {name: [] for name in pipes}
    for step in range(6):
        inputs, targets = _batch(kind, 4, seed=step)
        for name, pipe in pipes.items():
            losses[name].append(pipe.step(inputs, targets))
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
    assert losses["bf16-pure"] == pytest.approx(losses["bf16"], rel=PURE_BF16_RTOL)
    assert losses["bf16-pure"] != losses["bf16"]
    assert losses["bf16"][-1] < losses["bf16"][0]
    # AdamW moves each weight by up to ~lr a step whatever the gradient's size, so rounding may
    # move single entries by several lr; as a whole the masters went where the fp32 weights went:
    # their distance is a small part of the distance training moved the weights.
    full = dict(pipes["bf16"].named_parameters())
    initial = dict(build_reference(transformer(), seed=7).named_parameters())
    apart = moved = 0.0
    for name, param in pipes["bf16-pure"].named_parameters():
        master = optimizers["bf16-pure"].state[param]["master"]
        apart += float((master - full[name].detach()).square().sum())
        moved += float((full[name].detach() - initial[name].detach()).square().sum())
    assert apart < 0.05 * moved, (apart, moved)
    # A checkpoint holds the bf16 weights and the fp32 masters and moments: a resumed run steps on
    # exactly as this one.
    from pipefold.runtime.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(pipes["bf16-pure"], tmp_path / "ckpt", optimizer=optimizers["bf16-pure"], step=6)
    resumed = Pipeline(
        transformer(), loss_fn=_loss_fn(kind), schedule="interleaved-1f1b", num_microbatches=2,
        num_virtual=2, layout=LayoutOptions(seed=3), runtime=RuntimeOptions(precision="bf16-pure"),
    )
    resumed_optimizer = fp32_master_weights(torch.optim.AdamW)(resumed.parameters(), lr=3e-3)
    load_checkpoint(resumed, tmp_path / "ckpt", optimizer=resumed_optimizer)
    for step in (6, 7):
        inputs, targets = _batch(kind, 4, seed=step)
        for pipe, optimizer in ((pipes["bf16-pure"], optimizers["bf16-pure"]), (resumed, resumed_optimizer)):
            losses[str(id(pipe))] = [pipe.step(inputs, targets)]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert losses[str(id(resumed))] == losses[str(id(pipes["bf16-pure"]))]


def test_pure_bf16_asynchronous_optimizers_must_keep_fp32_masters():
    """An asynchronous schedule steps its stages' optimizers itself: under bf16-pure the factory
    must build one that keeps fp32 masters (streamed runs: tests/runtime/test_runtime_exact.py)."""
    from pipefold.runtime import fp32_master_weights

    def build(factory):
        return Pipeline(
            mlp(4), loss_fn=_loss_fn("mlp"), schedule="pipedream", num_microbatches=2,
            parallel=ParallelOptions(optimizer=factory), runtime=RuntimeOptions(precision="bf16-pure"),
        )

    with pytest.raises(ConfigError, match=r"ParallelOptions.optimizer.*SGD.*fp32_master_weights\(SGD\)"):
        build(lambda params: torch.optim.SGD(params, lr=0.1))
    pipe = build(lambda params: fp32_master_weights(torch.optim.SGD)(params, lr=0.1))
    inputs, targets = _batch("mlp", 4, seed=0)
    pipe.step(inputs, targets)
    stash = pipe.stages[0].stash
    assert stash is not None and {p.dtype for p in stash.parameters} == {torch.bfloat16}
    assert {entry["master"].dtype for entry in stash.optimizer.state.values()} == {torch.float32}


def test_a_step_casts_each_weight_once_and_equals_casting_per_forward(monkeypatch):
    """autocast's weight casts are held for the whole step (`held_casts`): 4 micro-batches on two
    stages cast each fp32 weight to bf16 once, not once per forward, the next step (after an
    update) casts the new weights again, and losses and gradients equal a pipeline that casts
    per forward, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import pipefold.runtime.pipeline as pipeline_module

    class CountCasts(TorchDispatchMode):
        def __init__(self, pointers):
            super().__init__()
            self.pointers, self.counts = pointers, {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                pointer = args[0].data_ptr()
                if pointer in self.pointers:
                    self.counts[pointer] = self.counts.get(pointer, 0) + 1
            return func(*args, **kwargs)

    def build():
        return Pipeline(
            transformer(), loss_fn=_loss_fn("transformer"), schedule="interleaved-1f1b", num_microbatches=4,
            num_virtual=2, layout=LayoutOptions(seed=7), runtime=RuntimeOptions(precision="bf16"),
        )

    held, per_forward = build(), build()
    for stage in held.stages:
        # The first step's end measures the copies held once (runtime.held_copies), asking autocast
        # for every weight's cast, those the step did not cast too: not here, where casts are counted.
        stage.held_cast_bytes = 0
    # The tied head multiplies by `embedding.weight.T`, a view: autocast caches casts of leaf
    # weights only, so that one is cast per forward (the GPT's head uses F.linear instead).
    named = dict(held.named_parameters())
    pointers = {p.data_ptr(): name for name, p in named.items() if name != "0.weight"}
    linear = {p.data_ptr() for name, p in named.items() if ".qkv." in name or ".out." in name}
    assert len(linear) == 24
    results = {}
    for name, pipe in (("held", held), ("per_forward", per_forward)):
        optimizer = torch.optim.SGD(pipe.parameters(), lr=0.5)
        if name == "per_forward":
            monkeypatch.setattr(
                pipeline_module, "held_casts", lambda stages, weights_fixed: contextlib.nullcontext()
            )
        losses, counts = [], []
        for step in range(2):
            inputs, targets = _batch("transformer", 8, seed=step)
            counter = CountCasts(set(pointers) if name == "held" else set())
            with counter:
                losses.append(pipe.step(inputs, targets))
            counts.append(counter.counts)
            grads = [p.grad.clone() for p in pipe.parameters()]
            optimizer.step()
            optimizer.zero_grad()
        results[name] = (losses, grads)
        if name == "held":  # the linear layers' weights and biases (norms run in fp32)
            for count in counts:
                assert set(count) == linear and set(count.values()) == {1}, count
    assert results["held"][0] == results["per_forward"][0]
    for got, want in zip(results["held"][1], results["per_forward"][1], strict=True):
        assert torch.equal(got, want)
