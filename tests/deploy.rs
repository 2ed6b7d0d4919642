//! The deployment files cannot drift from the code: every vtox command line in `deploy/` is
//! parsed, and each flag must be one its binary's `--help` lists; the ports the Kubernetes
//! probes and Service use must be the ones the coordinator listens on.

mod common;

use common::bin;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const BINARIES: [&str; 4] = ["vtox-coord", "vtox-agent", "vtox-sim", "vtox-sink"];

fn deploy_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("deploy/ exists").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut out,
    );
    out.sort();
    out
}

/// `["a", "b"]` on one line (the flow style every manifest here uses) as strings.
fn flow_array(line: &str) -> Option<Vec<String>> {
    let start = line.find('[')?;
    let end = line.rfind(']')?;
    serde_json::from_str::<Vec<String>>(&line[start..=end]).ok()
}

fn binary_of(word: &str) -> Option<&'static str> {
    BINARIES
        .iter()
        .copied()
        .find(|b| word.rsplit('/').next() == Some(*b))
}

/// Every (binary, arguments) in a file.
fn command_lines(path: &Path) -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(path).expect("read");
    let mut out = Vec::new();
    // The image's entrypoint is vtox-coord; manifests that run another binary say so first.
    let mut binary: Option<&'static str> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('#') {
            continue;
        }
        if let Some(rest) = t.strip_prefix("ExecStart=") {
            let words: Vec<String> = rest.split_whitespace().map(String::from).collect();
            if let Some(b) = words.first().and_then(|w| binary_of(w)) {
                out.push((b.to_string(), words[1..].to_vec()));
            }
            continue;
        }
        if t.starts_with("- name:")
            || (line.starts_with("  ") && !line.starts_with("   ") && t.ends_with(':'))
        {
            binary = None;
        }
        let is_entry = t.starts_with("entrypoint:")
            || t.starts_with("ENTRYPOINT")
            || t.starts_with("command:");
        let is_args = t.starts_with("args:") || t.starts_with("CMD") || t.starts_with("command:");
        if !(is_entry || is_args) {
            continue;
        }
        let Some(words) = flow_array(t) else { continue };
        match words.first().and_then(|w| binary_of(w)) {
            Some(b) => {
                binary = Some(b);
                if words.len() > 1 {
                    out.push((b.to_string(), words[1..].to_vec()));
                }
            }
            None if is_args => out.push((binary.unwrap_or("vtox-coord").to_string(), words)),
            None => {}
        }
    }
    out
}

fn help(binary: &str, sub: Option<&str>) -> String {
    let mut cmd = Command::new(bin(binary));
    if let Some(s) = sub {
        cmd.arg(s);
    }
    let out = cmd.arg("--help").output().expect("--help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_flag_in_the_manifests_exists() {
    let mut checked = 0;
    for file in deploy_files() {
        for (binary, args) in command_lines(&file) {
            let sub = if binary == "vtox-coord" {
                args.iter()
                    .find(|a| !a.starts_with('-'))
                    .map(String::as_str)
            } else {
                None
            };
            let text = help(&binary, sub);
            let known: BTreeSet<&str> = text
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .filter(|w| w.starts_with("--"))
                .map(|w| w.split('=').next().unwrap_or(w))
                .collect();
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    known.contains(flag.as_str()),
                    "{}: {binary} {} has no {flag}",
                    file.display(),
                    sub.unwrap_or("")
                );
                checked += 1;
            }
            // Addresses must parse as the binaries will parse them.
            for (i, a) in args.iter().enumerate() {
                if a == "--listen" || a == "--metrics-listen" {
                    let v = args.get(i + 1).expect("a value");
                    assert!(
                        v.parse::<std::net::SocketAddr>().is_ok(),
                        "{}: {a} {v}",
                        file.display()
                    );
                }
            }
        }
    }
    assert!(
        checked > 30,
        "the manifests were read: {checked} flags checked"
    );
}

#[test]
fn kubernetes_ports_and_probes_match_the_coordinator() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/vtox.yaml"))
            .expect("k8s manifest");
    let coord_args =
        command_lines(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/vtox.yaml"))
            .into_iter()
            .find(|(b, a)| b == "vtox-coord" && a.first().map(String::as_str) == Some("serve"))
            .expect("the coordinator's command line")
            .1;
    let port_of = |flag: &str| -> String {
        let i = coord_args.iter().position(|a| a == flag).expect(flag);
        coord_args[i + 1]
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let (grpc, metrics) = (port_of("--listen"), port_of("--metrics-listen"));
    assert!(
        text.contains(&format!(
            "livenessProbe:\n            grpc: {{port: {grpc}}}"
        )),
        "liveness probe on {grpc}"
    );
    assert!(
        text.contains(&format!(
            "grpc: {{port: {grpc}, service: vtox.v1.AgentService}}"
        )),
        "readiness probe on {grpc}"
    );
    assert!(text.contains(&format!("{{name: grpc, containerPort: {grpc}}}")));
    assert!(text.contains(&format!("{{name: grpc, port: {grpc}, targetPort: {grpc}}}")));
    assert!(text.contains(&format!("{{name: metrics, containerPort: {metrics}}}")));
    // The readiness probe names a service the health service reports.
    assert!(help("vtox-coord", Some("serve")).contains("--listen"));
    assert!(
        text.contains("kind: DaemonSet") && text.contains("kind: Secret")
            || text.contains("secretName: vtox-token")
    );
}
