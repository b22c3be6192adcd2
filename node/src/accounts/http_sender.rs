//! [`HttpCodeSender`]: posts verification codes to an SMS/voice gateway as
//! `{"to":"+<phone>","code":"<code>","channel":"sms|voice"}`.
//!
//! A deliberately small HTTP/1.1 client (one `POST` per code, `Connection: close`, only the
//! status line of the answer is read) over a tokio `TcpStream`, with TLS from tokio-rustls for
//! `https://` URLs, verified against the OS trust store. One timeout bounds the whole exchange:
//! DNS, connect, TLS handshake, request and status line.

use std::sync::Arc;
use std::time::Duration;

use ringpost_wire::{CodeChannel, UserId};
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::sender::{CodeSendError, CodeSender, SendFuture};

/// Default bound on one delivery (connect + TLS + request + status line).
pub const HTTP_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Bytes of the answer read while looking for the status line; the rest is never read.
pub const HTTP_RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Longest accepted gateway URL and bearer token.
pub const HTTP_CONFIG_STRING_BYTES_MAX: usize = 4 * 1024;

/// Where and how to post codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCodeSenderConfig {
    /// `http://host[:port][/path]` or `https://…`.
    pub url: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer_token: Option<String>,
    /// See [`HTTP_TIMEOUT_MS_DEFAULT`].
    pub timeout_ms: u64,
}

/// See the module documentation.
pub struct HttpCodeSender {
    target: Target,
    bearer_token: Option<String>,
    timeout: Duration,
    /// Present for `https://` targets.
    tls: Option<TlsConnector>,
}

impl std::fmt::Debug for HttpCodeSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCodeSender")
            .field("target", &self.target)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HttpCodeSender {
    /// A sender for `config`; for `https://` URLs it loads the OS root certificates (blocking
    /// file reads: call it at startup).
    pub fn new(config: HttpCodeSenderConfig) -> Result<HttpCodeSender, CodeSendError> {
        let target = Target::parse(&config.url)?;
        let roots = if target.tls {
            let loaded = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _unparsable) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(CodeSendError::Config(format!(
                    "no usable root certificates in the OS trust store ({} errors)",
                    loaded.errors.len()
                )));
            }
            Some(roots)
        } else {
            None
        };
        Self::build(config, target, roots)
    }

    /// A sender that trusts only `roots` for `https://` URLs (tests, private gateways).
    pub fn with_root_certificates(
        config: HttpCodeSenderConfig,
        roots: RootCertStore,
    ) -> Result<HttpCodeSender, CodeSendError> {
        let target = Target::parse(&config.url)?;
        Self::build(config, target, Some(roots))
    }

    fn build(
        config: HttpCodeSenderConfig,
        target: Target,
        roots: Option<RootCertStore>,
    ) -> Result<HttpCodeSender, CodeSendError> {
        if let Some(token) = &config.bearer_token {
            let ok = !token.is_empty()
                && token.len() <= HTTP_CONFIG_STRING_BYTES_MAX
                && token.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(CodeSendError::Config(
                    "bearer token must be 1..4096 visible ASCII characters".into(),
                ));
            }
        }
        if config.timeout_ms == 0 {
            return Err(CodeSendError::Config("timeout_ms must be positive".into()));
        }
        let tls = match (target.tls, roots) {
            (true, Some(roots)) => {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let client = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| CodeSendError::Config(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(TlsConnector::from(Arc::new(client)))
            }
            (true, None) => return Err(CodeSendError::Config("https without roots".into())),
            (false, _) => None,
        };
        Ok(HttpCodeSender {
            target,
            bearer_token: config.bearer_token,
            timeout: Duration::from_millis(config.timeout_ms),
            tls,
        })
    }

    fn request(&self, phone: UserId, code: &str, channel: CodeChannel) -> Vec<u8> {
        let channel = match channel {
            CodeChannel::Sms => "sms",
            CodeChannel::Voice => "voice",
        };
        let body =
            serde_json::json!({ "to": format!("+{phone}"), "code": code, "channel": channel })
                .to_string();
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringpost-node\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.target.path,
            self.target.host_header(),
            body.len()
        );
        if let Some(token) = &self.bearer_token {
            head.push_str("Authorization: Bearer ");
            head.push_str(token);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body.as_bytes());
        out
    }

    async fn exchange(&self, request: Vec<u8>) -> Result<(), CodeSendError> {
        let tcp = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| {
                CodeSendError::Io(format!("connect {}: {e}", self.target.host_header()))
            })?;
        // Small request, answer read once: no Nagle delay wanted.
        let _ = tcp.set_nodelay(true);
        let status = match &self.tls {
            None => post(tcp, &request).await?,
            Some(connector) => {
                let name = ServerName::try_from(self.target.host.clone())
                    .map_err(|e| CodeSendError::Config(format!("TLS server name: {e}")))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| CodeSendError::Io(format!("TLS: {e}")))?;
                post(tls, &request).await?
            }
        };
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(CodeSendError::Status(status))
        }
    }
}

