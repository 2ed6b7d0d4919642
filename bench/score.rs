//! Scoring benchmark: a throwaway redis-server is filled like a busy backend's (50,000 raw
//! entries with vtox's metadata and a full-size `sensor_data`, and five analyzers' results for
//! each), then the real `vtox-coord score` reads and joins all of them; its time and peak
//! memory are printed. Run: `cargo build --release --bin vtox-coord && cargo bench --bench
//! score` (RAW=… to change the size). Needs redis-server.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vtox::score::ANALYZERS;

fn main() {
    let raw_n: usize = std::env::var("RAW")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(16_379);
    let mut redis = match Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start redis-server ({e}); apt-get install redis-server");
            return;
        }
    };
    let url = format!("redis://127.0.0.1:{port}");
    let result = fill_and_score(&url, raw_n);
    let _ = redis.kill();
    let _ = redis.wait();
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn fill_and_score(url: &str, raw_n: usize) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut con = loop {
        match client.get_connection() {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("redis did not come up: {e}")),
        }
    };
    // 10 samples at 50 Hz, as the contract's example: about 1.4 KB of JSON.
    let point = r#"{"时间":1764320000.02,"Ia":9.81,"Ib":-4.12,"Ic":-5.69,"振动_X":0.12,"振动_Y":0.1,"振动_Z":0.08,"温度":45.2,"转速":1450}"#;
    let sensor = format!(
        r#"{{"data":[{}],"sampling_rate":50,"batch_size":10,"fault_type":"normal","fault_severity":0.0,"timestamp":"2026-11-28T09:00:00.123456"}}"#,
        [point; 10].join(",")
    );
    let t = Instant::now();
    let mut ids = Vec::with_capacity(raw_n);
    for chunk in (0..raw_n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &n in chunk {
            let fault = if n % 10 == 0 {
                ANALYZERS[n / 10 % 5]
            } else {
                "normal"
            };
            let meta = format!(
                r#"{{"vehicle_id":"v{n}","seq":{n},"fault_type":"{fault}","fault_severity":0.5,"sent_at":"2026-11-28T09:00:00.000000Z"}}"#
            );
            pipe.cmd("XADD")
                .arg("motor_raw_data")
                .arg("*")
                .arg("vehicle_id")
                .arg(format!("v{n}"))
                .arg("sensor_data")
                .arg(&sensor)
                .arg("metadata")
                .arg(meta)
                .arg("data_type")
                .arg("motor_sensor_data");
        }
        let got: Vec<String> = pipe.query(&mut con).map_err(|e| e.to_string())?;
        ids.extend(got);
    }
    for chunk in ids.chunks(200) {
        let mut pipe = redis::pipe();
        for (i, id) in chunk.iter().enumerate() {
            for a in ANALYZERS {
                pipe.cmd("XADD")
                    .arg("fault_diagnosis_results")
                    .arg("*")
                    .arg("fault_type")
                    .arg(a)
                    .arg("status")
                    .arg(if i % 7 == 0 { "warning" } else { "normal" })
                    .arg("original_message_id")
                    .arg(id)
                    .ignore();
            }
        }
        let _: () = pipe.query(&mut con).map_err(|e| e.to_string())?;
    }
    println!(
        "filled {} raw entries and {} results in {:.1} s",
        raw_n,
        raw_n * 5,
        t.elapsed().as_secs_f64()
    );
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/vtox-coord");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: cargo build --release --bin vtox-coord",
            bin.display()
        ));
    }
    let t = Instant::now();
    let out = Command::new(&bin)
        .args(["score", "--redis", url, "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    // SAFETY: getrusage only writes into the struct it is given.
    let peak_kib = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u.ru_maxrss
    };
    println!(
        "score: {} results joined to {} raw entries in {:.2} s ({:.0} results/s), peak RSS of the scoring process {:.1} MiB",
        v["results"],
        raw_n,
        secs,
        v["results"].as_f64().unwrap_or(0.0) / secs,
        peak_kib as f64 / 1024.0
    );
    Ok(())
}
