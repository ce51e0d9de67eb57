# The runs: one job trains and scores a run (one process start, not two), the untrained
# base model is scored on its own, and an invalid result is moved aside before its job
# redoes it. Uses OUT, TRAINED, UNTRAINED, CONFIG_PATH and the input functions (common.smk).
#
# train.json and train_log.jsonl are `update` outputs: a job whose scores are missing keeps
# the finished training (it scores it again, restoring the weights first when they are not
# here) and Snakemake restores them if the job fails. metrics.json is protected, so
# `--forceall` or `-R` is refused rather than overwriting a finished run's scores.


rule train:
    input:
        ancient(rules.data.output.train),
        ancient(component_inputs),
        ancient(redo_inputs),
        ancient(tuned_rate_inputs),
    output:
        summary=update(f"{OUT}/runs/{{run}}/train.json"),
        log=update(f"{OUT}/runs/{{run}}/train_log.jsonl"),
        metrics=protected(f"{OUT}/runs/{{run}}/metrics.json"),
        lm_eval=f"{OUT}/runs/{{run}}/lm_eval_results.json",
    wildcard_constraints:
        run=one_of(TRAINED),
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/train/{{run}}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness train --config {params.config:q} --run {wildcards.run} --log {log:q}"


rule evaluate:
    input:
        ancient(redo_inputs),
    output:
        metrics=protected(f"{OUT}/runs/{{run}}/metrics.json"),
        lm_eval=f"{OUT}/runs/{{run}}/lm_eval_results.json",
    wildcard_constraints:
        run=one_of(UNTRAINED),
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
