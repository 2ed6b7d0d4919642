#!/usr/bin/env bash
# bench/chaos.sh: a two-minute chaos soak on loopback. A sink, a coordinator with a state dir
# and three agents drive 300 vehicles while random faults hit them every few seconds: kill -9
# a simulator, kill -9 an agent (restarted like systemd would), freeze an agent past its lease,
# restart the coordinator, freeze the sink past the request timeout. At the end it prints the
# sink's conflicts and duplicates (both must be 0) and the accounting: coordinator accepted +
# answered late <= sink accepted <= that + what no simulator could see (in flight at a kill -9,
# timed out and never answered).
#   bash bench/chaos.sh            env: SOAK (120 s), VEHICLES (300), SEED (random), SKIP_BUILD=1
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK=${SOAK:-120}
VEHICLES=${VEHICLES:-300}
SEED=${SEED:-$RANDOM}
RANDOM=$SEED
[[ -n "${SKIP_BUILD:-}" ]] || cargo build --release --quiet --bins
BIN=target/release
work=$(mktemp -d /tmp/vtox-chaos.XXXXXX)
pids=()
cleanup() {
  exec 2>/dev/null  # bash would report each killed background job
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pkill -9 -f "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log() { echo "[chaos $(date +%T)] $*"; }

sink=127.0.0.1:$(free_port)
coord=127.0.0.1:$(free_port)
RUST_LOG=warn $BIN/vtox-sink --listen "$sink" 2>"$work/sink.log" & pids+=($!)
start_coord() {
  RUST_LOG=warn $BIN/vtox-coord serve --listen "$coord" --lease 3s --grace 3s --state-dir "$work/state" 2>>"$work/coord.log" &
  coord_pid=$!; pids+=($coord_pid); disown $!
}
start_coord
declare -A agent_pid
start_agent() {
  RUST_LOG=warn $BIN/vtox-agent --join "$coord" --name "$1" --max-vehicles 200 --log-dir "$work/logs-$1" 2>>"$work/agent-$1.log" &
  agent_pid[$1]=$!; pids+=($!); disown $!
}
for a in a b c; do start_agent "$a"; done
sleep 2
total=$((SOAK + 30))
$BIN/vtox-coord run "$VEHICLES" --coord "http://$coord" --target "http://$sink" --duration "${total}s" \
  --interval 1s --expect-agents 3 --min-success 0 --json >"$work/summary.json" 2>"$work/run.log" &
run_pid=$!; pids+=($run_pid)
sleep 10
log "soaking for ${SOAK}s (seed $SEED)"
end=$((SECONDS + SOAK))
while ((SECONDS < end)); do
  names=(a b c); a=${names[$((RANDOM % 3))]}
  case $((RANDOM % 5)) in
    0) sim=$(pgrep -P "${agent_pid[$a]}" | head -1 || true)
       [[ -n "$sim" ]] && { log "kill -9 a simulator of $a ($sim)"; kill -9 "$sim" 2>/dev/null || true; } ;;
    1) log "kill -9 agent $a, restarting it in 2 s"; kill -9 "${agent_pid[$a]}" 2>/dev/null || true; sleep 2; start_agent "$a" ;;
    2) log "freeze agent $a for 5 s"; kill -STOP "${agent_pid[$a]}" 2>/dev/null || true; sleep 5; kill -CONT "${agent_pid[$a]}" 2>/dev/null || true ;;
    3) log "restart the coordinator"; kill -9 "$coord_pid" 2>/dev/null || true; sleep 1; start_coord ;;
    4) log "freeze the sink for 8 s (past the 5 s timeout)"; kill -STOP "${pids[0]}"; sleep 8; kill -CONT "${pids[0]}" ;;
  esac
  sleep $((3 + RANDOM % 5))
done
log "faults over; waiting for the run to end"
wait "$run_pid" || { log "the run exited non-zero; its log:"; tail -5 "$work/run.log"; }
stats=$(curl -fsS "http://$sink/stats")
python3 - "$work/summary.json" "$stats" "$VEHICLES" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1])) if open(sys.argv[1]).read().strip() else {}
stats = json.loads(sys.argv[2]); n = int(sys.argv[3])
t = summary.get("totals", {})
acc, late, sink_acc = t.get("accepted", 0), t.get("late_accepted", 0), stats["accepted"]
to = t.get("timeouts", 0)
unknown = t.get("sent", 0) - acc - t.get("failed", 0) + to - late - t.get("timeouts_unsent", 0)
known = acc + late
print(f"vehicles seen {stats['vehicles']}/{n}  conflicts {stats['conflicts']}  duplicates {stats['duplicates']}")
print(f"coordinator accepted {acc} + {late} answered late = {known}  sink accepted {sink_acc}  difference {sink_acc - known} ({(sink_acc - known) * 100 / max(1, sink_acc):.3f}%)  outcome unknown {unknown}")
ok = stats["conflicts"] == 0 and stats["vehicles"] == n and known <= sink_acc <= known + unknown
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
