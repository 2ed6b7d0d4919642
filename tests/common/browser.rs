//! A real browser for the dashboard's tests: headless Chromium (Debian's `chromium`) driven
//! over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by a
//! NUL byte on file descriptors 3 and 4), which is what Playwright does, without a WebSocket
//! client or a driver to install. Only what the tests need: open a page, evaluate JavaScript,
//! click where an element is, type, take a screenshot.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

pub struct Browser {
    child: Child,
    to_browser: File,
    replies: mpsc::Receiver<Value>,
    pending: HashMap<u64, Value>,
    next_id: u64,
    session: String,
    profile: super::TempDir,
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) writes two descriptors into the array it is given.
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "pipe: {}", std::io::Error::last_os_error());
    (fds[0], fds[1])
}

impl Browser {
    /// Headless Chromium with a fresh profile, or None (with the reason printed) where it is
    /// not installed; with VTOX_REQUIRE_CHROMIUM=1 (CI installs it) a missing one fails.
    pub fn launch() -> Option<Browser> {
        if !std::path::Path::new(CHROMIUM).exists() {
            if std::env::var("VTOX_REQUIRE_CHROMIUM").is_ok_and(|v| v == "1") {
                panic!("{CHROMIUM} is missing and VTOX_REQUIRE_CHROMIUM=1");
            }
            eprintln!("skipped: {CHROMIUM} is not installed (apt-get install chromium)");
            return None;
        }
        let profile = super::TempDir::new("chromium");
        // Commands go in on fd 3, replies come out on fd 4.
        let (cmd_read, cmd_write) = pipe();
        let (reply_read, reply_write) = pipe();
        let mut command = Command::new(CHROMIUM);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--window-size=1400,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2, close) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(cmd_read, 3) < 0 || libc::dup2(reply_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for fd in [cmd_read, cmd_write, reply_read, reply_write] {
                    if fd > 4 {
                        libc::close(fd);
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start chromium");
        // SAFETY: these descriptors were just made by pipe() and are owned here alone.
        let (to_browser, from_browser) = unsafe {
            libc::close(cmd_read);
            libc::close(reply_write);
            (File::from_raw_fd(cmd_write), File::from_raw_fd(reply_read))
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(from_browser);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if v.get("id").is_some() && tx.send(v).is_err() {
                        return;
                    }
                }
                buf.clear();
            }
        });
        let mut b = Browser {
            child,
            to_browser,
            replies: rx,
            pending: HashMap::new(),
            next_id: 1,
            session: String::new(),
            profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b.call("Page.enable", json!({}));
        b.call("Runtime.enable", json!({}));
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        );
        Some(b)
    }

    /// Sends one command (to the page once attached) and waits for its reply.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&msg).expect("a command encodes");
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("chromium went away ({method}): {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = self.pending.remove(&id) {
                return Self::result(method, v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .replies
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer from chromium to {method}: {e}"));
            match v["id"].as_u64() {
                Some(got) if got == id => return Self::result(method, v),
                Some(other) => {
                    self.pending.insert(other, v);
                }
                None => {}
            }
        }
    }

    fn result(method: &str, v: Value) -> Value {
        if let Some(e) = v.get("error") {
            panic!("chromium refused {method}: {e}");
        }
        v["result"].clone()
    }

    pub fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for(
            "the page to load",
            Duration::from_secs(20),
            "document.readyState === 'complete'",
        );
    }

    /// The value of a JavaScript expression (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("the page threw on {expression:?}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy (not null, false, 0 or ""); returns its value.
    pub fn wait_for(&mut self, what: &str, deadline: Duration, expression: &str) -> Value {
        let end = Instant::now() + deadline;
        loop {
            let v = self.eval(expression);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= end {
                panic!("timed out after {deadline:?} waiting for {what} ({expression}); the page shows:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The text the page shows.
    pub fn text(&mut self) -> String {
        self.eval("document.body.innerText")
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Clicks the middle of the element `selector` like a mouse does.
    pub fn click(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            sel = serde_json::to_string(selector).unwrap_or_default()
        );
        let at = self.eval(&js);
        let (Some(x), Some(y)) = (at[0].as_f64(), at[1].as_f64()) else {
            panic!(
                "no element {selector} to click; the page shows:\n{}",
                self.text()
            );
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Types `text` into the element `selector` (focused and emptied first) like a keyboard.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).unwrap_or_default();
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); e.focus(); e.value = ''; }})()"
        ));
        self.call("Input.insertText", json!({"text": text}));
    }

    /// A PNG of what the page shows now.
    pub fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine as _;
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let data = r["data"].as_str().expect("screenshot data");
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("screenshot base64");
        std::fs::write(path, png).expect("write the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
