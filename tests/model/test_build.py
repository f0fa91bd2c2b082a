import itertools

import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import (
    LayerSpec,
    TensorMeta,
    TiedLayerSpec,
    apply_layer,
    as_layers,
    build_reference,
    materialize,
    meta_layers,
    named_parameters,
    owner_indices,
    tied_groups,
    trace_boundaries,
)

from .models import VOCAB, WIDTH, Block, Embed, Final, mlp, tied_head, token_ids, transformer


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in module.state_dict().items()}


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# --- as_layers ------------------------------------------------------------------------------


def test_as_layers_accepts_sequential_and_lists():
    seq = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert as_layers(seq) == list(seq)
    specs = mlp()
    assert as_layers(specs) == specs
    assert as_layers(tuple(specs)) == specs


@pytest.mark.parametrize(
    ("layers", "pattern"),
    [
        ([], "layers is empty"),
        (nn.Linear(2, 2), "got a single Linear"),
        ("abc", "got str"),
        ([nn.ReLU(), print], "layer 1 is a builtin_function_or_method"),
        (
            [TiedLayerSpec("e", nn.Embedding, 3, 2), TiedLayerSpec("e", nn.Linear, 2, 3)],
            "layer 1: TiedLayerSpec key 'e' builds Linear, but its first occurrence "
            "\\(layer 0\\) builds Embedding",
        ),
    ],
)
def test_as_layers_refuses_bad_descriptions(layers, pattern):
    with pytest.raises(ConfigError, match=pattern):
        as_layers(layers)


def test_as_layers_refuses_a_module_object_at_two_indices():
    shared = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="layer 2 is the same Linear object as layer 0.*TiedLayerSpec"):
        as_layers([shared, nn.ReLU(), shared])


def test_as_layers_allows_a_reused_stateless_module():
    act = nn.ReLU()
    layers = [nn.Linear(2, 2), act, nn.Linear(2, 2), act]
    assert as_layers(layers) == layers
    assert str(trace_boundaries(layers, torch.zeros(1, 2))[-1]) == "float32[1, 2]"


def test_tied_groups_and_owner_indices():
    layers = transformer(num_blocks=2)
    assert tied_groups(layers) == {"embed": (0, 4)}
    assert owner_indices(layers) == [0, 1, 2, 3, 0]


# --- meta_layers ----------------------------------------------------------------------------


def test_meta_layers_allocate_no_real_memory():
    plain = nn.Linear(4, 4)
    layers = [*transformer(), plain]
    meta = meta_layers(layers)
    assert len(meta) == len(layers)
    for module in meta:
        assert all(p.is_meta for p in module.parameters())
        assert all(b.is_meta for b in module.buffers())
    assert meta[0] is meta[4], "tied occurrences must be one object"
    assert meta[5] is not plain and not plain.weight.is_meta, "the original module must be left untouched"
    assert meta[5].weight.shape == plain.weight.shape


def test_meta_copy_keeps_requires_grad_and_buffers():
    plain = nn.BatchNorm1d(3)
    plain.weight.requires_grad_(False)
    (meta,) = meta_layers([plain])
    assert not meta.weight.requires_grad
    assert meta.running_mean.is_meta and meta.running_mean.shape == (3,)


# --- materialize and build_reference --------------------------------------------------------


def test_materialize_matches_reference_for_every_subset():
    layers = [*transformer(num_blocks=2), LayerSpec(nn.Linear, VOCAB, 2)]
    reference = build_reference(layers, seed=7)
    for size in range(1, len(layers) + 1):
        for subset in itertools.combinations(range(len(layers)), size):
            built = materialize(layers, subset, "cpu", seed=7)
            assert sorted(built) == list(subset)
            for index, module in built.items():
                assert_same_weights(module, reference[index])


def test_materialize_depends_on_seed():
    layers = mlp()
    a = materialize(layers, [0], "cpu", seed=0)[0]
    b = materialize(layers, [0], "cpu", seed=1)[0]
    assert not torch.equal(a.weight, b.weight)


def test_identical_specs_at_different_indices_get_different_weights():
    layers = [LayerSpec(nn.Linear, 3, 3), LayerSpec(nn.Linear, 3, 3)]
    built = materialize(layers, [0, 1], "cpu")
    assert not torch.equal(built[0].weight, built[1].weight)


