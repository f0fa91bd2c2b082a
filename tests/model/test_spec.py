import pytest
import torch
from torch import nn

from pipefold.errors import ConfigError
from pipefold.model import LayerSpec, TiedLayerSpec, layer_name


class Counted(nn.Module):
    num_built = 0

    def __init__(self, width: int, *, bias: bool = True) -> None:
        super().__init__()
        Counted.num_built += 1
        self.linear = nn.Linear(width, width, bias=bias)


def test_spec_builds_nothing_until_asked():
    Counted.num_built = 0
    spec = LayerSpec(Counted, 4, bias=False)
    assert Counted.num_built == 0
    module = spec.build()
    assert Counted.num_built == 1
    assert isinstance(module, Counted)
    assert module.linear.bias is None


def test_build_on_meta_allocates_nothing():
    module = LayerSpec(nn.Linear, 1000, 1000).build("meta")
    assert all(p.is_meta for p in module.parameters())


def test_build_moves_tensors_created_with_explicit_device():
    class ExplicitCpu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.ones(3, device="cpu"))

    module = LayerSpec(ExplicitCpu).build("meta")
    assert all(b.is_meta for b in module.buffers())


def test_factory_callables_are_accepted():
    spec = LayerSpec(lambda: nn.Linear(2, 3))
    assert spec.build().out_features == 3
    assert spec.name == "<lambda>"


def test_names_and_repr():
    assert layer_name(LayerSpec(nn.Linear, 2, 3)) == "Linear"
    assert layer_name(nn.ReLU()) == "ReLU"
    assert repr(LayerSpec(nn.Linear, 2, 3, bias=False)) == "LayerSpec(Linear, 2, 3, bias=False)"
    assert "key='embed'" in repr(TiedLayerSpec("embed", nn.Embedding, 5, 2))


def test_tied_parameter_follows_dotted_attr():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(2, 2)

    spec = TiedLayerSpec("w", Wrapper, tied_weight_attr="inner.weight")
    module = spec.build()
    assert spec.tied_parameter(module) is module.inner.weight


def test_tied_parameter_names_the_bad_attr():
    spec = TiedLayerSpec("w", nn.Linear, 2, 2, tied_weight_attr="kernel")
    with pytest.raises(ConfigError, match=r"'kernel'.*\['weight', 'bias'\]"):
        spec.tied_parameter(spec.build())


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: LayerSpec(3), "cls must be an nn.Module class.*got 3"),
        (lambda: TiedLayerSpec("", nn.Linear, 2, 2), "key must be a non-empty string, got ''"),
        (lambda: TiedLayerSpec("k", nn.Linear, 2, 2, forward_fn=5), "forward_fn must be callable.*got 5"),
        (lambda: TiedLayerSpec("k", nn.Linear, 2, 2, tied_weight_attr=""), "tied_weight_attr.*got ''"),
    ],
)
def test_bad_specs_raise_config_error(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


def test_build_of_a_non_module_raises_config_error():
    with pytest.raises(ConfigError, match="built a int, not an nn.Module"):
        LayerSpec(int, 3).build()
