"""Evaluate recipes on one model: perplexity and zero-shot accuracy per recipe, the gaps of SPEC §9."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._checks import NonFiniteLogits, flag_non_finite, position_limit, repeated
from .._format import format_table, plural
from ..checkpoint import is_checkpoint, read_quantization_config
from ..functional import check_backend
from ..hf import bos_token, load_pretrained, load_tokenizer, model_source, resolve_model, tokenize
from ..interop import compressed_tensors_recipe, is_compressed_tensors, load, load_model
from ..models import calibrate, check_device, quantize_model, weight_bytes
from ..recipes import Recipe, get_recipe
from .data import load_text
from .distributed import process_rank
from .perplexity import distributed_perplexity, windows
from .zeroshot import PAPER_TASKS, check_tasks, evaluate_tasks, task_score, task_stderr

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_RECIPES = ("bf16", "nvfp4", "sharq")


@dataclass
class RecipeResult:
    recipe: str
    activation_bits: float
    weight_bits: float
    weight_bytes: int = 0  # the quantized model's state (sharq.models.weight_bytes)
    ppl: float | None = None
    tokens_per_s: float | None = None
    tasks: dict[str, dict] = field(default_factory=dict)
    ppl_gap_recovered: float | None = None
    task_avg: float | None = None
    task_avg_stderr: float | None = None  # √(Σ stderr²) / tasks: the tasks' samples are independent
    task_gap_recovered: float | None = None


@dataclass
class EvalConfig:
    """What `evaluate` runs. `model` may be a quantized checkpoint: a sharq checkpoint is evaluated as saved, one
    row (see recipes_for)."""

    model: str | None = None
    recipes: tuple[str, ...] | None = None  # default: DEFAULT_RECIPES; for a quantized checkpoint, its own recipe
    text: str = "wikipedia"
    seqlen: int = 2048  # at most the model's max_position_embeddings
    max_tokens: int | None = 8192
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    device: str = "cpu"
    device_map: str | dict | None = None  # accelerate's placement ("auto", ...) instead of `device`; see evaluate
    dtype: str | None = None  # default: float32 on CPU, bfloat16 on CUDA
    backend: str = "auto"  # triton on CUDA, reference elsewhere
    batch_size: int = 1  # perplexity windows per forward pass
    task_batch_size: int = 8  # lm-eval requests per forward pass
    calib_text: str = "lambada"
    calib_tokens: int = 8192
    options: dict = field(default_factory=dict)  # recipe options, e.g. scale_granularity
    progress: bool = True


@contextlib.contextmanager
def watch_logits(model, device: str | torch.device) -> Iterator[Callable[[], bool]]:
    """Within the block, every forward of `model` records on `device` whether its logits were all finite; the
    function yielded says whether they all were, in every process of a torch.distributed run (so that all of them
    stop, not one). The check is queued with each forward (a CUDA graph replays it with the forward) and read once,
    when asked, so no forward waits for it."""
    flag = torch.zeros((), dtype=torch.float32, device=device)

    def check(module, args, output) -> None:
        flag_non_finite(flag, output.logits)

    def finite() -> bool:
        if process_rank()[1] > 1:  # a NaN flag's sum is NaN everywhere
            torch.distributed.all_reduce(flag)
        return bool(torch.isfinite(flag))

    handle = model.register_forward_hook(check)
    try:
        yield finite
    finally:
        handle.remove()


def task_average(tasks: dict[str, dict]) -> tuple[float, float]:
    """(mean of the tasks' scores, its standard error √(Σ stderr²) / tasks: the tasks' samples are independent)."""
    return (sum(task_score(m) for m in tasks.values()) / len(tasks),
            math.sqrt(sum(task_stderr(m) ** 2 for m in tasks.values())) / len(tasks))


def gap_recovered(value: float, low: float, high: float) -> float | None:
    """(low − value) / (low − high): 0 at the nvfp4 level, 1 at the bf16 level (SPEC §9). For perplexity low is
    nvfp4 and high bf16; for accuracy pass the negated scores. None where there is no gap (nvfp4 at or better than
    bf16): a share of it would be a meaningless number, e.g. -1279 %."""
    if any(v is None or not math.isfinite(v) for v in (value, low, high)) or low <= high:
        return None
    return (low - value) / (low - high)


def recipes_for(path: Path, names: Sequence[str] | None, options: dict | None = None,
                default: Sequence[str] = DEFAULT_RECIPES) -> list[Recipe]:
    """The recipes a command runs on the model at `path`, with `options`: one rule for every command that takes a
    model and recipes (evaluate, and on the command line eval, generate, export, quantize).

    - An unquantized model runs `names` (None: the command's `default`).
    - A sharq checkpoint runs as saved, its own recipe: its weights are quantized already, so no other recipe can
      apply, and options must leave its recipe as it is. Naming that recipe (with the same options) is allowed;
      anything else is an error, not a silent run of something else.
    - A compressed-tensors NVFP4 checkpoint runs any recipe with NVFP4 weights on its fixed 4-bit weights (None:
      the one sharq.load runs, the recipe a sharq export recorded, else sharq)."""
    options = options or {}
    if is_checkpoint(path):
        saved = Recipe.from_dict(read_quantization_config(path)["recipe"])
        asked = [get_recipe(saved if r is None else r, **o)
                 for r, o in _with_options((None,) if names is None else names, options)]
        if asked != [saved]:
            raise ValueError(f"{path} is a sharq checkpoint, already quantized with {saved.name!r}: it runs as "
                             "saved, so the only recipe it runs is its own (with its own options); to run or compare "
                             "other recipes, give the unquantized model")
        return [saved]
    if names is not None and not names:
        raise ValueError("no recipe to run: name one or more, e.g. bf16, nvfp4, sharq")
    if is_compressed_tensors(path):
        pairs = _with_options((None,) if names is None else names, options)
        return check_distinct([compressed_tensors_recipe(path, r, **o) for r, o in pairs])
    return check_distinct([get_recipe(r, **o) for r, o in _with_options(default if names is None else names, options)])


def check_distinct(recipes: list[Recipe]) -> list[Recipe]:
    """`recipes`, refused if one is named twice (an alias counts as its recipe's name): it would run twice, for a
    second row of the same numbers."""
    twice = repeated([r.name for r in recipes])
    if twice is not None:
        raise ValueError(f"recipe {twice!r} is given twice: each recipe runs once")
    return recipes


def _with_options(names: Sequence[str | None], options: dict) -> list[tuple[str | None, dict]]:
    """Each recipe name with the options it takes. scale_granularity="token" chooses NVFP4's activation tensor
    scale (SPEC §3), so a list such as bf16,nvfp4,sharq applies it where there is one and runs the others as they
    are; a list where no recipe has one keeps it, and the recipe's own error names the problem. None (the
    checkpoint's own recipe) takes the options."""
    if options.get("scale_granularity", "tensor") == "tensor":
        return [(name, options) for name in names]
    scaled = [name is None or get_recipe(name).uses_tensor_scale for name in names]
    if not any(scaled):
        return [(name, options) for name in names]
    rest = {key: value for key, value in options.items() if key != "scale_granularity"}
    return [(name, options if s else rest) for name, s in zip(names, scaled)]


def source_position_limit(source: Path) -> int | None:
    """The model's max_position_embeddings, read from the config of the Hugging Face directory `source`
    (hf.model_source); None where the config sets none."""
    from transformers import AutoConfig

    return position_limit(AutoConfig.from_pretrained(source))


def evaluate(cfg: EvalConfig) -> dict:
    """Run every recipe of `cfg` and return a JSON-ready dict: the setup and one row per recipe. A sharq checkpoint
    as `cfg.model` gives one row: the checkpoint as saved (recipes_for)."""
    # Everything that can be wrong with the arguments fails here, before minutes are spent loading a model.
    device = check_device(cfg.device)
    rank, world = process_rank()
    if world > 1 and device.type == "cuda" and device.index is None:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    path = resolve_model(cfg.model)  # a path that is no model fails now, before the text is read
    quantized = is_checkpoint(path)
    imported = is_compressed_tensors(path)  # one model per recipe, each built from the checkpoint's payload
    recipes = recipes_for(path, cfg.recipes, cfg.options)
    limit = source_position_limit(model_source(cfg.model)) if cfg.max_tokens != 0 else None
    if limit is not None and cfg.seqlen > limit:  # positions past it were run without a word
        raise ValueError(f"seqlen {cfg.seqlen} exceeds the model's max_position_embeddings {limit}: evaluate windows "
                         f"of at most {limit} tokens")
    if cfg.device_map is not None:  # layers on several devices: "auto" lets each layer choose for its own device
        backend = cfg.backend
    else:
        backend = cfg.backend if cfg.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
        check_backend(backend, device)
    on_gpu = device.type == "cuda" or (cfg.device_map is not None and torch.cuda.is_available())
    dtype = DTYPES[cfg.dtype or ("bfloat16" if on_gpu else "float32")]
    if cfg.tasks:
        check_tasks(cfg.tasks)
        if cfg.limit is not None and cfg.limit < 2:  # else it fails after the work, pairing rows of 1 question
            raise ValueError(f"limit {cfg.limit}: a standard error needs at least 2 questions per task")
    text = load_text(cfg.text) if cfg.max_tokens != 0 else None
    needs_calibration = not quantized and not imported and any(r.needs_calibration for r in recipes)
    calib_text = load_text(cfg.calib_text)[0] if needs_calibration else None

    if cfg.device_map is not None and (quantized or imported):
        raise ValueError("device_map places an unquantized model; a quantized checkpoint loads on one device")

    t0 = time.perf_counter()
    if imported:
        base, tokenizer = None, load_tokenizer(model_source(cfg.model))
    elif cfg.device_map is not None:  # each row loads its own copy (unquantized); this one only calibrates
        base, tokenizer = (load_pretrained(cfg.model, dtype, progress=cfg.progress, device_map=cfg.device_map)
                           if calib_text is not None else (None, load_tokenizer(model_source(cfg.model))))
    else:
        base, tokenizer = load_model(cfg.model, dtype, device, backend=backend, progress=cfg.progress)
    load_s = time.perf_counter() - t0

    def unquantized() -> torch.nn.Module:
        """A fresh copy of the model for one row. A model spread by accelerate is loaded again instead of copied:
        it is spread because one device cannot hold it, and the recipes' rows quantize their copy in place."""
        if cfg.device_map is None:
            return copy.deepcopy(base)
        return load_pretrained(cfg.model, dtype, device_map=cfg.device_map)[0]

    ppl_windows = None
    if text is not None:
        ppl_windows = windows(tokenize(text[0], tokenizer), cfg.seqlen, cfg.max_tokens, bos_token(tokenizer))

    calibration = None
    if calib_text is not None:
        calibration = calibrate(base, [calib_text], tokenizer, seqlen=min(cfg.seqlen, 512), max_tokens=cfg.calib_tokens,
                                progress=cfg.progress)
        if cfg.device_map is not None:
            base = None

    rows = []
    for recipe in recipes:
        if imported:
            model = load(path, dtype, device, backend, recipe=recipe)
        elif quantized:
            model = base
        else:
            model = quantize_model(unquantized(), recipe, backend=backend, calibration=calibration)
        model_class = type(model).__name__
        row = RecipeResult(recipe.name, recipe.activation_bits, recipe.weight_bits, weight_bytes(model))
        with watch_logits(model, device if cfg.device_map is None else "cpu") as finite:
            if ppl_windows is not None:
                p = distributed_perplexity(model, ppl_windows, cfg.batch_size, cfg.progress, desc=recipe.name)
                row.ppl, row.tokens_per_s = p.ppl, p.tokens_per_s
            if cfg.tasks:  # in a torch.distributed run the requests are split; the first process gets the scores
                row.tasks = evaluate_tasks(model, tokenizer, list(cfg.tasks), cfg.limit, cfg.task_batch_size,
                                           cfg.progress)
            if not finite():
                raise NonFiniteLogits(recipe.name, dtype)
        if row.ppl is not None and not math.isfinite(row.ppl):
            raise ValueError(f"recipe {recipe.name!r}: the perplexity overflows (mean NLL "
                             f"{p.nll_sum / p.predicted_tokens:.0f} nats per token): the model is broken")
        if row.tasks:
            row.task_avg, row.task_avg_stderr = task_average(row.tasks)
        rows.append(row)
        del model

    return add_gaps({
        "model": str(path),
        "checkpoint": "sharq" if quantized else "compressed-tensors" if imported else None,
        "model_class": model_class,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device) if cfg.device_map is None else f"device_map={cfg.device_map}",
        "backend": backend,
        "text": text[1] if text is not None else None,
        "seqlen": cfg.seqlen,
        "windows": 0 if ppl_windows is None else len(ppl_windows),
        "ppl_tokens": 0 if ppl_windows is None else ppl_windows.numel(),
        "tasks": list(cfg.tasks),
        "batch_size": cfg.batch_size,  # changes the perplexity of a per-call activation scale
        "limit": cfg.limit,
        "task_batch_size": cfg.task_batch_size,
        "paper_task_average": set(cfg.tasks) == set(PAPER_TASKS),
        "options": cfg.options,
        "load_seconds": round(load_s, 2),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {plural(torch.get_num_threads(), 'thread')}"
                   .strip(),
        "results": [asdict(r) for r in rows],
    })


def add_gaps(res: dict) -> dict:
    """Fill in each row's gap recovered (needs a bf16 and an nvfp4 row)."""
    rows = res["results"]
    by_name = {r["recipe"]: r for r in rows}
    ref, low = by_name.get("bf16"), by_name.get("nvfp4")
    for r in rows:
        if ref and low:
            r["ppl_gap_recovered"] = gap_recovered(r["ppl"], low["ppl"], ref["ppl"])
            if None not in (r["task_avg"], low["task_avg"], ref["task_avg"]):
                r["task_gap_recovered"] = gap_recovered(-r["task_avg"], -low["task_avg"], -ref["task_avg"])
    return res


def merge_results(runs: list[dict], tasks: list[str] | None = None) -> dict:
    """One result from several runs of the same setup (e.g. one recipe per run), gaps recomputed. A recipe whose
    tasks ran in several runs (four tasks in one, HellaSwag in another) becomes one row of all of them, its average
    recomputed; every row must end with the same tasks. With `tasks`, each run is first cut down to those zero-shot
    tasks, so runs of more tasks merge with runs of fewer."""
    if tasks is not None:
        runs = [_only_tasks(run, tasks) for run in runs]
    keys = ("model_class", "dtype", "device", "backend", "text", "seqlen", "windows", "limit", "options")
    for run in runs[1:]:
        diff = [k for k in keys if run.get(k) != runs[0].get(k)]
        if diff:
            raise ValueError(f"cannot merge runs that differ in {', '.join(diff)}")
    rows: dict[str, dict] = {}
    for row in (row for run in runs for row in run["results"]):
        rows[row["recipe"]] = _join_rows(rows[row["recipe"]], row) if row["recipe"] in rows else row
    names = list(dict.fromkeys(t for run in runs for t in run["tasks"]))
    unequal = [r["recipe"] for r in rows.values() if r.get("tasks") is not None and set(r["tasks"]) != set(names)]
    if unequal:
        raise ValueError(f"cannot merge runs that differ in tasks: {', '.join(unequal)} lack some of "
                         f"{', '.join(names)} (merge on the common tasks instead)")
    return add_gaps({**runs[0], "tasks": names, "paper_task_average": set(names) == set(PAPER_TASKS),
                     "results": list(rows.values())})


def _join_rows(a: dict, b: dict) -> dict:
    """One recipe's row from two runs of different tasks (perplexity from at most one of them)."""
    both = set(a.get("tasks") or ()) & set(b.get("tasks") or ())
    if both or (a.get("ppl") is not None and b.get("ppl") is not None):
        what = ", ".join(sorted(both)) or "perplexity"
        raise ValueError(f"two runs of {a['recipe']} both hold {what}: merge one of them")
    tasks = {**(a.get("tasks") or {}), **(b.get("tasks") or {})}
    avg, se = task_average(tasks) if tasks else (None, None)
    keep = a if a.get("ppl") is not None else b
    return {**keep, "tasks": tasks, "task_avg": avg, "task_avg_stderr": se}


def _only_tasks(run: dict, tasks: list[str]) -> dict:
    missing = [t for t in tasks if t not in run["tasks"]]
    if missing:
        raise ValueError(f"a run of {run['results'][0]['recipe']} has no {', '.join(missing)} "
                         f"(its tasks: {', '.join(run['tasks']) or 'none'})")
    rows = []
    for row in run["results"]:
        kept = {t: row["tasks"][t] for t in tasks}
        avg, se = task_average(kept)
        rows.append({**row, "tasks": kept, "task_avg": avg, "task_avg_stderr": se})
    return {**run, "tasks": list(tasks), "paper_task_average": set(tasks) == set(PAPER_TASKS), "results": rows}


def paired_stderr(a: str, b: str) -> float:
    """The standard error of the accuracy difference of two rows on the same questions, from their per-question
    results (evaluate_tasks' "correct"): the sample standard deviation of the per-question differences over √n.
    Questions both rows get right, or both wrong, add no noise, so this is far tighter than √(se_a² + se_b²)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired rows need the same questions (at least 2), got {len(a)} and {len(b)}")
    d = [int(x) - int(y) for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    return math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))


def _paired(r: dict, low: dict) -> bool:
    """Whether both rows logged their per-question results on the same questions of every task."""
    return bool(r["tasks"]) and all(
        "correct" in m and len(m["correct"]) == len(low["tasks"].get(t, {}).get("correct", ""))
        for t, m in r["tasks"].items())


def _z(r: dict, low: dict | None) -> float | None:
    """r's task average minus low's in standard errors of the difference: paired, question by question, where both
    rows logged their answers (_paired); otherwise √(se_r² + se_low²), conservative, since the rows answer the same
    questions and their errors are correlated. None without a low row or its standard errors (older results). A
    standard error of 0 (the same answers throughout, or every one different) gives 0 for no difference, else ±inf."""
    if low is None or r.get("task_avg_stderr") is None or low.get("task_avg_stderr") is None:
        return None
    if _paired(r, low):
        tasks = r["tasks"]
        se = math.sqrt(sum(paired_stderr(m["correct"], low["tasks"][t]["correct"]) ** 2
                           for t, m in tasks.items())) / len(tasks)
    else:
        se = math.sqrt(r["task_avg_stderr"] ** 2 + low["task_avg_stderr"] ** 2)
    diff = r["task_avg"] - low["task_avg"]
    if se > 0:
        return diff / se
    return math.copysign(math.inf, diff) if diff else 0.0


def _difference(r: dict, low: dict | None) -> str:
    """r's task average minus nvfp4's, in points, with its size in standard errors and * where that exceeds 2."""
    if r is low or (z := _z(r, low)) is None:
        return ""
    size = "every answer differs" if math.isinf(z) else f"{z:.1f} se"
    return f"{100 * (r['task_avg'] - low['task_avg']):+.2f} ({size}){' *' if abs(z) > 2 else ''}"


def _gap_resolved(ref: dict | None, low: dict | None) -> bool:
    """Whether bf16's task average is above nvfp4's by more than 2 standard errors: a share of a gap within the
    noise (e.g. 300 % of 0.3 points) says nothing, so the table leaves it out. Without the standard errors to
    judge by (older results) the share is shown as before."""
    z = None if ref is None else _z(ref, low)
    return z is None or z > 2


def format_results(res: dict) -> str:
    """The results table (plain text, aligned)."""
    tasks = res["tasks"]
    headers = ["recipe"]
    if res["windows"]:
        headers += ["PPL", "Δ vs bf16", "gap rec."]
    headers += [t for t in tasks] + (["avg ± se", "avg Δ vs nvfp4", "avg gap rec."] if tasks else [])
    headers += ["act bits", "w bits", "weights MB"] + (["tok/s"] if res["windows"] else [])
    ref = next((r for r in res["results"] if r["recipe"] == "bf16"), None)
    low = next((r for r in res["results"] if r["recipe"] == "nvfp4"), None)
    pct = lambda v: "" if v is None else f"{100 * v:.0f}%"
    ppl_gap = bool(res["windows"]) and (ref is None or low is None or low["ppl"] > ref["ppl"])
    task_gap_resolved = bool(tasks) and _gap_resolved(ref, low)
    rows = []
    for r in res["results"]:
        row = [r["recipe"]]
        if res["windows"]:
            delta = "" if ref is None else f"{r['ppl'] - ref['ppl']:+.3f}"
            row += [f"{r['ppl']:.3f}", delta, pct(r["ppl_gap_recovered"]) if ppl_gap else "n/r"]
        row += [f"{100 * task_score(r['tasks'][t]):.1f}" for t in tasks]
        if tasks:
            se = r.get("task_avg_stderr")  # None in older results
            row += [f"{100 * r['task_avg']:.2f}" + ("" if se is None else f" ± {100 * se:.2f}"),
                    _difference(r, low), pct(r["task_gap_recovered"]) if task_gap_resolved else "n/r"]
        row += [f"{r['activation_bits']:g}", f"{r['weight_bits']:g}", f"{r.get('weight_bytes', 0) / 1e6:.0f}"]
        if res["windows"]:
            row.append(f"{r['tokens_per_s']:.0f}")
        rows.append(row)
    kind = {"sharq": ": a sharq checkpoint, evaluated as saved",
            "compressed-tensors": ": a compressed-tensors NVFP4 checkpoint, each recipe on its 4-bit weights"}
    lines = [f"model {res['model']} ({res['model_class']}, {res['dtype']}, {res['device']}, backend {res['backend']})"
             + kind.get(res.get("checkpoint"), "")]
    if res["windows"]:
        lines.append(f"perplexity: {res['text']}, {plural(res['windows'], 'window')} x "
                     f"{plural(res['seqlen'], 'token')} = {plural(res['ppl_tokens'], 'token')}")
    if tasks:
        others = [r for r in res["results"] if r is not low]
        paired = low is not None and bool(others) and all(_paired(r, low) for r in others)
        lines.append(f"zero-shot: acc_norm where defined, else acc; limit {res['limit'] or 'none'} per task; "
                     "se = standard error; a difference is resolved (*) beyond 2 standard errors of the difference"
                     + (" (paired: question by question)" if paired else ""))
    lines.append("gap rec. = share of the nvfp4 -> bf16 gap that a recipe recovers (SPEC §9)")
    if res["windows"] and not ppl_gap:
        lines.append("gap rec. n/r: nvfp4's perplexity is not above bf16's, so there is no gap to recover")
    if tasks and not task_gap_resolved:
        lines.append("avg gap rec. n/r: bf16's average is not above nvfp4's by 2 standard errors, so the zero-shot "
                     "gap is within the noise and a share of it means nothing")
    return "\n".join(lines + ["", format_table(headers, rows)])
