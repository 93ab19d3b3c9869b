//! A small stand-in OpenBao for unit tests of answers and failures the real server does not
//! give on demand (a lease with a malformed body, a revocation that fails once, a renewal refused).
//! Every call is recorded; the answer comes from the test's closure.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One request the fake received: method, path (without `/v1/`), body.
#[derive(Clone, Debug)]
pub(crate) struct Call {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) body: String,
}

type Answer = dyn Fn(&Call, usize) -> (u16, String) + Send + Sync;

/// A running fake; its task ends with the test's runtime.
pub(crate) struct FakeBao {
    pub(crate) address: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeBao {
    /// Serves on 127.0.0.1; `answer` gets the call and how many calls to the same path came
    /// before it. `auth/token/lookup-self` is answered for it (a root-like token).
    pub(crate) async fn start(
        answer: impl Fn(&Call, usize) -> (u16, String) + Send + Sync + 'static,
    ) -> FakeBao {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let answer: Arc<Answer> = Arc::new(answer);
        let seen = calls.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                let answer = answer.clone();
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        let answer = answer.clone();
                        async move {
                            let method = req.method().to_string();
                            let path = req.uri().path().trim_start_matches("/v1/").to_string();
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let body =
                                String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                            let call = Call { method, path, body };
                            let before = {
                                let mut s = seen.lock().unwrap();
                                let n = s.iter().filter(|c| c.path == call.path).count();
                                s.push(call.clone());
                                n
                            };
                            let (status, text) = if call.path == "auth/token/lookup-self" {
                                (200, r#"{"data":{"ttl":0,"renewable":false}}"#.to_string())
                            } else {
                                answer(&call, before)
                            };
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeBao { address, calls }
    }

    /// The calls to `path` so far.
    pub(crate) fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    /// Waits (at most 10 s) until `path` was called `n` times; returns those calls.
    pub(crate) async fn wait_for(&self, path: &str, n: usize) -> Vec<Call> {
        let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let calls = self.calls_to(path);
            if calls.len() >= n || tokio::time::Instant::now() > end {
                return calls;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
