#!/usr/bin/env python3
"""JSON parsing and reporting for bench/sim.sh (standard library only).

Subcommands (each prints one JSON object on stdout, except `report`):
  free-port                                  a free TCP port on 127.0.0.1
  wait-port PORT [TIMEOUT_S]                 exit 0 once 127.0.0.1:PORT accepts
  probe URL                                  POST a small body, print {"status":..,"body":..}
  wrk OUTPUT_FILE [BODY_FILE]                parse wrk's output (the WRK_JSON line of wrk_post.lua)
  locust STATS_CSV [LOG]                     parse the Aggregated row of locust's _stats.csv
                                             (and, as a cross-check, the console summary in LOG)
  sim JSONL FIELD AT_S [--expected R] [--peak-kb KB] [--rc RC]
                                             steady-state rate of a cumulative vtox-sim counter
                                             between the line nearest AT_S and the last periodic line
  median PART_FILE...                        the round with the median requests_per_s, with all rounds
  unavailable REASON                         a part that could not run
  report PARTS_DIR RESULTS_JSON              merge parts, write RESULTS_JSON, print the summary
"""

import csv
import json
import os
import platform
import socket
import sys
import time
import urllib.request
from datetime import datetime, timezone

TARGETS = {
    "vtox_over_wrk": 0.45,     # vtox-sim req/s >= 0.45 x wrk
    "sf_over_amo": 0.90,       # store-and-forward msg/s >= 90 % of at-most-once, same core
    "tls_vtox_over_wrk": 0.45, # over HTTPS: vtox-sim req/s >= 0.45 x wrk
    "buffer_kb_per_vehicle": 16.0,  # a full buffer of 600 messages costs < 16 KB per vehicle
    "vtox_over_locust": 10.0,  # vtox-sim req/s >= 10 x locust
    "peak_rss_mb": 200.0,      # 100k vehicles, interval 60 s: peak RSS < 200 MB
    "rate_error": 0.01,        # 10k vehicles, interval 1.2 s: |sent rate / expected - 1| <= 1 %
}


def out(obj):
    json.dump(obj, sys.stdout, ensure_ascii=False, sort_keys=True)
    sys.stdout.write("\n")


def cmd_free_port(_args):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def cmd_wait_port(args):
    port = int(args[0])
    deadline = time.time() + (float(args[1]) if len(args) > 1 else 10.0)
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return 0
        except OSError:
            time.sleep(0.05)
    return 1


def cmd_probe(args):
    req = urllib.request.Request(args[0], data=b'{"probe":true}', method="POST",
                                 headers={"Content-Type": "application/json"})
    # The probe only asks whether our own nginx on loopback answers; over https its
    # certificate is the throwaway one sim.sh just made, which the tools under test do verify.
    import ssl
    ctx = ssl._create_unverified_context() if args[0].startswith("https:") else None
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            out({"status": r.status, "body": r.read().decode("utf-8", "replace")})
    except urllib.error.HTTPError as e:
        out({"status": e.code, "body": ""})


def cmd_wrk(args):
    text = open(args[0], encoding="utf-8", errors="replace").read()
    res = {"tool": "wrk", "status": "ok"}
    for line in text.splitlines():
        if line.startswith("WRK_JSON "):
            res.update(json.loads(line[len("WRK_JSON "):]))
        elif line.strip().startswith("Requests/sec:"):
            res["wrk_requests_per_sec"] = float(line.split(":", 1)[1])
    if "requests" not in res:
        out({"tool": "wrk", "status": "error", "reason": "no WRK_JSON line in wrk output"})
        return
    dur = res["duration_us"] / 1e6
    errs = res["errors"]
    # only answered 2xx count, like `accepted` for vtox-sim
    ok = res["requests"] - errs["status"]
    res["duration_s"] = dur
    res["requests_per_s"] = ok / dur if dur > 0 else 0.0
    res["failed"] = errs["status"] + errs["timeout"] + errs["connect"] + errs["read"] + errs["write"]
    if len(args) > 1 and os.path.exists(args[1]):
        body = open(args[1], "rb").read()
        doc = json.loads(body.decode("utf-8"))  # raises on an invalid body
        res["body_bytes"] = len(body)
        res["body_points"] = len(doc["sensor_data"]["data"])
    out(res)


