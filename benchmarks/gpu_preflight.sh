#!/bin/bash
# Rehearses a lent GPU machine's run on this CPU, so the device's 15 minutes are not spent finding out that the
# script or the code does not run there (`make gpu-preflight`, PREFLIGHT=pretrain for the workflows' bundle):
#   bash benchmarks/gpu_preflight.sh targets    # ~4 min after the first venv build (~5 GB, a minute or two)
#   bash benchmarks/gpu_preflight.sh pretrain   # + the pretrain bundle: Ray, DeepSpeed, decord, PyAV (~10 min)
# The machine's own Python and torch (KINDS.md: Python 3.12, torch 2.11.0+cu130; the CUDA build runs on the CPU)
# go into $GPU_VENV with stand-ins for what its image holds and the checks import, never the project's other
# packages: those come from the bundle (benchmarks/gpu_bundle.sh), unpacked as gpu_checks.sh unpacks it. Then:
#   targets: tests/dist_model under that torch (its compile tests: fullgraph with that dynamo), one train_step
#            compiled as the targets rows are (--compile --compile-frozen, dist_tiny), gpu_checks.sh targets DRY_RUN
#   pretrain: also a CPU smoke pre-training run through the carried Ray and DeepSpeed (train.compile=all)
# Versions: GPU_PYTHON (a python3.12), GPU_TORCH, GPU_TORCHVISION. Logs in $OUT (default /tmp/gpu_preflight).
set -euo pipefail
MODE=${1:-targets}
case "$MODE" in targets|pretrain) ;; *) echo "usage: bash benchmarks/gpu_preflight.sh targets|pretrain" >&2; exit 2 ;; esac
REPO=$PWD
OUT=${OUT:-/tmp/gpu_preflight}
GPU_VENV=$(realpath -m "${GPU_VENV:-.venv-gpu}")  # absolute: used from other directories below
GPU_TORCH=${GPU_TORCH:-2.11.0}
GPU_TORCHVISION=${GPU_TORCHVISION:-0.26.0}
is_312() { "$1" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; }
if [ -z "${GPU_PYTHON:-}" ]; then  # python3.12 on PATH, else pyenv's (its shim fails when 3.12 is not selected)
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if is_312 "$candidate"; then GPU_PYTHON=$candidate; break; fi
  done
fi
is_312 "${GPU_PYTHON:-none}" || { echo "needs a Python 3.12 (the GPU machines'): set GPU_PYTHON" >&2; exit 3; }
mkdir -p "$OUT"
START=$(date +%s)
say() { echo "=== $* ($(( $(date +%s) - START )) s)"; }
fail() { echo "preflight $MODE FAILED: $*" >&2; exit 1; }
quiet_pip() {  # pip's exit status, without this machine's "Location ... is ignored" warnings
  local log rc=0; log=$(mktemp)
  "$GPU_VENV/bin/python" -m pip "$@" > "$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" || true; rm -f "$log"; return $rc
}

# What the image holds (KINDS.md's package list) that the checks import, less what the bundle must bring: for
# pretrain, the part of Ray's, DeepSpeed's and the data stack's closure that gpu_bundle.sh leaves to the image, and
# matplotlib (the run's plots).
IMAGE=(numpy psutil regex huggingface_hub safetensors timm tqdm pyyaml pytest pytest-timeout)
[ "$MODE" = pretrain ] && IMAGE+=(aiohappyeyeballs aiohttp aiosignal anyio attrs certifi charset-normalizer click
  einops filelock frozenlist fsspec grpcio h11 hf-xet idna jinja2 markupsafe msgpack multidict networkx ninja
  opencv-python-headless packaging pandas pillow prometheus-client propcache protobuf py-cpuinfo pyarrow
  python-dateutil requests setuptools six sympy typing-extensions urllib3 wrapt yarl matplotlib)
