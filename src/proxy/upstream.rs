//! TLS to a forward-proxy route's upstream when it is not the host itself: `upstream =
//! "https://127.0.0.1:8443"` for `host = "api.example.test"` connects to the address and checks
//! the certificate against the host (SNI = host), trusting `upstream_ca` besides the system's
//! roots. Routes whose upstream is their host use the shared client.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::config::{Config, Route, RouteId};
use crate::forward::Body;

/// A client of one route's upstream.
pub type RouteClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The clients of routes that need their own TLS settings, by route.
#[derive(Default)]
pub struct RouteClients(Vec<Option<RouteClient>>);

impl RouteClients {
    /// A client for every route with a `host` whose upstream is another address or trusts an
    /// extra CA.
    pub fn build(config: &Config, connect_timeout: Duration) -> Result<RouteClients, String> {
        let mut clients = Vec::with_capacity(config.routes.len());
        for r in &config.routes {
            clients.push(match own_tls(r) {
                Some(host) => Some(client(r, host, connect_timeout)?),
                None => None,
            });
        }
        Ok(RouteClients(clients))
    }

    /// The route's own client, if it has one.
    pub fn get(&self, route: RouteId) -> Option<&RouteClient> {
        self.0.get(route.0).and_then(Option::as_ref)
    }
}

fn own_tls(r: &Route) -> Option<&str> {
    let host = r.host.as_deref()?;
    let https = r.upstream.scheme == http::uri::Scheme::HTTPS;
    (https && (r.upstream_ca.is_some() || r.upstream.host != host)).then_some(host)
}

fn client(r: &Route, host: &str, connect_timeout: Duration) -> Result<RouteClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(ca) = &r.upstream_ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| format!("routes.{}.upstream_ca: {}: {e}", r.name, ca.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "routes.{}.upstream_ca: {} holds no certificate",
                r.name,
                ca.display()
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("routes.{}.upstream_ca: {e}", r.name))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build(https))
}

/// Whether a client error is an upstream certificate keygate refused.
pub fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) =
            c.downcast_ref::<rustls::Error>()
        {
            return true;
        }
        // hyper-rustls wraps tokio-rustls' io::Error in another; an io::Error's `source` skips
        // the error it wraps, so it is unwrapped by hand.
        cause = match c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => c.source(),
        };
    }
    false
}
