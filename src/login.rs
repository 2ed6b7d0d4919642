//! Credentials for the backend's authenticated route: token files, the per-vehicle token
//! table, and the login exchange (`POST {base}/auth/token`) as pure request and response
//! functions. No error message here ever contains a secret.

use crate::http1::{parse_head, BodyReader, Framing};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LoginError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{0} is empty")]
    Empty(String),
    #[error("{path} line {line}: {what}")]
    Line {
        path: String,
        line: usize,
        what: &'static str,
    },
    #[error("the login answered {0}")]
    Status(u16),
    #[error("the login answer is not usable: {0}")]
    Answer(&'static str),
}

/// A token or password fit for a header: visible ASCII only (no spaces, no line breaks that
/// could split the request).
fn header_safe(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..0x7f).contains(&b))
}

/// Reads a file holding one secret (a token or a password), trimmed of surrounding space.
pub fn read_secret(path: &Path) -> Result<String, LoginError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| LoginError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(LoginError::Empty(shown));
    }
    Ok(secret.to_string())
}

/// Reads a token for the Authorization header from a file.
pub fn read_token(path: &Path) -> Result<String, LoginError> {
    let token = read_secret(path)?;
    if !header_safe(&token) {
        return Err(LoginError::Line {
            path: path.display().to_string(),
            line: 1,
            what: "the token has characters a header cannot carry",
        });
    }
    Ok(token)
}

/// Parses a per-vehicle token table: `vehicle_id<TAB>token` per line; blank lines and lines
/// starting with `#` are skipped.
pub fn parse_vehicle_tokens(path: &str, text: &str) -> Result<HashMap<String, String>, LoginError> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what| LoginError::Line {
            path: path.to_string(),
            line: i + 1,
            what,
        };
        let (id, token) = line
            .split_once('\t')
            .ok_or_else(|| bad("expected vehicle_id<TAB>token"))?;
        let token = token.trim();
        if id.is_empty() {
            return Err(bad("no vehicle ID"));
        }
        if !header_safe(token) {
            return Err(bad(
                "the token is empty or has characters a header cannot carry",
            ));
        }
        if out.insert(id.to_string(), token.to_string()).is_some() {
            return Err(bad("a vehicle listed twice"));
        }
    }
    Ok(out)
}

/// The login request: `POST {prefix}/auth/token` with `{"username","password"}`, closing the
/// connection after the answer.
pub fn login_request(path_prefix: &str, authority: &str, user: &str, password: &str) -> Vec<u8> {
    let body = serde_json::json!({ "username": user, "password": password }).to_string();
    let mut req = format!(
        "POST {path_prefix}/auth/token HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body.as_bytes());
    req
}

/// Takes the access token out of a whole login answer (`{"access_token","token_type"}`).
pub fn parse_login_answer(bytes: &[u8]) -> Result<String, LoginError> {
    let head = parse_head(bytes)
        .map_err(|_| LoginError::Answer("malformed HTTP"))?
        .ok_or(LoginError::Answer("incomplete HTTP head"))?;
    if head.status != 200 {
        return Err(LoginError::Status(head.status));
    }
    let rest = &bytes[head.head_len..];
    let body = match head.framing {
        Framing::Length(n) if rest.len() >= n => rest[..n].to_vec(),
        Framing::Length(_) => return Err(LoginError::Answer("body shorter than its length")),
        Framing::UntilClose => rest.to_vec(),
        Framing::Chunked => dechunk(rest)?,
    };
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        #[serde(default)]
        token_type: Option<String>,
    }
    let a: Answer = serde_json::from_slice(&body)
        .map_err(|_| LoginError::Answer("no access_token in the JSON"))?;
    if a.token_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
    {
        return Err(LoginError::Answer("token_type is not bearer"));
    }
    if !header_safe(&a.access_token) {
        return Err(LoginError::Answer(
            "the access token is empty or not fit for a header",
        ));
    }
    Ok(a.access_token)
}

/// The data of a whole chunked body (small: a login answer).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, LoginError> {
    let bad = LoginError::Answer("bad chunked encoding");
    let mut reader = BodyReader::new(Framing::Chunked);
    let total = reader.feed(rest).map_err(|_| bad.clone())?;
    if !reader.is_done() {
        return Err(bad);
    }
    rest = &rest[..total];
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad.clone())?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| bad.clone())?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad.clone())?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if rest.len() < size + 2 {
            return Err(bad);
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vehicle_token_tables() {
        let t = parse_vehicle_tokens("f", "# comment\nA·1\ttok-a\n\nB·2\ttok-b\r\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t["B·2"], "tok-b");
        let e = parse_vehicle_tokens("f", "A\ttok\nB tok-secret\n").unwrap_err();
        assert_eq!(e.to_string(), "f line 2: expected vehicle_id<TAB>token");
        assert!(!e.to_string().contains("secret"));
        assert!(parse_vehicle_tokens("f", "A\t\n").is_err());
        assert!(parse_vehicle_tokens("f", "A\tx y\n").is_err());
        assert!(parse_vehicle_tokens("f", "A\tx\nA\ty\n").is_err());
    }

    #[test]
    fn login_requests_and_answers() {
        let req = login_request("/vtox", "h:8000", "fleet", "p\"w");
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("POST /vtox/auth/token HTTP/1.1\r\nHost: h:8000\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"password\":\"p\\\"w\",\"username\":\"fleet\"}"));
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 48\r\n\r\n{\"access_token\":\"abc.def\",\"token_type\":\"bearer\"}";
        assert_eq!(parse_login_answer(ok).unwrap(), "abc.def");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"acc\r\n14\r\ness_token\":\"xyz\"}   \r\n0\r\n\r\n";
        assert_eq!(parse_login_answer(chunked).unwrap(), "xyz");
        let closed = b"HTTP/1.0 200 OK\r\n\r\n{\"access_token\":\"t1\",\"token_type\":\"Bearer\"}";
        assert_eq!(parse_login_answer(closed).unwrap(), "t1");
        assert_eq!(
            parse_login_answer(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"),
            Err(LoginError::Status(401))
        );
        assert!(parse_login_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").is_err());
        assert!(parse_login_answer(
            b"HTTP/1.1 200 OK\r\n\r\n{\"access_token\":\"t\",\"token_type\":\"mac\"}"
        )
        .is_err());
        assert!(parse_login_answer(b"HTTP/1.1 200 OK\r\n\r\n{\"access_token\":\"a b\"}").is_err());
        assert!(parse_login_answer(b"garbage").is_err());
    }

    #[test]
    fn secret_files() {
        let dir = std::env::temp_dir().join(format!("vtox-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "  s3cret\n").unwrap();
        assert_eq!(read_token(&f).unwrap(), "s3cret");
        std::fs::write(&f, "\n").unwrap();
        assert!(matches!(read_token(&f), Err(LoginError::Empty(_))));
        std::fs::write(&f, "two words").unwrap();
        let e = read_token(&f).unwrap_err();
        assert!(!e.to_string().contains("words"));
        assert!(matches!(
            read_secret(&dir.join("missing")),
            Err(LoginError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
