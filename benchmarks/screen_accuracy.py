"""Screen calibration-free accuracy options (SPEC §11) on one model: one `sharq.eval.run.evaluate` call per candidate recipe, one JSON
per row (so a crash loses one row, not the screen), then one table from the JSON files.

    python benchmarks/screen_accuracy.py run --text wikipedia --max-tokens 8192 bf16 nvfp4 sharq sharq+w-search
    python benchmarks/screen_accuracy.py run --model gemma-3-270m.gguf --text lambada --max-tokens 65536 \
        --prefix gemma3_270m_lambada64k_cpu bf16 nvfp4 sharq sharq-plus sharq-plus/w-only   # another model
    python benchmarks/screen_accuracy.py table docs/results/smollm2_screen8k_cpu_*.json     # markdown rows
    python benchmarks/screen_accuracy.py weights      # relative weight error of each weight option, no model run
    python benchmarks/screen_accuracy.py weights --out PATH "W16 max" "HiF4 64 (sharq-hif4)"      # some of them

Candidates are named recipes or the entries of CANDIDATES below (options on top of a registered recipe; each JSON
also records the full recipe as `recipe_defs`, so a row can be re-created exactly with Recipe.from_dict).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sharq.eval.run import EvalConfig, evaluate, merge_results
from sharq.recipes import Recipe, Stage, get_recipe

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def _sharq(name: str, backbone: dict | None = None, residual: dict | None = None, **options) -> Recipe:
    """sharq with options: `backbone` / `residual` replace fields of its two stages, the rest are Recipe fields."""
    base = get_recipe("sharq")
    s1, s2 = base.stages
    stages = (Stage(**{**vars(s1), **(backbone or {})}), Stage(**{**vars(s2), **(residual or {})}))
    changed = {**{f"backbone.{k}": v for k, v in (backbone or {}).items()},
               **{f"residual.{k}": v for k, v in (residual or {}).items()}, **options}
    description = "sharq with " + ", ".join(f"{k}={v}" for k, v in changed.items())
    return base.with_options(name=name, stages=stages, description=description, **options)


def _weights_only(name: str, recipe: Recipe) -> Recipe:
    """The recipe's weights, bf16 activations: the weight part of its gap."""
    return recipe.with_options(name=name, stages=(), description=f"{recipe.name}'s weights, bf16 activations")


def _activations_only(name: str, recipe: Recipe) -> Recipe:
    """The recipe's activations, bf16 weights: the activation part of its gap."""
    opts = {f: v for f, v in (("weight_scale_rule", "max"), ("weight_tensor_scale_rule", "amax")) if hasattr(recipe, f)}
    return recipe.with_options(name=name, weight_fmt="bf16", weight_block=None,
                               description=f"{recipe.name}'s activations, bf16 weights", **opts)


def candidates() -> dict[str, Recipe]:
    """Every screened recipe that is not a registered one, by row name."""
    c: dict[str, Recipe] = {}
    add = lambda r: c.setdefault(r.name, r)  # noqa: E731
    sharq = get_recipe("sharq")
    add(_weights_only("sharq/w-only", sharq))
    add(_activations_only("sharq/a-only", sharq))
    add(_sharq("sharq+W16", weight_block=16))
    add(_sharq("sharq+token", scale_granularity="token"))
    add(_sharq("sharq+2:4", backbone={"mask": "2:4"}))
    add(_sharq("sharq+res32", residual={"block_size": 32}))
    add(_sharq("sharq+res-mxfp4", residual={"fmt": "mxfp4", "block_size": 32}))
    add(_sharq("sharq+res-hif4", residual={"fmt": "hif4", "block_size": 64}))
    for extra in _option_candidates():
        add(extra)
    return c


def _option_candidates() -> list[Recipe]:
    """The candidates that use the options of SPEC §11 (scale rules, the L2 pair mask, the tensor-scale search)."""
    try:
        Stage("nvfp4", 16, scale_rule="four_over_six")
    except TypeError:  # an older sharq without the options
        return []
    out = [
        _sharq("sharq+w-search", weight_scale_rule="search"),
        _sharq("sharq+w-4o6", weight_scale_rule="four_over_six"),
        _sharq("sharq+w-ts", weight_tensor_scale_rule="search"),
        _sharq("sharq+a-4o6-backbone", backbone={"scale_rule": "four_over_six"}),
        _sharq("sharq+a-4o6-residual", residual={"scale_rule": "four_over_six"}),
        _sharq("sharq+a-4o6", backbone={"scale_rule": "four_over_six"}, residual={"scale_rule": "four_over_six"}),
        _sharq("sharq+a-search", backbone={"scale_rule": "search"}, residual={"scale_rule": "search"}),
        _sharq("sharq+pair-l2", backbone={"mask": "pair-l2-4:8"}),
    ]
    return out + _combinations()


