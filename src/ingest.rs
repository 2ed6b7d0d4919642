//! The VTOX ingest contract (DESIGN.md, "The ingest contract"): where a message goes and the
//! exact shape of its body. The simulator writes bodies with `BodyTemplate`; the sink reads them.

use crate::telemetry::Sample;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The unauthenticated simulator route; `{id}` and `location` are percent-encoded UTF-8.
pub const SIMULATOR_ROUTE: &str = "/api/v1/diagnosis-stream/simulator/vehicles";
/// The authenticated twin (Bearer token).
pub const VEHICLE_ROUTE: &str = "/api/v1/diagnosis-stream/vehicles";
/// The Redis stream behind the API and the entry's `data_type`.
pub const RAW_STREAM: &str = "motor_raw_data";
pub const DATA_TYPE: &str = "motor_sensor_data";

/// RFC 3986 unreserved characters stay; everything else, including `·` and CJK, is encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A backend's base URL, split into what connections and requests need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// As given, without a trailing slash (for messages).
    pub base: String,
    /// Host for the socket (IPv6 literals without brackets).
    pub host: String,
    pub port: u16,
    /// `host:port` as written, for the Host header.
    pub authority: String,
    /// Path before the ingest route, e.g. `/vtox` behind a reverse proxy; empty for none.
    pub path_prefix: String,
    /// `https://`: connections speak TLS, with the host as the server name.
    pub tls: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("{0:?} is not a URL")]
    NotAUrl(String),
    #[error("{0:?} must start with http:// or https://")]
    Scheme(String),
    #[error("{0:?} has no host")]
    NoHost(String),
    #[error("{0:?} must not have a query")]
    Query(String),
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, TargetError> {
        let uri: http::Uri = text
            .parse()
            .map_err(|_| TargetError::NotAUrl(text.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(TargetError::Scheme(text.to_string())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| TargetError::NoHost(text.to_string()))?;
        if authority.host().is_empty() {
            return Err(TargetError::NoHost(text.to_string()));
        }
        if uri.query().is_some() {
            return Err(TargetError::Query(text.to_string()));
        }
        Ok(Target {
            base: text.trim_end_matches('/').to_string(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_string(),
            path_prefix: uri.path().trim_end_matches('/').to_string(),
            tls,
        })
    }
}

/// Path and query of a vehicle's ingest request on the simulator route.
pub fn simulator_path(vehicle_id: &str, city: &str) -> String {
    format!(
        "{SIMULATOR_ROUTE}/{}/data?location={}",
        utf8_percent_encode(vehicle_id, COMPONENT),
        utf8_percent_encode(city, COMPONENT)
    )
}

/// Path of a vehicle's ingest request on the authenticated route (Bearer token).
pub fn vehicle_path(vehicle_id: &str) -> String {
    format!(
        "{VEHICLE_ROUTE}/{}/data",
        utf8_percent_encode(vehicle_id, COMPONENT)
    )
}

/// The parts of one vehicle's messages that never change (its ID, model, agent and instance),
/// JSON-escaped once when the vehicle is set up.
///
/// Bodies are written by hand rather than through serde: this runs for every message, and
/// fixed-point numbers behind fixed keys cost a fraction of generic float formatting and key
/// escaping. The tests check the output against the contract field by field.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    /// `"vehicle_id":…,"model":…,"agent":…,"instance":N,"seq":`
    meta_head: Box<[u8]>,
}

/// What varies from message to message.
#[derive(Debug, Clone, Copy)]
pub struct MessageFields<'a> {
    pub seq: u64,
    pub fault_type: &'a str,
    pub fault_severity: f64,
    /// Send time of this request, `2026-11-28T09:00:00.124001Z`.
    pub sent_at: &'a str,
    /// When the message was made, in the same form: the batch's naive `timestamp` is this
    /// instant without the `Z`, as the backend's Python producer writes it. The same as
    /// `sent_at` for a message sent as it is made; earlier for one a vehicle kept in its
    /// buffer, so that the backend sees how old each message is when it arrives.
    pub made_at: &'a str,
    pub sampling_rate: u32,
}

