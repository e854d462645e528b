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
