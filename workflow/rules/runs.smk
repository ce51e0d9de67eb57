# The runs: one job trains a run, another scores it (the untrained base model is only
# scored), and an invalid result is moved aside before its job redoes it. Uses OUT, TRAINED,
# ALL_RUNS, CONFIG_PATH and the input functions (common.smk).
#
# Training and scoring are two jobs so that a finished training is the output of a job that
# finished: Snakemake removes the outputs of a failed job, and a scoring that fails (an eval
# task's data missing, out of memory, a time limit) or is interrupted then removes only
# what scoring writes; the next run scores again and never retrains. The cost is one more
# process start per run (about 7 s). Every result file is protected: `--forceall` or `-R`
# is refused rather than overwriting a finished run.


rule train:
    input:
        ancient(rules.data.output.train),
        ancient(component_inputs),
        ancient(redo_inputs),
        ancient(tuned_rate_inputs),
    output:
        summary=protected(f"{OUT}/runs/{{run}}/train.json"),
        log=f"{OUT}/runs/{{run}}/train_log.jsonl",
    wildcard_constraints:
        run=one_of(TRAINED),
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/train/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        # one rank per GPU (train.processes; docs/cluster.md "Several GPUs per run")
        gpu=STUDY["train"].get("processes", 1),
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness train --config {params.config:q} --run {wildcards.run} --no-score --log {log:q}"


rule evaluate:
    input:
        ancient(score_redo_inputs),
        ancient(score_inputs),
    output:
        metrics=protected(f"{OUT}/runs/{{run}}/metrics.json"),
        lm_eval=f"{OUT}/runs/{{run}}/lm_eval_results.json",
    wildcard_constraints:
        run=one_of(ALL_RUNS),
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/evaluate/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness evaluate --config {params.config:q} --run {wildcards.run} --log {log:q}"


rule set_aside:
    # `<file>.<why>-<sha256 of its content, 8>`: the name a dry run and the real run agree on
    output:
        f"{OUT}/{{path}}.{{why}}-{{digest}}",
    wildcard_constraints:
        why="corrupt|stale|foreign|orphan",
        digest="[0-9a-f]{8}",
    params:
        file=lambda wildcards: f"{OUT}/{wildcards.path}",
    log:
        f"{OUT}/logs/set_aside/{{path}}.{{why}}-{{digest}}.log",
    localrule: True
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness set-aside --file {params.file:q} --to {output:q} > {log:q} 2>&1"
