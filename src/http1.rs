//! Just enough HTTP/1.1 for a load generator that talks to one kind of endpoint: requests are
//! built in one buffer (head written in front of the body, no copy), and responses are framed
//! by Content-Length, chunked encoding or connection close. The simulator's lanes drive it over
//! plain sockets, which cuts the per-message cost well below a general client's (no dispatch
//! task, channel hops or pool bookkeeping per request).

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HttpError {
    #[error("malformed response: {0}")]
    Malformed(String),
    #[error("response head larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("bad chunked encoding")]
    Chunked,
}

/// Room kept in front of a request body for its head. Paths longer than this leave less than
/// nothing; `RequestBuf::new` grows the reservation for them.
const HEAD_ROOM: usize = 512;
const MAX_HEAD: usize = 64 * 1024;

/// A request under construction: the body is appended first, then the head is written into the
/// room reserved before it, once the Content-Length is known.
#[derive(Debug)]
pub struct RequestBuf {
    buf: Vec<u8>,
    room: usize,
}

impl RequestBuf {
    /// `body_hint` is the expected body size (to allocate once); `path_len` the request target.
    pub fn new(body_hint: usize, path_len: usize, host_len: usize) -> Self {
        let room = HEAD_ROOM.max(path_len + host_len + 128);
        let mut buf = Vec::with_capacity(room + body_hint);
        buf.resize(room, 0);
        RequestBuf { buf, room }
    }

    /// The body is appended here.
    pub fn body(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Bytes of body written so far.
    pub fn body_len(&self) -> usize {
        self.buf.len() - self.room
    }

    /// Writes `POST path HTTP/1.1` with Host, Content-Type and Content-Length in front of the
    /// body and returns the whole request: `(bytes, start)`, send `bytes[start..]`.
    pub fn finish(mut self, path: &str, host: &str) -> (Vec<u8>, usize) {
        let body_len = self.body_len();
        let len_text = body_len.to_string();
        let parts: [&[u8]; 7] = [
            b"POST ",
            path.as_bytes(),
            b" HTTP/1.1\r\nHost: ",
            host.as_bytes(),
            b"\r\nContent-Type: application/json\r\nContent-Length: ",
            len_text.as_bytes(),
            b"\r\n\r\n",
        ];
        let head_len: usize = parts.iter().map(|p| p.len()).sum();
        let start = self.room - head_len;
        let mut at = start;
        for p in parts {
            self.buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        (self.buf, start)
    }
}

/// How the response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(usize),
    Chunked,
    /// HTTP/1.0 style: the body runs until the server closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub framing: Framing,
    /// Whether the connection may carry another request afterwards.
    pub keep_alive: bool,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
}

/// Parses a response head from the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HttpError::HeadTooLarge(MAX_HEAD));
            }
            return Ok(None);
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let status = resp
        .code
        .ok_or_else(|| HttpError::Malformed("no status".into()))?;
    let http10 = resp.version == Some(0);
    let mut keep_alive = !http10;
    let mut length = None;
    let mut chunked = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
            length = Some(v.ok_or_else(|| HttpError::Malformed("bad content-length".into()))?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let t = token.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    // No body by definition: 1xx, 204 and 304 (a POST never gets a HEAD response).
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::UntilClose
    };
    Ok(Some(ResponseHead {
        status,
        framing,
        keep_alive,
        head_len,
    }))
}

/// Finds the end of a chunked body in `buf`; `Ok(Some(n))` is the body's length in bytes
/// (including the final chunk and trailers), `Ok(None)` when more bytes are needed.
pub fn chunked_end(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    let mut at = 0;
    loop {
        let Some(line_end) = find_crlf(&buf[at..]) else {
            return Ok(None);
        };
        let line = &buf[at..at + line_end];
        let size_text = line
            .split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let size_text = std::str::from_utf8(size_text).map_err(|_| HttpError::Chunked)?;
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Chunked)?;
        at += line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = find_crlf(&buf[at..]) else {
                    return Ok(None);
                };
                at += end + 2;
                if end == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(HttpError::Chunked);
        }
        at += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_head_is_written_in_front_of_the_body() {
        let mut r = RequestBuf::new(16, 10, 14);
        r.body().extend_from_slice(b"{\"a\":1}");
        let (bytes, start) = r.finish("/x?y=%E7", "127.0.0.1:8000");
        assert_eq!(
            std::str::from_utf8(&bytes[start..]).unwrap(),
            "POST /x?y=%E7 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        // A path longer than the default room still fits.
        let long = "/".repeat(2000);
        let mut r = RequestBuf::new(0, long.len(), 4);
        r.body().extend_from_slice(b"{}");
        let (bytes, start) = r.finish(&long, "h:80");
        assert!(bytes[start..].starts_with(b"POST //"));
        assert!(bytes.ends_with(b"\r\n\r\n{}"));
    }

    #[test]
    fn response_framing() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive, h.head_len),
            (200, Framing::Length(5), true, 38)
        );
        let h = parse_head(
            b"HTTP/1.1 422 X\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive),
            (422, Framing::Chunked, false)
        );
        let h = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h =
            parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.keep_alive);
        let h = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies() {
        assert_eq!(chunked_end(b"5\r\nhello\r\n0\r\n\r\n").unwrap(), Some(15));
        assert_eq!(
            chunked_end(b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nNEXT").unwrap(),
            Some(29)
        );
        assert_eq!(chunked_end(b"5\r\nhel").unwrap(), None);
        assert_eq!(chunked_end(b"5\r\nhello\r\n0\r\n").unwrap(), None);
        assert_eq!(chunked_end(b"zz\r\n").unwrap_err(), HttpError::Chunked);
        assert_eq!(
            chunked_end(b"2\r\nhello\r\n").unwrap_err(),
            HttpError::Chunked
        );
    }
}
