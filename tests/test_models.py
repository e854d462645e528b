import dataclasses
import gc
import re

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import sharq  # noqa: E402
from sharq import functional  # noqa: E402
from sharq import nn as snn  # noqa: E402
from sharq.backends import BACKENDS, GroupPlan, get_backend  # noqa: E402
from sharq.models import target_linears  # noqa: E402
from sharq.quant import dequantize_blocks  # noqa: E402

from .conftest import recording_plans  # noqa: E402

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def tiny(model_type: str) -> nn.Module:
    cfg = {
        "llama": lambda: transformers.LlamaConfig(**SMALL),
        "mistral": lambda: transformers.MistralConfig(**SMALL),
        "qwen2": lambda: transformers.Qwen2Config(**{**SMALL, "hidden_size": 72, "intermediate_size": 80}),
        "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
        "gemma3_text": lambda: transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=16),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                                         moe_intermediate_size=32, head_dim=16),
        "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    }[model_type]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "mixtral"]


def _record_layer_io(model):
    """Inputs and outputs of every SharQLinear in one forward pass."""
    seen, handles = [], []
    for module in model.modules():
        if isinstance(module, snn.SharQLinear):
            handles.append(module.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o))))
    return seen, handles


@pytest.mark.parametrize("model_type", FAMILIES)
def test_quantize_model_matches_simulate_linear_layer_by_layer(model_type, rng):
    model = tiny(model_type)
    originals = {n: (m.weight.detach().clone(), m.bias) for n, m in target_linears(model).items()}
    expected = {n for n in originals}
    experts = [n for n, m in model.named_modules() if n.endswith("mlp.experts")]
    lm_head = model.lm_head.weight.detach().clone()
    sharq.quantize_model(model, "sharq")
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], snn.SharQLinear) for n in expected)
    assert all(isinstance(modules[n], snn.SharQExperts) for n in experts)
    assert len(expected) + len(experts) > 0 and (model_type.endswith(("moe", "mixtral")) == bool(experts))
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, lm_head)
    assert not any(isinstance(m, snn.SharQLinear) for n, m in model.named_modules()
                   if "router" in n or n.endswith("mlp.gate") or "embed" in n)

    ids = torch.randint(0, 96, (2, 12), generator=rng)
    seen, handles = _record_layer_io(model)
    with torch.no_grad():
        logits = model(ids).logits
    for h in handles:
        h.remove()
    assert torch.isfinite(logits).all()
    by_module = {id(m): n for n, m in model.named_modules()}
    for module, x, y in seen:
        name = by_module[id(module)]
        if name not in originals:  # an expert's linear: test_moe_experts_match_an_unfused_reference covers it
            continue
        w, b = originals[name]
        assert torch.equal(y, sharq.simulate_linear(x, w, b, recipe="sharq")), name
    assert len(seen) >= len(expected)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_moe_experts_match_an_unfused_reference(model_type, rng):
    model = tiny(model_type)
    block = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    gate_up, down = block.gate_up_proj.detach().clone(), block.down_proj.detach().clone()
    q = snn.SharQExperts(block, "sharq")
    h = torch.randn(10, 64, generator=rng)
    idx = torch.stack([torch.randperm(4, generator=rng)[:2] for _ in range(10)])
    wts = torch.rand(10, 2, generator=rng)
    out = q(h, idx, wts)
    ref = torch.zeros_like(h)
    for t in range(10):
        for slot in range(2):
            e = idx[t, slot].item()
            tokens = (idx == e).any(-1).nonzero().flatten()  # the tokens routed to e form its activation
            g, u = sharq.simulate_linear(h[tokens], gate_up[e]).chunk(2, dim=-1)
            y = sharq.simulate_linear(block.act_fn(g) * u, down[e])
            ref[t] += y[(tokens == t).nonzero().item()] * wts[t, slot]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3_moe"])
def test_generate_works_on_a_quantized_model(model_type):
    model = sharq.quantize_model(tiny(model_type), "sharq")
    out = model.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_bf16_recipe_stays_close_to_the_model(rng):
    model = tiny("llama")
    ids = torch.randint(0, 96, (1, 16), generator=rng)
    with torch.no_grad():
        ref = model(ids).logits
        got = sharq.quantize_model(model, "bf16")(ids).logits
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.02)


