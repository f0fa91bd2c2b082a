"""Where one split backward's `I` and `W` spend their time, in one process (this checkout).

    .venv/bin/python benchmarks/backward_breakdown.py [--repeats 1500]

One stage of the per-action probe's `tiny` workload (4 residual MLP blocks, d=8, one sample),
called as the executor calls it (the stage's parameter tuple, one `GroupCache`). Each repeat
runs a fresh forward (not timed), then `I`'s steps one by one with a clock read between them
(the same calls `backward_input` makes on its common path), then `W`; then, after fresh
forwards, autograd's engine as `B` calls it and as an `I` with no captured edges calls it, and
`W`'s torch calls alone (the direct groups' arithmetic with no checks around it). "graph walk" is
the C++ walk where it is built (`pipefold.runtime.native`; then "plan lookup" and "group cache"
are nothing and "capture edges" builds the edges from its frontier nodes), the Python walk with
`--python-walk`. Prints the median µs of each part ("(nothing)": two clock reads in a row).
Every graph is dropped outside the timed parts (freeing one costs tens of µs, which a rebound
name would charge to a step). The parts are this checkout's internals: it runs against no
baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/backward_breakdown.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1500)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--cpu-time", action="store_true",
                        help="the thread's CPU clock instead of the wall clock")
    parser.add_argument("--python-walk", action="store_true",
                        help="always the Python walk (`graph_shape`), as where the C++ walk is not built")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    import pipefold.runtime.backward as bw
    import pipefold.runtime.backward_groups as bg
    import pipefold.runtime.backward_plan as bp
    from pipefold.model.zoo import ResidualMLP

    torch.set_num_threads(1)
    torch.manual_seed(0)
    stage = torch.nn.Sequential(*[ResidualMLP(args.width) for _ in range(4)])
    params = tuple(stage.parameters())
    for param in params:
        param.grad = torch.zeros_like(param)
    x = torch.randn(1, args.width)
    grad = torch.randn(1, args.width)
    cache = bp.GroupCache()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    engine = torch.autograd.graph._engine_run_backward
    layer_norm_backward = bg._native_layer_norm_backward
    steps = ["(nothing)", "roots", "check inputs", "graph walk", "plan lookup", "group cache",
             "capture edges", "engine (I)", "state"]
    extra = ["W", "W's torch calls alone", "engine as B", "engine, input only"]
    times: dict[str, list[float]] = {name: [] for name in [*steps, "I total", *extra]}
    for repeat in range(args.repeats):
        leaf = x.detach().requires_grad_()
        out = stage(leaf)
        marks = [clock()]
        marks.append(clock())
        roots, root_grads = bw._roots((out,), (grad,))
        marks.append(clock())
        wanted = bw._check_inputs((leaf,))
        wanted_inputs = [leaf]
        marks.append(clock())
        # The C++ walk (`GroupCache.walked`, as `backward_input` asks it) where it is built and
        # has seen the stage's shape, else the Python walk and its plan lookups.
        walked = None if args.python_walk else cache.walked
        frontier = None if walked is None else walked.match(walked.signature, roots, wanted_inputs, params)
        nodes = edges = None
        if frontier is None:
            key, nodes, edges = bp.graph_shape(roots, wanted_inputs, params, cache.leaves(params))
        marks.append(clock())
        if frontier is None:
            shape = cache.shape(key)
            if shape is None:
                shape = bp.plan_shape(key, nodes, edges, roots, root_grads, wanted_inputs, params)
        else:
            shape = walked.shape
        marks.append(clock())
        if frontier is None:
            prepared = cache.get(shape, params)
            if not args.python_walk:
                cache.remember(roots, wanted_inputs, params, shape, prepared)
            frontier = prepared.frontiers(nodes)
        else:
            prepared = walked.prepared
        assert prepared.lean, "the stage's plan is expected to take the lean path"
        marks.append(clock())
        engine_inputs = [*wanted_inputs, *prepared.edges_at(frontier)]
        marks.append(clock())
        found = bw._run_engine(roots, root_grads, engine_inputs, retain_graph=True, accumulate_grad=False,  # type: ignore[arg-type]
                               tensors=(*roots, *wanted_inputs))
        marks.append(clock())
        state = bw.WeightGradState(_disjoint=shape.disjoint, _plans=prepared.plans,
                                   _nodes=frontier,
                                   _kept=list(found[len(wanted):]))
        del frontier, nodes, edges, engine_inputs, found
        marks.append(clock())
        w_start = clock()
        bw.backward_weight(state)
        w_end = clock()
        # W's arithmetic alone: the same torch calls on a fresh I's state, no checks around them.
        leaf = x.detach().requires_grad_()
        _, state = bw.backward_input((stage(leaf),), (grad,), (leaf,), params, cache=cache)
        plans, frontier_nodes, kept = state._plans, state._nodes, state._kept
        torch._C._set_grad_enabled(False)
        a_start = clock()
        for plan in plans:
            direct = plan.direct
            position, at, _ = plan.frontiers[0]
            node, g = frontier_nodes[position], kept[at]
            if direct.kind == "layer_norm":
                _, weight_grad, bias_grad = layer_norm_backward(
                    g, node._saved_input, list(node._saved_normalized_shape), node._saved_result1,
                    node._saved_result2, node._saved_weight, node._saved_bias, [False, True, True])
                direct.weight.grad.add_(weight_grad)
                direct.bias.grad.add_(bias_grad)
            else:
                direct.weight.grad.addmm_(g.t(), node._saved_mat1)
                direct.bias.grad.add_(g.sum(0))
        a_end = clock()
        torch._C._set_grad_enabled(True)
        state._plans = ()
        leaf = x.detach().requires_grad_()
        out = stage(leaf)
        b_start = clock()
        engine((out,), (grad,), False, False, (), allow_unreachable=True, accumulate_grad=True)
        b_end = clock()
        leaf = x.detach().requires_grad_()
        out = stage(leaf)
        i_start = clock()
        engine((out,), (grad,), False, False, (leaf,), allow_unreachable=True, accumulate_grad=False)
        i_end = clock()
        del roots, root_grads, wanted, wanted_inputs, shape, prepared, state, out, leaf, walked
        if repeat >= args.repeats // 10:  # the first tenth warms up
            for name, start, end in zip(steps, marks[:-1], marks[1:], strict=True):
                times[name].append(end - start)
            times["I total"].append(marks[-1] - marks[1])
            times["W"].append(w_end - w_start)
            times["W's torch calls alone"].append(a_end - a_start)
            times["engine as B"].append(b_end - b_start)
            times["engine, input only"].append(i_end - i_start)
    for name, values in times.items():
        print(f"{name:24s} {statistics.median(values) * 1e6:8.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
