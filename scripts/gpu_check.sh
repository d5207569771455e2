#!/usr/bin/env bash
# GPU check for the batched, device-aware engine (issue 13), sized for < 8 minutes on one GPU.
#
#   scripts/gpu_check.sh              # on a CUDA machine: the stages below, for real
#   scripts/gpu_check.sh --dry-run    # anywhere: the same stages in a quick CPU mode (tiny shapes)
#
# Stages (each with its own timeout, all inside one budget; one failing does not stop the rest):
#   setup       python environment (.venv if present, else .venv-gpu over the system's torch) + versions
#   kernel      python -m kernels.check: the Triton kernel compiled (no TRITON_INTERPRET) against the
#               torch reference and fp64, forward and backward, fp32/bf16/fp16, NEST-L shapes, timed
#   tests       pytest of the device-parametrized tests with NESTVOX_TEST_DEVICE=cuda (float32)
#   tests-bf16  the streamer / inference device tests again with NESTVOX_TEST_DTYPE=bfloat16
#   ttft        python -m agent.bench ttft --nest large --llm bench --device cuda --dtype bfloat16
#   load        python -m agent.bench load --nest large --llm bench --device cuda --dtype bfloat16
#
# Results go to $OUT if set (the device runner's results folder), else runs/gpu_check/:
# summary.txt, setup.log, kernel.log, kernel.json, tests.log, ttft.log, load.log, load.json (8 files).
# Exit status: 0 when every stage passed, 1 otherwise, 2 for bad arguments.
#
# Environment: NESTVOX_GPU_CHECK_BUDGET_S (total seconds, default 470); NESTVOX_VENV (the venv to
# use when it has torch, default .venv); else a venv NESTVOX_GPU_VENV (default /tmp/nestvox-venv-gpu)
# is made over PYTHON's packages (default python3: a GPU image's CUDA torch and triton) and the
# project's other requirements are pip-installed into it: offline from NESTVOX_WHEELHOUSE (default
# .wheelhouse when it exists; make it with scripts/make_wheelhouse.sh and carry it), else from the
# index. A GPU image without NeMo and neither fails the NeMo stages, says so in setup.log, and
# still runs the kernel stage.
set -u -o pipefail

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run|--cpu) MODE=cpu ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
RESULTS="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$RESULTS"
: > "$RESULTS/summary.txt"
BUDGET="${NESTVOX_GPU_CHECK_BUDGET_S:-470}"
START=$SECONDS
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the GPU stages compile the kernel; CPU mode sets it where needed
STAGES=()
FAILED=0

log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$RESULTS/summary.txt"; }

