"""Checkpoints: bit-identical in a fresh process, and two loaders (sharq.load, transformers' from_pretrained) that
refuse anything that is not what was saved."""

import json
import os
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

from .test_models import SMALL, tiny  # noqa: E402

CASES = [("llama", "sharq"), ("qwen3_moe", "sharq"), ("gemma3_text", "hif4"), ("qwen2", "fp8"), ("llama", "bf16"),
         ("mistral", "sharq-hif4"), ("llama", "outlier-channels"), ("llama", "sharq-plus")]


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
    assert cfg["quant_method"] == "sharq" and cfg["format_version"] == 2 and cfg["recipe"]["name"] == recipe
    assert len(cfg["checkpoint_sha256"]) == 64


def test_sharq_plus_checkpoint_keeps_its_options(tmp_path):
    """sharq-plus is made of options (W16, the four_over_six weight scale rule): the checkpoint's recipe carries
    them, and every layer loads with that recipe and its W16 payload, bit for bit."""
    model = _quantized("llama", "sharq-plus")
    sharq.save(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert sharq.Recipe.from_dict(cfg["recipe"]) == sharq.get_recipe("sharq-plus")
    assert cfg["recipe"]["weight_scale_rule"] == "four_over_six" and cfg["recipe"]["weight_block"] == 16
    loaded = sharq.load(tmp_path / "ckpt")
    want = {n: m for n, m in model.named_modules() if isinstance(m, sharq.SharQLinear)}
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, sharq.SharQLinear)}
    assert want.keys() == got.keys() and want
    for name, layer in got.items():
        assert layer.recipe == sharq.get_recipe("sharq-plus")
        a, b = want[name].qweight.packed, layer.qweight.packed
        assert b.block_size == 16 and torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)
        assert torch.equal(want[name].qweight.scale, layer.qweight.scale)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "c"
    sharq.save(_quantized("llama", "sharq"), d)
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _config(d):
    return json.loads((d / "config.json").read_text())


def _write_config(d, cfg, redigest=False):
    if redigest:  # a consistent forgery: only the structural checks can catch it
        q = cfg["quantization_config"]
        q["checkpoint_sha256"] = checkpoint.checkpoint_digest(q, _tensors(d))
    (d / "config.json").write_text(json.dumps(cfg))


def _tensors(d):
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def _rewrite_tensors(d, change, redigest=True):
    from safetensors.torch import save_file

    tensors = _tensors(d)
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _write_config(d, _config(d), redigest=redigest)


def _from_pretrained(d, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw)


LOADERS = {"sharq.load": sharq.load, "from_pretrained": _from_pretrained}
CODES = "model.layers.0.mlp.down_proj.weight_codes"
SCALE = "model.layers.0.mlp.down_proj.weight_scale"
UP_CODES = "model.layers.1.mlp.up_proj.weight_codes"


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop(CODES), "1 missing"),
    (lambda t: t.pop(UP_CODES), "1 missing"),  # the shape of gate_proj's codes: on the meta device too
    (lambda t: t.update(extra=torch.zeros(3)), "1 unexpected"),
    (lambda t: t.update({CODES: t[CODES].to(torch.int16)}), "is torch.int16"),
    (lambda t: t.update({CODES: t[CODES][:, :-1].contiguous()}), "expected torch.uint8"),
    (lambda t: t.update({SCALE: t[SCALE].to(torch.bfloat16)}), "weight_scale is torch.bfloat16"),  # never cast
])
@pytest.mark.parametrize("redigest", [True, False], ids=["forged", "digest-stale"])
def test_loaders_reject_tensors_that_do_not_fit(saved, tmp_path, loader, damage, message, redigest):
    """Even with a matching digest (a consistent forgery), both loaders check every tensor's name, dtype and shape
    before loading: transformers alone would warn and randomly initialize a missing tensor, or cast a payload. With
    the digest left as it was, the error still names the tensor (the structure is checked before the digest)."""
    d = _copy(saved, tmp_path / "c")
    _rewrite_tensors(d, damage, redigest)
    with pytest.raises(checkpoint.IntegrityError, match=message):
        LOADERS[loader](d)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("edit", [
    lambda q: q["recipe"]["stages"][1].update(block_size=32),  # the residual's block size
    lambda q: q["recipe"]["stages"][0].update(mask="2:4"),
    lambda q: q["recipe"].update(stages=q["recipe"]["stages"][:1]),  # drop the residual stage
    lambda q: q["recipe"].update(scale_granularity="token"),
    lambda q: q.update(share_inputs=False),
    lambda q: q.update(strict=True),
])
def test_the_digest_covers_the_quantization_config(saved, tmp_path, loader, edit):
    """Editing the recipe in config.json would load a different model: the digest covers it."""
    d = _copy(saved, tmp_path / "c")
    cfg = _config(d)
    edit(cfg["quantization_config"])
    _write_config(d, cfg)
    with pytest.raises(checkpoint.IntegrityError, match="do not match the checkpoint_sha256"):
        LOADERS[loader](d)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("edit", [lambda q: q.pop("checkpoint_sha256"), lambda q: q.update(checkpoint_sha256=None)])