def test_shared_inputs_prepare_once_per_group(monkeypatch):
    model = tiny("llama")
    calls = []
    reference = functional.BACKENDS["reference"]
    counting = dataclasses.replace(reference,
                                   prepare=lambda x, r, c, amax=None: calls.append(x.shape) or reference.prepare(x, r, c, amax))
    monkeypatch.setitem(functional.BACKENDS, "counting", counting)
    sharq.quantize_model(model, "sharq", backend="counting")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    assert len(calls) == 2 * 4  # per layer: q/k/v once, o, gate/up once, down
    calls.clear()
    sharq.quantize_model(tiny("llama"), "sharq", backend="counting", share_inputs=False)(torch.tensor([[1, 2]]))
    assert len(calls) == 2 * 7


def _isolated_outputs_match(model, run):
    """Run `run()` (a forward of the model); every SharQLinear's output must equal the layer run alone on a copy of
    its input, outside any block call (so with no sharing at all)."""
    seen, handles = _record_layer_io(model)
    run()
    for h in handles:
        h.remove()
    assert seen
    for layer, x, y in seen:
        with torch.no_grad():
            assert torch.equal(y, layer(x.clone())), layer.name


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
def test_shared_preparation_equals_isolated_layers(mode, rng):
    """q/k/v (gate/up) share one preparation per block call, under torch.inference_mode() too (inference tensors
    have no version counter), and each shared output is the layer's own."""
    model = sharq.quantize_model(tiny("llama"), "sharq")
    ids = torch.randint(0, 96, (2, 9), generator=rng)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]

    def run():
        with context():
            model(ids)

    _isolated_outputs_match(model, run)


def test_writes_that_bypass_the_version_counter_are_never_missed(rng):
    """Outside a call of its block a layer never reuses an activation, so writes that autograd cannot see (.data,
    a numpy view, swapping .data) between two member calls change what the next member computes."""
    model = sharq.quantize_model(tiny("llama"), "sharq")
    attn = model.model.layers[0].self_attn

    def alone(layer, x):
        fresh = snn.SharQLinear(layer.in_features, layer.out_features, layer.recipe, layer.qweight, layer.bias)
        return fresh(x.clone())

    with torch.no_grad():
        for write in (lambda x: x.data.mul_(3), lambda x: x.numpy().__setitem__((0, 0), 40.0),
                      lambda x: setattr(x, "data", torch.randn(x.shape, generator=rng))):
            x = torch.randn(4, 64, generator=rng)
            attn.q_proj(x)
            write(x)
            assert torch.equal(attn.k_proj(x), alone(attn.k_proj, x))
            assert torch.equal(attn.v_proj(x), alone(attn.v_proj, x))


def test_calibrated_layers_keep_their_own_outlier_channels(rng):
    """outlier-channels: q, k and v have their own calibrated channels, so they do not share a preparation."""
    model = tiny("llama")
    stats = {n: torch.rand(m.in_features, generator=rng) for n, m in target_linears(model).items()}
    for i, s in enumerate(stats.values()):  # each layer's largest channel its own, whatever the draw
        s[i % len(s)] = 2.0
    sharq.quantize_model(model, "outlier-channels", calibration=stats)
    attn = model.model.layers[0].self_attn
    assert not torch.equal(attn.q_proj.channels, attn.k_proj.channels)
    ids = torch.randint(0, 96, (1, 8), generator=rng)

    def run():
        with torch.no_grad():
            model(ids)

    _isolated_outputs_match(model, run)


def test_a_deep_copy_shares_within_its_own_blocks(monkeypatch, rng):
    """Copies (sharq eval quantizes deep copies) keep sharing, each within its own blocks."""
    import copy

    calls = []
    reference = functional.BACKENDS["reference"]
    counting = dataclasses.replace(reference,
                                   prepare=lambda x, r, c, amax=None: calls.append(x.shape) or reference.prepare(x, r, c, amax))
    monkeypatch.setitem(functional.BACKENDS, "counting", counting)
    model = sharq.quantize_model(tiny("llama"), "sharq", backend="counting")
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 96, (1, 5), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
        calls.clear()
        assert torch.equal(twin(ids).logits, want)
    assert len(calls) == 2 * 4


