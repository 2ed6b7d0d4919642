//! The live view on the terminal: redrawn in place on a terminal, printed every few seconds
//! otherwise. The text itself is `vtox::render::Live`'s.

use std::io::{IsTerminal, Write as _};
use std::time::{Duration, Instant};
use vtox::render::Live;
use vtox::wire::pb;

pub struct LiveView {
    live: Live,
    lines_drawn: usize,
    tty: bool,
    last_print: Option<Instant>,
}

impl LiveView {
    pub fn new() -> Self {
        LiveView {
            live: Live::default(),
            lines_drawn: 0,
            tty: std::io::stderr().is_terminal(),
            last_print: None,
        }
    }

    /// Draws the run's status; `extra` (the backend's backlog) goes below it.
    pub fn show(&mut self, s: &pb::RunStatus, extra: &str) {
        let now = Instant::now();
        let text = self.live.text(s, extra, now);
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.lines_drawn > 0 {
                let _ = write!(err, "\x1b[{}A\x1b[J", self.lines_drawn);
            }
            let _ = write!(err, "{text}");
            self.lines_drawn = text.lines().count();
        } else if self
            .last_print
            .is_none_or(|p| now.duration_since(p) >= Duration::from_secs(5))
        {
            let _ = write!(err, "{text}");
            self.last_print = Some(now);
        }
    }
}
