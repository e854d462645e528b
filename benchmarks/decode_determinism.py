"""Whether decoding repeats itself: the logits of a prefill and a few decode steps of an 8B-shaped model, run
several times eagerly (each in a fresh DecodeSession) and once replayed from a CUDA graph, compared bit for bit
with the first run (docs/PERF.md). Attention and the SDPA backends can be switched to find where a difference
comes from.

    python benchmarks/decode_determinism.py [--variant sharq] [--layers 32] [--batch 32] [--prompt 512]
        [--attention sdpa|eager] [--no-cudnn-sdpa] [--runs 3]
"""

from __future__ import annotations

import argparse

import torch

import sharq
from bench_model import llama_8b_shaped  # benchmarks/, beside this script
from sharq.generate import DecodeSession

STEPS = 4


@torch.no_grad()
def decode(model, ids: torch.Tensor, cuda_graph: bool) -> list[torch.Tensor]:
    """The prefill's last logits, then those of STEPS greedy decode steps, as fp32 copies."""
    session = DecodeSession(model, ids.shape[0], ids.shape[1] + STEPS + 1, cuda_graph=cuda_graph)
    out = [session.prefill(ids).float().clone()]
    for _ in range(STEPS):
        out.append(session.step(out[-1].argmax(-1)).float().clone())
    torch.cuda.synchronize()
    return out


def differences(a: list[torch.Tensor], b: list[torch.Tensor]) -> str:
    return " ".join(f"{(x - y).abs().max().item():.1e}" for x, y in zip(a, b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="sharq", help="bf16, or a recipe to quantize with (packed backend)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--no-cudnn-sdpa", action="store_true", help="torch.backends.cuda.enable_cudnn_sdp(False)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(0)
    model = llama_8b_shaped(args.layers)
    model.set_attn_implementation(args.attention)
    if args.variant != "bf16":
        sharq.quantize_model(model, args.variant, backend="packed", device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt),
                        generator=torch.Generator().manual_seed(args.batch)).cuda()
    first = decode(model, ids, cuda_graph=False)
    print(f"{args.variant}, {args.layers} layers, batch {args.batch}, prompt {args.prompt}, attention "
          f"{args.attention}{', no cuDNN SDPA' if args.no_cudnn_sdpa else ''}; max |difference| from eager run 1, "
          f"prefill then {STEPS} steps:")
    same = True
    for i in range(2, args.runs + 1):
        run = decode(model, ids, cuda_graph=False)
        same &= all(torch.equal(x, y) for x, y in zip(first, run))
        print(f"  eager run {i}: {differences(first, run)}")
    graph = decode(model, ids, cuda_graph=True)
    same &= all(torch.equal(x, y) for x, y in zip(first, graph))
    print(f"  graph replay: {differences(first, graph)}")
    print("all equal" if same else "NOT all equal")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
