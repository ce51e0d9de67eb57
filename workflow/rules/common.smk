# Parse-time state shared by every rule file: the validated config, the run plan and the
# input functions. Reading it validates and plans; it changes no file.
import os

from harness.analysis.outputs import snakemake_outputs
from harness.cli.snakefile import (
    assert_model_ready,
    component_inputs_of,
    data_set_aside_inputs_of,
    every_set_aside_of,
    load_study,
    needs_weights,
    one_of,
    outputs_set_aside_of,
    redo_inputs_of,
    score_inputs_of,
    tuned_rate_inputs_of,
)
from harness.common.lock import HOLDER_ENV, hold_out_dir


CONFIG_PATH, STUDY, PLAN, CHECKS = load_study(workflow, config)
OUT = STUDY["out_dir"]
TRAINED = [run.run_id for run in PLAN.trained_runs]
UNTRAINED = [run.run_id for run in PLAN.runs if run.is_base]
ALL_RUNS = [run.run_id for run in PLAN.runs]
TUNING = [run.run_id for run in PLAN.tuning]


# the components a run is built on: trained, or restored when only their weights are missing
component_inputs = component_inputs_of(OUT, PLAN)
# what a job that (re)writes a run's results waits for: the data step, and its invalid result
# files (corrupt, stale, another run's) moved aside first; nothing for a finished run. A
# training job asks only for its training files, a scoring job only for its scores.
redo_inputs = redo_inputs_of(PLAN, "train")
score_redo_inputs = redo_inputs_of(PLAN, "score")
# what a scoring job scores: the run's finished training (weights restored when missing)
score_inputs = score_inputs_of(OUT, PLAN)
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


# the pid that a real run's out_dir lock names (this process's): its jobs carry it, here or
# on a cluster node (envvars), and so work under the lock instead of being refused by it
os.environ.setdefault(HOLDER_ENV, str(os.getpid()))


envvars:
    HOLDER_ENV,


onstart:
    # a real run stops here when the model, the items' lengths or the eval data check failed
    # (a dry run only warned, so the DAG can be seen on a machine without the weights)
    assert_model_ready(CHECKS)
    # a real run (never a dry run) locks the out_dir before its first job, whichever checkout
    # it runs from: a second snakemake on it stops here, having started and deleted nothing.
    # The lock is held until this process ends; its jobs know it is theirs.
    hold_out_dir(OUT, "snakemake")
