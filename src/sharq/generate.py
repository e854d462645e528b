"""Fast autoregressive decoding for any Hugging Face causal LM, quantized by sharq or not: a static KV cache, one
prefill forward, then one forward per new token, each replayed from one CUDA graph on a GPU.

Why: in eager mode the host's launch cost, not the GPU, sets the pace of decoding (an 8B model on an H200: 37.7
ms/token eager, 7.76 ms replayed from a CUDA graph), and a quantized layer launches several kernels where bf16
launches one. The bf16 baseline runs this very path, so benchmarks compare like with like.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch

from ._checks import NonFiniteLogits, as_count, check_count, flag_non_finite, position_limit
from ._cuda_graph import capture, warm_up
from ._format import plural


def _static_cache(model, max_len: int):
    """transformers' StaticCache for `max_len` tokens, with every sliding-window (or chunked) layer replaced by a
    full static layer. A sliding layer counts its tokens in a Python int, which a CUDA graph replay would freeze
    (its mask offset and its cache position would stay those of the capture); a full layer counts them in a device
    tensor that the replay advances. The model's sliding-window mask still limits what each layer attends to; the
    price is a sliding layer's cache holding the whole sequence instead of one window."""
    from transformers.cache_utils import StaticCache, StaticLayer, StaticSlidingWindowLayer

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    cache.layers = [StaticLayer(max_cache_len=max_len) if type(layer) is StaticSlidingWindowLayer else layer
                    for layer in cache.layers]
    return cache


class DecodeSession:
    """The decoding state of `batch_size` equal-length rows of up to `max_len` tokens: prefill(ids) fills the cache
    with the prompts and returns the last position's logits; each step(tokens) feeds one token per row and returns
    the next logits [batch_size, vocab]. `generate` is built from it, and benchmarks time step() in isolation.

    With cuda_graph (default: on CUDA), the first step runs eagerly on a side stream (the warm-up: Triton and
    cuBLAS initialize, lazy buffers appear) and is then captured as ONE CUDA graph that every later step replays.
    Replays need no host work but filling two static buffers, the token ids and the position ids: the cache finds
    its write position in a device tensor that the graph itself advances, and the mask is built from it on the
    device (transformers 5.17 and 5.24 alike: StaticLayer.cumulative_length, Cache.get_query_offset). The logits a
    replayed step returns are the graph's own buffer, overwritten by the next step. If capture fails (an operation
    a graph cannot hold, e.g. a data-dependent MoE dispatch), a warning says so and the steps run eagerly.
    With compile=True the decode step's forward goes through torch.compile(fullgraph=True, dynamic=False) before
    the capture (the prefill stays eager: one call, one shape, not worth a compilation)."""

    def __init__(self, model, batch_size: int, max_len: int, *, cuda_graph: bool | None = None,
                 compile: bool = False):
        device = model.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device; this one is on {device}")
        self.model, self.batch_size, self.max_len, self.device = model, batch_size, max_len, device
        self.cache = _static_cache(model, max_len)
        params = inspect.signature(model.forward).parameters
        # the cache's keyword: `cache` from transformers 5.2x (`past_key_values` still accepted, with a warning
        # per call), `past_key_values` before
        self._kwargs = {"cache" if "cache" in params else "past_key_values": self.cache, "use_cache": True}
        if "logits_to_keep" in params:  # the prefill needs the last position's logits only
            self._kwargs["logits_to_keep"] = 1
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = 0  # tokens in the cache, counted on the host (no sync)
        self.use_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self._decode = (torch.compile(self._forward, fullgraph=True, dynamic=False, mode="default") if compile
                        else self._forward)

    def _forward(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, position_ids=self.positions, **self._kwargs).logits[:, -1]

    def reset(self) -> None:
        """Empty the cache in place (its buffers keep their addresses, so a captured graph stays valid)."""
        self.cache.reset()
        self.position = 0

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompts [batch_size, P] through the model into an empty cache; the logits of position P-1."""
        batch, length = input_ids.shape
        if batch != self.batch_size or not 0 < length <= self.max_len:
            raise ValueError(f"prefill takes [{self.batch_size}, 1..{self.max_len}] token ids, got "
                             f"{list(input_ids.shape)}")
        if self.position:
            self.reset()
        positions = torch.arange(length, device=self.device).expand(batch, length)
        logits = self.model(input_ids=input_ids, position_ids=positions, **self._kwargs).logits[:, -1]
        self.position = length
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([batch_size] ids on the model's device) at the next position; its logits."""
        if not 0 < self.position < self.max_len:
            raise RuntimeError(f"step() at position {self.position}: prefill first, and at most max_len "
                               f"{self.max_len} tokens fit")
        self.ids.copy_(tokens.view(self.batch_size, 1))
        self.positions.fill_(self.position)
        self.position += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if not self.use_graph:
            return self._decode()
        return self._capture()

    def _capture(self) -> torch.Tensor:
        """This step eagerly (the warm-up), then captured; this step's logits."""
        logits = warm_up(self._decode, self.device)
        try:
            self.graph, self.logits = capture(self._decode, self.device)
        except Exception as e:  # noqa: BLE001 - any capture failure: fall back, visibly
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {str(e)[:160]}); "
                          "decoding eagerly", RuntimeWarning, stacklevel=3)
            self.use_graph = False
        return logits


