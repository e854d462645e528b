#!/usr/bin/env bash
# The GPU numbers of the README and of docs/PERF.md's "Targets at a glance", in parts that each take under ten
# minutes on one H100 or H200 (CUDA, sharq importable: installed, or PYTHONPATH=src):
#
#     bash benchmarks/refresh.sh PART OUT_DIR     # PART: gemm, decode, 70b, prefill or all
#
# Each command writes its table (.txt) and its rows (.json) under OUT_DIR, named after the part and the GPU, as
# docs/results/ holds them. Ratios are only compared within one process (each is BF16's on the same path).
set -uo pipefail
usage="usage: bash benchmarks/refresh.sh gemm|decode|70b|prefill|all OUT_DIR"
part=${1:?$usage}
out=${2:?$usage}
case $part in gemm|decode|70b|prefill|all) ;;
  *) echo "unknown part '$part': gemm, decode, 70b, prefill or all" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
# the GPU's model in the file names (h100, h200, a100, ...)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -o -i -E '[a-z][0-9]{2,4}' | head -n 1)
gpu=$(echo "${gpu:-gpu}" | tr '[:upper:]' '[:lower:]')
mkdir -p "$out"
status=0

run() {  # run NAME ARGS...: python benchmarks/ARGS, its table to OUT_DIR/NAME_GPU.txt, its rows to .json
  local name=$1; shift
  echo "== $name: python $*" >&2
  python "$here/$1" "${@:2}" --json "$out/${name}_$gpu.json" | tee "$out/${name}_$gpu.txt" || status=1
}

case $part in gemm|all)  # the GEMM and the layer against BF16 cuBLAS and FP8, the 8B shapes
  run bench_gemm bench_gemm.py --ms 1,4,16,32,64,256,2048,8192 --recipes sharq,sharq-plus ;;
esac
case $part in decode|all)  # compiled + graphed decode (and graph, eager) against BF16 on the same paths
  for b in 1 8 32; do
    run "bench_decode_b$b" bench_decode.py --batches "$b" --recipes sharq --compile --reps 2 --new-tokens 32 \
      --eager-tokens 8
  done ;;
esac
case $part in 70b|all)  # a Llama-3.1-70B-shaped model on one GPU
  run bench_decode_70b bench_decode.py --shape 70b --batches 1 --recipes sharq --compile --reps 2 --new-tokens 16 \
    --eager-tokens 8 --prompt 128 ;;
esac
case $part in prefill|all)  # a 512-token prompt
  for b in 1 8 32; do
    run "prefill512_b$b" bench_decode.py --batches "$b" --prompt 512 --recipes sharq --reps 3 --new-tokens 4 \
      --eager-tokens 4
  done ;;
esac
exit $status
