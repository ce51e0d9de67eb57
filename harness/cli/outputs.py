"""``python -m harness tables`` and ``python -m harness figures``: rebuild the study's tables
(:mod:`harness.analysis.tables`) and figures (:mod:`harness.analysis.figures`) from stored run results.

Both read only the run folders under ``{out_dir}/runs`` (and solve the budget from the
config); neither trains nor evaluates. A run without its results stops the command
with a message naming every missing run and file (exit status 2).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import harness.analysis.sample_metrics  # noqa: F401  (registers the metrics from stored samples)
from harness.analysis.outputs import outputs
from harness.common.manifest import record_files
from harness.common.metrics import registered, sample_metrics
from harness.plan.status import assert_results_valid
from harness.plan.study import plan_from_file


def _report(paths: list[Path], what: str) -> None:
    print(f"wrote {len(paths)} {what} file(s):")
    for path in paths:
        print(f"  {path}")


def cmd_tables(args: argparse.Namespace) -> int:
    from harness.analysis.tables import write_tables

    _, plan = plan_from_file(args.config)
    assert_results_valid(plan)  # never tabulates an invalid result (status names each)
    paths = write_tables(plan, args.out, verify=not args.no_verify)
    _record(plan, args.out, paths)
    _report(paths, "table")
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    from harness.analysis.figures import write_figures

    _, plan = plan_from_file(args.config)
    assert_results_valid(plan)  # never plots an invalid result (status names each)
    paths = write_figures(plan, args.out)
    _record(plan, args.out, paths)
    _report(paths, "figure")
    return 0


def _record(plan, out: str | None, paths: list[Path]) -> None:
    """Record the study's outputs in ``out_dir/manifest.json`` (a damaged one is rebuilt:
    :func:`harness.plan.status.invalid_outputs`); files written elsewhere (``--out``) are not."""
    if out is None:
        root = plan.out_dir.resolve()
        record_files(plan.out_dir, [Path(p).resolve().relative_to(root) for p in paths])


def cmd_robustness(args: argparse.Namespace) -> int:
    from harness.analysis.robustness import write_robustness

    _report(write_robustness(args.spec), "robustness")
    return 0


def _listing(kind: str) -> str:
    """Every declared table or figure (the outputs registry), one line each: name, label."""
    lines = [f"{'Tables' if kind == 'table' else 'Figures'} (harness/analysis/outputs.py), each with its "
             f"report caption under <out_dir>/report/{kind}s/:"]
    for out in outputs(kind):
        lines.append(f"  {out.name:<22} {out.label} ({', '.join(out.formats)})")
    return "\n".join(lines)


def _metric_listing() -> str:
    """Every registered metric (harness/common/metrics.py; the ones computed from stored
    samples come from harness/analysis/sample_metrics/), one line each."""
    stored = sample_metrics()
    lines = ["Metrics (harness/common/metrics.py; from stored samples: harness/analysis/sample_metrics/):"]
    for name, m in registered().items():
        direction = {True: "higher is better", False: "lower is better"}.get(m.higher_is_better, "no direction")
        source = ("from stored samples" + (", per item" if stored[name][1].per_item else "")) if name in stored \
            else "lm-eval, per item" if m.item is not None else "lm-eval" if m.lm_eval else "a method's"
        lines.append(f"  {name:<22} {m.label} ({direction}; {source})")
    return "\n".join(lines)


def add_commands(sub) -> None:
    tables = [o.name for o in outputs("table")]
    p = sub.add_parser(
        "tables",
        help=f"the {len(tables)} tables from stored results (CSV, Markdown, LaTeX) under "
        f"<out_dir>/tables: {', '.join(tables)}",
        description=textwrap.dedent("""\
            Rebuild every table of the study from its stored run results (nothing is trained or
            scored again).""") + "\n\n" + _listing("table") + "\n\n" + _metric_listing(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--out", default=None, help="write under this folder instead of out_dir")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip checking the budget counts against layers built on the meta device",
    )
    p.set_defaults(func=cmd_tables)

    figures = [o.name for o in outputs("figure")]
    p = sub.add_parser(
        "figures",
        help=f"the {len(figures)} figures from stored results (PNG, PDF) under <out_dir>/figures: "
        f"{', '.join(figures)}",
        description="Redraw every figure of the study from its stored run results and training "
        "logs.\n\n" + _listing("figure"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--out", default=None, help="write under this folder instead of out_dir")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser(
        "robustness",
        help="each headline comparison (finest vs coarsest G, finest G vs LoRA rank R) of "
        "several studies side by side, one study per condition (router separate or counted, "
        "tuned or shared learning rate)",
    )
    p.add_argument("--spec", default="config/robustness.yaml", metavar="FILE",
                   help="the conditions: {out, conditions: [{study, condition, config}]}")
    p.set_defaults(func=cmd_robustness)