# -- python environment ------------------------------------------------------------
setup_python() {
  local base="${PYTHON:-python3}" wheels="${NESTVOX_WHEELHOUSE:-}"
  [ -z "$wheels" ] && [ -d "$ROOT/.wheelhouse" ] && wheels="$ROOT/.wheelhouse"
  local existing="${NESTVOX_VENV:-$ROOT/.venv}"
  if [ -x "$existing/bin/python" ] && "$existing/bin/python" -c "import torch" 2>/dev/null; then
    PY="$existing/bin/python"
    echo "python: existing venv $existing"
  else
    local venv="${NESTVOX_GPU_VENV:-${TMPDIR:-/tmp}/nestvox-venv-gpu}"
    if [ ! -x "$venv/bin/python" ]; then
      echo "python: no usable .venv; creating $venv over $base's packages (its CUDA torch and triton)"
      "$base" -m venv --system-site-packages "$venv" || { echo "ERROR: $base -m venv failed"; return 1; }
    fi
    PY="$venv/bin/python"
    if ! "$PY" -c "import torch" 2>/dev/null; then
      echo "ERROR: $base has no torch: a GPU image with PyTorch is needed (pip cannot fetch a CUDA torch offline)"
      return 1
    fi
    # The project's own requirements, minus torch and triton: keep the machine's CUDA builds.
    "$PY" - > "$RESULTS/.requirements.txt" <<'PYEOF'
import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    name = re.split(r"[ ;<>=!~\[]", req, 1)[0].lower()
    if name not in ("torch", "triton"):
        print(req)
PYEOF
    "$PY" -c "import torch, triton; print(f'torch=={torch.__version__}'); print(f'triton=={triton.__version__}')" \
      > "$RESULTS/.constraints.txt" 2>/dev/null || "$PY" -c "import torch; print(f'torch=={torch.__version__}')" \
      > "$RESULTS/.constraints.txt"
    if "$PY" -c "import nemo.collections.asr, transformers, websockets, soxr, soundfile, pytest" 2>/dev/null; then
      echo "pip: the requirements import already"
    elif [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
      # Exact versions known to work together (scripts/make_wheelhouse.sh): no resolver, no index.
      echo "pip: offline, every wheel of $wheels with --no-deps"
      timeout 240 "$PY" -m pip install -q --no-index --no-deps "$wheels"/*.whl \
        || echo "WARNING: pip could not install the wheelhouse: stages that need NeMo will fail"
    else
      echo "pip: installing the requirements (minus torch/triton) into $venv from the index;"
      echo "     an offline machine needs a wheelhouse (scripts/make_wheelhouse.sh, carried as .wheelhouse)"
      timeout 240 "$PY" -m pip install -q -c "$RESULTS/.constraints.txt" -r "$RESULTS/.requirements.txt" \
        || echo "WARNING: pip could not install every requirement (offline?): stages that need them will fail"
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
      || echo "note: pip install -e . failed; running from the repository root works without it"
    rm -f "$RESULTS/.requirements.txt" "$RESULTS/.constraints.txt"
  fi
  "$PY" - <<'PYEOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
for name in ("triton", "nemo", "transformers", "websockets", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - report what is missing
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
PYEOF
}

# -- stages --------------------------------------------------------------------------
run_stage() {  # run_stage NAME TIMEOUT_S LOGFILE CMD...
  local name="$1" limit="$2" logfile="$RESULTS/$3"; shift 3
  local left=$((BUDGET - (SECONDS - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    STAGES+=("$name SKIPPED (budget of ${BUDGET}s spent)"); FAILED=1
    log "$name: SKIPPED, the ${BUDGET}s budget is spent"
    return
  fi
  log "$name: start (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  { echo "### $name: $*"; } >> "$logfile"
  timeout -k 10 "$limit" "$@" >> "$logfile" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) status
  case $rc in
    0) status=PASS ;;
    124|137) status="TIMEOUT after ${took}s"; FAILED=1 ;;
    *) status="FAIL (exit $rc)"; FAILED=1 ;;
  esac
  STAGES+=("$name $status ${took}s")
  log "$name: $status in ${took}s; last lines of $(basename "$logfile"):"
  tail -n 15 "$logfile" | sed 's/^/    /' | tee -a "$RESULTS/summary.txt"
}

log "nestvox gpu_check, mode $MODE, results in $RESULTS, budget ${BUDGET}s, $(date -u +%FT%TZ)"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$RESULTS/setup.log"
setup_python > >(tee -a "$RESULTS/setup.log") 2>&1
setup_rc=$?
sleep 0.2  # let the tee above flush
if [ "$setup_rc" != 0 ]; then
  log "setup: FAILED, no python with torch to run anything on (see setup.log)"
  log "gpu_check: SOME STAGES FAILED"
  exit 1
fi
STAGES+=("setup PASS $((SECONDS - START))s")

if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  log "no CUDA device visible to $PY: running the quick CPU mode instead (this is NOT a GPU check)"
  MODE=cpu
fi
if ! command -v espeak-ng >/dev/null || ! command -v sox >/dev/null; then
  export NESTVOX_TEST_SPEECH=skip
  log "espeak-ng/sox missing: tests that need synthesized speech are skipped (NESTVOX_TEST_SPEECH=skip)"
fi

PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
if [ "$MODE" = gpu ]; then
  DEVICE=cuda
  run_stage kernel 60 kernel.log "$PY" -m kernels.check --json "$RESULTS/kernel.json"
  run_stage tests 180 tests.log env NESTVOX_TEST_DEVICE=cuda NESTVOX_TEST_DTYPE=float32 "${PYTEST[@]}" \
    tests/test_streamers.py tests/test_devices.py tests/test_stack_fuse.py tests/test_stack_stream.py \
    tests/test_streaming.py tests/test_ultravox.py
  run_stage tests-bf16 50 tests.log env NESTVOX_TEST_DEVICE=cuda NESTVOX_TEST_DTYPE=bfloat16 "${PYTEST[@]}" \
    tests/test_streamers.py tests/test_devices.py
  run_stage ttft 90 ttft.log "$PY" -m agent.bench ttft --nest large --llm bench --device cuda --dtype bfloat16 \
    --seconds 2,5,10 --repeats 2
  run_stage load 130 load.log "$PY" -m agent.bench load --nest large --llm bench --device cuda --dtype bfloat16 \
    --streams 1,4,8,16 --duration 8 --json "$RESULTS/load.json"
else
  DEVICE=cpu
  run_stage kernel 60 kernel.log env TRITON_INTERPRET=1 "$PY" -m kernels.check --quick --json "$RESULTS/kernel.json"
  run_stage tests 240 tests.log env NESTVOX_TEST_DEVICE=cpu NESTVOX_TEST_DTYPE=float32 "${PYTEST[@]}" \
    tests/test_streamers.py tests/test_stack_fuse.py
  run_stage tests-bf16 120 tests.log env NESTVOX_TEST_DEVICE=cpu NESTVOX_TEST_DTYPE=bfloat16 "${PYTEST[@]}" \
    tests/test_streamers.py -k "states_and_features"
  run_stage ttft 150 ttft.log "$PY" -m agent.bench ttft --nest tiny --llm tiny --device cpu --dtype float32 \
    --seconds 1 --repeats 1
  run_stage load 150 load.log "$PY" -m agent.bench load --nest tiny --llm tiny --device cpu --dtype float32 \
    --streams 1,2 --duration 6 --json "$RESULTS/load.json"
fi

log "summary ($MODE mode, device $DEVICE, $((SECONDS - START))s of ${BUDGET}s):"
for s in "${STAGES[@]}"; do log "  $s"; done
if [ "$MODE" = cpu ]; then
  log "quick CPU mode: proves the plumbing only; the GPU results come from a run on a CUDA machine"
fi
[ "$FAILED" = 0 ] && log "gpu_check: ALL PASSED" || log "gpu_check: SOME STAGES FAILED"
exit "$FAILED"
