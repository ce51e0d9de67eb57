#!/usr/bin/env bash
# The one-way architecture, checked: no import circles, and the plugins (methods/,
# examples/) and the adapter toolkit (harness/adapters/) import nothing of the engine,
# i.e. no other module of harness/. Exit status 1 names every circle or forbidden arrow.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
forbid=()
for path in harness/*.py harness/*/; do
  name=$(basename "${path%/}" .py)
  case "$name" in
    __init__|__main__|__pycache__|adapters|methods|model_configs) continue ;;
  esac
  for src in methods examples harness.adapters; do
    forbid+=(--forbid "$src:harness.$name")
  done
done
exec "$PY" scripts/import_graph.py harness methods examples "${forbid[@]}"
