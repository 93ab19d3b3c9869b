//! The HTTP client secret sources use to reach secret managers and token endpoints (OpenBao,
//! AWS, OAuth2 providers, GitHub): one small, bounded request/answer exchange per call.
//!
//! Separate from `forward`'s client on purpose: a secret manager's answer carries credentials,
//! so it is read whole (bounded at [`MAX_ANSWER`]), parsed into typed structs by the source and
//! never streamed anywhere; and an error says what failed (status, a provider's error *code*),
//! never the answer's body, which may hold a token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// The largest answer a secret manager may give (a token endpoint's JSON, a KV secret).
pub const MAX_ANSWER: usize = 256 * 1024;

/// How long one exchange may take, connect to last byte, unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an exchange with a secret manager failed. Never carries the answer's body.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL or a header could not make a request.
    #[error("bad request to {url}: {reason}")]
    Request {
        /// Where it was going, without query.
        url: String,
        /// What was wrong.
        reason: String,
    },
    /// The connection failed (refused, TLS, reset).
    #[error("cannot reach {url}: {reason}")]
    Connect {
        /// Where it was going, without query.
        url: String,
        /// The transport error.
        reason: String,
    },
    /// No complete answer within the deadline.
    #[error("{url} did not answer within {timeout:?}")]
    Timeout {
        /// Where it was going, without query.
        url: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The answer was larger than [`MAX_ANSWER`].
    #[error("{url} answered with more than {MAX_ANSWER} bytes")]
    TooLarge {
        /// Where it was going, without query.
        url: String,
    },
    /// An extra CA file could not be read or held no certificate.
    #[error("CA file {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// A complete answer: status, headers and the whole (bounded) body. Sources parse the body into
/// typed structs; its bytes must not reach an error or a log.
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, at most [`MAX_ANSWER`] bytes.
    pub body: Bytes,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body may hold a credential: only its size is shown.
        write!(f, "Answer({}, {} bytes)", self.status, self.body.len())
    }
}

/// A client for one secret manager: TLS with the web and system roots, plus an extra CA when the
/// manager's certificate is signed by a private one (`ca_file`). Cheap to clone.
#[derive(Clone)]
pub struct BackendClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl BackendClient {
    /// A client trusting the usual roots and, if given, the certificates in `ca_file` (PEM).
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> Result<BackendClient, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = ca_file {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let bad = |reason: String| HttpError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no certificate in it".into()));
            }
            for c in certs {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Ca {
                path: String::new(),
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(BackendClient { client, timeout })
    }

    /// The client kept in `cell`, made on first use: a source builds its client (and reads its
    /// CA file) once, not per token fetch.
    pub fn cached(
        cell: &std::sync::OnceLock<BackendClient>,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<BackendClient, HttpError> {
        if let Some(c) = cell.get() {
            return Ok(c.clone());
        }
        let c = BackendClient::new(ca_file, timeout)?;
        Ok(cell.get_or_init(|| c).clone())
    }

    /// Sends one request and reads the whole answer, within the client's deadline. Redirects
    /// are not followed (a 3xx is an answer like any other): a token must not be sent on to
    /// wherever a manager points.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<Answer, HttpError> {
        let shown = url.split('?').next().unwrap_or(url).to_string();
        let mut req = Request::builder()
            .method(method)
            .uri(url)
            .body(Full::new(body))
            .map_err(|e| HttpError::Request {
                url: shown.clone(),
                reason: e.to_string(),
            })?;
        req.headers_mut().extend(headers);
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| HttpError::Connect {
                    url: shown.clone(),
                    reason: transport_reason(&e),
                })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        HttpError::TooLarge { url: shown.clone() }
                    } else {
                        HttpError::Connect {
                            url: shown.clone(),
                            reason: e.to_string(),
                        }
                    }
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(HttpError::Timeout {
                url: shown,
                timeout: self.timeout,
            }),
        }
    }
}

/// The innermost cause of a transport error: "connection refused" says more than "client error
/// (Connect)".
fn transport_reason(e: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_over_the_bound_is_refused_not_read_on() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_ANSWER + 1
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&vec![b'a'; MAX_ANSWER + 1]).await;
        });
        let c = BackendClient::new(None, Duration::from_secs(5)).unwrap();
        let url = format!("http://{addr}/v1/secret?token=x");
        let err = c
            .send(Method::GET, &url, HeaderMap::new(), Bytes::new())
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::TooLarge { .. }), "{err}");
        assert!(!err.to_string().contains("token=x"), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_not_a_hang() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (_s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let c = BackendClient::new(None, Duration::from_millis(200)).unwrap();
        let err = c
            .send(
                Method::GET,
                &format!("http://{addr}/"),
                HeaderMap::new(),
                Bytes::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
        server.abort();
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate\n").unwrap();
        let err = BackendClient::new(Some(&p), DEFAULT_TIMEOUT).err().unwrap();
        assert!(matches!(err, HttpError::Ca { .. }), "{err}");
    }
}
