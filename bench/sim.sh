#!/usr/bin/env bash
# bench/sim.sh: vtox-sim side by side with wrk and Locust, plus memory and rate accuracy.
#
# Everything talks to nginx on 127.0.0.1 only. The generator under test is pinned to one core
# (GEN_CPU, default 0) and nginx (1 worker, `return 200 '{"status":"success"}'`) to the other
# (SRV_CPU, default 1). See bench/README.md for what each part measures.
#
#   bash bench/sim.sh                      # everything (~3 min after installs and the build)
#   ONLY=wrk,locust bash bench/sim.sh      # just the baselines
#
# Parts (ONLY, comma separated): wrk, locust, sim (throughput, store-and-forward), amo (the
# same at most once), tls (wrk and vtox-sim over HTTPS), mem, acc, buf (full buffers).
# Environment knobs (defaults in brackets):
#   DURATION [20]        seconds for each throughput run (wrk, locust, vtox-sim)
#   ROUNDS [1]           interleaved throughput rounds; each tool's median round is reported
#   CONNS [64]           wrk connections and Locust users
#   MAX_IN_FLIGHT [256]  vtox-sim --max-in-flight for the throughput run
#   MEM_DURATION [40]    seconds of the memory run (100k vehicles, interval 60 s)
#   ACC_DURATION [40]    seconds of the rate-accuracy run (10k vehicles, interval 1.2 s)
#   BUF_VEHICLES [10000] vehicles of the full-buffer run (interval 0.1 s, --buffer 600,
#                        against a closed port, so every buffer fills in 60 s)
#   GEN_CPU [0] SRV_CPU [1]
#   VENV [bench/.venv]   virtualenv holding locust
#   SIM [target/release/vtox-sim]
#   SKIP_INSTALL=1       never apt-get / pip install
#   SKIP_BUILD=1         do not run cargo build (use SIM as it is)
#   SIM_EXTRA_ARGS       extra words appended to every vtox-sim command
#   RESULTS [bench/results/sim.json]; raw outputs go to bench/results/sim-raw/
#   KEEP_WORK=1          keep the temporary work directory
# Exit code: 0 every check measured and passed, 1 a check failed, 2 a check was not measured.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
HELPER=$BENCH/sim_helpers.py
PY=${PYTHON:-python3}