def test_a_missing_digest_is_an_error_unless_verify_is_off(saved, tmp_path, rng, loader, edit):
    d = _copy(saved, tmp_path / "c")
    cfg = _config(d)
    edit(cfg["quantization_config"])
    _write_config(d, cfg)
    with pytest.raises(checkpoint.IntegrityError, match="records no checkpoint_sha256.*verify=False"):
        LOADERS[loader](d)
    ids = torch.randint(0, 96, (1, 6), generator=rng)
    with torch.no_grad():
        assert torch.equal(sharq.load(d, verify=False)(ids).logits, sharq.load(saved)(ids).logits)


def test_a_format_1_checkpoint_needs_verify_off(saved, tmp_path):
    """sharq 0.1's hash covered the weights file only: such a checkpoint loads with verify=False, not silently."""
    d = _copy(saved, tmp_path / "c")
    cfg = _config(d)
    q = cfg["quantization_config"]
    q.pop("checkpoint_sha256")
    q.update(format_version=1, weights_sha256="0" * 64)
    _write_config(d, cfg)
    with pytest.raises(checkpoint.IntegrityError, match="format 1"):
        sharq.load(d)
    sharq.load(d, verify=False)


@pytest.mark.parametrize("loader", LOADERS)
def test_loaders_reject_bad_configs_before_building_anything(saved, tmp_path, monkeypatch, loader):
    d = _copy(saved, tmp_path / "c")
    cfg = _config(d)

    def no_model(*a, **k):
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(checkpoint, "quantize_like", no_model)
    for change, message in [
        (lambda c: c["quantization_config"].update(format_version=99), "format version 99"),
        (lambda c: c["quantization_config"].pop("recipe"), "lacks 'recipe'"),
        (lambda c: c["quantization_config"]["recipe"].update(stages=[{"fmt": "int3"}]), "unknown format"),
        (lambda c: c["quantization_config"]["recipe"]["stages"][0].update(block_size=1 << 30), "block_size must be"),
        (lambda c: c["quantization_config"]["recipe"].update(weight_block=-32), "block_size must be"),
        (lambda c: c["quantization_config"]["recipe"].update(weight_block="32"), "block_size must be an int"),
        (lambda c: c["quantization_config"]["recipe"].update(outlier_fraction=7), "outlier_fraction"),
        (lambda c: c["quantization_config"].update(modules="model.layers.0"), "modules must be a list"),
        (lambda c: c["quantization_config"].update(share_inputs="yes"), "share_inputs"),
        (lambda c: c["quantization_config"].update(strict="yes"), "strict must be true or false"),
        (lambda c: c["quantization_config"].update(kv_scheme="fp8"), r"does not know \(kv_scheme\).*upgrade"),
    ]:
        broken = json.loads(json.dumps(cfg))
        change(broken)
        _write_config(d, broken)
        with pytest.raises(ValueError, match=message):
            LOADERS[loader](d)


