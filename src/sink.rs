//! vtox-sink's pure core: ingest-body validation the way the FastAPI backend does it, bearer checks, and the bookkeeping behind `/stats`.
//!
//! Nothing here touches a socket or a clock: the binary passes the time in (as the time since
//! it started), so duplicates, conflicts and the 2 s window can be tested directly.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Two different senders of one vehicle closer together than this count as a conflict: a
/// vehicle driven by two hosts at once shows up as alternating senders every message interval.
pub const CONFLICT_WINDOW: Duration = Duration::from_secs(2);

/// Seqs at or above this are not tracked: a bitset up to here costs at most 2 MiB per vehicle,
/// while a hostile or buggy seq of 10^12 would otherwise allocate without bound.
pub const MAX_TRACKED_SEQ: u64 = 1 << 24;

/// Distinct fault_type keys kept apart in `faults`; later ones share [`OTHER_FAULT`], so a
/// client sending random strings cannot grow the map without bound.
pub const MAX_FAULT_KINDS: usize = 64;

/// The `faults` key for fault types beyond [`MAX_FAULT_KINDS`].
pub const OTHER_FAULT: &str = "other";

// ---------------------------------------------------------------------------------------------
// Body validation

/// One entry of a FastAPI-style validation error (`{"loc": [...], "msg": ..., "type": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Location below `body`, e.g. `["sensor_data", "data"]`.
    pub loc: &'static [&'static str],
    pub kind: FieldErrorKind,
}

/// The pydantic v2 error types the backend produces for the ways a body can be wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// A required field is absent.
    Missing,
    /// The whole body is not an object (or not JSON by content type).
    ModelAttributes,
    /// A field that must be an object is something else.
    Dict,
    /// A field that must be an array is something else.
    List,
}

impl FieldErrorKind {
    fn type_name(self) -> &'static str {
        match self {
            FieldErrorKind::Missing => "missing",
            FieldErrorKind::ModelAttributes => "model_attributes_type",
            FieldErrorKind::Dict => "dict_type",
            FieldErrorKind::List => "list_type",
        }
    }

    fn msg(self) -> &'static str {
        match self {
            FieldErrorKind::Missing => "Field required",
            FieldErrorKind::ModelAttributes => {
                "Input should be a valid dictionary or object to extract fields from"
            }
            FieldErrorKind::Dict => "Input should be a valid dictionary",
            FieldErrorKind::List => "Input should be a valid list",
        }
    }
}

/// Why an ingest body was refused; every variant is answered with 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("JSON decode error at character {position}: {message}")]
    InvalidJson { position: usize, message: String },
    #[error("body does not match the ingest model ({} error(s))", .0.len())]
    Fields(Vec<FieldError>),
    /// Valid JSON of the right shape that serde still refused (e.g. a duplicate key, which
    /// Python would have resolved to the last value).
    #[error("body could not be read: {0}")]
    Other(String),
}

impl BodyError {
    /// The FastAPI-style `{"detail": [...]}` document for a 422 answer.
    pub fn detail(&self) -> Value {
        let items: Vec<Value> = match self {
            BodyError::InvalidJson { position, message } => vec![serde_json::json!({
                "type": "json_invalid",
                "loc": ["body", position],
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": message},
            })],
            BodyError::Fields(errors) => errors
                .iter()
                .map(|e| {
                    let mut loc = vec![Value::from("body")];
                    loc.extend(e.loc.iter().map(|s| Value::from(*s)));
                    serde_json::json!({"type": e.kind.type_name(), "loc": loc, "msg": e.kind.msg()})
                })
                .collect(),
            BodyError::Other(message) => vec![serde_json::json!({
                "type": "value_error",
                "loc": ["body"],
                "msg": message,
            })],
        };
        serde_json::json!({ "detail": items })
    }
}

/// What the sink reads out of `metadata`; every field is optional because the backend stores
/// metadata as a free-form dict and only the simulator promises these keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta<'a> {
    pub vehicle_id: Option<Cow<'a, str>>,
    /// Raw JSON text of `agent` (compared as text; no decoding needed to tell senders apart).
    pub agent: Option<&'a str>,
    /// Raw JSON text of `instance` (a number from vtox-sim, but anything is accepted).
    pub instance: Option<&'a str>,
    pub seq: Option<u64>,
    pub fault_type: Option<Cow<'a, str>>,
}

/// A body that passed validation, borrowing from the request bytes.
#[derive(Debug, Clone)]
pub struct Message<'a> {
    /// The exact `sensor_data` JSON text, as written to Redis.
    pub sensor_data: &'a RawValue,
    /// The exact `metadata` JSON text, if present and not null.
    pub metadata: Option<&'a RawValue>,
    /// Number of samples in `sensor_data.data`.
    pub points: usize,
    pub sensor_fault_type: Option<Cow<'a, str>>,
    pub meta: Meta<'a>,
}

