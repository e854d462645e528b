"""compressed-tensors interop: sharq -> compressed-tensors -> sharq is bit-identical; transformers decompresses an
export to sharq's weights up to bf16 rounding; checkpoints made by compressed-tensors itself (as llm-compressor
makes them) import with every code, scale and global scale kept; everything else is a clear error."""

import copy
import json
import math
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import ModelCompressor, NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import sharq  # noqa: E402
from sharq import formats as F  # noqa: E402
from sharq import interop  # noqa: E402
from sharq.eval.perplexity import perplexity  # noqa: E402
from sharq.quant import apply_tensor_scale, dequantize_blocks, quantize_blocks  # noqa: E402
from sharq.recipes import Recipe  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*groups of layers that vLLM fuses"),  # sharq's q/k/v scales differ (asserted)
    pytest.mark.filterwarnings("ignore:You passed `quantization_config`"),  # transformers, on dequantize=True
]

# intermediate_size 80: down_proj's K = 80 ends in half a 32-element block (W32 padding through the format)
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
BF16_ROUNDING = 2.0**-8  # bf16's unit roundoff: the most a weight compressed-tensors decompresses to bf16 moves
W4A16 = Recipe("w4a16", "nvfp4", 16, (), description="NVFP4 weights, bf16 activations (what transformers runs)")
IDS = torch.arange(2 * 11).reshape(2, 11) * 7 % 96
Q = "model.layers.0.self_attn.q_proj"


def _tiny():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**CONFIG)).eval()


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, sharq.SharQLinear)}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def _fused_groups(names):
    """q/k/v and gate/up of each layer (alone: o, down): llm-compressor gives each group one, the smallest, global
    scale, because vLLM runs each group as one layer."""
    groups = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        groups.setdefault((parent, FUSED.get(leaf, leaf)), []).append(n)
    return list(groups.values())


def _without_exact_global_scale(near: float) -> torch.Tensor:
    """An fp32 in the binade of `near` that no fp32 global scale g gives back as fl(1/g). Such values lie in the
    upper part of a binade (mantissa above √2; 45 % of them at 1.9), so the search starts at mantissa 1.9."""
    s = torch.tensor(math.ldexp(0.95, math.frexp(near)[1]), dtype=torch.float32)
    one = torch.ones((), dtype=torch.float32)
    while one / (one / s) == s:
        s = torch.nextafter(s, torch.full((), float("inf")))
    return s


@pytest.fixture(scope="module")
def sharq_model():
    """A sharq-quantized model in which one layer's s_w has an exact global scale and another's has none."""
    model = sharq.quantize_model(_tiny(), "sharq")
    layers = _layers(model)
    with torch.no_grad():
        layers["model.layers.0.self_attn.q_proj"].weight_scale.fill_(2.0**-14)  # fl(1/fl(1/s)) == s
        v = layers["model.layers.0.self_attn.v_proj"]
        v.weight_scale.copy_(_without_exact_global_scale(v.weight_scale.item()))
    return model


@pytest.fixture(scope="module")
def exported(sharq_model, tmp_path_factory):
    """The export with every layer's own global scale, which sharq reads back bit for bit."""
    out = tmp_path_factory.mktemp("export") / "ct"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interop.export_compressed_tensors(sharq_model, out, shared_global_scales=False)
    assert any("vLLM fuses" in str(w.message) for w in caught)  # sharq's q/k/v global scales differ
    return out


@pytest.fixture(scope="module")
def exported_shared(sharq_model, tmp_path_factory):
    """The default export: one global scale per group of layers vLLM fuses."""
    out = tmp_path_factory.mktemp("export") / "shared"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interop.export_compressed_tensors(sharq_model, out)
    assert not any("vLLM fuses" in str(w.message) for w in caught)
    return out


