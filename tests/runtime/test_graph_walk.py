"""The C++ graph walk (pipefold.runtime.native) matches a graph exactly where `graph_shape`'s key
does, hands back the nodes the Python walk finds, and the split backward falls back to the
Python walk wherever the extension is off or cannot load, with the same gradients."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from pipefold.runtime import native
from pipefold.runtime.backward import GroupCache, backward_input, backward_weight
from pipefold.runtime.backward_plan import graph_shape

torch.set_num_threads(1)

D = 4


@pytest.fixture(scope="module")
def walk() -> native.GraphWalk:
    """The extension, built here if `scripts/setup` has not (about 12 s); a machine without a
    C++ compiler skips, one with a compiler must build it."""
    native.reset()
    built = native.build()
    found = native.load()
    if found is None:
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler: the Python walk runs (tested below)")
        pytest.fail(f"the C++ graph walk did not build or load (built: {built}); see the log")
    return found


class Twin(torch.autograd.Function):
    """An identity; `Other` is the same Function under another class."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x * 1.0

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad


class Other(Twin):
    pass


def _params() -> tuple[Tensor, ...]:
    torch.manual_seed(0)
    return tuple(torch.randn(D, D, requires_grad=True) for _ in range(4))


def _graph(params: tuple[Tensor, ...], change: str = "") -> tuple[list[Tensor], list[Tensor]]:
    """(roots, inputs) of a small stage's graph: two layers, a residual, a custom Function; each
    `change` differs from the base graph in one way."""
    x = torch.randn(1, D, requires_grad=True)
    w1, w2, w3, w4 = params
    if change == "param swapped":
        w1, w2 = w2, w1
    if change == "frozen param":
        w3 = w3.detach()  # a parameter that needs no gradient: its edge is missing
    h = torch.tanh(x @ w1) if change != "node kind" else torch.relu(x @ w1)
    h = (Other if change == "function class" else Twin).apply(h @ w2)  # type: ignore[no-untyped-call]
    h = h + (x if change != "child" else h)
    other = torch.randn(1, D, requires_grad=True)
    out = h @ w3 + (other if change == "input leaf" else x) @ w4
    roots = [out]
    if change == "extra output":
        roots.append(h * 2.0)
    return roots, [x]


CHANGES = ["node kind", "child", "param swapped", "input leaf", "function class", "frozen param",
           "extra output"]


def _agree(walk: native.GraphWalk, change: str) -> bool:
    """Whether the graph with `change` matches the base graph's signature, checked to be
    whether `graph_shape` keys them alike; where it matches, the nodes are the Python walk's."""
    params = _params()
    roots, inputs = _graph(params)
    key, nodes, _ = graph_shape(roots, inputs, params)
    wanted = tuple(range(len(nodes)))
    signature = walk.record(roots, inputs, params, wanted)
    assert signature is not None
    roots, inputs = _graph(params, change)
    other_key, other_nodes, _ = graph_shape(roots, inputs, params)
    found = walk.match(signature, roots, inputs, params)
    assert (found is not None) == (other_key == key), change
    if found is not None:
        assert len(found) == len(other_nodes)
        assert all(a is b for a, b in zip(found, other_nodes, strict=True))
    return found is not None


def test_a_graph_of_the_same_shape_matches_and_gives_the_python_walks_nodes(walk: native.GraphWalk) -> None:
    assert _agree(walk, "")


@pytest.mark.parametrize("change", CHANGES)
def test_a_graph_that_differs_in_one_way_does_not_match(walk: native.GraphWalk, change: str) -> None:
    assert not _agree(walk, change)


def test_the_nodes_returned_are_the_wanted_walk_indices(walk: native.GraphWalk) -> None:
    params = _params()
    roots, inputs = _graph(params)
    signature = walk.record(roots, inputs, params, (5, 0, 3))
    roots, inputs = _graph(params)
    _, nodes, _ = graph_shape(roots, inputs, params)
    found = walk.match(signature, roots, inputs, params)
    assert found is not None
    assert [id(node) for node in found] == [id(nodes[5]), id(nodes[0]), id(nodes[3])]