def cmd_locust(args):
    res = {"tool": "locust", "status": "error", "reason": "no Aggregated row"}
    if os.path.exists(args[0]):
        with open(args[0], newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated":
                    n = int(row["Request Count"])
                    fails = int(row["Failure Count"])
                    rps = float(row["Requests/s"])
                    res = {
                        "tool": "locust", "status": "ok",
                        "requests": n, "failed": fails,
                        "requests_per_s_all": rps,
                        # successful requests only, like wrk and vtox-sim accepted
                        "requests_per_s": rps * (n - fails) / n if n else 0.0,
                        "latency_ms": {"median": float(row["Median Response Time"]),
                                       "avg": float(row["Average Response Time"]),
                                       "p99": _num(row.get("99%"))},
                        "avg_content_size": float(row["Average Content Size"]),
                    }
    else:
        res["reason"] = f"{args[0]} missing"
    # the console summary is printed after the last request; the CSV is rewritten about once
    # a second, so its row can be a second older. Both are totals over elapsed time.
    if res.get("status") == "ok" and len(args) > 1 and os.path.exists(args[1]):
        agg = [l for l in open(args[1], encoding="utf-8", errors="replace")
               if l.strip().startswith("Aggregated") and "|" in l]
        if agg:
            cols = agg[0].split("|")
            try:
                res["console_requests"] = int(agg[0].split()[1])
                res["console_requests_per_s"] = float(cols[-1].split()[0])
            except (ValueError, IndexError):
                pass
    out(res)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def cmd_sim(args):
    path, field, at = args[0], args[1], float(args[2])
    opts = {}
    rest = args[3:]
    while rest:
        opts[rest[0].lstrip("-")] = rest[1]
        rest = rest[2:]
    lines = []
    bad = 0
    if os.path.exists(path):
        for raw in open(path, encoding="utf-8", errors="replace"):
            raw = raw.strip()
            if not raw.startswith("{"):
                continue
            try:
                lines.append(json.loads(raw))
            except ValueError:
                bad += 1
    periodic = [l for l in lines if not l.get("final") and "elapsed_s" in l and field in l]
    finals = [l for l in lines if l.get("final")]
    res = {"tool": "vtox-sim", "field": field, "from_s": at, "lines": len(periodic),
           "final_seen": bool(finals), "unparsable_lines": bad}
    if "rc" in opts:
        res["exit_code"] = int(opts["rc"])
    if "peak-kb" in opts and opts["peak-kb"]:
        kb = int(opts["peak-kb"])
        res["peak_rss_kb"] = kb
        res["peak_rss_mb"] = kb / 1024.0
    if finals:
        fin = finals[-1]
        res["final"] = {k: fin[k] for k in ("sent", "accepted", "dropped", "failed", "elapsed_s",
                                            "produced", "buffered", "buffer_dropped")
                        if k in fin}
    if len(periodic) < 2:
        res.update(status="error", reason=f"fewer than 2 periodic lines with {field} and elapsed_s")
        out(res)
        return
    last = periodic[-1]
    base = min(periodic[:-1], key=lambda l: abs(float(l["elapsed_s"]) - at))
    dt = float(last["elapsed_s"]) - float(base["elapsed_s"])
    if dt <= 0:
        res.update(status="error", reason="no time between base and last line")
        out(res)
        return
    rate = (last[field] - base[field]) / dt
    res.update(status="ok", base_elapsed_s=float(base["elapsed_s"]),
               last_elapsed_s=float(last["elapsed_s"]), window_s=dt,
               rate=rate, requests_per_s=rate,
               last={k: last[k] for k in ("sent", "accepted", "dropped", "failed") if k in last})
    # the other counters over the same window, for context
    for other in ("sent", "accepted", "dropped", "failed"):
        if other in last and other in base:
            res[f"{other}_per_s"] = (last[other] - base[other]) / dt
    if "expected" in opts:
        exp = float(opts["expected"])
        res["expected_rate"] = exp
        res["relative_error"] = rate / exp - 1.0
    out(res)


def cmd_median(args):
    parts = []
    for p in args:
        try:
            parts.append(json.load(open(p, encoding="utf-8")))
        except (OSError, ValueError):
            pass
    ok = sorted((d for d in parts if _ok(d)), key=lambda d: d["requests_per_s"])
    if not ok:
        out(parts[0] if parts else {"status": "error", "reason": "no rounds"})
        return
    pick = dict(ok[(len(ok) - 1) // 2])  # lower median: never better than half of the rounds
    pick["rounds_requests_per_s"] = [d["requests_per_s"] for d in ok]
    pick["rounds_failed"] = len(parts) - len(ok)
    out(pick)


def cmd_unavailable(args):
    out({"status": "unavailable", "reason": " ".join(args)})


def _load(parts, name):
    p = os.path.join(parts, name + ".json")
    if not os.path.exists(p):
        return {"status": "not run"}
    try:
        return json.load(open(p, encoding="utf-8"))
    except ValueError as e:
        return {"status": "error", "reason": f"bad part file: {e}"}


def _ok(d):
    return d.get("status") == "ok"


def cmd_report(args):
    parts, dest = args[0], args[1]
    cfg = _load(parts, "config")
    wrk, loc, sim = _load(parts, "wrk"), _load(parts, "locust"), _load(parts, "sim")
    amo, wrktls, simtls = _load(parts, "amo"), _load(parts, "wrktls"), _load(parts, "simtls")
    mem, acc = _load(parts, "mem"), _load(parts, "acc")
    buf, bufbase = _load(parts, "buf"), _load(parts, "bufbase")

    def ratio(a, b):
        if _ok(a) and _ok(b) and b.get("requests_per_s"):
            return a["requests_per_s"] / b["requests_per_s"]
        return None

    r_wrk, r_loc = ratio(sim, wrk), ratio(sim, loc)
    checks = {
        "vtox_over_wrk": {"value": r_wrk, "target": f">= {TARGETS['vtox_over_wrk']}",
                          "pass": None if r_wrk is None else r_wrk >= TARGETS["vtox_over_wrk"]},
        "vtox_over_locust": {"value": r_loc, "target": f">= {TARGETS['vtox_over_locust']}",
                             "pass": None if r_loc is None else r_loc >= TARGETS["vtox_over_locust"]},
    }
    r_sf, r_tls = ratio(sim, amo), ratio(simtls, wrktls)
    checks["sf_over_amo"] = {"value": r_sf, "target": f">= {TARGETS['sf_over_amo']}",
                             "pass": None if r_sf is None else r_sf >= TARGETS["sf_over_amo"]}
    checks["tls_vtox_over_wrk"] = {
        "value": r_tls, "target": f">= {TARGETS['tls_vtox_over_wrk']}",
        "pass": None if r_tls is None else r_tls >= TARGETS["tls_vtox_over_wrk"]}
    per_vehicle = None
    buf_info = {}
    if _ok(buf) and _ok(bufbase) and buf.get("peak_rss_kb") and bufbase.get("peak_rss_kb"):
        vehicles = int(cfg.get("buf_vehicles") or 10000)
        per_vehicle = (buf["peak_rss_kb"] - bufbase["peak_rss_kb"]) / vehicles
        fin = buf.get("final", {})
        buf_info = {"vehicles": vehicles, "peak_rss_kb": buf["peak_rss_kb"],
                    "baseline_peak_rss_kb": bufbase["peak_rss_kb"],
                    "buffered_at_end": fin.get("buffered"),
                    "buffer_dropped": fin.get("buffer_dropped"),
                    "kb_per_vehicle": per_vehicle}
    checks["buffer_kb_per_vehicle"] = {
        "value": per_vehicle, "target": f"< {TARGETS['buffer_kb_per_vehicle']}",
        "pass": None if per_vehicle is None else per_vehicle < TARGETS["buffer_kb_per_vehicle"]}
    peak = mem.get("peak_rss_mb") if _ok(mem) else None
    checks["peak_rss_mb"] = {"value": peak, "target": f"< {TARGETS['peak_rss_mb']}",
                             "pass": None if peak is None else peak < TARGETS["peak_rss_mb"]}
    err = acc.get("relative_error") if _ok(acc) else None
    checks["rate_error"] = {"value": err, "target": f"|x| <= {TARGETS['rate_error']}",
                            "pass": None if err is None else abs(err) <= TARGETS["rate_error"]}

    doc = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": {"nproc": os.cpu_count(), "machine": platform.machine(),
                 "kernel": platform.release(), "cpu": _cpu_model(),
                 "loadavg_at_end": list(os.getloadavg())},
        "config": cfg,
        "throughput": {"wrk": wrk, "locust": loc, "vtox_sim": sim, "vtox_sim_at_most_once": amo,
                       "wrk_tls": wrktls, "vtox_sim_tls": simtls},
        "memory": mem,
        "full_buffers": {"run": buf, "baseline": bufbase, "summary": buf_info},
        "rate_accuracy": acc,
        "checks": checks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.write("\n")

    # human summary
    print()
    print("== throughput: one generator core vs nginx on the other core ==")
    print(f"{'tool':<10} {'requests/s':>12} {'vs wrk':>8}  notes")
    base = wrk.get("requests_per_s") if _ok(wrk) else None
    rows = (("wrk", wrk), ("locust", loc), ("vtox-sim", sim), ("sim amo", amo),
            ("wrk tls", wrktls), ("sim tls", simtls))
    for name, d in rows:
        if _ok(d):
            rps = d["requests_per_s"]
            rel = f"{rps / base:8.3f}" if base else f"{'-':>8}"
            note = ""
            if name.startswith("wrk"):
                note = f"{d.get('requests', 0)} req, {d.get('failed', 0)} failed, body {d.get('body_bytes', '?')} B"
            elif name == "locust":
                note = f"{d.get('requests', 0)} req, {d.get('failed', 0)} failed"
            else:
                note = (f"accepted over {d['base_elapsed_s']:.1f}-{d['last_elapsed_s']:.1f} s; "
                        f"sent {d.get('sent_per_s', 0):.0f}/s, dropped {d.get('dropped_per_s', 0):.0f}/s")
            if len(d.get("rounds_requests_per_s", [])) > 1:
                note += "; median of " + "/".join(f"{r:.0f}" for r in d["rounds_requests_per_s"])
            print(f"{name:<10} {rps:12.1f} {rel}  {note}")
        else:
            print(f"{name:<10} {'-':>12} {'-':>8}  {d.get('status')}: {d.get('reason', '')}")
    print()
    print("== checks ==")
    for k, c in checks.items():
        v = c["value"]
        vs = "-" if v is None else (f"{v:+.4%}" if k == "rate_error" else f"{v:.3f}")
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[c["pass"]]
        print(f"{k:<22} {vs:>12}  target {c['target']:<12} {verdict}")
    for label, d in (("vtox-sim throughput", sim), ("memory", mem), ("accuracy", acc)):
        if d.get("status") not in ("ok",):
            print(f"  {label}: {d.get('status')}: {d.get('reason', '')}")
        else:
            if d.get("exit_code", 0) != 0:
                print(f"  warning: {label} run: vtox-sim exited {d['exit_code']}")
            if not d.get("final_seen"):
                print(f"  warning: {label} run: no final line from vtox-sim")
    if _ok(mem):
        print(f"  memory: peak RSS {mem['peak_rss_mb']:.1f} MB "
              f"(100k vehicles @ 60 s, {mem.get('sent_per_s', 0):.0f} sent/s)")
    if buf_info:
        print(f"  full buffers: {buf_info['vehicles']} vehicles, {buf_info['buffered_at_end']} messages "
              f"buffered, peak RSS {buf_info['peak_rss_kb'] / 1024:.1f} MB vs "
              f"{buf_info['baseline_peak_rss_kb'] / 1024:.1f} MB with --buffer 1: "
              f"{per_vehicle:.2f} KB per vehicle")
    if _ok(acc):
        print(f"  accuracy: sent {acc['rate']:.1f}/s vs expected {acc['expected_rate']:.1f}/s "
              f"over {acc['base_elapsed_s']:.1f}-{acc['last_elapsed_s']:.1f} s")
    print(f"\nresults: {dest}")
    missing = [k for k, c in checks.items() if c["pass"] is None]
    failed = [k for k, c in checks.items() if c["pass"] is False]
    print(f"STATUS {'incomplete' if missing else 'complete'}: "
          f"{len(checks) - len(missing) - len(failed)} passed, {len(failed)} failed, "
          f"{len(missing)} not measured")
    # exit code for sim.sh: 0 all passed, 1 some failed, 2 some not measured
    return 2 if missing else (1 if failed else 0)


def _cpu_model():
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv):
    cmds = {"free-port": cmd_free_port, "wait-port": cmd_wait_port, "probe": cmd_probe,
            "wrk": cmd_wrk, "locust": cmd_locust, "sim": cmd_sim,
            "median": cmd_median, "unavailable": cmd_unavailable, "report": cmd_report}
    if len(argv) < 2 or argv[1] not in cmds:
        sys.stderr.write(__doc__)
        return 64
    return cmds[argv[1]](argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
