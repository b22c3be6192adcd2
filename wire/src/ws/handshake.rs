//! The opening handshake (RFC 6455 §4): parse a client's upgrade request and answer it, or build
//! a request and check the server's answer. Heads are bounded; every refusal says what was wrong.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use super::http::{for_each_field, has_exact_token, has_token, head_len, snippet, split_head};
use super::{HANDSHAKE_HEADERS_MAX, HANDSHAKE_HEAD_BYTES_MAX, SUBPROTOCOL, WEBSOCKET_GUID};

/// Longest client-supplied excerpt echoed in an error message, in bytes.
const SNIPPET_BYTES_MAX: usize = 40;

/// Longest rejection body a client waits for and reports, in bytes. Longer (or unannounced)
/// bodies are not waited for; the reason phrase is reported instead.
const REJECTION_BODY_BYTES_MAX: usize = 1024;

/// A valid WebSocket upgrade request, reduced to what the node uses.
///
/// Every `HandshakeRequest` offered [`SUBPROTOCOL`]: [`parse_request`] refuses requests that do
/// not, so [`accept_response`] always selects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeRequest {
    /// The request target as sent: path and query, starting with `/`.
    pub path: String,
    /// The decoded `Sec-WebSocket-Key` (16 bytes).
    pub key: [u8; 16],
    /// The `Host` header.
    pub host: String,
    /// The `Origin` header, sent by browsers.
    pub origin: Option<String>,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
    /// The `X-Forwarded-For` header (several fields joined with `, `). Set by load balancers,
    /// and by anyone else: trust it only from a known proxy.
    pub forwarded_for: Option<String>,
}

/// Why a handshake failed. On the server, answer with [`reject_response`], which uses
/// [`HandshakeError::status`] and this error's message; on the client, report it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The head did not end within [`HANDSHAKE_HEAD_BYTES_MAX`] bytes.
    #[error("handshake head is longer than {} bytes", HANDSHAKE_HEAD_BYTES_MAX)]
    HeadTooLarge,
    /// The head has more than [`HANDSHAKE_HEADERS_MAX`] header fields.
    #[error("handshake has more than {} header fields", HANDSHAKE_HEADERS_MAX)]
    TooManyHeaders,
    /// The bytes do not start like an HTTP request (for instance, TLS on a plain-text port).
    #[error("not an HTTP request (TLS sent to a plain-text port?)")]
    NotHttp,
    /// The request line is not `METHOD SP target SP version`, or the target is not a path.
    #[error("malformed request line: {0}")]
    BadRequestLine(String),
    /// The method is not GET.
    #[error("method {0} is not allowed; a WebSocket handshake is a GET")]
    MethodNotAllowed(String),
    /// The HTTP version is not 1.1.
    #[error("{0} is not supported; a WebSocket handshake needs HTTP/1.1")]
    HttpVersion(String),
    /// A header line is malformed.
    #[error("malformed header line: {0}")]
    BadHeader(String),
    /// A required header is missing.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// A header that must appear once appears more than once.
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// `Upgrade` does not name `websocket`.
    #[error("Upgrade header must be websocket, not {0}")]
    NotWebSocketUpgrade(String),
    /// `Connection` does not hold the `upgrade` token.
    #[error("Connection header must contain upgrade, not {0}")]
    NotConnectionUpgrade(String),
    /// `Sec-WebSocket-Version` is not 13.
    #[error("Sec-WebSocket-Version {0} is not supported; this server speaks 13")]
    UnsupportedVersion(String),
    /// `Sec-WebSocket-Key` is not the base64 encoding of 16 bytes.
    #[error("Sec-WebSocket-Key must be base64 of 16 bytes, not {0}")]
    BadKey(String),
    /// The request does not offer [`SUBPROTOCOL`] in `Sec-WebSocket-Protocol`.
    #[error("subprotocol ringpost.v1 is required: send Sec-WebSocket-Protocol: ringpost.v1")]
    SubprotocolRequired,
    /// The request announces a body; the bytes after an upgrade request are WebSocket frames.
    #[error("a WebSocket handshake must not have a body ({0})")]
    UnexpectedBody(&'static str),
    /// Client side: the response's status line or headers are malformed.
    #[error("malformed handshake response: {0}")]
    BadResponse(String),
    /// Client side: the server answered with another status than 101. `reason` is the first
    /// line of its body if it sent a short one, else its reason phrase.
    #[error("server refused the WebSocket upgrade: {status} {reason}")]
    Rejected {
        /// The server's HTTP status.
        status: u16,
        /// What the server said.
        reason: String,
    },
    /// Client side: `Sec-WebSocket-Accept` does not match the key sent.
    #[error("Sec-WebSocket-Accept does not match the key sent")]
    BadAccept,
    /// Client side: the server did not select [`SUBPROTOCOL`].
    #[error("server did not select subprotocol ringpost.v1 (it sent {0})")]
    SubprotocolNotSelected(String),
    /// Client side: the server enabled extensions, although none was offered.
    #[error("server enabled WebSocket extensions that were not offered: {0}")]
    UnexpectedExtensions(String),
}