impl Message<'_> {
    /// The metadata text for Redis: the backend stores `{}` when none was sent.
    pub fn metadata_text(&self) -> &str {
        self.metadata.map_or("{}", |m| m.get())
    }

    /// The fault type the message is counted under: metadata is the ground truth, the
    /// sensor_data copy is the fallback for clients that send no metadata.
    pub fn fault_type(&self) -> Option<&str> {
        self.meta
            .fault_type
            .as_deref()
            .or(self.sensor_fault_type.as_deref())
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    sensor_data: &'a RawValue,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SensorFields<'a> {
    data: Vec<IgnoredAny>,
    #[serde(borrow, default)]
    fault_type: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MetaFields<'a> {
    #[serde(borrow, default)]
    vehicle_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    agent: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instance: Option<&'a RawValue>,
    #[serde(borrow, default)]
    seq: Option<&'a RawValue>,
    #[serde(borrow, default)]
    fault_type: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct BorrowedStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// A JSON string's value, borrowed unless it holds escapes; None for any other JSON type,
/// since metadata is free-form and a wrong type there must not reject the message.
fn lenient_str(raw: Option<&RawValue>) -> Option<Cow<'_, str>> {
    serde_json::from_str::<BorrowedStr<'_>>(raw?.get())
        .ok()
        .map(|s| s.0)
}

/// True when a request with this Content-Type would have its body parsed as JSON by FastAPI
/// (no header at all, `application/json` or `application/*+json`); anything else is validated
/// as raw bytes and so fails the model.
pub fn is_json_content_type(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type else { return true };
    let Ok(ct) = std::str::from_utf8(ct) else {
        return false;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    let Some((main, sub)) = essence.split_once('/') else {
        return false;
    };
    main.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() >= 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Validates an ingest body. The fast path is one borrowing serde pass plus two small ones;
/// only a failing body is parsed again into a `Value` to say precisely what is wrong.
pub fn parse_body(body: &[u8]) -> Result<Message<'_>, BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| BodyError::InvalidJson {
        position: e.valid_up_to(),
        message: "invalid UTF-8".to_string(),
    })?;
    fast_parse(text).ok_or_else(|| diagnose(text))
}

fn fast_parse(text: &str) -> Option<Message<'_>> {
    let env: Envelope<'_> = serde_json::from_str(text).ok()?;
    let sensor: SensorFields<'_> = serde_json::from_str(env.sensor_data.get()).ok()?;
    let meta = match env.metadata {
        None => Meta::default(),
        Some(m) => {
            let f: MetaFields<'_> = serde_json::from_str(m.get()).ok()?;
            Meta {
                vehicle_id: lenient_str(f.vehicle_id),
                agent: f.agent.map(RawValue::get).filter(|a| *a != "null"),
                instance: f.instance.map(RawValue::get).filter(|i| *i != "null"),
                seq: f
                    .seq
                    .and_then(|s| serde_json::from_str::<u64>(s.get()).ok()),
                fault_type: lenient_str(f.fault_type),
            }
        }
    };
    Some(Message {
        sensor_data: env.sensor_data,
        metadata: env.metadata,
        points: sensor.data.len(),
        sensor_fault_type: lenient_str(sensor.fault_type),
        meta,
    })
}

/// The slow path: why did the fast path refuse this text? Collects every field error, as
/// pydantic does, rather than stopping at the first.
fn diagnose(text: &str) -> BodyError {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return BodyError::InvalidJson {
                position: char_position(text, e.line(), e.column()),
                message: e.to_string(),
            }
        }
    };
    let Value::Object(top) = &value else {
        return BodyError::Fields(vec![FieldError {
            loc: &[],
            kind: FieldErrorKind::ModelAttributes,
        }]);
    };
    let mut errors = Vec::new();
    match top.get("sensor_data") {
        None => errors.push(FieldError {
            loc: &["sensor_data"],
            kind: FieldErrorKind::Missing,
        }),
        Some(Value::Object(sd)) => match sd.get("data") {
            None => errors.push(FieldError {
                loc: &["sensor_data", "data"],
                kind: FieldErrorKind::Missing,
            }),
            Some(Value::Array(_)) => {}
            Some(_) => errors.push(FieldError {
                loc: &["sensor_data", "data"],
                kind: FieldErrorKind::List,
            }),
        },
        Some(_) => errors.push(FieldError {
            loc: &["sensor_data"],
            kind: FieldErrorKind::Dict,
        }),
    }
    match top.get("metadata") {
        None | Some(Value::Null) | Some(Value::Object(_)) => {}
        Some(_) => errors.push(FieldError {
            loc: &["metadata"],
            kind: FieldErrorKind::Dict,
        }),
    }
    if errors.is_empty() {
        // Well-formed to a Value but not to serde's structs: duplicate keys are the known case.
        let why = serde_json::from_str::<Envelope<'_>>(text)
            .err()
            .map_or_else(|| "unreadable body".to_string(), |e| e.to_string());
        return BodyError::Other(why);
    }
    BodyError::Fields(errors)
}

