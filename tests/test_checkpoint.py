"""Checkpoints: bit-identical in a fresh process, and a loader that refuses anything that is not what was saved."""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import sharq  # noqa: E402
from sharq import checkpoint  # noqa: E402

from .test_models import tiny  # noqa: E402

CASES = [("llama", "sharq"), ("qwen3_moe", "sharq"), ("gemma3_text", "hif4"), ("qwen2", "fp8"), ("llama", "bf16"),
         ("mistral", "sharq-hif4"), ("llama", "outlier-channels")]


def _quantized(model_type, recipe):
    model = tiny(model_type)
    calibration = None
    if recipe == "outlier-channels":
        calibration = {n: torch.rand(m.in_features) for n, m in sharq.models.target_linears(model).items()}
    return sharq.quantize_model(model, recipe, calibration=calibration)


FRESH = """
import sys, torch, sharq
model = sharq.load(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[3])
"""


@pytest.mark.parametrize("model_type,recipe", CASES)
def test_checkpoint_round_trip_is_bit_identical_in_a_fresh_process(model_type, recipe, tmp_path, rng):
    model = _quantized(model_type, recipe)
    ids = torch.randint(0, 96, (2, 11), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
    sharq.save(model, tmp_path / "ckpt")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "ckpt"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True)
    assert torch.equal(torch.load(tmp_path / "out.pt"), want)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "sharq" and cfg["format_version"] == 1 and cfg["recipe"]["name"] == recipe


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    sharq.save(_quantized("llama", "sharq"), d)
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(d, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["weights_sha256"] = checkpoint.file_sha256(d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg))


CODES = "model.layers.0.mlp.down_proj.weight_codes"


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop(CODES), "1 missing"),
    (lambda t: t.update(extra=torch.zeros(3)), "1 unexpected"),
    (lambda t: t.update({CODES: t[CODES].to(torch.int16)}), "is torch.int16"),
    (lambda t: t.update({CODES: t[CODES][:, :-1].contiguous()}), "expected torch.uint8"),
])
def test_loader_rejects_tensors_that_do_not_fit(saved, tmp_path, damage, message):
    d = _copy(saved, tmp_path / "c")
    _rewrite_tensors(d, damage)
    with pytest.raises(ValueError, match=message):
        sharq.load(d)


def test_loader_rejects_bad_configs(saved, tmp_path):
    d = _copy(saved, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    for change, message in [
        (lambda c: c["quantization_config"].update(format_version=99), "format version 99"),
        (lambda c: c["quantization_config"].update(quant_method="gptq"), "no sharq quantization_config"),
        (lambda c: c["quantization_config"].pop("recipe"), "lacks 'recipe'"),
        (lambda c: c["quantization_config"]["recipe"].update(stages=[{"fmt": "int3"}]), "unknown format"),
    ]:
        broken = json.loads(json.dumps(cfg))
        change(broken)
        (d / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            sharq.load(d)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sharq.load(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sharq.load(d)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_truncated_or_flipped_weights_never_load(saved, tmp_path_factory, data):
    d = _copy(saved, tmp_path_factory.mktemp("fuzz") / "c")
    path = d / "model.safetensors"
    blob = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        i = data.draw(st.integers(0, len(blob) - 1), label="offset")
        blob[i] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError):
        sharq.load(d)


def test_truncated_weights_without_a_hash_are_refused(saved, tmp_path):
    d = _copy(saved, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(cfg))
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sharq.load(d)


def test_save_needs_a_sharq_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized by sharq"):
        sharq.save(tiny("llama"), tmp_path)


@pytest.mark.parametrize("model_type,recipe", [("llama", "sharq"), ("qwen3_moe", "sharq"), ("llama", "outlier-channels"),
                                               ("gemma3_text", "hif4")])
def test_transformers_from_pretrained_loads_a_sharq_checkpoint(model_type, recipe, tmp_path, rng):
    model = _quantized(model_type, recipe)
    ids = torch.randint(0, 96, (1, 9), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
    sharq.save(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    layers = [m for m in loaded.modules() if isinstance(m, sharq.SharQLinear)]
    assert layers and all(m.weight_scale.dtype == torch.float32 for m in layers)
    assert all(m.weight_codes is None or m.weight_codes.dtype == torch.uint8 for m in layers)


def test_from_pretrained_in_bf16_keeps_the_payload_exact(tmp_path, rng):
    model = _quantized("llama", "mxfp4")
    sharq.save(model, tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for name, m in loaded.named_modules():
        if isinstance(m, sharq.SharQLinear):
            original = model.get_submodule(name)
            assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_codes, original.weight_codes)
            assert torch.equal(m.weight_values, original.weight_values)


def test_from_pretrained_refuses_a_corrupt_checkpoint(saved, tmp_path):
    d = _copy(saved, tmp_path / "c")
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        transformers.AutoModelForCausalLM.from_pretrained(d)
