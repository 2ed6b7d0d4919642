-- wrk script for bench/sink.sh: posts the DESIGN.md example ingest body (one sample) on every request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{"sensor_data": {"data": [{"时间": 1764320000.02, "Ia": 9.81, "Ib": -4.12, "Ic": -5.69, "振动_X": 0.12, "振动_Y": 0.10, "振动_Z": 0.08, "温度": 45.2, "转速": 1450}], "sampling_rate": 50, "batch_size": 10, "fault_type": "normal", "fault_severity": 0.0, "timestamp": "2026-11-28T09:00:00.123456"}, "metadata": {"vehicle_id": "粤B·SEAL·202400000", "model": "SEAL", "agent": "host-a", "instance": 0, "seq": 17, "fault_type": "normal", "fault_severity": 0.0, "sent_at": "2026-11-28T09:00:00.124001Z"}}]]

-- A non-200 would mean the benchmark measured error answers, not ingest: count them.
local bad = 0
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("non-200 (thread-local, last thread): %d\n", bad))
end
