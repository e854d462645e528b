"""Where a decode step's time goes, BF16 against the same model quantized by sharq (docs/PERF.md).

    python benchmarks/profile_step.py [--mode eager|graph|compiled] [--batch 1] [--layers 32] [--recipe sharq]
                                      [--steps 8] [--python] [--json out.json]

Each variant's steps run as `--mode` says: eager (a plain `model.generate`, DecodeSession(cuda_graph=False)), graph
(one CUDA graph a step, the default on CUDA) or compiled (torch.compile over the step, then the graph: what
`bench_decode.py --compile` times). This times --steps steps with CUDA events (ms a step, each from an idle GPU) and
the host's wall time in step() (until its last launch returned: where it is the step's time, the step is
host-bound), then profiles as many with torch.profiler and reports per step: the operators' own host time (which
the profiler's own cost inflates), the GPU's busy time (kernels and copies, summed), the kernels the host launches
(a graph replay's own are not among them), the kernels that took the most GPU time (by name, so a graph replay's
kernels are counted one by one) and, eager, the operators that took the most host time of their own (self CPU,
where an eager step that is host-bound spends it). `--python` also runs as many steps under cProfile and reports
the Python functions by their own time a step: the host time the operator table cannot see (Python between the
operators, calls into ctypes, waits in C functions). The model is Llama-3.1-8B-shaped with random weights
(bench_model.llama_8b_shaped), quantized onto the GPU with the default backend.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import sharq
from bench_gemm import save  # benchmarks/, beside this script
from bench_model import llama_8b_shaped
from timing import timed_steps, warm_session
from sharq._format import format_table


def python_functions(profiler: cProfile.Profile, steps: int, top: int) -> list[dict]:
    """The `top` functions a profiled run of `steps` steps spent the most own time in: µs and calls a step."""
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{name} ({file.rsplit('/', 1)[-1]}:{line})", "own_us": own * 1e6 / steps,
             "cumulative_us": cumulative * 1e6 / steps, "calls": calls / steps}
            for (file, line, name), (_, calls, own, cumulative, _) in rows]


@torch.no_grad()
def profile_steps(model, batch: int, steps: int, top: int, mode: str, python: bool = False) -> dict:
    """CUDA-event ms and host wall ms in step() a step over `steps` steps, then one profiled run of as many: the
    operators' host ms, GPU busy ms and launches a step, the `top` kernels by GPU time and the `top` operators by
    self host time (µs a step, calls a step); with `python`, one more run under cProfile: the `top` Python
    functions by own time (µs a step, calls a step)."""
    session, token = warm_session(model, batch, 16 + 3 * steps + 4, cuda_graph=mode != "eager",
                                  compile=mode == "compiled")
    token, times, host_times = timed_steps(session, token, steps)
    torch.cuda.synchronize()

    def run_steps(token: torch.Tensor) -> torch.Tensor:
        for _ in range(steps):
            token = session.step(token).argmax(-1)
        torch.cuda.synchronize()
        return token

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        token = run_steps(token)
    events = prof.events()
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name].append(e.time_range.elapsed_us())
    device_us = sum(sum(v) for v in kernels.values())
    launches = sum(1 for e in events if "LaunchKernel" in e.name)
    by_time = sorted(kernels.items(), key=lambda kv: sum(kv[1]), reverse=True)
    averages = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)
    host_us = sum(a.self_cpu_time_total for a in averages)
    functions = []
    if python:
        with cProfile.Profile() as py:
            run_steps(token)
        functions = python_functions(py, steps, top)
    return {"step_ms": statistics.median(times), "host_wall_ms": statistics.median(host_times),
            "host_ms": host_us / steps / 1e3, "gpu_busy_ms": device_us / steps / 1e3, "launches": launches / steps,
            "kernels": [{"kernel": name, "gpu_us": sum(v) / steps, "calls": len(v) / steps}
                        for name, v in by_time[:top]],
            "top": [{"op": a.key, "self_cpu_us": a.self_cpu_time_total / steps, "calls": a.count / steps}
                    for a in averages[:top]], "python": functions}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("eager", "graph", "compiled"), default="eager")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--recipe", default="sharq")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--python", action="store_true", help="also the Python functions by own time (cProfile)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_step needs a CUDA GPU", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
           "mode": args.mode}
    model = llama_8b_shaped(args.layers)
    out["bf16"] = profile_steps(model, args.batch, args.steps, args.top, args.mode, args.python)
    sharq.quantize_model(model, args.recipe, device="cuda")
    out[args.recipe] = profile_steps(model, args.batch, args.steps, args.top, args.mode, args.python)
    for variant in ("bf16", args.recipe):
        r = out[variant]
        print(f"{variant}, batch {args.batch}, {args.mode}: {r['step_ms']:.2f} ms a step (CUDA events), the host "
              f"{r['host_wall_ms']:.2f} ms in step() (wall); profiled: "
              f"host {r['host_ms']:.2f} ms, GPU busy {r['gpu_busy_ms']:.2f} ms, {r['launches']:.0f} host kernel "
              f"launches a step")
        print(format_table(["kernel", "GPU µs a step", "calls a step"],
                           [[t["kernel"][:80], f"{t['gpu_us']:.1f}", f"{t['calls']:.0f}"] for t in r["kernels"]]))
        if args.mode == "eager":
            print(format_table(["operator (self host time)", "µs a step", "calls a step"],
                               [[t["op"][:60], f"{t['self_cpu_us']:.0f}", f"{t['calls']:.0f}"] for t in r["top"]]))
        if r["python"]:
            print(format_table(["Python function (cProfile)", "own µs a step", "cumulative µs", "calls a step"],
                               [[t["function"][:80], f"{t['own_us']:.0f}", f"{t['cumulative_us']:.0f}",
                                 f"{t['calls']:.0f}"] for t in r["python"]]))
    save(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