def test_another_params_tuple_or_a_bad_argument_does_not_match(walk: native.GraphWalk) -> None:
    params = _params()
    roots, inputs = _graph(params)
    signature = walk.record(roots, inputs, params, (0,))
    roots, inputs = _graph(params)
    # The signature names parameters by position in the recorded tuple: an equal tuple that is
    # another object is not trusted (the Python walk then records anew).
    assert walk.match(signature, roots, inputs, tuple(params)[::-1][::-1]) is None
    assert walk.match(signature, roots, [1.0], params) is None  # type: ignore[list-item]
    assert walk.match(object(), roots, inputs, params) is None
    assert walk.record(roots, inputs, list(params), (0,)) is None  # type: ignore[arg-type]
    assert walk.record(roots, inputs, params, (10_000,)) is None
    assert walk.match(signature, roots, inputs, params) is not None


def _split_run(micro_batches: int = 3) -> tuple[list[Tensor | None], GroupCache]:
    params = _params()
    cache = GroupCache()
    found: list[Tensor | None] = []
    for _ in range(micro_batches):
        roots, inputs = _graph(params)
        grads, state = backward_input(roots, [torch.ones_like(roots[0])], inputs, params, cache=cache)
        backward_weight(state)
        found.extend(grads)
    return found + [p.grad for p in params], cache


@pytest.fixture
def python_walk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """A function that forces the Python walk (as `PIPEFOLD_PYTHON_WALK=1` does for a job)."""

    def force() -> None:
        monkeypatch.setenv(native.FORCE_PYTHON_ENV, "1")
        native.reset()

    yield force
    native.reset()


def test_the_split_backward_uses_the_c_walk_and_computes_what_the_python_walk_does(
    walk: native.GraphWalk, python_walk: Callable[[], None]
) -> None:
    with_c, cache = _split_run()
    assert cache.walked is not None
    python_walk()
    with_python, cache = _split_run()
    assert cache.walked is None
    assert all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(with_c, with_python, strict=True)
    )


def test_no_extension_built_or_loadable_falls_back_to_the_python_walk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path))
    native.reset()
    try:
        assert native.load() is None  # nothing built there: no build in a rank, no error
        native.reset()
        target = native.build_dir() / "pipefold_graph_walk.so"
        target.parent.mkdir(parents=True)
        target.write_bytes(b"not a library")
        with caplog.at_level(logging.WARNING, logger="pipefold.runtime.native"):
            assert native.load() is None
        assert "does not load" in caplog.text
        found, cache = _split_run(2)
        assert cache.walked is None and all(g is not None for g in found)
    finally:
        native.reset()


def test_a_failed_build_is_logged_once_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(native.NATIVE_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="pipefold.runtime.native"):
        assert native.build() is None
        assert native.build() is None
    assert caplog.text.count("building the C++ graph walk failed") == 1
    assert (native.build_dir() / "build-failed.txt").exists()


def test_a_c_walk_stricter_than_the_python_key_is_dropped_for_the_stage(walk: native.GraphWalk) -> None:
    """A miss where the Python walk then finds the recorded plan (never seen with the real walk)
    stops the stage asking the C++ walk, instead of paying for both walks every micro-batch."""
    params = _params()
    cache = GroupCache()
    roots, inputs = _graph(params)
    _, state = backward_input(roots, [torch.ones_like(roots[0])], inputs, params, cache=cache)
    backward_weight(state)
    assert cache.walked is not None
    cache.walked = cache.walked._replace(match=lambda *args: None)
    roots, inputs = _graph(params)
    _, state = backward_input(roots, [torch.ones_like(roots[0])], inputs, params, cache=cache)
    backward_weight(state)
    assert cache.walked is None
    roots, inputs = _graph(params)
    _, state = backward_input(roots, [torch.ones_like(roots[0])], inputs, params, cache=cache)
    backward_weight(state)
    assert cache.walked is None  # not recorded again
