"""`neuqi report RESULTS... --out DIR`: result JSON files → markdown table + perplexity-vs-bits plot."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tabulate and plot result JSON files",
        description="Turn result JSON files (from `neuqi eval --out` or the benchmark scripts; schema in "
        "neuqi.report) into DIR/report.md and DIR/ppl_vs_bpw.png.",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="result JSON files or directories of them")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    p.add_argument("--title", default="neuqi results", help="report title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..eval.report import load_results, write_report

    results = load_results(args.results)
    paths = write_report(results, args.out, title=args.title)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {paths['markdown']}" + (f" and {paths['plot']}" if paths["plot"] else " (nothing to plot)"))
    return 0
