# Components: parts that staged methods are built on (e.g. MoA's one LoRA per task), each
# trained by its own job before the runs that load them, so they run in parallel. The
# plan names, hashes and places them (`{out_dir}/<group>/<name>/`, StudyPlan.components);
# a run's `train` job waits for its components through the input function
# `component_inputs` (common.smk). A component's name hashes only its own settings, so
# changing the other components of a run reruns that run alone.
#
# Uses OUT, PLAN, CONFIG_PATH, one_of and redo_inputs (common.smk).


rule train_component:
    input:
        ancient(rules.data.output.train),
        ancient(redo_inputs),
    output:
        summary=protected(f"{OUT}/{{component}}/train.json"),
        log=f"{OUT}/{{component}}/train_log.jsonl",
    log:
        f"{OUT}/logs/components/{{component}}.log",
    wildcard_constraints:
        component=one_of([c.path for c in PLAN.components]),
    params:
        config=CONFIG_PATH,
        name=lambda wildcards: wildcards.component.rpartition("/")[2],
    threads: 1
    resources:
        mem_mb=4000,
        gpu=STUDY["train"].get("processes", 1),  # one rank per GPU (train.processes)
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness train --config {params.config:q} --run {params.name} --log {log:q}"
