"""The one run of a module's forward that `pipefold.model.split` cuts by: hooks record the
arguments of the first block's call and the chain of module calls after the last block, and
a `Template` keeps a call's arguments with its tensors taken out (the non-tensor ones are
fixed at split time, the tensors travel along the pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from pipefold.errors import ConfigError

__all__ = ["NotAChain", "Template", "hidden_of", "meta_tree", "on_meta_device", "trace_calls"]


class _Slot:
    """Where a tensor argument goes in a call template."""

    def __repr__(self) -> str:
        return "<tensor>"


_SLOT = _Slot()


@dataclass(frozen=True)
class Template:
    """A call's arguments with the tensors taken out: the pytree spec and its leaves, a
    tensor leaf replaced by `_SLOT`."""

    spec: pytree.TreeSpec
    leaves: tuple[Any, ...]

    def __deepcopy__(self, memo: dict[int, Any]) -> Template:
        return self  # immutable; and copying a TreeSpec warns in torch 2.13

    @property
    def num_tensors(self) -> int:
        return sum(1 for leaf in self.leaves if leaf is _SLOT)

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Template, list[Tensor]]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        template = cls(spec, tuple(_SLOT if isinstance(leaf, Tensor) else leaf for leaf in leaves))
        return template, tensors

    def fill(self, tensors: Sequence[Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        values = iter(tensors)
        leaves = [next(values) if leaf is _SLOT else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)

    def tensors_of(self, args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> list[Tensor]:
        """The tensors of a call shaped like this template; refuses changed constants."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if spec != self.spec or len(leaves) != len(self.leaves):
            raise ConfigError(
                f"{where}: the forward called the first block with other arguments than at split time "
                f"({spec} vs {self.spec}); call split() with example_inputs shaped like the training batches"
            )
        tensors = []
        for leaf, expected in zip(leaves, self.leaves, strict=True):
            if expected is _SLOT:
                if not isinstance(leaf, Tensor):
                    raise ConfigError(
                        f"{where}: a block argument that was a tensor at split time is {leaf!r}"
                    )
                tensors.append(leaf)
            elif not _same_constant(leaf, expected):
                raise ConfigError(
                    f"{where}: a non-tensor block argument changed from {expected!r} at split time to "
                    f"{leaf!r}; the blocks receive the split-time value, so pass inputs that keep it"
                )
        return tensors


class NotAChain(ConfigError):
    """The forward passes something other than the hidden state between its blocks, or computes
    more than a chain of module calls after them (a skip connection around the blocks): not cut
    at block boundaries by hooks; `split` then tries the graph route."""


def _same_constant(value: Any, expected: Any) -> bool:
    if value is expected:
        return True
    try:
        return bool(value == expected) and type(value) is type(expected)
    except Exception:  # objects whose == raises or is not a bool (arrays) count as changed
        return False


def hidden_of(output: Any) -> Any:
    """A block's hidden state: its output, or the first element of a tuple it returns."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


def _model_output(output: Any) -> Any:
    """The tensor a module's forward gives as its result (`.logits` of a Hugging Face output)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return output


@dataclass
class _Call:
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


def meta_tree(value: Any) -> Any:
    return pytree.tree_map(
        lambda leaf: torch.empty_like(leaf, device="meta") if isinstance(leaf, Tensor) else leaf, value
    )


def _is_same_or_whole_view(value: Any, of: Tensor) -> bool:
    if value is of:
        return True
    return (
        isinstance(value, Tensor)
        and value._base is not None
        and (value._base is of or value._base is of._base)
        and value.shape == of.shape
        and value.stride() == of.stride()
        and value.storage_offset() == of.storage_offset()
    )


def on_meta_device(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters()) or not any(True for _ in module.parameters())


