#!/usr/bin/env bash
# An external benchmark client against the OpenAI-compatible API, beside `pdserve bench` with the same load.
#
# NVIDIA AIPerf (PyPI `aiperf`, installed into its own venv .venv-aiperf on first use) streams chat
# completions from `pdserve up`'s HTTP API: synthetic prompts of INPUT tokens (plus the chat template's),
# OUTPUT tokens each (ignore_eos), CONCURRENCY in flight, REQUESTS in all, token counts as the server
# reports them. Then `pdserve bench` sends the same load (the same prompt length as AIPerf's requests
# came to, token ids) to the same cluster's gRPC API. Both outputs go to bench/out/aiperf/.
#
#   bash bench/aiperf.sh [REQUESTS] [CONCURRENCY] [INPUT] [OUTPUT]      # default 64 8 128 64
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
requests=${1:-64} concurrency=${2:-8} input=${3:-128} output=${4:-64}
out=bench/out/aiperf
mkdir -p "$out"
[[ -x .venv-aiperf/bin/aiperf ]] || { echo "==> installing AIPerf into .venv-aiperf"; python3 -m venv .venv-aiperf \
  && .venv-aiperf/bin/pip install -q aiperf==0.13.0 > "$out/install.log" 2>&1; }
# CPU seconds (user + system) a process has used, and what the commands run by `cpu_of` used with their children:
# the clients share this machine's cores with the cluster.
proc_cpu() { awk -v t="$(getconf CLK_TCK)" '{ print ($14 + $15) / t }' "/proc/$1/stat"; }
cpu_of() { "$root/.venv/bin/python" -c 'import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"client CPU: {r.ru_utime + r.ru_stime:.1f} s", file=sys.stderr)
sys.exit(code)' "$@"; }
model_dir=$(.venv/bin/pdserve model fetch)
port=$(.venv/bin/python -c "from pdserve_cli.cluster import free_port; print(free_port())")
http=$(.venv/bin/python -c "from pdserve_cli.cluster import free_port; print(free_port())")

.venv/bin/pdserve up --port "$port" --http-port "$http" > "$out/up.log" 2>&1 &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "cluster ready" "$out/up.log" && break; sleep 1; done
grep "cluster ready" "$out/up.log"
gateway=$(pgrep -f "python -m services.gateway .*--http-listen 127.0.0.1:$http" | head -1)

echo "==> AIPerf: $requests chat requests, $concurrency at a time, $input+template -> $output tokens"
before=$(proc_cpu "$gateway")
(cd "$out" && cpu_of ../../../.venv-aiperf/bin/aiperf profile --model default --url "http://127.0.0.1:$http" \
  --endpoint-type chat --streaming --tokenizer "$model_dir" --concurrency "$concurrency" \
  --request-count "$requests" --warmup-request-count 4 --prompt-input-tokens-mean "$input" \
  --prompt-input-tokens-stddev 0 --prompt-output-tokens-mean "$output" --prompt-output-tokens-stddev 0 \
  --extra-inputs ignore_eos:true --use-server-token-count --random-seed 1 --ui none \
  --output-artifact-dir . --no-gpu-telemetry --no-server-metrics) > "$out/aiperf.log" 2>&1
echo "gateway CPU: $(awk -v a="$before" -v b="$(proc_cpu "$gateway")" 'BEGIN { print b - a }') s" | tee -a "$out/aiperf.log"
grep "client CPU" "$out/aiperf.log"
grep -E "Metric|Time to First Token|Inter Token|Request Latency|Output Token Throughput  |Request Throughput|Error Rate" \
  "$out/aiperf.log" | cut -c1-130 || true
prompt=$(.venv/bin/python -c "import json; d = json.load(open('$out/profile_export_aiperf.json')); \
print(round(d['usage_prompt_tokens']['avg']))")

echo "==> pdserve bench: the same load over gRPC ($prompt-token prompts)"
before=$(proc_cpu "$gateway")
cpu_of .venv/bin/pdserve bench --address "127.0.0.1:$port" --num-requests "$requests" --concurrency "$concurrency" \
  --input-len "$prompt" --output-len "$output" --seed 1 --out "$out/pdserve_bench.json" --no-plots \
  > "$out/pdserve_bench.log" 2>&1
echo "gateway CPU: $(awk -v a="$before" -v b="$(proc_cpu "$gateway")" 'BEGIN { print b - a }') s" | tee -a "$out/pdserve_bench.log"
grep -E "client CPU|requests [0-9]+/|^\| (metric|TTFT|TPOT|ITL|E2E)" "$out/pdserve_bench.log"
