# Parse-time state shared by every rule file: the validated config, the run plan and
# the input functions. The config is validated, plugins are loaded and the budget
# is solved here, so bad input stops Snakemake before any job starts.
import re

from harness.snakemake_support import component_inputs_of, load_study, needs_weights, weights_of


CONFIG_PATH, STUDY, PLAN = load_study(workflow, config)
OUT = STUDY["out_dir"]
TRAINED = [run.run_id for run in PLAN.trained_runs]
ALL_RUNS = [run.run_id for run in PLAN.runs]


# the run's trained weights (its train.json, or restore.json when only the weights are
# missing); nothing for the untrained base model
run_weights = weights_of(OUT, TRAINED)
# the same for the components a run is built on (nothing for most methods)
component_inputs = component_inputs_of(OUT, PLAN)
# every folder whose weights a restore job can rebuild: runs and components
RESTORABLE = [run.path for run in PLAN.training_jobs]
