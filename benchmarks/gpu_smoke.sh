#!/usr/bin/env bash
# GPU smoke of issue #19 (benchmarks/gpu_smoke.py says what each check does).
#
#   bash benchmarks/gpu_smoke.sh [--out DIR]     on the lent GPU machine, from the repo root; with
#                                                the device tool:
#       run(command="bash benchmarks/gpu_smoke.sh", carry=["benchmarks/gpu_smoke_wheels"], timeout_s=570)
#     installs the carried wheels and the project (no network there), runs the checks (one line
#     each) and writes gpu_smoke.json, gpu_smoke.log, install.json/.log, train.log and
#     train_metrics.jsonl under $OUT (6 files: the tool brings back at most 8). ~8 minutes at most.
#
#   bash benchmarks/gpu_smoke.sh --fetch-wheels  here: download the carried wheels (gitignored)
#                                                into benchmarks/gpu_smoke_wheels/, sha256-checked
#
#   bash benchmarks/gpu_smoke.sh --rehearse [--reuse-venv]   here, no GPU: copy what would travel
#     (tracked + untracked-not-ignored files + the carried folder) to a scratch folder and check its
#     size, build a fresh venv like the lent image (python3.11 here, CPU torch 2.13.0, triton 3.6.0,
#     transformers 5.17.0, no liger/datasets), run the same install step in it, run the checks up
#     to the first CUDA call, then the same checks at tiny shapes on CPU (Triton kernels through
#     Triton's interpreter) and the torchrun step on CPU/gloo with the same config overrides.
set -euo pipefail

# The body is one function, read whole before it runs: editing this file while a rehearsal runs
# cannot make bash resume at a shifted offset.
main() {
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODE=gpu
OUTDIR="${OUT:-$ROOT/runs/gpu_smoke}"
REUSE_VENV=0
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) MODE=fetch ;;
    --rehearse) MODE=rehearse ;;
    --reuse-venv) REUSE_VENV=1 ;;
    --out) OUTDIR="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = fetch ]; then
  PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
  exec "$PY" benchmarks/gpu_smoke.py fetch-wheels
fi

if [ "$MODE" = gpu ]; then
  # The whole smoke, install and compiles included, counts against the budget from here.
  export GPU_SMOKE_T0="$(date +%s)" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"   # no network there
  PY="${PYTHON:-python3}"
  mkdir -p "$OUTDIR"
  exec > >(tee -a "$OUTDIR/gpu_smoke.log") 2>&1
  echo "gpu_smoke: $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo no-git) on $(hostname); $("$PY" -V 2>&1)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu_smoke: /' || true
  rc=0
  "$PY" benchmarks/gpu_smoke.py install --out "$OUTDIR" || rc=$?
  if [ $rc -ne 0 ] && ! (cd /tmp && "$PY" -c "import axpo.kernels") 2>/dev/null; then
    echo "FAIL gpu_smoke: the project does not import after the install step (install.log)"; exit 1
  fi
  # A hard stop 30 s past the budget (counted from the start, install included), so a hang still
  # leaves gpu_smoke.json (rewritten after every check) and the device tool's own limit is never
  # what ends the run.
  hard=$(( ${GPU_SMOKE_BUDGET_S:-480} + 30 - ($(date +%s) - GPU_SMOKE_T0) ))
  timeout --signal=TERM --kill-after=10 "$hard" "$PY" benchmarks/gpu_smoke.py run --out "$OUTDIR" || rc=$?
  exit $rc
fi

# ---- rehearse (here, no GPU) ----------------------------------------------------------------
REH="${GPU_SMOKE_REHEARSE_DIR:-/tmp/axpo_gpu_smoke_rehearse}"
VENV="$REH/venv"
TREE="$REH/tree"
OUTDIR="$REH/out"
BASE_PY="${BASE_PYTHON:-python3.11}"
mkdir -p "$REH"
rm -rf "$TREE" "$OUTDIR"
mkdir -p "$TREE" "$OUTDIR"

# 1. What the device tool would send: tracked + untracked-not-ignored files, plus the carried folder.
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -C "$TREE" -xf -
tar -cf - benchmarks/gpu_smoke_wheels | tar -C "$TREE" -xf -
bytes=$(du -sb "$TREE" | cut -f1)
limit=$((64 * 1024 * 1024))
echo "rehearse: the tree that travels is $((bytes / 1024 / 1024)) MiB (limit 64 MiB), carried: benchmarks/gpu_smoke_wheels"
if [ "$bytes" -gt "$limit" ]; then echo "FAIL rehearse: over the 64 MiB that travel"; exit 1; fi
for w in $(grep -Eo '^[A-Za-z0-9._-]+==[^ ]+' benchmarks/gpu_smoke_wheels/wheels.txt); do
  n="${w%%==*}"; v="${w##*==}"
  ls "$TREE"/benchmarks/gpu_smoke_wheels/"${n//-/_}"-"$v"-*.whl >/dev/null 2>&1 \
    || { echo "FAIL rehearse: $w is not in benchmarks/gpu_smoke_wheels (run --fetch-wheels first)"; exit 1; }
done

# 2. A fresh venv shaped like the lent image: its packages (KINDS.md) at the versions that matter,
#    CPU torch 2.13.0 here in place of its 2.11.0+cu130 (the CUDA build cannot run here).
if [ "$REUSE_VENV" = 0 ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" "triton==3.6.0" "transformers==5.17.0" \
    "tokenizers>=0.23.1,<0.24" "huggingface-hub>=1.31,<2" "safetensors>=0.8" numpy pyyaml pillow tqdm \
    matplotlib tensorboard pybind11 setuptools wheel pyarrow regex typer packaging \
    "numpy<2.4"
  # numpy<2.4 (the image has 2.5.2): triton 3.6's interpreter, used only by this rehearsal's tiny
  # CPU run, turns 1-element arrays into ints, which numpy >= 2.4 refuses ("only 0-dimensional
  # arrays can be converted to Python scalars"); compiled kernels on the GPU never meet it.
fi
echo "rehearse: venv $VENV ($("$VENV/bin/python" -V 2>&1); torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"

# 3. The install step exactly as the lent machine runs it, in the copied tree.
cd "$TREE"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" benchmarks/gpu_smoke.py install --out "$OUTDIR"
# 4. The run up to the first CUDA call.
"$VENV/bin/python" benchmarks/gpu_smoke.py run --rehearse --out "$OUTDIR/rehearse"
# 5. The same checks at tiny shapes on CPU, the Triton kernels through triton 3.6's interpreter,
#    and the torchrun step on CPU/gloo with the GPU run's config overrides.
TRITON_INTERPRET=1 AXPO_KERNEL_BACKEND=triton OMP_NUM_THREADS=2 \
  "$VENV/bin/python" benchmarks/gpu_smoke.py run --tiny --device cpu --out "$OUTDIR/tiny" --work "$REH/work" \
  --budget-s 1800
echo "rehearse: OK; summaries in $OUTDIR (install.json, rehearse/gpu_smoke.json, tiny/gpu_smoke.json)"
}

main "$@"; exit $?   # on one line: bash must not read past it (the file may change meanwhile)
