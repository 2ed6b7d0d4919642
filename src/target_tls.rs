//! TLS towards the ingest target (`https://`): which certificates vtox-sim trusts, built once
//! into a rustls client configuration (ring provider) that every lane shares.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TargetTlsError {
    #[error("cannot read the CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("the CA file {0} holds no PEM certificate")]
    NoCertificate(String),
    #[error("a certificate of {path} is not usable as a CA: {reason}")]
    BadCa { path: String, reason: String },
    #[error("no trusted certificate at all: the system has none and no --target-ca was given")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// What the client trusts.
#[derive(Debug, Clone, Default)]
pub struct TrustOptions<'a> {
    /// Add the certificates of this PEM file to the roots.
    pub ca_file: Option<&'a Path>,
    /// Accept any certificate (signatures of the handshake are still checked).
    pub insecure: bool,
    /// Start from the system's roots (off in tests, which must not depend on the host).
    pub system_roots: bool,
}

/// How many certificates the configuration trusts, for one line at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    pub system: usize,
    pub added: usize,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Builds the client configuration for the target.
pub fn client_config(
    opts: &TrustOptions<'_>,
) -> Result<(rustls::ClientConfig, Trust), TargetTlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TargetTlsError::Setup(e.to_string()))?;
    let mut trust = Trust {
        system: 0,
        added: 0,
    };
    let config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        if opts.system_roots {
            // Unreadable system certificates are skipped: one bad file must not stop a run
            // whose target chains to another.
            let found = rustls_native_certs::load_native_certs();
            let (ok, _) = roots.add_parsable_certificates(found.certs);
            trust.system = ok;
        }
        if let Some(path) = opts.ca_file {
            trust.added = add_ca_file(&mut roots, path)?;
        }
        if roots.is_empty() {
            return Err(TargetTlsError::NoRoots);
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok((config, trust))
}

fn add_ca_file(roots: &mut rustls::RootCertStore, path: &Path) -> Result<usize, TargetTlsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| TargetTlsError::CaFile {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| TargetTlsError::CaFile {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TargetTlsError::BadCa {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        added += 1;
    }
    if added == 0 {
        return Err(TargetTlsError::NoCertificate(shown));
    }
    Ok(added)
}

/// The server name for SNI and certificate checks: the URL's host (an IP literal is checked
/// against the certificate's IP addresses and sends no SNI, as the TLS rules say).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TargetTlsError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| TargetTlsError::Setup(format!("{host:?} is not a TLS server name: {e}")))
}

/// `--target-insecure`: any certificate is taken, but the handshake's signatures are still
/// verified, so the connection is at least encrypted to whoever holds the presented key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vtox-tls-{}-{name}", std::process::id()));
        std::fs::write(&p, contents).unwrap();
        p
    }

    #[test]
    fn bad_ca_files_are_named() {
        let opts = |p| TrustOptions {
            ca_file: Some(p),
            ..Default::default()
        };
        let missing = Path::new("/nonexistent/ca.pem");
        assert!(matches!(
            client_config(&opts(missing)),
            Err(TargetTlsError::CaFile { .. })
        ));
        let empty = temp("empty.pem", b"not a certificate\n");
        let err = client_config(&opts(&empty)).unwrap_err();
        assert!(matches!(err, TargetTlsError::NoCertificate(_)));
        assert!(err.to_string().contains("empty.pem"));
        let garbage = temp(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        assert!(client_config(&opts(&garbage)).is_err());
        let _ = std::fs::remove_file(empty);
        let _ = std::fs::remove_file(garbage);
    }

    #[test]
    fn nothing_to_trust_is_refused_and_insecure_needs_nothing() {
        assert!(matches!(
            client_config(&TrustOptions::default()),
            Err(TargetTlsError::NoRoots)
        ));
        let insecure = TrustOptions {
            insecure: true,
            ..Default::default()
        };
        assert!(client_config(&insecure).is_ok());
    }

    #[test]
    fn server_names_follow_the_host() {
        assert!(matches!(
            server_name("vtox.example.com").unwrap(),
            ServerName::DnsName(_)
        ));
        assert!(matches!(
            server_name("127.0.0.1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name("::1").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(server_name("bad name!").is_err());
    }
}
