//! A local HTTP server standing in for a push provider: real sockets on 127.0.0.1, hyper 1.x,
//! plain HTTP/1.1 and HTTP/2 (`plain`) or HTTP/2 over TLS with a self-signed certificate made
//! here (`tls_h2`, as APNs). It records every request and answers from a script: scripted
//! replies in order, then 200. A reply may be held until the test releases it. Requests to a
//! path ending in `/token` (an OAuth2 token endpoint) always get an access token.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// The access token the stand-in's token endpoint hands out.
pub const ACCESS_TOKEN: &str = "ya29.stand-in-access-token";
const WAIT: Duration = Duration::from_secs(30);

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub version: hyper::Version,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    /// When its body had arrived.
    pub received: std::time::Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// An answer: status, extra headers, body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: String::new(),
        }
    }

    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
        }
    }
}

enum Scripted {
    Now(Reply),
    Held(oneshot::Receiver<Reply>),
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Scripted>>,
}

pub struct StandIn {
    /// Base URL, e.g. `http://127.0.0.1:4321` or `https://127.0.0.1:4321`.
    pub url: String,
    /// The CA certificate (PEM) of a TLS stand-in, to trust.
    pub ca_pem: Option<String>,
    shared: Arc<Shared>,
    requests: mpsc::UnboundedReceiver<Recorded>,
    /// Token endpoint calls, separately.
    token_requests: mpsc::UnboundedReceiver<Recorded>,
}

impl StandIn {
    /// Plain HTTP (1.1 and 2, whichever the client speaks).
    pub async fn plain() -> StandIn {
        Self::start(false).await
    }

    /// HTTP/2 only, over TLS (ALPN `h2`), with a certificate for 127.0.0.1 made here.
    pub async fn tls_h2() -> StandIn {
        Self::start(true).await
    }

    async fn start(tls: bool) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (tx, requests) = mpsc::unbounded_channel();
        let (token_tx, token_requests) = mpsc::unbounded_channel();
        let (acceptor, ca_pem) = if tls {
            // A CA made here, and a certificate for 127.0.0.1 it signs.
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::DigitalSignature,
            ];
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&key, &ca, &ca_key)
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec()];
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(ca.pem()),
            )
        } else {
            (None, None)
        };
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (s, tx, token_tx) = (s.clone(), tx.clone(), token_tx.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, s.clone(), tx.clone(), token_tx.clone())
                    });
                    match acceptor {
                        Some(acceptor) => {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(tls), service)
                                .await;
                        }
                        None => {
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection(TokioIo::new(tcp), service)
                                    .await;
                        }
                    }
                });
            }
        });
        let scheme = if tls { "https" } else { "http" };
        StandIn {
            url: format!("{scheme}://{addr}"),
            ca_pem,
            shared,
            requests,
            token_requests,
        }
    }

    /// The next call (not to the token endpoint) is answered with `reply`.
    pub fn reply_next(&self, reply: Reply) {
        self.shared
            .script
            .lock()
            .unwrap()
            .push_back(Scripted::Now(reply));
    }

    /// The next call waits for the reply sent on the returned channel.
    pub fn hold_next(&self) -> oneshot::Sender<Reply> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .script
            .lock()
            .unwrap()
            .push_back(Scripted::Held(rx));
        tx
    }

    /// The next request received (waiting up to 30 s).
    pub async fn next_request(&mut self) -> Recorded {
        tokio::time::timeout(WAIT, self.requests.recv())
            .await
            .expect("no request reached the stand-in within 30 s")
            .expect("stand-in stopped")
    }

    /// A request received already, if any.
    pub fn try_next_request(&mut self) -> Option<Recorded> {
        self.requests.try_recv().ok()
    }

    /// A token endpoint request received already, if any.
    pub fn try_next_token_request(&mut self) -> Option<Recorded> {
        self.token_requests.try_recv().ok()
    }

    /// The next token endpoint request (waiting up to 30 s).
    pub async fn next_token_request(&mut self) -> Recorded {
        tokio::time::timeout(WAIT, self.token_requests.recv())
            .await
            .expect("no token request within 30 s")
            .expect("stand-in stopped")
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<Recorded>,
    token_tx: mpsc::UnboundedSender<Recorded>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        version: parts.version,
        headers: parts.headers,
        body,
        received: std::time::Instant::now(),
    };
    let reply = if recorded.path.ends_with("/token") {
        let _ = token_tx.send(recorded);
        Reply::json(
            200,
            serde_json::json!({"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}),
        )
    } else {
        let _ = tx.send(recorded);
        let next = shared.script.lock().unwrap().pop_front();
        match next {
            Some(Scripted::Now(r)) => r,
            Some(Scripted::Held(rx)) => rx.await.unwrap_or_else(|_| Reply::status(503)),
            None => Reply::status(200),
        }
    };
    let mut resp = Response::builder().status(reply.status);
    for (k, v) in reply.headers {
        resp = resp.header(k, v);
    }
    Ok(resp
        .body(Full::new(Bytes::from(reply.body)))
        .unwrap_or_default())
}
