#!/usr/bin/env bash
# One call on the lent GPU machine: the GPU tests and the GPU benchmarks, each bounded in time, logs and
# JSON under $OUT. Run from the repository root with .whl/ (`bash ../shared/gpu/fetch-wheels.sh
# cryptography==50.0.2 cffi==2.1.1 pycparser==3.12`) and pdserve/v1/ carried (README "Benchmarks");
# phases are arguments, in order:
#   bash bench/gpu_suite.sh tests prefill transfer serving   (also: transfer-quick, ipc-timeline, profile,
#   kill, graphs, ttft, relays-wire, grpc-ceiling, copy-timeline, ...)
# Knobs (environment): MODEL; SERVING_START (configurations, default disagg,colocated-chunked), SERVING_CHUNK
# (colocated-chunked's chunk, default 256), SERVING_LOGS=1 (members' DEBUG logs under $OUT/logs);
# GIL_SWITCH_MS (every Python process's GIL switch interval); DECODE_MODELS, DECODE_MODES (gpu-decode);
# IPC_CONNECTIONS (ipc-timeline, default "default 32"); TESTS_K (tests: pytest -k selection); QUICK_PATHS
# (transfer-quick's wire paths, default "grpc x4,cuda_ipc"), QUICK_STREAMS (the gRPC stream counts those
# paths may name, default 4), QUICK_TTFT (its TTFT transports, e.g. "grpc x8"), WRITE_LANES
# (its receiver's and decode's pool-writer lanes); KV_SENDERS, KV_RECEIVERS (ttft: prefill's kv_senders and
# decode's kv_receivers), TTFT_REPEATS (default 2), RELAY_STREAMS and RELAY_MODES (relays-wire). At most 8 files
# come back from a call: the members' logs come back as one $OUT/logs.tgz.
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/*.whl \
  && export PYTHONPATH=$PWD/.site:$PWD PATH=$PWD/.site/bin:$PATH || exit 1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if [ -n "${GIL_SWITCH_MS:-}" ]; then  # an experiment: every Python process of the call switches the GIL this often
  mkdir -p .gil && echo "import sys; sys.setswitchinterval(${GIL_SWITCH_MS} / 1000)" > .gil/sitecustomize.py
  export PYTHONPATH=$PWD/.gil:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee "$out/gpu.txt"
model=${MODEL:-preset:llama-8b}
for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    tests)
      { timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k device_io 2>&1 | tail -1
        timeout 330 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_data_plane.py ${TESTS_K:+-k "$TESTS_K"} 2>&1
      } | tee "$out/tests.log" | tail -25 ;;
    kill)
      timeout 260 python3 -m pytest -q -x -s -p no:cacheprovider tests/test_gpu_data_plane.py -k nothing_is_left \
        > "$out/kill.log" 2>&1; grep -v "^\s*$" "$out/kill.log" | grep -i "passed\|failed\|error\|critical\|assert" | tail -30 ;;
    graphs)
      timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_graphs.py > "$out/graphs.log" 2>&1
      grep -B30 "short test summary" "$out/graphs.log" | grep -v "^\s*$" | tail -40; tail -3 "$out/graphs.log" ;;
    ttft)
      # TTFT_TRANSPORTS, TTFT_LENGTHS; TTFT_PLAINTEXT=1: members without mutual TLS (what TLS costs the gRPC path);
      # TTFT_PREFILL_FLAGS: more prefill flags (e.g. "--kv-chunk-bytes 16777216"), TTFT_TAG names the output
      # KV_RECEIVERS, KV_SENDERS: decode's kv_receivers and prefill's kv_senders (gRPC streams taken in and
      # sent by processes of their own)
      tag=${TTFT_PLAINTEXT:+_plaintext}${GIL_SWITCH_MS:+_gil$GIL_SWITCH_MS}${KV_RECEIVERS:+_receivers$KV_RECEIVERS}
      tag=$tag${KV_SENDERS:+_senders$KV_SENDERS}${TTFT_TAG:+_$TTFT_TAG}
      PDSERVE_KV_RECEIVERS=${KV_RECEIVERS:-0} PDSERVE_KV_SENDERS=${KV_SENDERS:-0} timeout 240 python3 -m bench.transfer --device cuda --model "$model" --skip-wire --ttft-lengths "${TTFT_LENGTHS:-2048,8190}" \
        --overlap-length 8190 --ttft-transports "${TTFT_TRANSPORTS:-cuda_ipc,grpc x4}" --repeats "${TTFT_REPEATS:-2}" --threads 4 --kv-budget 20GiB \
        ${TTFT_PLAINTEXT:+--plaintext} --prefill-flags="${TTFT_PREFILL_FLAGS:-}" --out "$out/ttft$tag.json" \
        ${TTFT_PROFILE:+--profile-members "$out/ttft_profile" --profile-flags="${PROFILE_FLAGS:-}"} > "$out/ttft$tag.log" 2>&1
      grep "KV receiver processes" "$out/ttft$tag.log"; grep -A12 "^| transport" "$out/ttft$tag.log" || tail -20 "$out/ttft$tag.log"
      grep -A14 "Per-layer timeline" "$out/ttft$tag.log"
      # TTFT_PROFILE=1: py-spy on the prefill and decode members during the 8k samples (PROFILE_FLAGS, e.g. --gil)
      for raw in "$out"/ttft_profile/*.txt; do
        [ -f "$raw" ] || continue
        echo "--- $(basename "$raw")"; python3 -m bench.profile_summary "$raw" --top 10 | cut -c1-170 | head -"${PROFILE_LINES:-60}"
        gzip -f "$raw" && mv "$raw.gz" "$out/"
      done; rm -rf "$out/ttft_profile" ;;
    ipc-timeline)
      # Why CUDA IPC scatters queued late in a pass wait for its end: the TTFT run's per-layer timeline with
      # the default hardware queues and with 32 (members inherit the environment).
      for connections in ${IPC_CONNECTIONS:-default 32}; do
        extra=(); [ "$connections" = default ] || extra=("CUDA_DEVICE_MAX_CONNECTIONS=$connections")
        env ${extra[@]+"${extra[@]}"} timeout 150 python3 -m bench.transfer --device cuda --model "$model" --skip-wire \
          --ttft-lengths 8190 --overlap-length 8190 --ttft-transports cuda_ipc --repeats 2 --threads 4 --kv-budget 20GiB \
          --out "$out/ipc_timeline_$connections.json" > "$out/ipc_timeline_$connections.log" 2>&1
        echo "--- CUDA_DEVICE_MAX_CONNECTIONS=$connections"; grep -A13 "Per-layer timeline" "$out/ipc_timeline_$connections.log"
      done ;;
    copy-timeline)
      # When each layer's KV copy runs on the device against when its layer was computed (CUDA events).
      timeout 200 python3 -m bench.copy_timeline --model "$model" --tokens 8192 --out "$out/copy_timeline.json" \
        > "$out/copy_timeline.log" 2>&1; grep -v "^\s*$" "$out/copy_timeline.log" | grep -v "^| ---" | tail -80 ;;
    prefill)
      # PREFILL_REPEATS (default 3), PREFILL_CONSUMERS (bench.prefill --consumers), PREFILL_PROFILE (tokens; 0: none)
      timeout "${PREFILL_TIMEOUT:-240}" python3 -m bench.prefill --model "$model" --repeats "${PREFILL_REPEATS:-3}" \
        --profile "${PREFILL_PROFILE:-8192}" ${PREFILL_CONSUMERS:+--consumers "$PREFILL_CONSUMERS"} --out "$out/prefill.json" \
        > "$out/prefill.log" 2>&1; grep -A10 "^| case" "$out/prefill.log" || grep "tok/s" "$out/prefill.log" ;;
    transfer)
      timeout 300 python3 -m bench.transfer --device cuda --model "$model" --shapes "Llama-8B shape bf16" \
        --lengths 2048,8192,32768 --streams 1,4 --repeats 2 --ttft-lengths 2048,8190 --overlap-length 8190 \
        --threads 4 --kv-budget 20GiB --out "$out/transfer.json" > "$out/transfer.log" 2>&1
      grep -A12 "^| KV shape\|^| transport" "$out/transfer.log" ;;
    transfer-quick)
      tag=${GIL_SWITCH_MS:+_gil$GIL_SWITCH_MS}${WRITE_LANES:+_lanes$WRITE_LANES}${QUICK_TAG:+_$QUICK_TAG}
      # The two paths with bars, 8k and 32k on the wire and 8k TTFT (e.g. to compare GIL_SWITCH_MS settings).
      timeout 230 python3 -m bench.transfer --device cuda --model "$model" --shapes "Llama-8B shape bf16" \
        --lengths 8192,32768 --streams "${QUICK_STREAMS:-4}" --paths "${QUICK_PATHS:-grpc x4,cuda_ipc}" --repeats 3 --ttft-lengths 2048,8190 \
        --ttft-transports "${QUICK_TTFT:-grpc x4,cuda_ipc}" --overlap-length 8190 --threads 4 --kv-budget 20GiB \
        ${WRITE_LANES:+--write-lanes "$WRITE_LANES"} --out "$out/transfer_quick$tag.json" > "$out/transfer_quick$tag.log" 2>&1
      grep -A6 "^| KV shape\|^| transport\|ms from the start" "$out/transfer_quick$tag.log" ;;
    relays-wire)
      # gRPC from GPU memory through relay processes at both ends (KV senders and receivers), plaintext and
      # over mutual TLS, against one process's gRPC xN and raw TCP of the same run; RELAY_STREAMS (N, default 4)
      # RELAY_MODES: "plaintext mTLS" (default; raw TCP is plaintext, so the plaintext row is like for like)
      n=${RELAY_STREAMS:-4}
      for mode in ${RELAY_MODES:-plaintext mTLS}; do
        tls=(); relayed="grpc x$n relays"; [ "$mode" = mTLS ] && tls=(--tls) && relayed="$relayed mTLS"
        timeout 200 python3 -m bench.transfer --device cuda --model "$model" --shapes "Llama-8B shape bf16" --skip-ttft \
          --lengths 8192,32768 --streams "$n" --paths "grpc x$n,$relayed" --repeats 3 --threads 4 ${tls[@]+"${tls[@]}"} \
          --out "$out/relays_wire_${mode}_x$n.json" > "$out/relays_wire_${mode}_x$n.log" 2>&1
        grep -A6 "^| KV shape" "$out/relays_wire_${mode}_x$n.log" || tail -20 "$out/relays_wire_${mode}_x$n.log"
      done ;;
    grpc-ceiling)
      # What Python gRPC itself moves on this host's loopback (no GPU): 1-8 streams, one receiver or one per
      # stream, a sender process per stream, mutual TLS, against raw TCP (asyncio, and blocking sockets).
      # CEILING_SETTINGS: HTTP/2 settings (default "default"; "default,big frames+windows" as in session 15).
      timeout 240 python3 -m bench.grpc_ceiling --settings "${CEILING_SETTINGS:-default}" --out "$out/grpc_ceiling.json" \
        > "$out/grpc_ceiling.log" 2>&1
      grep "GB/s" "$out/grpc_ceiling.log" ;;
    serving)
      timeout 420 python3 -m pdserve_cli bench --start "${SERVING_START:-disagg,colocated-chunked}" --device cuda --model "$model" \
        --dataset long --num-requests 48 --input-len 128:1024 --output-len 64:256 --long-len 4096:7000 \
        --long-every 4 --request-rate 6 --kv-budget 30GiB --ttft-slo-ms 1000 --tpot-slo-ms 50 --no-plots \
        --chunk "${SERVING_CHUNK:-256}" --out "$out/serving.json" ${SERVING_LOGS:+--cluster-logs "$out/logs"} > "$out/serving.log" 2>&1
      grep -v "requests:" "$out/serving.log" | tail -40 ;;
    gpu-decode)
      for m in ${DECODE_MODELS:-preset:llama-1b preset:llama-8b}; do
        timeout 280 python3 -m bench.gpu_decode --device cuda --model "$m" --concurrency 1,32,128 \
          --modes ${DECODE_MODES:-flex+graphs-unfused,flex+graphs} --out "$out/gpu_decode_${m#preset:}.json" > "$out/gpu_decode_${m#preset:}.log" 2>&1
        head -1 "$out/gpu_decode_${m#preset:}.log"; grep -A8 "^| concurrency" "$out/gpu_decode_${m#preset:}.log"
      done ;;
    tpot1)
      timeout 240 python3 -m pdserve_cli bench --start disagg --device cuda --model "$model" --dataset uniform \
        --num-requests 12 --input-len 128 --output-len 128 --concurrency 1 --request-rate inf --kv-budget 8GiB \
        --no-plots --out "$out/tpot1.json" > "$out/tpot1.log" 2>&1
      tail -12 "$out/tpot1.log" ;;
    prefix-multiturn)
      timeout 330 python3 -m pdserve_cli bench --start disagg-2x2-nocache,disagg-2x2-cache --device cuda \
        --model "$model" --dataset multiturn --num-requests 48 --turns 6 --input-len 32:96 --output-len 16:48 \
        --prefix-len 256:512 --request-rate 0.5 --kv-budget 8GiB --no-plots --out "$out/prefix_multiturn.json" \
        > "$out/prefix_multiturn.log" 2>&1
      tail -14 "$out/prefix_multiturn.log" ;;
    prefix-shared)
      # 350 MiB of the 8B shape's KV is 173 blocks, as 128 MiB is of the CPU runs' model.
      timeout 330 python3 -m pdserve_cli bench --start disagg-2x2,disagg-2x2-cache --device cuda --model "$model" \
        --dataset shared-prefix --num-requests 96 --prefixes 8 --prefix-len 512:512 --input-len 16:48 \
        --output-len 16:32 --request-rate 3 --kv-budget 350MiB --no-plots --out "$out/prefix_shared.json" \
        > "$out/prefix_shared.log" 2>&1
      tail -14 "$out/prefix_shared.log" ;;
    decode-profile)
      timeout 240 python3 -m bench.decode_profile --model "$model" --concurrency 1,128 > "$out/decode_profile.log" 2>&1
      grep -A16 "^concurrency" "$out/decode_profile.log" | cut -c1-160 ;;
    profile)
      # Where the wire's time goes, Python frames of the sender and of the receiver process (py-spy, sampling
      # only threads that run; needs the py-spy wheel in .whl/): gRPC x4 at 8k, then CUDA IPC at 32k.
      # Knobs: PROFILE_CASES ("path:tokens" ..., e.g. grpc_x4_relays:8192 with PROFILE_STREAMS=4: its relay
      # processes too), PROFILE_RATE (samples/s), PROFILE_REPEATS, PROFILE_FLAGS
      # (more py-spy flags: "--gil" samples only the thread holding the GIL, "--native" adds C frames).
      # The summary (bench.profile_summary) is printed; the raw stacks come back gzipped.
      for case in ${PROFILE_CASES:-grpc_x4:8192 cuda_ipc:32768}; do
        tag=${case%%:*}; name=${tag//_/ }; flags=${PROFILE_FLAGS:-}; tag=$tag${flags//[- ]/_}
        timeout 150 .site/bin/py-spy record --nonblocking --subprocesses --threads $flags -r "${PROFILE_RATE:-200}" \
          -f raw -o "$out/profile_$tag.txt" -- python3 -m bench.transfer --device cuda --skip-ttft \
          --shapes "Llama-8B shape bf16" --lengths "${case##*:}" --paths "$name" --repeats "${PROFILE_REPEATS:-8}" ${PROFILE_STREAMS:+--streams "$PROFILE_STREAMS"} \
          --threads 4 --out "$out/profile_$tag.json" > "$out/profile_$tag.log" 2>&1
        echo "--- $name $flags"; grep "GB/s" "$out/profile_$tag.log" | head -3
        python3 -m bench.profile_summary "$out/profile_$tag.txt" --top 10 | cut -c1-170 | head -"${PROFILE_LINES:-90}"
        gzip -f "$out/profile_$tag.txt"; rm -f "$out/profile_$tag.json"
      done ;;
    *) echo "unknown phase $phase" ;;
  esac
done
if [ -d "$out/logs" ]; then tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"; fi
