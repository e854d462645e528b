"""The suite's seeds (conftest.py): everything random in a test, the global generators included (nn.Linear's
initial weights, torch.randn without a generator, numpy, random), replays from the seed the test prints."""

import re
from pathlib import Path

pytest_plugins = ["pytester"]

DRAWS = """
import random

import numpy as np
import torch


def test_draws(rng):
    print("draws", torch.nn.Linear(3, 2).weight.sum().item(), torch.randn(()).item(), np.random.rand(),
          random.random(), torch.rand((), generator=rng).item())
"""


def _run(pytester, monkeypatch, seed: int | None) -> tuple[int, str]:
    """The printed seed and the draws of one run of DRAWS, fresh or (seed) replayed."""
    if seed is None:
        monkeypatch.delenv("SHARQ_SEED", raising=False)
    else:
        monkeypatch.setenv("SHARQ_SEED", str(seed))
    result = pytester.runpytest("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    return int(re.search(r"seed=(\d+)", out).group(1)), re.search(r"draws (.*)", out).group(1)


def test_every_draw_replays_from_the_printed_seed(pytester, monkeypatch):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(DRAWS)
    seed, draws = _run(pytester, monkeypatch, None)
    other_seed, other_draws = _run(pytester, monkeypatch, None)
    assert other_seed != seed and other_draws != draws  # a fresh seed per run
    assert _run(pytester, monkeypatch, seed) == (seed, draws)