def _combinations() -> list[Recipe]:
    """Combinations of the ideas that helped alone in the single-idea screen (W16, the weight scale rules, the
    residual's scale rules), and HiF4 weights under SharQ's activations (where sharq-hif4's gain comes from)."""
    search, four6 = {"scale_rule": "search"}, {"scale_rule": "four_over_six"}
    return [
        _sharq("sharq+w-hif4", weight_fmt="hif4", weight_block=64),
        _sharq("sharq+W16+w-search", weight_block=16, weight_scale_rule="search"),
        _sharq("sharq+W16+w-4o6", weight_block=16, weight_scale_rule="four_over_six"),
        _sharq("sharq+W16+w-4o6+a-search", search, search, weight_block=16, weight_scale_rule="four_over_six"),
        _sharq("sharq+W16+w-search+a-search", search, search, weight_block=16, weight_scale_rule="search"),
        _sharq("sharq+W16+w-4o6+a-4o6-residual", None, four6, weight_block=16, weight_scale_rule="four_over_six"),
        _sharq("sharq+w-4o6+a-search", search, search, weight_scale_rule="four_over_six"),
    ]


def lookup(name: str, table: dict[str, Recipe]) -> Recipe:
    """A candidate, a registered recipe, or either's weights-only ("NAME/w-only") or activations-only
    ("NAME/a-only") row."""
    base, _, part = name.rpartition("/")
    if name not in table and part in ("w-only", "a-only"):
        recipe = lookup(base, table)
        return (_weights_only if part == "w-only" else _activations_only)(name, recipe)
    return table.get(name) or get_recipe(name)


def run(names: list[str], text: str, max_tokens: int, prefix: str, seqlen: int = 2048,
        model: str | None = None, device: str = "cpu", dtype: str | None = None, backend: str = "auto") -> None:
    table = candidates()
    for name in names:
        recipe = lookup(name, table)
        out = RESULTS / f"{prefix}_{_slug(name)}.json"
        t0 = time.perf_counter()
        res = evaluate(EvalConfig(model=model, recipes=(recipe,), text=text, seqlen=seqlen, max_tokens=max_tokens,
                                  device=device, dtype=dtype, backend=backend, progress=False))
        res["recipe_defs"] = {recipe.name: recipe.to_dict()}
        res["wall_seconds"] = round(time.perf_counter() - t0, 1)
        out.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        row = res["results"][0]
        print(f"{name}: ppl {row['ppl']:.4f} ({res['wall_seconds']} s) -> {out.name}", flush=True)


WEIGHT_CONFIGS = {  # weight options alone (no activations): the relative squared error of Ŵ over the model
    "W32 max (sharq)": {},
    "W32 search": {"weight_scale_rule": "search"},
    "W32 four_over_six": {"weight_scale_rule": "four_over_six"},
    "W32 tensor-scale search": {"weight_tensor_scale_rule": "search"},
    "W16 max": {"weight_block": 16},
    "W16 search": {"weight_block": 16, "weight_scale_rule": "search"},
    "W16 four_over_six": {"weight_block": 16, "weight_scale_rule": "four_over_six"},
    "HiF4 64 (sharq-hif4)": {"weight_fmt": "hif4", "weight_block": 64},
}


