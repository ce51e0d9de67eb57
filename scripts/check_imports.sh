#!/usr/bin/env bash
# The one-way architecture, checked: no import circles, and every arrow points to an earlier
# stage. The plugins (methods/, examples/) import only the toolkit (harness.adapters); the
# toolkit imports nothing else of the harness; the engine's stages import only the stages
# listed before them:
#
#     adapters < common < data < model < plan < run < analysis < {cli, bench}
#
# (cli and bench are entry points and may import any stage; harness/__init__.py only
# hands names on.) Exit status 1 names every circle or
# forbidden arrow.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STAGES=(adapters common data model plan run analysis)
forbid=()
# every engine package is a stage or an entry point: a new top-level module or package
# must be placed in the order above (or this check fails)
for path in harness/*.py harness/*/; do
  name=$(basename "${path%/}" .py)
  case "$name" in
    __init__|__main__|__pycache__|cli|bench) continue ;;
  esac
  if [[ ! " ${STAGES[*]} " == *" $name "* ]]; then
    echo "harness/$name is in no stage: add it to STAGES in scripts/check_imports.sh" >&2
    exit 1
  fi
done
for ((i = 0; i < ${#STAGES[@]}; i++)); do
  for ((j = i + 1; j < ${#STAGES[@]}; j++)); do
    forbid+=(--forbid "harness.${STAGES[i]}:harness.${STAGES[j]}")
  done
  for entry in cli bench; do
    forbid+=(--forbid "harness.${STAGES[i]}:harness.$entry")
  done
done
for src in methods examples; do
  for stage in "${STAGES[@]:1}" cli bench; do
    forbid+=(--forbid "$src:harness.$stage")
  done
done
exec "$PY" scripts/import_graph.py harness methods examples "${forbid[@]}"
