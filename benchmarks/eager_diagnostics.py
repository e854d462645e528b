"""Why an eager decode step is slower than BF16's: the checks behind docs/PERF.md's eager bullet (thirty-fourth run).

    python benchmarks/eager_diagnostics.py

On the Llama-3.1-8B-shaped model (random weights, batch 1, a 16-token prompt, DecodeSession(cuda_graph=False)),
BF16 and then the same model quantized by sharq, each: the step's time by CUDA events (each step from an idle GPU)
and the host's wall time in step() (min / median / max over 12 steps), with Python's garbage collector on and off;
the synchronizing operations in one step (torch.cuda.set_sync_debug_mode("warn") warns at each); and the host's
wall time a step inside each kind of module (timing hooks on them, which add their own cost to every module).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings

import torch

import sharq
from bench_model import llama_8b_shaped  # benchmarks/, beside this script
from sharq.generate import DecodeSession
from timing import timed_steps

MODULES = ("LlamaAttention", "LlamaMLP", "LlamaDecoderLayer", "LlamaRMSNorm", "SharQLinear", "Linear")


@torch.no_grad()
def run(model, label: str, steps: int = 12) -> None:
    """Print the step's diagnostics for `model` (see the module's docstring)."""
    ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))
    session = DecodeSession(model, 1, 16 + 4 * steps + 8, cuda_graph=False)
    token = session.prefill(ids).argmax(-1)
    for _ in range(2):  # warm-up: kernels compiled, launch plans made
        token = session.step(token).argmax(-1)
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


def main() -> int:
    if not torch.cuda.is_available():
        print("eager_diagnostics needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = llama_8b_shaped(32)
    run(model, "bf16")
    sharq.quantize_model(model, "sharq")
    run(model, "sharq")
    print(sys.version)
    print("gc thresholds", gc.get_threshold(), "objects", len(gc.get_objects()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
