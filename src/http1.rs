//! Just enough HTTP/1.1 for a load generator that talks to one kind of endpoint: requests are
//! built in one buffer (head written in front of the body, no copy), and responses are framed
//! by Content-Length, chunked encoding or connection close. The simulator's lanes drive it over
//! plain sockets, which cuts the per-message cost well below a general client's (no dispatch
//! task, channel hops or pool bookkeeping per request).

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
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
    pub fn finish(self, path: &str, host: &str) -> (Vec<u8>, usize) {
        self.finish_with_bearer(path, host, None)
    }

    /// As `finish`, with `Authorization: Bearer {token}` when a token is given. Size the
    /// buffer for it with `RequestBuf::new(.., host_len + token.len() + 24)`.
    pub fn finish_with_bearer(
        mut self,
        path: &str,
        host: &str,
        bearer: Option<&str>,
    ) -> (Vec<u8>, usize) {
        let body_len = self.body_len();
        let len_text = body_len.to_string();
        let (auth_name, auth_value, auth_end): (&[u8], &[u8], &[u8]) = match bearer {
            Some(t) => (b"Authorization: Bearer ", t.as_bytes(), b"\r\n"),
            None => (b"", b"", b""),
        };
        let parts: [&[u8]; 10] = [
            b"POST ",
            path.as_bytes(),
            b" HTTP/1.1\r\nHost: ",
            host.as_bytes(),
            b"\r\nContent-Type: application/json\r\n",
            auth_name,
            auth_value,
            auth_end,
            b"Content-Length: ",
            len_text.as_bytes(),
        ];
        let parts_len: usize = parts.iter().map(|p| p.len()).sum();
        let head_len = parts_len + 4;
        if head_len > self.room {
            // Sized too small by the caller: build the request anew rather than fail.
            let mut out = Vec::with_capacity(head_len + body_len);
            parts.iter().for_each(|p| out.extend_from_slice(p));
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(&self.buf[self.room..]);
            return (out, 0);
        }
        let start = self.room - head_len;
        let mut at = start;
        for p in parts.iter().chain([&b"\r\n\r\n"[..]].iter()) {
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
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
            return Err(HttpError::HeadTooLarge(MAX_HEAD))
        }
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

/// Finds the end of a response head in `buf`, searching from `from` (pass the length already
/// searched, so a head that arrives in pieces is scanned once, not once per piece). Returns the
/// length of the head including its blank line; bare LF line ends are accepted as httparse does.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from.saturating_sub(2);
    while i < buf.len() {
        if buf[i] == b'\n' {
            match buf.get(i + 1) {
                Some(b'\n') => return Some(i + 2),
                Some(b'\r') if buf.get(i + 2) == Some(&b'\n') => return Some(i + 3),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Whether a head still without its end has grown past what any sane server sends.
pub fn head_too_large(buffered: usize) -> Result<(), HttpError> {
    if buffered > MAX_HEAD {
        Err(HttpError::HeadTooLarge(MAX_HEAD))
    } else {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Hex digits of a chunk size; `digits` bounds the value below overflow.
    Size {
        size: usize,
        digits: u8,
    },
    /// A chunk extension (`;name=value`), skipped up to the line end.
    Ext {
        size: usize,
    },
    SizeLf {
        size: usize,
    },
    Data {
        left: usize,
    },
    DataCr,
    DataLf,
    /// Trailer lines after the last chunk; `line` is the current line's length so far.
    Trailer {
        line: usize,
    },
    Done,
}

/// Follows a response body as it streams past, so the body itself is never kept: the client
/// needs only to know where it ends, and a 10 MB answer must cost no more than a small one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyReader {
    Length { left: usize },
    Chunked(ChunkState),
    UntilClose,
}

/// The chunked decoder's state (opaque).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkState(Chunk);

impl BodyReader {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Length(n) => BodyReader::Length { left: n },
            Framing::Chunked => BodyReader::Chunked(ChunkState(Chunk::Size { size: 0, digits: 0 })),
            Framing::UntilClose => BodyReader::UntilClose,
        }
    }

    /// Whether the body has ended (a body framed by the connection's close ends only there).
    pub fn is_done(&self) -> bool {
        matches!(
            self,
            BodyReader::Length { left: 0 } | BodyReader::Chunked(ChunkState(Chunk::Done))
        )
    }

    /// Takes body bytes from the front of `data` and returns how many belonged to the body;
    /// fewer than `data.len()` only once the body is done.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, HttpError> {
        match self {
            BodyReader::Length { left } => {
                let n = (*left).min(data.len());
                *left -= n;
                Ok(n)
            }
            BodyReader::UntilClose => Ok(data.len()),
            BodyReader::Chunked(ChunkState(state)) => feed_chunked(state, data),
        }
    }
}

fn feed_chunked(state: &mut Chunk, data: &[u8]) -> Result<usize, HttpError> {
    let mut at = 0;
    while at < data.len() {
        let b = data[at];
        *state = match *state {
            Chunk::Done => return Ok(at),
            Chunk::Data { left } => {
                let n = left.min(data.len() - at);
                at += n;
                if left == n {
                    *state = Chunk::DataCr;
                } else {
                    *state = Chunk::Data { left: left - n };
                }
                continue;
            }
            Chunk::Size { size, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    // 15 hex digits stay below 2^60: no size can overflow.
                    if digits >= 15 {
                        return Err(HttpError::Chunked);
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0) as usize;
                    Chunk::Size {
                        size: size * 16 + d,
                        digits: digits + 1,
                    }
                }
                _ if digits == 0 => return Err(HttpError::Chunked),
                b';' | b' ' | b'\t' => Chunk::Ext { size },
                b'\r' => Chunk::SizeLf { size },
                b'\n' => size_line_end(size),
                _ => return Err(HttpError::Chunked),
            },
            Chunk::Ext { size } => match b {
                b'\n' => size_line_end(size),
                _ => Chunk::Ext { size },
            },
            Chunk::SizeLf { size } => match b {
                b'\n' => size_line_end(size),
                _ => return Err(HttpError::Chunked),
            },
            Chunk::DataCr => match b {
                b'\r' => Chunk::DataLf,
                b'\n' => Chunk::Size { size: 0, digits: 0 },
                _ => return Err(HttpError::Chunked),
            },
            Chunk::DataLf => match b {
                b'\n' => Chunk::Size { size: 0, digits: 0 },
                _ => return Err(HttpError::Chunked),
            },
            Chunk::Trailer { line } => match b {
                b'\n' if line == 0 => Chunk::Done,
                b'\n' => Chunk::Trailer { line: 0 },
                b'\r' => Chunk::Trailer { line },
                _ if line >= MAX_HEAD => return Err(HttpError::HeadTooLarge(MAX_HEAD)),
                _ => Chunk::Trailer { line: line + 1 },
            },
        };
        at += 1;
    }
    Ok(at)
}

