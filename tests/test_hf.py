"""The GGUF dequantization cache under concurrency and interruption, with a fake builder (the real one takes ~30 s):
one build per entry across processes, no half-written entry, no temp dir outliving its build."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharq import hf

# A process that fetches the cache entry of argv[1] with a fake builder: it logs each build to argv[2], waits until
# argv[3] processes have started (so that they really overlap), then sleeps argv[4] seconds.
CHILD = r"""
import os, sys, time
from pathlib import Path
from sharq import hf

gguf, log, peers, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
(log.parent / f"started-{os.getpid()}").touch()

def slow_build(path, out):
    with open(log, "a") as f:
        f.write("build\n")
    (out / "config.json").write_text("{}")
    deadline = time.monotonic() + 60
    while len(list(log.parent.glob("started-*"))) < peers and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(seconds)

hf._dequantize_gguf = slow_build
print(hf.dequantized_gguf(gguf))
"""


@pytest.fixture
def gguf(tmp_path, monkeypatch) -> Path:
    """A (fake) GGUF file, with the cache under tmp_path."""
    monkeypatch.setenv("SHARQ_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def child(gguf: Path, peers: int, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(gguf), str(gguf.parent / "builds.log"), str(peers),
                             str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def temp_dirs(entry: Path) -> list[Path]:
    return list(entry.parent.glob(entry.name + ".tmp*"))


def fake_build(path: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")


def test_concurrent_first_runs_build_once(gguf):
    procs = [child(gguf, peers=2, seconds=0.5) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    entry = hf._gguf_cache(gguf)
    assert {out.strip() for out, _ in outputs} == {str(entry)}
    assert (gguf.parent / "builds.log").read_text() == "build\n"
    assert [p.name for p in entry.parent.iterdir() if not p.name.endswith(".lock")] == [entry.name]
    assert (entry / "config.json").is_file()


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_build_leaves_nothing_and_the_next_one_succeeds(gguf, monkeypatch, error):
    def failing_build(path, out):
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"half")
        raise error

    monkeypatch.setattr(hf, "_dequantize_gguf", failing_build)
    with pytest.raises(type(error)):
        hf.dequantized_gguf(gguf)
    entry = hf._gguf_cache(gguf)
    assert not entry.exists() and temp_dirs(entry) == []
    monkeypatch.setattr(hf, "_dequantize_gguf", fake_build)
    assert (hf.dequantized_gguf(gguf) / "config.json").is_file()


def test_orphan_temp_dirs_are_removed_by_the_next_build(gguf, monkeypatch):
    entry = hf._gguf_cache(gguf)
    entry.parent.mkdir(parents=True)
    for orphan in (entry.name + ".tmp-k1ll3d", entry.name + ".tmp"):  # as a SIGKILLed run leaves them
        (entry.parent / orphan).mkdir()
        (entry.parent / orphan / "model.safetensors").write_bytes(b"500 MB, once")
    other = entry.parent / "another-model-0123456789ab.tmp-alive"
    other.mkdir()
    monkeypatch.setattr(hf, "_dequantize_gguf", fake_build)
    assert hf.dequantized_gguf(gguf) == entry and entry.is_dir()
    assert temp_dirs(entry) == [] and other.is_dir()  # another entry's temp dir is not this build's business


def test_a_killed_build_is_cleaned_up_by_the_next_run(gguf, monkeypatch):
    proc = child(gguf, peers=1, seconds=600)
    entry = hf._gguf_cache(gguf)
    deadline = time.monotonic() + 60
    while not any((t / "config.json").exists() for t in temp_dirs(entry)) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no finally clause runs
    proc.communicate(timeout=30)
    assert len(temp_dirs(entry)) == 1 and not entry.exists()
    monkeypatch.setattr(hf, "_dequantize_gguf", fake_build)
    assert hf.dequantized_gguf(gguf) == entry and (entry / "config.json").is_file()
    assert temp_dirs(entry) == []


def test_a_ready_entry_is_reused_without_building(gguf, monkeypatch):
    monkeypatch.setattr(hf, "_dequantize_gguf", fake_build)
    entry = hf.dequantized_gguf(gguf)

    def no_build(path, out):
        pytest.fail("the cache entry was built twice")

    monkeypatch.setattr(hf, "_dequantize_gguf", no_build)
    assert hf.dequantized_gguf(gguf) == entry


def test_copies_of_one_gguf_share_one_entry(gguf, tmp_path, monkeypatch):
    """Each virtual environment holds its own copy of the default model's GGUF file (they differ in path, and may
    in name and mtime): the entry is named by the content, so one dequantized copy (~517 MB) serves them all."""
    copy = tmp_path / "other-venv" / "site-packages" / "renamed.gguf"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(gguf.read_bytes())
    built = []
    monkeypatch.setattr(hf, "_dequantize_gguf", lambda path, out: built.append(path) or fake_build(path, out))
    assert hf.dequantized_gguf(gguf) == hf.dequantized_gguf(copy) == hf._gguf_cache(copy)
    assert built == [gguf]


def test_a_changed_gguf_gets_another_entry(gguf):
    """Other bytes of the same size, with the mtime set back: another entry, even right after the first write."""
    entry = hf._gguf_cache(gguf)
    stat = gguf.stat()
    gguf.write_bytes(b"GGUG")
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (gguf.stat().st_size, gguf.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert hf._gguf_cache(gguf) != entry
    gguf.write_bytes(b"GGUF")
    assert hf._gguf_cache(gguf) == entry


def test_the_content_hash_is_memoized_per_file_version(gguf, monkeypatch):
    """A settled file is read once; a changed one (its ctime moves on any write), or an unreadable memo, is hashed
    again."""
    monkeypatch.setattr(hf, "SETTLE_NS", 0)
    entry = hf._gguf_cache(gguf)
    real = hf._sha256_file
    monkeypatch.setattr(hf, "_sha256_file", lambda path: pytest.fail("a settled file was hashed twice"))
    assert hf._gguf_cache(gguf) == entry
    monkeypatch.setattr(hf, "_sha256_file", real)
    for memo in (hf.cache_dir() / "sha256").iterdir():
        memo.write_text("{ half a memo")
    assert hf._gguf_cache(gguf) == entry
    stat = gguf.stat()
    time.sleep(0.1)  # a tick of the filesystem clock: what SETTLE_NS (0 here) waits for
    gguf.write_bytes(b"GGUG")
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hf._gguf_cache(gguf) != entry
    assert [p.suffix for p in (hf.cache_dir() / "sha256").iterdir()] == [".json"]  # one memo per path, no temp


def test_a_read_only_cache_is_read_without_its_memo(gguf, monkeypatch):
    """A pre-built cache mounted read-only (a container image, a shared cluster cache): the hash that finds its
    entry is computed and not memoized (writing the memo raised: Read-only file system)."""
    monkeypatch.setattr(hf, "SETTLE_NS", 0)
    entry = hf._gguf_cache(gguf)
    for memo in (hf.cache_dir() / "sha256").iterdir():
        memo.unlink()

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(hf.tempfile, "mkstemp", read_only)
    assert hf._gguf_cache(gguf) == entry
    assert not list((hf.cache_dir() / "sha256").iterdir())


def test_the_cache_dir_expands_a_home_tilde(monkeypatch):
    monkeypatch.setenv("SHARQ_CACHE", "~/sharq-cache")
    assert hf.cache_dir() == Path.home() / "sharq-cache"


def test_a_file_written_within_the_settle_time_is_never_memoized(gguf):
    hf._gguf_cache(gguf)
    assert not (hf.cache_dir() / "sha256").exists()


@pytest.mark.parametrize("content", [b"not a gguf file at all", b"GGUF\x03\x00\x00\x00" + bytes(range(256)), b"GGUF"])
def test_a_corrupt_gguf_is_a_value_error_naming_it_and_leaves_no_cache(gguf, content):
    pytest.importorskip("transformers")
    gguf.write_bytes(content)
    with pytest.raises(ValueError, match=f"cannot read {gguf} as a GGUF model: "):
        hf.load_pretrained(str(gguf))
    entry = hf._gguf_cache(gguf)
    assert not entry.exists() and temp_dirs(entry) == []


@pytest.mark.parametrize("spec,error,message", [
    ("", ValueError, "the model path is empty"),
    ("/no/such/model", FileNotFoundError, "does not exist"),
    ("{tmp}", FileNotFoundError, "a directory without config.json"),
    ("{tmp}/notes.txt", ValueError, "is neither a directory nor a .gguf file"),
])
def test_resolve_model_refuses_what_is_no_model(spec, error, message, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(error, match=message):
        hf.resolve_model(spec.format(tmp=tmp_path))


def test_a_damaged_cache_entry_says_to_delete_it(gguf, monkeypatch):
    """An entry appears complete (by a rename), so one that does not load was damaged later (a full disk, a hand
    edit): the error names the entry and says to delete it, instead of transformers' error about a model
    directory the user never made."""
    pytest.importorskip("transformers")
    monkeypatch.setattr(hf, "_dequantize_gguf", fake_build)  # an entry with an empty config and no tokenizer
    entry = hf.dequantized_gguf(gguf)
    with pytest.raises(RuntimeError, match=f"the cached model {entry} cannot be read .*delete that directory"):
        hf.load_pretrained(str(gguf))
    mine = shutil.copytree(entry, gguf.parent / "mine")
    with pytest.raises(ValueError, match="holds no tokenizer"):  # a directory of the user's: the plain error
        hf.load_pretrained(str(mine))
