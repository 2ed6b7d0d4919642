//! Human durations on the command line: `1.2s`, `500ms`, `2m`, `1h30m`, or a bare number of
//! seconds. Fractions matter here (the reference interval is 1.2 s), which is why this is not
//! humantime's parser.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected a number with a unit, e.g. 1.2s, 500ms, 2m")]
    Invalid(String),
    #[error("duration {0:?} is out of range")]
    Range(String),
}

/// Parses a duration. Accepted units: ns, us, ms, s, m, h, d; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let invalid = || DurationError::Invalid(text.to_string());
    if let Ok(secs) = s.parse::<f64>() {
        return from_secs(secs, text);
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if num_len == 0 {
            return Err(invalid());
        }
        let value: f64 = rest[..num_len].parse().map_err(|_| invalid())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(invalid()),
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    from_secs(total, text)
}

fn from_secs(secs: f64, text: &str) -> Result<Duration, DurationError> {
    Duration::try_from_secs_f64(secs).map_err(|_| DurationError::Range(text.to_string()))
}

/// Formats a duration compactly for messages and tables (`1.2s`, `250ms`, `2m30s`).
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{}ms", (s * 1e3 * 100.0).round() / 100.0)
    } else if s < 60.0 {
        format!("{}s", (s * 1000.0).round() / 1000.0)
    } else {
        let whole = d.as_secs();
        let (h, m, sec) = (whole / 3600, whole % 3600 / 60, whole % 60);
        match (h, sec) {
            (0, 0) => format!("{m}m"),
            (0, _) => format!("{m}m{sec}s"),
            _ => format!("{h}h{m}m{sec}s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_users_type() {
        assert_eq!(parse_duration("1.2s"), Ok(Duration::from_millis(1200)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration(" 0.5 "), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn rejects_garbage_and_negatives() {
        for bad in ["", "abc", "5x", "-1s", "s", "1..2s", "-3"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_millis(1200)), "1.2s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(150)), "2m30s");
    }
}