fn size_line_end(size: usize) -> Chunk {
    if size == 0 {
        Chunk::Trailer { line: 0 }
    } else {
        Chunk::Data { left: size }
    }
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
        // A bearer token goes in the head; a buffer sized too small still gives the request.
        for room in [200, 0] {
            let mut r = RequestBuf::new(4, 2, room);
            r.body().extend_from_slice(b"{}");
            let (bytes, start) = r.finish_with_bearer("/v", "h:1", Some(&"t".repeat(600)));
            let text = std::str::from_utf8(&bytes[start..]).unwrap();
            assert!(text.starts_with("POST /v HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\nAuthorization: Bearer ttt"));
            assert!(
                text.ends_with("ttt\r\nContent-Length: 2\r\n\r\n{}"),
                "{room}"
            );
        }
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
        // A head over 64 KiB fails even when it arrives whole.
        let mut big = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 64 * 1024));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&big), Err(HttpError::HeadTooLarge(64 * 1024)));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }

    /// Feeds `data` whole and in every split into two pieces, and byte by byte: the decoder
    /// must give the same answer however the bytes arrive.
    fn chunked(data: &[u8]) -> Result<Option<usize>, HttpError> {
        let whole = {
            let mut r = BodyReader::new(Framing::Chunked);
            r.feed(data).map(|n| r.is_done().then_some(n))
        };
        for cut in 0..=data.len() {
            let mut r = BodyReader::new(Framing::Chunked);
            let split = r.feed(&data[..cut]).and_then(|a| {
                if r.is_done() {
                    return Ok(Some(a));
                }
                let b = r.feed(&data[cut..])?;
                Ok(r.is_done().then_some(a + b))
            });
            assert_eq!(split, whole, "split at {cut}");
        }
        let mut r = BodyReader::new(Framing::Chunked);
        let mut total = 0;
        for i in 0..data.len() {
            match r.feed(&data[i..i + 1]) {
                Ok(n) => total += n,
                Err(e) => {
                    assert_eq!(Err(e), whole);
                    return whole;
                }
            }
        }
        assert_eq!(r.is_done().then_some(total), whole.clone().unwrap_or(None));
        whole
    }

    #[test]
    fn chunked_bodies_stream_past() {
        assert_eq!(chunked(b"5\r\nhello\r\n0\r\n\r\n").unwrap(), Some(15));
        assert_eq!(
            chunked(b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nNEXT").unwrap(),
            Some(29)
        );
        assert_eq!(chunked(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap(), Some(20));
        assert_eq!(chunked(b"5\nhello\n0\n\n").unwrap(), Some(11));
        assert_eq!(chunked(b"5\r\nhel").unwrap(), None);
        assert_eq!(chunked(b"5\r\nhello\r\n0\r\n").unwrap(), None);
        assert_eq!(chunked(b"zz\r\n").unwrap_err(), HttpError::Chunked);
        assert_eq!(chunked(b"\r\n").unwrap_err(), HttpError::Chunked);
        assert_eq!(chunked(b"2\r\nhello\r\n").unwrap_err(), HttpError::Chunked);
        assert_eq!(
            chunked(b"ffffffffffffffffff\r\n").unwrap_err(),
            HttpError::Chunked
        );
    }

    #[test]
    fn other_bodies_stream_past() {
        let mut r = BodyReader::new(Framing::Length(10));
        assert_eq!((r.feed(b"0123").unwrap(), r.is_done()), (4, false));
        assert_eq!((r.feed(b"456789XYZ").unwrap(), r.is_done()), (6, true));
        let mut r = BodyReader::new(Framing::Length(0));
        assert!(r.is_done());
        assert_eq!(r.feed(b"junk").unwrap(), 0);
        let mut r = BodyReader::new(Framing::UntilClose);
        assert_eq!(r.feed(&[0; 70_000]).unwrap(), 70_000);
        assert!(!r.is_done());
    }

    #[test]
    fn head_ends_are_found_once_however_the_head_arrives() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(find_head_end(head, 0), Some(head.len() - 2));
        // Arriving a byte at a time, each search starting where the last one stopped.
        let mut found = None;
        for len in 1..=head.len() {
            if let Some(e) = find_head_end(&head[..len], len - 1) {
                found = Some(e);
                break;
            }
        }
        assert_eq!(found, Some(head.len() - 2));
        assert_eq!(find_head_end(b"HTTP/1.0 200 OK\n\nbody", 0), Some(17));
        assert_eq!(find_head_end(b"HTTP/1.1 200 OK\r\nX: y\r\n", 0), None);
        assert!(head_too_large(64 * 1024).is_ok());
        assert_eq!(
            head_too_large(64 * 1024 + 1),
            Err(HttpError::HeadTooLarge(64 * 1024))
        );
    }
}
