"""Per-layer diagnostics on real text: where FP4 activations hurt, how outlier-heavy each layer's input is, and
where SharQ helps most (`sharq report`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._checks import position_limit
from .._format import format_table, plural
from ..functional import simulate_linear
from ..models import target_linears, with_progress
from ..quant import dequantize_blocks
from ..recipes import get_recipe


@dataclass
class LayerStats:
    name: str
    in_features: int
    channel_max_over_median: float  # max over channels of max|x|, divided by the median channel's max|x|
    kurtosis: float  # of all input values (3 for a Gaussian)
    sparse_energy_share: float  # ||deq(Q(S))||² / ||Xs||²: the backbone's share (rounding can push it past 1)
    rel_error: dict[str, float] = field(default_factory=dict)  # recipe -> ||y_q - y|| / ||y||

    def sqnr_db(self, recipe: str) -> float:
        e = self.rel_error[recipe]
        return -20 * math.log10(e) if e > 0 else float("inf")


@torch.no_grad()
def capture_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input of every decoder linear for one forward pass of `ids` ([1, T]), as [T, K] fp32 on the CPU."""
    inputs, handles = {}, []
    for name, linear in target_linears(model).items():
        handles.append(linear.register_forward_pre_hook(
            lambda m, args, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).float().cpu())))
    try:
        model(ids.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return inputs


def layer_stats(name: str, x: torch.Tensor, linear, recipes: list[str]) -> LayerStats:
    """A layer's statistics on its input `x`; a NaN or inf in the input or the weights is a ValueError naming the
    layer (every number of the report would be NaN)."""
    w = linear.weight.detach().float().cpu()
    b = None if linear.bias is None else linear.bias.detach().float().cpu()
    for what, t in (("input", x), ("weight", w), ("bias", b)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"layer {name}: its {what} is not finite (NaN or inf): the model is broken")
    exact = x @ w.T + (0 if b is None else b)
    channel_max = x.abs().amax(0)
    centered = x - x.mean()
    kurt = (centered.pow(4).mean() / centered.pow(2).mean().pow(2)).item()
    sharq = get_recipe("sharq").prepare_activation(x)
    xs = (x / sharq.scale).to(torch.bfloat16).float()
    sparse = dequantize_blocks(sharq.parts[0])
    stats = LayerStats(name, x.shape[-1], (channel_max.max() / channel_max.median().clamp_min(1e-30)).item(), kurt,
                       (sparse.pow(2).sum() / xs.pow(2).sum().clamp_min(1e-30)).item())
    for r in recipes:
        y = simulate_linear(x, w, b, recipe=r)
        stats.rel_error[r] = ((y - exact).norm() / exact.norm().clamp_min(1e-30)).item()
    return stats


def _short(name: str) -> str:
    """'model.layers.12.self_attn.q_proj' -> '12.q_proj'."""
    parts = name.split(".")
    i = parts.index("layers") if "layers" in parts else -2
    return f"{parts[i + 1]}.{parts[-1]}"


def markdown(stats: list[LayerStats], recipes: list[str], setup: str) -> str:
    """The report: a summary, the layers where SharQ helps most, and the full per-layer table."""
    lines = ["# sharq per-layer report", "", setup, ""]
    mean = {r: sum(s.rel_error[r] for s in stats) / len(stats) for r in recipes}
    lines += ["## Mean relative output error over all quantized linears", "",
              "| recipe | mean rel. error | mean SQNR (dB) |", "|---|---:|---:|"]
    for r in recipes:
        sqnr = sum(s.sqnr_db(r) for s in stats) / len(stats)
        lines.append(f"| {r} | {mean[r]:.4f} | {sqnr:.1f} |")
    if {"sharq", "nvfp4"} <= set(recipes):
        gain = sorted(stats, key=lambda s: s.sqnr_db("sharq") - s.sqnr_db("nvfp4"), reverse=True)
        lines += ["", "## Where SharQ helps most (SQNR gain over NVFP4)", "",
                  "| layer | gain (dB) | max/median channel | kurtosis | sparse energy share |", "|---|---:|---:|---:|---:|"]
        for s in gain[:10]:
            lines.append(f"| {s.name} | {s.sqnr_db('sharq') - s.sqnr_db('nvfp4'):+.1f} | "
                         f"{s.channel_max_over_median:.1f} | {s.kurtosis:.1f} | {s.sparse_energy_share:.3f} |")
        corr = _correlation([math.log(s.channel_max_over_median) for s in stats],
                            [s.sqnr_db("sharq") - s.sqnr_db("nvfp4") for s in stats])
        lines += ["", f"Correlation between log(max/median channel) and SharQ's SQNR gain over all layers: "
                      f"{corr:+.2f}."]
    headers = ["layer", "K", "max/median ch.", "kurtosis", "sparse energy"] + [f"{r} err" for r in recipes]
    rows = [[_short(s.name), str(s.in_features), f"{s.channel_max_over_median:.1f}", f"{s.kurtosis:.1f}",
             f"{s.sparse_energy_share:.3f}"] + [f"{s.rel_error[r]:.4f}" for r in recipes] for s in stats]
    lines += ["", "## Every layer", "", "```", format_table(headers, rows), "```", "",
              "![relative output error per layer](error_per_layer.png)", "",
              "![activation outliers per layer](outliers.png)", ""]
    return "\n".join(lines)


def _correlation(a: list[float], b: list[float]) -> float:
    t = torch.tensor([a, b], dtype=torch.float64)
    return torch.corrcoef(t)[0, 1].item()


def plots(stats: list[LayerStats], inputs_max: dict[str, torch.Tensor], recipes: list[str], out: Path) -> None:
    """error_per_layer.png (error of each recipe, every linear in model order) and outliers.png (per-channel
    max|x| / median of the attention and MLP inputs, layer by layer)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("sharq report draws with matplotlib: pip install 'sharq[plot]'") from None

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for r in recipes:
        ax.plot([s.rel_error[r] for s in stats], marker=".", linewidth=1, label=r)
    ax.set_yscale("log")
    ax.set_xlabel("quantized linear (model order: q, k, v, o, gate, up, down of each layer)")
    ax.set_ylabel("relative output error")
    ax.set_title("Output error of each quantized linear on real text")
    ticks = [i for i, s in enumerate(stats) if s.name.endswith(("q_proj", "gate_up.0"))]
    ax.set_xticks(ticks, [_short(stats[i].name).split(".")[0] for i in ticks], fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error_per_layer.png", dpi=120)
    plt.close(fig)

    kinds = [k for k in ("q_proj", "down_proj") if any(n.endswith(k) for n in inputs_max)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        names = [n for n in inputs_max if n.endswith(kind)]
        grid = torch.stack([inputs_max[n] / inputs_max[n].median().clamp_min(1e-30) for n in names])
        logs = grid.clamp_min(1e-3).log10()
        top = max(1.0, torch.quantile(logs.flatten(), 0.999).item())  # a few extreme channels must not hide the rest
        im = ax.imshow(logs.numpy(), aspect="auto", cmap="magma", interpolation="nearest", vmin=-1.0, vmax=top)
        ax.set_title(f"input of {kind}: log10(max|x| per channel / median)")
        ax.set_xlabel("input channel")
        ax.set_ylabel("decoder layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "outliers.png", dpi=120)
    plt.close(fig)


def write_report(model, tokenizer, text: str, recipes: list[str], tokens: int, out: str | Path, setup: str,
                 progress: bool = False) -> Path:
    """Run the diagnostics on the first `tokens` tokens of `text` and write report.md, report.json and the PNGs
    (progress=True: a bar per layer on stderr; each runs every recipe). One forward pass, so `tokens` is at most
    the model's max_position_embeddings (positions past it run without a word), and the text must hold them."""
    from ..hf import tokenize

    limit = position_limit(model.config)
    if limit is not None and tokens > limit:
        raise ValueError(f"tokens {tokens} exceeds the model's max_position_embeddings {limit}")
    ids = tokenize(text, tokenizer)
    if ids.numel() < tokens:
        raise ValueError(f"the report text has {plural(ids.numel(), 'token')}, fewer than the {tokens} asked: ask for "
                         "fewer or give more text")
    ids = ids[:tokens].unsqueeze(0)
    inputs = capture_inputs(model, ids)
    linears = target_linears(model)
    names = [n for n in linears if n in inputs]
    stats = [layer_stats(n, inputs[n], linears[n], recipes)
             for n in with_progress(names, progress, desc="report", unit="layer")]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inputs_max = {n: x.abs().amax(0) for n, x in inputs.items()}
    plots(stats, inputs_max, recipes, out)
    setup = f"{setup}; {plural(ids.shape[1], 'token')}; recipes {', '.join(recipes)}"
    (out / "report.md").write_text(markdown(stats, recipes, setup), encoding="utf-8")
    (out / "report.json").write_text(json.dumps([asdict(s) for s in stats], indent=1), encoding="utf-8")
    return out