/// Character offset (what Python's JSONDecodeError.pos reports) of serde's 1-based
/// line/column, clamped to the text.
fn char_position(text: &str, line: usize, column: usize) -> usize {
    let mut offset = 0usize;
    for (i, l) in text.split_inclusive('\n').enumerate() {
        if i + 1 == line {
            let col_bytes = column.saturating_sub(1).min(l.len());
            let mut end = offset + col_bytes;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            return text[..end].chars().count();
        }
        offset += l.len();
    }
    text.chars().count()
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Why the authenticated route refused a request; both are answered with 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("Not authenticated")]
    Missing,
    #[error("Invalid authentication credentials")]
    Invalid,
}

/// Checks an `Authorization` header value against the configured token. Without a configured
/// token any non-empty bearer passes, matching a backend whose token check is stubbed.
pub fn check_bearer(header: Option<&[u8]>, expected: Option<&str>) -> Result<(), Refusal> {
    let header = header.ok_or(Refusal::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| Refusal::Missing)?;
    let (scheme, token) = header.trim().split_once(' ').ok_or(Refusal::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::Missing);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::Missing);
    }
    match expected {
        Some(want) if !crate::auth::ct_eq(token.as_bytes(), want.as_bytes()) => {
            Err(Refusal::Invalid)
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping

/// A growable bitset of the seqs seen for one vehicle. Seqs are dense from 0, so it stays
/// tiny: a day at 50 messages a minute is 9 KiB.
#[derive(Debug, Clone, Default)]
pub struct SeqSet {
    words: Vec<u64>,
    distinct: u64,
    max: Option<u64>,
}

impl SeqSet {
    /// Some(true) if `seq` is new, Some(false) if it was already seen, None if it is beyond
    /// [`MAX_TRACKED_SEQ`] and so not tracked.
    pub fn insert(&mut self, seq: u64) -> Option<bool> {
        if seq >= MAX_TRACKED_SEQ {
            return None;
        }
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if word >= self.words.len() {
            // resize reserves amortized, so dense seqs do not reallocate every 64 messages.
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & bit != 0 {
            return Some(false);
        }
        self.words[word] |= bit;
        self.distinct += 1;
        self.max = Some(self.max.map_or(seq, |m| m.max(seq)));
        Some(true)
    }

    pub fn contains(&self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        self.words
            .get(word)
            .is_some_and(|w| w & (1u64 << (seq % 64)) != 0)
    }

    /// Number of distinct seqs seen.
    pub fn len(&self) -> u64 {
        self.distinct
    }

    pub fn is_empty(&self) -> bool {
        self.distinct == 0
    }

    /// Highest seq seen.
    pub fn max(&self) -> Option<u64> {
        self.max
    }

    /// Seqs below the highest one that never arrived: messages lost (or still in flight).
    pub fn gaps(&self) -> u64 {
        self.max.map_or(0, |m| m + 1 - self.distinct)
    }
}

#[derive(Debug, Clone)]
struct Sender {
    agent: String,
    instance: Option<String>,
    at: Duration,
}

#[derive(Debug, Clone, Default)]
struct VehicleState {
    count: u64,
    out_of_order: u64,
    duplicates: u64,
    conflicts: u64,
    seqs: SeqSet,
    last: Option<Sender>,
}

/// Everything `/stats` reports, accumulated by the handlers under one short-held lock.
#[derive(Debug, Default)]
pub struct SinkStats {
    accepted: u64,
    rejected: u64,
    unauthorized: u64,
    redis_errors: u64,
    bytes: u64,
    points: u64,
    duplicates: u64,
    out_of_order: u64,
    unavailable: u64,
    conflicts: u64,
    without_metadata: u64,
    untracked_seq: u64,
    vehicle_id_mismatches: u64,
    fault_mismatches: u64,
    faults: HashMap<String, u64>,
    vehicles: HashMap<String, VehicleState>,
    reset_at: Duration,
}

/// The `/stats` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Messages answered 200 (and, with Redis, written to the stream).
    pub accepted: u64,
    /// Bodies answered 422.
    pub rejected: u64,
    /// Requests to the authenticated route answered 401.
    pub unauthorized: u64,
    /// Valid messages answered 500 because Redis failed or timed out; not in `accepted`.
    pub redis_errors: u64,
    /// Body bytes of accepted messages.
    pub bytes: u64,
    /// Samples (`sensor_data.data` entries) in accepted messages.
    pub points: u64,
    /// Distinct vehicle IDs (from the path) among accepted messages.
    pub vehicles: u64,
    /// Accepted messages whose (vehicle, seq) was already seen.
    pub duplicates: u64,
    /// Accepted messages with a new seq below one the vehicle had sent before: a vehicle's
    /// messages arrived out of order.
    #[serde(default)]
    pub out_of_order: u64,
    /// Requests answered 503 by `--outage` or `--max-rps`.
    #[serde(default)]
    pub unavailable: u64,
    /// Accepted messages whose (agent, instance) differs from the vehicle's previous sender
    /// less than 2 s earlier.
    pub conflicts: u64,
    /// Seqs below each vehicle's highest seq that never arrived, summed over vehicles.
    pub gaps: u64,
    /// Accepted messages per fault type (metadata's, else sensor_data's).
    pub faults: BTreeMap<String, u64>,
    /// Accepted messages without a metadata object.
    pub without_metadata: u64,
    /// Accepted messages whose seq was absent, not an integer or too large to track.
    pub untracked_seq: u64,
    /// Accepted messages whose metadata.vehicle_id differs from the path's ID.
    pub vehicle_id_mismatches: u64,
    /// Accepted messages whose metadata and sensor_data fault types differ.
    pub fault_mismatches: u64,
    /// Seconds since the sink started.
    pub uptime_s: f64,
    /// Seconds since the last `POST /stats/reset` (equal to uptime_s without one).
    pub since_reset_s: f64,
}

/// One entry of `/stats/vehicles`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VehicleSnapshot {
    pub vehicle_id: String,
    pub count: u64,
    #[serde(default)]
    pub out_of_order: u64,
    pub duplicates: u64,
    pub conflicts: u64,
    pub max_seq: Option<u64>,
    pub gaps: u64,
    /// The last sender's `agent` and `instance`, as the JSON values it sent.
    pub agent: Option<Box<RawValue>>,
    pub instance: Option<Box<RawValue>>,
}

impl SinkStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a message that was answered 200. `now` is the time since the sink started.
    pub fn record_accepted(
        &mut self,
        vehicle_id: &str,
        msg: &Message<'_>,
        body_bytes: usize,
        now: Duration,
    ) {
        self.accepted += 1;
        self.bytes += body_bytes as u64;
        self.points += msg.points as u64;
        if msg.metadata.is_none() {
            self.without_metadata += 1;
        }
        if msg
            .meta
            .vehicle_id
            .as_deref()
            .is_some_and(|v| v != vehicle_id)
        {
            self.vehicle_id_mismatches += 1;
        }
        if let (Some(m), Some(s)) = (&msg.meta.fault_type, &msg.sensor_fault_type) {
            if m != s {
                self.fault_mismatches += 1;
            }
        }
        if let Some(ft) = msg.fault_type() {
            self.count_fault(ft);
        }

        // Look up before inserting so a known vehicle costs no allocation.
        let v = match self.vehicles.get_mut(vehicle_id) {
            Some(v) => v,
            None => self.vehicles.entry(vehicle_id.to_owned()).or_default(),
        };
        v.count += 1;
        let highest = v.seqs.max();
        match msg
            .meta
            .seq
            .and_then(|s| v.seqs.insert(s).map(|new| (s, new)))
        {
            Some((seq, true)) => {
                if highest.is_some_and(|h| seq < h) {
                    v.out_of_order += 1;
                    self.out_of_order += 1;
                }
            }
            Some((_, false)) => {
                v.duplicates += 1;
                self.duplicates += 1;
            }
            None => self.untracked_seq += 1,
        }
        if let Some(agent) = msg.meta.agent {
            let instance = msg.meta.instance;
            match &mut v.last {
                Some(last) if last.agent == agent && last.instance.as_deref() == instance => {
                    last.at = now;
                }
                last => {
                    if let Some(prev) = last {
                        if now.saturating_sub(prev.at) < CONFLICT_WINDOW {
                            v.conflicts += 1;
                            self.conflicts += 1;
                        }
                    }
                    *last = Some(Sender {
                        agent: agent.to_owned(),
                        instance: instance.map(str::to_owned),
                        at: now,
                    });
                }
            }
        }
    }

    fn count_fault(&mut self, ft: &str) {
        if let Some(c) = self.faults.get_mut(ft) {
            *c += 1;
        } else if self.faults.len() < MAX_FAULT_KINDS {
            self.faults.insert(ft.to_owned(), 1);
        } else {
            *self.faults.entry(OTHER_FAULT.to_owned()).or_default() += 1;
        }
    }

    /// Records a body answered 422.
    pub fn record_rejected(&mut self) {
        self.rejected += 1;
    }

    /// Records a request answered 503 (`--outage`, `--max-rps`).
    pub fn record_unavailable(&mut self) {
        self.unavailable += 1;
    }

    /// Records a request answered 401.
    pub fn record_unauthorized(&mut self) {
        self.unauthorized += 1;
    }

    /// Records a valid message answered 500 because Redis failed.
    pub fn record_redis_error(&mut self) {
        self.redis_errors += 1;
    }

    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Forgets everything; `now` becomes the start of `since_reset_s`.
    pub fn reset(&mut self, now: Duration) {
        *self = SinkStats {
            reset_at: now,
            ..SinkStats::default()
        };
    }

    /// The `/stats` document at time `now` (time since the sink started).
    pub fn snapshot(&self, now: Duration) -> StatsSnapshot {
        StatsSnapshot {
            accepted: self.accepted,
            rejected: self.rejected,
            unauthorized: self.unauthorized,
            redis_errors: self.redis_errors,
            bytes: self.bytes,
            points: self.points,
            vehicles: self.vehicles.len() as u64,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            unavailable: self.unavailable,
            conflicts: self.conflicts,
            gaps: self.vehicles.values().map(|v| v.seqs.gaps()).sum(),
            faults: self.faults.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            without_metadata: self.without_metadata,
            untracked_seq: self.untracked_seq,
            vehicle_id_mismatches: self.vehicle_id_mismatches,
            fault_mismatches: self.fault_mismatches,
            uptime_s: now.as_secs_f64(),
            since_reset_s: now.saturating_sub(self.reset_at).as_secs_f64(),
        }
    }

    /// The `/stats/vehicles` list, sorted by vehicle ID.
    pub fn vehicles(&self) -> Vec<VehicleSnapshot> {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).ok();
        let mut out: Vec<VehicleSnapshot> = self
            .vehicles
            .iter()
            .map(|(id, v)| VehicleSnapshot {
                vehicle_id: id.clone(),
                count: v.count,
                out_of_order: v.out_of_order,
                duplicates: v.duplicates,
                conflicts: v.conflicts,
                max_seq: v.seqs.max(),
                gaps: v.seqs.gaps(),
                agent: v.last.as_ref().and_then(|l| raw(&l.agent)),
                instance: v
                    .last
                    .as_ref()
                    .and_then(|l| l.instance.as_deref())
                    .and_then(raw),
            })
            .collect();
        out.sort_by(|a, b| a.vehicle_id.cmp(&b.vehicle_id));
        out
    }
}

