"""Locust baseline for bench/sim.sh.

Each simulated user is one vehicle of the vtox fleet (DESIGN.md, "Fleet identity") and posts,
as fast as it can (no wait), a freshly built ingest-contract body: 10 points at 50 Hz with
random-ish values and metadata carrying the vehicle's own seq counter. This is what a Python
load generator written the obvious way does per message.

    taskset -c 0 locust -f bench/locustfile.py --headless -u 64 -r 64 -t 20s \
        --host http://127.0.0.1:PORT --csv /tmp/locust

The request rate is the Aggregated row's "Requests/s" in /tmp/locust_stats.csv.
Environment: LOCUST_AGENT (metadata.agent, default "locust"), LOCUST_FIRST_VEHICLE (default 0).
"""

import itertools
import json
import math
import os
import random
import time
from datetime import datetime, timezone
from urllib.parse import quote

from locust import FastHttpUser, constant, task

# (model, plate prefix, city), vehicle n has MODELS[n % 10]
MODELS = [
    ("SEAL", "粤B", "深圳福田区"),
    ("QIN", "陕A", "西安高新区"),
    ("HAN", "陕A", "西安"),
    ("TANG", "粤A", "广州天河区"),
    ("SONG", "沪A", "上海浦东区"),
    ("YUAN", "京A", "北京海淀区"),
    ("DOLPHIN", "苏A", "南京"),
    ("SEAGULL", "浙A", "杭州滨江区"),
    ("FRIGATE07", "川A", "成都高新区"),
    ("DESTROYER05", "渝A", "重庆渝中区"),
]
BATCH = 10
RATE_HZ = 50
AGENT = os.environ.get("LOCUST_AGENT", "locust")
_next_vehicle = itertools.count(int(os.environ.get("LOCUST_FIRST_VEHICLE", "0")))


class Vehicle(FastHttpUser):
    wait_time = constant(0)

    def on_start(self):
        n = next(_next_vehicle)
        model, plate, city = MODELS[n % len(MODELS)]
        self.vehicle_id = f"{plate}·{model}·{202400000 + n}"
        self.model = model
        self.seq = 0
        self.rpm = 1200 + random.random() * 600
        self.temp = 40 + random.random() * 10
        self.path = (
            "/api/v1/diagnosis-stream/simulator/vehicles/"
            f"{quote(self.vehicle_id, safe='')}/data?location={quote(city, safe='')}"
        )

    def body(self):
        now = time.time()
        self.rpm = min(3000.0, max(600.0, self.rpm + random.gauss(0, 5)))
        self.temp += random.gauss(0, 0.02)
        f_e = self.rpm / 30.0
        amp = 8.0 + random.random() * 4.0
        points = []
        for i in range(BATCH):
            t = now + i / RATE_HZ
            w = 2 * math.pi * f_e * t
            points.append({
                "时间": round(t, 2),
                "Ia": round(amp * math.sin(w) + random.gauss(0, 0.1), 2),
                "Ib": round(amp * math.sin(w - 2 * math.pi / 3) + random.gauss(0, 0.1), 2),
                "Ic": round(amp * math.sin(w - 4 * math.pi / 3) + random.gauss(0, 0.1), 2),
                "振动_X": round(abs(random.gauss(0.12, 0.02)), 2),
                "振动_Y": round(abs(random.gauss(0.10, 0.02)), 2),
                "振动_Z": round(abs(random.gauss(0.08, 0.02)), 2),
                "温度": round(self.temp, 2),
                "转速": int(self.rpm),
            })
        ts = datetime.fromtimestamp(now)
        doc = {
            "sensor_data": {
                "data": points,
                "sampling_rate": RATE_HZ,
                "batch_size": BATCH,
                "fault_type": "normal",
                "fault_severity": 0.0,
                "timestamp": ts.isoformat(timespec="microseconds"),
            },
            "metadata": {
                "vehicle_id": self.vehicle_id,
                "model": self.model,
                "agent": AGENT,
                "instance": 0,
                "seq": self.seq,
                "fault_type": "normal",
                "fault_severity": 0.0,
                "sent_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        self.seq += 1
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @task
    def post_data(self):
        self.client.post(
            self.path,
            data=self.body(),
            headers={"Content-Type": "application/json"},
            name="POST /api/v1/diagnosis-stream/simulator/vehicles/[id]/data",
        )