def test_a_block_opens_its_shared_activation_around_its_forward_without_hooks(rng):
    """The blocks whose linears share an input (attention, MLP) get SharedBlockForward as their forward, not
    forward hooks (which send every call down nn.Module's slower path): the shared activation is open during the
    call and closed after it, also when the forward raises."""
    model = sharq.quantize_model(tiny("llama"), "sharq")
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.forward, snn.SharedBlockForward)
    assert not attention._forward_hooks and not attention._forward_pre_hooks
    shared = attention.q_proj.shared
    seen = []
    hooks = [attention.q_proj.register_forward_pre_hook(lambda *_: seen.append(shared._open))]
    ids = torch.randint(0, 96, (1, 5), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
        assert seen == [True] and not shared._open and shared._x is None
        hooks.append(attention.o_proj.register_forward_pre_hook(lambda *_: 1 / 0))  # a member ran, then it raises
        with pytest.raises(ZeroDivisionError):
            model(ids)
        assert not shared._open and shared._x is None and shared._act is None
        for hook in hooks:
            hook.remove()
        assert torch.equal(model(ids).logits, want)


def test_unknown_architecture_and_override():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(32, 32)

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.layers:
                x = b.fc(x)
            return x

    with pytest.raises(ValueError, match="Weird"):
        sharq.quantize_model(Weird(), "sharq")
    model = sharq.quantize_model(Weird(), "nvfp4", target_modules=["fc"])
    assert all(isinstance(b.fc, snn.SharQLinear) for b in model.layers)
    assert model(torch.randn(3, 32)).shape == (3, 32)


class _Tokens:
    """A tokenizer stand-in: one token per byte (ids 2..95), after BOS (id 1) where bos=True, as Gemma's does."""

    def __init__(self, bos: bool = False):
        self.bos_token_id = 1 if bos else None

    def __call__(self, text, add_special_tokens=True):
        class Out:
            bos = [1] if self.bos_token_id is not None and add_special_tokens else []
            input_ids = bos + [2 + b % 94 for b in text.encode()]
        return Out()


def test_calibrate_and_outlier_channels(rng):
    model = tiny("llama")
    stats = sharq.calibrate(model, ["some calibration text", "and another one"], _Tokens(), seqlen=16,
                            progress=False)
    assert set(stats) == set(target_linears(model))
    assert all(s.shape == (m.in_features,) and (s >= 0).all() for s, m in
               zip(stats.values(), target_linears(model).values()))
    with pytest.raises(ValueError, match="calibrat"):
        sharq.quantize_model(tiny("llama"), "outlier-channels")
    sharq.quantize_model(model, "outlier-channels", calibration=stats)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.channels.numel() == 1 and layer.dense_weight.shape == (64, 1)
    assert torch.isfinite(model(torch.randint(0, 96, (1, 8), generator=rng)).logits).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_model_gives_the_eager_logits(dtype, rng):
    """torch.compile(model) takes a quantized model whole (fullgraph). sharq's layers are custom ops, exact under
    compile: each gives, on the input it got in the compiled model, what it gives eagerly. The model's own ops are
    inductor's: with emulate_precision_casts (README) a bf16 model's logits are the eager ones bit for bit unless
    one of those ops rounds differently (inductor's RMSNorm did, one element by one bf16 unit, at one CI seed and
    none of 40 others); in fp32 they differ by inductor's fusion (~1e-7), which reaches the logits only through
    the FP4 roundings of the quantized layers that get a different input (by 0.0037 at one CI seed). On the H200 in
    bf16 an op between the leaf modules (attention, rotary, the residual adds) rounds otherwise: every leaf module
    with the eager input gave the eager output, yet a later one got another input."""
    model = sharq.quantize_model(tiny("llama").to(dtype), "sharq")
    ids = torch.randint(0, 96, (2, 24), generator=rng)
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # leaf modules in call order, eager then compiled

    def record(module, args, out):
        if args and torch.is_tensor(out):
            calls.append((module, args[0], out))

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(emulate_precision_casts=True):
        want = model(ids).logits
        eager = len(calls)
        got = torch.compile(model, fullgraph=True)(ids).logits
        for h in hooks:
            h.remove()
        assert len(calls) == 2 * eager
        compiled = [(m, x, y) for m, x, y in calls[eager:] if isinstance(m, snn.SharQLinear)]
        quantized = [m for m in model.modules() if isinstance(m, snn.SharQLinear)]
        assert len(compiled) == len(quantized) and all(torch.equal(m(x), y) for m, x, y in compiled)
    same_input = [(m, a, b) for (m, x, a), (_, y, b) in zip(calls[:eager], calls[eager:]) if torch.equal(x, y)]
    if dtype == torch.bfloat16:  # bit for bit, unless one of the model's own ops rounded otherwise: inside a leaf
        # module (same input, another output: RMSNorm) or between them (a leaf module got another input)
        assert (torch.equal(got, want) or any(not torch.equal(a, b) for _, a, b in same_input)
                or len(same_input) < eager)
    elif sum(isinstance(m, snn.SharQLinear) for m, _, _ in same_input) == len(quantized):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # every quantized layer got the eager input


def test_quantize_onto_a_device_layer_by_layer(rng):
    """quantize_model(device=) moves and quantizes one decoder layer at a time; a model built on the meta device
    is materialized there with transformers' own initializer (how a 70B shape runs on one GPU). Here the target is
    the CPU, so what is checked is the result: every tensor real, the same structure as quantizing in place."""
    cfg = transformers.LlamaConfig(**SMALL)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    sharq.quantize_model(meta, "sharq", device="cpu")
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert torch.equal(meta.model.rotary_emb.inv_freq, tiny("llama").model.rotary_emb.inv_freq)
    assert meta.sharq_quantization["modules"] == sharq.quantize_model(tiny("llama"), "sharq").sharq_quantization[
        "modules"]
    with torch.no_grad():
        assert torch.isfinite(meta(torch.randint(0, 96, (1, 8), generator=rng)).logits).all()
    # from a CPU model: the same layers as quantize_model in place, bit for bit
    a, b = sharq.quantize_model(tiny("llama"), "sharq", device="cpu"), sharq.quantize_model(tiny("llama"), "sharq")
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_weight_bytes_count_the_state_once(rng):
    model = tiny("llama")
    dense = sharq.models.weight_bytes(model)
    assert dense == sum(p.numel() * p.element_size() for p in model.parameters())
    sharq.quantize_model(model, "sharq")
    linears = sum(m.weight_bytes for m in model.modules() if isinstance(m, snn.SharQLinear))
    others = sum(p.numel() * p.element_size() for n, p in model.named_parameters())  # norms, embeddings, lm_head
    assert sharq.models.weight_bytes(model) == linears + others


def test_quantizing_onto_a_gpu_holds_at_most_one_layer_unquantized():
    """On CUDA (skips elsewhere): a model built on the meta device, quantized onto the GPU, peaks at the final
    state plus one decoder layer in bf16 and the quantizer's temporaries for its largest weight (a few fp32
    copies: measured 5.5 on the H200), not the bf16 model."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = transformers.LlamaConfig(**{**SMALL, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
                                      "num_attention_heads": 8, "num_key_value_heads": 8})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    layer_bytes = sum(p.numel() * 2 for p in model.model.layers[0].parameters())
    dense_bytes = sum(p.numel() * 2 for p in model.parameters())
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()  # what earlier tests of the process still hold
    sharq.quantize_model(model, "sharq", device="cuda")
    final = torch.cuda.memory_allocated() - held
    peak = torch.cuda.max_memory_allocated() - held
    assert peak <= final + layer_bytes + 8 * (4096 * 1024 * 4), (peak, final, layer_bytes)
    assert peak < dense_bytes
    # and nothing of the bf16 layers is left behind: the GPU holds the quantized model alone
    assert final <= sharq.models.weight_bytes(model) + 2**20, (final, sharq.models.weight_bytes(model))


def _dispatched(tmp_path, device_map: dict) -> nn.Module:
    """tiny("llama") (3 layers) saved and loaded again by transformers with `device_map` (accelerate dispatch)."""
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**SMALL, "num_hidden_layers": 3}))
    model.save_pretrained(tmp_path / "bf16")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", device_map=device_map,
                                                             offload_folder=tmp_path / "offload").eval()


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_quantize_a_model_dispatched_by_accelerate(offload, tmp_path, rng):
    """quantize_model on a model loaded with a device_map (accelerate): each layer is quantized where accelerate put
    it, an offloaded layer (CPU memory or disk; its weights on meta between calls) from its onloaded weights, and
    stays offloaded (its payload moved in for each call). The logits are those of the same model quantized on one
    device, bit for bit (reference backend), and the checkpoint it saves loads as that model."""
    pytest.importorskip("accelerate")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": offload,
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = _dispatched(tmp_path, device_map)
    offloaded = offload == "disk"  # on a CPU-only machine "cpu" is the execution device itself: placed, not offloaded
    assert model.model.layers[1].mlp.up_proj.weight.is_meta == offloaded  # offloaded: loaded only for a call
    single = sharq.quantize_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").eval(),
                                  "sharq", backend="reference")
    sharq.quantize_model(model, "sharq", backend="reference")
    up = model.model.layers[1].mlp.up_proj
    assert isinstance(up, sharq.SharQLinear) and up.weight_codes.is_meta == offloaded  # offloaded: now its payload
    assert model.model.layers[0].mlp.up_proj.weight_codes.device.type == "cpu"
    ids = torch.randint(0, 96, (2, 12), generator=rng)
    with torch.no_grad():
        want = single(ids).logits
        assert torch.equal(model(ids).logits, want)
    assert up.weight_codes.is_meta == offloaded  # offloaded again after the call
    sharq.save(model, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(sharq.load(tmp_path / "ckpt")(ids).logits, want)


def test_quantize_model_device_on_a_dispatched_model_is_an_error(tmp_path):
    pytest.importorskip("accelerate")
    model = _dispatched(tmp_path, {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                   "model.rotary_emb": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="device_map"):
        sharq.quantize_model(model, "sharq", device="cpu")


def _everything(model: nn.Module) -> dict:
    """What a model is, to compare before and after a failed quantize_model: its modules (names, classes, hooks),
    its config, every attribute sharq sets, and its state dict byte for byte (meta tensors by dtype and shape)."""
    def tensor(t):
        data = None if t.is_meta else t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return str(t.device), t.dtype, tuple(t.shape), data

    return {
        "modules": [(n, type(m), len(m._forward_hooks), len(m._forward_pre_hooks), m.__dict__.get("forward"))
                    for n, m in model.named_modules()],
        "config": model.config.to_json_string(),
        "attributes": {a: getattr(model, a, None) for a in ("sharq_quantization", "hf_quantizer")},
        "state": {n: tensor(t) for n, t in model.state_dict().items()},
    }


@pytest.mark.parametrize("device", ["cuda", "cuda:3", "tpu", "foo", "meta"])
def test_quantize_model_refuses_a_device_it_cannot_use_before_touching_the_model(device):
    """A device that does not exist or cannot be used here is a ValueError naming it, and the model stays as it was
    (it was an AssertionError or RuntimeError after the model was marked quantized with no layer quantized)."""
    if device.startswith("cuda") and torch.cuda.device_count() > (int(device[5:]) if device[5:] else 0):
        pytest.skip(f"{device} exists on this machine")
    model = tiny("llama")
    before = _everything(model)
    with pytest.raises(ValueError, match=f"device '{device}'"):
        sharq.quantize_model(model, "sharq", device=device)
    assert _everything(model) == before


@pytest.mark.parametrize("arguments,message", [
    (dict(backend="cuda-magic"), "unknown backend 'cuda-magic'"),
    (dict(recipe="hif4", backend="packed"), "backend 'packed' does not run recipe 'hif4'"),
    (dict(backend="triton", device="cpu"), "backend 'triton'"),
    (dict(target_modules="self_attn.q_proj"), "target_modules must be a list .* not a string"),
    (dict(target_modules=["self_attn.q_proj", "mlp.typo"]), r"target_modules \['mlp.typo'\] match no nn.Linear"),
    (dict(strict="yes"), "strict must be True or False, got 'yes'"),
    (dict(share_inputs=None), "share_inputs must be True or False, got None"),
], ids=["unknown-backend", "backend-without-the-recipe", "backend-without-the-device", "string", "misspelt",
        "strict-not-bool", "share-inputs-not-bool"])
def test_bad_arguments_are_refused_before_touching_the_model(arguments, message, monkeypatch):
    """A backend that is unknown, cannot run the recipe or the device, target_modules that are a string or name a
    module no decoder layer has, flags that are not bools (the checkpoint records them): a ValueError before
    anything changes (the model used to be marked quantized first, quantized without the misspelt modules, or
    quantized with a flag no checkpoint could record)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny("llama")
    before = _everything(model)
    with pytest.raises(ValueError, match=message):
        sharq.quantize_model(model, **{"recipe": "sharq", **arguments})
    assert _everything(model) == before


def test_a_second_quantize_model_is_refused():
    """Quantizing the attention with one recipe and the MLP with another was accepted, and the saved metadata then
    described the second call alone: now the second call is a ValueError saying what to do, and changes nothing."""
    model = sharq.quantize_model(tiny("llama"), "sharq", target_modules=["self_attn.q_proj", "self_attn.k_proj"])
    before = _everything(model)
    for recipe, targets in [("nvfp4", ["mlp.up_proj"]), ("sharq", None)]:
        with pytest.raises(ValueError, match="already quantized by sharq.*start again from the unquantized model"):
            sharq.quantize_model(model, recipe, target_modules=targets)
        assert _everything(model) == before


class _Fails(Exception):
    pass


def _nan_in_the_last_layer(model, monkeypatch):
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[2, 5] = float("nan")
    return ValueError, r"model\.layers\.1\.mlp\.down_proj: weight has 1 non-finite"


def _final_move_fails(model, monkeypatch):
    """The last step of quantizing onto a device (moving what is not quantized) fails, every layer swapped by then."""
    materialize = sharq.models.materialize

    def failing(whole, module, device):
        if module is whole:
            raise _Fails("out of memory")
        materialize(whole, module, device)

    monkeypatch.setattr(sharq.models, "materialize", failing)
    return _Fails, "out of memory"


@pytest.mark.parametrize("failure,on_meta,device", [
    (_nan_in_the_last_layer, False, None), (_nan_in_the_last_layer, False, "cpu"), (_final_move_fails, False, "cpu"),
    (_final_move_fails, True, "cpu"), (_nan_in_the_last_layer, False, "cuda"), (_final_move_fails, True, "cuda"),
], ids=["nan-in-place", "nan-onto-device", "move-fails", "move-fails-from-meta", "nan-onto-cuda",
        "move-fails-from-meta-onto-cuda"])
def test_a_failure_midway_leaves_the_model_as_it_was(failure, on_meta, device, monkeypatch):
    """All or nothing: a strict-mode NaN weight in the last layer, or a failure after every layer is swapped, leaves
    the model exactly as it was (modules, hooks, config, metadata, state byte for byte), so the next call works. On
    CUDA (skips elsewhere) the device holds nothing of the failed call once its exception is collected (before, the
    exception's traceback holds the failing frames' tensors, as any Python exception does)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if on_meta:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL))
    else:
        model = tiny("llama")
    error, message = failure(model, monkeypatch)
    before = _everything(model)
    gc.collect()  # what earlier tests left for the collector is not this call's
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    with pytest.raises(error, match=message):
        sharq.quantize_model(model, "sharq", strict=True, device=device)
    assert _everything(model) == before
    if device == "cuda":  # once the exception is gone: its traceback's frames hold the call's tensors till collected
        gc.collect()
        assert torch.cuda.memory_allocated() == allocated
    monkeypatch.undo()
    sharq.quantize_model(model, "sharq", device=device)
    assert all(isinstance(model.get_submodule(n), snn.SharQLinear) for n in target_linears(tiny("llama")))


@pytest.mark.parametrize("bad,message", [
    (lambda k: torch.rand(k - 28), r"expected a tensor of 64 values .*, got shape \(36,\)"),
    (lambda k: torch.rand(k + 40), r"expected a tensor of 64 values .*, got shape \(104,\)"),
    (lambda k: torch.rand(2, k // 2), r"expected a tensor of 64 values .*, got shape \(2, 32\)"),
    (lambda k: torch.tensor(1.0), r"expected a tensor of 64 values .*, got shape \(\)"),
    (lambda k: [1.0] * k, r"expected a tensor of 64 values .*, got a list"),
    (lambda k: None, r"no statistics"),
    (lambda k: torch.rand(k).index_fill_(0, torch.tensor([3]), float("nan")), r"1 non-finite value\(s\)"),
    (lambda k: torch.rand(k).index_fill_(0, torch.tensor([3, 9]), float("inf")), r"2 non-finite value\(s\)"),
    (lambda k: torch.rand(k).index_fill_(0, torch.tensor([0]), -1.0), r"1 negative value\(s\)"),
    (lambda k: torch.rand(k, device="meta"), r"on the meta device: they hold no values"),  # channels at random
], ids=["short", "long", "2-d", "0-d", "list", "missing", "nan", "inf", "negative", "meta"])
def test_bad_calibration_statistics_are_refused_up_front(bad, message, rng):
    """Statistics of the wrong shape or kind for one layer were accepted (wrong channels) or crashed later in a
    layer (IndexError, RuntimeError, AttributeError): now a ValueError naming the layer, before any layer is
    touched."""
    model = tiny("llama")
    name = "model.layers.1.self_attn.k_proj"  # K = 64
    stats = {n: torch.rand(m.in_features, generator=rng) for n, m in target_linears(model).items()}
    stats[name] = bad(64)
    if stats[name] is None:
        del stats[name]
    before = _everything(model)
    with pytest.raises(ValueError) as error:
        sharq.quantize_model(model, "outlier-channels", calibration=stats)
    assert name in str(error.value) and re.search(message, str(error.value)), error.value
    assert _everything(model) == before


def test_calibrate_is_quiet_unless_asked(capfd):
    """Like every library call, calibrate prints nothing unless progress=True (it showed a bar by default)."""
    model = tiny("llama")
    sharq.calibrate(model, ["some calibration text"], _Tokens(), seqlen=8)
    assert capfd.readouterr().err == ""
    sharq.calibrate(model, ["some calibration text"], _Tokens(), seqlen=8, progress=True)
    assert "calibrate" in capfd.readouterr().err


@pytest.mark.slow
def test_under_torch_compile_layers_and_groups_run_the_launches_of_their_eager_plans(rng, monkeypatch):
    """With a backend that has eager plans and group plans (the packed one on CUDA; here the reference backend given
    both, recording each launch), a compiled forward makes the launches the eager one makes: each q/k/v and gate/up
    group's prepare and group launch, each o/down layer's prepare and GEMM, in the same order."""
    calls = []
    monkeypatch.setitem(BACKENDS, "planned", recording_plans(calls, groups=True))
    model = sharq.quantize_model(tiny("llama"), "sharq", backend="planned")
    ids = torch.randint(0, 96, (1, 8), generator=rng)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids).logits
        eager, calls[:] = list(calls), []
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits  # as the test below
    layers = model.config.num_hidden_layers
    assert [c[0] for c in eager] == ["prepare", "group", "prepare", "matmul"] * 2 * layers and calls == eager
    assert torch.equal(got, want)


@pytest.mark.slow
def test_folded_launches_replace_prepare_and_gemm_eagerly_and_compiled_with_the_same_logits(rng, monkeypatch):
    """Where a backend's plans fold the prepare into the GEMM (the packed one on CUDA at decode sizes; here the
    reference backend given folded launches that record themselves), a layer that prepares its own input (o, down)
    makes its one folded launch and each q/k/v and gate/up group its folded group launch, eagerly and compiled, and
    the logits are those of the unfolded launches bit for bit; a group whose input was already prepared plainly
    multiplies that activation (its group launch), never the folded one."""
    ids = torch.randint(0, 96, (1, 8), generator=rng)
    logits, launches = {}, {}
    for folds in (False, True):
        calls = []
        monkeypatch.setitem(BACKENDS, "planned", recording_plans(calls, groups=True, folds=folds))
        torch.manual_seed(0)
        model = sharq.quantize_model(tiny("llama"), "sharq", backend="planned")
        torch._dynamo.reset()
        with torch.no_grad():
            logits[folds] = model(ids).logits
            eager, calls[:] = list(calls), []
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
        assert calls == eager and torch.equal(compiled, logits[folds])
        launches[folds] = [c[0] for c in eager]
    layers = model.config.num_hidden_layers
    assert launches[False] == ["prepare", "group", "prepare", "matmul"] * 2 * layers
    assert launches[True] == ["group-fold", "fold"] * 2 * layers
    assert torch.equal(logits[True], logits[False])
    shared = model.model.layers[0].self_attn.q_proj.shared
    x = torch.randn(8, model.config.hidden_size, generator=rng)
    members = shared.layers
    calls.clear()
    shared.open()
    try:
        shared.get(x, lambda: members[0].prepare(x))  # the first member on the general path: prepared plainly
        ys = [shared.output(m, x, m.eager_plan(x)) for m in members[1:]]
    finally:
        shared.close()
    assert [c[0] for c in calls] == ["group"]
    assert all(torch.equal(y, m(x)) for y, m in zip(ys, members[1:]))


@pytest.mark.slow
def test_under_torch_compile_a_group_of_layers_that_read_one_input_is_one_call(rng, monkeypatch):
    """With a backend that has a group plan (the packed one on CUDA; here the reference backend given one), every
    member of q/k/v and gate/up calls the group's custom op with the same arguments under torch.compile, and the
    trace keeps one call a group; the logits are the eager ones (which multiply layer by layer here) bit for bit.
    Compiled by AOTAutograd with eager kernels ("aot_eager"): inductor's fusion of the model's own ops moves an fp32
    input of a quantized layer by ~1e-7, which an FP4 rounding can turn into a different logit (0.016 at one CI seed;
    test_compiled_model_gives_the_eager_logits covers inductor)."""
    calls = []

    def group_plan(qweights, biases, recipe, lead, out_dtype, layouts, x_dtype=None):  # packed weights, no layouts
        assert layouts == [None] * len(qweights)
        values = [dequantize_blocks(w.packed).to(torch.bfloat16) for w in qweights]

        def run(act):
            calls.append(len(qweights))
            return [get_backend("reference").matmul(act, dataclasses.replace(w, values=v), b, out_dtype)
                    for w, v, b in zip(qweights, values, biases)]
        return GroupPlan(run)

    monkeypatch.setitem(BACKENDS, "grouped", dataclasses.replace(BACKENDS["reference"], group_plan=group_plan))
    model = sharq.quantize_model(tiny("llama"), "sharq", backend="grouped")
    ids = torch.randint(0, 96, (1, 8), generator=rng)
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(ids).logits
        assert calls == []  # eager on a CPU: layer by layer
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    layers = model.config.num_hidden_layers
    assert sorted(calls) == sorted([3, 2] * layers)
    assert torch.equal(got, want)


def test_quantize_onto_a_device_keeps_ties_as_they_are(rng):
    """Materializing a meta model keeps a tied lm_head tied (one tensor made for the two), and a model whose lm_head
    was untied from its embeddings (trained apart) stays untied: ties are never re-derived from the config."""
    cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    sharq.quantize_model(meta, "nvfp4", device="cpu")
    assert meta.lm_head.weight is meta.model.embed_tokens.weight and not meta.lm_head.weight.is_meta
    torch.manual_seed(0)
    untied = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach() + torch.randn(96, 64, generator=rng))
    head = untied.lm_head.weight.detach().clone()
    sharq.quantize_model(untied, "nvfp4", device="cpu")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.lm_head.weight, head)


def _gemma3_multimodal() -> nn.Module:
    """What AutoModelForCausalLM builds for Gemma-3 4B-27B (model_type "gemma3"): the language model beside a SigLIP
    vision tower whose encoder has `layers.N.self_attn.q_proj` of its own."""
    cfg = transformers.Gemma3Config(
        text_config={**SMALL, "head_dim": 16, "sliding_window": 16},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4, image_token_index=95, boi_token_index=93, eoi_token_index=94)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("target_modules", [None, ["self_attn.q_proj", "mlp.down_proj"]])
def test_a_multimodal_gemma3_quantizes_its_language_model_alone(target_modules, rng, tmp_path):
    """The decoder layers are the language model's (SPEC §7); the vision tower's layers stay as they were (it was
    refused as unknown, and target_modules quantized the vision tower too). Its checkpoint round-trips."""
    model = _gemma3_multimodal()
    sharq.quantize_model(model, "sharq", target_modules=target_modules)
    names = [n for n, m in model.named_modules() if isinstance(m, snn.SharQLinear)]
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert len(names) == (14 if target_modules is None else 4)
    ids = torch.randint(0, 90, (2, 9), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
        sharq.save(model, tmp_path / "c")
        assert torch.isfinite(want).all() and torch.equal(sharq.load(tmp_path / "c")(ids).logits, want)


def test_calibrate_takes_one_string_as_one_text_and_checks_its_arguments():
    """A string is one text (joining its characters calibrated on other tokens); windows stop at the model's
    positions (SMALL has 64: seqlen 512 ran past them); bad sizes, and a model already quantized (nothing left to
    calibrate: it returned {}), are clear errors; no autograd graph is kept."""
    model = tiny("llama")
    text = "some calibration text, " * 5
    assert all(torch.equal(a, b) for a, b in zip(sharq.calibrate(model, text, _Tokens()).values(),
                                                  sharq.calibrate(model, [text], _Tokens()).values()))
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].shape[1], args[0].requires_grad)))
    sharq.calibrate(model, [text * 2], _Tokens(), seqlen=512)  # 230 tokens
    assert seen == [(64, False), (64, False), (64, False), (38, False)]
    windows = []
    model.register_forward_pre_hook(lambda m, args, kwargs: windows.append((args or [kwargs["input_ids"]])[0][0]),
                                    with_kwargs=True)
    sharq.calibrate(model, [text * 2], _Tokens(bos=True), seqlen=512)  # a tokenizer that starts texts with BOS
    assert [w.numel() for w in windows] == [64, 64, 64, 42]  # each window BOS + up to 63 of the 230 text tokens
    assert all(w[0] == 1 and (w[1:] > 1).all() for w in windows)  # BOS opens every window (it opened the first)
    for kwargs, message in [(dict(seqlen=0), "seqlen must be an integer >= 1"),
                            (dict(max_tokens=-5), "max_tokens must be an integer >= 2")]:
        with pytest.raises(ValueError, match=message):
            sharq.calibrate(model, [text], _Tokens(), **kwargs)
    sharq.quantize_model(model, "nvfp4")
    with pytest.raises(ValueError, match="no unquantized linear to calibrate"):
        sharq.calibrate(model, [text], _Tokens())


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_a_quantized_model_pickles(model_type, rng):
    """torch.save(model) and torch.load(weights_only=False) give the model back: the same logits, and a state dict
    still loads into it (its layers' load hook was a lambda, and pickling failed)."""
    import io

    model = sharq.quantize_model(tiny(model_type), "sharq")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    twin = torch.load(buffer, weights_only=False)
    ids = torch.randint(0, 96, (2, 5), generator=rng)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
        other = sharq.quantize_model(tiny(model_type).apply(lambda m: torch.nn.init.normal_(m.weight)
                                                            if isinstance(m, nn.Linear) else None), "sharq")
        twin.load_state_dict(other.state_dict())
        assert torch.equal(twin(ids).logits, other(ids).logits)
