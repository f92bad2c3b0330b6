#!/usr/bin/env bash
# Second GPU call (issue 4): after the fixed-support cache fix, end-to-end memory and speed again (BERT-base,
# 32 x 128, each method in its own process), a torch.profiler breakdown of SparseGrad's step, and what letting the
# matmuls use TF32 changes (layer and end-to-end). Same conventions as gpu.sh (DEVICE, QUICK, OUT, PYTHON).
set -uo pipefail
out=${OUT:-.}
dev=${DEVICE:-cuda}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$out"
if [ "${QUICK:-0}" = 1 ]; then
  e2e="--model tiny --batch-size 4 --length 32 --steps 2 --warmup 1" shapes=1536x384 rounds="--rounds 2 --warmup 1"
else
  e2e="--model bert-base --batch-size 32 --length 128 --steps 20 --warmup 3" shapes=3072x768,11008x4096
  rounds="--rounds 20 --warmup 3"
fi
SECONDS=0
one() {  # scope method [flags...]
  local scope=$1 m=$2; shift 2
  timeout 60 $py benchmarks/e2e_step.py --device "$dev" $e2e --method "$m" --train-scope "$scope" "$@" \
    >>"$out/gpu2_e2e.jsonl" || echo "{\"method\": \"$m\", \"scope\": \"$scope\", \"error\": \"failed or over 60 s\"}" >>"$out/gpu2_e2e.jsonl"
}
: > "$out/gpu2_e2e.jsonl"
for m in full lora sparsegrad sparsegrad-fixed; do one all $m; done
for m in full lora sparsegrad-fixed; do one mlp $m; done
$py benchmarks/e2e_step.py --table "$out/gpu2_e2e.jsonl" | tee "$out/gpu2_e2e.md"
echo "e2e done at $SECONDS s"
timeout 60 $py benchmarks/e2e_step.py --device "$dev" $e2e --method sparsegrad --train-scope all --profile \
  --steps 3 --warmup 2 > "$out/gpu2_profile.txt" 2>&1
timeout 60 $py benchmarks/e2e_step.py --device "$dev" $e2e --method sparsegrad-fixed --train-scope all --profile \
  --steps 3 --warmup 2 >> "$out/gpu2_profile.txt" 2>&1
echo "profile done at $SECONDS s"
: > "$out/gpu2_tf32.jsonl"
for m in full lora sparsegrad sparsegrad-fixed; do
  timeout 60 $py benchmarks/e2e_step.py --device "$dev" $e2e --method "$m" --train-scope all --tf32 >>"$out/gpu2_tf32.jsonl"
done
$py benchmarks/e2e_step.py --table "$out/gpu2_tf32.jsonl" | tee "$out/gpu2_tf32.md"
timeout 90 $py benchmarks/layer_step.py --device "$dev" --shapes "$shapes" --tokens 2048 $rounds --tf32 \
  | tee -a "$out/gpu2_tf32.md"
echo "gpu_followup.sh done in $SECONDS s"