impl HandshakeError {
    /// The HTTP status a server answers this error with: 431 for an oversized head, 405 for a
    /// method other than GET, 505 for another HTTP version, 426 for another WebSocket version,
    /// 400 otherwise. For client-side errors: the server's status for [`Self::Rejected`], 502
    /// (a bad answer from upstream) for the others.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge | Self::TooManyHeaders => 431,
            Self::MethodNotAllowed(_) => 405,
            Self::HttpVersion(_) => 505,
            Self::UnsupportedVersion(_) => 426,
            Self::NotHttp
            | Self::BadRequestLine(_)
            | Self::BadHeader(_)
            | Self::MissingHeader(_)
            | Self::DuplicateHeader(_)
            | Self::NotWebSocketUpgrade(_)
            | Self::NotConnectionUpgrade(_)
            | Self::BadKey(_)
            | Self::SubprotocolRequired
            | Self::UnexpectedBody(_) => 400,
            Self::Rejected { status, .. } => *status,
            Self::BadResponse(_)
            | Self::BadAccept
            | Self::SubprotocolNotSelected(_)
            | Self::UnexpectedExtensions(_) => 502,
        }
    }
}

/// Parses a client's upgrade request from the front of `buf`.
///
/// `Ok(None)`: the head has not all arrived; read more and call again with the whole buffer.
/// `Ok(Some((request, consumed)))`: the head is the first `consumed` bytes; anything after it is
/// already WebSocket frames. Errors come as soon as the bytes prove them (a non-HTTP first byte,
/// a bad request line, more than [`HANDSHAKE_HEAD_BYTES_MAX`] bytes without the end of the head);
/// answer them with [`reject_response`] and close.
///
/// Checked: `GET`, `HTTP/1.1`, an origin-form target, `Host`, `Upgrade: websocket`,
/// `Connection` holding `upgrade`, `Sec-WebSocket-Version: 13` (else 426),
/// `Sec-WebSocket-Key` decoding to 16 bytes, `Sec-WebSocket-Protocol` offering [`SUBPROTOCOL`],
/// no body, at most [`HANDSHAKE_HEADERS_MAX`] well-formed header fields. Offered extensions are
/// ignored (none is accepted).
pub fn parse_request(buf: &[u8]) -> Result<Option<(HandshakeRequest, usize)>, HandshakeError> {
    // Refuse non-HTTP bytes (a TLS ClientHello, a stray binary protocol) before waiting for a
    // head that will never come.
    if let Some(&first) = buf.first() {
        if !first.is_ascii_uppercase() {
            return Err(HandshakeError::NotHttp);
        }
    }
    if let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") {
        parse_request_line(&buf[..line_end])?;
    }
    let Some(consumed) = head_len(buf)? else {
        return Ok(None);
    };
    let (line, block) = split_head(&buf[..consumed]);
    let path = parse_request_line(line)?;

    let mut host = None;
    let mut upgrade: Option<&[u8]> = None;
    let mut upgrade_ok = false;
    let mut connection: Option<&[u8]> = None;
    let mut connection_ok = false;
    let mut version = None;
    let mut key = None;
    let mut protocol_ok = false;
    let mut origin = None;
    let mut user_agent = None;
    let mut forwarded_for: Option<String> = None;
    let mut body = None;
    for_each_field(block, |name, value| {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("host") {
            set_once(&mut host, value, "Host")?;
        } else if is("upgrade") {
            upgrade.get_or_insert(value);
            upgrade_ok |= has_token(value, b"websocket");
        } else if is("connection") {
            connection.get_or_insert(value);
            connection_ok |= has_token(value, b"upgrade");
        } else if is("sec-websocket-version") {
            set_once(&mut version, value, "Sec-WebSocket-Version")?;
        } else if is("sec-websocket-key") {
            set_once(&mut key, value, "Sec-WebSocket-Key")?;
        } else if is("sec-websocket-protocol") {
            protocol_ok |= has_exact_token(value, SUBPROTOCOL.as_bytes());
        } else if is("origin") {
            origin.get_or_insert(value);
        } else if is("user-agent") {
            user_agent.get_or_insert(value);
        } else if is("x-forwarded-for") {
            let value = String::from_utf8_lossy(value);
            match forwarded_for.as_mut() {
                Some(joined) => {
                    joined.push_str(", ");
                    joined.push_str(&value);
                }
                None => forwarded_for = Some(value.into_owned()),
            }
        } else if is("transfer-encoding") {
            body = Some("Transfer-Encoding");
        } else if is("content-length") && value != b"0" {
            body = Some("Content-Length");
        }
        Ok(())
    })?;

    if let Some(what) = body {
        return Err(HandshakeError::UnexpectedBody(what));
    }
    let host = host.ok_or(HandshakeError::MissingHeader("Host"))?;
    check_upgrade(upgrade, upgrade_ok, connection, connection_ok)?;
    let version = version.ok_or(HandshakeError::MissingHeader("Sec-WebSocket-Version"))?;
    if version != b"13" {
        return Err(HandshakeError::UnsupportedVersion(snippet(
            version,
            SNIPPET_BYTES_MAX,
        )));
    }
    let key = key.ok_or(HandshakeError::MissingHeader("Sec-WebSocket-Key"))?;
    let key =
        decode_key(key).ok_or_else(|| HandshakeError::BadKey(snippet(key, SNIPPET_BYTES_MAX)))?;
    if !protocol_ok {
        return Err(HandshakeError::SubprotocolRequired);
    }
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let request = HandshakeRequest {
        path,
        key,
        host: text(host),
        origin: origin.map(text),
        user_agent: user_agent.map(text),
        forwarded_for,
    };
    Ok(Some((request, consumed)))
}