def test_load_rejects_unreadable_configs(saved, tmp_path):
    d = _copy(saved, tmp_path / "c")
    cfg = _config(d)
    cfg["quantization_config"].update(quant_method="gptq")
    _write_config(d, cfg)
    with pytest.raises(ValueError, match="no sharq quantization_config"):
        sharq.load(d)
    (d / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sharq.load(d)
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        sharq.load(d)


@pytest.fixture(scope="module")
def saved_logits(saved):
    ids = torch.arange(1, 12).reshape(1, 11)
    with torch.no_grad():
        return ids, sharq.load(saved)(ids).logits


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_a_damaged_checkpoint_never_loads_as_another_model(saved, saved_logits, tmp_path_factory, data):
    """Truncate the weights anywhere or flip any byte: loading raises, or (a flip in the header's padding or
    metadata, which the digest does not need to cover) gives the saved model's logits bit for bit."""
    d = _copy(saved, tmp_path_factory.mktemp("fuzz") / "c")
    path = d / "model.safetensors"
    blob = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
    else:
        i = data.draw(st.integers(0, len(blob) - 1), label="offset")
        blob[i] ^= data.draw(st.integers(1, 255), label="xor")
    path.write_bytes(bytes(blob))
    ids, want = saved_logits
    for loader in LOADERS.values():
        try:
            model = loader(d)
        except ValueError:
            continue
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)


def test_save_needs_a_sharq_model(tmp_path):
    with pytest.raises(ValueError, match="not quantized by sharq"):
        sharq.save(tiny("llama"), tmp_path)


def test_save_never_overwrites_by_accident_and_is_atomic(saved, tmp_path, monkeypatch, rng):
    model = _quantized("llama", "nvfp4")
    d = _copy(saved, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(FileExistsError, match="not empty: pass overwrite=True"):
        sharq.save(model, d)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        sharq.save(model, tmp_path / "file")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a sharq checkpoint"):
        sharq.save(model, tmp_path / "home", overwrite=True)  # overwrite replaces checkpoints only
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"

    class Interrupted(Exception):
        pass

    class Tokenizer:  # fails half way through the save, after the weights are written
        def save_pretrained(self, _):
            raise Interrupted

    with pytest.raises(Interrupted):
        sharq.save(model, d, Tokenizer(), overwrite=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # the previous checkpoint is intact
    assert _names(tmp_path) == ["c", "file", "home"]  # and no temporary directory left
    sharq.save(model, d, overwrite=True)
    ids = torch.randint(0, 96, (1, 5), generator=rng)
    with torch.no_grad():
        assert torch.equal(sharq.load(d)(ids).logits, model(ids).logits)
    assert _names(tmp_path) == ["c", "file", "home"]
    assert (d.stat().st_mode & 0o777) == 0o777 & ~_umask()  # a checkpoint, not a private temporary directory


def _names(directory):
    """What a directory holds, but the empty lock files saves leave beside their target."""
    return sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock"))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("source", ["sharq.load", "from_pretrained", "quantize_model"])
def test_save_pretrained_writes_a_sharq_checkpoint(saved, tmp_path, rng, source):
    """model.save_pretrained(DIR) of any sharq model writes the quantization_config and its digest (it used to
    write neither, and from_pretrained then built a plain model with random weights)."""
    model = {"sharq.load": lambda: sharq.load(saved), "from_pretrained": lambda: _from_pretrained(saved),
             "quantize_model": lambda: _quantized("qwen3_moe", "sharq")}[source]()
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "again")
    q = _config(tmp_path / "again")["quantization_config"]
    assert q["quant_method"] == "sharq" and len(q["checkpoint_sha256"]) == 64
    for loader in LOADERS.values():
        with torch.no_grad():
            assert torch.equal(loader(tmp_path / "again")(ids).logits, want)


def test_a_model_cast_to_bf16_saves_and_loads_exactly(tmp_path, rng):
    """model.to(bf16) keeps the fp32 weight_scale (a bf16 one changed every output and load refused it); the
    checkpoint loads in bf16 with every tensor bit-identical, and in fp32 with its bf16 norms and embeddings cast
    up. (Logits are not compared: transformers keeps RoPE's inv_freq in fp32 when it builds a bf16 model, while
    .to(bf16) casts it.)"""
    model = _quantized("llama", "sharq").to(torch.bfloat16)
    assert model.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32
    sharq.save(model, tmp_path / "c")
    loaded = sharq.load(tmp_path / "c", dtype=torch.bfloat16)
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) and got[n].dtype == want[n].dtype
                                         for n in want)
    ids = torch.randint(0, 96, (1, 9), generator=rng)
    with torch.no_grad():
        assert torch.isfinite(sharq.load(tmp_path / "c")(ids).logits).all()


