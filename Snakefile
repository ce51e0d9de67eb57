"""The study DAG: a table of contents of workflow/rules/, one file per stage.

    data -> [train_component] -> [tune_run -> tune_score -> tune] -> train (one run: method
         x variant x seed) -> evaluate (its scores; the base model's too) -> summary -> tables,
         figures
    set_aside (a corrupt or stale result, moved aside before its job redoes it); restore
    (weights a job needs, never committed); bench on request. A real run (not a dry run)
locks the out_dir (<out_dir>/.lock) before its first job: a second snakemake on the same
out_dir, from any checkout, stops there.

Reading this file validates the config and plans the study, nothing else: every rule is a
thin call of `python -m harness <command>`, and `snakemake -n` lists exactly the jobs a
real run will run.

    snakemake --cores 2                                   # the default study
    snakemake --cores 2 --configfile config/smoke.yaml    # the same DAG in minutes
"""


include: "workflow/rules/common.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        RESULTS,
        every_set_aside,
        f"{OUT}/summary.csv",
        lambda wildcards: [*rules.tables.output, *rules.figures.output],


include: "workflow/rules/data.smk"
include: "workflow/rules/components.smk"
include: "workflow/rules/tune.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/restore.smk"
include: "workflow/rules/outputs.smk"
include: "workflow/rules/bench.smk"
