import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sharq
from sharq.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sharq {sharq.__version__}"
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
def test_wheel_builds_with_every_module_and_the_console_script(tmp_path):
    pytest.importorskip("build")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(tmp_path.glob("sharq-*.whl"))
    assert wheel.name.startswith(f"sharq-{sharq.__version__}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "sharq").rglob("*.py")}
    assert modules <= set(names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "sharq = sharq.cli:main" in meta


def fresh(code: str) -> str:
    """The stdout of `python -c CODE` in a fresh process (the same interpreter and source tree as the tests)."""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    return child.stdout


HEAVY = "print(sorted(m for m in ('torch', 'transformers', 'transformers.quantizers', 'torchao') if m in sys.modules))"


def test_import_sharq_loads_nothing_heavy():
    """`import sharq` imports its names on first use: neither torch nor transformers' quantizers (which import
    torchao, 2.3 s of the 3.6 s `import sharq` took) until a name needs them. The command line runs inside the
    package, so its --help and argument errors pay for nothing either."""
    assert fresh(f"import sys, sharq\n{HEAVY}").strip() == "[]"
    assert fresh(f"import sys, sharq\nsharq.get_recipe('sharq')\n{HEAVY}").strip() == "['torch']"


def test_every_public_name_is_the_defining_modules():
    """sharq.NAME is the object its module defines, however the modules were imported first: importing the
    submodule sharq.generate leaves sharq.generate the function (the import system binds submodules on their
    package), and sharq.MODULE still reaches a submodule nobody imported."""
    code = ("import sharq\nfrom sharq.generate import DecodeSession\nimport sharq.generate as g\n"
            "print(type(sharq.generate).__name__, type(g).__name__, sharq.generate.__module__)\n"
            "print(type(sharq.models).__name__, sharq.quantize_model is sharq.models.quantize_model)")
    assert fresh(code).split() == ["function", "function", "sharq.generate", "module", "True"]
    for name in sharq.__all__:
        value = getattr(sharq, name)
        assert getattr(sys.modules[value.__module__], name) is value
    assert set(sharq.__all__) <= set(dir(sharq))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sharq.nope
