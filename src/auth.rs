//! The shared token that keeps strangers out of a coordinator: read from a file or the
//! environment, sent by agents and the CLI as a Bearer token, compared in constant time.

use std::path::Path;
use std::sync::Arc;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Status};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the token is empty")]
    Empty,
    #[error("the token must be printable ASCII without spaces")]
    NotAscii,
}

/// The token from `--token-file` (first) or `VTOX_TOKEN`; None when neither is given.
pub fn load(file: Option<&Path>, env: Option<String>) -> Result<Option<String>, AuthError> {
    let raw = match file {
        Some(p) => std::fs::read_to_string(p).map_err(|source| AuthError::Read {
            path: p.display().to_string(),
            source,
        })?,
        None => match env {
            Some(t) => t,
            None => return Ok(None),
        },
    };
    let t = raw.trim().to_string();
    if t.is_empty() {
        return Err(AuthError::Empty);
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AuthError::NotAscii);
    }
    Ok(Some(t))
}

/// Equality that takes as long whatever the first differing byte, so that timing does not
/// reveal how much of a guess was right.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Client side: adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, AuthError> {
        match token {
            None => Ok(Bearer(None)),
            Some(t) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| Bearer(Some(v)))
                .map_err(|_| AuthError::NotAscii),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Server side: refuses calls without the right token (when one is configured).
#[derive(Clone, Default)]
pub struct Check(Option<Arc<str>>);

impl Check {
    pub fn new(token: Option<String>) -> Check {
        Check(token.map(Arc::from))
    }
}

impl tonic::service::Interceptor for Check {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if ct_eq(got.as_bytes(), want.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "missing or wrong token (--token-file or VTOX_TOKEN)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_in_constant_time() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"a", b""));
        assert!(!ct_eq(b"", b"a"));
        assert!(!ct_eq(b"abc", b"abd"));
    }
    use tonic::service::Interceptor;

    #[test]
    fn tokens_check_out() {
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
        let mut check = Check::new(Some("s3cret".into()));
        let mut good = Bearer::new(Some("s3cret")).unwrap();
        let mut bad = Bearer::new(Some("guess")).unwrap();
        assert!(check.call(good.call(Request::new(())).unwrap()).is_ok());
        let e = check.call(bad.call(Request::new(())).unwrap()).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("s3cret"));
        assert!(check.call(Request::new(())).is_err());
        assert!(Check::new(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn loading() {
        assert!(load(None, None).unwrap().is_none());
        assert_eq!(
            load(None, Some(" t0k \n".into())).unwrap().as_deref(),
            Some("t0k")
        );
        assert!(matches!(
            load(None, Some("  ".into())),
            Err(AuthError::Empty)
        ));
        assert!(matches!(
            load(None, Some("a b".into())),
            Err(AuthError::NotAscii)
        ));
        assert!(matches!(
            load(Some(Path::new("/nonexistent/vtox-token")), None),
            Err(AuthError::Read { .. })
        ));
    }
}

/// TLS for the clients (agents and the CLI): the CA that signed the coordinator's certificate,
/// and for mutual TLS this process's own certificate and key. PEM files.
pub fn client_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<tonic::transport::ClientTlsConfig>, TlsError> {
    let Some(ca) = ca else {
        if cert.is_some() || key.is_some() {
            return Err(TlsError::Incomplete(
                "--tls-cert/--tls-key need --tls-ca on a client",
            ));
        }
        return Ok(None);
    };
    let mut cfg = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    match (cert, key) {
        (Some(c), Some(k)) => {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?))
        }
        (None, None) => {}
        _ => return Err(TlsError::Incomplete("--tls-cert and --tls-key go together")),
    }
    Ok(Some(cfg))
}

/// TLS for the coordinator: its certificate and key, and for mutual TLS the CA that client
/// certificates must chain to.
pub fn server_tls(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<tonic::transport::ServerTlsConfig>, TlsError> {
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) if client_ca.is_none() => return Ok(None),
        (None, None) => {
            return Err(TlsError::Incomplete(
                "--tls-client-ca needs --tls-cert and --tls-key",
            ))
        }
        _ => return Err(TlsError::Incomplete("--tls-cert and --tls-key go together")),
    };
    let mut cfg = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
    );
    if let Some(ca) = client_ca {
        cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(Some(cfg))
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Incomplete(&'static str),
}

fn read(p: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(p).map_err(|source| TlsError::Read {
        path: p.display().to_string(),
        source,
    })
}
