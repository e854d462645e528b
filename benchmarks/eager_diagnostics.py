"""Why an eager decode step is slower than BF16's: the checks behind docs/PERF.md's eager bullet (thirty-fourth run).

    python benchmarks/eager_diagnostics.py [--alternate ROUNDS] [--batches 1,8,32] [--unfolded] [--graphs [--folded-in-graphs]]

On the Llama-3.1-8B-shaped model (random weights, batch 1, a 16-token prompt, DecodeSession(cuda_graph=False)),
BF16 and then the same model quantized by sharq, each: the step's time by CUDA events (each step from an idle GPU)
and the host's wall time in step() (min / median / max over 12 steps), with Python's garbage collector on and off;
the synchronizing operations in one step (torch.cuda.set_sync_debug_mode("warn") warns at each); and the host's
wall time a step inside each kind of module (timing hooks on them, which add their own cost to every module).

With --alternate ROUNDS, BF16 and a sharq copy of it are both held on the GPU (about 22 GB) and their eager steps
are timed in turn, ROUNDS rounds at each batch size (which goes first alternating), so the ratio of each round
compares two models under the same process's host speed: eager steps are host-bound, and a process's host speed
was seen to vary by as much as the gap between the two (docs/PERF.md). With --without-prepare a third copy joins
them whose eager plans replay their first call's activation (the prepare launch skipped from then on; its outputs
are wrong): the host time of one launch a layer fewer, the most that folding the activation kernel into the GEMM
can give an eager step. With --unfolded a copy whose plans launch the prepare and the GEMM apart (where the decode
kernel's launches prepare their activation themselves in eager calls by default) joins them too. With --graphs the
steps are CUDA-graph replays (DecodeSession(cuda_graph=True)), and --folded-in-graphs adds a copy whose plans fold
inside the graphs too (packed.FOLD_IN_GRAPHS on while they are made).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from dataclasses import replace

import torch

import sharq
from sharq.backends import packed
from sharq.nn import SharQLinear
from bench_model import llama_8b_shaped  # benchmarks/, beside this script
from timing import timed_steps, warm_session

MODULES = ("LlamaAttention", "LlamaMLP", "LlamaDecoderLayer", "LlamaRMSNorm", "SharQLinear", "Linear")


@torch.no_grad()
def run(model, label: str, steps: int = 12) -> None:
    """Print the step's diagnostics for `model` (see the module's docstring)."""
    session, token = warm_session(model, 1, 16 + 4 * steps + 8, cuda_graph=False)
    torch.cuda.synchronize()
    for mode in ("gc on", "gc off"):
        if mode == "gc off":
            gc.collect()
            gc.disable()
        token, times, host = timed_steps(session, token, steps)
        gc.enable()
        print(f"{label:6s} {mode:6s} step {statistics.median(times):7.2f} ms  host wall min/med/max "
              f"{min(host):.2f}/{statistics.median(host):.2f}/{max(host):.2f} ms", flush=True)
    torch.cuda.set_sync_debug_mode("warn")  # a warning at each synchronizing operation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token = session.step(token).argmax(-1)
    torch.cuda.set_sync_debug_mode(0)
    messages = sorted({str(w.message)[:160] for w in caught})
    print(f"{label:6s} sync warnings in one step: {len(caught)} {messages[:5]}", flush=True)
    inside: dict[str, float] = {}

    def enter(module, _args):
        module._began = time.perf_counter()

    def leave(module, _args, _output):
        name = type(module).__name__
        inside[name] = inside.get(name, 0.0) + time.perf_counter() - module._began

    hooks = []
    for m in model.modules():
        if type(m).__name__ in MODULES:
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    n = 4
    for _ in range(n):
        token = session.step(token).argmax(-1)
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    print(f"{label:6s} host ms a step inside modules (with hooks): "
          + ", ".join(f"{k} {v * 1e3 / n:.2f}" for k, v in sorted(inside.items())), flush=True)


def _first_result(prepare):
    """`prepare` run once; later calls return that first activation without launching anything."""
    first = []

    def replay(x):
        if not first:
            first.append(prepare(x))
        return first[0]
    return replay


def without_prepare(model: torch.nn.Module) -> int:
    """Make every eager plan of `model`'s quantized layers (and of their groups) skip its prepare launch after its
    first call (see the module's docstring; a folded launch, which prepares inside it, is dropped); the number of
    plans changed."""
    changed, groups = 0, set()
    for m in model.modules():
        if not isinstance(m, SharQLinear):
            continue
        plans = m.__dict__["_plans"]
        for key, plan in list(plans.items()):
            if plan is not None:
                plans[key] = replace(plan, prepare=_first_result(plan.prepare), forward=None)
                changed += 1
        if m.shared is not None and id(m.shared) not in groups:
            groups.add(id(m.shared))
            for key, plan in list(m.shared._group_plans.items()):
                if plan is not None and (plan.prepare is not None or plan.forward is not None):
                    # without its folded launch a group multiplies its members' (replayed) activation
                    prepare = None if plan.prepare is None else _first_result(plan.prepare)
                    m.shared._group_plans[key] = replace(plan, prepare=prepare, forward=None)
                    changed += 1
    return changed


@torch.no_grad()
def alternate(models: dict[str, torch.nn.Module], batch: int, rounds: int, steps: int = 8,
              cuda_graph: bool = False) -> None:
    """Decode steps of each model in turn (eager, or graph replays with `cuda_graph`), `rounds` rounds of `steps`
    steps: each round's median ms a step and host wall ms in step(), and the first model's step time over each
    other's (its speed-up) in that round. A model named "no-prepare" has its plans' prepare launches skipped once
    warm (`without_prepare`); one named "unfolded" has its plans made without folded launches (packed.FOLD_PREPARE
    off while it warms up, when they are made), one named "folded-in-graphs" with packed.FOLD_IN_GRAPHS on."""
    names = list(models)
    sessions, tokens = {}, {}
    for name, model in models.items():
        switches = packed.FOLD_PREPARE, packed.FOLD_IN_GRAPHS
        packed.FOLD_PREPARE = name != "unfolded" and packed.FOLD_PREPARE
        packed.FOLD_IN_GRAPHS = name == "folded-in-graphs" or packed.FOLD_IN_GRAPHS
        try:
            sessions[name], tokens[name] = warm_session(model, batch, 16 + (rounds + 1) * steps + 4,
                                                        cuda_graph=cuda_graph)
        finally:
            packed.FOLD_PREPARE, packed.FOLD_IN_GRAPHS = switches
        if name == "no-prepare":
            print(f"batch {batch:2d} no-prepare: {without_prepare(model)} plans replay their first activation")
    torch.cuda.synchronize()
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    for r in range(rounds):
        step_ms, host_ms = {}, {}
        for name in names if r % 2 == 0 else names[::-1]:
            tokens[name], times, host = timed_steps(sessions[name], tokens[name], steps)
            step_ms[name], host_ms[name] = statistics.median(times), statistics.median(host)
        for n in names[1:]:
            ratios[n].append(step_ms[names[0]] / step_ms[n])
        print(f"batch {batch:2d} round {r}: " + "  ".join(f"{n} {step_ms[n]:.2f} ms (host {host_ms[n]:.2f})"
                                                        for n in names)
              + "  " + "  ".join(f"{n} {ratios[n][-1]:.3f}x" for n in names[1:]), flush=True)
    for n in names[1:]:
        v = ratios[n]
        print(f"batch {batch:2d} {n} over {names[0]}: median {statistics.median(v):.3f}x, min {min(v):.3f}, "
              f"max {max(v):.3f} over {rounds} rounds", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                   help="time BF16 and sharq in turn, in one process, this many rounds (0: the diagnostics)")
    p.add_argument("--batches", default="1", help="comma-separated batch sizes for --alternate")
    p.add_argument("--without-prepare", action="store_true",
                   help="with --alternate, also time a sharq copy whose eager plans skip their prepare launch")
    p.add_argument("--unfolded", action="store_true",
                   help="with --alternate, also time a sharq copy whose plans launch prepare and GEMM apart")
    p.add_argument("--graphs", action="store_true", help="with --alternate, time CUDA-graph steps instead of eager")
    p.add_argument("--folded-in-graphs", action="store_true",
                   help="with --alternate, also time a sharq copy whose plans fold inside CUDA graphs too")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("eager_diagnostics needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = llama_8b_shaped(32)
    if args.alternate:
        models = {"bf16": model, "sharq": sharq.quantize_model(copy.deepcopy(model), "sharq")}
        if args.without_prepare:
            models["no-prepare"] = copy.deepcopy(models["sharq"])
        if args.unfolded:
            models["unfolded"] = copy.deepcopy(models["sharq"])
        if args.folded_in_graphs:
            models["folded-in-graphs"] = copy.deepcopy(models["sharq"])
        for batch in [int(b) for b in args.batches.split(",")]:
            alternate(models, batch, args.alternate, cuda_graph=args.graphs)
        return 0
    run(model, "bf16")
    sharq.quantize_model(model, "sharq")
    run(model, "sharq")
    print(sys.version)
    print("gc thresholds", gc.get_threshold(), "objects", len(gc.get_objects()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
