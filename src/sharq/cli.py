"""`sharq` command line: a thin layer over the library.

Torch and the library are imported once the arguments are parsed, so --help and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import __version__
from ._checks import repeated
from ._format import format_table, plural

if TYPE_CHECKING:
    import torch

    from .recipes import Recipe

DEFAULT_RECIPE = "sharq"  # what generate, export and quantize run on an unquantized model


def outlier_layer(seed: int, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random linear layer with LLM-like activations: Gaussian, 1/64 of the channels 10-60x larger."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    channels = torch.randperm(k, generator=g)[: k // 64]
    x[:, channels] *= 10 + 50 * torch.rand(len(channels), generator=g)
    return x.to(torch.bfloat16), torch.randn(n, k, generator=g) / k**0.5


def cmd_demo(args: argparse.Namespace) -> int:
    from .functional import simulate_linear

    recipes = _uncalibrated_recipes(args.recipes, "demo")
    x, w = outlier_layer(args.seed, args.tokens, args.k, args.n)
    exact = x.float() @ w.T
    rows = []
    for recipe in recipes:
        t0 = time.perf_counter()
        y = simulate_linear(x, w, recipe=recipe).float()
        ms = (time.perf_counter() - t0) * 1e3
        err = ((y - exact).norm() / exact.norm()).item()
        act = recipe.prepare_activation(x)
        act_err = ((act.values * act.scale - x.float()).norm() / x.float().norm()).item()
        rows.append([recipe.name, f"{err:.4f}", f"{-20 * math.log10(err):.1f}", f"{act_err:.4f}",
                     f"{recipe.activation_bits:g}", f"{recipe.weight_bits:g}", f"{ms:.0f}"])
    print(f"random layer: X [{args.tokens}, {args.k}] (1/64 outlier channels, 10-60x), W [{args.n}, {args.k}], "
          f"seed {args.seed}; error vs the unquantized layer")
    print(format_table(["recipe", "output rel. err", "SQNR dB", "activation rel. err", "act bits", "weight bits",
                        "ms (CPU ref.)"], rows))
    return 0


def _at_least(minimum: int | float, why: str = "", allow_all: bool = False, kind: type = int):
    """An argparse type: a finite `kind` (int or float) >= minimum (or 'all' -> None where allowed), with a one-line
    error: a zero, negative or NaN size would otherwise run and print NaN or nothing."""

    def parse(value: str) -> int | float | None:
        if allow_all and value == "all":
            return None
        n = kind(value)
        if not math.isfinite(n) or n < minimum:
            raise argparse.ArgumentTypeError(f"must be {'' if kind is int else 'finite and '}at least {minimum}{why}, "
                                             f"got {value}")
        return n

    parse.__name__ = {int: "integer", float: "number"}[kind]  # argparse's name in "invalid integer value: 'x'"
    return parse


_positive_int = _at_least(1)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on a hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _join_process_group(device: str) -> int:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1), join the process group (NCCL for CUDA, gloo on the
    CPU) so that `evaluate` splits its perplexity windows over the processes; returns this process's rank."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _quiet_transformers() -> None:
    """transformers' warnings off (its progress bars follow each library call's `progress`), and those of importing
    torchao: transformers imports it with its quantizers whenever it loads a model (sharq never uses it), and a
    torchao built for another torch or Python warns of each C extension it cannot load, and torch of each enum
    it registers."""
    import logging

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _uncalibrated_recipes(names: tuple[str, ...] | None, command: str) -> list[Recipe]:
    """The --recipes of a command that does not calibrate (demo, report; None: every recipe that needs no
    calibration): an empty list or a calibrated recipe is an error now, not an empty report or a failure after the
    model work."""
    from .eval.run import check_distinct
    from .recipes import get_recipe, list_recipes

    if names is None:
        return [r for r in map(get_recipe, list_recipes()) if not r.needs_calibration]
    if not names:
        raise ValueError("no recipe given: give --recipes, e.g. nvfp4,sharq")
    recipes = check_distinct([get_recipe(name) for name in names])
    for recipe in recipes:
        if recipe.needs_calibration:
            raise ValueError(f"sharq {command} does not calibrate: leave {recipe.name!r} out of --recipes")
    return recipes


def _check_text(spec: str, flag: str) -> None:
    """A text argument, refused before any model work unless it is a named corpus or a UTF-8 file holding some
    text, in one line naming the flag."""
    from .eval.data import CORPORA, load_text

    if spec in CORPORA:
        return
    try:
        text = load_text(spec)[0]
    except (ValueError, OSError) as e:  # no such file, not UTF-8, unreadable
        raise ValueError(f"{flag}: {e}") from None
    if not text.strip():
        raise ValueError(f"{flag}: {spec} holds no text")


def _unquantized_model(spec: str | None, command: str) -> Path:
    """The path of --model, refused now if it is missing, not a model, or a quantized checkpoint (sharq's or
    compressed-tensors')."""
    from .hf import resolve_model
    from .interop import is_quantized_checkpoint

    path = resolve_model(spec)
    if is_quantized_checkpoint(path):
        raise ValueError(f"{spec} is a quantized checkpoint, already quantized: sharq {command} needs the "
                         "unquantized model")
    return path


def _check_output(value: str, flag: str, model: Path, makes_parents: bool) -> Path:
    """Refuse an output path that is empty, overlaps the model (the same path, inside it or holding it: writing
    would destroy the model) or has no writable directory to go in, before any model work. Returns it resolved."""
    if not value:
        raise ValueError(f"{flag} is empty: give a path")
    out, source = Path(value).expanduser().resolve(), model.resolve()
    if out == source or source in out.parents or out in source.parents:
        raise ValueError(f"{flag} {value} overlaps the model {model}: give a path outside it")
    parent = next(p for p in out.parents if p.exists()) if makes_parents else out.parent
    if not _can_create_in(parent):
        raise ValueError(f"cannot write {value}: {parent} is not a writable directory")
    return out


def _can_create_in(directory: Path) -> bool:
    """Whether a file can be created in `directory`, found by creating one and removing it: permission bits
    (os.access) grant root everything and know nothing of a file system that takes no new file (/proc)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".sharq-probe-")
    except OSError:  # not a directory, no permission, a read-only or pseudo file system
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _check_out_dir(args: argparse.Namespace, model: Path, replaces: tuple[Callable[[Path], bool], str] | None = None
                   ) -> None:
    """--out of quantize, export and report: a directory, created with its parents; a non-empty one needs
    --overwrite, and quantize and export replace that way only what they write (`replaces`: a test and its name),
    never, say, a home directory."""
    out = _check_output(args.out, "--out", model, makes_parents=True)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"--out {args.out} is a non-empty directory: give --overwrite to write over it")
        if replaces is not None and not replaces[0](out):
            raise ValueError(f"--out {args.out} is a non-empty directory but not {replaces[1]}: --overwrite "
                             "replaces only those")


def cmd_quantize(args: argparse.Namespace) -> int:
    """Load a model, quantize it with one recipe (calibrating if the recipe needs it) and save a checkpoint. A
    compressed-tensors NVFP4 checkpoint (llm-compressor's GPTQ or AWQ) keeps its 4-bit weights exactly: the recipe's
    activations go on them, saved as a sharq checkpoint."""
    from .hf import resolve_model
    from .interop import is_compressed_tensors

    path = resolve_model(args.model)
    calibrated_weights = is_compressed_tensors(path)
    if not calibrated_weights:
        path = _unquantized_model(args.model, "quantize")
    from .checkpoint import is_checkpoint

    _check_out_dir(args, path, (is_checkpoint, "a sharq checkpoint"))
    recipe = _one_recipe(args, path, calibrates=not calibrated_weights)
    if recipe.needs_calibration and not calibrated_weights:
        _check_text(args.calib_text, "--calib-text")
    _offline()
    _quiet_transformers()
    from .checkpoint import save
    from .eval.run import DTYPES
    from .models import check_device

    device = check_device(args.device)
    if calibrated_weights:
        from .hf import load_tokenizer
        from .interop import load

        model = load(path, DTYPES[args.dtype], device, recipe=recipe, strict=args.strict or None)
        out = save(model, args.out, load_tokenizer(path), overwrite=args.overwrite, progress=not args.quiet)
        print(f"{recipe.name} on the 4-bit weights of {path} (activations {recipe.activation_bits:g} bits, weights "
              f"{recipe.weight_bits:g} bits) -> {out}")
        return 0
    from .eval.data import load_text
    from .hf import load_pretrained
    from .models import calibrate, quantize_model

    calib = load_text(args.calib_text)[0] if recipe.needs_calibration else None
    # calibration runs the whole model on the device; otherwise the model moves there one layer at a time as it is
    # quantized, so a model whose weights do not fit the device still quantizes on it
    progress = not args.quiet
    model, tokenizer = load_pretrained(args.model, DTYPES[args.dtype], device if calib is not None else "cpu",
                                       progress=progress)
    calibration = None
    if calib is not None:
        calibration = calibrate(model, [calib], tokenizer, max_tokens=args.calib_tokens, progress=progress)
    quantize_model(model, recipe, calibration=calibration, strict=args.strict, device=device, progress=progress)
    out = save(model, args.out, tokenizer, overwrite=args.overwrite, progress=progress)
    print(f"quantized {path} with {recipe.name} (activations {recipe.activation_bits:g} bits, weights "
          f"{recipe.weight_bits:g} bits) -> {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt with a quantized model through sharq.generate (a static KV cache; each decode step
    replayed from one CUDA graph on CUDA), streaming the tokens, then print tokens/s and the weights' memory."""
    if not args.prompt:
        raise ValueError("the prompt is empty: give the text to continue")
    from .hf import resolve_model
    from .models import check_device

    device = check_device(args.device)
    path = resolve_model(args.model)
    recipe = _one_recipe(args, path)
    _offline()
    _quiet_transformers()
    from transformers import TextStreamer

    from ._checks import NonFiniteLogits
    from .generate import generate
    from .models import weight_bytes

    model, tokenizer = _quantized_model(args, path, recipe, device)
    name = model.sharq_quantization["recipe"]["name"]
    if getattr(tokenizer, "chat_template", None) and not args.raw:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    ids = ids.to(device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    eos = model.generation_config.eos_token_id  # as model.generate stops; the tokenizer's where the model has none
    t0 = time.perf_counter()
    try:
        out = generate(model, ids["input_ids"], args.max_new_tokens, temperature=args.temperature,
                       eos_token_id=tokenizer.eos_token_id if eos is None else eos, streamer=streamer,
                       compile=args.compile).cpu()
    except NonFiniteLogits as e:  # the tokens chosen from NaN logits are noise (greedy: always id 0)
        raise ValueError(_non_finite(name, e.dtype)) from None
    seconds = time.perf_counter() - t0
    new = out.shape[-1] - ids["input_ids"].shape[-1]
    size = weight_bytes(model)
    memory = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"
    print(f"\n[{name}: {plural(new, 'token')} in {seconds:.1f} s, {new / seconds:.1f} tokens/s, weights {memory}]",
          file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Per-layer diagnostics on real text: error and SQNR per recipe, outlier statistics, plots."""
    path = _unquantized_model(args.model, "report")
    _check_out_dir(args, path)
    _uncalibrated_recipes(args.recipes, "report")
    _check_text(args.text, "--text")
    from .eval.run import source_position_limit
    from .hf import model_source

    limit = source_position_limit(model_source(args.model))
    if limit is not None and args.tokens > limit:
        raise ValueError(f"--tokens {args.tokens} exceeds the model's max_position_embeddings {limit}: give --tokens "
                         f"{limit} or less")
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("sharq report draws its plots with matplotlib: pip install 'sharq[plot]'")
    _offline()
    _quiet_transformers()
    from .eval.data import load_text
    from .eval.report import write_report
    from .hf import load_pretrained
    from .models import check_device

    device = check_device(args.device)
    text, label = load_text(args.text)
    model, tokenizer = load_pretrained(args.model, device=device, progress=not args.quiet)  # float32
    out = write_report(model, tokenizer, text, list(args.recipes), args.tokens, args.out,
                       setup=f"model {path}; text {label}", progress=not args.quiet)
    print(f"wrote {out / 'report.md'}, {out / 'error_per_layer.png'}, {out / 'outliers.png'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a quantized model in a serving format (docs/FORMAT.md): a sharq checkpoint as saved, or a model
    quantized here with --recipe."""
    from .hf import resolve_model
    from .interop import GROUP, exportable, exportable_recipes, is_compressed_tensors

    source = resolve_model(args.model)
    _check_out_dir(args, source, (is_compressed_tensors, "a compressed-tensors export"))
    recipe = _one_recipe(args, source)
    if not exportable(recipe):  # checked before any loading
        why = (f"has {recipe.weight_fmt} weights" if recipe.weight_fmt != "nvfp4" else "keeps bf16 outlier channels"
               if recipe.needs_calibration else f"has weight blocks of {recipe.weight_block}")
        raise ValueError(f"{args.format} holds NVFP4 weights in {GROUP}-element groups and nothing else: recipe "
                         f"{recipe.name!r} {why}; export one of {', '.join(exportable_recipes())}")
    if args.activations == "nvfp4":
        _check_text(args.calib_text, "--calib-text")
    _offline()
    _quiet_transformers()
    from .interop import export, measure_input_amax

    shared = not args.per_layer_global_scales
    # kept where the model is quantized here, so that the fused layers whose global scale changes are quantized
    # once, from them (a checkpoint holds none: its fused layers are quantized again from their 4-bit weights)
    original_weights: dict | None = {} if shared else None
    model, tokenizer = _quantized_model(args, source, recipe, "cpu", original_weights)
    input_amax = None
    if args.activations == "nvfp4":  # calibrated per-tensor input scales, what vLLM's W4A4 NVFP4 scheme needs
        from .eval.data import load_text
        from .eval.perplexity import windows
        from .hf import bos_token, tokenize

        ids = windows(tokenize(load_text(args.calib_text)[0], tokenizer), 512, args.calib_tokens, bos_token(tokenizer))
        input_amax = measure_input_amax(model, ids.split(1))
    out = export(model, args.out, args.format, tokenizer, input_amax=input_amax, shared_global_scales=shared,
                 original_weights=original_weights or None, overwrite=args.overwrite)
    print(f"exported {source} ({model.sharq_quantization['recipe']['name']}) as {args.format} -> {out}")
    return 0


def _tasks(names: tuple[str, ...]) -> tuple[str, ...]:
    """--tasks, with 'paper' standing for the paper's five (so paper,boolq is six), each task once."""
    from .eval.zeroshot import PAPER_TASKS, TASKS, check_tasks

    tasks = tuple(t for name in names for t in (PAPER_TASKS if name == "paper" else (name,)))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks: unknown task {unknown[0]!r}; available: {', '.join(TASKS)}, or paper (the "
                         f"paper's {', '.join(PAPER_TASKS)})")
    twice = repeated(tasks)
    if twice is not None:
        also = " ('paper' includes it)" if "paper" in names and twice in PAPER_TASKS else ""
        raise ValueError(f"--tasks names {twice!r} twice{also}: each task counts once in the average")
    if tasks:
        check_tasks(tasks)  # lm-eval installed
    return tasks


def _export_recipes() -> list[str]:
    from .interop import exportable_recipes

    return exportable_recipes()


def _all_recipes() -> list[str]:
    """Every recipe a command takes by name: those of SPEC §6 and sharq-plus, and those reproducing other tools."""
    from .recipes import list_recipes

    return list_recipes(compat=True)


def _recipe_options(args: argparse.Namespace) -> dict:
    return {} if args.scale_granularity is None else {"scale_granularity": args.scale_granularity}


def _one_recipe(args: argparse.Namespace, path: Path, calibrates: bool = False) -> Recipe:
    """The recipe a command that runs one (generate, export, quantize) runs on the model at `path`, by the rule
    every command shares (eval.run.recipes_for): --recipe (default sharq) on an unquantized model, a sharq
    checkpoint's own, any with NVFP4 weights on a compressed-tensors checkpoint. A recipe that needs calibration
    is refused on an unquantized model unless the command calibrates (quantize)."""
    from .eval.run import recipes_for
    from .interop import is_quantized_checkpoint

    names = None if args.recipe is None else (args.recipe,)
    recipe = recipes_for(path, names, _recipe_options(args), (DEFAULT_RECIPE,))[0]
    if recipe.needs_calibration and not calibrates and not is_quantized_checkpoint(path):
        raise ValueError(f"recipe {recipe.name!r} needs calibration: make a checkpoint with `sharq quantize` first")
    return recipe


def _quantized_model(args: argparse.Namespace, path: Path, recipe: Recipe, device: str | torch.device,
                     original_weights: dict | None = None) -> tuple:
    """(model, tokenizer) of the model at `path` running `recipe` (_one_recipe's): a sharq checkpoint as saved, a
    compressed-tensors checkpoint with the recipe on its 4-bit weights, an unquantized model quantized here (into
    `original_weights`, if given, go the weights it was quantized from, by layer name)."""
    from .eval.run import DTYPES
    from .hf import load_tokenizer
    from .interop import is_compressed_tensors, is_quantized_checkpoint, load, load_model
    from .models import quantize_model, target_linears

    progress = not args.quiet
    if is_compressed_tensors(path):
        return load(path, DTYPES[args.dtype], device, recipe=recipe), load_tokenizer(path)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype], device, progress=progress)
    if not is_quantized_checkpoint(path):
        if original_weights is not None:
            original_weights.update({name: linear.weight for name, linear in target_linears(model).items()})
        quantize_model(model, recipe, progress=progress)
    return model, tokenizer


def _check_eval_arguments(args: argparse.Namespace) -> None:
    """What evaluate() cannot judge alone, refused before the evaluation rather than after it: a device this
    machine lacks (before a model is read), results that cannot be written (an existing --json file is
    overwritten), nothing to evaluate, a budget below one window; and the evaluation's own refusals that are
    about a flag, in the flag's words."""
    from .backends import get_backend
    from .checkpoint import is_checkpoint
    from .eval.run import recipes_for, source_position_limit
    from .hf import model_source, resolve_model
    from .interop import is_compressed_tensors, is_quantized_checkpoint
    from .models import check_device

    check_device(args.device)  # before any model is read
    if args.backend != "auto":
        get_backend(args.backend)  # an unknown name, before the model's config is read (a GGUF is converted for it)
    model = resolve_model(args.model)
    recipes = recipes_for(model, args.recipes, _recipe_options(args))  # the rule every command shares
    if not args.no_ppl:
        _check_text(args.text, "--text")
    if any(r.needs_calibration for r in recipes) and not is_quantized_checkpoint(model):
        _check_text(args.calib_text, "--calib-text")
    if args.json is not None:
        if _check_output(args.json, "--json", model, makes_parents=False).is_dir():
            raise ValueError(f"--json {args.json} is a directory: give a file path")
    if args.device_map is not None and (is_checkpoint(model) or is_compressed_tensors(model)):
        raise ValueError("--device-map places an unquantized model; a quantized checkpoint loads on one --device")
    if args.no_ppl and not args.tasks:
        raise ValueError("nothing to evaluate: --no-ppl skips perplexity, so give --tasks")
    if not args.no_ppl and args.max_tokens is not None and args.max_tokens < args.seqlen:
        # a window holds seqlen text tokens, or BOS and seqlen - 1 where the tokenizer adds BOS: read only here
        body = args.seqlen - 1
        if args.max_tokens == body:
            from .hf import bos_token, load_tokenizer

            body += bos_token(load_tokenizer(model_source(args.model))) is None
        if args.max_tokens < body:
            raise ValueError(f"--max-tokens {args.max_tokens} cannot fill one window of --seqlen {args.seqlen} "
                             f"({plural(body, 'text token')}): raise --max-tokens or lower --seqlen")
    limit = None if args.no_ppl else source_position_limit(model_source(args.model))
    if limit is not None and args.seqlen > limit:
        raise ValueError(f"--seqlen {args.seqlen} exceeds the model's max_position_embeddings {limit}: give --seqlen "
                         f"{limit} or less")


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    tasks = _tasks(args.tasks)
    _check_eval_arguments(args)
    _offline()
    from ._checks import NonFiniteLogits
    from .eval.run import EvalConfig, evaluate, format_results

    _quiet_transformers()

    options = _recipe_options(args)
    cfg = EvalConfig(model=args.model, recipes=args.recipes, text=args.text, seqlen=args.seqlen,
                     max_tokens=0 if args.no_ppl else args.max_tokens, tasks=tasks, limit=args.limit,
                     device=args.device, device_map=args.device_map, dtype=args.dtype, backend=args.backend,
                     batch_size=args.batch_size,
                     task_batch_size=args.task_batch_size,
                     calib_text=args.calib_text, calib_tokens=args.calib_tokens, options=options,
                     progress=not args.quiet)
    rank = _join_process_group(args.device)
    try:
        res = evaluate(cfg)
    except NonFiniteLogits as e:
        raise ValueError(_non_finite(e.recipe, e.dtype)) from None
    finally:
        _leave_process_group()
    if rank:  # a torch.distributed run: the first process reports
        return 0
    print(format_results(res))
    if args.json:
        text = json.dumps(res, indent=2, allow_nan=False)  # strict JSON: a NaN here is a bug, not a result
        try:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise OSError(f"cannot write --json {args.json}: {e.strerror or e}") from None
        print(f"wrote {args.json}")
    return 0


def _non_finite(recipe: str, dtype: torch.dtype) -> str:
    """The error for a model whose logits are NaN or inf (NonFiniteLogits), in the flags' words."""
    from ._checks import NonFiniteLogits

    return str(NonFiniteLogits(recipe, dtype, in_float32="give --dtype float32"))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default at the end of its help, where there is one to show: not for a flag, nor for None (the
    help then says in words what happens), nor where the help states it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr (and exit code 2), not a usage block, from the command it
    belongs to; help shows every default, and lists the recipes ("{recipes}", or "{export_recipes}" for those
    export writes, in an option's help) only when printed: listing them imports torch."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """An argument that no option takes is an error of the command it follows (argparse makes it the top
        parser's, which points to `sharq --help`)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def format_help(self) -> str:
        lists = {"{recipes}": _all_recipes, "{export_recipes}": _export_recipes}
        for key, names in lists.items():
            if any(key in (action.help or "") for action in self._actions):
                for action in self._actions:
                    action.help = action.help and action.help.replace(key, ", ".join(names()))
        return super().format_help()


MODEL_HELP = "a Hugging Face model directory or a .gguf file (default: the embedded SmolLM2-135M)"
QUANTIZED_MODEL_HELP = ("a Hugging Face model directory, a .gguf file, a sharq checkpoint (run as saved) or a "
                        "compressed-tensors NVFP4 checkpoint (any recipe with NVFP4 weights runs on its 4-bit weights) "
                        "(default: the embedded SmolLM2-135M)")
ONE_RECIPE_DEFAULT = ("(default: sharq; a sharq checkpoint's own recipe; a compressed-tensors checkpoint's as its "
                      "export recorded it, else sharq)")
TEXT_HELP = "a named corpus (wikipedia, lambada) or a text file"
DTYPES = ["float32", "bfloat16", "float16"]


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _add_scale_granularity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale-granularity", choices=["tensor", "token"], default=None,
                   help="NVFP4 activation scale: per call (tensor, the paper's) or per token (batch-invariant) "
                        "(default: the recipe's own, per call)")


def _add_calibration(p: argparse.ArgumentParser, used: str) -> None:
    p.add_argument("--calib-text", default="lambada", help=f"calibration text, {used}: {TEXT_HELP}")
    p.add_argument("--calib-tokens", type=_positive_int, default=8192, help="calibration tokens")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sharq", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"sharq {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="error of every recipe on an outlier-rich random layer")
    d.add_argument("--recipes", type=_csv, default=None,
                   help="comma-separated, from: {recipes} (default: every recipe that needs no calibration)")
    d.add_argument("--tokens", type=_positive_int, default=256, help="rows of X")
    d.add_argument("--k", type=_positive_int, default=2048, help="input channels")
    d.add_argument("--n", type=_positive_int, default=1024, help="output channels")
    d.add_argument("--seed", type=int, default=0, help="seed of the random layer")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of recipes on a real model",
                       description="Evaluate recipes on a model: perplexity on real text (non-overlapping windows) "
                                   "and, with --tasks, zero-shot accuracy through lm-evaluation-harness.")
    e.add_argument("--model", default=None, help=QUANTIZED_MODEL_HELP)
    e.add_argument("--recipes", type=_csv, default=None,
                   help="comma-separated, from: {recipes} (default: bf16,nvfp4,sharq; a sharq checkpoint's own "
                        "recipe; a compressed-tensors checkpoint's as its export recorded it, else sharq)")
    e.add_argument("--text", default="wikipedia", help=f"perplexity text: {TEXT_HELP}")
    e.add_argument("--seqlen", type=_at_least(2, " (one token predicts the next)"), default=2048,
                   help="perplexity window in tokens (the paper's 2048), at most the model's "
                        "max_position_embeddings")
    e.add_argument("--max-tokens", type=_at_least(1, allow_all=True), default=8192,
                   help="perplexity token budget, or 'all'")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity (zero-shot only)")
    e.add_argument("--tasks", type=_csv, default=(),
                   help="zero-shot tasks, each once: piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada,boolq; "
                        "'paper' stands for the paper's five (arc_challenge,hellaswag,lambada,piqa,winogrande), "
                        "alone or with others (default: none)")
    e.add_argument("--limit", type=_at_least(2, " (a standard error needs 2 questions)"), default=None,
                   help="questions per task, at least 2 (default: all)")
    _add_device(e)
    e.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"], default=None,
                   help="spread the model over the visible GPUs (and CPU memory, then disk) with accelerate, instead "
                        "of --device; each quantized layer stays where it is placed (default: one --device)")
    e.add_argument("--dtype", choices=DTYPES, default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    e.add_argument("--backend", default="auto",
                   help="SharQLinear backend: reference (pure torch), triton (fused kernel, exact bf16 Ŵ), packed "
                        "(4-bit weights in memory), packed-placed (packed, its NVFP4 codes in the layout its CUDA "
                        "kernels decode in fewer instructions), humming (humming-kernels' 4-bit GEMM; its outputs "
                        "vary from run to run) or auto (triton on CUDA, reference elsewhere)")
    e.add_argument("--batch-size", type=_positive_int, default=1,
                   help="perplexity windows per forward pass: with a per-call activation scale (--scale-granularity "
                        "tensor, the paper's) the windows of a batch share one, so this changes the perplexity")
    e.add_argument("--task-batch-size", type=_positive_int, default=8,
                   help="zero-shot requests per forward pass (a per-tensor activation scale couples the requests "
                        "of a batch, as in the paper's setup)")
    _add_scale_granularity(e)
    _add_calibration(e, "for outlier-channels")
    e.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (default: do not)")
    _add_quiet(e)
    e.set_defaults(func=cmd_eval)

    q = sub.add_parser("quantize", help="quantize a model with one recipe and save a checkpoint (docs/FORMAT.md)")
    q.add_argument("--model", default=None, help="a Hugging Face model directory, a .gguf file, or a compressed-tensors "
                   "NVFP4 checkpoint (llm-compressor's GPTQ/AWQ: the recipe runs on its 4-bit weights, saved as a "
                   "sharq checkpoint) (default: the embedded SmolLM2-135M)")
    q.add_argument("--recipe", default=DEFAULT_RECIPE, help="one of: {recipes}")
    q.add_argument("--out", required=True, help="the checkpoint directory to write")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it is a sharq checkpoint already")
    q.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the unquantized tensors")
    _add_device(q)
    _add_scale_granularity(q)
    _add_calibration(q, "for outlier-channels")
    q.add_argument("--strict", action="store_true", help="refuse non-finite weights or activations")
    _add_quiet(q)
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="generate text with a quantized model, streaming tokens (each step replayed "
                       "from a CUDA graph on CUDA)")
    g.add_argument("prompt", help="the text to continue (wrapped in the model's chat template unless --raw)")
    g.add_argument("--model", default=None, help=QUANTIZED_MODEL_HELP)
    g.add_argument("--recipe", default=None, help="one of: {recipes} " + ONE_RECIPE_DEFAULT)
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate at most")
    g.add_argument("--temperature", type=_at_least(0.0, kind=float), default=0.0,
                   help="sampling temperature; 0 is greedy")
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile first: "
                   "faster per token, but the compilation takes longer than a short generation saves")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the unquantized tensors")
    _add_device(g)
    _add_scale_granularity(g)
    _add_quiet(g)
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="write a quantized model in a serving format (compressed-tensors, for vLLM)",
                       description="Write a sharq checkpoint, or a model quantized here with --recipe, in a format "
                                   "other tools load: compressed-tensors NVFP4 (what llm-compressor writes and vLLM "
                                   "serves). Engines run its 4-bit weights with their own activations, not SharQ's "
                                   "(docs/FORMAT.md); sharq reads it back exactly.")
    x.add_argument("--model", default=None, help=QUANTIZED_MODEL_HELP)
    x.add_argument("--recipe", default=None, help="one of the recipes whose weights the format holds: {export_recipes} "
                   + ONE_RECIPE_DEFAULT)
    x.add_argument("--format", choices=["compressed-tensors"], default="compressed-tensors",
                   help="the serving format")
    x.add_argument("--activations", choices=["none", "nvfp4"], default="none",
                   help="the activation scheme recorded for serving engines: none (weights only) or nvfp4 "
                        "(W4A4 with per-tensor input scales calibrated on --calib-text)")
    x.add_argument("--per-layer-global-scales", action="store_true",
                   help="keep every layer's own weight global scale (sharq reads the model back bit for bit; vLLM, "
                        "which runs q/k/v and gate/up with one scale each, does not compute it). Default: one per "
                        "fused group, its other layers quantized again: from the model's weights, or from the 4-bit "
                        "weights of a checkpoint (docs/FORMAT.md)")
    _add_calibration(x, "for --activations nvfp4")
    x.add_argument("--out", required=True, help="the directory to write")
    x.add_argument("--overwrite", action="store_true", help="replace --out if it is such an export already")
    x.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the unquantized tensors")
    _add_scale_granularity(x)
    _add_quiet(x)
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="per-layer error, SQNR and outlier statistics on real text, with plots")
    r.add_argument("--model", default=None, help=MODEL_HELP)
    r.add_argument("--recipes", type=_csv, default="nvfp4,sharq,dense-dense,sparse-only",
                   help="comma-separated, from: {recipes}; none that needs calibration")
    r.add_argument("--text", default="wikipedia", help=TEXT_HELP)
    r.add_argument("--tokens", type=_at_least(2), default=512, help="tokens of text to run (one forward pass)")
    r.add_argument("--out", default="sharq-report", help="output directory")
    r.add_argument("--overwrite", action="store_true", help="write into --out if it is a non-empty directory")
    _add_device(r)
    _add_quiet(r)
    r.set_defaults(func=cmd_report)
    return p


def _out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")  # torch raised it only if it is loaded
    return isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))


OUT_OF_MEMORY_ADVICE = {
    "eval": ": lower --batch-size (which changes the perplexity: the windows of a batch share the per-call activation "
            "scale) or --seqlen",
    "generate": ": lower --max-new-tokens or shorten the prompt",
    "report": ": lower --tokens",
}


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT
        print("sharq: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, MemoryError) as e:  # OSError: a full disk, an unreadable model
        if _out_of_memory(e):
            message = f"out of memory ({e.__class__.__name__}){OUT_OF_MEMORY_ADVICE.get(command, '')}"
        else:
            message = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        print(f"sharq: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
