"""What one weight global scale per fused group (q/k/v, gate/up) changes in a compressed-tensors export: perplexity of
the model each way of exporting gives, with sharq's activations and with bf16 activations (what vLLM runs from a
weights-only export). docs/FORMAT.md, "compressed-tensors", quotes the rows.

    python benchmarks/export_global_scales.py --max-tokens 4096 --out docs/results/smollm2_export_scales_cpu.json

Rows (every export is read back by sharq.load, which reads each layer's own global scale):
  per-layer            shared_global_scales=False: the sharq model itself, as sharq and transformers read it
  per-layer in vLLM    the same export as vLLM runs it: each fused group at its largest global scale g_max, i.e.
                       every part's weights times g/g_max
  shared               the default export of a quantized model (a sharq checkpoint, say): the group's largest
                       s_w, the other parts quantized again from Ŵ·s_w; what vLLM and sharq both compute
  shared from W        the same with original_weights (what `sharq export` of an unquantized model does): the
                       other parts quantized again from their original weights, once
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sharq.eval.data import load_text
from sharq.eval.perplexity import perplexity, windows
from sharq.hf import bos_token, load_pretrained, tokenize
from sharq.interop import export_compressed_tensors, fused_groups, global_scale, load_compressed_tensors
from sharq.models import quantize_model, target_linears
from sharq.nn import SharQLinear
from sharq.recipes import Recipe, get_recipe

BF16_ACTIVATIONS = Recipe("w4a16", "nvfp4", 32, (), description="sharq's W32 NVFP4 weights, bf16 activations")


def layers(model: torch.nn.Module) -> dict[str, SharQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SharQLinear)}


def ratios(model: torch.nn.Module) -> list[float]:
    """g_max / g_min of every fused group."""
    found = layers(model)
    gs = [[global_scale(found[n].weight_scale)[0].item() for n in group] for group in fused_groups(model, found)]
    return [max(g) / min(g) for g in gs]


@torch.no_grad()
def as_vllm_runs(model: torch.nn.Module) -> torch.nn.Module:
    """Each fused group with one s_w = 1/g_max (vLLM: weight_global_scale.max() of the fused layer's parts)."""
    found = layers(model)
    for group in fused_groups(model, found):
        g_max = max(global_scale(found[n].weight_scale)[0] for n in group)
        for n in group:
            found[n].weight_scale.copy_((torch.ones(1) / g_max).reshape(()))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--recipe", default="sharq", help="the recipe quantized and exported (NVFP4 weights)")
    ap.add_argument("--text", default="wikipedia")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    model, tokenizer = load_pretrained(args.model)
    ids = windows(tokenize(load_text(args.text)[0], tokenizer), args.seqlen, args.max_tokens, bos_token(tokenizer))
    originals = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    recipe = get_recipe(args.recipe)
    quantize_model(model, recipe)
    rows, work = [], Path(tempfile.mkdtemp(prefix="export-scales-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-layer export's warning: its ratios are reported below
        export_compressed_tensors(model, work / "per-layer", shared_global_scales=False)
    export_compressed_tensors(model, work / "shared")
    export_compressed_tensors(model, work / "shared-from-W", original_weights=originals)
    per_layer = ratios(model)
    variants = {"per-layer": ("per-layer", lambda m: m), "per-layer in vLLM": ("per-layer", as_vllm_runs),
                "shared": ("shared", lambda m: m), "shared from W": ("shared-from-W", lambda m: m)}
    for activations, r in (("sharq", None), ("bf16", BF16_ACTIVATIONS)):
        for name, (directory, change) in variants.items():
            start = time.perf_counter()
            loaded = change(load_compressed_tensors(work / directory, r))
            result = perplexity(loaded, ids, progress=False)
            rows.append({"export": name, "activations": activations, "ppl": result.ppl,
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:>18}  activations {activations:>5}  ppl {result.ppl:.4f}")
    report = {"model": args.model or "smollm2-135m", "recipe": recipe.name, "text": args.text,
              "tokens": int(ids.numel()), "seqlen": args.seqlen, "fused_groups": len(per_layer),
              "groups_with_different_scales": sum(r != 1.0 for r in per_layer), "largest_ratio": max(per_layer),
              "rows": rows}
    print(f"{report['groups_with_different_scales']} of {len(per_layer)} fused groups have different global scales, "
          f"ratio up to {report['largest_ratio']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
