"""Shared fixtures. Without CUDA the Triton kernels run in Triton's interpreter: Triton and sharq.kernels read
TRITON_INTERPRET when they are imported, so it is set here, in the first conftest pytest loads, before any test
module (of any folder: tests/backends imports the kernels' test helpers) imports them."""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """Every test's seed: fresh per test, or SHARQ_SEED to replay one; printed, so a failure shows it. All of a
    test's randomness derives from it: the `rng` fixture's generator, and the global torch, numpy and random
    generators, which nn.Linear and transformers models draw their initial weights from (and torch.randn without a
    generator). The global ones start from seed + 1, so they do not repeat the `rng` stream."""
    seed = int(os.environ.get("SHARQ_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\n[{request.node.name}] seed={seed} (replay: SHARQ_SEED={seed})")
    torch.manual_seed(seed + 1)
    np.random.seed(seed + 1)
    random.seed(seed + 1)
    return seed


@pytest.fixture
def rng(seed) -> torch.Generator:
    """A generator on the test's seed."""
    return torch.Generator().manual_seed(seed)


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs a Hopper GPU (the wgmma kernel is sm_90a)")


def outlier_activations(g: torch.Generator, m: int, k: int, frac: float = 1 / 64) -> torch.Tensor:
    """LLM-like activations: Gaussian with a few channels 10-60x larger."""
    x = torch.randn(m, k, generator=g)
    ch = torch.randperm(k, generator=g)[: max(1, int(k * frac))]
    x[:, ch] *= 10 + 50 * torch.rand(len(ch), generator=g)
    return x


def recording_plans(calls: list, groups: bool = False, folds: bool = False):
    """The reference backend given eager plans (with `groups`, group plans too) that record each launch in
    `calls` as ("prepare", K), ("matmul", N) or ("group", (N, ...)): what the packed backend has on CUDA. With
    `folds`, a layer that prepares its own input and a group plan also get a folded launch (`forward`), recorded as
    ("fold", N) and ("group-fold", (N, ...)), which computes what prepare + matmul compute."""
    import dataclasses

    from sharq.backends import BACKENDS, EagerPlan, GroupPlan

    ref = BACKENDS["reference"]

    def eager_plan(qweight, bias, recipe, lead, x_dtype, out_dtype, layout=None, own_input=False):
        def prepare(x):
            calls.append(("prepare", x.shape[-1]))
            return ref.prepare(x.reshape(-1, x.shape[-1]), recipe, None, None)

        def matmul(act):
            calls.append(("matmul", qweight.out_features))
            return ref.matmul(act, qweight, bias, out_dtype).reshape(*lead, -1)

        def forward(x):
            calls.append(("fold", qweight.out_features))
            act = ref.prepare(x.reshape(-1, x.shape[-1]), recipe, None, None)
            return ref.matmul(act, qweight, bias, out_dtype).reshape(*lead, -1)
        return EagerPlan(prepare, matmul, forward if folds and own_input else None)

    def group_plan(qweights, biases, recipe, lead, out_dtype, layouts, x_dtype=None):
        def run(act):
            calls.append(("group", tuple(w.out_features for w in qweights)))
            return [ref.matmul(act, w, b, out_dtype).reshape(*lead, -1) for w, b in zip(qweights, biases)]

        def forward(x):
            calls.append(("group-fold", tuple(w.out_features for w in qweights)))
            act = ref.prepare(x.reshape(-1, x.shape[-1]), recipe, None, None)
            return [ref.matmul(act, w, b, out_dtype).reshape(*lead, -1) for w, b in zip(qweights, biases)]
        return GroupPlan(run, forward=forward if folds else None)

    return dataclasses.replace(ref, eager_plan=eager_plan, group_plan=group_plan if groups else ref.group_plan)
