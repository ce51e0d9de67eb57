# The data step: the training JSONL, the lm-eval task folder and the data summary. A
# corrupt or stale summary (the config's data changed) is moved aside first, so this runs
# again. Uses OUT, CONFIG_PATH and data_set_aside_inputs (common.smk).


rule data:
    input:
        ancient(data_set_aside_inputs),
    output:
        train=f"{OUT}/data/train.jsonl",
        summary=f"{OUT}/data/data_summary.json",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/data.log",
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness data --config {params.config:q} > {log:q} 2>&1"
