"""Merge `sharq eval --json` files of one setup (e.g. one recipe per run) and print the results table.

    python benchmarks/accuracy_table.py docs/results/smollm2_zeroshot_limit200_h200/*.json
"""

import json
import sys

from sharq.eval.run import format_results, merge_results

ORDER = ["bf16", "fp8", "nvfp4", "mxfp4", "hif4", "sharq", "sharq-hif4", "sharq-mxfp4", "sparse-only", "dense-dense",
         "outlier-channels"]


def main(paths: list[str]) -> None:
    runs = [json.load(open(p, encoding="utf-8")) for p in paths]
    merged = merge_results(runs)
    merged["results"].sort(key=lambda r: ORDER.index(r["recipe"]) if r["recipe"] in ORDER else len(ORDER))
    print(format_results(merged))


if __name__ == "__main__":
    main(sys.argv[1:])