/// The `101 Switching Protocols` answer to `request`, selecting [`SUBPROTOCOL`].
pub fn accept_response(request: &HandshakeRequest) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\
         Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\
         \r\n",
        accept_key(&request.key)
    )
    .into_bytes()
}

/// The HTTP answer refusing a handshake: [`HandshakeError::status`], `Connection: close`, and a
/// one-line plain-text body saying what was wrong (with `Sec-WebSocket-Version: 13` on a 426
/// and `Allow: GET` on a 405). Close the connection after writing it.
pub fn reject_response(error: &HandshakeError) -> Vec<u8> {
    let status = error.status();
    let body = format!("{error}\n");
    let extra = match status {
        426 => "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n",
        405 => "Allow: GET\r\n",
        _ => "",
    };
    format!(
        "HTTP/1.1 {status} {}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         {extra}\
         \r\n\
         {body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(base64(key) + GUID)) (RFC 6455 §4.2.2).
pub fn accept_key(key: &[u8; 16]) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(BASE64.encode(key).as_bytes());
    sha1.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha1.finalize())
}

/// A client's upgrade request for `path` on `host`, offering [`SUBPROTOCOL`], with `key` (16
/// random bytes, fresh per connection) as `Sec-WebSocket-Key`.
///
/// `host` may include a port. An empty `path` becomes `/`, a missing leading `/` is added, and
/// bytes that may not appear in a request line (controls, spaces, non-ASCII) are
/// percent-encoded in both, so an address taken from a redirect cannot inject header lines.
pub fn client_request(host: &str, path: &str, key: [u8; 16]) -> Vec<u8> {
    let slash = if path.starts_with('/') { "" } else { "/" };
    format!(
        "GET {slash}{} HTTP/1.1\r\n\
         Host: {}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\
         \r\n",
        percent_encode_unsafe(path),
        percent_encode_unsafe(host),
        BASE64.encode(key)
    )
    .into_bytes()
}

