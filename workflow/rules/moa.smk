# MoA (harness/methods/moa.py), stage one: one peft LoRA per task of the training mixture,
# each trained only on its own task's items; one job per task x seed, so they run in
# parallel. Stage two (the router over the frozen task LoRAs) is the normal `train` rule:
# its input function task_adapter_inputs (common.smk) adds the stage-one train.json files
# of a MoA run. A task adapter's folder name hashes only its own settings, so adding or
# dropping a task reruns stage two alone.
#
# Included by the Snakefile after the data rule; uses OUT, PLAN and CONFIG_PATH (common.smk).


rule train_task_adapter:
    input:
        ancient(rules.data.output.train),
    output:
        summary=protected(f"{OUT}/task_adapters/{{adapter}}/train.json"),
        log=f"{OUT}/task_adapters/{{adapter}}/train_log.jsonl",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/task_adapters/{{adapter}}.log",
    wildcard_constraints:
        adapter="|".join(re.escape(a.name) for a in PLAN.task_adapters) or "(?!)",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness train-task-adapter --config {params.config:q} "
        "--adapter {wildcards.adapter} > {log:q} 2>&1"
