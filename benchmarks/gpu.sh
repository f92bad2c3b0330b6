#!/usr/bin/env bash
# GPU check (issue 4): the layer micro-benchmark and the end-to-end step at BERT-base size on CUDA, for the four
# methods, with torch.cuda.max_memory_allocated and steps/s, to set beside the paper's Table 3 (RoBERTa-base:
# FT 4.11 steps/s / 1345 MB, LoRA 4.7 / 944, SparseGrad 4.3 / 1016). Random init is fine for time and memory.
# Needs a CUDA build of torch and transformers/peft installed. Under 8 minutes on an H100. Writes into ${OUT:-.}.
set -euo pipefail
out=${OUT:-.}
python benchmarks/layer_step.py --device cuda --shapes 3072x768,768x3072,11008x4096 --tokens 512,2048,16384 \
  --rounds 20 --warmup 3 | tee "$out/gpu_layer.md"
for m in full lora meprop sparsegrad sparsegrad-fixed; do
  python benchmarks/e2e_step.py --device cuda --model bert-base --method "$m" --batch-size 32 --length 128 \
    --steps 20 --warmup 3 --train-scope all | tee -a "$out/gpu_e2e.jsonl"
done
