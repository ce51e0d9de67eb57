# Parse-time state shared by every rule file: the validated config, the run plan and
# the input functions. The config is validated, plugins are loaded and the budget
# is solved here, so bad input stops Snakemake before any job starts.
import re

from harness.snakemake_support import component_inputs_of, load_study, train_json_of


CONFIG_PATH, STUDY, PLAN = load_study(workflow, config)
OUT = STUDY["out_dir"]
TRAINED = [run.run_id for run in PLAN.trained_runs]
ALL_RUNS = [run.run_id for run in PLAN.runs]


# the run's train.json, or nothing for the untrained base model
train_outputs = train_json_of(OUT, TRAINED)
# the train.json of the components a run is built on (nothing for most methods)
component_inputs = component_inputs_of(OUT, PLAN)
