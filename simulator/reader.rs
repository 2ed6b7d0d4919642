//! Reading answers: the head is buffered (up to 64 KiB), the body only followed to its end and
//! thrown away as it arrives, whatever the framing (length, chunked, until close).

use crate::stream::ExchangeError;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};
use vtox::http1::{find_head_end, head_too_large, parse_head, BodyReader, HttpError, ResponseHead};

/// Reads responses: the head is buffered (up to 64 KiB), the body is only followed to its end
/// and thrown away as it arrives, so a huge answer costs no memory. Its state survives a
/// timeout, so that the late watcher continues exactly where the lane stopped.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for the end of the head.
    scanned: usize,
    /// The final head and its body's progress, once the head is in.
    head: Option<(ResponseHead, BodyReader)>,
}

/// A buffer grown by an unusually large head is given back rather than kept for the lane's life.
const KEEP_CAPACITY: usize = 16 * 1024;

impl Reader {
    pub fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(4096);
        }
        self.scanned = 0;
        self.head = None;
    }

    /// Reads until one whole final response has passed, continuing from whatever state the
    /// reader is in.
    pub async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> Result<ResponseHead, ExchangeError> {
        loop {
            if self.head.is_none() {
                self.take_head()?;
            }
            if let Some((head, body)) = &mut self.head {
                let used = body.feed(&self.buf)?;
                let extra = self.buf.len() - used;
                self.buf.clear();
                if body.is_done() {
                    let mut head = *head;
                    // Bytes beyond the answer belong to no request of ours: the connection is
                    // out of step and must not carry another one.
                    if extra > 0 {
                        head.keep_alive = false;
                    }
                    self.head = None;
                    return Ok(head);
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            if stream.read_buf(&mut self.buf).await? == 0 {
                return match self.head {
                    Some((head, BodyReader::UntilClose)) => Ok(ResponseHead {
                        keep_alive: false,
                        ..head
                    }),
                    _ => Err(ExchangeError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed mid-response",
                    ))),
                };
            }
        }
    }

    /// Parses the final head out of the buffer if it is complete, skipping interim 1xx
    /// answers (e.g. 100 Continue); leaves the body's first bytes in the buffer.
    fn take_head(&mut self) -> Result<(), HttpError> {
        loop {
            let Some(end) = find_head_end(&self.buf, self.scanned) else {
                self.scanned = self.buf.len();
                return head_too_large(self.buf.len());
            };
            let head = parse_head(&self.buf[..end])?
                .ok_or_else(|| HttpError::Malformed("incomplete head".into()))?;
            self.buf.drain(..head.head_len.min(end));
            self.scanned = 0;
            if !(100..200).contains(&head.status) {
                self.head = Some((head, BodyReader::new(head.framing)));
                return Ok(());
            }
        }
    }
}
