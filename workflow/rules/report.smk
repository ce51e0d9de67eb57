# Tables and figures rebuilt from the stored run results (no training, no evaluation).
#
#     snakemake --cores 1 tables figures     # seconds when every run has its results
#     snakemake --report report.html         # one HTML page: every table, figure, provenance
#
# Included by the Snakefile after it defines CONFIG_PATH, OUT, TRAINED and ALL_RUNS.
# Outputs are plain (not protected): they are rebuilt from the run folders at will.
# Paths in `conda:` and in report captions are relative to this file.


rule tables:
    input:
        metrics=expand(f"{OUT}/runs/{{run}}/metrics.json", run=ALL_RUNS),
        train=expand(f"{OUT}/runs/{{run}}/train.json", run=TRAINED),
    output:
        main=report(
            f"{OUT}/tables/main_table.csv",
            caption="../report/main_table.rst",
            category="Tables",
            labels={"table": "main table"},
        ),
        main_md=f"{OUT}/tables/main_table.md",
        main_tex=f"{OUT}/tables/main_table.tex",
        budget=report(
            f"{OUT}/tables/budget_table.csv",
            caption="../report/budget_table.rst",
            category="Tables",
            labels={"table": "budget"},
        ),
        budget_md=f"{OUT}/tables/budget_table.md",
        budget_tex=f"{OUT}/tables/budget_table.tex",
        significance=report(
            f"{OUT}/tables/significance.csv",
            caption="../report/significance.rst",
            category="Tables",
            labels={"table": "significance"},
        ),
        significance_md=f"{OUT}/tables/significance.md",
        significance_tex=f"{OUT}/tables/significance.tex",
        trend=report(
            f"{OUT}/tables/granularity_trend.csv",
            caption="../report/granularity_trend.rst",
            category="Tables",
            labels={"table": "granularity trend"},
        ),
        trend_md=f"{OUT}/tables/granularity_trend.md",
        trend_tex=f"{OUT}/tables/granularity_trend.tex",
        sharing_table=f"{OUT}/tables/expert_sharing.csv",
        sharing_md=f"{OUT}/tables/expert_sharing.md",
        training_gain=f"{OUT}/tables/training_gain.csv",
        training_gain_md=f"{OUT}/tables/training_gain.md",
        power=f"{OUT}/tables/power.csv",
        power_md=f"{OUT}/tables/power.md",
        provenance=report(
            f"{OUT}/tables/provenance.csv",
            caption="../report/provenance.rst",
            category="Provenance",
            labels={"table": "runs"},
        ),
        provenance_md=f"{OUT}/tables/provenance.md",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/tables.log",
    localrule: True
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness tables --config {params.config:q} > {log:q} 2>&1"


rule figures:
    input:
        metrics=expand(f"{OUT}/runs/{{run}}/metrics.json", run=ALL_RUNS),
        train=expand(f"{OUT}/runs/{{run}}/train.json", run=TRAINED),
        logs=expand(f"{OUT}/runs/{{run}}/train_log.jsonl", run=TRAINED),
    output:
        granularity=report(
            f"{OUT}/figures/granularity.png",
            caption="../report/granularity.rst",
            category="Figures",
            labels={"figure": "1 granularity vs accuracy"},
        ),
        granularity_pdf=f"{OUT}/figures/granularity.pdf",
        params_vs_acc=report(
            f"{OUT}/figures/params_vs_acc.png",
            caption="../report/params_vs_acc.rst",
            category="Figures",
            labels={"figure": "2 activated parameters vs accuracy"},
        ),
        params_vs_acc_pdf=f"{OUT}/figures/params_vs_acc.pdf",
        heatmap=report(
            f"{OUT}/figures/task_heatmap.png",
            caption="../report/task_heatmap.rst",
            category="Figures",
            labels={"figure": "3 per-task accuracy vs LoRA rank R"},
        ),
        heatmap_pdf=f"{OUT}/figures/task_heatmap.pdf",
        load=report(
            f"{OUT}/figures/expert_load.png",
            caption="../report/expert_load.rst",
            category="Figures",
            labels={"figure": "4 expert load"},
        ),
        load_pdf=f"{OUT}/figures/expert_load.pdf",
        curves=report(
            f"{OUT}/figures/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
            labels={"figure": "5 training curves"},
        ),
        curves_pdf=f"{OUT}/figures/training_curves.pdf",
        sharing=report(
            f"{OUT}/figures/expert_sharing.png",
            caption="../report/expert_sharing.rst",
            category="Figures",
            labels={"figure": "6 expert sharing within and across task families"},
        ),
        sharing_pdf=f"{OUT}/figures/expert_sharing.pdf",
        heatmap_experts=report(
            f"{OUT}/figures/expert_heatmap.png",
            caption="../report/expert_heatmap.rst",
            category="Figures",
            labels={"figure": "7 which experts each task uses"},
        ),
        heatmap_experts_pdf=f"{OUT}/figures/expert_heatmap.pdf",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/figures.log",
    localrule: True
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness figures --config {params.config:q} > {log:q} 2>&1"
