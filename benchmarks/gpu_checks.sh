#!/bin/bash
# GPU acceptance checks, run from the repository root on one machine with a GPU:
#   bash benchmarks/gpu_checks.sh targets          # issue 22's target table: train_step runs in order of importance
#                                                  # within BUDGET_S seconds (default 480), tables in $OUT/targets.md
#   bash benchmarks/gpu_checks.sh pretrain         # the GPU path of the workflows, end to end (~8 min on an H100)
#   bash benchmarks/gpu_checks.sh train_step       # B/16 8+16f batch 16, bf16, the whole step compiled (fullgraph)
#   bash benchmarks/gpu_checks.sh train_step_more  # the same with CUDA graphs, and L/14 32+64f (longer)
# Logs go to $OUT (default /tmp/gpu_checks). Needs the sample data: `python -m workflows data sample --out data/sample` writes it.
# DRY_RUN=1 runs the train_step modes' logic on this machine's CPU (dist_tiny, eager, one step; tests/test_benchmarks.py).
# Machines without the project's packages: `bash benchmarks/gpu_bundle.sh targets|pretrain` puts a bundle in .gpu/
# (carry it); it is unpacked into $SITE (/tmp/site) and put first on PYTHONPATH (`unpack`: only that). Rehearse first:
# `make gpu-preflight`.
set -u
REPO=$PWD
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SITE=${SITE:-/tmp/site}  # where .gpu is unpacked (gpu_preflight.sh points it at a fresh folder)
if [ -d "$REPO/.gpu" ]; then
  export PYTHONPATH=$SITE:$REPO
  if [ ! -e "$SITE/.unpacked" ]; then  # once per machine: a later call on the same warm machine reuses it
    mkdir -p "$SITE" && (cd "$SITE" && shopt -s nullglob && for t in "$REPO"/.gpu/*.tar.xz; do tar xJf "$t"; done \
      && for w in "$REPO"/.gpu/whl/*.whl; do python3 -m zipfile -e "$w" . ; done) && touch "$SITE/.unpacked" || exit 3
  fi
fi
[ "${1:-}" = unpack ] && exit 0  # only the above (gpu_preflight.sh)
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-python3}
START=$(date +%s)
date
[ "$DRY_RUN" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
case "${1:-}" in
train_step*|targets)  # the benchmark needs torch and open_clip only: a machine without Ray or DeepSpeed can run it
  [ "$DRY_RUN" = 1 ] && GPU_NAME= || GPU_NAME=",torch.cuda.get_device_name()"
  $PYTHON -c "import torch,open_clip;print('torch',torch.__version__$GPU_NAME)" || exit 4 ;;
*)
  python3 -c "import torch,ray,deepspeed,decord,av,open_clip;print('torch',torch.__version__,torch.cuda.get_device_name(),'ray',ray.__version__,'deepspeed',deepspeed.__version__)" || exit 4 ;;
esac
# One train_step run: B/16 at batch 16 compiles three variants (~1-2 min each); a hung compile must not eat the rest.
# Each run gets STEP_TIMEOUT seconds or what is left of BUDGET_S, whichever is less; with under MIN_STEP_S left it is
# skipped (its log says so), so the runs that matter most go first.
RAN=()  # every row's log, skipped or not, in order (what `targets` reads)
step() {
  name=$1; shift
  RAN+=("$OUT/$name.log")
  budget=${BUDGET_S:-100000}
  left=$(( budget - ($(date +%s) - START) ))
  limit=$(( left < ${STEP_TIMEOUT:-480} ? left : ${STEP_TIMEOUT:-480} ))
  if [ "$limit" -lt "${MIN_STEP_S:-60}" ]; then
    echo "=== $name SKIPPED: ${left} s left of BUDGET_S=$budget" | tee "$OUT/$name.log"; return
  fi
  args=()
  if [ "$DRY_RUN" = 1 ]; then  # this machine's CPU: the tiny preset, eager (compiling takes minutes here), one step
    skip=0
    for a in "$@"; do
      if [ "$skip" = 1 ]; then skip=0; continue; fi
      case "$a" in --compile|--compile-frozen) ;; --compile-mode) skip=1 ;; *) args+=("$a") ;; esac
    done
    args+=(--device cpu --preset dist_tiny --matmul-size 256 --steps 1 --warmup 1 --max-batch 4)
  else
    args=("$@")
  fi
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" $PYTHON -m benchmarks.train_step --device cuda --dtype bf16 --matmul-size 8192 "${args[@]}" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "=== $name FAILED: exit $rc (124: over its ${limit} s limit)" | tee -a "$OUT/$name.log"
}
case "${1:-}" in
targets)  # issue 22: the rows its target table needs, most important first; the tables go to $OUT/targets.md
  BUDGET_S=${BUDGET_S:-480}
  C="--compile --compile-frozen"
  # Profiled too (3 more steps per variant): where the step goes, for the next change, whatever the verdicts.
  step b16_bs16_compiled --preset dist_b16_k400 --batch 16 --steps 10 --warmup 3 $C --profile "$OUT/b16_bs16_profile.txt"
  step b16_max_compiled --preset dist_b16_k400 --batch max --steps 5 --warmup 2 $C
  step b16_bs16_cudagraphs --preset dist_b16_k400 --batch 16 --steps 10 --warmup 3 $C --compile-mode reduce-overhead
  step l14_max_compiled --preset dist_l14_k400 --batch max --max-batch 32 --steps 4 --warmup 2 $C
  $PYTHON -m benchmarks.targets "${RAN[@]}" --out "$OUT/targets.md"
  echo "=== $(( $(date +%s) - START )) s in all"
  ;;
train_step)  # the whole DiST step compiled with fullgraph=True (frozen CLIP forward + branch forward/backward), and the
  # baselines compiled whole (fullgraph too): the issue-22 row at batch 16. Eager rows: benchmarks/README.md
  step train_step_b16_bs16_compiled --preset dist_b16_k400 --batch 16 --steps 10 --warmup 3 --compile --compile-frozen
  ;;
train_step_more)  # with CUDA graphs (reduce-overhead), and L/14 32+64f
  step train_step_b16_bs16_cudagraphs --preset dist_b16_k400 --batch 16 --steps 10 --warmup 3 --compile --compile-frozen --compile-mode reduce-overhead
  step train_step_l14_bs2_cudagraphs --preset dist_l14_k400 --batch 2 --steps 6 --warmup 3 --compile --compile-frozen --compile-mode reduce-overhead
  ;;
pretrain)
  RUNS=$OUT/runs
  rm -rf "$RUNS"
  S="scaling.use_gpu=true scaling.num_workers=1 scaling.cpus_per_worker=2 train.precision=bf16 mlflow.enabled=false run.storage_path=$RUNS"
  B16="model.clip_pretrained=null data.train_manifest=data/sample/train.csv data.val_manifest=data/sample/val.csv data.labels=data/sample/labels.json data.decode_node_label=null scaling.worker_node_label=null scaling.wait_for_nodes_s=0 scaling.cpus_per_worker=8 train.global_batch_size=8 train.micro_batch_size=8 train.warmup_epochs=0 train.log_every_steps=5 eval.batch_size=8 run.max_failures=1"
  show() { grep "\[pretrain\]\|rror" | tail -"$1"; }
  echo "=== smoke, bf16, NCCL, a worker failure injected at step 4"; date
  python3 -m workflows pretrain --config workflows/configs/smoke.yaml --set $S run.name=gpu-smoke train.fail_at_step=4 2>&1 | tee "$OUT/smoke.log" | show 30
  echo "=== relaunch with the same name: resumes, runs to 9 steps"; date
  python3 -m workflows pretrain --config workflows/configs/smoke.yaml --set $S run.name=gpu-smoke train.max_steps=9 2>&1 | tee "$OUT/resume.log" | show 20
  echo "=== evaluate the checkpoint on the GPU"; date
  python3 -m workflows evaluate --checkpoint "$RUNS/gpu-smoke" --no-mlflow --out "$OUT/eval_smoke" 2>&1 | tee "$OUT/eval.log" | tail -12
  echo "=== predict on the GPU"; date
  python3 -m workflows predict --checkpoint "$RUNS/gpu-smoke" --device cuda $(find data/sample/videos -name "*.mp4" | sort | head -2) 2>&1 | tail -14
  echo "=== ViT-B/16 8+16f at full size, bf16, eager"; date
  python3 -m workflows pretrain --config workflows/configs/k710_b16_8x16f.yaml --set $S $B16 run.name=gpu-b16 train.max_steps=20 eval.every_steps=10 2>&1 | tee "$OUT/b16.log" | show 25
  echo "=== ViT-B/16, train.compile=true"; date
  python3 -m workflows pretrain --config workflows/configs/k710_b16_8x16f.yaml --set $S $B16 run.name=gpu-b16c train.max_steps=10 eval.every_steps=10 train.compile=true 2>&1 | tee "$OUT/b16c.log" | show 15
  echo "=== ViT-B/16, train.micro_batch_size=auto at global batch 256 on one GPU (the probe, then 3 steps)"; date
  python3 -m workflows pretrain --config workflows/configs/k710_b16_8x16f.yaml --set $S $B16 run.name=gpu-b16auto train.max_steps=3 eval.every_steps=10 train.global_batch_size=256 train.micro_batch_size=auto 2>&1 | tee "$OUT/b16auto.log" | show 12
  date
  ;;
*)
  echo "usage: bash benchmarks/gpu_checks.sh targets|pretrain|train_step|train_step_more" >&2; exit 2
  ;;
esac