def weight_errors(out: Path, labels: list[str] | None = None) -> None:
    """Σ(Ŵ·s_w − W)² / ΣW² over every quantized linear of the default model, per weight option: how much of the
    weight error each option removes, without running the model. Also where it sits: the same ratio over the
    large weights (|w| ≥ half the largest |w| of its block of 16 consecutive input weights) and over the rest."""
    import torch

    from sharq import load_model
    from sharq.models import target_linears

    unknown = set(labels or ()) - set(WEIGHT_CONFIGS)
    if unknown:
        raise SystemExit(f"unknown weight config(s) {sorted(unknown)}; known: {list(WEIGHT_CONFIGS)}")
    model, _ = load_model()
    weights = [m.weight.detach() for m in target_linears(model).values()]
    rows = {}
    for label, opts in WEIGHT_CONFIGS.items():
        if labels and label not in labels:
            continue
        recipe = get_recipe("sharq", **opts)
        t0 = time.perf_counter()
        sums = torch.zeros(5, dtype=torch.float64)  # error², W² over all; the same over the large weights; count
        with torch.no_grad():
            for w in weights:
                w64 = w.double()
                e = recipe.prepare_weight(w).effective().double() - w64
                blocks = w64.abs().reshape(w.shape[0], -1, 16)
                large = (blocks >= blocks.amax(-1, keepdim=True) / 2).reshape(w.shape)
                sums += torch.stack([e.square().sum(), w64.square().sum(), e[large].square().sum(),
                                     w64[large].square().sum(), large.sum().double()])
        err, norm, err_large, norm_large, n_large = sums.tolist()
        rows[label] = {"options": opts, "relative_squared_error": err / norm,
                       "large_relative_squared_error": err_large / norm_large,
                       "rest_relative_squared_error": (err - err_large) / (norm - norm_large),
                       "large_fraction": n_large / sum(w.numel() for w in weights),
                       "weight_bits": recipe.weight_bits, "seconds": round(time.perf_counter() - t0, 1)}
        r = rows[label]
        print(f"{label:28s} rel. sq. error {r['relative_squared_error']:.5f} (large weights "
              f"{r['large_relative_squared_error']:.5f}, rest {r['rest_relative_squared_error']:.5f})  "
              f"bits {recipe.weight_bits:g}  ({r['seconds']} s)", flush=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M (default)", "linears": len(weights), "rows": rows}, indent=1)
                   + "\n", encoding="utf-8")


def _slug(name: str) -> str:
    return name.replace("/", "_").replace(":", "").replace("+", "_")


def table(paths: list[str]) -> str:
    """Markdown rows: recipe, PPL, Δ vs bf16, gap recovered, activation bits, weight bits."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    merged = merge_results(runs)
    ref = next(r for r in merged["results"] if r["recipe"] == "bf16")
    lines = ["| recipe | PPL | Δ vs bf16 | gap recovered | activation bits | weight bits |", "|---|---:|---:|---:|---:|---:|"]
    for r in merged["results"]:
        gap = r["ppl_gap_recovered"]
        lines.append(f"| {r['recipe']} | {r['ppl']:.3f} | {r['ppl'] - ref['ppl']:+.3f} | "
                     f"{'' if gap is None else f'{100 * gap:.0f} %'} | {r['activation_bits']:g} | {r['weight_bits']:g} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("names", nargs="+")
    r.add_argument("--text", default="wikipedia")
    r.add_argument("--max-tokens", type=int, default=8192)
    r.add_argument("--prefix", default=None, help="JSON name prefix (default smollm2_screen8k[_TEXT]_cpu; give "
                   "one per model and corpus)")
    r.add_argument("--model", default=None, help="as sharq eval --model (default: the embedded SmolLM2-135M)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default=None, help="as sharq eval --dtype (default float32 on CPU, bfloat16 on CUDA)")
    r.add_argument("--backend", default="auto", help="as sharq eval --backend")
    t = sub.add_parser("table")
    t.add_argument("paths", nargs="+")
    sub.add_parser("list")
    w = sub.add_parser("weights", help="relative weight error per weight option (no model run)")
    w.add_argument("labels", nargs="*", help="some of WEIGHT_CONFIGS (default: all)")
    w.add_argument("--out", default=str(RESULTS / "smollm2_screen_weight_error_cpu.json"))
    a = p.parse_args(argv)
    if a.cmd == "run":
        tag = "" if a.text == "wikipedia" else f"_{a.text}"
        if a.model is not None and a.prefix is None:
            p.error("--model needs --prefix (the default prefix names SmolLM2)")
        run(a.names, a.text, a.max_tokens, a.prefix or f"smollm2_screen{a.max_tokens // 1024}k{tag}_cpu",
            model=a.model, device=a.device, dtype=a.dtype, backend=a.backend)
    elif a.cmd == "table":
        print(table(a.paths))
    elif a.cmd == "weights":
        weight_errors(Path(a.out), a.labels)
    else:
        for name, recipe in candidates().items():
            print(f"{name:28s} act {recipe.activation_bits:<5g} w {recipe.weight_bits:<5g} {recipe.to_dict()}")


if __name__ == "__main__":
    main(sys.argv[1:])
