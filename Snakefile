"""The study DAG: a table of contents of workflow/rules/.

    data -> [train_component] -> train (one job per method x granularity x seed)
         -> evaluate -> summary -> tables, figures
    the untrained base model's evaluation runs beside them; bench on request.

Thin rules: each calls `python -m harness <command>`. The config file is
validated, plugins are loaded and the budget is solved when this file is read,
so bad input stops the workflow before any job starts.

    snakemake --cores 2                                   # the default CPU study
    snakemake --cores 2 --configfile config/smoke.yaml    # the same DAG in minutes
"""


include: "workflow/rules/common.smk"


report: "workflow/report/workflow.rst"


wildcard_constraints:
    run="|".join(re.escape(r) for r in ALL_RUNS),


rule all:
    input:
        f"{OUT}/summary.csv",
        lambda wildcards: [*rules.tables.output, *rules.figures.output],


include: "workflow/rules/report.smk"



rule data:
    output:
        train=f"{OUT}/data/train.jsonl",
        summary=f"{OUT}/data/data_summary.json",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/data.log",
    conda:
        "envs/harness.yaml"
    shell:
        "python -m harness data --config {params.config:q} > {log:q} 2>&1"


include: "workflow/rules/components.smk"


include: "workflow/rules/restore.smk"


rule train:
    input:
        ancient(rules.data.output.train),
        ancient(component_inputs),
    output:
        summary=protected(f"{OUT}/runs/{{run}}/train.json"),
        log=f"{OUT}/runs/{{run}}/train_log.jsonl",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/train/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "envs/harness.yaml"
    shell:
        "python -m harness train --config {params.config:q} --run {wildcards.run} --evaluate "
        "> {log:q} 2>&1; grep -h '^resumed ' {log:q} || true"


rule evaluate:
    input:
        ancient(rules.data.output.summary),
        ancient(run_weights),
    output:
        metrics=protected(f"{OUT}/runs/{{run}}/metrics.json"),
        lm_eval=f"{OUT}/runs/{{run}}/lm_eval_results.json",
    params:
        config=CONFIG_PATH,
        pending=f"{OUT}/runs/{{run}}/metrics.pending.json",
        pending_lm_eval=f"{OUT}/runs/{{run}}/lm_eval_results.pending.json",
    log:
        f"{OUT}/logs/evaluate/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "envs/harness.yaml"
    shell:
        # the train job scored the run right after training (one process start, not two):
        # move those scores into place; evaluate in a process of its own only without them
        "if grep -qs '\"run_id\": \"{wildcards.run}\"' {params.pending:q}; then "
        "mv {params.pending_lm_eval:q} {output.lm_eval:q} && mv {params.pending:q} {output.metrics:q} "
        "&& echo 'scored by the train job' > {log:q}; "
        "else python -m harness evaluate --config {params.config:q} --run {wildcards.run} > {log:q} 2>&1; fi"


rule summary:
    input:
        expand(f"{OUT}/runs/{{run}}/metrics.json", run=ALL_RUNS),
        expand(f"{OUT}/runs/{{run}}/train.json", run=TRAINED),
    output:
        csv=f"{OUT}/summary.csv",
        md=f"{OUT}/summary.md",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/summary.log",
    conda:
        "envs/harness.yaml"
    shell:
        "python -m harness summary --config {params.config:q} > {log:q} 2>&1"


include: "workflow/rules/bench.smk"
