"""Calibrated 4-bit weights from llm-compressor, for SharQ activations on top: runs llm-compressor's GPTQ (or AWQ)
with its weights-only NVFP4 scheme on a model and writes the compressed-tensors checkpoint that `sharq eval --model`
and `sharq.load` read (docs/ACCURACY.md, "Calibrated weights").

    python benchmarks/calibrated_weights.py --out ~/models/smollm2-gptq-nvfp4           # the embedded SmolLM2
    sharq eval --model ~/models/smollm2-gptq-nvfp4 --recipes bf16,nvfp4,sharq --text lambada
    python benchmarks/calibrated_weights.py --tiny --samples 16 --seqlen 128 --out tests/data/tiny-gptq-nvfp4

llm-compressor pins its own transformers and compressed-tensors, so it runs in a virtual environment of its own
(made on first use, --venv; the CPU torch sharq's tests use): this process (sharq's environment) prepares the model
directory and the calibration tokens, then runs this same file there with --worker, where only llm-compressor,
transformers and the standard library are imported.

Calibration text: Wikipedia (the BoolQ passages, sharq's `wikipedia` corpus), so the LAMBADA evaluation sees
none of it; --calib-text takes another named corpus or a text file. --tiny writes a 2-layer random Llama (hidden
64, byte-level ids, vocabulary 256) instead of a real model: the checkpoint tests/data holds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
TORCH = "torch==2.13.0"
SCHEMES = ("NVFP4A16",)  # weights-only NVFP4 (16-element groups, FP8 scales, a global scale): sharq runs activations
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}


# --- the worker: runs in llm-compressor's environment, imports nothing of sharq ------------------------------------
def worker(job: dict) -> None:
    """Quantize job["model"] with llm-compressor on the calibration ids in job["ids"]; write job["out"]."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.loads(Path(job["ids"]).read_text())
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    if job["method"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        modifier = GPTQModifier(targets="Linear", scheme=job["scheme"], ignore=["lm_head"])
    else:  # AWQ is a transform (smoothing scales folded into the previous layer), then plain NVFP4 rounding
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform import AWQModifier

        modifier = [AWQModifier(), QuantizationModifier(targets="Linear", scheme=job["scheme"], ignore=["lm_head"])]
        if not torch.cuda.is_available():
            # AWQ pins its cached activations for faster host-to-GPU copies, and pinning needs an accelerator:
            # without one it is a RuntimeError, with nothing to speed up. Leave them unpinned.
            from llmcompressor.pipelines.cache import IntermediatesCache

            IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    torch.manual_seed(0)
    oneshot(model=model, processor=tokenizer, dataset=data, recipe=modifier, max_seq_length=max(len(x) for x in ids),
            num_calibration_samples=len(ids))
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])


# --- the driver: sharq's environment ---------------------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    """The python of a virtual environment holding llm-compressor (made here when missing)."""
    python = venv / "bin" / "python"
    want = LLMCOMPRESSOR.split("==")[1]
    if python.is_file():
        probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
                               capture_output=True, text=True, check=False)  # a broken venv is made anew
        if probe.returncode == 0 and probe.stdout.strip() == want:
            return python
    print(f"making {venv} with {LLMCOMPRESSOR} and {TORCH} (minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH, LLMCOMPRESSOR], check=True)
    return python


def byte_tokenizer():
    """A byte-level tokenizer whose ids are the UTF-8 bytes (vocabulary 256, no merges): the tiny model's, so its
    checkpoint is a complete model that `sharq eval` and llm-compressor (which asks for one) can read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # the byte-level pre-tokenizer writes byte b as a printable character: itself where b is printable Latin-1,
    # else chr(256 + n) for the n-th other byte
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, n = {}, 0
    for b in range(256):
        chars[b] = chr(b) if b in printable else chr(256 + n)
        n += b not in printable
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def tiny_model(directory: Path) -> None:
    """A 2-layer random Llama (seeded), saved in fp32 with its byte tokenizer: small enough for its checkpoint to
    live in git."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.save_pretrained(directory)
    tokenizer = byte_tokenizer()
    assert tokenizer("héllo", add_special_tokens=False)["input_ids"] == list("héllo".encode())
    tokenizer.save_pretrained(directory)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face directory or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--tiny", action="store_true", help="quantize a tiny random Llama instead (the test checkpoint)")
    p.add_argument("--out", required=True, help="the compressed-tensors checkpoint directory to write (must not exist)")
    p.add_argument("--method", choices=("gptq", "awq"), default="gptq")
    p.add_argument("--scheme", choices=SCHEMES, default="NVFP4A16")
    p.add_argument("--calib-text", default="wikipedia", help="a named corpus (wikipedia, lambada) or a text file")
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default: 64)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (default: 512)")
    p.add_argument("--venv", type=Path, help="llm-compressor's environment (default: under sharq's cache dir)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker.read_text()))
        return 0

    from sharq.eval.data import load_text
    from sharq.eval.perplexity import windows
    from sharq.hf import bos_token, tokenize
    from sharq.hf import cache_dir, load_tokenizer, model_source

    out = Path(args.out).expanduser().resolve()
    if out.exists():
        raise SystemExit(f"{out} exists: give a new directory")
    if args.samples < 1 or args.seqlen < 1:
        raise SystemExit("--samples and --seqlen must be positive")
    if args.tiny and args.model:
        raise SystemExit("--tiny makes its own model: leave out --model")
    python = ensure_venv(args.venv or cache_dir() / "llmc-venv")
    text, text_name = load_text(args.calib_text)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            source = Path(tmp) / "tiny"
            tiny_model(source)
        else:
            source = model_source(args.model)
        tokenizer = load_tokenizer(source)
        # the evaluation's own windows: consecutive, from the text's start, each led by BOS where the model wants it
        ids = windows(tokenize(text, tokenizer), args.seqlen, args.samples * args.seqlen, bos_token(tokenizer))
        if len(ids) < args.samples:
            raise SystemExit(f"the calibration text gives {len(ids)} windows of {args.seqlen} tokens, fewer than "
                             f"--samples {args.samples}")
        ids = ids[: args.samples].tolist()
        (Path(tmp) / "ids.json").write_text(json.dumps(ids))
        job = {"model": str(source), "ids": str(Path(tmp) / "ids.json"), "method": args.method,
               "scheme": args.scheme, "out": str(out)}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        subprocess.run([str(python), str(Path(__file__).resolve()), "--out", str(out), "--worker",
                        str(Path(tmp) / "job.json")], check=True)
    print(json.dumps({"out": str(out), "model": "tiny" if args.tiny else str(source), "method": args.method,
                      "scheme": args.scheme, "llmcompressor": LLMCOMPRESSOR.split("==")[1], "calib_text": text_name,
                      "samples": args.samples, "seqlen": args.seqlen, "seconds": round(time.perf_counter() - t0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
