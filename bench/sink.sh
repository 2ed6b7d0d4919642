#!/usr/bin/env bash
# bench/sink.sh: measures vtox-sink ingest throughput on one core (sink pinned to CPU 0, wrk to CPU 1).
# Usage: bench/sink.sh [extra vtox-sink args...]   env: DURATION (10s), CONNS (64), SKIP_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in wrk taskset curl python3; do
  command -v "$tool" >/dev/null || { echo "bench/sink.sh: needs $tool (apt-get install -y wrk util-linux curl python3)" >&2; exit 2; }
done
if [[ -z "${SKIP_BUILD:-}" ]]; then
  cargo build --release --quiet --bin vtox-sink
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
addr="127.0.0.1:$port"
RUST_LOG=warn taskset -c 0 target/release/vtox-sink --listen "$addr" "$@" &
sink_pid=$!
trap 'kill "$sink_pid" 2>/dev/null; wait "$sink_pid" 2>/dev/null || true' EXIT

# Wait (bounded) for the sink to answer.
for _ in $(seq 100); do
  curl -fs "http://$addr/healthz" >/dev/null && break
  kill -0 "$sink_pid" 2>/dev/null || { echo "bench/sink.sh: vtox-sink exited" >&2; exit 1; }
  sleep 0.1
done
curl -fs "http://$addr/healthz" >/dev/null || { echo "bench/sink.sh: vtox-sink did not come up" >&2; exit 1; }

path="/api/v1/diagnosis-stream/simulator/vehicles/%E7%B2%A4B%C2%B7SEAL%C2%B7202400000/data?location=%E6%B7%B1%E5%9C%B3"
out=$(taskset -c 1 wrk -t1 -c"${CONNS:-64}" -d"${DURATION:-10s}" --latency -s bench/post_body.lua "http://$addr$path")
echo "$out" >&2
stats=$(curl -fs "http://$addr/stats")
echo "sink stats: $stats" >&2
rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
echo "requests/s: $rps"
