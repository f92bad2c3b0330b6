#!/usr/bin/env bash
# The issue-3 comparison: 5 methods x 3 seeds, bbc and tweets, mlp and all scopes (one process per run).
# Usage: bash benchmarks/compare_all.sh [OUT=runs/compare]
set -euo pipefail
out=${1:-runs/compare}
methods=full,lora,meprop,sparsegrad,sparsegrad-fixed
for scope in mlp all; do
  sparsegrad compare --task bbc --methods $methods --seeds 0,1,2 --train-scope $scope \
    --max-train 512 --max-eval 400 --max-length 128 --batch-size 16 --no-progress --output-dir "$out/bbc-$scope"
  sparsegrad compare --task tweets --methods $methods --seeds 0,1,2 --train-scope $scope \
    --max-train 1024 --max-eval 1000 --max-length 64 --batch-size 16 --no-progress --output-dir "$out/tweets-$scope"
done
