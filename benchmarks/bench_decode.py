"""Time token-by-token decoding (sharq.generate's path) on a CUDA GPU: BF16 against the same model quantized by sharq.

    python benchmarks/bench_decode.py [--layers 32] [--prompt 512] [--new-tokens 128] [--batches 1,8]
        [--recipes nvfp4,sharq] [--backend packed] [--compile] [--json out.json]
    python benchmarks/bench_decode.py --recipes sharq,sharq@packed-placed --compile   # two backends, one run
    python benchmarks/bench_decode.py --tiny --new-tokens 4 --prompt 16      # CPU smoke test (reference backend)
    python benchmarks/bench_decode.py --shape 70b --batches 1 --recipes sharq  # 70B-shaped, quantized onto one GPU

The model is Llama-3.1-8B-shaped (bench_model.llama_8b_shaped: random weights, bf16; only the time matters), built
afresh for each variant: bf16, then each recipe quantized with --backend (or the backend named after an @:
`sharq@packed-placed`, so backends compare in one run). For each variant and batch of random prompts: the prefill,
and the decode step (DecodeSession.step + the greedy argmax) replayed from its CUDA graph and eager, as CUDA-event
medians of --reps runs, the steps timed from an idle GPU (after the prefill, so no host work of theirs hides behind
its GPU time); with --compile also the graph path with the decode forward compiled by torch.compile before
the capture. Peak memory is that of one sharq.generate call; weights are sharq.models.weight_bytes. The check
column: the graph path's first 8 greedy tokens equal the eager path's (same cache size, so the same kernels; a
difference means the replay is wrong; the exit status is 1 where a quantized variant's differs. BF16's own can
differ through cuDNN's attention, docs/RELIABILITY.md: shown, not an error). "speedup vs bf16" is bf16's graph
ms/token over the variant's, from this run; "compiled vs bf16" the same for the compiled paths (--compile)."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

import sharq
from bench_model import llama_8b_shaped  # benchmarks/, beside this script
from bench_prepare import markdown_table
from sharq.generate import DecodeSession
from sharq.models import weight_bytes

CHECKED_TOKENS = 8


class Clock:
    """Milliseconds between marks: CUDA events on a GPU (the GPU's timeline, host stalls included, which is what
    an eager decode step is made of), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        if not self.cuda:
            return (end - start) * 1e3
        end.synchronize()
        return start.elapsed_time(end)


def llama_70b_on_meta(layers: int) -> torch.nn.Module:
    """A Llama-3.1-70B-shaped model (hidden 8192, MLP 28672, 64 heads, 8 KV heads) on the meta device: no memory
    until quantize_model(device="cuda") materializes it one decoder layer at a time (141 GB in bf16: it does not
    fit one H200, quantized it does)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                         num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def tiny_llama() -> torch.nn.Module:
    """A 2-layer Llama in bf16 on the CPU, for the smoke test."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=1024, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


@torch.no_grad()
def time_decode(model, ids: torch.Tensor, steps: int, max_len: int, reps: int, cuda_graph: bool,
                compile: bool = False) -> tuple[float, float, torch.Tensor, float]:
    """(median ms of the prefill, median ms of one decode step, the greedy tokens [batch, steps], seconds of the
    warm-up) over `reps` runs of a prefill and steps - 1 decode steps in one DecodeSession of max_len tokens, after
    a warm-up run of one step (the capture, and the compilation with compile)."""
    session = DecodeSession(model, ids.shape[0], max_len, cuda_graph=cuda_graph, compile=compile)
    t0 = time.perf_counter()
    session.step(session.prefill(ids).argmax(-1))
    if ids.is_cuda:
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    clock, prefills, per_step = Clock(ids.device), [], []
    for _ in range(reps):
        start = clock.mark()
        logits = session.prefill(ids)
        prefilled = clock.mark()
        tokens = [logits.argmax(-1)]
        # clock.ms waits for the prefill, so the steps start on an idle GPU: else an eager step's host work can hide
        # behind the prefill's GPU time, the more of it the fewer steps are timed
        prefills.append(clock.ms(start, prefilled))
        stepping = clock.mark()
        for _ in range(steps - 1):
            tokens.append(session.step(tokens[-1]).argmax(-1))
        end = clock.mark()
        per_step.append(clock.ms(stepping, end) / (steps - 1))
    return statistics.median(prefills), statistics.median(per_step), torch.stack(tokens, 1), warmup_s


def measure(model, variant: str, batch: int, args: argparse.Namespace) -> dict:
    """One table row: prefill, decode (graph, eager, compiled), peak memory and the graph = eager check."""
    device, cuda = model.device, model.device.type == "cuda"
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt),
                        generator=torch.Generator().manual_seed(batch)).to(device)
    max_len = args.prompt + args.new_tokens
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sharq.generate(model, ids, args.new_tokens)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    prefill_ms, graph_ms, tokens, _ = time_decode(model, ids, args.new_tokens, max_len, args.reps, cuda_graph=cuda)
    _, eager_ms, eager_tokens, _ = time_decode(model, ids, min(args.eager_tokens, args.new_tokens), max_len,
                                               args.reps, cuda_graph=False)
    n = min(CHECKED_TOKENS, eager_tokens.shape[1])
    compiled_ms = compile_s = None
    if args.compile:
        try:
            _, compiled_ms, _, compile_s = time_decode(model, ids, args.new_tokens, max_len, args.reps,
                                                       cuda_graph=cuda, compile=True)
        except Exception as e:  # noqa: BLE001 - one variant failing to compile is a result, not the end of the run
            print(f"note: torch.compile failed for {variant}, batch {batch}: {type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:160]}")
        finally:
            torch._dynamo.reset()  # drop the compiled code, and with it the references to this model
    return dict(variant=variant, batch=batch, prefill_ms=prefill_ms, graph_ms=graph_ms, eager_ms=eager_ms,
                compiled_ms=compiled_ms, compile_s=compile_s, peak_bytes=peak,
                graph_equals_eager=torch.equal(tokens[:, :n], eager_tokens[:, :n]))