def trace_calls(
    module: nn.Module,
    blocks_path: str,
    num_blocks: int,
    example: tuple[Any, ...],
    call_kwargs: dict[str, Any],
) -> tuple[Template, list[tuple[str, Template, int]]]:
    """Run the forward once and read the prefix's call of the first block and the chain of
    module calls after the last one. A module with real weights runs itself (no_grad, a
    batch shaped like `example`); a module on the meta device runs on meta inputs."""
    on_meta = on_meta_device(module)
    meta = module
    blocks = list(meta.get_submodule(blocks_path).children())
    block_calls: list[_Call] = []
    after: list[_Call] = []
    active: list[str] = []
    done = [False]
    handles = []

    def enter_block(index: int) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            block_calls.append(_Call(f"{blocks_path}.{index}", args, kwargs))
        return hook

    def leave_block(index: int) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            block_calls[-1].output = output
            done[0] = index == num_blocks - 1
        return hook

    def enter(path: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if done[0]:
                if not active:
                    after.append(_Call(path, args, kwargs))
                active.append(path)
        return hook

    def leave(path: str) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if active and active[-1] == path:
                active.pop()
                if not active and after and after[-1].path == path:
                    after[-1].output = output
        return hook

    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter_block(index), with_kwargs=True))
        handles.append(block.register_forward_hook(leave_block(index), with_kwargs=True))
    inside_blocks = f"{blocks_path}."
    for path, sub in meta.named_modules():
        if not path or path == blocks_path or path.startswith(inside_blocks):
            continue
        if blocks_path.startswith(path + "."):
            continue  # an ancestor of the blocks: entered before them, left after them
        handles.append(sub.register_forward_pre_hook(enter(path), with_kwargs=True))
        handles.append(sub.register_forward_hook(leave(path), with_kwargs=True))
    try:
        if on_meta:
            # Tensors the forward creates (masks, position ids) are made on meta too.
            with torch.no_grad(), torch.device("meta"):
                output = meta(*meta_tree(example), **call_kwargs)
        else:
            with torch.no_grad():
                output = meta(*example, **call_kwargs)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(
            f"split: {type(module).__name__}.forward failed on example_inputs"
            f"{' (on the meta device)' if on_meta else ''} "
            f"({type(error).__name__}: {error}); pass example_inputs shaped like one training batch"
            + ("; a module on the meta device must run on meta tensors (no .item() or data-dependent "
               "shapes): build it with real weights instead" if on_meta else "")
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    name = type(module).__name__
    order = [call.path for call in block_calls]
    expected = [f"{blocks_path}.{index}" for index in range(num_blocks)]
    if order != expected:
        raise ConfigError(
            f"split: {name}.forward called its blocks as {order}, not once each in order {expected[:3]}...; "
            "a module used at two depths, or blocks skipped by data-dependent control flow, cannot be cut "
            "at block boundaries"
        )
    first = block_calls[0]
    if not first.args or not isinstance(first.args[0], Tensor):
        raise NotAChain(
            f"split: {name} calls {first.path} without a hidden-state tensor as its first argument"
        )
    template, tensors = Template.of(first.args[1:], first.kwargs)
    for previous, call in zip(block_calls, block_calls[1:], strict=False):
        hidden = hidden_of(previous.output)
        rest_template, rest = Template.of(call.args[1:], call.kwargs)
        same = (
            call.args
            and call.args[0] is hidden
            and rest_template.spec == template.spec
            and len(rest) == len(tensors)
            and all(a is b for a, b in zip(rest, tensors, strict=True))
            and all(
                _same_constant(a, b) for a, b in zip(rest_template.leaves, template.leaves, strict=True)
            )
        )
        if not same:
            raise ConfigError(
                f"split: {name} calls {call.path} with other inputs than {previous.path}'s output and the "
                "first block's other arguments; the data passed between its blocks cannot be carried "
                "at block boundaries"
            )
    value = hidden_of(block_calls[-1].output)
    chain: list[tuple[str, Template, int]] = []
    for call in after:
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        tensor_leaves = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        positions = [i for i, arg in enumerate(call.args) if isinstance(arg, Tensor)]
        if len(tensor_leaves) != 1 or len(positions) != 1 or not _is_same_or_whole_view(
            call.args[positions[0]], value
        ):
            raise NotAChain(
                f"split: after its blocks, {name} calls {call.path} on something other than the previous "
                "module's output alone; the code after the last block must be a chain of module calls "
                "(final norm, head)"
            )
        position = positions[0]
        others = call.args[:position] + call.args[position + 1 :]
        call_template, _ = Template.of(others, call.kwargs)
        chain.append((call.path, call_template, position))
        value = call.output
        if not isinstance(value, Tensor):
            raise ConfigError(
                f"split: {name}'s {call.path} after the blocks returns a {type(value).__name__}"
            )
    result = _model_output(output)
    if not isinstance(result, Tensor) or not _is_same_or_whole_view(result, value):
        raise NotAChain(
            f"split: {name}.forward's result is not the output of its last module call after the blocks "
            f"({chain[-1][0] if chain else 'the last block'}); computations after the blocks outside "
            "modules cannot be cut at block boundaries"
        )
    return template, chain
