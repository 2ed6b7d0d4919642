-- wrk_post.lua: the wrk baseline for bench/sim.sh.
--
-- Every request is the same POST of one ingest-contract body (see DESIGN.md, "The ingest
-- contract"): 10 points at 50 Hz for vehicle 粤B·SEAL·202400000 in 深圳福田区. The body is
-- built once per thread at load time, so wrk measures the cheapest possible sender: no
-- per-request serialisation, no per-request Lua (no request() function is defined, so wrk
-- formats the request once and replays it).
--
--   wrk -t1 -c64 -d20s -s bench/wrk_post.lua http://127.0.0.1:PORT
--
-- If the URL has no path (or "/"), the contract path below is used; a URL with its own
-- path keeps it. Set WRK_DUMP_BODY=/some/file to have the body written there (the bench
-- script validates it as JSON). done() prints one machine-readable line starting with
-- "WRK_JSON " that bench/sim_helpers.py parses.

local PATH = "/api/v1/diagnosis-stream/simulator/vehicles/"
  .. "%E7%B2%A4B%C2%B7SEAL%C2%B7202400000"            -- 粤B·SEAL·202400000
  .. "/data?location="
  .. "%E6%B7%B1%E5%9C%B3%E7%A6%8F%E7%94%B0%E5%8C%BA"  -- 深圳福田区

local function build_body()
  local points = {}
  local t0 = 1764320000.02
  for i = 0, 9 do
    local t = t0 + i * 0.02
    -- three-phase currents at f_e = 1450/30 Hz, amplitude ~10 A
    local w = 2 * math.pi * (1450 / 30) * (i * 0.02)
    local ia = 10.0 * math.sin(w)
    local ib = 10.0 * math.sin(w - 2 * math.pi / 3)
    local ic = 10.0 * math.sin(w - 4 * math.pi / 3)
    points[#points + 1] = string.format(
      '{"时间":%.2f,"Ia":%.2f,"Ib":%.2f,"Ic":%.2f,"振动_X":%.2f,"振动_Y":%.2f,"振动_Z":%.2f,"温度":%.1f,"转速":%d}',
      t, ia, ib, ic,
      0.12 + 0.01 * math.sin(3 * i), 0.10 + 0.01 * math.cos(5 * i), 0.08 + 0.01 * math.sin(7 * i),
      45.2 + 0.01 * i, 1450 + i)
  end
  return '{"sensor_data":{"data":[' .. table.concat(points, ",") .. '],'
    .. '"sampling_rate":50,"batch_size":10,"fault_type":"normal","fault_severity":0.0,'
    .. '"timestamp":"2026-11-28T09:00:00.123456"},'
    .. '"metadata":{"vehicle_id":"粤B·SEAL·202400000","model":"SEAL","agent":"wrk","instance":0,'
    .. '"seq":17,"fault_type":"normal","fault_severity":0.0,"sent_at":"2026-11-28T09:00:00.124001Z"}}'
end

wrk.method = "POST"
wrk.body = build_body()
wrk.headers["Content-Type"] = "application/json"
if wrk.path == nil or wrk.path == "" or wrk.path == "/" then
  wrk.path = PATH
end

local dump = os.getenv("WRK_DUMP_BODY")
if dump and dump ~= "" then
  local f = io.open(dump, "wb")
  if f then
    f:write(wrk.body)
    f:close()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"p50":%.1f,"p99":%.1f,"max":%.1f},"body_bytes":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max, #wrk.body))
end
