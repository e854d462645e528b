"""Adapters of sharq's quantized layer to other libraries' APIs, one module each, each importing its library only
when it is itself imported; nothing below this package knows them.

- `transformers`: `from_pretrained` / `save_pretrained` of sharq checkpoints (registered when transformers'
  quantizer registry is imported).
- `vllm`: a vLLM quantization method serving sharq checkpoints with SharQ's activations (registered by vLLM's
  `vllm.general_plugins` entry point).
"""
