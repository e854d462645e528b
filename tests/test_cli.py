import os
from pathlib import Path

import pytest

import sharq.eval.run
import sharq.hf
from sharq.cli import main
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
    checkpoint, a file, a non-empty and a read-only directory. Loading a model raises ModelLoaded; the GGUF cache
    and the Triton interpreter switch (set by the kernel tests) are kept out of the way."""
    work = tmp_path / "work"
    (work / "model").mkdir(parents=True)
    (work / "model" / "config.json").write_text('{"model_type": "llama"}')
    (work / "model" / "model.safetensors").write_bytes(b"the source weights")
    (work / "checkpoint").mkdir()
    (work / "checkpoint" / "config.json").write_text('{"quantization_config": {"quant_method": "sharq"}}')
    (work / "notes.txt").write_text("not a model\n" * 50)
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
    # report: --out, the model, its numbers and recipes
    (["report", *MODEL, "--out", "{notes}"], "is a file, not a directory"),
    (["report", *MODEL, "--out", "{full}"], "is a non-empty directory: give --overwrite"),
    (["report", *MODEL, "--out", ""], "--out is empty"),
    (["report", *MODEL, "--out", "{model}", "--overwrite"], "overlaps the model"),
    (["report", *MODEL, "--out", "{notes}/rep"], "cannot write"),
    pytest.param(["report", *MODEL, "--out", "{ro}/rep"], "cannot write", marks=not_as_root),
    (["report", "--model", "{checkpoint}", "--out", "{empty}"], "is a quantized checkpoint"),
    (["report", *MODEL, "--out", "{empty}", "--tokens", "1"], "argument --tokens: must be at least 2"),
    (["report", *MODEL, "--out", "{empty}", "--recipes", ","], "no recipe given"),
    (["report", *MODEL, "--out", "{empty}", "--recipes", "sharq,outlier-channels"], "sharq report does not calibrate"),
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
    recipes = sharq.eval.run.recipes_for(seen[0], Path(workspace["model"]))
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
