#!/usr/bin/env bash
# One call on the lent GPU machine: the GPU tests and the GPU benchmarks, each bounded in time, logs and
# JSON under $OUT. Run from the repository root with .whl/ and pdserve/v1/ carried (see CONTRIBUTING in
# README "Benchmarks"); phases are arguments, in order:
#   bash bench/gpu_suite.sh tests prefill transfer serving
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/*.whl \
  && export PYTHONPATH=$PWD/.site:$PWD || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
model=${MODEL:-preset:llama-8b}
for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    tests)
      timeout 330 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_data_plane.py tests/test_cuda_graphs.py \
        2>&1 | tee "$out/tests.log" | tail -25 ;;
    kill)
      timeout 260 python3 -m pytest -q -x -s -p no:cacheprovider tests/test_gpu_data_plane.py -k nothing_is_left \
        > "$out/kill.log" 2>&1; grep -v "^\s*$" "$out/kill.log" | grep -i "passed\|failed\|error\|critical\|assert" | tail -30 ;;
    graphs)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tail -5 ;;
    ttft)
      timeout 240 python3 -m bench.transfer --device cuda --model "$model" --skip-wire --ttft-lengths 2048,8190 \
        --overlap-length 8190 --ttft-transports "cuda_ipc,grpc x4" --repeats 2 --threads 4 --kv-budget 20GiB \
        --out "$out/ttft.json" > "$out/ttft.log" 2>&1
      grep -A12 "^| transport" "$out/ttft.log"; grep -A14 "Per-layer timeline, cuda_ipc" "$out/ttft.log" ;;
    prefill)
      timeout 240 python3 -m bench.prefill --model "$model" --repeats 3 --profile 8192 --out "$out/prefill.json" \
        > "$out/prefill.log" 2>&1; grep -A10 "^| case" "$out/prefill.log" ;;
    transfer)
      timeout 300 python3 -m bench.transfer --device cuda --model "$model" --shapes "Llama-8B shape bf16" \
        --lengths 2048,8192,32768 --streams 1,4 --repeats 2 --ttft-lengths 2048,8190 --overlap-length 8190 \
        --threads 4 --kv-budget 20GiB --out "$out/transfer.json" > "$out/transfer.log" 2>&1
      grep -A12 "^| KV shape\|^| transport" "$out/transfer.log" ;;
    serving)
      timeout 420 python3 -m pdserve_cli bench --start disagg,colocated-chunked --device cuda --model "$model" \
        --dataset long --num-requests 48 --input-len 128:1024 --output-len 64:256 --long-len 4096:7000 \
        --long-every 4 --request-rate 6 --kv-budget 30GiB --ttft-slo-ms 1000 --tpot-slo-ms 50 --no-plots \
        --out "$out/serving.json" > "$out/serving.log" 2>&1
      tail -40 "$out/serving.log" ;;
    decode-profile)
      timeout 240 python3 -m bench.decode_profile --model "$model" --concurrency 1,32 > "$out/decode_profile.log" 2>&1
      grep -A16 "^concurrency" "$out/decode_profile.log" | cut -c1-160 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
