//! The TLS listener of backend mode (`listen = ["https://0.0.0.0:8443"]`): a rustls server
//! config built from `tls = { cert, key, client_ca }` each time a request state is built, so
//! `keygate reload` picks up a renewed certificate for the next connection.
//!
//! With `client_ca`, a client must present a certificate that CA issued (rustls refuses the
//! handshake otherwise), and the certificate's subject names the agent (`client_cert_subject`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::TlsFiles;

/// Reads the certificate, key and client CA and builds the server side of TLS; the error names
/// the file and what is wrong with it, never its content.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        format!(
            "tls.key {}: no usable private key: {e}",
            files.key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("tls.client_ca {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("tls.client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "tls.cert {} and tls.key {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: cannot read PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The subject of the client's verified leaf certificate, as `client_cert_subject` is written
/// (`CN=ci-runner`, or `O=Example, CN=ci-runner` for several attributes).
pub fn client_subject(conn: &rustls::ServerConnection) -> Option<String> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(normalize_subject(&cert.subject().to_string()))
}

/// One spelling for a subject, so config and certificate compare equal: attributes separated by
/// `, `, no space around `=`.
pub fn normalize_subject(s: &str) -> String {
    s.split(',')
        .map(|part| match part.split_once('=') {
            Some((k, v)) => format!("{}={}", k.trim().to_ascii_uppercase(), v.trim()),
            None => part.trim().to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a certificate's subject has every attribute `wanted` names (`CN=ci-runner` matches
/// `O=Example, CN=ci-runner`): the CA is trusted to issue names, config picks out the ones that
/// make an agent.
pub fn subject_matches(wanted: &str, subject: &str) -> bool {
    let have: Vec<&str> = subject.split(", ").collect();
    wanted.split(", ").all(|w| have.contains(&w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_attributes_must_all_be_in_the_subject() {
        let cert = "O=trustme, OU=Testing, CN=ci-runner";
        assert!(subject_matches("CN=ci-runner", cert));
        assert!(subject_matches("O=trustme, CN=ci-runner", cert));
        assert!(!subject_matches("CN=ci", cert));
        assert!(!subject_matches("O=other, CN=ci-runner", cert));
    }

    #[test]
    fn subjects_compare_in_one_spelling() {
        assert_eq!(normalize_subject("cn = ci-runner"), "CN=ci-runner");
        assert_eq!(
            normalize_subject("O=Example,CN=ci-runner"),
            "O=Example, CN=ci-runner"
        );
    }
}
