//! The connection to the target: plain TCP or TLS (with the target's name for SNI), opened the
//! same way by the lanes and the login, and the errors an exchange over it can end in.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use vtox::http1::HttpError;

/// Why an exchange failed.
pub enum ExchangeError {
    Io(io::Error),
    Protocol(HttpError),
    /// The TLS handshake failed (an untrusted certificate, a name that does not match).
    Tls(io::Error),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Io(e) => write!(f, "{e}"),
            ExchangeError::Protocol(e) => write!(f, "{e}"),
            ExchangeError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> Self {
        ExchangeError::Io(e)
    }
}

impl From<HttpError> for ExchangeError {
    fn from(e: HttpError) -> Self {
        ExchangeError::Protocol(e)
    }
}

/// A connection to the target, plain or over TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS towards an `https://` target: the shared configuration and the URL's host as the
/// server name (SNI).
#[derive(Clone)]
pub struct TlsTarget {
    pub connector: tokio_rustls::TlsConnector,
    pub name: ServerName<'static>,
    /// The target as given, for the one line that says why its handshakes fail.
    pub base: String,
}

/// Opens a connection, over TLS when `tls` is given.
pub async fn open(host: &str, port: u16, tls: Option<&TlsTarget>) -> Result<Stream, ExchangeError> {
    let s = TcpStream::connect((host, port)).await?;
    s.set_nodelay(true)?;
    match tls {
        None => Ok(Stream::Plain(s)),
        Some(tls) => match tls.connector.connect(tls.name.clone(), s).await {
            Ok(t) => Ok(Stream::Tls(Box::new(t))),
            // rustls reports a refused certificate or handshake as InvalidData; anything else
            // is the network's.
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(ExchangeError::Tls(e)),
            Err(e) => Err(ExchangeError::Io(e)),
        },
    }
}