def test_materialize_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    materialize(mlp(), [0, 2], "cpu")
    assert torch.equal(torch.rand(3), expected)


def test_tied_occurrences_share_one_module_and_identical_weights():
    layers = transformer(num_blocks=1)
    last = len(layers) - 1
    both = materialize(layers, [0, last], "cpu")
    assert both[0] is both[last]
    alone_first = materialize(layers, [0], "cpu")[0]
    alone_last = materialize(layers, [last], "cpu")[last]
    assert alone_first is not alone_last
    assert_same_weights(alone_first, alone_last)

    reference = build_reference(layers)
    assert reference[0] is reference[last]
    names = [name for name, _ in reference.named_parameters()]
    assert names[0] == "0.weight" and not any(name.startswith(f"{last}.") for name in names)


def test_reference_applies_forward_fn_of_tied_occurrences():
    layers = transformer(num_blocks=1)
    reference = build_reference(layers)
    ids = token_ids(batch=2)
    expected = ids
    for index, layer in enumerate(layers):
        expected = apply_layer(layer, reference[index], expected)
    logits = reference(ids)
    assert logits.shape == (2, 4, VOCAB)
    assert torch.equal(logits, expected)
    hidden = reference[2](reference[1](reference[0](ids)))
    assert torch.allclose(logits, tied_head(reference[0], hidden))


def test_named_parameters_match_sequential_names_on_every_subset():
    layers = transformer(num_blocks=2)
    reference = dict(build_reference(layers).named_parameters())
    for subset in ([0], [len(layers) - 1], [1, 2], [3, 4], [0, 4], list(range(len(layers)))):
        built = materialize(layers, subset, "cpu")
        names = dict(named_parameters(layers, built))
        owners = {owner_indices(layers)[i] for i in subset}
        expected = {name for name in reference if int(name.split(".")[0]) in owners}
        assert set(names) == expected, subset
        for name, parameter in names.items():
            assert torch.equal(parameter, reference[name])


def test_trace_accepts_a_tensor_meta_sample():
    layers = mlp()
    from_meta = trace_boundaries(layers, TensorMeta.of(torch.zeros(2, 3)))
    assert from_meta == trace_boundaries(layers, torch.zeros(2, 3))


def test_plain_modules_are_used_as_given_but_copied_by_the_reference():
    plain = nn.Linear(2, 2)
    layers = [plain, LayerSpec(nn.ReLU)]
    assert materialize(layers, [0], "cpu")[0] is plain
    reference = build_reference(layers)
    assert reference[0] is not plain
    assert_same_weights(reference[0], plain)


def test_materialize_refuses_out_of_range_indices():
    with pytest.raises(ConfigError, match="layer index 7 is out of range; the model has 7 layers"):
        materialize(mlp(), [0, 7], "cpu")
    with pytest.raises(ConfigError, match="layer index -1"):
        materialize(mlp(), [-1], "cpu")


# --- trace_boundaries -----------------------------------------------------------------------


def test_trace_mlp_shapes_for_several_batch_sizes():
    layers = mlp(num_hidden=2, width=5)
    meta = meta_layers(layers)
    for batch in (1, 3, 8):
        boundaries = trace_boundaries(layers, torch.zeros(batch, 3), meta=meta)
        assert boundaries == [TensorMeta(((batch, 5),), (torch.float32,), False)] * len(layers)


def test_trace_transformer_with_tuple_boundaries():
    layers = transformer(num_blocks=2)
    meta = meta_layers(layers)
    for batch, seq in ((2, 4), (5, 3)):
        ids = torch.zeros(batch, seq, dtype=torch.long)
        boundaries = trace_boundaries(layers, ids, meta=meta)
        pair = TensorMeta(((batch, seq, WIDTH), (batch, seq)), (torch.float32, torch.bool), True)
        assert boundaries[:3] == [pair, pair, pair]
        assert boundaries[3] == TensorMeta(((batch, seq, WIDTH),), (torch.float32,), False)
        assert boundaries[4] == TensorMeta(((batch, seq, VOCAB),), (torch.float32,), False)
        assert boundaries[0].differentiable == (True, False)


