# Weights of finished runs that are not here (they are never committed): a restore job
# retrains the run deterministically from its run.json (same config, seed, data order) into
# a scratch folder, checks the losses against the stored train_log.jsonl, installs the
# weights and writes restore.json with the comparison; train.json is left as it is.
# Jobs that load weights (evaluate, bench, a staged run's train) ask for restore.json
# only when a run is finished and its weights are missing (needs_weights, common.smk).
#
# Included by the Snakefile after the data rule; uses OUT, RESTORABLE, CONFIG_PATH.


rule restore:
    input:
        ancient(rules.data.output.train),
        ancient(f"{OUT}/{{path}}/train.json"),
        ancient(component_inputs),
    output:
        f"{OUT}/{{path}}/restore.json",
    params:
        config=CONFIG_PATH,
        name=lambda wildcards: wildcards.path.rpartition("/")[2],
    log:
        f"{OUT}/logs/restore/{{path}}.log",
    wildcard_constraints:
        path=one_of(RESTORABLE),
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness restore --config {params.config:q} --run {params.name} > {log:q} 2>&1"