@pytest.mark.parametrize("model_type,recipe", [("llama", "sharq"), ("qwen3_moe", "sharq"), ("llama", "outlier-channels"),
                                               ("gemma3_text", "hif4")])
def test_transformers_from_pretrained_loads_a_sharq_checkpoint(model_type, recipe, tmp_path, rng):
    model = _quantized(model_type, recipe)
    ids = torch.randint(0, 96, (1, 9), generator=rng)
    with torch.no_grad():
        want = model(ids).logits
    sharq.save(model, tmp_path / "c")
    loaded = _from_pretrained(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    layers = [m for m in loaded.modules() if isinstance(m, sharq.SharQLinear)]
    assert layers and all(m.weight_scale.dtype == torch.float32 for m in layers)
    assert all(m.weight_codes is None or m.weight_codes.dtype == torch.uint8 for m in layers)


def test_from_pretrained_in_bf16_keeps_the_payload_exact(tmp_path, rng):
    model = _quantized("llama", "mxfp4")
    sharq.save(model, tmp_path / "c")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.bfloat16)
    for name, m in loaded.named_modules():
        if isinstance(m, sharq.SharQLinear):
            original = model.get_submodule(name)
            assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_codes, original.weight_codes)
            assert torch.equal(m.weight_values, original.weight_values)


@pytest.fixture(scope="module")
def saved_strict(tmp_path_factory):
    d = tmp_path_factory.mktemp("strict") / "c"
    sharq.save(sharq.quantize_model(tiny("llama"), "sharq", strict=True), d)
    return d


