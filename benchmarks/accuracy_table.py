"""Merge `sharq eval --json` files of one setup (e.g. one recipe per run) and print the results table.

    python benchmarks/accuracy_table.py docs/results/smollm2_zeroshot_limit200_h200/*.json
    python benchmarks/accuracy_table.py --tasks arc_challenge,lambada,piqa,winogrande RUN.json ...  # common tasks
"""

import argparse
import json

from sharq.eval.run import format_results, merge_results
from sharq.recipes import list_recipes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+")
    p.add_argument("--tasks", default=None, help="comma-separated: compare on these zero-shot tasks only (runs of "
                   "more tasks are cut down to them, averages recomputed)")
    a = p.parse_args(argv)
    runs = [json.load(open(path, encoding="utf-8")) for path in a.paths]
    merged = merge_results(runs, a.tasks.split(",") if a.tasks else None)
    order = list_recipes()
    merged["results"].sort(key=lambda r: order.index(r["recipe"]) if r["recipe"] in order else len(order))
    print(format_results(merged))


if __name__ == "__main__":
    main()
