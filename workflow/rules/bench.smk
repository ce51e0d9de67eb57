# The speed benchmark (harness/bench/, docs/performance.md): step time, tokens/s, memory
# and evaluation throughput of every method at the study's matched budget, as ratios to
# peft LoRA rank R measured in the same process, plus the lower-layer cache, the
# dense-vs-sparse crossover and the scaling sweeps. Not an input of `rule all`: run it
# on its own, on a quiet machine, with the cores it should time:
#
#     snakemake --cores 2 bench
#
# Inputs: the study's data (the evaluation-cache comparison scores its task folder) and
# the first seed's components (e.g. task adapters), so a staged method is timed in its
# real last stage. Threads: bench.threads (fewer if --cores is smaller).
#
# Included by the Snakefile after the data rule; uses OUT, STUDY, PLAN, CONFIG_PATH (common.smk).


BENCH_COMPONENTS = sorted(
    {
        target
        for run in PLAN.runs
        if run.seed == STUDY["train"]["seeds"][0]
        for path in run.components
        for target in needs_weights(OUT, path)
    }
)


rule bench:
    input:
        ancient(rules.data.output.summary),
        BENCH_COMPONENTS,
    output:
        csv=f"{OUT}/bench/bench.csv",
        md=f"{OUT}/bench/bench.md",
    params:
        config=CONFIG_PATH,
    log:
        f"{OUT}/logs/bench.log",
    threads: STUDY["bench"]["threads"]
    conda:
        "../../envs/harness.yaml"
    shell:
        "python -m harness bench --config {params.config:q} --threads {threads} > {log:q} 2>&1"