@pytest.mark.parametrize("strict", [False, True])
def test_checkpoint_digest_is_what_format_md_says(saved, saved_strict, strict):
    """Recompute checkpoint_sha256 from the raw file as docs/FORMAT.md defines it (own safetensors parser)."""
    import hashlib
    import struct

    saved = saved_strict if strict else saved
    blob = (saved / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8: 8 + n])
    header.pop("__metadata__", None)
    names = {"F32": "float32", "BF16": "bfloat16", "U8": "uint8", "I64": "int64", "F16": "float16"}
    q = _config(saved)["quantization_config"]
    assert q["strict"] is strict
    keys = ("quant_method", "format_version", "recipe", "target_modules", "share_inputs", "modules")
    keys += ("strict",) if strict else ()  # false (or absent, before the key existed): left out
    h = hashlib.sha256(b"sharq checkpoint\n")
    h.update(json.dumps({k: q[k] for k in keys}, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(header):
        info = header[name]
        start, end = info["data_offsets"]
        h.update(f"\n{name}\n{names[info['dtype']]}\n{info['shape']}\n".encode())
        h.update(blob[8 + n + start: 8 + n + end])
    assert h.hexdigest() == q["checkpoint_sha256"]


def _with_a_nan(model):
    """The model's logits for three tokens whose second embedding holds one NaN (all NaN, through attention)."""
    embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    embeddings[0, 1, 5] = float("nan")
    with torch.no_grad():
        return model(inputs_embeds=embeddings).logits


NAN_INPUT = r"model\.layers\.0\.self_attn\.q_proj: input has \d+ non-finite"


@pytest.mark.parametrize("loader", LOADERS)
def test_strict_survives_a_checkpoint(saved, saved_strict, loader):
    """A model quantized with strict=True is strict again once loaded, by either reader: a NaN input is a ValueError
    naming the layer (it ran on to all-NaN logits). A checkpoint saved without strict still lets it through."""
    assert _config(saved_strict)["quantization_config"]["strict"] is True
    with pytest.raises(ValueError, match=NAN_INPUT):
        _with_a_nan(LOADERS[loader](saved_strict))
    assert torch.isnan(_with_a_nan(LOADERS[loader](saved))).any()


def test_load_strict_overrides_the_checkpoint(saved, saved_strict):
    assert torch.isnan(_with_a_nan(sharq.load(saved_strict, strict=False))).any()
    with pytest.raises(ValueError, match=NAN_INPUT):
        _with_a_nan(sharq.load(saved, strict=True))
    resaved = sharq.load(saved, strict=True)
    assert resaved.sharq_quantization["strict"] is True  # and so is what it saves


@pytest.mark.parametrize("loader", LOADERS)
def test_a_checkpoint_from_before_strict_loads_lenient(saved, tmp_path, loader):
    """A checkpoint written before the strict key existed has no such key and a digest without it: it loads, not
    strict (an absent or false strict is left out of the digest)."""
    d = _copy(saved, tmp_path / "c")
    cfg = _config(d)
    assert cfg["quantization_config"].pop("strict") is False
    _write_config(d, cfg)  # the recorded digest unchanged
    model = LOADERS[loader](d)
    assert not any(m.strict for m in model.modules() if isinstance(m, sharq.SharQLinear))
    assert torch.isnan(_with_a_nan(model)).any()


# --- the files a save writes ------------------------------------------------------------------------------------------
WRITERS = {"sharq.save": sharq.save, "export": sharq.export}


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_saved_files_respect_the_umask(tmp_path, writer, umask):
    """Every file of a save or an export is 0666 & ~umask, as open() makes files, and every directory 0777 & ~umask:
    safetensors writes model.safetensors through a private temporary file, which made it 0600 (unreadable to the
    other users of a shared checkpoint) while config.json was 0644."""
    model = _quantized("llama", "nvfp4")
    old = os.umask(umask)
    try:
        WRITERS[writer](model, tmp_path / "c", tokenizer=_word_tokenizer())
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").rglob("*")}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= modes.keys()
    assert modes == {n: (0o777 if (tmp_path / "c" / n).is_dir() else 0o666) & ~umask for n in modes}
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o777 & ~umask


def _word_tokenizer():
    from .test_eval import word_tokenizer

    return word_tokenizer()


# A process that writes a checkpoint (argv[1]: "sharq.save" or "export") into argv[2] and hangs while writing the
# tokenizer, the last file: the weights are in its temporary directory by then.
HANGING_WRITER = r"""
import sys, time
from pathlib import Path
import torch, transformers, sharq

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
model = sharq.quantize_model(transformers.AutoModelForCausalLM.from_config(config), "nvfp4")

class Hangs:
    def save_pretrained(self, directory):
        (Path(directory) / "hanging").touch()
        time.sleep(600)

{"sharq.save": sharq.save, "export": sharq.export}[sys.argv[1]](model, sys.argv[2], tokenizer=Hangs())
"""


def _temporary_dirs(target):
    return sorted(target.parent.glob(f".{target.name}.tmp*"))


@pytest.mark.parametrize("writer", WRITERS)
def test_a_killed_save_is_cleaned_up_by_the_next_save(tmp_path, writer, rng):
    """A save or export killed outright (SIGKILL: no finally clause runs) leaves its temporary directory (~130 MB for
    SmolLM2) beside the target; the next save into that target deletes it, and leaves alone the temporary
    directory of another target whose name extends this one."""
    import time

    target = tmp_path / "c"
    other = tmp_path / ".c.tmp-x.tmp-abcd1234"  # a writer of "c.tmp-x" at work
    other.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, writer, str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((t / "hanging").exists() for t in tmp_path.glob(".c.tmp-*/*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=30)
    orphans = [t for t in _temporary_dirs(target) if t != other]
    assert len(orphans) == 1 and list(orphans[0].rglob("model.safetensors")) and not target.exists()
    model = _quantized("llama", "nvfp4")
    WRITERS[writer](model, target)
    assert _temporary_dirs(target) == [other] and other.is_dir()
    WRITERS[writer](model, tmp_path / "undisturbed")
    ids = torch.randint(0, 96, (1, 7), generator=rng)
    with torch.no_grad():
        want = sharq.interop.load(tmp_path / "undisturbed")(ids).logits
        assert torch.equal(sharq.interop.load(target)(ids).logits, want)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("writer", ["sharq.save", "save_pretrained"])
@pytest.mark.parametrize("loader", LOADERS)
def test_a_family_transformers_saves_under_older_names_round_trips(tmp_path, rng, writer, loader):
    """transformers writes some families under their older checkpoint names (Mixtral's experts as
    `block_sparse_moe`); a sharq checkpoint keeps the model's own names, which its digest and both loaders use
    (a Mixtral checkpoint loaded by neither, as 'corrupt')."""
    model = _quantized("mixtral", "sharq")
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    want = _logits(model, ids)
    if writer == "sharq.save":
        sharq.save(model, tmp_path / "c")
    else:
        model.save_pretrained(tmp_path / "c")
    names = list(_tensors(tmp_path / "c"))
    assert any(".mlp.experts." in n for n in names) and not any("block_sparse_moe" in n for n in names)
    assert torch.equal(_logits(LOADERS[loader](tmp_path / "c"), ids), want)


@pytest.mark.parametrize("loader", LOADERS)
def test_an_lm_head_untied_from_the_embeddings_loads_untied(tmp_path, rng, loader):
    """A model whose config ties lm_head to the embeddings but whose lm_head holds its own weight (trained apart)
    saves both; both loaders keep both, as from_pretrained does (sharq.load tied them again, a different model)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + torch.randn(96, 64, generator=rng))
    sharq.quantize_model(model, "nvfp4")
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    want = _logits(model, ids)
    sharq.save(model, tmp_path / "c")
    assert "lm_head.weight" in _tensors(tmp_path / "c")
    loaded = LOADERS[loader](tmp_path / "c")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded, ids), want)


def test_a_tied_lm_head_loads_tied(saved):
    torch.manual_seed(0)
    model = sharq.quantize_model(transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SMALL, tie_word_embeddings=True)), "nvfp4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    d = sharq.save(model, saved.parent / "tied")
    assert "lm_head.weight" not in _tensors(d)
    for loader in LOADERS.values():
        loaded = loader(d)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_the_generation_config_survives_a_checkpoint_and_an_export(tmp_path):
    """Stop tokens and sampling defaults come back as saved, from a checkpoint and from its export (sharq.load kept
    only config.json's, and an export of a loaded checkpoint then wrote those: Llama-3's second stop token lost)."""
    model = _quantized("llama", "nvfp4")
    g = model.generation_config
    g.eos_token_id, g.max_new_tokens, g.do_sample, g.temperature, g.top_p = [2, 7], 17, True, 0.6, 0.9
    sharq.save(model, tmp_path / "c")
    sharq.export(sharq.load(tmp_path / "c"), tmp_path / "ct")
    for loaded in (sharq.load(tmp_path / "c"), _from_pretrained(tmp_path / "c"), sharq.load(tmp_path / "ct")):
        h = loaded.generation_config
        assert (h.eos_token_id, h.max_new_tokens, h.do_sample, h.temperature, h.top_p) == ([2, 7], 17, True, 0.6, 0.9)


def test_a_checkpoint_loads_in_the_dtype_it_was_saved_in(tmp_path, rng):
    """sharq.load's default dtype is the checkpoint's own, so a bf16 model comes back bit for bit (it came back in
    fp32, with other logits); dtype= still casts."""
    torch.manual_seed(0)
    model = sharq.quantize_model(transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**SMALL), dtype=torch.bfloat16).eval(), "sharq")
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    sharq.save(model, tmp_path / "c")
    sharq.export(model, tmp_path / "ct", shared_global_scales=False)  # each layer's own s_w: the same model
    for d in ("c", "ct"):
        loaded = sharq.load(tmp_path / d)
        assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
        assert torch.equal(_logits(loaded, ids), _logits(model, ids))
        assert sharq.load(tmp_path / d, dtype=torch.float32).model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("loader", LOADERS)
def test_a_searched_weight_tensor_scale_loads(tmp_path, rng, loader):
    """weight_tensor_scale_rule="search" (SPEC §11.2) compares errors, which a loader's placeholder model on the
    meta device has none of: its checkpoints failed to load (Tensor.item() on a meta tensor)."""
    model = sharq.quantize_model(tiny("llama"), "sharq-plus", weight_tensor_scale_rule="search")
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    sharq.save(model, tmp_path / "c")
    assert torch.equal(_logits(LOADERS[loader](tmp_path / "c"), ids), _logits(model, ids))


def test_an_overwrite_interrupted_between_its_renames_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch,
                                                                                       rng):
    """The old checkpoint is moved aside, then the new one put in place: interrupted in between (Ctrl-C), the old
    one goes back (it was deleted with the temporary directory); a writer killed there leaves it in its temporary
    directory, and the next write into the target puts it back first, so a failing write leaves it in place."""
    d = _copy(saved, tmp_path / "c")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    model = _quantized("llama", "nvfp4")
    replace = os.replace

    def interrupted(src, dst):
        if str(src).endswith(os.path.join("", "c")) and ".tmp-" in str(src):  # the new checkpoint into place
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sharq.save(model, d, overwrite=True)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before and _names(tmp_path) == ["c"]

    orphan = tmp_path / ".c.tmp-abcd1234"  # what a writer killed between the renames leaves
    orphan.mkdir()
    d.rename(orphan / "previous")

    class Failing:
        def save_pretrained(self, _):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        sharq.save(model, d, Failing())
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before and _names(tmp_path) == ["c"]
    assert torch.equal(_logits(sharq.load(d), torch.randint(0, 96, (1, 5), generator=rng)).isnan(),
                       torch.zeros(1, 5, 96, dtype=torch.bool))


@pytest.mark.parametrize("target", [".", "..", "sub/.."])
def test_save_refuses_the_working_directory(tmp_path, monkeypatch, target):
    """"." named no directory of its own (a cryptic FileExistsError on '..tmp-*', a stray '..lock' left)."""
    (tmp_path / "work" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(ValueError, match="working directory"):
        sharq.save(_quantized("llama", "nvfp4"), target)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["sub"]


@pytest.mark.parametrize("loader", LOADERS)
def test_a_sharded_checkpoint_loads_and_a_stray_index_beside_one_file_is_ignored(saved, tmp_path, rng, loader):
    """save_pretrained(max_shard_size=) writes shards and an index, which both loaders read; a directory holding
    model.safetensors and an index (a stray or stale one, even an invalid one) loads model.safetensors, as
    transformers does (sharq.load read the index and refused the checkpoint, or read other tensors)."""
    model = sharq.load(saved)
    ids = torch.randint(0, 96, (2, 7), generator=rng)
    want = _logits(model, ids)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / checkpoint.WEIGHTS_INDEX).is_file()
    assert len(checkpoint.weight_files(tmp_path / "sharded")) > 1
    assert torch.equal(_logits(LOADERS[loader](tmp_path / "sharded"), ids), want)
    stray = _copy(saved, tmp_path / "stray")
    (stray / checkpoint.WEIGHTS_INDEX).write_text("{not json")
    assert checkpoint.weight_files(stray) == [stray / checkpoint.WEIGHTS]
    assert torch.equal(_logits(LOADERS[loader](stray), ids), want)
