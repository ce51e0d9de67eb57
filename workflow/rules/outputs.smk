# The per-run summary, the tables and the figures, rebuilt from the stored run results (no
# training, no evaluation). Their files come from the outputs registry
# (harness/analysis/outputs.py): a new table or figure is one builder and one entry there.
#
#     snakemake --cores 1 tables figures     # seconds when every run has its results
#     snakemake --report report.html         # one HTML page: every table, figure, provenance
#
# Uses OUT, CONFIG_PATH, PLAN, ALL_RUNS, TRAINED and outputs_set_aside_of (common.smk). Outputs are plain (not
# protected): they are rebuilt from the run folders at will.


rule summary:
    input:
        # a damaged summary (another digest than recorded, not the study's runs): moved aside
        ancient(outputs_set_aside_of(PLAN, "summary")),
        expand(f"{OUT}/runs/{{run}}/metrics.json", run=ALL_RUNS),
        expand(f"{OUT}/runs/{{run}}/train.json", run=TRAINED),
    output:
        csv=f"{OUT}/summary.csv",
        md=f"{OUT}/summary.md",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/summary.log",
    localrule: True
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness summary --config {params.config:q} > {log:q} 2>&1"


rule tables:
    input:
        aside=ancient(outputs_set_aside_of(PLAN, "tables")),
        metrics=expand(f"{OUT}/runs/{{run}}/metrics.json", run=ALL_RUNS),
        train=expand(f"{OUT}/runs/{{run}}/train.json", run=TRAINED),
    output:
        **snakemake_outputs("table", OUT, report),
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
        aside=ancient(outputs_set_aside_of(PLAN, "figures")),
        metrics=expand(f"{OUT}/runs/{{run}}/metrics.json", run=ALL_RUNS),
        train=expand(f"{OUT}/runs/{{run}}/train.json", run=TRAINED),
        logs=expand(f"{OUT}/runs/{{run}}/train_log.jsonl", run=TRAINED),
    output:
        **snakemake_outputs("figure", OUT, report),
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/figures.log",
    localrule: True
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness figures --config {params.config:q} > {log:q} 2>&1"
