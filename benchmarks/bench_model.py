"""Time a whole model's evaluation forward on a CUDA GPU: BF16 against the same model quantized by sharq.

    python benchmarks/bench_model.py [--layers 32] [--batch 1] [--seq 2048] [--model PATH] [--json out.json]

Without --model the model is Llama-3.1-8B-shaped (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256)
with random weights, since only the time matters; --layers shortens it. With --model (a GGUF path or a directory)
the real model is loaded, as `sharq eval` does. The forward over [batch, seq] random tokens is what a perplexity
evaluation runs per window; CUDA events, medians.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import sharq
from sharq.eval.perplexity import GraphedForward
from timing import median_ms  # benchmarks/timing.py, beside this script


def time_forward(model: torch.nn.Module, batch: int, seq: int, reps: int, graph: bool
                 ) -> tuple[float, float | None, bool]:
    """(median ms of one no-grad forward over [batch, seq] random tokens, the same replayed from a CUDA graph
    (None if not asked or if capture fails), whether the logits are finite)."""
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    forward = torch.no_grad()(lambda: model(tokens, use_cache=False).logits)
    eager = median_ms(forward, reps)
    finite = bool(torch.isfinite(forward()).all())
    replay = None
    if graph:  # the CUDA-graph replay `sharq eval` uses for perplexity on CUDA
        graphed = GraphedForward(model)
        replay = median_ms(lambda: graphed(tokens), reps)
        replay = None if graphed.eager else replay
    return eager, replay, finite


def llama_8b_shaped(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--model", default=None, help="a real model (GGUF or directory) instead of the random 8B shape")
    p.add_argument("--recipes", default="sharq,nvfp4")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--graph", action="store_true", help="also time the forward replayed from a CUDA graph")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_model needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.model:
        from sharq.hf import load_pretrained

        def build():
            return load_pretrained(args.model, dtype=torch.bfloat16, device="cuda")[0]

        name = args.model
    else:
        def build():
            torch.manual_seed(0)
            return llama_8b_shaped(args.layers)

        name = f"Llama-3.1-8B-shaped, {args.layers} layers, random weights"
    runs = [("bf16", "-")] + [(r, b) for r in args.recipes.split(",") for b in ("triton", "reference")]
    rows = []
    for recipe, backend in runs:
        model = build()
        if recipe != "bf16":
            sharq.quantize_model(model, recipe, backend=backend)
        ms, graph_ms, finite = time_forward(model, args.batch, args.seq, 1 if backend == "reference" else args.reps,
                                            args.graph and backend != "reference")
        rows.append(dict(recipe=recipe, backend=backend, ms=ms, graph_ms=graph_ms, finite=finite))
        model = None
        torch.cuda.empty_cache()
    bf16, tokens_n = rows[0], args.batch * args.seq
    print(f"{name}; forward over {args.batch} x {args.seq} tokens; {torch.cuda.get_device_name()}")
    print(f"{'recipe':<8} {'backend':<10} {'ms':>9} {'tok/s':>9} {'x bf16':>7} {'graph ms':>9} {'x bf16':>7}")
    for r in rows:
        r["over_bf16"] = r["ms"] / bf16["ms"]
        graphed = r["graph_ms"] is not None and bf16["graph_ms"] is not None
        r["graph_over_bf16"] = r["graph_ms"] / bf16["graph_ms"] if graphed else None
        print(f"{r['recipe']:<8} {r['backend']:<10} {r['ms']:9.2f} {tokens_n / r['ms'] * 1e3:9.0f} "
              f"{r['over_bf16']:7.2f} " + (f"{r['graph_ms']:9.2f} {r['graph_over_bf16']:7.2f}" if graphed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=name, batch=args.batch, seq=args.seq, device=torch.cuda.get_device_name(),
                           rows=rows), f, indent=1)
    return 0 if all(r.get("finite", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
