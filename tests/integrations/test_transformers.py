"""The transformers integration registers itself lazily: when transformers' quantizer registry is imported, before
or after sharq, and not at `import sharq`."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import sharq  # noqa: E402

from ..test_models import tiny  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("integrations") / "ckpt"
    sharq.save(sharq.quantize_model(tiny("llama"), "sharq"), d)
    return d


def fresh(code: str, *args: str) -> str:
    child = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout


LOAD = """
import sys
{imports}
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(type(model.model.layers[0].self_attn.q_proj).__name__, model.config.quantization_config.quant_method)
"""


@pytest.mark.parametrize("imports", ["import sharq", "import transformers.quantizers\nimport sharq",
                                     "import sharq.nn", "import sharq.integrations.transformers"])
def test_from_pretrained_loads_a_checkpoint_after_import_sharq(checkpoint, imports):
    """In a fresh process, `import sharq` (or any sharq module, the integration itself included, whose own import
    of transformers' quantizers is what registers it), before or after transformers' quantizers: from_pretrained
    then loads a sharq checkpoint as sharq layers."""
    assert fresh(LOAD.format(imports=imports), checkpoint).split() == ["SharQLinear", "sharq"]


SAVE = """
import sys
import sharq
import transformers
config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2)
model = sharq.quantize_model(transformers.AutoModelForCausalLM.from_config(config), "nvfp4")
model.save_pretrained(sys.argv[1])
"""


def test_save_pretrained_writes_a_sharq_checkpoint_in_a_fresh_process(tmp_path):
    """A model quantized after `import sharq` carries the quantizer (registration adds it to quantize_model's
    hooks), so save_pretrained writes a sharq checkpoint, digest included."""
    fresh(SAVE, tmp_path / "c")
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "sharq" and q["recipe"]["name"] == "nvfp4" and len(q["checkpoint_sha256"]) == 64
    assert sharq.load(tmp_path / "c").sharq_quantization["recipe"]["name"] == "nvfp4"


def test_the_quantizer_keeps_the_checkpoint_names_in_both_calling_conventions():
    """transformers 5.25 passes the model to update_weight_conversions, earlier 5.x releases (the GPU image's) the
    conversions alone: a required `model` made every from_pretrained of a sharq checkpoint a TypeError there."""
    from sharq.integrations.transformers import SharQHfQuantizer

    quantizer = SharQHfQuantizer.__new__(SharQHfQuantizer)  # the method reads no state
    assert quantizer.update_weight_conversions(["a conversion"]) == []
    assert quantizer.update_weight_conversions(["a conversion"], None) == []