impl CodeSender for HttpCodeSender {
    fn send<'a>(&'a self, phone: UserId, code: &'a str, channel: CodeChannel) -> SendFuture<'a> {
        Box::pin(async move {
            let request = self.request(phone, code, channel);
            let result = match tokio::time::timeout(self.timeout, self.exchange(request)).await {
                Ok(result) => result,
                Err(_elapsed) => Err(CodeSendError::Timeout),
            };
            if let Err(e) = &result {
                tracing::warn!(error = %e, gateway = %self.target.host_header(), "code delivery failed");
            }
            result
        })
    }
}

/// Writes `request` and returns the status code of the answer.
async fn post<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> Result<u16, CodeSendError> {
    stream
        .write_all(request)
        .await
        .map_err(|e| CodeSendError::Io(e.to_string()))?;
    stream
        .flush()
        .await
        .map_err(|e| CodeSendError::Io(e.to_string()))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&buf[..end]);
        }
        if buf.len() >= HTTP_RESPONSE_HEAD_BYTES_MAX {
            return Err(CodeSendError::BadResponse("no status line".into()));
        }
        let want = chunk.len().min(HTTP_RESPONSE_HEAD_BYTES_MAX - buf.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(|e| CodeSendError::Io(e.to_string()))?;
        if n == 0 {
            return Err(CodeSendError::BadResponse(
                "connection closed before status line".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `HTTP/1.x NNN reason` → `NNN`.
fn parse_status_line(line: &[u8]) -> Result<u16, CodeSendError> {
    let bad = || {
        CodeSendError::BadResponse(format!(
            "status line {:?}",
            String::from_utf8_lossy(&line[..line.len().min(64)])
        ))
    };
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let mut parts = text.split(' ');
    let version = parts.next().ok_or_else(bad)?;
    let status = parts.next().ok_or_else(bad)?;
    if !version.starts_with("HTTP/1.") || status.len() != 3 {
        return Err(bad());
    }
    status
        .parse::<u16>()
        .ok()
        .filter(|s| (100..600).contains(s))
        .ok_or_else(bad)
}

/// A parsed gateway URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// A DNS name or IP address (IPv6 without brackets).
    host: String,
    port: u16,
    /// Path and query, starting with `/`.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, CodeSendError> {
        let bad = |why: &str| CodeSendError::Config(format!("gateway URL {url:?}: {why}"));
        if url.len() > HTTP_CONFIG_STRING_BYTES_MAX {
            return Err(bad("too long"));
        }
        let (tls, rest) = if let Some(rest) = strip_prefix_ignore_case(url, "http://") {
            (false, rest)
        } else if let Some(rest) = strip_prefix_ignore_case(url, "https://") {
            (true, rest)
        } else {
            return Err(bad("scheme must be http or https"));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        let path = path.split('#').next().unwrap_or("/").to_owned();
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(bad("path must be visible ASCII (percent-encode the rest)"));
        }
        if authority.contains('@') {
            return Err(bad("user info is not supported; use bearer_token"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("bad IPv6 address"));
            }
            let port = match after {
                "" => default_port,
                p => p
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| bad("bad port"))?,
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad("bad port"))?),
                None => (authority, default_port),
            }
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !host_ok {
            return Err(bad("bad host"));
        }
        if port == 0 {
            return Err(bad("port 0"));
        }
        Ok(Target {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The `Host` header value (and a readable name for logs).
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn parses_urls() {
        let t = Target::parse("http://127.0.0.1:8080/v1/codes?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/v1/codes?x=1".into()
            }
        );
        assert_eq!(t.host_header(), "127.0.0.1:8080");
        let t = Target::parse("HTTPS://sms.example.com").unwrap();
        assert_eq!((t.tls, t.port, t.path.as_str()), (true, 443, "/"));
        assert_eq!(t.host_header(), "sms.example.com");
        let t = Target::parse("http://[::1]:9000/send#frag").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 9000, "/send")
        );
        assert_eq!(t.host_header(), "[::1]:9000");
        let t = Target::parse("http://gw?k=v").unwrap();
        assert_eq!(t.path, "/?k=v");
        for bad in [
            "ftp://x",
            "http://",
            "http://:80/",
            "http://a b/",
            "http://u:p@host/",
            "http://host:99999/",
            "http://host:0/",
            "http://host:x/",
            "http://[::1/",
            "http://[zz]/",
            "http://host/a b",
            "http://host/\r\nX: y",
            "h",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
        assert!(Target::parse(&format!("http://h/{}", "a".repeat(5000))).is_err());
    }

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content").unwrap(), 204);
        assert_eq!(parse_status_line(b"HTTP/1.0 500").unwrap(), 500);
        for bad in [
            &b""[..],
            b"HTTP/2 200",
            b"HTTP/1.1 20",
            b"HTTP/1.1 abc x",
            b"\xff\xfe",
            b"HTTP/1.1 999",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_bad_config() {
        let cfg = |token: Option<&str>, timeout_ms| HttpCodeSenderConfig {
            url: "http://127.0.0.1:1/".into(),
            bearer_token: token.map(str::to_owned),
            timeout_ms,
        };
        assert!(HttpCodeSender::new(cfg(Some("ok-token"), 1000)).is_ok());
        assert!(HttpCodeSender::new(cfg(Some("bad\r\ntoken"), 1000)).is_err());
        assert!(HttpCodeSender::new(cfg(Some(""), 1000)).is_err());
        assert!(HttpCodeSender::new(cfg(None, 0)).is_err());
        let dbg = format!(
            "{:?}",
            HttpCodeSender::new(cfg(Some("s3cret"), 1000)).unwrap()
        );
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }

    /// One request as a loopback gateway saw it.
    struct Seen {
        head: String,
        body: serde_json::Value,
    }

    /// Reads one HTTP request (head and `Content-Length` body) and answers `response`.
    async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, response: &str) -> Seen {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed early");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        while buf.len() < head_end + len {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap();
        s.write_all(response.as_bytes()).await.unwrap();
        s.shutdown().await.ok();
        Seen { head, body }
    }

    fn config(url: String, token: Option<&str>, timeout_ms: u64) -> HttpCodeSenderConfig {
        HttpCodeSenderConfig {
            url,
            bearer_token: token.map(str::to_owned),
            timeout_ms,
        }
    }

    #[tokio::test]
    async fn posts_json_to_loopback_gateway() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve_one(s, "HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n").await
        });
        let sender = HttpCodeSender::new(config(
            format!("http://{addr}/v1/verify"),
            Some("tok-123"),
            5000,
        ))
        .unwrap();
        sender
            .send(15551234567, "042042", CodeChannel::Voice)
            .await
            .unwrap();
        let seen = server.await.unwrap();
        assert!(
            seen.head.starts_with("POST /v1/verify HTTP/1.1\r\n"),
            "{}",
            seen.head
        );
        assert!(
            seen.head.contains(&format!("\r\nHost: {addr}\r\n")),
            "{}",
            seen.head
        );
        assert!(seen.head.contains("\r\nAuthorization: Bearer tok-123\r\n"));
        assert!(seen.head.contains("\r\nContent-Type: application/json\r\n"));
        assert_eq!(
            seen.body,
            serde_json::json!({"to": "+15551234567", "code": "042042", "channel": "voice"})
        );
    }

    #[tokio::test]
    async fn non_2xx_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve_one(
                s,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
            )
            .await
        });
        let sender = HttpCodeSender::new(config(format!("http://{addr}"), None, 5000)).unwrap();
        let err = sender
            .send(4930123456, "111111", CodeChannel::Sms)
            .await
            .unwrap_err();
        assert!(matches!(err, CodeSendError::Status(503)), "{err}");
        let seen = server.await.unwrap();
        assert!(!seen.head.contains("Authorization"));
        assert_eq!(seen.body["channel"], "sms");
    }

    #[tokio::test]
    async fn silent_gateway_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            // Hold the connection open without answering.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(s);
        });
        let sender = HttpCodeSender::new(config(format!("http://{addr}"), None, 200)).unwrap();
        let err = sender
            .send(1, "123456", CodeChannel::Sms)
            .await
            .unwrap_err();
        assert!(matches!(err, CodeSendError::Timeout), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn garbage_answer_and_refused_connection_are_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve_one(s, "SSH-2.0-nope\r\n").await;
        });
        let sender = HttpCodeSender::new(config(format!("http://{addr}"), None, 5000)).unwrap();
        let err = sender
            .send(1, "123456", CodeChannel::Sms)
            .await
            .unwrap_err();
        assert!(matches!(err, CodeSendError::BadResponse(_)), "{err}");
        server.await.unwrap();

        // Nothing listens on the port any more.
        let err = sender
            .send(1, "123456", CodeChannel::Sms)
            .await
            .unwrap_err();
        assert!(matches!(err, CodeSendError::Io(_)), "{err}");
    }

    #[tokio::test]
    async fn posts_over_tls_to_a_trusted_gateway() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let first = acceptor.clone();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let tls = first.accept(s).await.unwrap();
            serve_one(tls, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await
        });
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let url = format!("https://localhost:{port}/sms");
        let sender =
            HttpCodeSender::with_root_certificates(config(url.clone(), None, 5000), roots).unwrap();
        sender
            .send(447700900123, "654321", CodeChannel::Sms)
            .await
            .unwrap();
        let seen = server.await.unwrap();
        assert!(seen.head.starts_with("POST /sms HTTP/1.1\r\n"));
        assert_eq!(seen.body["to"], "+447700900123");

        // The same gateway is refused when its certificate is not trusted.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            assert!(
                acceptor.accept(s).await.is_err(),
                "the client must abort the handshake"
            );
        });
        let untrusted = HttpCodeSender::with_root_certificates(
            config(format!("https://localhost:{port}/sms"), None, 5000),
            RootCertStore::empty(),
        )
        .unwrap();
        let err = untrusted
            .send(1, "123456", CodeChannel::Sms)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CodeSendError::Io(m) if m.contains("certificate")),
            "{err}"
        );
        server.await.unwrap();
    }
}