/// A window of `--outage AT+DURATION` (or just `DURATION`, from the start): a backend that
/// is down for a while and comes back, answering 503 meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outage {
    pub from: Duration,
    pub until: Duration,
}

impl Outage {
    pub fn covers(&self, now: Duration) -> bool {
        now >= self.from && now < self.until
    }
}

impl std::str::FromStr for Outage {
    type Err = String;

    fn from_str(text: &str) -> Result<Outage, String> {
        let (at, length) = match text.split_once('+') {
            Some((at, length)) => (
                crate::duration::parse_duration(at.trim()).map_err(|e| e.to_string())?,
                length,
            ),
            None => (Duration::ZERO, text),
        };
        let length = crate::duration::parse_duration(length.trim()).map_err(|e| e.to_string())?;
        if length.is_zero() {
            return Err(format!("{text:?}: the outage must last longer than 0 s"));
        }
        Ok(Outage {
            from: at,
            until: at + length,
        })
    }
}

/// `--max-rps` as a token bucket: `rate` answers a second, at most a tenth of a second's
/// worth at once. A fixed one-second window would let twice the rate through across a window
/// boundary, which a short ramp step measures as a backend faster than its limit.
#[derive(Debug, Clone)]
pub struct Admission {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl Admission {
    pub fn new(rate: u64) -> Admission {
        let rate = rate as f64;
        // 0 refuses everything: a backend that answers, but never with 200.
        let burst = if rate > 0.0 {
            (rate / 10.0).max(1.0)
        } else {
            0.0
        };
        Admission {
            rate,
            burst,
            tokens: burst,
            last: Duration::ZERO,
        }
    }

