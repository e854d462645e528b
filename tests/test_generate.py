import math
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import sharq  # noqa: E402
from sharq.generate import DecodeSession  # noqa: E402

from .test_models import tiny  # noqa: E402

FAMILIES = ["llama", "gemma3_text", "qwen3_moe"]  # dense, sliding-window (window 16) + global, MoE
VOCAB, PROMPT, NEW = 96, 10, 8  # PROMPT + NEW > 16: gemma3's sliding window comes into play


def model_for(family: str, quantized: bool, device: str = "cpu", backend: str = "reference"):
    model = tiny(family).to(device)
    model.generation_config.eos_token_id = None  # transformers' generate would stop at the config's EOS (2)
    return sharq.quantize_model(model, "sharq", backend=backend) if quantized else model


def hf_generate(model, ids: torch.Tensor, n: int, eos: int | list[int] | None = None, static: bool = False
                ) -> torch.Tensor:
    """transformers' greedy generate (with its static cache if asked). The attention mask is explicit: inferred,
    it would mask every prompt token that equals the pad id."""
    pad = (eos if isinstance(eos, int) else eos[0]) if eos is not None else 0
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=pad, **({"cache_implementation": "static"} if static else {}))


def prompts(rng: torch.Generator, batch: int = 2, length: int = PROMPT) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=rng)


@pytest.mark.parametrize("quantized", [False, True], ids=["unquantized", "sharq"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family, quantized, rng):
    """Quantized, against transformers' static cache: its default dynamic cache attends over exactly the tokens
    seen, a static cache over the whole cache under a mask, so attention rounds differently in the last bit, and
    an FP4 rounding can turn that into another token (1 case in 2400 in a sweep of this test)."""
    model, ids = model_for(family, quantized), prompts(rng)
    for batch in (ids, ids[1:]):  # a per-tensor activation scale couples the rows: batch 1 is its own case
        assert torch.equal(sharq.generate(model, batch, NEW), hf_generate(model, batch, NEW, static=quantized))


def test_compiled_decode_step_gives_the_same_tokens(rng):
    """generate(compile=True): the decode step through torch.compile (fullgraph) on a quantized model."""
    torch._dynamo.reset()
    model, ids = model_for("llama", True), prompts(rng)
    assert torch.equal(sharq.generate(model, ids, 4, compile=True), sharq.generate(model, ids, 4))


def test_transformers_static_cache_generate_with_a_compiled_forward(rng):
    """Hugging Face's own fast path on a quantized model: generate with the static cache through
    torch.compile(model.forward, fullgraph=True), which raises at any graph break; the tokens are the eager ones."""
    torch._dynamo.reset()
    model, ids = model_for("llama", True), prompts(rng)
    want = hf_generate(model, ids, 4, static=True)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    try:
        assert torch.equal(hf_generate(model, ids, 4, static=True), want)
    finally:
        del model.forward
        torch._dynamo.reset()


def test_eos_stops_every_row_and_finished_rows_keep_eos(rng):
    model, ids = model_for("llama", False), prompts(rng)
    free = sharq.generate(model, ids, NEW)[:, PROMPT:]
    eos = [int(free[0, 2]), int(free[1, 4])]  # greedy hits them: row 0 by step 2, row 1 by step 4
    out = sharq.generate(model, ids, NEW, eos_token_id=eos)
    assert torch.equal(out, hf_generate(model, ids, NEW, eos))
    assert out.shape[1] <= PROMPT + 5
    for row in out[:, PROMPT:]:
        first = next(i for i, t in enumerate(row.tolist()) if t in eos)
        assert (row[first + 1:] == eos[0]).all()
    one = sharq.generate(model, ids[:1], NEW, eos_token_id=eos[0])
    assert torch.equal(one, hf_generate(model, ids[:1], NEW, eos[0])) and one[0, -1] == eos[0]


def test_sampling_is_reproducible_and_its_cold_limit_is_greedy(rng):
    model, ids = model_for("llama", True), prompts(rng)
    seed = int(torch.randint(0, 2**31, (), generator=rng))

    def sample(temperature: float) -> torch.Tensor:
        return sharq.generate(model, ids, NEW, temperature=temperature, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0.8), sample(0.8))
    greedy = sharq.generate(model, ids, NEW)
    assert torch.equal(sample(1e-6), greedy)  # softmax(logits / 1e-6) is one-hot unless two logits tie within 1e-4
    assert not torch.equal(sample(1e3), greedy)  # near uniform over 96 tokens: 16 greedy draws in a row ~ 1e-32