/// Checks the server's answer to [`client_request`] with the same `key`.
///
/// `Ok(None)`: read more and call again with the whole buffer. `Ok(Some(consumed))`: the
/// connection is a WebSocket from byte `consumed` on (those bytes may already hold frames).
/// Checked: status 101, `Upgrade: websocket`, `Connection: upgrade`, the accept hash,
/// [`SUBPROTOCOL`] selected, no extensions. Another status is [`HandshakeError::Rejected`],
/// reported once a short body (the server's explanation) has arrived.
pub fn parse_response(buf: &[u8], key: [u8; 16]) -> Result<Option<usize>, HandshakeError> {
    let Some(consumed) = head_len(buf)? else {
        return Ok(None);
    };
    let (line, block) = split_head(&buf[..consumed]);
    let (status, phrase) = parse_status_line(line)?;

    let mut upgrade: Option<&[u8]> = None;
    let mut upgrade_ok = false;
    let mut connection: Option<&[u8]> = None;
    let mut connection_ok = false;
    let mut accept = None;
    let mut protocol = None;
    let mut extensions = None;
    let mut content_length: Option<usize> = None;
    for_each_field(block, |name, value| {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("upgrade") {
            upgrade.get_or_insert(value);
            upgrade_ok |= has_token(value, b"websocket");
        } else if is("connection") {
            connection.get_or_insert(value);
            connection_ok |= has_token(value, b"upgrade");
        } else if is("sec-websocket-accept") {
            set_once(&mut accept, value, "Sec-WebSocket-Accept")?;
        } else if is("sec-websocket-protocol") {
            set_once(&mut protocol, value, "Sec-WebSocket-Protocol")?;
        } else if is("sec-websocket-extensions") {
            extensions.get_or_insert(value);
        } else if is("content-length") {
            content_length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        }
        Ok(())
    })?;

    if status != 101 {
        let reason = match content_length {
            Some(len) if len <= REJECTION_BODY_BYTES_MAX => {
                let Some(body) = buf.get(consumed..consumed + len) else {
                    return Ok(None);
                };
                let first_line = body.split(|&b| b == b'\n').next().unwrap_or_default();
                snippet(first_line.trim_ascii(), 200)
            }
            _ => snippet(phrase, SNIPPET_BYTES_MAX),
        };
        let reason = if reason.is_empty() {
            snippet(phrase, SNIPPET_BYTES_MAX)
        } else {
            reason
        };
        return Err(HandshakeError::Rejected { status, reason });
    }
    check_upgrade(upgrade, upgrade_ok, connection, connection_ok)?;
    let accept = accept.ok_or(HandshakeError::MissingHeader("Sec-WebSocket-Accept"))?;
    if accept != accept_key(&key).as_bytes() {
        return Err(HandshakeError::BadAccept);
    }
    match protocol {
        Some(p) if p == SUBPROTOCOL.as_bytes() => {}
        Some(p) => {
            return Err(HandshakeError::SubprotocolNotSelected(snippet(
                p,
                SNIPPET_BYTES_MAX,
            )))
        }
        None => return Err(HandshakeError::SubprotocolNotSelected("none".into())),
    }
    if let Some(ext) = extensions {
        return Err(HandshakeError::UnexpectedExtensions(snippet(
            ext,
            SNIPPET_BYTES_MAX,
        )));
    }
    Ok(Some(consumed))
}

/// Checks `GET SP origin-form SP HTTP/1.1` and returns the target.
fn parse_request_line(line: &[u8]) -> Result<String, HandshakeError> {
    let bad = || HandshakeError::BadRequestLine(snippet(line, SNIPPET_BYTES_MAX));
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.iter().all(u8::is_ascii_uppercase) {
        return Err(bad());
    }
    if method != b"GET" {
        return Err(HandshakeError::MethodNotAllowed(snippet(
            method,
            SNIPPET_BYTES_MAX,
        )));
    }
    if !version.starts_with(b"HTTP/") {
        return Err(bad());
    }
    if version != b"HTTP/1.1" {
        return Err(HandshakeError::HttpVersion(snippet(
            version,
            SNIPPET_BYTES_MAX,
        )));
    }
    if target.first() != Some(&b'/') || !target.iter().all(|&b| (0x21..0x7f).contains(&b)) {
        return Err(bad());
    }
    // All visible ASCII, checked above.
    Ok(String::from_utf8_lossy(target).into_owned())
}

