//! Making a message: the run's clock (nanoseconds since the run start, as the schedule
//! counts them) and the maker that renders a vehicle's samples at a tick into a request, with
//! its ground truth, its timestamps and its token.

use crate::auth::Tokens;
use crate::config::Config;
use crate::lanes::Job;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use vtox::http1::RequestBuf;
use vtox::ingest::{BodyTemplate, IsoStamp, MessageFields};
use vtox::telemetry::{Sample, VehicleModel};

/// What a message is made from: the vehicle's model, its body template and its request path.
pub struct Vehicle {
    pub model: VehicleModel,
    pub template: BodyTemplate,
    /// Request target in origin form: the path and query; the Host header names the target.
    pub path: Box<str>,
    /// The vehicle's next tick.
    pub next_k: u64,
}

/// Times of the run: `ns` are nanoseconds since the run start, as the schedule counts them.
#[derive(Clone, Copy)]
pub struct Clock {
    pub origin: Instant,
    /// Nanoseconds since the run start at `origin`; negative when the run starts later.
    pub origin_rel_ns: i64,
    /// The run start as Unix seconds.
    pub start_unix: f64,
}

impl Clock {
    pub fn now_ns(&self) -> i64 {
        self.origin_rel_ns + self.origin.elapsed().as_nanos() as i64
    }

    /// The instant `ns` after the run start.
    pub fn instant(&self, ns: i64) -> Instant {
        let d = ns - self.origin_rel_ns;
        if d >= 0 {
            self.origin + Duration::from_nanos(d as u64)
        } else {
            self.origin
                .checked_sub(Duration::from_nanos(d.unsigned_abs()))
                .unwrap_or(self.origin)
        }
    }
}

/// What the scheduler needs to make and send a message.
pub struct Maker {
    pub cfg: Arc<Config>,
    pub clock: Clock,
    pub tokens: Option<Tokens>,
    pub fs: f64,
    pub points: usize,
    /// From the first sample of a message to its last: a message made at its tick carries
    /// the samples of the batch that just ended.
    pub batch_span_ns: i64,
    pub samples: Vec<Sample>,
    pub body_cap: usize,
    pub sent_at: IsoStamp,
    pub made_at: IsoStamp,
}

impl Maker {
    /// The job of sending message `seq` of vehicle `idx`, made at its scheduled time `due_ns`
    /// with winding temperature `temp_c`, and its body's length; `waited` when it did not go
    /// out as it was made (its `timestamp` is then when it was made, not when it was sent).
    pub fn job(
        &mut self,
        v: &Vehicle,
        idx: u32,
        seq: u64,
        due_ns: i64,
        temp_c: f64,
        waited: bool,
    ) -> (Job, usize) {
        let t_rel_ns = due_ns - self.batch_span_ns;
        let t_rel = t_rel_ns as f64 / 1e9;
        let t_abs = self.clock.start_unix + t_rel;
        let truth = v.model.render(
            seq,
            t_rel,
            t_abs,
            temp_c,
            self.fs,
            self.points,
            &mut self.samples,
        );
        let sent_at = self.sent_at.at(SystemTime::now());
        let made_at = if waited {
            let made = (self.clock.start_unix + due_ns as f64 / 1e9).max(0.0);
            self.made_at
                .at(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(made))
        } else {
            sent_at
        };
        let fields = MessageFields {
            seq,
            fault_type: truth.kind.as_str(),
            fault_severity: truth.severity,
            sent_at,
            made_at,
            sampling_rate: self.cfg.args.sampling_rate,
        };
        let token = self.tokens.as_ref().map(|t| t.token(idx as usize));
        let token_len = token.as_ref().map_or(0, |(_, t)| t.len() + 24);
        let mut req = RequestBuf::new(
            self.body_cap,
            v.path.len(),
            self.cfg.authority.len() + token_len,
        );
        v.template.write(req.body(), &self.samples, &fields);
        let body_len = req.body_len();
        self.body_cap = self.body_cap.max(body_len + 64);
        let (bytes, start) = req.finish_with_bearer(
            &v.path,
            &self.cfg.authority,
            token.as_ref().map(|(_, t)| &**t),
        );
        let job = Job {
            bytes,
            start,
            created: Instant::now(),
            due: self.clock.instant(due_ns),
            vehicle: idx,
            waited,
            auth_gen: token.map_or(0, |(g, _)| g),
        };
        (job, body_len)
    }
}