impl BodyTemplate {
    pub fn new(vehicle_id: &str, model: &str, agent: &str, instance: u32) -> Self {
        let mut h = Vec::with_capacity(96);
        h.extend_from_slice(br#""vehicle_id":"#);
        write_str(&mut h, vehicle_id);
        h.extend_from_slice(br#","model":"#);
        write_str(&mut h, model);
        h.extend_from_slice(br#","agent":"#);
        write_str(&mut h, agent);
        h.extend_from_slice(br#","instance":"#);
        let mut n = Num::new();
        n.int(i64::from(instance));
        h.extend_from_slice(n.as_bytes());
        h.extend_from_slice(br#","seq":"#);
        BodyTemplate {
            meta_head: h.into_boxed_slice(),
        }
    }

    /// Appends one message body to `buf`.
    pub fn write(&self, buf: &mut Vec<u8>, samples: &[Sample], m: &MessageFields<'_>) {
        let naive = m.made_at.strip_suffix('Z').unwrap_or(m.made_at);
        buf.extend_from_slice(br#"{"sensor_data":{"data":["#);
        for (i, s) in samples.iter().enumerate() {
            // One sample is formatted on the stack and copied once.
            let mut n = Num::new();
            if i > 0 {
                n.raw(b",");
            }
            n.raw("{\"时间\":".as_bytes());
            n.fixed(s.t, 4);
            n.raw(b",\"Ia\":");
            n.fixed(s.ia, 3);
            n.raw(b",\"Ib\":");
            n.fixed(s.ib, 3);
            n.raw(b",\"Ic\":");
            n.fixed(s.ic, 3);
            n.raw(",\"振动_X\":".as_bytes());
            n.fixed(s.vx, 4);
            n.raw(",\"振动_Y\":".as_bytes());
            n.fixed(s.vy, 4);
            n.raw(",\"振动_Z\":".as_bytes());
            n.fixed(s.vz, 4);
            n.raw(",\"温度\":".as_bytes());
            n.fixed(s.temp, 2);
            n.raw(",\"转速\":".as_bytes());
            n.int(s.rpm as i64);
            n.raw(b"}");
            buf.extend_from_slice(n.as_bytes());
        }
        let mut n = Num::new();
        n.raw(br#"],"sampling_rate":"#);
        n.int(i64::from(m.sampling_rate));
        n.raw(br#","batch_size":"#);
        n.int(samples.len() as i64);
        n.raw(br#","fault_type":"#);
        buf.extend_from_slice(n.as_bytes());
        write_str(buf, m.fault_type);
        let mut n = Num::new();
        n.raw(br#","fault_severity":"#);
        n.fixed(m.fault_severity, 4);
        n.raw(br#","timestamp":"#);
        buf.extend_from_slice(n.as_bytes());
        write_str(buf, naive);
        buf.extend_from_slice(br#"},"metadata":{"#);
        buf.extend_from_slice(&self.meta_head);
        let mut n = Num::new();
        n.int(m.seq as i64);
        n.raw(br#","fault_type":"#);
        buf.extend_from_slice(n.as_bytes());
        write_str(buf, m.fault_type);
        let mut n = Num::new();
        n.raw(br#","fault_severity":"#);
        n.fixed(m.fault_severity, 4);
        n.raw(br#","sent_at":"#);
        buf.extend_from_slice(n.as_bytes());
        write_str(buf, m.sent_at);
        buf.extend_from_slice(b"}}");
    }
}

/// A JSON string with proper escaping (agent names come from users).
fn write_str(buf: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

/// A small stack buffer for one sample's worth of JSON; sized for the longest sample.
struct Num {
    buf: [u8; 384],
    len: usize,
}

const DIGIT_PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

impl Num {
    fn new() -> Self {
        Num {
            buf: [0; 384],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    // Inlined so that copies of constant keys compile to plain moves instead of memcpy calls,
    // which dominated the body writer's profile.
    #[inline(always)]
    fn raw(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// Writes the decimal digits of `v`, at least `min_width` of them (zero-padded), in place
    /// from the last digit backwards.
    fn digits(&mut self, mut v: u64, min_width: usize) {
        let count = (v.checked_ilog10().unwrap_or(0) as usize + 1).max(min_width);
        let start = self.len;
        let mut i = start + count;
        self.len = i;
        while v >= 100 {
            let d = (v % 100) as usize * 2;
            v /= 100;
            i -= 2;
            self.buf[i] = DIGIT_PAIRS[d];
            self.buf[i + 1] = DIGIT_PAIRS[d + 1];
        }
        if v >= 10 {
            let d = v as usize * 2;
            i -= 2;
            self.buf[i] = DIGIT_PAIRS[d];
            self.buf[i + 1] = DIGIT_PAIRS[d + 1];
        } else {
            i -= 1;
            self.buf[i] = b'0' + v as u8;
        }
        while i > start {
            i -= 1;
            self.buf[i] = b'0';
        }
    }

    fn int(&mut self, v: i64) {
        if v < 0 {
            self.raw(b"-");
        }
        self.digits(v.unsigned_abs(), 1);
    }

    /// `x` rounded to `decimals` places, trailing zeros trimmed but one decimal kept so that
    /// the backend's Python side always reads a float. Non-finite or absurdly large values
    /// become `null`: JSON has no NaN, and no sensor reads 10^15.
    fn fixed(&mut self, x: f64, decimals: u32) {
        let scale = 10u64.pow(decimals);
        let scaled = x.abs() * scale as f64 + 0.5;
        if !scaled.is_finite() || scaled >= 1e18 {
            self.raw(b"null");
            return;
        }
        let scaled = scaled as u64;
        if x < 0.0 && scaled != 0 {
            self.raw(b"-");
        }
        self.digits(scaled / scale, 1);
        self.raw(b".");
        let mut frac = scaled % scale;
        let mut width = decimals as usize;
        while width > 1 && frac.is_multiple_of(10) {
            frac /= 10;
            width -= 1;
        }
        self.digits(frac, width);
    }
}

/// Formats a number as the body writer does (for tests and tools).
pub fn format_fixed(x: f64, decimals: u32) -> String {
    let mut n = Num::new();
    n.fixed(x, decimals);
    String::from_utf8_lossy(n.as_bytes()).into_owned()
}

/// `2026-11-28T09:00:00.123456Z` (UTC, microseconds).
pub fn iso_utc(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// `iso_utc` for a sender that stamps every message: the date and time to the second are
/// formatted once a second and the microseconds appended, into a buffer that is reused.
#[derive(Debug, Default)]
pub struct IsoStamp {
    second: Option<u64>,
    /// `2026-11-28T09:00:00.` for `second`.
    prefix: String,
    text: String,
}

impl IsoStamp {
    /// `t` as `iso_utc` writes it.
    pub fn at(&mut self, t: SystemTime) -> &str {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let second = d.as_secs();
        if self.second != Some(second) {
            let whole = UNIX_EPOCH + Duration::from_secs(second);
            let text = humantime::format_rfc3339_seconds(whole).to_string();
            self.prefix.clear();
            self.prefix.push_str(text.trim_end_matches('Z'));
            self.prefix.push('.');
            self.second = Some(second);
        }
        self.text.clear();
        self.text.push_str(&self.prefix);
        let micros = d.subsec_micros();
        let mut digits = [b'0'; 6];
        let mut v = micros;
        for slot in digits.iter_mut().rev() {
            *slot = b'0' + (v % 10) as u8;
            v /= 10;
        }
        // ASCII digits are valid UTF-8.
        self.text
            .push_str(std::str::from_utf8(&digits).unwrap_or("000000"));
        self.text.push('Z');
        &self.text
    }
}

/// The same instant without the zone suffix, as Python's `datetime.isoformat()` prints a naive
/// UTC time.
pub fn iso_naive(t: SystemTime) -> String {
    let mut s = iso_utc(t);
    s.pop();
    s
}

/// Unix seconds as f64.
pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// Unix milliseconds of `t` (0 before 1970): epochs, incarnations and run ids count in these.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Sample;

    #[test]
    fn targets() {
        let t = Target::parse("http://[::1]:8000/vtox/").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path_prefix.as_str()
            ),
            ("::1", 8000, "[::1]:8000", "/vtox")
        );
        assert_eq!(Target::parse("http://vtox").unwrap().port, 80);
        assert!(matches!(
            Target::parse("not a url"),
            Err(TargetError::NotAUrl(_))
        ));
        let t = Target::parse("https://vtox.example.com/api").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.tls, t.path_prefix.as_str()),
            ("vtox.example.com", 443, true, "/api")
        );
        assert!(!Target::parse("http://vtox").unwrap().tls);
        assert!(matches!(
            Target::parse("ftp://x"),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::parse("http://x/?a=1"),
            Err(TargetError::Query(_))
        ));
    }

    #[test]
    fn authenticated_path() {
        assert_eq!(
            vehicle_path("粤B·SEAL·202400000"),
            "/api/v1/diagnosis-stream/vehicles/%E7%B2%A4B%C2%B7SEAL%C2%B7202400000/data"
        );
    }

    #[test]
    fn path_is_percent_encoded() {
        let p = simulator_path("粤B·SEAL·202400000", "深圳福田区");
        assert_eq!(
            p,
            "/api/v1/diagnosis-stream/simulator/vehicles/%E7%B2%A4B%C2%B7SEAL%C2%B7202400000/data?location=%E6%B7%B1%E5%9C%B3%E7%A6%8F%E7%94%B0%E5%8C%BA"
        );
    }

    #[test]
    fn body_has_the_contract_shape() {
        let s = Sample {
            t: 1764320000.02,
            ia: 9.81,
            ib: -4.12,
            ic: -5.69,
            vx: 0.12,
            vy: 0.1,
            vz: 0.08,
            temp: 45.2,
            rpm: 1450.0,
        };
        let template = BodyTemplate::new("粤B·SEAL·202400000", "SEAL", "host-a", 0);
        let fields = MessageFields {
            seq: 17,
            fault_type: "normal",
            fault_severity: 0.0,
            sent_at: "2026-11-28T09:00:00.123456Z",
            made_at: "2026-11-28T09:00:00.123456Z",
            sampling_rate: 50,
        };
        let mut buf = Vec::new();
        template.write(&mut buf, &[s; 10], &fields);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.keys().collect::<Vec<_>>(), ["metadata", "sensor_data"]);
        let sd = &v["sensor_data"];
        assert_eq!(sd["data"].as_array().unwrap().len(), 10);
        assert_eq!(sd["batch_size"], 10);
        assert_eq!(sd["sampling_rate"], 50);
        assert_eq!(sd["fault_type"], "normal");
        assert_eq!(sd["timestamp"], "2026-11-28T09:00:00.123456");
        let point = sd["data"][0].as_object().unwrap();
        let mut keys: Vec<_> = point.keys().cloned().collect();
        keys.sort();
        let mut want = [
            "时间", "Ia", "Ib", "Ic", "振动_X", "振动_Y", "振动_Z", "温度", "转速",
        ]
        .map(String::from)
        .to_vec();
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(point["转速"], 1450);
        let md = &v["metadata"];
        for k in [
            "vehicle_id",
            "model",
            "agent",
            "instance",
            "seq",
            "fault_type",
            "fault_severity",
            "sent_at",
        ] {
            assert!(md.get(k).is_some(), "metadata.{k}");
        }
        assert_eq!(md["seq"], 17);
        assert_eq!(md["vehicle_id"], "粤B·SEAL·202400000");
        assert_eq!(point["Ia"], 9.81);
        assert_eq!(point["时间"], 1764320000.02);
    }

    #[test]
    fn fixed_point_numbers() {
        let f = format_fixed;
        assert_eq!(f(9.8123, 3), "9.812");
        assert_eq!(f(-4.1, 3), "-4.1");
        assert_eq!(f(45.0, 2), "45.0");
        assert_eq!(f(-0.0001, 3), "0.0");
        assert_eq!(f(0.0005, 3), "0.001");
        assert_eq!(f(1764320000.02, 4), "1764320000.02");
        assert_eq!(f(f64::NAN, 3), "null");
        assert_eq!(f(1e300, 2), "null");
        assert_eq!(f(1234567.0001, 4), "1234567.0001");
        assert_eq!(f(0.05, 2), "0.05");
        for x in [-123.456, 0.1, 7.0, 99999.9999, 0.0102, 10.01] {
            assert_eq!(f(x, 4).parse::<f64>().unwrap(), x);
        }
    }

    #[test]
    fn strings_are_escaped() {
        let s = Sample {
            t: 0.0,
            ia: 0.0,
            ib: 0.0,
            ic: 0.0,
            vx: 0.0,
            vy: 0.0,
            vz: 0.0,
            temp: 0.0,
            rpm: 0.0,
        };
        let template = BodyTemplate::new("a\"b", "M", "host\\x\n", 1);
        let fields = MessageFields {
            seq: 0,
            fault_type: "normal",
            fault_severity: 0.0,
            sent_at: "t",
            made_at: "t",
            sampling_rate: 50,
        };
        let mut buf = Vec::new();
        template.write(&mut buf, &[s], &fields);
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["metadata"]["vehicle_id"], "a\"b");
        assert_eq!(v["metadata"]["agent"], "host\\x\n");
    }

    #[test]
    fn timestamps() {
        let t = UNIX_EPOCH + Duration::from_micros(1_764_320_000_123_456);
        assert_eq!(iso_utc(t), "2025-11-28T08:53:20.123456Z");
        // The fast stamp writes exactly the same, across seconds and back.
        let mut stamp = IsoStamp::default();
        for us in [
            0u64,
            1,
            999_999,
            1_000_000,
            59_999_999,
            86_400_000_123,
            3,
            1_764_320_000_000_001,
        ] {
            let t = UNIX_EPOCH + Duration::from_micros(us);
            assert_eq!(stamp.at(t), iso_utc(t), "{us}");
        }
        assert_eq!(iso_naive(t), "2025-11-28T08:53:20.123456");
        assert_eq!(unix_secs(t), 1_764_320_000.123_456);
    }
}
