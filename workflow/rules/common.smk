# Parse-time state shared by every rule file: the validated config, the run plan and the
# input functions. Reading it validates and plans; it changes no file.
from harness.analysis.outputs import snakemake_outputs
from harness.cli.snakefile import (
    assert_model_ready,
    component_inputs_of,
    data_set_aside_inputs_of,
    every_set_aside_of,
    load_study,
    needs_weights,
    one_of,
    redo_inputs_of,
    tuned_rate_inputs_of,
)


CONFIG_PATH, STUDY, PLAN = load_study(workflow, config)
OUT = STUDY["out_dir"]
TRAINED = [run.run_id for run in PLAN.trained_runs]
UNTRAINED = [run.run_id for run in PLAN.runs if run.is_base]
ALL_RUNS = [run.run_id for run in PLAN.runs]
TUNING = [run.run_id for run in PLAN.tuning]


# the components a run is built on: trained, or restored when only their weights are missing
component_inputs = component_inputs_of(OUT, PLAN)
# what a job that (re)writes a run's results waits for: the data step, and its invalid result
# files (corrupt, stale, another run's) moved aside first; nothing for a finished run
redo_inputs = redo_inputs_of(PLAN)
# the data folder's summary when it describes other data than the config's
data_set_aside_inputs = data_set_aside_inputs_of(STUDY)
# every result of the study, and every invalid one's set-aside name: asked for by `rule all`
# so that a lost or invalid result is redone (and a dry run says so)
RESULTS = [
    *[f"{OUT}/runs/{run}/metrics.json" for run in ALL_RUNS],
    *[f"{OUT}/{run.path}/metrics.json" for run in PLAN.tuning],
    *[f"{OUT}/{run.path}/train.json" for run in PLAN.training_jobs],
]
# a tuned run's rate: the tune stage's choice (nothing for the other runs)
tuned_rate_inputs = tuned_rate_inputs_of(OUT, PLAN)
every_set_aside = every_set_aside_of(STUDY, PLAN)
# every folder whose weights a restore job can rebuild: runs and components
RESTORABLE = [run.path for run in PLAN.training_jobs]


onstart:
    # a real run stops here when the model or the items' lengths check failed (a dry run
    # only warned, so the DAG can be seen on a machine without the weights)
    assert_model_ready(STUDY)