/// Checks `HTTP/1.x SP 3DIGIT [SP reason]` and returns the status and reason phrase.
fn parse_status_line(line: &[u8]) -> Result<(u16, &[u8]), HandshakeError> {
    let bad = || HandshakeError::BadResponse(snippet(line, SNIPPET_BYTES_MAX));
    let rest = line.strip_prefix(b"HTTP/1.").ok_or_else(bad)?;
    let &[minor, b' ', d0, d1, d2, ref tail @ ..] = rest else {
        return Err(bad());
    };
    if !minor.is_ascii_digit() || ![d0, d1, d2].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let phrase = match tail {
        [] => &[][..],
        [b' ', phrase @ ..] => phrase,
        _ => return Err(bad()),
    };
    let digit = |d: u8| u16::from(d - b'0');
    Ok((digit(d0) * 100 + digit(d1) * 10 + digit(d2), phrase))
}

/// The `Upgrade` and `Connection` checks shared by request and response.
fn check_upgrade(
    upgrade: Option<&[u8]>,
    upgrade_ok: bool,
    connection: Option<&[u8]>,
    connection_ok: bool,
) -> Result<(), HandshakeError> {
    match upgrade {
        None => return Err(HandshakeError::MissingHeader("Upgrade")),
        Some(value) if !upgrade_ok => {
            return Err(HandshakeError::NotWebSocketUpgrade(snippet(
                value,
                SNIPPET_BYTES_MAX,
            )))
        }
        Some(_) => {}
    }
    match connection {
        None => Err(HandshakeError::MissingHeader("Connection")),
        Some(value) if !connection_ok => Err(HandshakeError::NotConnectionUpgrade(snippet(
            value,
            SNIPPET_BYTES_MAX,
        ))),
        Some(_) => Ok(()),
    }
}

fn set_once<'a>(
    slot: &mut Option<&'a [u8]>,
    value: &'a [u8],
    name: &'static str,
) -> Result<(), HandshakeError> {
    if slot.replace(value).is_some() {
        return Err(HandshakeError::DuplicateHeader(name));
    }
    Ok(())
}

/// The 16 bytes of a `Sec-WebSocket-Key`, if it is their canonical base64 (24 characters).
fn decode_key(value: &[u8]) -> Option<[u8; 16]> {
    if value.len() != 24 {
        return None;
    }
    let mut key = [0u8; 18];
    match BASE64.decode_slice(value, &mut key) {
        Ok(16) => key[..16].try_into().ok(),
        _ => None,
    }
}

/// Percent-encodes every byte outside visible ASCII, so the text cannot break a request line.
fn percent_encode_unsafe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x21..0x7f).contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_must_be_canonical_base64_of_16_bytes() {
        assert_eq!(
            decode_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            Some(*b"the sample nonce")
        );
        for bad in [
            &b""[..],
            b"dGhlIHNhbXBsZSBub25jZQ",   // unpadded
            b"dGhlIHNhbXBsZSBub25jZR==", // non-zero trailing bits
            b"dGhlIHNhbXBsZSBub25jZXg=", // 17 bytes
            b"dGhlIHNhbXBsZSBub25j",     // 15 bytes
            b"dGhlIHNhbXBsZSBub25jZQ==AAAA",
            b"!!!!!!!!!!!!!!!!!!!!!!==",
        ] {
            assert_eq!(decode_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 101 Switching Protocols"),
            Ok((101, &b"Switching Protocols"[..]))
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 101"), Ok((101, &b""[..])));
        for bad in [
            &b"HTTP/1.1 10"[..],
            b"HTTP/2 101 x",
            b"HTTP/1.1 1x1 x",
            b"HTTP/1.1 1011",
        ] {
            assert!(parse_status_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line(b"GET /ws?v=1 HTTP/1.1"),
            Ok("/ws?v=1".into())
        );
        assert!(matches!(
            parse_request_line(b"POST / HTTP/1.1"),
            Err(HandshakeError::MethodNotAllowed(m)) if m == "POST"
        ));
        assert!(matches!(
            parse_request_line(b"GET / HTTP/1.0"),
            Err(HandshakeError::HttpVersion(_))
        ));
        for bad in [
            &b"GET /"[..],
            b"GET  / HTTP/1.1",
            b"GET / HTTP/1.1 x",
            b"GET http://h/ HTTP/1.1",
            b"GET / FTP/1.1",
            b"get / HTTP/1.1",
        ] {
            assert!(
                matches!(
                    parse_request_line(bad),
                    Err(HandshakeError::BadRequestLine(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn percent_encoding_keeps_lines_intact() {
        assert_eq!(percent_encode_unsafe("/a b\r\nX: y"), "/a%20b%0D%0AX:%20y");
        assert_eq!(percent_encode_unsafe("é"), "%C3%A9");
    }
}
