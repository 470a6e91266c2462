#!/usr/bin/env bash
# Issue 16's GPU checks as one script: peers (SFT, DPO; TRL defaults, same work, TRL + Liger;
# 32k and 128k vocabularies), and SFT MFU on a 1.1B Llama at sequence length 2048.
#
#   bash benchmarks/gpu/run.sh OUT_DIR            # on one CUDA GPU: about 10 minutes in all
#   bash benchmarks/gpu/run.sh OUT_DIR --dry-run  # the same commands, tiny, on the CPU (no Liger)
#
# Each step has its own time limit, so one slow step cannot eat the others' time; a step that
# fails is reported and the script goes on. The GPU machine needs trl, datasets and
# liger-kernel (carry wheels where it has no network). Results: OUT_DIR/<step>/results.{md,json};
# a profile (torch.profiler) of the DPO step lands in OUT_DIR/dpo_profile.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: run.sh OUT_DIR [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
PEERS=benchmarks/peers/run.py
if [ "$DRY" = "--dry-run" ]; then
  G="--device cpu --hidden 64 --layers 2 --max-length 64 --min-len 16 --max-len 48 --batch-size 4 --steps 4 --warmup 1 --repeats 1"
  V32="--vocab 512"; V128="--vocab 2048"; LIGER=""; MFU="--smoke"; LIMIT=300
else
  G="--device cuda --precision bf16 --hidden 1024 --layers 8 --max-length 1024 --min-len 512 --max-len 1000 --batch-size 8 --steps 20 --warmup 4 --repeats 2"
  V32="--vocab 32000"; V128="--vocab 128000"; LIGER="--liger"; MFU=""; LIMIT=150
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" || true
fi
status=0
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}
step sft_same     $LIMIT python $PEERS $G $V32 --lr 1e-4 --checkpointing off --out "$OUT/sft_same"
step sft_liger    $LIMIT python $PEERS $G $V32 --lr 1e-4 --checkpointing off $LIGER --out "$OUT/sft_liger"
step sft_liger128 $LIMIT python $PEERS $G $V128 --lr 1e-4 --checkpointing off $LIGER --out "$OUT/sft_liger128"
step dpo_same     $LIMIT python $PEERS $G $V32 --method dpo --reference cached --checkpointing off --out "$OUT/dpo_same"
step dpo_defaults $LIMIT python $PEERS $G $V32 --method dpo --out "$OUT/dpo_defaults"
step mfu          $((LIMIT + 60)) python benchmarks/mfu/run.py $MFU --out "$OUT/mfu"
step dpo_profile  90 python $PEERS $G $V32 --method dpo --steps 8 --warmup 2 --repeats 1 --profile --out "$OUT/dpo_profile"
exit $status
