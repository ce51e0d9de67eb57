"""The study's tables and figures, declared once: name, file kinds, caption, and the builder
bound to it where the builder is defined.

Everything that lists outputs reads this table: the Snakefile's ``tables`` and ``figures``
rules (:func:`snakemake_outputs`), the writers (:func:`harness.analysis.tables.write_tables`,
:func:`harness.analysis.figures.write_figures`: each builder's result in every file kind,
plus a report caption ``{out_dir}/report/<kind>s/<name>.rst``), the README's "What comes out
where" list (a test holds them equal) and the help of ``python -m harness tables`` /
``figures``. A new table or figure is one entry here and one builder
function decorated with :func:`table_builder` / :func:`figure_builder` in
:mod:`harness.analysis.tables` / :mod:`harness.analysis.figures`.

A table's builder takes the study's :class:`~harness.analysis.results.StudyResults` and
returns ``{file kind: text}``; a figure's builder takes them (read with the training logs)
and returns a matplotlib ``Figure``, saved as PNG and PDF. The builder is bound by reference
(the decorator, at its definition: the import checker sees the arrow from the builder's
module to this one, never the other way), so reading this table imports nothing and a
binding to an undeclared name fails when its module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common.files import atomic_write_text

KINDS = ("table", "figure")
FOLDERS = {"table": "tables", "figure": "figures"}

#: ``(kind, name) -> builder``, bound by :func:`table_builder` / :func:`figure_builder`
_BUILDERS: dict[tuple[str, str], Callable[..., Any]] = {}


@dataclass(frozen=True)
class Output:
    """One table or figure: its file name, kind, file kinds, caption (the report's and the
    README's), report label and report category; its builder is bound where it is defined."""

    name: str
    kind: str
    formats: tuple[str, ...]
    caption: str
    label: str
    category: str

    def paths(self, out_dir: str | Path) -> list[str]:
        return [f"{out_dir}/{FOLDERS[self.kind]}/{self.name}.{ext}" for ext in self.formats]

    def caption_path(self, out_dir: str | Path) -> str:
        return f"{out_dir}/report/{FOLDERS[self.kind]}/{self.name}.rst"

    def build(self) -> Callable[..., Any]:
        """The builder bound to this output (its module, ``harness.analysis.tables`` or
        ``harness.analysis.figures``, must have been imported: their writers are there)."""
        builder = _BUILDERS.get((self.kind, self.name))
        if builder is None:
            raise LookupError(f"{self.kind} {self.name!r} has no builder: decorate one in "
                              f"harness/analysis/{FOLDERS[self.kind]}.py with @{self.kind}_builder({self.name!r})")
        return builder


def _binder(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def bind(builder: Callable[..., Any]) -> Callable[..., Any]:
        if not any(o.kind == kind and o.name == name for o in OUTPUTS):
            raise LookupError(f"{builder.__module__}.{builder.__name__}: no {kind} named {name!r} is "
                              "declared in harness/analysis/outputs.py (OUTPUTS)")
        bound = _BUILDERS.get((kind, name))
        if bound is not None and bound.__qualname__ != builder.__qualname__:
            raise LookupError(f"{kind} {name!r} already has a builder, {bound.__module__}.{bound.__name__}")
        _BUILDERS[(kind, name)] = builder
        return builder

    return bind


def table_builder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Bind the decorated function as the builder of the declared table ``name``."""
    return _binder("table", name)


def figure_builder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Bind the decorated function as the builder of the declared figure ``name``."""
    return _binder("figure", name)


OUTPUTS: tuple[Output, ...] = (
    Output(
        "main_table",
        "table",
        ("csv", "md", "tex"),
        (
            "Main table: one row per method and variant (granularity G, or the LoRA rank), plus the "
            "LoRA references at rank R (same total) and rank K (same activated) and the untrained "
            "base model. Task columns: accuracy (%) averaged over seeds. ``suite_mean`` and "
            "``suite_std``: mean and sample standard deviation (ddof = 1) of the suite accuracy "
            "over ``n_seeds`` seeds. ``total``, ``activated`` and ``router``: trainable adapter "
            "parameters, those that shape one token's output, and the router's (counted inside "
            "both). ``router_mode`` says whether router parameters are listed beside the matched "
            "budget (separate) or fitted inside it (counted). ``train_s``: mean training wall time "
            "(s). The Markdown and LaTeX versions (``main_table.md``, ``main_table.tex``) mark the "
            "best value of each score column in bold."
        ),
        "main table",
        "Tables",
    ),
    Output(
        "budget_table",
        "table",
        ("csv", "md", "tex"),
        (
            "Budget table: the budget solver's configuration for every method and variant (number "
            "of experts, expert rank, top-k) and its parameter counts, checked against real adapter "
            "layers built on the meta device (``verified``). ``total_vs_R`` and ``activated_vs_K`` "
            "are relative deviations from LoRA of rank R and rank K; dense methods cannot match the "
            "activated budget and say so in ``note``."
        ),
        "budget",
        "Tables",
    ),
    Output(
        "significance",
        "table",
        ("csv", "md", "tex"),
        (
            "Significance: every comparison of the study's family (each method x variant against "
            "LoRA rank R; each method's finest against its coarsest granularity; each method's best "
            "variant against the best other method), as the difference of the suite score in "
            "percentage points with its 95% confidence interval from a paired bootstrap that "
            "resamples seeds and test items (crossed; items within their task), the bootstrap "
            "p-value, the Holm-adjusted p-value over the family and the Bonferroni family-wise "
            'interval. "better"/"worse" only where the Holm p is below 0.05 and the family interval '
            "excludes zero."
        ),
        "significance",
        "Tables",
    ),
    Output(
        "significance_metrics",
        "table",
        ("csv", "md", "tex"),
        (
            "Significance of the other metrics: every per-item metric beside the suite score (each "
            "secondary metric the main table shows, such as lm-eval's Brier score, as its suite "
            "mean; each metric of every lm-eval registry task of eval.tasks beyond the suite, per "
            "lm-eval filter) over the comparisons of the significance table, with the same paired "
            "bootstrap over seeds and test items, Holm-corrected within each metric. The verdict "
            "follows the metric's direction (for the Brier score, lower is better). Metrics "
            "computed from stored samples (samples.json) appear only for runs that stored them; "
            "a metric that is not a mean of per-item values (the expected calibration error) has "
            "no interval."
        ),
        "significance of the other metrics",
        "Tables",
    ),
    Output(
        "training_gain",
        "table",
        ("csv", "md", "tex"),
        (
            "Training gain: every trained method x variant against the untrained base model, as the "
            "difference of the suite score in percentage points with its 95% interval from the "
            "paired bootstrap over seeds and test items, Holm-corrected over this family."
        ),
        "training gain",
        "Tables",
    ),
    Output(
        "granularity_trend",
        "table",
        ("csv", "md", "tex"),
        (
            "Granularity trend: per method run at several numbers of experts G (fixed total and "
            "active rank), its suite score at each G, the least-squares slope against log2 G "
            "(percentage points per doubling) and the middle bump (the middle G against the mean of "
            "the ends), each with a 95% interval from the same paired bootstrap over seeds and test "
            "items, and the shape of the curve (rises, falls, peaks or dips in the middle, or flat "
            "within noise)."
        ),
        "granularity trend",
        "Tables",
    ),
    Output(
        "expert_sharing",
        "table",
        ("csv", "md"),
        (
            "Expert sharing (table): per routed method x variant, the overlap of two tasks' expert "
            "distributions (histogram intersection) within a task family, across families and over "
            "all pairs, mean over adapted modules and task pairs, then over seeds."
        ),
        "expert sharing",
        "Tables",
    ),
    Output(
        "power",
        "table",
        ("csv", "md"),
        (
            "Power: for every comparison of the significance table, the seed and item variance "
            "components of its difference (from the stored per-item scores), the 95% half-width at "
            "this study's seeds and at twice as many, and the seeds needed for a half-width of 3 "
            "points or for the interval to exclude zero."
        ),
        "power",
        "Tables",
    ),
    Output(
        "forgetting",
        "table",
        ("csv", "md", "tex"),
        (
            "Forgetting: every trained method x variant against the untrained model, and each "
            "method's finest against its coarsest granularity, as the change of the loss per word "
            "on a general text (eval.general_text, scored by lm-eval's loglikelihood_rolling) with "
            "its 95% interval from a paired bootstrap over seeds and documents, Holm-corrected."
        ),
        "forgetting",
        "Tables",
    ),
    Output(
        "cost",
        "table",
        ("csv", "md", "tex"),
        (
            "Cost: per method x variant, measured while training: wall time, tokens per second, "
            "peak memory (process RSS; on CUDA max_memory_allocated beside the estimate of "
            "harness/plan/memory.py), the adapter file's size, and the evaluation's wall time."
        ),
        "cost",
        "Tables",
    ),
    Output(
        "tuning",
        "table",
        ("csv", "md", "tex"),
        (
            "The tune stage: each tuned method x variant's validation score at every learning "
            "rate of the grid (trained without the validation split, tuning seeds kept apart), "
            "the chosen rate and the final runs' test score at it."
        ),
        "tuning",
        "Tables",
    ),
    Output(
        "provenance",
        "table",
        ("csv", "md"),
        (
            "Provenance: for every run, when it was trained and evaluated, the git commit (and "
            "whether the tree had uncommitted changes), the device and hardware, the versions of "
            "Python, torch, transformers, peft and lm-eval, and the training and evaluation wall "
            "times, as recorded in the run's ``train.json`` and ``metrics.json``."
        ),
        "runs",
        "Provenance",
    ),
    Output(
        "granularity",
        "figure",
        ("png", "pdf"),
        (
            "Granularity vs accuracy (the headline figure). x: number of experts G at fixed total "
            "rank R and activated rank K (log2 axis). y: suite accuracy (%), mean over seeds with "
            "error bars of one standard deviation. One line per method that sweeps G. Shaded bands: "
            "LoRA of rank R (same total) and rank K (same activated), mean ± std over seeds; dashed "
            "line: the untrained base model. A rising line means finer experts help; compare the "
            "rise with the error bars and the bands before reading anything into it."
        ),
        "1 granularity vs accuracy",
        "Figures",
    ),
    Output(
        "params_vs_acc",
        "figure",
        ("png", "pdf"),
        (
            "Activated parameters vs accuracy: every run is one point (x: adapter parameters that "
            "shape one token's output, router included, log axis; y: suite accuracy, %). The step "
            "line is the Pareto front: the best accuracy reached with at most that many activated "
            "parameters. Labels give the variant (G or LoRA rank); the dashed line is the untrained "
            "base model."
        ),
        "2 activated parameters vs accuracy",
        "Figures",
    ),
    Output(
        "task_heatmap",
        "figure",
        ("png", "pdf"),
        (
            "Per-task accuracy relative to LoRA rank R: each cell is a method's mean accuracy over "
            "seeds minus LoRA rank R's, in percentage points (blue: better, red: worse; the number "
            "is written in every cell). The last column is the suite. Tasks of the generated suite "
            "deliberately conflict, so a method that resolves task interference gains on the tasks "
            "where LoRA loses."
        ),
        "3 per-task accuracy vs LoRA rank R",
        "Figures",
    ),
    Output(
        "expert_load",
        "figure",
        ("png", "pdf"),
        (
            "Expert load at the end of training, for each routed method at its finest granularity: "
            "the last logged share of routing each expert received, sorted from the largest to the "
            "smallest expert within each adapted layer and averaged over layers and seeds (error "
            "bars: std over layers and seeds). The dashed line is the uniform share 1/G. A first "
            "bar far above it and a tail near zero means collapse; bars along the line mean "
            "balance. The normalised entropy (1 = balanced, 0 = one expert takes everything) is "
            "printed in each panel."
        ),
        "4 expert load",
        "Figures",
    ),
    Output(
        "training_curves",
        "figure",
        ("png", "pdf"),
        (
            "Training curves: training loss (cross-entropy at the answer token) vs optimizer step, "
            "averaged over seeds and lightly smoothed (centred moving average over 1/25 of the "
            "steps), for the LoRA references and every other method at its finest granularity."
        ),
        "5 training curves",
        "Figures",
    ),
    Output(
        "expert_sharing",
        "figure",
        ("png", "pdf"),
        (
            "Expert sharing: for every routed method, how much two tasks use the same experts at "
            "evaluation (the histogram intersection of their expert distributions, 1 = the same "
            "experts in the same shares), averaged over the adapted modules and over task pairs of "
            "the same family (solid) or of different families (dashed), against the number of "
            "experts G."
        ),
        "6 expert sharing within and across task families",
        "Figures",
    ),
    Output(
        "expert_heatmap",
        "figure",
        ("png", "pdf"),
        (
            "Which experts each task uses: for every routed method at its finest granularity, the "
            "share of each expert in each task's scored sequences in one representative adapted "
            "module (the one whose task overlap is the median over modules)."
        ),
        "7 which experts each task uses",
        "Figures",
    ),
    Output(
        "cost",
        "figure",
        ("png", "pdf"),
        (
            "Accuracy vs measured cost: one point per method x variant (mean over seeds, error "
            "bars one std of the suite score); left, the training process's peak memory (CUDA's "
            "max_memory_allocated when recorded, else its resident memory), right, the training "
            "wall time."
        ),
        "8 accuracy vs measured cost",
        "Figures",
    ),
)


def outputs(kind: str | None = None) -> list[Output]:
    """The declared outputs, of one kind (``table``/``figure``) or all, in declaration order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"output kind {kind!r}; valid: {', '.join(KINDS)}")
    return [o for o in OUTPUTS if kind is None or o.kind == kind]


def snakemake_outputs(kind: str, out_dir: str, report: Callable[..., Any]) -> dict[str, Any]:
    """The ``output:`` of the Snakefile's rule for ``kind``: every file of every output of that
    kind (the first file of each wrapped in Snakemake's ``report`` with its caption and label)
    and every caption file, keyed ``<name>_<ext>`` / ``<name>_caption``."""
    files: dict[str, Any] = {}
    for out in outputs(kind):
        for i, path in enumerate(out.paths(out_dir)):
            ext = path.rpartition(".")[2]
            files[f"{out.name}_{ext}"] = (
                report(
                    path,
                    caption=str(Path(out.caption_path(out_dir)).resolve()),
                    category=out.category,
                    labels={out.kind: out.label},
                )
                if i == 0
                else path
            )
        files[f"{out.name}_caption"] = out.caption_path(out_dir)
    return files


def write_caption(out: Output, out_dir: Path, text: str | None = None) -> Path:
    """The report caption of ``out`` (its declared caption, or ``text``), written atomically."""

    path = Path(out.caption_path(out_dir))
    atomic_write_text(path, (text or out.caption) + "\n")
    return path