class Recorder:
    """transformers' streamer protocol: put(tensor), end()."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ends += 1


def test_streamer_gets_the_prompt_then_each_token(rng):
    model, ids = model_for("llama", False), prompts(rng, batch=1)
    streamer = Recorder()
    out = sharq.generate(model, ids, NEW, streamer=streamer)
    assert torch.equal(streamer.puts[0], ids) and streamer.ends == 1
    assert [t.tolist() for t in streamer.puts[1:]] == [[t] for t in out[0, PROMPT:].tolist()]
    eos = int(out[0, PROMPT + 3])
    streamer = Recorder()
    stopped = sharq.generate(model, ids, NEW, streamer=streamer, eos_token_id=eos)
    assert torch.equal(torch.cat(streamer.puts[1:]), stopped[0, PROMPT:]) and stopped[0, -1] == eos
    assert streamer.ends == 1


def break_from(model, forward: int):
    """From the `forward`-th forward on (the prefill is the first), one logit of each row is NaN."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) >= forward:
            output.logits[..., 3] = math.nan
    return model.register_forward_hook(hook)


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("broken_at", [1, 4])
def test_non_finite_logits_raise_and_no_token_of_theirs_is_streamed(broken_at, streamed, rng):
    """Tokens drawn from NaN logits are noise (greedy picks id 0 on CUDA): generate raised nothing and returned them.
    A streamer (read back each step) gets only the tokens of finite logits; without one the check is read at the
    end."""
    model, ids = model_for("llama", False), prompts(rng, batch=1)
    expected = sharq.generate(model, ids, NEW)
    handle = break_from(model, broken_at)
    streamer = Recorder() if streamed else None
    with pytest.raises(sharq.NonFiniteLogits, match="^the model's logits are not finite .NaN or inf.: the model is "
                                                    "broken"):
        sharq.generate(model, ids, NEW, streamer=streamer)
    handle.remove()
    if streamed:
        assert streamer.ends == 1 and torch.equal(streamer.puts[0], ids)
        good = streamer.puts[1:]  # the tokens of forwards 1 .. broken_at - 1
        assert len(good) == broken_at - 1
        assert [t.tolist() for t in good] == [[t] for t in expected[0, PROMPT:PROMPT + broken_at - 1].tolist()]
    quantized = model_for("llama", True)
    break_from(quantized, 2)
    with pytest.raises(sharq.NonFiniteLogits, match="^recipe 'sharq': the model's logits are not finite"):
        sharq.generate(quantized, ids, NEW, eos_token_id=VOCAB - 1)


@pytest.mark.parametrize("change,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(input_ids=torch.tensor([1, 2, 3])), "must be a 2-D integer tensor [batch, prompt length], got a 1-D "
                                              "torch.int64 tensor"),
    (dict(input_ids=torch.ones(1, 3)), "input_ids must be a 2-D integer tensor"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.bool)), "input_ids must be a 2-D integer tensor"),
    (dict(input_ids=[[1, 2]]), "input_ids must be a 2-D integer tensor [batch, prompt length], got list"),
    (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), "input_ids is empty"),
    (dict(input_ids=torch.tensor([[1, VOCAB]])), f"input_ids holds {VOCAB}, outside the vocabulary [0, {VOCAB})"),
    (dict(input_ids=torch.tensor([[-1, 2]])), "input_ids holds -1, outside the vocabulary"),
    (dict(input_ids=torch.ones(1, 60, dtype=torch.long)),
     "a prompt of 60 tokens plus max_new_tokens 8 exceeds the model's max_position_embeddings 64"),
    (dict(max_new_tokens=64), ("max_new_tokens 64 alone is too many: the model's max_position_embeddings 64 leaves "
                               "room for at most 63 new tokens after a one-token prompt")),
    (dict(eos_token_id=VOCAB), "eos_token_id must be a token id in [0, 96)"),
    (dict(eos_token_id=[]), "eos_token_id must be a token id in [0, 96) or a non-empty list"),
    (dict(eos_token_id=[1, "2"]), "eos_token_id must be a token id"),
    (dict(eos_token_id=2.0), "eos_token_id must be a token id"),
    (dict(input_ids=torch.ones(2, 3, dtype=torch.long), streamer=Recorder()), "a streamer takes one row"),
    (dict(cuda_graph=True), "cuda_graph=True needs a model on a CUDA device"),
])
def test_bad_arguments_raise_a_clear_value_error(change, message):
    model = model_for("llama", False)
    kwargs = dict(input_ids=torch.ones(1, 3, dtype=torch.long), max_new_tokens=NEW) | change
    with pytest.raises(ValueError) as e:
        sharq.generate(model, **kwargs)
    assert message in str(e.value)