def test_export_writes_the_compressed_tensors_nvfp4_layout(sharq_model, exported):
    q = json.loads((exported / "config.json").read_text())["quantization_config"]
    ct = QuantizationConfig.model_validate(q)  # compressed-tensors' own schema accepts it
    assert ct.format == "nvfp4-pack-quantized" and ct.ignore == ["lm_head"]
    scheme = ct.config_groups["group_0"]
    assert scheme.targets == ["Linear"] and scheme.input_activations is None
    assert NVFP4PackedCompressor.can_compress(torch.nn.Linear, scheme)
    assert Recipe.from_dict(q["sharq"]["recipe"]) == sharq.get_recipe("sharq")

    tensors = load_file(exported / "model.safetensors")
    assert not [n for n in tensors if n.rsplit(".", 1)[-1] in ("weight_codes", "weight_scales")]
    one = torch.ones((), dtype=torch.float32)
    for name, layer in _layers(sharq_model).items():
        n, k = layer.out_features, layer.in_features
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        g = tensors[f"{name}.weight_global_scale"]
        assert (packed.dtype, packed.shape, scale.dtype, scale.shape) == (torch.uint8, (n, k // 2),
                                                                          torch.float8_e4m3fn, (n, k // 16))
        # compressed-tensors' unpacking reads sharq's nibbles as the same E2M1 values (even element: low nibble)
        values = F.decode_e2m1(F.unpack_nibbles(layer.weight_codes))[:, :k]
        assert torch.equal(unpack_fp4_from_uint8(packed, n, k, dtype=torch.float32), values)
        # W32 -> W16: every 32-element scale written for both of its 16-element halves
        assert torch.equal(scale.view(torch.uint8), layer.weight_scales.repeat_interleave(2, dim=1)[:, : k // 16])
        assert g.dtype == torch.float32 and torch.equal(g, (one / layer.weight_scale).reshape(1))
        exact = bool(one / g == layer.weight_scale)
        assert (name in q["sharq"]["weight_scale"]) == (not exact)
    assert "model.layers.0.self_attn.v_proj" in q["sharq"]["weight_scale"]
    assert "model.layers.0.self_attn.q_proj" not in q["sharq"]["weight_scale"]


def test_transformers_decompresses_an_export_to_sharqs_weights_up_to_bf16_rounding(sharq_model, exported):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        exported, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    reference = copy.deepcopy(hf)  # the same network with sharq's exact weights code·scale·s_w, nothing rounded
    worst = 0.0
    for name, layer in _layers(sharq_model).items():
        w = layer.qweight.effective()
        got = hf.get_submodule(name).weight.detach()
        assert torch.all((got - w).abs() <= BF16_ROUNDING * w.abs())
        worst = max(worst, ((got - w).abs() / w.abs().clamp_min(1e-30)).max().item())
        reference.get_submodule(name).weight.data.copy_(w)
    assert worst > 2.0**-9  # the difference is bf16's rounding of code·scale/g, not something smaller
    want, got = _logits(reference), _logits(hf)
    # each weight moves by at most 2^-8 of itself; through two layers the logits moved by 3.0e-3 of the largest
    assert (got - want).abs().max() <= 2 * BF16_ROUNDING * want.abs().max()
    # the plain load (weights kept packed, decompressed on the first forward, bf16) accepts every tensor
    plain, info = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.bfloat16,
                                                                    output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.isfinite(_logits(plain)).all()


def test_export_then_import_is_bit_identical(sharq_model, exported, tmp_path):
    back = interop.load_compressed_tensors(exported)
    assert Recipe.from_dict(back.sharq_quantization["recipe"]) == sharq.get_recipe("sharq")
    before, after = _layers(sharq_model), _layers(back)
    assert before.keys() == after.keys()
    for name, layer in before.items():
        for buffer in ("weight_codes", "weight_scales", "weight_scale"):  # W32 scales come back as W32
            assert torch.equal(getattr(after[name], buffer), getattr(layer, buffer)), (name, buffer)
    assert torch.equal(_logits(back), _logits(sharq_model))
    sharq.save(back, tmp_path / "sharq")  # a normal sharq model
    assert torch.equal(_logits(sharq.load(tmp_path / "sharq")), _logits(sharq_model))


@pytest.mark.parametrize("config,recipe", [(transformers.Qwen2Config(**CONFIG), "dense-dense"),  # q/k/v biases
                                           (transformers.LlamaConfig(**CONFIG, tie_word_embeddings=True), "nvfp4")])
def test_round_trip_keeps_biases_and_tied_embeddings(config, recipe, tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_()
    sharq.quantize_model(model, recipe, scale_granularity="token")
    interop.export_compressed_tensors(model, tmp_path / "ct", shared_global_scales=False)
    back = interop.load_compressed_tensors(tmp_path / "ct")
    assert back.sharq_quantization == model.sharq_quantization
    assert torch.equal(_logits(back), _logits(model))
    biased = [n for n, m in _layers(back).items() if m.bias is not None]
    assert bool(biased) == (config.model_type == "qwen2")
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == config.tie_word_embeddings


def test_an_export_loads_in_the_dtype_the_model_holds(tmp_path):
    """A model cast after it was built (its config records no dtype) is exported with the dtype it holds, so
    load_compressed_tensors with no dtype gives it back in that dtype: the model sharq.load gives of its checkpoint
    (both compute RoPE's inv_freq afresh, which the cast model holds rounded to bf16)."""
    model = sharq.quantize_model(_tiny().to(torch.bfloat16), "sharq")
    assert model.config.dtype != torch.bfloat16
    interop.export_compressed_tensors(model, tmp_path / "ct", shared_global_scales=False)
    back = interop.load_compressed_tensors(tmp_path / "ct")
    assert back.dtype == torch.bfloat16
    sharq.save(model, tmp_path / "sharq")
    assert torch.equal(_logits(back), _logits(sharq.load(tmp_path / "sharq")))


def test_import_with_a_recipe_reads_16_element_blocks(sharq_model, exported):
    w16 = interop.load_compressed_tensors(exported, "sharq")
    assert w16.sharq_quantization["recipe"]["weight_block"] == 16
    for name, layer in _layers(sharq_model).items():
        k = layer.in_features
        assert torch.equal(_layers(w16)[name].packed.block_scales()[:, : k // 16],
                           layer.packed.block_scales(16)[:, : k // 16])
    assert torch.equal(_logits(w16), _logits(sharq_model))  # the same Ŵ: SharQ reads one payload at any block
    nvfp4 = interop.load_compressed_tensors(exported, "nvfp4", scale_granularity="token")
    assert nvfp4.sharq_quantization["recipe"]["weight_block"] == 16
    assert torch.isfinite(_logits(nvfp4)).all()
    w32 = interop.load_compressed_tensors(exported, "nvfp4", weight_block=32)  # equal pairs: W32 is possible
    assert torch.equal(_layers(w32)["model.layers.0.mlp.down_proj"].weight_scales,
                       _layers(sharq_model)["model.layers.0.mlp.down_proj"].weight_scales)


def test_export_with_input_amax_declares_nvfp4_activations(sharq_model, tmp_path):
    amax = interop.measure_input_amax(sharq_model, [IDS])
    interop.export_compressed_tensors(sharq_model, tmp_path / "w4a4", input_amax=amax, shared_global_scales=False)
    q = json.loads((tmp_path / "w4a4" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(q).config_groups["group_0"]
    assert scheme.input_activations == QuantizationArgs.model_validate(interop.INPUT_ARGS)
    tensors = load_file(tmp_path / "w4a4" / "model.safetensors")
    for name, a in amax.items():
        assert torch.equal(tensors[f"{name}.input_global_scale"], torch.tensor([2688.0]) / torch.tensor(a))
    attn = "model.layers.1.self_attn."  # q/k/v read one input: one input scale, as vLLM's fused qkv needs
    assert len({tensors[f"{attn}{p}_proj.input_global_scale"].item() for p in "qkv"}) == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w4a4", dtype=torch.bfloat16)
    assert torch.isfinite(_logits(hf)).all()  # compressed-tensors emulates W4A4 NVFP4 with those scales
    assert torch.equal(_logits(interop.load_compressed_tensors(tmp_path / "w4a4")), _logits(sharq_model))


def test_the_default_export_gives_every_group_vllm_fuses_one_global_scale(sharq_model, exported_shared):
    """vLLM runs q/k/v and gate/up as one layer with the largest global scale of its parts. The default export gives
    each group one global scale, its largest s_w's (llm-compressor's fused global scale): the layer that has it is
    written as it is, the others are quantized again with it from Ŵ·s_w (SPEC §3's NVFP4 blocks of bf16(Ŵ·s_w / s),
    the recipe's block size and rule). Every part then has the global scale vLLM uses: the export is what it runs."""
    tensors = load_file(exported_shared / "model.safetensors")
    layers = _layers(sharq_model)
    groups = [g for g in _fused_groups(layers) if len(g) > 1]
    assert len(groups) == 4  # q/k/v and gate/up of two decoder layers
    requantized = 0
    for group in groups:
        s = max((layers[n].weight_scale for n in group), key=float)
        for name in group:
            layer, k = layers[name], layers[name].in_features
            assert torch.equal(tensors[f"{name}.weight_global_scale"], (torch.ones(()) / s).reshape(1))
            want = layer.packed
            if not torch.equal(layer.weight_scale, s):
                want = quantize_blocks(apply_tensor_scale(layer.qweight.effective(), s), "nvfp4", 32)
                requantized += 1
            assert torch.equal(tensors[f"{name}.weight_packed"], want.codes[:, : k // 2])
            assert torch.equal(tensors[f"{name}.weight_scale"].view(torch.uint8),
                               want.scales.repeat_interleave(2, dim=1)[:, : k // 16])
    assert requantized >= len(groups)  # every group had layers with other scales
    for name in set(layers) - {n for g in groups for n in g}:  # o_proj, down_proj: as they are
        k = layers[name].in_features
        assert torch.equal(tensors[f"{name}.weight_packed"], layers[name].weight_codes[:, : k // 2])


def test_original_weights_quantize_the_fused_layers_once(tmp_path):
    """Given the weights the model was quantized from, the export quantizes a fused group's other layers from them
    with the shared scale (one rounding, as llm-compressor does), not from Ŵ·s_w (a second one)."""
    model = _tiny()
    originals = {n: m.weight.detach().clone() for n, m in sharq.models.target_linears(model).items()}
    sharq.quantize_model(model, "sharq")
    interop.export_compressed_tensors(model, tmp_path / "once", original_weights=originals)
    interop.export_compressed_tensors(model, tmp_path / "twice")
    once, twice = (load_file(tmp_path / d / "model.safetensors") for d in ("once", "twice"))
    layers = _layers(model)
    differs = 0
    for group in (g for g in _fused_groups(layers) if len(g) > 1):
        s = max((layers[n].weight_scale for n in group), key=float)
        for name in group:
            k = layers[name].in_features
            want = quantize_blocks(apply_tensor_scale(originals[name], s), "nvfp4", 32)
            assert torch.equal(once[f"{name}.weight_packed"], want.codes[:, : k // 2])
            assert torch.equal(once[f"{name}.weight_scale"].view(torch.uint8),
                               want.scales.repeat_interleave(2, dim=1)[:, : k // 16])
            assert torch.equal(once[f"{name}.weight_global_scale"], twice[f"{name}.weight_global_scale"])
            differs += not torch.equal(once[f"{name}.weight_packed"], twice[f"{name}.weight_packed"])
    assert differs >= 4  # the parts quantized again: from W here, from Ŵ·s_w by default
    assert torch.isfinite(_logits(interop.load_compressed_tensors(tmp_path / "once"))).all()


def test_original_weights_must_be_what_the_model_was_quantized_from(tmp_path):
    model = _tiny()
    originals = {n: m.weight.detach().clone() for n, m in sharq.models.target_linears(model).items()}
    sharq.quantize_model(model, "sharq")
    layers = _layers(model)
    qkv = [n for n in layers if n.startswith("model.layers.1.self_attn.") and not n.endswith("o_proj")]
    K = min(qkv, key=lambda n: layers[n].weight_scale.item())  # quantized again with its group's largest s_w
    n = originals[K].shape[0]
    for wrong, error in [({name: w for name, w in originals.items() if name != K}, f"no weight for {K}"),
                         ({**originals, K: originals[K] * 1.5}, rf"original_weights\['{K}'\] \({n}, 64\) does not"),
                         ({**originals, K: originals[K][:, :32]}, rf"original_weights\['{K}'\] \({n}, 32\) does not")]:
        with pytest.raises(ValueError, match=error):
            interop.export_compressed_tensors(model, tmp_path / "bad", original_weights=wrong)
    with pytest.raises(ValueError, match="no use with shared_global_scales=False"):
        interop.export_compressed_tensors(model, tmp_path / "bad", original_weights=originals,
                                          shared_global_scales=False)
    assert not (tmp_path / "bad").exists()


def test_a_shared_export_reads_back_as_it_was_written(exported_shared, tmp_path):
    """sharq reads a shared export's weights back exactly (the logits do not move by another export), and
    exporting them again changes nothing: their groups share their global scales already."""
    back = interop.load_compressed_tensors(exported_shared)
    interop.export_compressed_tensors(back, tmp_path / "again")
    first, again = (load_file(d / "model.safetensors") for d in (exported_shared, tmp_path / "again"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[n].view(torch.uint8), again[n].view(torch.uint8)) if first[n].dtype.itemsize == 1
               else torch.equal(first[n], again[n]) for n in first)
    assert torch.equal(_logits(interop.load_compressed_tensors(tmp_path / "again")), _logits(back))


# --- checkpoints compressed-tensors makes, as llm-compressor's NVFP4 oneshot does ------------------------------------
def _compressed_tensors_checkpoint(out, preset="NVFP4", ignore=("lm_head",), config=CONFIG):
    """Quantize a tiny model with compressed-tensors' own scheme, calibrate it (global scales from the weights,
    shared within fused groups; 16-element scales; input global scales from activations) and save it with its
    ModelCompressor: the directory llm-compressor writes."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config), dtype=torch.bfloat16)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].abs().amax().float()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model(IDS)
    for h in hooks:
        h.remove()
    apply_quantization_config(model, QuantizationConfig(config_groups={preset: ["Linear"]}, ignore=list(ignore)))
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    with torch.no_grad():
        if preset == "NVFP4":
            for group in _fused_groups(quantized):
                g = min(generate_gparam(quantized[n].weight.amin(), quantized[n].weight.amax()) for n in group)
                for n in group:
                    quantized[n].weight_global_scale.copy_(g)
            for n, m in quantized.items():
                w = m.weight.unflatten(-1, (-1, 16))
                m.weight_scale.data = calculate_qparams(w.amin(-1), w.amax(-1), m.quantization_scheme.weights,
                                                        global_scale=m.weight_global_scale)[0]
                m.input_global_scale.copy_(generate_gparam(-inputs[n], inputs[n]))
        else:  # formats sharq refuses: any valid scales do
            for m in quantized.values():
                for n, p in m.named_parameters(recurse=False):
                    if n.endswith("scale"):
                        p.fill_(1 if p.dtype.is_floating_point else 127)
    for m in quantized.values():
        m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    return out


@pytest.fixture(scope="module")
def ct_made(tmp_path_factory):
    return _compressed_tensors_checkpoint(tmp_path_factory.mktemp("ct") / "nvfp4")


def test_a_compressed_tensors_checkpoint_imports_exactly(ct_made):
    model = interop.load_compressed_tensors(ct_made)
    assert model.sharq_quantization["recipe"]["name"] == "sharq"
    assert model.sharq_quantization["recipe"]["weight_block"] == 16
    tensors = load_file(ct_made / "model.safetensors")
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    one = torch.ones((), dtype=torch.float32)
    layers = _layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        n, k = layer.out_features, layer.in_features
        packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
        g = tensors[f"{name}.weight_global_scale"]
        assert torch.equal(layer.weight_codes, packed)
        assert torch.equal(layer.weight_scales, scale.view(torch.uint8))
        assert torch.equal(layer.weight_scale, (one / g).reshape(()))
        mine = dequantize_blocks(layer.packed) * layer.weight_scale  # code·scale·s_w
        # compressed-tensors' own decompression (bf16, as transformers loads it): bf16 rounding apart
        theirs = NVFP4PackedCompressor.decompress(
            {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": g}, scheme)["weight"]
        assert theirs.dtype == torch.bfloat16 and torch.all((theirs.float() - mine).abs() <= BF16_ROUNDING * mine.abs())
        # and in fp32, code·fl(scale/g) against code·scale·fl(1/g): fp32 rounding apart
        fp32 = dequantize(unpack_fp4_from_uint8(packed, n, k, dtype=torch.float32), scale.float(),
                          args=scheme.weights, dtype=torch.float32, global_scale=g)
        assert torch.all((fp32 - mine).abs() <= 2.0**-22 * mine.abs())
    assert torch.isfinite(_logits(model)).all()
    batches = torch.arange(3 * 16).reshape(3, 16) * 5 % 96
    for recipe in ("sharq", "nvfp4"):
        ppl = perplexity(interop.load_compressed_tensors(ct_made, recipe), batches, progress=False)
        assert 1.0 < ppl.ppl < float("inf")


def test_sharq_weight_only_matches_transformers_on_a_compressed_tensors_checkpoint(ct_made):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        ct_made, dtype=torch.float32, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    mine = interop.load_compressed_tensors(ct_made, W4A16)
    want, got = _logits(hf), _logits(mine)
    # the weights differ by bf16 rounding (theirs), the activations too (sharq's W4A16 rounds them to bf16)
    assert (got - want).abs().max() <= 2 * BF16_ROUNDING * want.abs().max()


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["mxfp4", "hif4", "fp8", "bf16", "sharq-mxfp4", "outlier-channels"])
def test_export_refuses_recipes_without_nvfp4_weights(recipe, tmp_path):
    model = _tiny()
    calibration = ({n: torch.rand(m.in_features) for n, m in sharq.models.target_linears(model).items()}
                   if recipe == "outlier-channels" else None)
    sharq.quantize_model(model, recipe, calibration=calibration)
    with pytest.raises(ValueError, match=f"recipe '{recipe}'"):
        interop.export_compressed_tensors(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_what_it_cannot_write(sharq_model, exported, tmp_path):
    with pytest.raises(ValueError, match="not quantized by sharq"):
        interop.export_compressed_tensors(_tiny(), tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        interop.export_compressed_tensors(sharq_model, tmp_path / "full")
    with pytest.raises(FileExistsError, match="not a compressed-tensors checkpoint"):
        interop.export_compressed_tensors(sharq_model, tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    shutil.copytree(exported, tmp_path / "again")
    interop.export(sharq_model, tmp_path / "again", "compressed-tensors", overwrite=True)
    assert not list(tmp_path.glob(".again.tmp*"))  # no temporary directory left behind
    torch.manual_seed(0)
    odd = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**CONFIG, "hidden_size": 72}))
    with pytest.raises(ValueError, match="in_features 72 is not a multiple of 16"):
        interop.export_compressed_tensors(sharq.quantize_model(odd, "nvfp4"), tmp_path / "odd")
    assert not (tmp_path / "odd").exists() and not list(tmp_path.glob(".odd.tmp*"))
    with pytest.raises(ValueError, match="unknown export format 'gguf'"):
        interop.export(sharq_model, tmp_path / "c", "gguf")
    amax = dict.fromkeys(_layers(sharq_model), 1.0)
    with pytest.raises(ValueError, match="missing 1"):
        interop.export_compressed_tensors(sharq_model, tmp_path / "b",
                                          input_amax={n: a for n, a in amax.items() if n != Q})
    with pytest.raises(ValueError, match="positive finite"):
        interop.export_compressed_tensors(sharq_model, tmp_path / "b", input_amax={**amax, Q: 0.0})


@pytest.mark.parametrize("preset,format_", [("FP8", "float-quantized"), ("W8A8", "int-quantized"),
                                             ("MXFP4", "mxfp4-pack-quantized"), ("W4A16", "pack-quantized")])
def test_import_refuses_other_compressed_tensors_formats(preset, format_, tmp_path):
    config = {**CONFIG, "hidden_size": 128, "intermediate_size": 128}  # whole groups of 32 and 128
    directory = _compressed_tensors_checkpoint(tmp_path / preset, preset, config=config)
    with pytest.raises(ValueError, match=f"format '{format_}'.*sharq imports compressed-tensors NVFP4 only"):
        interop.load_compressed_tensors(directory)


def _tampered(src, dst, config=None, tensors=None):
    """A copy of checkpoint `src` with its quantization_config and/or tensors changed in place by the callables."""
    shutil.copytree(src, dst)
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c["quantization_config"])
        (dst / "config.json").write_text(json.dumps(c))
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors")
    return dst


def _weights(key, value):
    return lambda q: q["config_groups"]["group_0"]["weights"].__setitem__(key, value)


def _block_scale_byte(byte):
    """Q's first block scale replaced by the byte `byte`."""
    def change(t):
        scales = t[f"{Q}.weight_scale"].view(torch.uint8).clone()
        scales[0, 0] = byte
        t[f"{Q}.weight_scale"] = scales.view(torch.float8_e4m3fn)
    return dict(tensors=change)


def _global_scale(value, dtype=torch.float32, shape=(1,)):
    return dict(tensors=lambda t: t.__setitem__(f"{Q}.weight_global_scale", torch.full(shape, value, dtype=dtype)))



@pytest.mark.parametrize("change,error", [
    (dict(config=_weights("group_size", 32)), r"group_size 32.*NVFP4 only"),
    (dict(config=_weights("symmetric", False)), r"asymmetric.*NVFP4 only"),
    (dict(config=_weights("dynamic", True)), r"dynamic.*NVFP4 only"),
    (dict(config=lambda q: q.__setitem__("sparsity_config", {"format": "sparse-24-bitmask"})), "sparsity_config"),
    (dict(config=lambda q: q.__setitem__("kv_cache_scheme", {"num_bits": 8, "type": "float"})), "kv_cache_scheme"),
    (dict(config=lambda q: q.__setitem__("quant_method", "sharq")), "load it with sharq.load"),
    (dict(config=lambda q: q.clear()), "not a compressed-tensors checkpoint"),
    (dict(tensors=lambda t: t.pop(f"{Q}.weight_scale")), "no weight_scale"),
    (dict(tensors=lambda t: t.__setitem__(f"{Q}.weight_scale", (t[f"{Q}.weight_scale"].view(torch.uint8) | 0x80)
                                          .view(torch.float8_e4m3fn))), "negative scales"),
    (dict(tensors=lambda t: t[f"{Q}.weight_global_scale"].zero_()), "positive finite"),
    (_block_scale_byte(0x7F), rf"{Q}.weight_scale holds 1 NaN block scale"),  # fp8 e4m3's NaN, either sign
    (_block_scale_byte(0xFF), rf"{Q}.weight_scale holds 1 NaN block scale"),
    (_global_scale(float("nan")), rf"{Q}.weight_global_scale is nan: it must be a positive finite number"),
    (_global_scale(float("inf")), rf"{Q}.weight_global_scale is inf: it must be a positive finite number"),
    (_global_scale(-2.0), rf"{Q}.weight_global_scale is -2.0: it must be a positive finite number"),
    (_global_scale(1e-39), rf"{Q}.weight_global_scale is .*s_w = 1/g = inf .*beyond fp32's range"),  # subnormal g
    (_global_scale(1e-36), rf"{Q}.weight_global_scale is 1.00000004e-36: s_w = 1/g = 9\.9+62e\+35 .*beyond fp32"),
    (_global_scale(1.0, torch.float16), rf"{Q}.weight_global_scale is torch.float16"),
    (_global_scale(1.0, shape=(2,)), rf"{Q}.weight_global_scale is torch.float32 \(2,\)"),
    (dict(tensors=lambda t: t.__setitem__(f"{Q}.weight_scale", t[f"{Q}.weight_scale"].view(torch.uint8))),
     rf"{Q}.weight_scale is torch.uint8"),
    (dict(tensors=lambda t: t.__setitem__(f"{Q}.weight_packed", t[f"{Q}.weight_packed"][:, :-1].contiguous())),
     r"weight_packed is torch.uint8 \(64, 31\)"),
    (dict(tensors=lambda t: t.pop("model.norm.weight")), "1 missing"),
])
def test_import_refuses_checkpoints_it_cannot_hold(ct_made, tmp_path, change, error):
    with pytest.raises(ValueError, match=error):
        interop.load_compressed_tensors(_tampered(ct_made, tmp_path / "bad", **change))


V = "model.layers.0.self_attn.v_proj"


@pytest.mark.parametrize("change", [
    dict(config=lambda q: q["sharq"]["recipe"].update(scale_granularity="token")),
    dict(config=lambda q: q["sharq"]["recipe"]["stages"][0].update(mask="2:4")),
    dict(config=lambda q: q["sharq"]["weight_scale"].clear()),  # v_proj's exact s_w: fl(1/g) instead
    dict(config=lambda q: q["config_groups"]["group_0"].update(input_activations=interop.INPUT_ARGS)),
    dict(tensors=lambda t: t[f"{Q}.weight_packed"][3, 5].bitwise_xor_(0x10)),  # one byte of one weight flipped
    dict(tensors=lambda t: t[f"{V}.weight_global_scale"].mul_(2)),
    dict(tensors=lambda t: t["model.norm.weight"].mul_(2)),
], ids=["scale_granularity", "mask", "exact_scales", "input_activations", "weight_byte", "global_scale", "norm"])
def test_the_digest_refuses_a_sharq_export_changed_after_export(exported, tmp_path, change):
    """An edited export would load as another model: its digest covers the whole quantization_config (the recipe,
    the exact scales, the compressed-tensors scheme) and every tensor."""
    edited = _tampered(exported, tmp_path / "edited", **change)
    for load in (interop.load_compressed_tensors, sharq.load):
        with pytest.raises(interop.IntegrityError, match="do not match the checkpoint_sha256 recorded"):
            load(edited)


def test_an_export_without_its_digest_loads_only_with_verify_off(exported, tmp_path):
    unsigned = _tampered(exported, tmp_path / "unsigned", config=lambda q: q["sharq"].pop("checkpoint_sha256"))
    with pytest.raises(interop.IntegrityError, match="records no checkpoint_sha256.*verify=False"):
        interop.load_compressed_tensors(unsigned)
    assert torch.equal(_logits(sharq.load(unsigned, verify=False)), _logits(interop.load_compressed_tensors(exported)))


def test_without_the_digest_an_edited_export_is_still_checked(exported, tmp_path):
    unequal = _tampered(exported, tmp_path / "pairs", tensors=lambda t: t[f"{Q}.weight_scale"][:, 1].zero_())
    with pytest.raises(ValueError, match="differ within a 32-element block"):
        interop.load_compressed_tensors(unequal, verify=False)
    interop.load_compressed_tensors(unequal, "sharq", verify=False)  # at 16-element blocks it is a valid checkpoint
    moved = _tampered(exported, tmp_path / "g", tensors=lambda t: t[f"{V}.weight_global_scale"].mul_(2))
    with pytest.raises(ValueError, match="changed after export"):
        interop.load_compressed_tensors(moved, verify=False)


def test_the_export_digest_is_what_format_md_says(exported):
    """Recompute the export's checkpoint_sha256 from the raw files as docs/FORMAT.md defines it."""
    import hashlib
    import struct

    blob = (exported / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + n])
    header.pop("__metadata__", None)
    names = {"F32": "float32", "U8": "uint8", "F8_E4M3": "float8_e4m3fn"}
    q = json.loads((exported / "config.json").read_text())["quantization_config"]
    recorded = q["sharq"].pop("checkpoint_sha256")
    h = hashlib.sha256(b"sharq checkpoint\n")
    h.update(json.dumps(q, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        h.update(f"\n{name}\n{names[info['dtype']]}\n{info['shape']}\n".encode())
        h.update(blob[8 + n + start: 8 + n + end])
    assert h.hexdigest() == recorded


def test_strict_survives_an_export(ct_made, tmp_path):
    """An export records the model's strict mode (quantize_model's strict=) and sharq.load keeps it, as for a sharq
    checkpoint: a NaN input is a ValueError naming the layer; strict= overrides it; a checkpoint another tool made
    loads lenient unless asked. A strict that is not a bool is refused."""
    from .test_checkpoint import NAN_INPUT, _with_a_nan

    interop.export_compressed_tensors(sharq.quantize_model(_tiny(), "nvfp4", strict=True), tmp_path / "strict")
    with pytest.raises(ValueError, match=NAN_INPUT):
        _with_a_nan(sharq.load(tmp_path / "strict"))
    assert torch.isnan(_with_a_nan(sharq.load(tmp_path / "strict", strict=False))).any()
    assert torch.isnan(_with_a_nan(sharq.load(ct_made))).any()
    with pytest.raises(ValueError, match=NAN_INPUT):
        _with_a_nan(sharq.load(ct_made, strict=True))
    bad = _tampered(tmp_path / "strict", tmp_path / "bad", config=lambda q: q["sharq"].update(strict="yes"))
    with pytest.raises(ValueError, match="strict must be true or false"):
        sharq.load(bad)


def test_import_refuses_bad_directories_recipes_and_structures(ct_made, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        interop.load_compressed_tensors(tmp_path)
    _tiny().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a compressed-tensors checkpoint"):
        interop.load_compressed_tensors(tmp_path / "dense")
    sharq.save(sharq.quantize_model(_tiny(), "nvfp4"), tmp_path / "sharq")
    with pytest.raises(ValueError, match="sharq checkpoint, load it with sharq.load"):
        interop.load_compressed_tensors(tmp_path / "sharq")
    for recipe in ("mxfp4", "outlier-channels"):
        with pytest.raises(ValueError, match=f"recipe '{recipe}'.*cannot run on a compressed-tensors NVFP4.*"
                                             r"\(nvfp4, sharq, sparse-only, dense-dense, sharq-plus\)"):
            interop.compressed_tensors_recipe(ct_made, recipe)
        with pytest.raises(ValueError, match=f"recipe '{recipe}'.*cannot run on a compressed-tensors NVFP4"):
            interop.load_compressed_tensors(ct_made, recipe)
    assert interop.compressed_tensors_recipe(ct_made, "sharq") == sharq.get_recipe("sharq", weight_block=16)
    partial = _compressed_tensors_checkpoint(tmp_path / "partial", ignore=("lm_head", "model.layers.0.mlp.down_proj"))
    with pytest.raises(ValueError, match="do not match a sharq structure"):
        interop.load_compressed_tensors(partial)


def test_sharq_eval_runs_recipes_on_a_compressed_tensors_checkpoint(ct_made, tmp_path, capsys):
    """`sharq eval --model` on a checkpoint compressed-tensors made: one row per recipe with NVFP4 weights, each on
    the checkpoint's exact 4-bit weights; a recipe with other weights is a one-line error."""
    import random

    from sharq.cli import main

    from .test_eval import word_tokenizer

    d = shutil.copytree(ct_made, tmp_path / "ct")
    word_tokenizer().save_pretrained(d)
    rng = random.Random(0)
    (tmp_path / "text.txt").write_text(" ".join(f"w{rng.randrange(1, 96)}" for _ in range(400)))
    common = ["eval", "--model", str(d), "--text", str(tmp_path / "text.txt"), "--seqlen", "16", "--max-tokens",
              "256", "--quiet"]
    assert main([*common, "--recipes", "sharq,nvfp4,dense-dense", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["recipe"] for r in rows] == ["sharq", "nvfp4", "dense-dense"]
    assert all(1.0 < r["ppl"] < float("inf") for r in rows)
    capsys.readouterr()
    assert main([*common, "--recipes", "mxfp4"]) == 2
    err = capsys.readouterr().err
    assert "mxfp4" in err and err.count("\n") == 1


def test_quantize_model_refuses_a_decompressed_compressed_tensors_model(ct_made):
    """transformers decompresses a compressed-tensors checkpoint to dense weights; quantizing those again would
    change the 4-bit weights, so quantize_model points to sharq.load instead."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ct_made, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"compressed-tensors checkpoint: quantizing .* sharq.load\(directory"):
        sharq.quantize_model(model, "sharq")


def test_bf16_on_a_compressed_tensors_checkpoint_is_its_weights_with_bf16_activations(ct_made):
    """The checkpoint holds only 4-bit weights, so "bf16" runs them with bf16 activations (the weights-alone row of
    `sharq eval --recipes bf16,nvfp4,sharq`), and an activations-only recipe gets them too."""
    r = interop.compressed_tensors_recipe(ct_made, "bf16")
    assert (r.name, r.weight_fmt, r.weight_block, r.stages, r.activation_bits) == ("bf16", "nvfp4", 16, (), 16.0)
    a_only = sharq.get_recipe("sharq").with_options(name="a-only", weight_fmt="bf16", weight_block=None)
    assert interop.compressed_tensors_recipe(ct_made, a_only).stages == sharq.get_recipe("sharq").stages
    mine, w4a16 = interop.load_compressed_tensors(ct_made, "bf16"), interop.load_compressed_tensors(ct_made, W4A16)
    for (name, a), (_, b) in zip(_layers(mine).items(), _layers(w4a16).items(), strict=True):
        assert torch.equal(a.weight_codes, b.weight_codes) and torch.equal(a.weight_scale, b.weight_scale), name
    assert torch.equal(_logits(mine), _logits(w4a16))
