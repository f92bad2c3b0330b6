#!/usr/bin/env bash
# GPU check (issue 4), one script: the layer micro-benchmark, the end-to-end step at BERT-base size (random init:
# time and memory only) for the four methods in both scopes, and calibration at BERT-base and LLaMA-2-7B shapes, on
# CUDA, with torch.cuda.max_memory_allocated and steps/s, to set beside the paper's Table 3 (RoBERTa-base:
# FT 4.11 steps/s / 1345 MB, LoRA 4.7 / 944, SparseGrad 4.3 / 1016).
#
#   OUT=/tmp/gpu bash benchmarks/gpu.sh                  # on a CUDA machine with torch, transformers, peft
#   OUT=/tmp/gpu bash benchmarks/gpu.sh followup         # the second call: e2e again, profiler, TF32
#   DEVICE=cpu QUICK=1 OUT=/tmp/gpu bash benchmarks/gpu.sh   # smoke test of this script on a CPU, tiny sizes
#
# followup (run after the fixed-support cache fix): end-to-end memory and speed again (BERT-base, 32 x 128, each
# method in its own process), a torch.profiler breakdown of SparseGrad's step, and what letting the matmuls use
# TF32 changes (layer and end-to-end).
#
# Runs from the repository root without installing (PYTHONPATH=src). Each part has its own time limit and writes
# its own file under $OUT, so one part failing or running long does not lose the others. About 5 minutes on an H200.
set -uo pipefail
out=${OUT:-.}
dev=${DEVICE:-cuda}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
part=${1:-main}
mkdir -p "$out"
if [ "${QUICK:-0}" = 1 ]; then
  shapes=1536x384 tokens=512 rounds="--rounds 2 --warmup 1" e2e="--model tiny --batch-size 4 --length 32 --steps 2 --warmup 1"
  calib=("1536x384 24") limit=120
else
  shapes=3072x768,768x3072,1536x576,11008x4096,4096x11008 tokens=512,2048,16384 rounds="--rounds 20 --warmup 3"
  e2e="--model bert-base --batch-size 32 --length 128 --steps 20 --warmup 3"
  calib=("3072x768 132" "11008x4096 120") limit=100
fi
e2e() {  # FILE SCOPE METHOD [flags...]: one end-to-end run in its own process (peak memory per process)
  local file=$1 scope=$2 m=$3; shift 3
  timeout 60 $py benchmarks/e2e_step.py --device "$dev" $e2e --method "$m" --train-scope "$scope" "$@" >>"$file" \
    || echo "{\"method\": \"$m\", \"scope\": \"$scope\", \"error\": \"failed or over 60 s\"}" >>"$file"
}
SECONDS=0
if [ "$part" = followup ]; then
  : > "$out/gpu2_e2e.jsonl"
  for m in full lora sparsegrad sparsegrad-fixed; do e2e "$out/gpu2_e2e.jsonl" all $m; done
  for m in full lora sparsegrad-fixed; do e2e "$out/gpu2_e2e.jsonl" mlp $m; done
  $py benchmarks/e2e_step.py --table "$out/gpu2_e2e.jsonl" | tee "$out/gpu2_e2e.md"
  : > "$out/gpu2_profile.txt"
  for m in sparsegrad sparsegrad-fixed; do
    timeout 60 $py benchmarks/e2e_step.py --device "$dev" $e2e --method $m --train-scope all --profile \
      --steps 3 --warmup 2 >> "$out/gpu2_profile.txt" 2>&1
  done
  : > "$out/gpu2_tf32.jsonl"
  for m in full lora sparsegrad sparsegrad-fixed; do e2e "$out/gpu2_tf32.jsonl" all $m --tf32; done
  $py benchmarks/e2e_step.py --table "$out/gpu2_tf32.jsonl" | tee "$out/gpu2_tf32.md"
  timeout 90 $py benchmarks/layer_step.py --device "$dev" --shapes "$shapes" --tokens 2048 $rounds --tf32 \
    | tee -a "$out/gpu2_tf32.md"
else
  { $py -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    [ "$dev" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } | tee "$out/gpu_env.txt"
  timeout 150 $py benchmarks/layer_step.py --device "$dev" --shapes "$shapes" --tokens "$tokens" $rounds \
    --plot "$out/gpu_layer.png" | tee "$out/gpu_layer.md"
  # Parts in order of importance, so that a call cut short keeps the ones that matter most.
  : > "$out/gpu_e2e.jsonl"
  for m in full lora meprop sparsegrad sparsegrad-fixed; do e2e "$out/gpu_e2e.jsonl" all $m; done
  $py benchmarks/e2e_step.py --table "$out/gpu_e2e.jsonl" | tee "$out/gpu_e2e.md"
  : > "$out/gpu_calib.md"
  for c in "${calib[@]}"; do
    set -- $c
    $py benchmarks/calib_shapes.py --device "$dev" --shape "$1" --slices "$2" --timeout "$limit" | tee -a "$out/gpu_calib.md"
  done
  for m in full lora meprop sparsegrad sparsegrad-fixed; do e2e "$out/gpu_e2e.jsonl" mlp $m; done
  $py benchmarks/e2e_step.py --table "$out/gpu_e2e.jsonl" | tee "$out/gpu_e2e.md"
fi
echo "gpu.sh $part done in $SECONDS s"
