"""SharQ activations on calibrated 4-bit weights: a checkpoint llm-compressor itself wrote (GPTQ, weights-only NVFP4,
tests/data/README.md says how) loads with every code, block scale and global scale as stored, saves and loads again
bit for bit as a sharq checkpoint, and runs sharq's recipes, `sharq eval` included. No llm-compressor is needed here:
the checkpoint is JSON plus safetensors, decoded below by the format's definition alone."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file

import sharq

CHECKPOINT = Path(__file__).parent / "data" / "tiny-llama-gptq-nvfp4"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
QUANTIZED = [f"model.layers.{i}.{leaf}" for i in range(2) for leaf in LINEARS]
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
IDS = torch.tensor([list(b"The quick brown fox jumps over the dog."), list(b"Calibrated 4-bit weights, SharQ on top.")])


def _tensors() -> dict[str, torch.Tensor]:
    return load_file(str(CHECKPOINT / "model.safetensors"))


def _decode(packed: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' NVFP4 weight from its tensors, by the format's definition: two E2M1 codes a byte (the
    first in the low nibble; bit 3 the sign), times the group's FP8 (E4M3) scale, times s_w = 1/global_scale."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1))
    values = table[codes].reshape(codes.shape[0], -1, 16) * scales.float().unsqueeze(-1)
    return values.reshape(codes.shape[0], -1) * (torch.ones(()) / global_scale.reshape(()))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _layers(model: torch.nn.Module) -> dict[str, sharq.SharQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, sharq.SharQLinear)}


@pytest.fixture(scope="module")
def model():
    return sharq.load(CHECKPOINT)


def test_the_checkpoint_is_llm_compressors_weights_only_nvfp4():
    q = json.loads((CHECKPOINT / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert (q["quant_method"], q["format"], q["ignore"]) == ("compressed-tensors", "nvfp4-pack-quantized", ["lm_head"])
    assert group["input_activations"] is None and group["weights"]["strategy"] == "tensor_group"
    assert "GPTQModifier" in (CHECKPOINT / "recipe.yaml").read_text()
    assert sum(p.stat().st_size for p in CHECKPOINT.iterdir()) < 1 << 20


def test_sharq_loads_the_stored_4bit_weights_exactly(model):
    tensors = _tensors()
    layers = _layers(model)
    assert sorted(layers) == sorted(QUANTIZED)
    assert model.sharq_quantization["recipe"]["name"] == "sharq"
    for name, layer in layers.items():
        packed, scales, g = (tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_global_scale"))
        assert torch.equal(layer.weight_codes, packed), name
        assert torch.equal(layer.weight_scales.view(torch.uint8), scales.view(torch.uint8)), name
        assert torch.equal(layer.weight_scale, torch.ones(()) / g.reshape(())), name
        want = _decode(packed, scales, g)
        assert want.abs().max() > 0 and torch.equal(layer.qweight.effective(), want), name
    state = model.state_dict()
    for name, t in tensors.items():  # embeddings, norms and lm_head as stored
        if name.rpartition(".")[0] not in layers:
            assert torch.equal(state[name], t), name


def test_save_and_load_round_trip_bit_exactly(model, tmp_path):
    sharq.save(model, tmp_path / "ckpt")
    again = sharq.load(tmp_path / "ckpt")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert torch.equal(_logits(model), _logits(again))


def test_sharq_and_other_recipes_run_on_the_calibrated_weights(model):
    sharq_out = _logits(model)
    bf16 = _logits(sharq.load(CHECKPOINT, recipe="bf16"))  # the checkpoint's weights, bf16 activations
    nvfp4 = _logits(sharq.load(CHECKPOINT, recipe="nvfp4"))
    assert all(torch.isfinite(x).all() for x in (sharq_out, bf16, nvfp4))
    # each recipe quantizes the activations; SharQ's residual keeps it nearer the unquantized activations
    err_sharq, err_nvfp4 = (sharq_out - bf16).abs().mean(), (nvfp4 - bf16).abs().mean()
    assert 0 < err_sharq < err_nvfp4


def test_sharq_eval_runs_on_the_calibrated_checkpoint(tmp_path):
    from sharq.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The model reads its own bytes. " * 40)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(CHECKPOINT), "--text", str(text), "--seqlen", "64", "--max-tokens", "512",
                 "--recipes", "bf16,nvfp4,sharq", "--quiet", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["recipe"] for r in rows] == ["bf16", "nvfp4", "sharq"]
    assert [r["weight_bits"] for r in rows] == [4.5, 4.5, 4.5]
    assert all(1.0 < r["ppl"] < float("inf") for r in rows)


def test_sharq_quantize_keeps_the_calibrated_weights_as_a_sharq_checkpoint(model, tmp_path, capsys):
    """`sharq quantize --model CHECKPOINT` puts the recipe's activations on the checkpoint's 4-bit weights and saves
    a sharq checkpoint that loads to the same model, bit for bit; a recipe that cannot run on NVFP4 weights of
    group 16 is refused by name, before anything is written."""
    from sharq.cli import main

    out = tmp_path / "sharq-ckpt"
    assert main(["quantize", "--model", str(CHECKPOINT), "--recipe", "sharq", "--out", str(out), "--quiet"]) == 0
    assert "sharq on the 4-bit weights of" in capsys.readouterr().out
    again = sharq.load(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(_logits(model), _logits(again))
    assert main(["quantize", "--model", str(CHECKPOINT), "--recipe", "mxfp4", "--out", str(tmp_path / "x")]) == 2
    assert "cannot run on a compressed-tensors NVFP4 checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