def test_numpy_integers_count_as_integers(rng):
    """max_new_tokens and eos_token_id from numpy (a config, an array's element) are the ints they hold."""
    model, ids = model_for("llama", False), prompts(rng, batch=1)
    out = sharq.generate(model, ids, NEW)
    eos = int(out[0, PROMPT + 2])
    assert torch.equal(sharq.generate(model, ids, np.int64(NEW)), out)
    stopped = sharq.generate(model, ids, np.int32(NEW), eos_token_id=np.int64(eos))
    assert torch.equal(stopped, sharq.generate(model, ids, NEW, eos_token_id=eos))
    assert torch.equal(sharq.generate(model, ids, NEW, eos_token_id=[np.int16(eos)]), stopped)


def test_decode_session_steps_match_a_full_forward_and_reset_replays_them(rng):
    model, ids = model_for("gemma3_text", False), prompts(rng)
    session = DecodeSession(model, 2, PROMPT + NEW)
    with pytest.raises(RuntimeError, match="prefill first"):
        session.step(ids[:, 0])

    def run() -> list[torch.Tensor]:
        logits, seen = [session.prefill(ids).clone()], ids
        for _ in range(NEW):
            token = logits[-1].argmax(-1)
            seen = torch.cat([seen, token[:, None]], 1)
            logits.append(session.step(token).clone())
            with torch.no_grad():
                full = model(seen).logits[:, -1]
            torch.testing.assert_close(logits[-1], full, rtol=1e-5, atol=1e-5)
        return logits

    first = run()
    with pytest.raises(RuntimeError, match="at most max_len 18 tokens fit"):
        session.step(ids[:, 0])
    assert all(torch.equal(a, b) for a, b in zip(first, run()))  # prefill empties the cache in place


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("quantized", [False, True], ids=["unquantized", "sharq-triton"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_replay_gives_the_eager_tokens(family, quantized, rng):
    model = model_for(family, quantized, "cuda", backend="triton")
    ids = prompts(rng).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphed = sharq.generate(model, ids, NEW)
        sampled = sharq.generate(model, ids, NEW, temperature=0.7,
                                 generator=torch.Generator("cuda").manual_seed(1))
    fallbacks = [str(w.message) for w in caught if "CUDA graph capture" in str(w.message)]
    assert family == "qwen3_moe" or not fallbacks, fallbacks  # a MoE dispatch may be data-dependent: eager then
    assert torch.equal(graphed, sharq.generate(model, ids, NEW, cuda_graph=False))
    assert torch.equal(sampled, sharq.generate(model, ids, NEW, cuda_graph=False, temperature=0.7,
                                               generator=torch.Generator("cuda").manual_seed(1)))
    with pytest.raises(ValueError, match="the generator is on cpu, the model on cuda"):
        sharq.generate(model, ids, NEW, temperature=0.7, generator=torch.Generator())


@cuda
def test_a_failed_capture_falls_back_and_leaves_the_device_random_generator_usable(rng):
    model, ids = model_for("llama", False, "cuda"), prompts(rng).cuda()
    session = DecodeSession(model, 2, PROMPT + NEW)
    forward, calls = session._decode, []

    def syncing_forward():  # the second call is the capture: a host sync there invalidates it
        calls.append(1)
        logits = forward()
        if len(calls) == 2:
            logits.sum().item()
        return logits

    session._decode = syncing_forward
    logits = session.prefill(ids)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture of the decode step failed"):
        session.step(logits.argmax(-1))
    assert session.graph is None and not session.use_graph
    torch.empty(64, device="cuda").uniform_()  # raised "Offset increment outside graph capture" before the fix
    torch.cuda.synchronize()
    assert torch.equal(sharq.generate(model, ids, NEW), sharq.generate(model, ids, NEW, cuda_graph=False))