def table(rows: list[dict]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    def gb(v: int | None) -> str:
        return "-" if v is None else f"{v / 1e9:.3g}"

    def tokens_per_s(r: dict, key: str) -> str:
        return f"{r['batch'] * 1e3 / r[key]:.0f}"

    return markdown_table(
        ["variant", "batch", "prefill ms", "graph ms/tok", "graph tok/s", "eager ms/tok", "eager tok/s",
         "compiled ms/tok", "compile s", "speedup vs bf16", "compiled vs bf16", "peak GB", "weights GB",
         f"graph = eager ({CHECKED_TOKENS} tok)"],
        [[r["variant"], str(r["batch"]), ms(r["prefill_ms"]), ms(r["graph_ms"]), tokens_per_s(r, "graph_ms"),
          ms(r["eager_ms"]), tokens_per_s(r, "eager_ms"), ms(r["compiled_ms"]),
          "-" if r.get("compile_s") is None else f"{r['compile_s']:.0f}",
          "-" if r["over_bf16"] is None else f"{r['over_bf16']:.2f}",
          "-" if r.get("compiled_over_bf16") is None else f"{r['compiled_over_bf16']:.2f}",
          gb(r["peak_bytes"]), gb(r["weight_bytes"]), "yes" if r["graph_equals_eager"] else "NO"] for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=["8b", "70b"], default="8b",
                   help="Llama-3.1-8B or -70B shaped (70b: quantized variants only, built layer by layer on the GPU)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32 for 8b, 80 for 70b)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (random)")
    p.add_argument("--new-tokens", type=int, default=128, help="decode steps timed on the graph path")
    p.add_argument("--eager-tokens", type=int, default=16, help="decode steps timed eagerly (slower: fewer)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--recipes", default="nvfp4,sharq", help="recipes timed, each optionally @backend")
    p.add_argument("--backend", default=None, help="quantized layers' backend (default: auto; reference with --tiny)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time the graph path with a torch.compile'd forward")
    p.add_argument("--tiny", action="store_true", help="a 2-layer small model on the CPU: a smoke test")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.new_tokens < 2 or args.eager_tokens < 2 or args.prompt < 1 or args.reps < 1:
        p.error("--new-tokens and --eager-tokens must be at least 2, --prompt and --reps at least 1")
    if not args.tiny and not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU (or --tiny, a CPU smoke test)", file=sys.stderr)
        return 2
    backend = args.backend or ("reference" if args.tiny else "auto")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    layers = args.layers or (80 if args.shape == "70b" else 32)
    variants = args.recipes.split(",") if args.shape == "70b" and not args.tiny else ["bf16", *args.recipes.split(",")]
    for variant in variants:
        torch.manual_seed(0)
        if args.tiny:
            model = tiny_llama()
        elif args.shape == "70b":
            model = llama_70b_on_meta(layers)
        else:
            model = llama_8b_shaped(layers)
        if variant != "bf16":
            recipe, _, own_backend = variant.partition("@")
            sharq.quantize_model(model, recipe, backend=own_backend or backend, device="cpu" if args.tiny else "cuda")
        size = weight_bytes(model)
        rows += [dict(measure(model, variant, batch, args), weight_bytes=size) for batch in batches]
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bf16 = {r["batch"]: r for r in rows if r["variant"] == "bf16"}
    for r in rows:
        base = bf16.get(r["batch"])
        r["over_bf16"] = None if base is None else base["graph_ms"] / r["graph_ms"]
        r["compiled_over_bf16"] = (None if base is None or base["compiled_ms"] is None or r["compiled_ms"] is None
                                   else base["compiled_ms"] / r["compiled_ms"])
    name = "tiny Llama (2 layers, hidden 256), CPU" if args.tiny else (
        f"Llama-3.1-{args.shape.upper()}-shaped, {layers} layers, random bf16 weights, {torch.cuda.get_device_name()}")
    print(f"{name}; prompt {args.prompt}, {args.new_tokens} new tokens "
          f"({min(args.eager_tokens, args.new_tokens)} eager); quantized "
          f"backend {backend}; torch {torch.__version__}" + ("; no CUDA graph on a CPU: graph = eager" if args.tiny
                                                             else ""))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=name, prompt=args.prompt, new_tokens=args.new_tokens, eager_tokens=args.eager_tokens,
                           backend=backend, torch=torch.__version__, rows=rows), f, indent=1)
    return 0 if all(r["graph_equals_eager"] for r in rows if r["variant"] != "bf16") else 1


if __name__ == "__main__":
    sys.exit(main())