def _select(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0 (as transformers, on float32 logits), else a sample of
    softmax(logits / temperature)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _check_arguments(model, input_ids, max_new_tokens, temperature, eos_token_id, streamer, generator
                     ) -> torch.Tensor | None:
    """One clear ValueError per bad argument, before any model work; the EOS ids as a tensor (None: no EOS)."""
    check_count("max_new_tokens", max_new_tokens)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype == torch.bool \
            or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        what = (f"a {input_ids.dim()}-D {input_ids.dtype} tensor" if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__)
        raise ValueError(f"input_ids must be a 2-D integer tensor [batch, prompt length], got {what}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): give at least one prompt token")
    vocab = model.get_input_embeddings().num_embeddings
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids holds {low if low < 0 else high}, outside the vocabulary [0, {vocab})")
    limit = position_limit(model.config)
    if limit is not None and max_new_tokens >= limit:
        raise ValueError(f"max_new_tokens {max_new_tokens} alone is too many: the model's max_position_embeddings "
                         f"{limit} leaves room for at most {plural(limit - 1, 'new token')} after a one-token prompt")
    if limit is not None and length + max_new_tokens > limit:
        raise ValueError(f"a prompt of {plural(length, 'token')} plus max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_position_embeddings {limit}: give at most {limit - max_new_tokens} prompt "
                         "tokens or fewer new tokens")
    if streamer is not None and batch > 1:
        raise ValueError(f"a streamer takes one row; input_ids has {batch}: stream batch 1, or leave streamer out")
    if generator is not None and generator.device.type != model.device.type:
        raise ValueError(f"the generator is on {generator.device}, the model on {model.device}: give a generator "
                         "of the model's device")
    if eos_token_id is None:
        return None
    eos = [eos_token_id] if as_count(eos_token_id) is not None else eos_token_id
    if not isinstance(eos, (list, tuple)) or not eos \
            or not all(as_count(e) is not None and 0 <= e < vocab for e in eos):
        raise ValueError(f"eos_token_id must be a token id in [0, {vocab}) or a non-empty list of them, got "
                         f"{eos_token_id!r}")
    return torch.tensor([as_count(e) for e in eos])


class _Readback:
    """New tokens on the host, one step behind the GPU, with the non-finite flag of the logits they came from: each
    copy is queued before the next step's replay and the host waits for that copy alone, so the GPU never idles
    while the host streams text or checks for EOS."""

    def __init__(self, steps: int, batch: int, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.empty(steps, batch, dtype=torch.long, pin_memory=cuda)
        self.flags = torch.empty(steps, dtype=torch.float32, pin_memory=cuda)
        self.ready = torch.cuda.Event() if cuda else None

    def queue(self, i: int, tokens: torch.Tensor, flag: torch.Tensor) -> None:
        self.host[i].copy_(tokens, non_blocking=True)
        self.flags[i].copy_(flag, non_blocking=True)
        if self.ready is not None:
            self.ready.record()

    def wait(self, i: int) -> tuple[torch.Tensor, bool]:
        """Step i's tokens, and whether every logit so far was finite."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host[i], bool(torch.isfinite(self.flags[i]))


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             eos_token_id: int | list[int] | None = None, streamer=None, cuda_graph: bool | None = None,
             compile: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `input_ids` [B, P] by up to `max_new_tokens` tokens; returns [B, P + new] ids on the model's device.

    Greedy at temperature 0: the tokens of `model.generate(..., do_sample=False, cache_implementation="static")`;
    transformers' default dynamic cache attends over fewer keys, which can round differently in the last bit and,
    through an FP4 rounding of a quantized model, rarely pick another token. Else sampled from
    softmax(logits / temperature) with `generator`. The B prompts must have the same length:
    there is no padding (and no attention mask). Generation stops when every row has produced an EOS of
    `eos_token_id` (a row that finished keeps emitting the first one) or after max_new_tokens. `streamer`
    (transformers' TextStreamer protocol, batch 1 only) gets the prompt, then each new token, then end(). With
    cuda_graph (default: on CUDA) every decode step replays one CUDA graph (DecodeSession). With compile, the
    decode step is compiled by torch.compile first: each token is faster (an 8B-shaped model on an H200: 4.4
    against 6.3 ms, docs/PERF.md), but the compilation, at the first step, costs what thousands of tokens save:
    it is for long generations. The host reads tokens back
    only for a streamer or an EOS check, one step behind the GPU, so the replays queue back to back.

    NaN or inf logits (a broken model, or float16 activations past its range) raise NonFiniteLogits, a ValueError:
    tokens drawn from them are noise. The check is queued with each step and read with the tokens (a streamer never
    gets such a token), or once at the end.
    """
    eos = _check_arguments(model, input_ids, max_new_tokens, temperature, eos_token_id, streamer, generator)
    max_new_tokens = as_count(max_new_tokens)
    device = model.device
    ids = input_ids.to(device=device, dtype=torch.long)
    batch, length = ids.shape
    session = DecodeSession(model, batch, length + max_new_tokens, cuda_graph=cuda_graph, compile=compile)
    out = torch.empty(batch, length + max_new_tokens, dtype=torch.long, device=device)
    out[:, :length] = ids
    readback = _Readback(max_new_tokens, batch, device) if streamer is not None or eos is not None else None
    if eos is not None:
        eos_device, finished = eos.to(device), torch.zeros(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(ids.cpu())
    logits, end = session.prefill(ids), length + max_new_tokens
    flag, finite = torch.zeros((), dtype=torch.float32, device=device), True  # flag: NaN once a logit was not finite
    for i in range(max_new_tokens):
        flag_non_finite(flag, logits)
        token = _select(logits, temperature, generator)
        if eos is not None:
            token = torch.where(finished, eos_device[0], token)
            finished |= torch.isin(token, eos_device)
        out[:, length + i] = token
        if readback is not None:
            readback.queue(i, token, flag)
        if i + 1 < max_new_tokens:
            logits = session.step(token)
        if readback is not None:
            tokens, finite = readback.wait(i)
            if not finite:
                break
            if streamer is not None:
                streamer.put(tokens.clone())
            if eos is not None and bool(torch.isin(tokens, eos).all()):  # finished rows emit EOS: all done
                end = length + i + 1
                break
    if streamer is not None:
        streamer.end()
    if not finite or (readback is None and not bool(torch.isfinite(flag))):
        recipe = getattr(model, "sharq_quantization", {}).get("recipe", {}).get("name")
        raise NonFiniteLogits(recipe, model.dtype)
    return out[:, :end]
