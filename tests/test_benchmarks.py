"""benchmarks/ checked without a GPU: refresh.sh, the script behind the README's GPU numbers (the commands it runs,
recorded by a stand-in `python` and `nvidia-smi` on PATH, and the options it gives each benchmark, which that
benchmark must declare), and the diagnostics' helpers that reach into the library (profile_step's table,
eager_diagnostics' copy without prepare launches)."""

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from sharq.backends import BACKENDS
from sharq.nn import SharQLinear

from .conftest import outlier_activations, recording_plans

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REFRESH = BENCHMARKS / "refresh.sh"


def _stand_ins(tmp_path: Path, gpu: str) -> dict:
    """PATH with a `python` that logs its arguments (one line a call) and an `nvidia-smi` naming `gpu`."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    scripts = {"python": f'echo "$@" >> {log}\necho "table of $(basename "$1")"\n',
               "nvidia-smi": f'echo "{gpu}"\n'}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_refresh_runs_each_parts_benchmarks_into_files_named_after_the_gpu(tmp_path):
    env = _stand_ins(tmp_path, "NVIDIA H200")
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(REFRESH), "prefill", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [c.split()[0] for c in calls] == [str(BENCHMARKS / "bench_decode.py")] * 3
    for b, call in zip((1, 8, 32), calls):
        assert f"--batches {b} --prompt 512" in call and call.endswith(f"--json {out}/prefill512_b{b}_h200.json")
        assert (out / f"prefill512_b{b}_h200.txt").read_text() == "table of bench_decode.py\n"
    env = _stand_ins(tmp_path / "all", "NVIDIA H100 80GB HBM3")
    done = subprocess.run(["bash", str(REFRESH), "all", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.glob("*_h100.txt"))
    assert names == sorted(["bench_gemm_h100.txt", "bench_decode_70b_h100.txt",
                            *[f"bench_decode_b{b}_h100.txt" for b in (1, 8, 32)],
                            *[f"prefill512_b{b}_h100.txt" for b in (1, 8, 32)]])


def test_refresh_refuses_an_unknown_part(tmp_path):
    done = subprocess.run(["bash", str(REFRESH), "gemms", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown part 'gemms'" in done.stderr


@pytest.mark.parametrize("script", ["bench_gemm.py", "bench_decode.py"])
def test_every_option_refresh_gives_a_benchmark_is_one_it_declares(script):
    text = REFRESH.read_text().replace("\\\n", " ")
    given = {"--json"}  # refresh's run() adds it to every call
    for line in re.findall(rf"run \S+ {re.escape(script)}([^\n;]*)", text):
        given |= set(re.findall(r"--[a-z][a-z0-9-]*", line))
    declared = set(re.findall(r'add_argument\("(--[a-z][a-z0-9-]*)"', (BENCHMARKS / script).read_text()))
    assert len(given) > 2 and given <= declared, given - declared


def test_profile_step_ranks_python_functions_by_own_time_a_step(monkeypatch):
    """profile_step.py --python's table: the function that spent the most own time first, its calls a step."""
    import cProfile

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from profile_step import python_functions

    def busy():
        return sum(i * i for i in range(20000))

    def idle():
        return 0

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(4):  # four "steps", each calling busy once and idle three times
        busy()
        idle(), idle(), idle()
    profiler.disable()
    rows = {r["function"].split(" (")[0]: r for r in python_functions(profiler, steps=4, top=50)}
    assert rows["busy"]["calls"] == 1 and rows["idle"]["calls"] == 3
    assert rows["busy"]["cumulative_us"] > rows["idle"]["cumulative_us"]
    ranked = python_functions(profiler, steps=4, top=3)
    assert len(ranked) == 3 and ranked[0]["own_us"] >= ranked[1]["own_us"] >= ranked[2]["own_us"] > 0


def test_without_prepare_replays_each_plans_first_activation(rng, monkeypatch):
    """eager_diagnostics.py --without-prepare's copy: once a plan has run, its prepare launches nothing and its
    matmul takes the first call's activation (the upper bound of one launch a layer; outputs knowingly stale)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from eager_diagnostics import without_prepare

    calls = []
    monkeypatch.setitem(BACKENDS, "planned", recording_plans(calls))
    model = torch.nn.Sequential(SharQLinear.from_linear(torch.nn.Linear(64, 32), "sharq", backend="planned"))
    x, other = outlier_activations(rng, 3, 64), outlier_activations(rng, 3, 64)
    with torch.no_grad():
        first = model(x)
        assert without_prepare(model) == 1 and calls == [("prepare", 64), ("matmul", 32)]
        calls.clear()
        assert torch.equal(model(x), first) and torch.equal(model(other), first)  # x's activation, replayed
        assert calls == [("prepare", 64), ("matmul", 32), ("matmul", 32)]


def test_without_prepare_drops_folded_launches_so_no_group_prepares(rng, monkeypatch):
    """With folded launches (a layer's and a q/k/v or gate/up group's, as the packed backend's at decode sizes),
    the --without-prepare copy drops them: once warm a step launches only GEMMs (the groups multiply their members'
    replayed activation), no fold that prepares inside it."""
    import sharq

    from .test_models import tiny

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from eager_diagnostics import without_prepare

    calls = []
    monkeypatch.setitem(BACKENDS, "planned", recording_plans(calls, groups=True, folds=True))
    model = sharq.quantize_model(tiny("llama"), "sharq", backend="planned")
    ids = torch.randint(0, 96, (1, 8), generator=rng)
    with torch.no_grad():
        model(ids)
        assert {c[0] for c in calls} == {"fold", "group-fold"}
        assert without_prepare(model) == 9 * model.config.num_hidden_layers  # 7 layers, the 2 groups
        calls.clear()
        model(ids)  # each member's first call makes its plan's first activation, replayed from then on
        calls.clear()
        model(ids)
    assert {c[0] for c in calls} == {"group", "matmul"}


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_every_name_a_benchmark_imports_from_sharq_exists(script):
    """The benchmarks need a GPU, so CI never runs most of their paths; a name they import from sharq that is gone
    (bench_model --model imported sharq.hf.load_model, which never existed) fails here instead of on the GPU."""
    import ast
    import importlib

    tree = ast.parse((BENCHMARKS / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sharq":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{script}: from {node.module} import {alias.name}"
