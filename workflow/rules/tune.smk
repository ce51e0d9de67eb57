# The tune stage (a study with `tune:`): every tuned method x variant trained at each rate of
# the grid on the training items minus a validation split (tune_run) and scored on that
# split (tune_score: two jobs, so a failed scoring keeps the training); then one job chooses
# each method x variant's rate (tune), and the final runs of those methods wait for its
# choice (their `train` jobs read it). Committed tuning results mean a fresh clone does not
# tune again.
#
# Uses OUT, CONFIG_PATH, PLAN, TUNING, one_of, redo_inputs, score_redo_inputs and
# score_inputs (common.smk).


rule tune_run:
    input:
        ancient(rules.data.output.train),
        ancient(redo_inputs),
    output:
        summary=protected(f"{OUT}/tuning/runs/{{run}}/train.json"),
        log=f"{OUT}/tuning/runs/{{run}}/train_log.jsonl",
    wildcard_constraints:
        run=one_of(TUNING),
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/tune/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        # one rank per GPU (train.processes; docs/cluster.md "Several GPUs per run")
        gpu=STUDY["train"].get("processes", 1),
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness train --config {params.config:q} --run {wildcards.run} --no-score --log {log:q}"


rule tune_score:
    input:
        ancient(score_redo_inputs),
        ancient(score_inputs),
    output:
        metrics=protected(f"{OUT}/tuning/runs/{{run}}/metrics.json"),
        lm_eval=f"{OUT}/tuning/runs/{{run}}/lm_eval_results.json",
    wildcard_constraints:
        run=one_of(TUNING),
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/tune_score/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness evaluate --config {params.config:q} --run {wildcards.run} --log {log:q}"


rule tune:
    input:
        expand(f"{OUT}/tuning/runs/{{run}}/metrics.json", run=TUNING),
    output:
        f"{OUT}/tuning/rates.json",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/tune.log",
    localrule: True
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness tune --config {params.config:q} > {log:q} 2>&1"