stamp="$GPU_VENV/.stamp-$(echo "$GPU_PYTHON $GPU_TORCH ${IMAGE[*]}" | md5sum | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  say "venv $GPU_VENV: $("$GPU_PYTHON" --version), torch $GPU_TORCH and the image's ${#IMAGE[@]} stand-ins"
  rm -rf "$GPU_VENV"
  "$GPU_PYTHON" -m venv "$GPU_VENV"
  quiet_pip install --quiet --upgrade pip
  quiet_pip install --quiet "torch==$GPU_TORCH" "torchvision==$GPU_TORCHVISION" "${IMAGE[@]}"
  touch "$stamp"
fi
for p in open_clip ray deepspeed; do  # the bundle's packages must not be in the venv, or the rehearsal proves nothing
  if "$GPU_VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$p') is None)"; then
    echo "$GPU_VENV holds $p: the bundle would not be tested; remove $GPU_VENV" >&2; exit 3
  fi
done

say "bundle ($MODE)"
bash benchmarks/gpu_bundle.sh "$MODE"
export SITE=$(mktemp -d) PATH="$GPU_VENV/bin:$PATH" PYTHONUNBUFFERED=1 RAY_ADDRESS=
bash benchmarks/gpu_checks.sh unpack || fail "unpacking .gpu"  # gpu_checks.sh's own unpack, as on the machine
export PYTHONPATH="$SITE:$REPO"
python -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"

say "tests/dist_model under torch $GPU_TORCH"
python -m pytest -p no:cacheprovider tests/dist_model > "$OUT/dist_model_tests.log" 2>&1 \
  || { tail -30 "$OUT/dist_model_tests.log"; fail "tests/dist_model under torch $GPU_TORCH"; }
tail -1 "$OUT/dist_model_tests.log"
say "train_step compiled as the targets rows are (dist_tiny, CPU)"
python -m benchmarks.train_step --device cpu --dtype bf16 --preset dist_tiny --matmul-size 256 --batch 2 --steps 2 \
  --warmup 1 --compile --compile-frozen > "$OUT/train_step_compiled.log" 2>&1 \
  || { tail -30 "$OUT/train_step_compiled.log"; fail "the compiled train_step"; }
tail -1 "$OUT/train_step_compiled.log"
say "gpu_checks.sh targets, DRY_RUN"
DRY_RUN=1 OUT="$OUT/targets" PYTHON=python bash benchmarks/gpu_checks.sh targets > "$OUT/targets_dry_run.log" 2>&1 \
  || { tail -30 "$OUT/targets_dry_run.log"; fail "gpu_checks.sh targets (DRY_RUN)"; }
tail -4 "$OUT/targets_dry_run.log"
if grep -q "FAILED" "$OUT/targets_dry_run.log"; then fail "a targets row: $OUT/targets_dry_run.log"; fi

if [ "$MODE" = pretrain ]; then
  say "smoke pre-training on the CPU through the carried Ray and DeepSpeed, both parts compiled (train.compile=all)"
  [ -f data/sample/labels.json ] || python -m workflows data sample --out data/sample --videos-per-class 4 \
    > "$OUT/sample.log" 2>&1 || fail "writing the sample data: $OUT/sample.log"
  runs=$(mktemp -d)  # RAY_ADDRESS=local: its own Ray under this Python, never a cluster already running here
  RAY_ADDRESS=local python -m workflows pretrain --config workflows/configs/smoke.yaml --set mlflow.enabled=false train.compile=all \
    "run.storage_path=$runs" run.name=preflight > "$OUT/pretrain_smoke.log" 2>&1 \
    || { tail -30 "$OUT/pretrain_smoke.log"; fail "the smoke pre-training run"; }
  grep "\[pretrain\]" "$OUT/pretrain_smoke.log" | tail -3
  ls "$runs"/preflight/checkpoint_* > /dev/null || fail "no checkpoint written: $OUT/pretrain_smoke.log"
  rm -rf "$runs"
fi
rm -rf "$SITE"
say "preflight $MODE passed"