DURATION=${DURATION:-20}
CONNS=${CONNS:-64}
MAX_IN_FLIGHT=${MAX_IN_FLIGHT:-256}
MEM_DURATION=${MEM_DURATION:-40}
ACC_DURATION=${ACC_DURATION:-40}
GEN_CPU=${GEN_CPU:-0}
SRV_CPU=${SRV_CPU:-1}
BUF_VEHICLES=${BUF_VEHICLES:-10000}
ONLY=${ONLY:-wrk,locust,sim,amo,tls,mem,acc,buf}
ROUNDS=${ROUNDS:-1}
SFX=""
VENV=${VENV:-$BENCH/.venv}
SIM=${SIM:-$ROOT/target/release/vtox-sim}
SKIP_INSTALL=${SKIP_INSTALL:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
SIM_EXTRA_ARGS=${SIM_EXTRA_ARGS:-}
RESULTS=${RESULTS:-$BENCH/results/sim.json}
RAW=$(dirname "$RESULTS")/sim-raw
KEEP_WORK=${KEEP_WORK:-0}
SIM_WARMUP_S=5    # throughput: steady state from the line at ~5 s
ACC_FROM_S=10     # accuracy: from the line at ~10 s

WORK=$(mktemp -d /tmp/vtox-simbench.XXXXXX)
PARTS=$WORK/parts
PIDFILE=$WORK/pids
mkdir -p "$PARTS"
: >"$PIDFILE"

log() { printf '[sim.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
want() { [[ ",$ONLY," == *",$1,"* ]]; }
helper() { "$PY" "$HELPER" "$@"; }
register() { echo "$1" >>"$PIDFILE"; }

alive() { # a process that exists and is not a zombie
  local st
  st=$(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n "$st" && "$st" != Z ]]
}

kill_tree() { # SIG PID: the process and its direct children (nginx workers, the sim under time)
  local sig=$1 pid=$2 c
  for c in $(pgrep -P "$pid" 2>/dev/null || true); do kill "-$sig" "$c" 2>/dev/null || true; done
  kill "-$sig" "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid left i
  trap - EXIT
  set +e
  if [[ -s "$PIDFILE" ]]; then
    while read -r pid; do alive "$pid" && kill_tree TERM "$pid"; done <"$PIDFILE"
    for i in $(seq 50); do
      left=0
      while read -r pid; do alive "$pid" && left=1; done <"$PIDFILE"
      ((left)) || break
      sleep 0.1
    done
    while read -r pid; do alive "$pid" && kill_tree KILL "$pid"; done <"$PIDFILE"
  fi
  wait 2>/dev/null || true
  if [[ "$KEEP_WORK" == 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM HUP

# run_logged OUT CMD...: run CMD in the background (so the EXIT trap can end it), wait for it
run_logged() {
  local out=$1 pid rc=0
  shift
  "$@" >"$out" 2>&1 &
  pid=$!
  register "$pid"
  wait "$pid" || rc=$?
  return "$rc"
}

# ---------------------------------------------------------------- installs and build
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

install_deps() {
  local apt=()
  if want wrk || want locust || want sim || want amo || want tls || want mem || want acc; then
    [[ -x "$NGINX" ]] || apt+=(nginx)
  fi
  { want wrk || want tls; } && ! command -v wrk >/dev/null && apt+=(wrk)
  want tls && ! command -v openssl >/dev/null && apt+=(openssl)
  { want mem || want sim || want amo || want tls || want acc || want buf; } && [[ ! -x /usr/bin/time ]] && apt+=(time)
  command -v taskset >/dev/null || apt+=(util-linux)
  command -v pgrep >/dev/null || apt+=(procps)
  if ((${#apt[@]})); then
    if [[ "$SKIP_INSTALL" == 1 ]]; then log "missing packages: ${apt[*]} (SKIP_INSTALL=1)"; exit 1; fi
    log "apt-get install ${apt[*]}"
    apt-get update -qq >"$WORK/apt.log" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt[@]}" >>"$WORK/apt.log" 2>&1 || {
      tail -n 20 "$WORK/apt.log" >&2
      exit 1
    }
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  fi
  if want locust && ! "$VENV/bin/python" -c 'import locust' >/dev/null 2>&1; then
    if [[ "$SKIP_INSTALL" == 1 ]]; then log "locust missing in $VENV (SKIP_INSTALL=1)"; exit 1; fi
    log "pip install locust into $VENV"
    "$PY" -m venv "$VENV" >"$WORK/venv.log" 2>&1 || {
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >>"$WORK/venv.log" 2>&1
      "$PY" -m venv "$VENV" >>"$WORK/venv.log" 2>&1
    }
    "$VENV/bin/pip" install -q locust >>"$WORK/venv.log" 2>&1 || {
      tail -n 20 "$WORK/venv.log" >&2
      exit 1
    }
  fi
}

SIM_OK=0
SIM_REASON=""
prepare_sim() {
  if [[ "$SKIP_BUILD" != 1 ]]; then
    log "cargo build --release --bin vtox-sim"
    if ! (cd "$ROOT" && cargo build --release --bin vtox-sim) >"$WORK/build.log" 2>&1; then
      tail -n 30 "$WORK/build.log" >&2
      SIM_REASON="cargo build --release --bin vtox-sim failed"
      return 0
    fi
  fi
  if [[ ! -x "$SIM" ]]; then
    SIM_REASON="$SIM not found"
  elif ! timeout 10 "$SIM" --help 2>&1 | grep -q -- '--vehicles'; then
    SIM_REASON="$SIM --help does not mention --vehicles (not implemented yet?)"
  else
    SIM_OK=1
  fi
}

# ---------------------------------------------------------------- nginx
NGINX_PID=""
NGINX_PORT=""
NGINX_PREFIX=""
NGINX_TLS=0      # 1: listen with ssl (a throwaway certificate for 127.0.0.1, in $WORK/tls)
NGINX_SCHEME=http
make_cert() { # a throwaway CA ($WORK/tls/ca.pem) and a server certificate for 127.0.0.1 it signed
  [[ -s "$WORK/tls/cert.pem" ]] && return 0
  mkdir -p "$WORK/tls"
  local d=$WORK/tls
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=vtox-bench-ca \
      -keyout "$d/ca.key" -out "$d/ca.pem" &&
      openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout "$d/key.pem" -out "$d/server.csr" &&
      printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$d/ext.cnf" &&
      openssl x509 -req -in "$d/server.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
        -days 1 -extfile "$d/ext.cnf" -out "$d/cert.pem"
  } >"$d/openssl.log" 2>&1
}
start_nginx() { # NAME; returns non-zero if nginx does not answer 200
  local name=$1 user_line="" probe listen_extra="" ssl_lines=""
  NGINX_SCHEME=http
  if [[ "$NGINX_TLS" == 1 ]]; then
    make_cert || { log "openssl could not make a certificate"; return 1; }
    listen_extra=" ssl"
    ssl_lines="ssl_certificate $WORK/tls/cert.pem; ssl_certificate_key $WORK/tls/key.pem; ssl_session_cache shared:SSL:1m;"
    NGINX_SCHEME=https
  fi
  NGINX_PREFIX=$WORK/nginx-$name
  mkdir -p "$NGINX_PREFIX/logs" "$NGINX_PREFIX/tmp"
  NGINX_PORT=$(helper free-port) || return 1
  [[ "$(id -u)" == 0 ]] && user_line="user root;"
  cat >"$NGINX_PREFIX/nginx.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
master_process on;
pid $NGINX_PREFIX/nginx.pid;
error_log $NGINX_PREFIX/logs/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $NGINX_PREFIX/tmp/body;
  proxy_temp_path $NGINX_PREFIX/tmp/proxy;
  fastcgi_temp_path $NGINX_PREFIX/tmp/fastcgi;
  uwsgi_temp_path $NGINX_PREFIX/tmp/uwsgi;
  scgi_temp_path $NGINX_PREFIX/tmp/scgi;
  client_body_buffer_size 64k;
  client_max_body_size 4m;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {
    listen 127.0.0.1:$NGINX_PORT$listen_extra backlog=4096;
    $ssl_lines
    location / {
      default_type application/json;
      return 200 '{"status":"success"}';
    }
  }
}
EOF
  taskset -c "$SRV_CPU" "$NGINX" -p "$NGINX_PREFIX/" -e "$NGINX_PREFIX/logs/error.log" \
    -c "$NGINX_PREFIX/nginx.conf" >"$NGINX_PREFIX/logs/stdout.log" 2>&1 &
  NGINX_PID=$!
  register "$NGINX_PID"
  if ! helper wait-port "$NGINX_PORT" 10 || ! alive "$NGINX_PID"; then
    log "nginx did not start:"
    tail -n 20 "$NGINX_PREFIX/logs/error.log" "$NGINX_PREFIX/logs/stdout.log" >&2 || true
    return 1
  fi
  probe=$(helper probe "$NGINX_SCHEME://127.0.0.1:$NGINX_PORT/api/v1/diagnosis-stream/simulator/vehicles/x/data?location=y") || return 1
  [[ "$probe" == *'"status": 200'* ]] || { log "nginx probe: $probe"; return 1; }
  log "nginx ($name) on 127.0.0.1:$NGINX_PORT, pid $NGINX_PID, cpu $SRV_CPU"
}

stop_nginx() {
  [[ -n "$NGINX_PID" ]] || return 0
  if alive "$NGINX_PID"; then
    kill -TERM "$NGINX_PID" 2>/dev/null || true
    local i
    for i in $(seq 50); do alive "$NGINX_PID" || break; sleep 0.1; done
    alive "$NGINX_PID" && kill_tree KILL "$NGINX_PID"
  fi
  wait "$NGINX_PID" 2>/dev/null || true
  mkdir -p "$RAW"
  cp "$NGINX_PREFIX/logs/error.log" "$RAW/nginx-$(basename "$NGINX_PREFIX" | sed 's/^nginx-//').error.log" 2>/dev/null || true
  NGINX_PID=""
}

# ---------------------------------------------------------------- vtox-sim runner
# run_sim NAME DURATION_S ARGS...: runs vtox-sim pinned to GEN_CPU under /usr/bin/time,
# samples VmHWM every 0.2 s, enforces DURATION_S + 30 s. Sets SIM_RC and SIM_PEAK_KB.
SIM_RC=0
SIM_PEAK_KB=0
run_sim() {
  local name=$1 dur=$2 tpid deadline c v hwm=0 tkb killed=0
  shift 2
  local -a extra=()
  [[ -n "$SIM_EXTRA_ARGS" ]] && read -r -a extra <<<"$SIM_EXTRA_ARGS"
  log "vtox-sim ($name): $* ${extra[*]}"
  /usr/bin/time -f '%M' -o "$WORK/$name.time" \
    taskset -c "$GEN_CPU" "$SIM" "$@" ${extra[@]+"${extra[@]}"} >"$WORK/$name.jsonl" 2>"$WORK/$name.err" &
  tpid=$!
  register "$tpid"
  deadline=$((SECONDS + dur + 30))
  local -a kids=()
  while alive "$tpid"; do
    # the sim is the child of /usr/bin/time (taskset execs it); remember it so that cleanup
    # can end it even if time itself is gone
    for c in $(pgrep -P "$tpid" 2>/dev/null || true); do
      if [[ " ${kids[*]-} " != *" $c "* ]]; then kids+=("$c"); register "$c"; fi
      v=$(awk '/^VmHWM:/{print $2}' "/proc/$c/status" 2>/dev/null || true)
      [[ -n "$v" ]] && ((v > hwm)) && hwm=$v
    done
    if ((SECONDS > deadline)); then
      local sig=TERM
      if ((killed)); then sig=KILL; fi
      log "vtox-sim ($name) overran ${dur}s + 30s: SIG$sig"
      for c in ${kids[@]+"${kids[@]}"}; do kill "-$sig" "$c" 2>/dev/null || true; done
      ((${#kids[@]})) || kill "-$sig" "$tpid" 2>/dev/null || true
      killed=1
      deadline=$((SECONDS + 5))
    fi
    sleep 0.2
  done
  SIM_RC=0
  wait "$tpid" || SIM_RC=$?
  tkb=$(grep -E '^[0-9]+$' "$WORK/$name.time" 2>/dev/null | tail -n 1 || true)
  [[ -n "$tkb" ]] && ((tkb > hwm)) && hwm=$tkb
  SIM_PEAK_KB=$hwm
  mkdir -p "$RAW"
  cp "$WORK/$name.jsonl" "$WORK/$name.err" "$RAW/" 2>/dev/null || true
  log "vtox-sim ($name) exit $SIM_RC, $(grep -c '^{' "$WORK/$name.jsonl" || true) JSON lines, peak RSS ${hwm} kB"
  if [[ -s "$WORK/$name.err" ]]; then
    tail -n 5 "$WORK/$name.err" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  stderr: /' >&2
  fi
}

unavailable() { helper unavailable "$2" >"$PARTS/$1.json"; log "$1: $2"; }
for p in wrk locust sim amo wrktls simtls mem acc buf bufbase; do
  part=$p
  [[ $p == wrktls || $p == simtls ]] && part=tls
  [[ $p == bufbase ]] && part=buf
  want "$part" || helper unavailable "not run (ONLY=$ONLY)" >"$PARTS/$p.json"
done

# ---------------------------------------------------------------- parts
part_wrk() { # [PART]: wrk$SFX by default; wrktls$SFX with NGINX_TLS=1
  local part=${1:-wrk$SFX} rc=0
  start_nginx "$part" || { unavailable "$part" "nginx did not start"; stop_nginx; return 0; }
  log "wrk -t1 -c$CONNS -d${DURATION}s (cpu $GEN_CPU) $NGINX_SCHEME"
  run_logged "$WORK/$part.out" env WRK_DUMP_BODY="$WORK/wrk_body.json" \
    taskset -c "$GEN_CPU" wrk -t1 "-c$CONNS" "-d${DURATION}s" --timeout 5s \
    -s "$BENCH/wrk_post.lua" "$NGINX_SCHEME://127.0.0.1:$NGINX_PORT" || rc=$?
  stop_nginx
  mkdir -p "$RAW" && cp "$WORK/$part.out" "$WORK/wrk_body.json" "$RAW/" 2>/dev/null || true
  ((rc == 0)) || log "wrk exited $rc"
  helper wrk "$WORK/$part.out" "$WORK/wrk_body.json" >"$PARTS/$part.json" ||
    unavailable "$part" "could not parse wrk output (exit $rc)"
}

part_locust() {
  local part=locust$SFX rc=0
  start_nginx "$part" || { unavailable "$part" "nginx did not start"; stop_nginx; return 0; }
  log "locust -u $CONNS -r $CONNS -t ${DURATION}s (cpu $GEN_CPU, single process)"
  run_logged "$WORK/$part.log" taskset -c "$GEN_CPU" "$VENV/bin/locust" -f "$BENCH/locustfile.py" \
    --headless -u "$CONNS" -r "$CONNS" -t "${DURATION}s" --stop-timeout 2 \
    --host "http://127.0.0.1:$NGINX_PORT" --csv "$WORK/$part" --only-summary --loglevel WARNING || rc=$?
  stop_nginx
  mkdir -p "$RAW" && cp "$WORK/$part.log" "$WORK/${part}_stats.csv" "$RAW/" 2>/dev/null || true
  ((rc == 0)) || log "locust exited $rc (non-zero also when any request failed)"
  helper locust "$WORK/${part}_stats.csv" "$WORK/$part.log" >"$PARTS/$part.json" ||
    unavailable "$part" "could not parse locust stats (exit $rc)"
}

sim_part() { # PART NAME DURATION FIELD FROM_S EXPECTED(or "") ARGS...
  local part=$1 name=$2 dur=$3 field=$4 from=$5 expected=$6
  shift 6
  ((SIM_OK)) || { unavailable "$part" "$SIM_REASON"; return 0; }
  start_nginx "$name" || { unavailable "$part" "nginx did not start"; stop_nginx; return 0; }
  local -a trust=()
  [[ "$NGINX_TLS" == 1 ]] && trust=(--target-ca "$WORK/tls/ca.pem")
  run_sim "$name" "$dur" --target "$NGINX_SCHEME://127.0.0.1:$NGINX_PORT" --report-every 1s --agent bench \
    --duration "${dur}s" ${trust[@]+"${trust[@]}"} "$@"
  stop_nginx
  local -a opt=(--rc "$SIM_RC" --peak-kb "$SIM_PEAK_KB")
  [[ -n "$expected" ]] && opt+=(--expected "$expected")
  helper sim "$WORK/$name.jsonl" "$field" "$from" "${opt[@]}" >"$PARTS/$part.json" ||
    unavailable "$part" "could not parse vtox-sim output"
}

write_config() {
  "$PY" - "$PARTS/config.json" <<EOF
import json, sys
json.dump({
  "duration_s": $DURATION, "rounds": $ROUNDS, "loadavg_at_start": "$(cut -d' ' -f1-3 /proc/loadavg)", "connections": $CONNS, "max_in_flight": $MAX_IN_FLIGHT,
  "mem_duration_s": $MEM_DURATION, "acc_duration_s": $ACC_DURATION, "buf_vehicles": $BUF_VEHICLES,
  "gen_cpu": "$GEN_CPU", "srv_cpu": "$SRV_CPU", "only": "$ONLY",
  "sim_warmup_s": $SIM_WARMUP_S, "acc_from_s": $ACC_FROM_S,
  "sim_extra_args": "$SIM_EXTRA_ARGS",
  "nginx": "$("$NGINX" -v 2>&1 | sed 's/.*: //')",
  "wrk": "$(command -v wrk >/dev/null && (wrk -v 2>&1 | head -n 1 | cut -c1-40) || true)",
  "locust": "$([[ -x "$VENV/bin/locust" ]] && "$VENV/bin/locust" --version 2>/dev/null | awk '{print $2}' || true)",
  "vtox_sim": "$SIM", "vtox_sim_available": bool($SIM_OK), "vtox_sim_reason": "$SIM_REASON",
}, open(sys.argv[1], "w"), indent=2)
EOF
}

# ---------------------------------------------------------------- main
if (($(nproc) < 2)); then log "warning: fewer than 2 cores; generator and nginx share a core"; fi
install_deps
rm -rf "$RAW"
if want sim || want amo || want tls || want mem || want acc || want buf; then prepare_sim; fi
write_config

# throughput: ROUNDS interleaved rounds of wrk, locust, vtox-sim; each tool's median round counts
for ((round = 1; round <= ROUNDS; round++)); do
  if ((ROUNDS > 1)); then SFX=".r$round"; log "throughput round $round/$ROUNDS"; fi
  want wrk && part_wrk
  want locust && part_locust
  want sim && sim_part "sim$SFX" "sim-throughput$SFX" "$DURATION" accepted "$SIM_WARMUP_S" "" \
    --vehicles 120000 --interval 1s --max-in-flight "$MAX_IN_FLIGHT" --delivery store-and-forward
  want amo && sim_part "amo$SFX" "sim-at-most-once$SFX" "$DURATION" accepted "$SIM_WARMUP_S" "" \
    --vehicles 120000 --interval 1s --max-in-flight "$MAX_IN_FLIGHT" --delivery at-most-once
  if want tls; then
    NGINX_TLS=1
    part_wrk "wrktls$SFX"
    sim_part "simtls$SFX" "sim-tls$SFX" "$DURATION" accepted "$SIM_WARMUP_S" "" \
      --vehicles 120000 --interval 1s --max-in-flight "$CONNS"
    NGINX_TLS=0
  fi
done
if ((ROUNDS > 1)); then
  for p in wrk locust sim amo wrktls simtls; do
    part=$p
    [[ $p == wrktls || $p == simtls ]] && part=tls
    want "$part" && helper median "$PARTS"/$p.r*.json >"$PARTS/$p.json"
  done
fi
want mem && sim_part mem sim-memory "$MEM_DURATION" sent 5 "" \
  --vehicles 100000 --interval 60s
want acc && sim_part acc sim-accuracy "$ACC_DURATION" sent "$ACC_FROM_S" \
  "$("$PY" -c 'print(10000/1.2)')" --vehicles 10000 --interval 1.2s

# Memory per vehicle with full buffers: a backend that is down (a closed port: every try is
# refused at once and retried with backoff) while every vehicle makes ten messages a second,
# so each buffer of 600 fills within 60 s; the same fleet with --buffer 1 is the baseline.
part_buf() { # PART BUFFER DURATION_S
  local part=$1 buffer=$2 dur=$3 port
  ((SIM_OK)) || { unavailable "$part" "$SIM_REASON"; return 0; }
  port=$(helper free-port)
  run_sim "$part" "$dur" --target "http://127.0.0.1:$port" --report-every 1s --agent bench \
    --duration "${dur}s" --vehicles "$BUF_VEHICLES" --interval 0.1s --buffer "$buffer"
  helper sim "$WORK/$part.jsonl" produced 5 --rc "$SIM_RC" --peak-kb "$SIM_PEAK_KB" >"$PARTS/$part.json" ||
    unavailable "$part" "could not parse vtox-sim output"
}
if want buf; then
  part_buf buf 600 75
  part_buf bufbase 1 20
fi

report_rc=0
helper report "$PARTS" "$RESULTS" || report_rc=$?
exit "$report_rc"