    /// True when a request arriving at `now` (time since the sink started) is admitted.
    pub fn admit(&mut self, now: Duration) -> bool {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_parse_and_cover_their_window() {
        let o: Outage = "6s".parse().unwrap();
        assert_eq!((o.from, o.until), (Duration::ZERO, Duration::from_secs(6)));
        let o: Outage = "30s+1m".parse().unwrap();
        assert!(!o.covers(Duration::from_secs(29)));
        assert!(o.covers(Duration::from_secs(30)));
        assert!(o.covers(Duration::from_secs(89)));
        assert!(!o.covers(Duration::from_secs(90)));
        for bad in ["", "0s", "x+5s", "5s+", "+5s"] {
            assert!(bad.parse::<Outage>().is_err(), "{bad:?}");
        }
    }

    const VALID: &str = r#"{"sensor_data": {"data": [{"时间": 1764320000.02, "Ia": 9.81, "Ib": -4.12, "Ic": -5.69, "振动_X": 0.12, "振动_Y": 0.10, "振动_Z": 0.08, "温度": 45.2, "转速": 1450}], "sampling_rate": 50, "batch_size": 10, "fault_type": "normal", "fault_severity": 0.0, "timestamp": "2026-11-28T09:00:00.123456"}, "metadata": {"vehicle_id": "粤B·SEAL·202400000", "model": "SEAL", "agent": "host-a", "instance": 0, "seq": 17, "fault_type": "normal", "fault_severity": 0.0, "sent_at": "2026-11-28T09:00:00.124001Z"}}"#;
    const VID: &str = "粤B·SEAL·202400000";

    fn body(agent: &str, instance: u32, seq: u64, fault: &str) -> String {
        format!(
            r#"{{"sensor_data": {{"data": [{{"Ia": 1.0}}, {{"Ia": 2.0}}], "fault_type": "{fault}"}}, "metadata": {{"vehicle_id": "{VID}", "agent": "{agent}", "instance": {instance}, "seq": {seq}, "fault_type": "{fault}"}}}}"#
        )
    }

    fn record(stats: &mut SinkStats, text: &str, at_ms: u64) {
        let msg = parse_body(text.as_bytes()).unwrap();
        stats.record_accepted(VID, &msg, text.len(), Duration::from_millis(at_ms));
    }

    fn field_errors(text: &str) -> Vec<FieldError> {
        match parse_body(text.as_bytes()) {
            Err(BodyError::Fields(f)) => f,
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn valid_body_is_read_without_copying() {
        let msg = parse_body(VALID.as_bytes()).unwrap();
        assert_eq!(msg.points, 1);
        assert!(msg.sensor_data.get().starts_with(r#"{"data": [{"时间""#));
        assert!(msg
            .sensor_data
            .get()
            .ends_with(r#""2026-11-28T09:00:00.123456"}"#));
        assert!(msg.metadata_text().starts_with(r#"{"vehicle_id""#));
        assert_eq!(msg.meta.vehicle_id.as_deref(), Some(VID));
        assert!(matches!(msg.meta.vehicle_id, Some(Cow::Borrowed(_))));
        assert_eq!(msg.meta.agent, Some("\"host-a\""));
        assert_eq!(msg.meta.instance, Some("0"));
        assert_eq!(msg.meta.seq, Some(17));
        assert_eq!(msg.fault_type(), Some("normal"));
        assert_eq!(msg.sensor_fault_type.as_deref(), Some("normal"));
    }

    #[test]
    fn metadata_is_optional_and_lenient() {
        let msg = parse_body(br#"{"sensor_data": {"data": []}}"#).unwrap();
        assert_eq!(msg.metadata_text(), "{}");
        assert_eq!(msg.meta, Meta::default());
        let msg = parse_body(br#"{"sensor_data": {"data": []}, "metadata": null}"#).unwrap();
        assert_eq!(msg.metadata_text(), "{}");
        // Wrong types inside metadata are kept, just not used for tracking.
        let msg =
            parse_body(br#"{"sensor_data": {"data": []}, "metadata": {"seq": "x", "vehicle_id": 5, "agent": "a\u0062"}}"#)
                .unwrap();
        assert_eq!(msg.meta.seq, None);
        assert_eq!(msg.meta.vehicle_id, None);
        assert_eq!(msg.meta.agent, Some(r#""a\u0062""#));
    }

    #[test]
    fn missing_sensor_data_is_422_missing() {
        let errs = field_errors(r#"{"metadata": {}}"#);
        assert_eq!(
            errs,
            vec![FieldError {
                loc: &["sensor_data"],
                kind: FieldErrorKind::Missing
            }]
        );
        let detail = BodyError::Fields(errs).detail();
        assert_eq!(
            detail["detail"][0]["loc"],
            serde_json::json!(["body", "sensor_data"])
        );
        assert_eq!(detail["detail"][0]["type"], "missing");
        assert_eq!(detail["detail"][0]["msg"], "Field required");
    }

    #[test]
    fn data_must_be_an_array() {
        for bad in [
            r#"{"sensor_data": {"data": {"Ia": 1}}}"#,
            r#"{"sensor_data": {"data": "x"}}"#,
            r#"{"sensor_data": {"data": null}}"#,
        ] {
            assert_eq!(
                field_errors(bad),
                vec![FieldError {
                    loc: &["sensor_data", "data"],
                    kind: FieldErrorKind::List
                }],
                "{bad}"
            );
        }
        assert_eq!(
            field_errors(r#"{"sensor_data": {"points": []}}"#),
            vec![FieldError {
                loc: &["sensor_data", "data"],
                kind: FieldErrorKind::Missing
            }]
        );
    }

    #[test]
    fn sensor_data_and_metadata_must_be_objects() {
        assert_eq!(
            field_errors(r#"{"sensor_data": [1, 2], "metadata": 3}"#),
            vec![
                FieldError {
                    loc: &["sensor_data"],
                    kind: FieldErrorKind::Dict
                },
                FieldError {
                    loc: &["metadata"],
                    kind: FieldErrorKind::Dict
                },
            ]
        );
    }

    #[test]
    fn wrong_top_level_type_is_model_attributes_type() {
        for bad in [r#"[{"sensor_data": {"data": []}}]"#, "42", r#""x""#, "null"] {
            let errs = field_errors(bad);
            assert_eq!(errs.len(), 1, "{bad}");
            assert_eq!(errs[0].kind, FieldErrorKind::ModelAttributes);
            let d = BodyError::Fields(errs).detail();
            assert_eq!(d["detail"][0]["loc"], serde_json::json!(["body"]));
        }
    }

    #[test]
    fn invalid_json_is_json_invalid_with_position() {
        let err = parse_body(b"{\"sensor_data\": {\"data\": [1,]}}").unwrap_err();
        let BodyError::InvalidJson { position, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(*position, 28);
        let d = err.detail();
        assert_eq!(d["detail"][0]["type"], "json_invalid");
        assert_eq!(d["detail"][0]["loc"][0], "body");
        assert!(matches!(
            parse_body(b""),
            Err(BodyError::InvalidJson { .. })
        ));
        assert!(matches!(
            parse_body(b"{\"a\": \xff}"),
            Err(BodyError::InvalidJson { .. })
        ));
        // Positions count characters, as Python does, not bytes.
        let err = parse_body("{\"时\": x}".as_bytes()).unwrap_err();
        assert!(
            matches!(err, BodyError::InvalidJson { position: 6, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn duplicate_keys_are_refused_with_a_reason() {
        let err = parse_body(br#"{"sensor_data": {"data": []}, "sensor_data": {"data": []}}"#)
            .unwrap_err();
        assert!(
            matches!(err, BodyError::Other(ref m) if m.contains("duplicate")),
            "{err:?}"
        );
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type(None));
        assert!(is_json_content_type(Some(b"application/json")));
        assert!(is_json_content_type(Some(
            b"Application/JSON; charset=utf-8"
        )));
        assert!(is_json_content_type(Some(b"application/vnd.api+json")));
        assert!(!is_json_content_type(Some(b"text/plain")));
        assert!(!is_json_content_type(Some(
            b"application/x-www-form-urlencoded"
        )));
        assert!(!is_json_content_type(Some(b"json")));
    }

    #[test]
    fn bearer_checks() {
        assert_eq!(check_bearer(None, None), Err(Refusal::Missing));
        assert_eq!(
            check_bearer(Some(b"Basic abc"), None),
            Err(Refusal::Missing)
        );
        assert_eq!(check_bearer(Some(b"Bearer "), None), Err(Refusal::Missing));
        assert_eq!(check_bearer(Some(b"Bearer anything"), None), Ok(()));
        assert_eq!(check_bearer(Some(b"bearer s3cret"), Some("s3cret")), Ok(()));
        assert_eq!(
            check_bearer(Some(b"Bearer s3cres"), Some("s3cret")),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check_bearer(Some(b"Bearer s3cret2"), Some("s3cret")),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check_bearer(Some(b"Bearer s3cre"), Some("s3cret")),
            Err(Refusal::Invalid)
        );
        assert!(crate::auth::ct_eq(b"", b""));
        assert!(!crate::auth::ct_eq(b"a", b""));
        assert!(!crate::auth::ct_eq(b"", b"a"));
    }

    #[test]
    fn seqset_grows_and_detects_repeats() {
        let mut s = SeqSet::default();
        assert!(s.is_empty());
        assert_eq!(s.insert(0), Some(true));
        assert_eq!(s.insert(0), Some(false));
        assert_eq!(s.insert(1000), Some(true));
        assert!(s.contains(1000) && !s.contains(999) && !s.contains(1_000_000));
        assert_eq!(s.len(), 2);
        assert_eq!(s.max(), Some(1000));
        assert_eq!(s.gaps(), 999);
        assert_eq!(s.insert(MAX_TRACKED_SEQ), None);
        assert_eq!(s.insert(MAX_TRACKED_SEQ - 1), Some(true));
    }

    #[test]
    fn duplicates_are_counted_per_vehicle_and_seq() {
        let mut st = SinkStats::new();
        record(&mut st, &body("a", 0, 0, "normal"), 0);
        record(&mut st, &body("a", 0, 1, "normal"), 1200);
        record(&mut st, &body("a", 0, 1, "normal"), 2400);
        // The same seq for another vehicle is not a duplicate.
        let text = body("a", 0, 1, "normal");
        let msg = parse_body(text.as_bytes()).unwrap();
        st.record_accepted("other", &msg, text.len(), Duration::from_millis(2500));
        let snap = st.snapshot(Duration::from_secs(3));
        assert_eq!(snap.accepted, 4);
        assert_eq!(snap.duplicates, 1);
        assert_eq!(snap.vehicles, 2);
        assert_eq!(snap.conflicts, 0);
        assert_eq!(snap.points, 8);
        assert_eq!(snap.vehicle_id_mismatches, 1);
        assert_eq!(snap.faults.get("normal"), Some(&4));
        let v = st.vehicles();
        assert_eq!(v[1].vehicle_id, VID);
        assert_eq!((v[1].count, v[1].duplicates, v[1].max_seq), (3, 1, Some(1)));
    }

    #[test]
    fn conflicts_within_two_seconds() {
        let mut st = SinkStats::new();
        record(&mut st, &body("a", 0, 0, "normal"), 10_000);
        // Same agent, other instance, 1.9 s later: a conflict.
        record(&mut st, &body("a", 1, 0, "normal"), 11_900);
        // Other agent 1 s later: another conflict.
        record(&mut st, &body("b", 1, 1, "normal"), 12_900);
        // Same sender again: never a conflict.
        record(&mut st, &body("b", 1, 2, "normal"), 13_000);
        let snap = st.snapshot(Duration::from_secs(14));
        assert_eq!(snap.conflicts, 2);
        assert_eq!(snap.duplicates, 1);
    }

    #[test]
    fn no_conflict_outside_two_seconds() {
        let mut st = SinkStats::new();
        record(&mut st, &body("a", 0, 0, "normal"), 10_000);
        // A range moved to another host after lease + grace: a handover, not a conflict.
        record(&mut st, &body("b", 3, 1, "normal"), 12_500);
        record(&mut st, &body("b", 3, 2, "normal"), 13_700);
        assert_eq!(st.snapshot(Duration::from_secs(14)).conflicts, 0);
        let v = st.vehicles();
        assert_eq!(v[0].agent.as_ref().map(|r| r.get()), Some("\"b\""));
        assert_eq!(v[0].instance.as_ref().map(|r| r.get()), Some("3"));
    }

    #[test]
    fn missing_metadata_is_counted_but_untracked() {
        let mut st = SinkStats::new();
        let text = r#"{"sensor_data": {"data": [1], "fault_type": "bearing"}}"#;
        record(&mut st, text, 0);
        record(&mut st, text, 1);
        let snap = st.snapshot(Duration::from_secs(1));
        assert_eq!(snap.accepted, 2);
        assert_eq!(snap.without_metadata, 2);
        assert_eq!(snap.untracked_seq, 2);
        assert_eq!(snap.duplicates, 0);
        assert_eq!(snap.faults.get("bearing"), Some(&2));
        assert_eq!(snap.bytes, 2 * text.len() as u64);
    }

    #[test]
    fn faults_by_metadata_and_mismatches() {
        let mut st = SinkStats::new();
        record(&mut st, &body("a", 0, 0, "normal"), 0);
        record(&mut st, &body("a", 0, 1, "bearing"), 1);
        let text = r#"{"sensor_data": {"data": [], "fault_type": "normal"}, "metadata": {"fault_type": "insulation"}}"#;
        record(&mut st, text, 2);
        let snap = st.snapshot(Duration::from_secs(1));
        let want: BTreeMap<String, u64> = [("normal", 1), ("bearing", 1), ("insulation", 1)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(snap.faults, want);
        assert_eq!(snap.fault_mismatches, 1);
    }

    #[test]
    fn fault_kinds_are_bounded() {
        let mut st = SinkStats::new();
        for i in 0..(MAX_FAULT_KINDS + 10) {
            let text = format!(
                r#"{{"sensor_data": {{"data": []}}, "metadata": {{"fault_type": "f{i}"}}}}"#
            );
            record(&mut st, &text, 0);
        }
        let snap = st.snapshot(Duration::ZERO);
        assert_eq!(snap.faults.len(), MAX_FAULT_KINDS + 1);
        assert_eq!(snap.faults.get(OTHER_FAULT), Some(&10));
    }

    #[test]
    fn counters_reset_and_snapshot_serializes() {
        let mut st = SinkStats::new();
        record(&mut st, VALID, 0);
        st.record_rejected();
        st.record_unauthorized();
        st.record_redis_error();
        let snap = st.snapshot(Duration::from_secs(5));
        assert_eq!(
            (
                snap.accepted,
                snap.rejected,
                snap.unauthorized,
                snap.redis_errors
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(snap.gaps, 17);
        let json = serde_json::to_value(&snap).unwrap();
        for key in [
            "accepted",
            "rejected",
            "bytes",
            "vehicles",
            "duplicates",
            "conflicts",
            "faults",
            "redis_errors",
            "uptime_s",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        st.reset(Duration::from_secs(5));
        let snap = st.snapshot(Duration::from_secs(7));
        assert_eq!((snap.accepted, snap.rejected, snap.vehicles), (0, 0, 0));
        assert_eq!(snap.uptime_s, 7.0);
        assert_eq!(snap.since_reset_s, 2.0);
        assert!(st.vehicles().is_empty());
    }

    #[test]
    fn admission_holds_the_rate_over_any_second() {
        let mut a = Admission::new(150);
        // 1,000 requests a second for 5 s, one every millisecond.
        let admitted: Vec<u64> = (0..5000u64)
            .filter(|ms| a.admit(Duration::from_millis(*ms)))
            .collect();
        // Every one-second window, wherever it starts, holds the rate plus at most the burst.
        for start in (0..4000).step_by(37) {
            let n = admitted
                .iter()
                .filter(|t| (start..start + 1000).contains(*t))
                .count();
            assert!((149..=166).contains(&n), "{n} in [{start}, +1000) ms");
        }
    }

    #[test]
    fn admission_lets_a_slow_client_through_every_time() {
        let mut a = Admission::new(10);
        assert!((0..50).all(|i| a.admit(Duration::from_millis(200 * i))));
        let mut none = Admission::new(0);
        assert!((0..100).all(|i| !none.admit(Duration::from_millis(100 * i))));
        // Times that go back refill nothing: the bucket (one token) is spent after one.
        assert!(a.admit(Duration::from_millis(20_000)));
        assert!(!a.admit(Duration::from_millis(1)));
    }
}
