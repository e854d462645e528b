import argparse
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import sharq.eval.run
import sharq.hf
from sharq.cli import build_parser, main
from sharq.recipes import get_recipe, list_recipes


def test_demo_prints_a_row_per_recipe(capsys):
    assert main(["demo", "--tokens", "8", "--k", "64", "--n", "16", "--recipes", "bf16,nvfp4,sharq"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[3:]] == ["bf16", "nvfp4", "sharq"]


def test_demo_default_recipes_are_every_one_without_calibration(capsys):
    assert main(["demo", "--tokens", "8", "--k", "64", "--n", "16"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[3:]]
    assert rows == [r for r in list_recipes() if not get_recipe(r).needs_calibration] and "sharq" in rows


def test_unknown_recipe_is_a_one_line_error(capsys):
    assert main(["demo", "--recipes", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sharq: error: unknown recipe 'nope'") and err.count("\n") == 1


class ModelLoaded(Exception):
    """Raised where a model would be loaded: the command got past every up-front check."""


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> dict[str, str]:
    """Paths the table's arguments name: a model directory (only its config.json is read before loading), a sharq
    checkpoint, a file, a Latin-1 and a blank text file, a non-empty and a read-only directory. Loading a model raises ModelLoaded; the GGUF cache
    and the Triton interpreter switch (set by the kernel tests) are kept out of the way."""
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "model" / "config.json").write_text('{"model_type": "llama"}')
    (work / "model" / "model.safetensors").write_bytes(b"the source weights")
    (work / "checkpoint").mkdir()
    (work / "checkpoint" / "config.json").write_text('{"quantization_config": {"quant_method": "sharq"}}')
    (work / "notes.txt").write_text("not a model\n" * 50)
    (work / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    (work / "blank.txt").write_text(" \n\n ")
    (work / "full").mkdir()
    (work / "full" / "keep.txt").write_text("keep me")
    (work / "empty").mkdir()
    (work / "ro").mkdir(mode=0o555)

    def load(*args, **kwargs):
        raise ModelLoaded

    for module, names in ((sharq.hf, ("load_pretrained",)), (sharq.interop, ("load_model", "load")),
                          (sharq.eval.run, ("load_model", "load"))):
        for name in names:
            monkeypatch.setattr(module, name, load)
    monkeypatch.setenv("SHARQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return {"tmp": str(work), **{p.stem: str(p) for p in work.iterdir()}}


def snapshot(root: str) -> dict[str, bytes | None]:
    """Every path under root with its contents (None for a directory)."""
    tree = {}
    for parent, dirs, files in os.walk(root):
        tree.update({os.path.join(parent, d): None for d in dirs})
        tree.update({os.path.join(parent, f): open(os.path.join(parent, f), "rb").read() for f in files})
    return tree


def run(argv: list[str]) -> int:
    """main's exit code, whether argparse exits or main returns."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


not_as_root = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                 reason="root writes into read-only directories")
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc file system")
MODEL = ["--model", "{model}"]


@pytest.mark.parametrize("argv,message", [
    # demo
    (["demo", "--tokens", "0"], "argument --tokens: must be at least 1, got 0"),
    (["demo", "--k", "0"], "argument --k: must be at least 1"),
    (["demo", "--n", "-3"], "argument --n: must be at least 1"),
    (["demo", "--n", "x"], "argument --n: invalid integer value: 'x'"),
    (["demo", "--recipes", ","], "no recipe given"),
    (["demo", "--recipes", "outlier-channels"], "sharq demo does not calibrate"),
    # eval: --json, the model, bad combinations
    (["eval", *MODEL, "--json", "{full}"], "--json {full} is a directory"),
    (["eval", *MODEL, "--json", ""], "--json is empty"),
    (["eval", *MODEL, "--json", "{model}/config.json"], "overlaps the model"),
    (["eval", *MODEL, "--json", "{notes}/out.json"], "cannot write"),
    (["eval", *MODEL, "--json", "/no/such/dir/out.json"], "cannot write"),
    pytest.param(["eval", *MODEL, "--json", "{ro}/out.json"], "cannot write", marks=not_as_root),
    pytest.param(["eval", *MODEL, "--json", "/proc/sharq.json"], "cannot write /proc/sharq.json", marks=needs_proc),
    (["eval", "--model", "{notes}"], "is neither a directory nor a .gguf file"),
    (["eval", "--model", ""], "the model path is empty"),
    (["eval", *MODEL, "--backend", "triton"], "backend 'triton'"),
    (["eval", *MODEL, "--no-ppl"], "nothing to evaluate"),
    (["eval", *MODEL, "--seqlen", "2048", "--max-tokens", "1024"], "cannot fill one window of --seqlen 2048"),
    (["eval", *MODEL, "--calib-tokens", "0"], "argument --calib-tokens: must be at least 1"),
    # quantize: --out, the model
    (["quantize", *MODEL, "--out", "{model}"], "--out {model} overlaps the model"),
    (["quantize", *MODEL, "--out", "{model}", "--overwrite"], "overlaps the model"),
    (["quantize", *MODEL, "--out", "{model}/sub"], "overlaps the model"),
    (["quantize", *MODEL, "--out", "{tmp}", "--overwrite"], "overlaps the model"),
    (["quantize", *MODEL, "--out", "{notes}"], "--out {notes} is a file, not a directory"),
    (["quantize", *MODEL, "--out", "{notes}", "--overwrite"], "is a file, not a directory"),
    (["quantize", *MODEL, "--out", "{full}"], "is a non-empty directory: give --overwrite"),
    (["quantize", *MODEL, "--out", "{full}", "--overwrite"], "not a sharq checkpoint: --overwrite replaces only"),
    (["quantize", *MODEL, "--out", ""], "--out is empty"),
    (["quantize", *MODEL, "--out", "{notes}/ckpt"], "cannot write"),
    pytest.param(["quantize", *MODEL, "--out", "{ro}/ckpt"], "cannot write", marks=not_as_root),
    pytest.param(["quantize", *MODEL, "--out", "/proc/sharq-ckpt"], "cannot write /proc/sharq-ckpt: /proc is not",
                 marks=needs_proc),  # permission bits allow it (for root); creating anything there fails
    (["quantize", "--model", "{notes}", "--out", "{empty}"], "is neither a directory nor a .gguf file"),
    (["quantize", "--model", "{checkpoint}", "--out", "{empty}"], "is a quantized checkpoint, already quantized"),
    (["quantize", *MODEL, "--out", "{empty}", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["quantize", *MODEL, "--out", "{empty}", "--calib-tokens", "0"], "argument --calib-tokens: must be at least 1"),
    # generate
    (["generate", *MODEL, ""], "the prompt is empty"),
    (["generate", *MODEL, "--temperature", "-1", "hi"], "argument --temperature: must be finite and at least 0"),
    (["generate", *MODEL, "--temperature", "nan", "hi"], "argument --temperature: must be finite"),
    (["generate", *MODEL, "--temperature", "inf", "hi"], "argument --temperature: must be finite"),
    (["generate", *MODEL, "--max-new-tokens", "0", "hi"], "argument --max-new-tokens: must be at least 1"),
    # export: --out, the recipe
    (["export", *MODEL, "--out", "{notes}"], "is a file, not a directory"),
    (["export", *MODEL, "--out", "{model}"], "overlaps the model"),
    (["export", *MODEL, "--out", "{full}"], "is a non-empty directory: give --overwrite"),
    (["export", *MODEL, "--out", ""], "--out is empty"),
    (["export", *MODEL, "--out", "{empty}", "--recipe", "hif4"], "recipe 'hif4' has hif4 weights"),
    (["export", *MODEL, "--out", "{empty}", "--format", "gguf"], "argument --format: invalid choice"),
    pytest.param(["export", *MODEL, "--out", "/proc/sharq-ct"], "cannot write /proc/sharq-ct", marks=needs_proc),
    # report: --out, the model, its numbers and recipes
    (["report", *MODEL, "--out", "{notes}"], "is a file, not a directory"),
    (["report", *MODEL, "--out", "{full}"], "is a non-empty directory: give --overwrite"),
    (["report", *MODEL, "--out", ""], "--out is empty"),
    (["report", *MODEL, "--out", "{model}", "--overwrite"], "overlaps the model"),
    (["report", *MODEL, "--out", "{notes}/rep"], "cannot write"),
    pytest.param(["report", *MODEL, "--out", "{ro}/rep"], "cannot write", marks=not_as_root),
    pytest.param(["report", *MODEL, "--out", "/proc/sharq-report"], "cannot write /proc/sharq-report",
                 marks=needs_proc),
    (["report", "--model", "{checkpoint}", "--out", "{empty}"], "is a quantized checkpoint"),
    (["report", *MODEL, "--out", "{empty}", "--tokens", "1"], "argument --tokens: must be at least 2"),
    (["report", *MODEL, "--out", "{empty}", "--recipes", ","], "no recipe given"),
    (["report", *MODEL, "--out", "{empty}", "--recipes", "sharq,outlier-channels"], "sharq report does not calibrate"),
    # text arguments: named with their flag; not UTF-8, or no text at all
    (["eval", *MODEL, "--text", "{latin1}"], "--text: text file {latin1} is not UTF-8 (invalid continuation byte at "
                                             "byte 3)"),
    (["eval", *MODEL, "--recipes", "outlier-channels", "--calib-text", "{blank}"], "--calib-text: {blank} holds no"),
    (["eval", *MODEL, "--text", "/no/such.txt"], "--text: text '/no/such.txt' is neither a named corpus"),
    (["quantize", *MODEL, "--out", "{empty}", "--recipe", "outlier-channels", "--calib-text", "{latin1}"],
     "--calib-text: text file {latin1} is not UTF-8"),
    (["quantize", *MODEL, "--out", "{empty}", "--recipe", "outlier-channels", "--calib-text", "{blank}"],
     "--calib-text: {blank} holds no text"),  # it gave API advice: pass calibration=sharq.calibrate(...)
    (["report", *MODEL, "--out", "{empty}", "--text", "{latin1}"], "--text: text file {latin1} is not UTF-8"),
    (["export", *MODEL, "--out", "{empty}", "--activations", "nvfp4", "--calib-text", "{blank}"],
     "--calib-text: {blank} holds no text"),
    # export replaces only an export, and writes only what the format holds
    (["export", *MODEL, "--out", "{full}", "--overwrite"], "--out {full} is a non-empty directory but not a "
                                                           "compressed-tensors export: --overwrite replaces only those"),
    (["export", *MODEL, "--out", "{empty}", "--recipe", "sharq-mxfp4"], "recipe 'sharq-mxfp4' has mxfp4 weights; "
                                                                      "export one of nvfp4, sharq, sparse-only, "
                                                                      "dense-dense, sharq-plus"),
    # an argument no option takes: the command's error
    (["eval", "extra"], "sharq eval: error: unrecognized arguments: extra (see sharq eval --help)"),
])
def test_bad_arguments_fail_up_front_in_one_line(argv, message, workspace, capsys):
    """Exit code 2 and one line, before any model is loaded (the fixture's load raises) and with nothing written."""
    before = snapshot(workspace["tmp"])
    assert run([a.format(**workspace) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(**workspace) in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(workspace["tmp"]) == before


@pytest.mark.parametrize("argv", [
    ["eval", *MODEL, "--text", "{notes}", "--json", "{notes}"],  # an existing file is overwritten
    ["quantize", *MODEL, "--out", "{empty}"],
    ["quantize", *MODEL, "--out", "{checkpoint}", "--overwrite"],  # a checkpoint is replaced
    ["quantize", *MODEL, "--out", "{tmp}/new/deeper"],  # missing parents are created
    ["report", *MODEL, "--text", "{notes}", "--out", "{full}", "--overwrite"],
    ["report", *MODEL, "--text", "{notes}", "--out", "{tmp}/new/deeper"],
])
def test_good_output_paths_pass_the_checks(argv, workspace):
    with pytest.raises(ModelLoaded):
        main([a.format(**workspace) for a in argv])


def test_eval_defaults_are_the_library_defaults(workspace, monkeypatch):
    """`sharq eval` with no argument runs EvalConfig() as it is: bf16, nvfp4 and sharq on the embedded model, 8,192
    Wikipedia tokens in windows of 2,048. Running it takes ~2½ minutes; test_eval runs each step on a smaller budget,
    and the checkpoint variant of the default recipe list is test_eval.py's."""
    seen = []

    def stop(cfg):
        seen.append(cfg)
        raise ModelLoaded

    monkeypatch.setattr(sharq.eval.run, "evaluate", stop)
    with pytest.raises(ModelLoaded):
        main(["eval"])
    assert seen == [sharq.eval.run.EvalConfig()]
    recipes = sharq.eval.run.recipes_for(Path(workspace["model"]), seen[0].recipes, seen[0].options)
    assert [r.name for r in recipes] == ["bf16", "nvfp4", "sharq"]


def test_report_without_matplotlib_fails_before_loading(workspace, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["report", "--model", workspace["model"], "--out", workspace["empty"]]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sharq[plot]'" in err and err.count("\n") == 1


def test_corrupt_gguf_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHARQ_CACHE", str(tmp_path / "cache"))
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))  # the magic, then garbage
    assert main(["eval", "--model", str(tmp_path / "x.gguf"), "--recipes", "bf16", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "as a GGUF model" in err and err.count("\n") == 1 and "Traceback" not in err


# --- one recipe rule for every command -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, str]:
    """The tiny Llama with its word tokenizer: unquantized ("model"), as a sharq checkpoint of nvfp4 ("ckpt": not
    the commands' default recipe) and that checkpoint exported as compressed-tensors ("ct", recording nvfp4); and a
    text of its words."""
    pytest.importorskip("transformers")
    import random

    from .test_eval import word_tokenizer
    from .test_models import tiny

    root = tmp_path_factory.mktemp("quantized")
    model, tokenizer = tiny("llama"), word_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    sharq.quantize_model(model, "nvfp4")
    sharq.save(model, root / "ckpt", tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vLLM's fused q/k/v scales: test_interop's
        sharq.export(model, root / "ct", tokenizer=tokenizer)
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(f"w{rng.randrange(1, 96)}" for _ in range(400)))
    return {name: str(root / name) for name in ("model", "ckpt", "ct", "text.txt")}


@pytest.mark.parametrize("argv,message", [
    (["generate", "w1 w2"], "is a sharq checkpoint, already quantized with 'nvfp4'"),
    (["eval"], "is a sharq checkpoint, already quantized with 'nvfp4'"),
    (["export", "--out", "{out}"], "is a sharq checkpoint, already quantized with 'nvfp4'"),
    (["quantize", "--out", "{out}"], "is a quantized checkpoint, already quantized"),
    (["report", "--out", "{out}"], "is a quantized checkpoint, already quantized"),
])
def test_no_command_runs_another_recipe_on_a_sharq_checkpoint(argv, message, quantized, tmp_path, capsys):
    """Every command that takes a model and a recipe refuses, in one line and before loading, a recipe a sharq
    checkpoint cannot run (generate and export ran the checkpoint's own recipe without a word)."""
    flag = "--recipes" if argv[0] in ("eval", "report") else "--recipe"
    out = tmp_path / "out"
    args = [argv[0], "--model", quantized["ckpt"], flag, "sharq", "--quiet", *argv[1:]]
    assert run([a.format(out=out) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def ran_recipes(argv: list[str], tmp_path: Path, capsys) -> list[str]:
    """The recipes a generate, export or eval command ran, read from what it printed or wrote."""
    command = argv[0]
    extra = {"generate": ["--max-new-tokens", "1", "--raw", "w1 w2"],
             "export": ["--out", str(tmp_path / "export")],
             "eval": ["--seqlen", "16", "--max-tokens", "32", "--json", str(tmp_path / "eval.json")]}[command]
    assert main([*argv, "--quiet", *extra]) == 0
    captured = capsys.readouterr()
    if command == "generate":
        return [captured.err.split("[")[-1].split(":")[0]]
    if command == "export":
        return [json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]["sharq"]
                ["recipe"]["name"]]
    return [row["recipe"] for row in json.loads((tmp_path / "eval.json").read_text())["results"]]


@pytest.mark.parametrize("command", ["generate", "export", "eval"])
@pytest.mark.parametrize("model,recipe,ran", [
    ("model", None, None),  # the command's default
    ("model", "nvfp4", ["nvfp4"]),
    ("ckpt", None, ["nvfp4"]),  # a sharq checkpoint runs as saved
    ("ckpt", "nvfp4", ["nvfp4"]),  # naming its own recipe is allowed
    ("ct", None, ["nvfp4"]),  # an export runs the recipe it recorded, as sharq.load does
    ("ct", "sharq", ["sharq"]),  # or the one asked, on its 4-bit weights (generate and export ran nvfp4)
])
def test_every_command_runs_the_recipe_the_rule_gives(command, model, recipe, ran, quantized, tmp_path, capsys):
    flag = "--recipes" if command == "eval" else "--recipe"
    argv = [command, "--model", quantized[model], *([] if recipe is None else [flag, recipe])]
    if command == "eval":
        argv += ["--text", quantized["text.txt"]]
    default = ["bf16", "nvfp4", "sharq"] if command == "eval" else ["sharq"]
    assert ran_recipes(argv, tmp_path, capsys) == (default if ran is None else ran)


def test_a_checkpoint_runs_as_saved_with_its_options_and_no_flag(quantized, tmp_path, capsys):
    """A checkpoint quantized with --scale-granularity token runs as saved in every command, with no flag: its
    recipe comes from the checkpoint, options and all (it was rebuilt from its name alone, and refused)."""
    ckpt = tmp_path / "token"
    assert main(["quantize", "--model", quantized["model"], "--out", str(ckpt), "--scale-granularity", "token",
                 "--quiet"]) == 0
    [recipe] = sharq.eval.run.recipes_for(ckpt, None)
    assert recipe.name == "sharq" and recipe.scale_granularity == "token"
    for command in ("generate", "export", "eval"):
        text = ["--text", quantized["text.txt"]] if command == "eval" else []
        assert ran_recipes([command, "--model", str(ckpt), *text], tmp_path, capsys) == ["sharq"]


def test_one_token_is_counted_in_the_singular(quantized, capsys):
    assert main(["generate", "--model", quantized["ckpt"], "--max-new-tokens", "1", "--raw", "--quiet", "w1"]) == 0
    assert "[nvfp4: 1 token in " in capsys.readouterr().err


# --- help, speed, noise, interruption ---------------------------------------------------------------------------------
def sharq_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m sharq.cli ARGS` in a fresh process (the same interpreter and source tree as the tests)."""
    return subprocess.run([sys.executable, "-m", "sharq.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_and_argument_errors_print_nothing_but_sharqs_line():
    """--help, --version and a malformed argument answer without loading torch or transformers, so nothing else
    prints (with torchao installed, transformers' quantizers printed four lines of its load failures first)."""
    helped = sharq_cli("--help")
    assert helped.returncode == 0 and helped.stderr == "" and helped.stdout.startswith("usage: sharq")
    bad = sharq_cli("demo", "--tokens", "0")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "sharq demo: error: argument --tokens: must be at least 1, got 0 (see sharq demo --help)\n"
    unknown = sharq_cli("eval", "--dtype", "float8")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "invalid choice: 'float8'" in unknown.stderr


def test_parsing_the_command_line_imports_no_torch():
    """What keeps --help and argument errors fast: the parser, its help and argparse's errors need no torch (a
    command's own --help lists the recipes, which does)."""
    code = ("import sys\nfrom sharq.cli import build_parser\np = build_parser()\nfor argv in (['--help'], "
            "['demo', '--tokens', '0'], ['eval', '--dtype', 'x'], ['generate']):\n    try:\n"
            "        p.parse_args(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'torchao') if m in sys.modules))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.splitlines()[-1] == "[]", child.stderr


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100000")  # one line per option: argparse wraps at hyphens
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        assert "{recipes}" not in text and ("nvfp4" in text or name != "eval")
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"sharq {name} {action.dest} has no help"
            if action.required or action.default is False:  # a flag
                continue
            if action.default is None or "default" in action.help:  # the help says in words what happens
                assert "default" in action.help, f"sharq {name} {action.dest}"
            else:
                assert f"(default: {action.default})" in text, f"sharq {name} {action.dest}: {text}"


# The child takes Ctrl-C as a terminal's foreground process does (a test run started in the background by a
# non-interactive shell passes SIGINT on ignored, and Python then installs no KeyboardInterrupt handler).
INTERRUPTED = """
import signal, sys, time
import sharq.cli as cli

signal.signal(signal.SIGINT, signal.default_int_handler)

def long_command(args):
    print("started", flush=True)
    time.sleep(300)

cli.cmd_demo = long_command
sys.exit(cli.main(["demo"]))
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGINT")
def test_ctrl_c_is_one_line_and_exit_code_130():
    child = subprocess.Popen([sys.executable, "-c", INTERRUPTED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "started\n"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and err == "sharq: interrupted\n" and out == ""


@pytest.mark.parametrize("argv,message", [
    (["demo", "--recipes", "nvfp4,sharq,nvfp4"], "recipe 'nvfp4' is given twice"),
    (["demo", "--recipes", "sharq,sharq-nvfp4"], "recipe 'sharq' is given twice"),  # an alias of it
    (["eval", *MODEL, "--recipes", "bf16,bf16"], "recipe 'bf16' is given twice"),
    (["report", *MODEL, "--out", "{empty}", "--recipes", "sharq,sharq"], "recipe 'sharq' is given twice"),
    (["eval", *MODEL, "--no-ppl", "--tasks", "piqa,piqa"], "--tasks names 'piqa' twice: each task counts once"),
    (["eval", *MODEL, "--no-ppl", "--tasks", "paper,piqa"], "--tasks names 'piqa' twice ('paper' includes it)"),
    (["eval", *MODEL, "--no-ppl", "--tasks", "piqa,nope"], "--tasks: unknown task 'nope'; available: piqa, "),
])
def test_a_recipe_or_task_given_twice_is_refused(argv, message, workspace, capsys):
    """A recipe named twice ran twice; a task named twice also counted twice in the average and its standard
    error, as if independent."""
    assert run([a.format(**workspace) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_paper_combines_with_other_tasks(workspace, monkeypatch):
    """--tasks paper,boolq is the paper's five and boolq (it said "unknown task 'paper' ... (or 'paper')")."""
    pytest.importorskip("lm_eval")
    seen = []

    def stop(cfg):
        seen.append(cfg.tasks)
        raise ModelLoaded

    monkeypatch.setattr(sharq.eval.run, "evaluate", stop)
    with pytest.raises(ModelLoaded):
        main(["eval", "--model", workspace["model"], "--no-ppl", "--tasks", "paper,boolq"])
    assert seen == [("arc_challenge", "hellaswag", "lambada", "piqa", "winogrande", "boolq")]


def test_export_refuses_an_outlier_channels_checkpoint_before_loading(quantized, tmp_path, monkeypatch, capsys):
    """Its bf16 outlier channels have no place in compressed-tensors NVFP4: refused before the checkpoint is read
    (it was refused after loading, naming four recipes of the five that export)."""
    ckpt = tmp_path / "oc"
    assert main(["quantize", "--model", quantized["model"], "--out", str(ckpt), "--recipe", "outlier-channels",
                 "--calib-text", quantized["text.txt"], "--calib-tokens", "64", "--quiet"]) == 0
    monkeypatch.setattr(sharq.interop, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["export", "--model", str(ckpt), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "sharq: error: compressed-tensors holds NVFP4 weights in 16-element groups and nothing else: recipe "
        "'outlier-channels' keeps bf16 outlier channels; export one of nvfp4, sharq, sparse-only, dense-dense, "
        "sharq-plus\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_eval_json_that_cannot_be_written_names_the_file(quantized, capsys):
    """A full disk: the error names --json and its path, not only "[Errno 28] No space left on device"."""
    code = main(["eval", "--model", quantized["model"], "--text", quantized["text.txt"], "--seqlen", "16",
                 "--max-tokens", "16", "--recipes", "bf16", "--quiet", "--json", "/dev/full"])
    err = capsys.readouterr().err
    assert code == 2 and "/dev/full" in err and err.count("\n") == 1, err


def test_help_lists_every_recipe_and_backend_a_command_takes(monkeypatch):
    """The recipe lists left out nvfp4-torchao and nvfp4-compressed-tensors, which every command takes; export's
    listed recipes it refuses; eval's --backend left out packed-placed."""
    monkeypatch.setenv("COLUMNS", "100000")
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps = {name: " ".join(command.format_help().split()) for name, command in commands.items()}
    for name in ("demo", "eval", "quantize", "generate", "report"):
        assert "nvfp4-torchao, nvfp4-compressed-tensors" in helps[name], name
    assert "holds: nvfp4, sharq, sparse-only, dense-dense, sharq-plus (default: sharq;" in helps["export"]
    assert "packed-placed (" in helps["eval"]


def test_a_quiet_eval_prints_nothing_on_stderr(quantized):
    """transformers imports torchao whenever it loads a model; a torchao built for another torch or Python then
    printed a line per C extension it could not load, and torch one per enum it registered, through --quiet."""
    child = sharq_cli("eval", "--model", quantized["model"], "--text", quantized["text.txt"], "--seqlen", "16",
                      "--max-tokens", "16", "--recipes", "bf16", "--quiet")
    assert child.returncode == 0 and child.stderr == "", child.stderr