def test_trace_matches_a_real_forward():
    layers = transformer(num_blocks=1)
    reference = build_reference(layers)
    value = token_ids(batch=3)
    boundaries = trace_boundaries(layers, value)
    for index, layer in enumerate(layers):
        value = apply_layer(layer, reference[index], value)
        assert boundaries[index].mismatch(value) is None


def test_trace_accepts_plain_modules_and_tuple_samples():
    class Pair(nn.Module):
        def forward(self, inputs):
            a, b = inputs
            return a + b, a * b

    layers = [Pair(), Pair()]
    out = trace_boundaries(layers, (torch.zeros(2, 3), torch.zeros(2, 3)))
    assert out[1] == TensorMeta(((2, 3), (2, 3)), (torch.float32, torch.float32), True)


def test_trace_names_the_layer_that_does_not_fit():
    layers = [LayerSpec(nn.Linear, 3, 5), LayerSpec(nn.Linear, 4, 2)]
    pattern = r"layer 1 \(Linear\) failed on the meta device with input float32\[2, 5\]"
    with pytest.raises(ConfigError, match=pattern):
        trace_boundaries(layers, torch.zeros(2, 3))


def test_trace_refuses_non_tensor_outputs_and_samples():
    class ReturnsNone(nn.Module):
        def forward(self, x):
            return x, None

    with pytest.raises(ConfigError, match=r"the output of layer 0 \(ReturnsNone\).*\['Tensor', 'NoneType'\]"):
        trace_boundaries([ReturnsNone()], torch.zeros(1))
    with pytest.raises(ConfigError, match=r"sample must be a tensor.*got \['list'\]; pass a batch tensor"):
        trace_boundaries([nn.ReLU()], [[1.0]])


def test_trace_refuses_meta_of_the_wrong_length():
    layers = mlp()
    with pytest.raises(ConfigError, match=f"meta has 1 modules but layers has {len(layers)}"):
        trace_boundaries(layers, torch.zeros(1, 3), meta=meta_layers(layers)[:1])


# --- TensorMeta -----------------------------------------------------------------------------


def test_tensor_meta_allocates_and_describes():
    pair = TensorMeta(((2, 3), (2,)), (torch.float16, torch.int64), True)
    assert str(pair) == "(float16[2, 3], int64[2])"
    assert pair.num_bytes == 2 * 3 * 2 + 2 * 8
    a, b = pair.empty("cpu", requires_grad=True)
    assert (a.shape, a.dtype, a.requires_grad) == ((2, 3), torch.float16, True)
    assert (b.shape, b.dtype, b.requires_grad) == ((2,), torch.int64, False)
    single = TensorMeta.of(torch.zeros(4))
    assert str(single) == "float32[4]"
    assert isinstance(single.empty("meta"), torch.Tensor)
    assert str(TensorMeta.of((torch.zeros(1),))) == "(float32[1],)"


def test_tensor_meta_mismatch_says_what_differs():
    single = TensorMeta.of(torch.zeros(4))
    assert single.mismatch(torch.ones(4)) is None
    assert single.mismatch(torch.zeros(5)) == "expected float32[4], got float32[5]"
    assert "got NoneType" in (single.mismatch(None) or "")


def test_tensor_meta_refuses_inconsistent_fields():
    with pytest.raises(ConfigError, match="2 shapes but 1 dtypes"):
        TensorMeta(((1,), (2,)), (torch.float32,), True)
    with pytest.raises(ConfigError, match="is_tuple=False must describe exactly 1 tensor, got 2"):
        TensorMeta(((1,), (2,)), (torch.float32, torch.float32), False)
    with pytest.raises(ConfigError, match=r"got \[\]"):
        TensorMeta.of(())


def test_models_fixture_classes_are_real_layers():
    # Guards the shared fixtures: the tuple convention only means something if Block really consumes a tuple.
    hidden, mask = Embed(VOCAB, WIDTH)(token_ids(2))
    out, same_mask = Block(WIDTH)((hidden, mask))
    assert out.shape == hidden.shape and same_mask is mask
    assert torch.equal(Final()((out, mask))[:, -1], torch.zeros(2, WIDTH))
