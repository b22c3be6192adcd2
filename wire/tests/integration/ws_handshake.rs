//! WebSocket opening handshake (`ringpost_wire::ws`): the RFC 6455 §1.3 example, real browser
//! and load-balancer requests, every refusal and its HTTP answer, the client side, and garbage.

use proptest::prelude::*;
use ringpost_wire::ws::{
    accept_key, accept_response, client_request, parse_request, parse_response, reject_response,
    HandshakeError, HandshakeRequest, HANDSHAKE_HEAD_BYTES_MAX, SUBPROTOCOL,
};

const CHROME: &str = "GET /ws HTTP/1.1\r\n\
Host: chat.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://web.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
Sec-WebSocket-Protocol: ringpost.v1\r\n\
\r\n";

const FIREFOX: &str = "GET /ws?v=1 HTTP/1.1\r\n\
Host: chat.example.com:8443\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0\r\n\
Accept: */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Sec-WebSocket-Version: 13\r\n\
Origin: https://web.example.com\r\n\
Sec-WebSocket-Protocol: chat, ringpost.v1\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Connection: keep-alive, Upgrade\r\n\
Sec-Fetch-Dest: empty\r\n\
Sec-Fetch-Mode: websocket\r\n\
Sec-Fetch-Site: same-site\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
Upgrade: websocket\r\n\
\r\n";

/// As forwarded by a load balancer that lowercases names and appends X-Forwarded-For.
const BEHIND_LB: &str = "GET / HTTP/1.1\r\n\
host: chat.example.com\r\n\
x-forwarded-for: 203.0.113.7\r\n\
x-forwarded-proto: https\r\n\
x-forwarded-port: 443\r\n\
x-amzn-trace-id: Root=1-65f0a1b2-0123456789abcdef01234567\r\n\
upgrade: WebSocket\r\n\
connection: upgrade\r\n\
sec-websocket-version:13\r\n\
sec-websocket-key:   AQIDBAUGBwgJCgsMDQ4PEA==  \r\n\
sec-websocket-protocol: ringpost.v1\r\n\
x-forwarded-for: 10.0.0.2\r\n\
\r\n";

/// A predicate on the error a case must produce.
type Check = fn(&HandshakeError) -> bool;

/// A minimal valid request with `edit` applied to its header lines.
fn request_with(edit: impl FnOnce(&mut Vec<String>)) -> Vec<u8> {
    let mut lines: Vec<String> = [
        "Host: h",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Protocol: ringpost.v1",
    ]
    .map(String::from)
    .to_vec();
    edit(&mut lines);
    let mut out = String::from("GET /ws HTTP/1.1\r\n");
    for line in lines {
        out.push_str(&line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

fn without(name: &str) -> Vec<u8> {
    request_with(|lines| lines.retain(|l| !l.starts_with(&format!("{name}:"))))
}

fn replaced(name: &str, value: &str) -> Vec<u8> {
    request_with(|lines| {
        for line in lines.iter_mut() {
            if line.starts_with(&format!("{name}:")) {
                *line = format!("{name}: {value}");
            }
        }
    })
}

fn parse_ok(bytes: &[u8]) -> (HandshakeRequest, usize) {
    match parse_request(bytes) {
        Ok(Some(parsed)) => parsed,
        other => panic!("{other:?} for {}", String::from_utf8_lossy(bytes)),
    }
}

fn parse_err(bytes: &[u8]) -> HandshakeError {
    match parse_request(bytes) {
        Err(error) => error,
        other => panic!("{other:?} for {}", String::from_utf8_lossy(bytes)),
    }
}

/// Splits an HTTP response into status, header lines and body; checks it is well formed.
fn split_response(bytes: &[u8]) -> (u16, Vec<String>, String) {
    let text = std::str::from_utf8(bytes).expect("responses are UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = status_line[9..12].parse().unwrap();
    (status, lines.map(String::from).collect(), body.to_owned())
}

// --- RFC 6455 §1.3 and real requests -----------------------------------------------------

#[test]
fn rfc_accept_key() {
    // "dGhlIHNhbXBsZSBub25jZQ==" is base64 of "the sample nonce".
    assert_eq!(
        accept_key(b"the sample nonce"),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
}

#[test]
fn rfc_example_request_without_our_subprotocol_is_refused() {
    let rfc = "GET /chat HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";
    let error = parse_err(rfc.as_bytes());
    assert_eq!(error, HandshakeError::SubprotocolRequired);
    let (status, _, body) = split_response(&reject_response(&error));
    assert_eq!(status, 400);
    assert!(body.contains("ringpost.v1"), "{body}");
    let offered = rfc.replace("chat, superchat", "chat, superchat, ringpost.v1");
    let (request, _) = parse_ok(offered.as_bytes());
    let response = String::from_utf8(accept_response(&request)).unwrap();
    assert!(response.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
}

#[test]
fn chrome_request() {
    let (request, consumed) = parse_ok(CHROME.as_bytes());
    assert_eq!(consumed, CHROME.len());
    assert_eq!(request.path, "/ws");
    assert_eq!(request.host, "chat.example.com");
    assert_eq!(request.origin.as_deref(), Some("https://web.example.com"));
    assert!(request
        .user_agent
        .as_deref()
        .unwrap()
        .contains("Chrome/124"));
    assert_eq!(request.forwarded_for, None);
    let (status, headers, body) = split_response(&accept_response(&request));
    assert_eq!(status, 101);
    assert!(body.is_empty());
    for want in [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Accept: HSmrc0sMlYUkAGmm5OPpG2HaGWk=",
        "Sec-WebSocket-Protocol: ringpost.v1",
    ] {
        assert!(
            headers.iter().any(|h| h == want),
            "{want} missing from {headers:?}"
        );
    }
    assert!(
        !headers
            .iter()
            .any(|h| h.starts_with("Sec-WebSocket-Extensions")),
        "no extension is accepted"
    );
}

#[test]
fn firefox_request() {
    let (request, consumed) = parse_ok(FIREFOX.as_bytes());
    assert_eq!(consumed, FIREFOX.len());
    assert_eq!(request.path, "/ws?v=1");
    assert_eq!(request.host, "chat.example.com:8443");
    assert_eq!(&request.key, b"the sample nonce");
}

#[test]
fn request_behind_a_load_balancer() {
    let (request, _) = parse_ok(BEHIND_LB.as_bytes());
    assert_eq!(
        request.forwarded_for.as_deref(),
        Some("203.0.113.7, 10.0.0.2")
    );
    assert_eq!(
        request.key,
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    );
    assert_eq!(request.user_agent, None);
}

#[test]
fn every_prefix_needs_more_bytes() {
    for request in [CHROME, FIREFOX, BEHIND_LB] {
        for end in 0..request.len() {
            assert_eq!(
                parse_request(&request.as_bytes()[..end]),
                Ok(None),
                "prefix of {end}"
            );
        }
    }
}

#[test]
fn pipelined_bytes_after_the_head_are_not_consumed() {
    let mut bytes = CHROME.as_bytes().to_vec();
    let frame = [0x82, 0x83, 1, 2, 3, 4, 9, 9, 9];
    bytes.extend_from_slice(&frame);
    let (_, consumed) = parse_ok(&bytes);
    assert_eq!(consumed, CHROME.len());
    assert_eq!(&bytes[consumed..], frame);
    // Even when the trailing bytes contain another blank line.
    bytes.extend_from_slice(b"\r\n\r\n");
    assert_eq!(parse_ok(&bytes).1, CHROME.len());
}

// --- refusals ----------------------------------------------------------------------------

#[test]
fn missing_headers() {
    for name in [
        "Host",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Key",
    ] {
        let error = parse_err(&without(name));
        assert_eq!(error, HandshakeError::MissingHeader(name));
        assert_eq!(error.status(), 400);
    }
    assert_eq!(
        parse_err(&without("Sec-WebSocket-Protocol")),
        HandshakeError::SubprotocolRequired
    );
}

#[test]
fn wrong_header_values() {
    let cases: [(&str, &str, Check); 9] = [
        (
            "Upgrade",
            "h2c",
            |e| matches!(e, HandshakeError::NotWebSocketUpgrade(v) if v == "h2c"),
        ),
        ("Upgrade", "websockets", |e| {
            matches!(e, HandshakeError::NotWebSocketUpgrade(_))
        }),
        ("Connection", "keep-alive", |e| {
            matches!(e, HandshakeError::NotConnectionUpgrade(_))
        }),
        ("Connection", "upgraded", |e| {
            matches!(e, HandshakeError::NotConnectionUpgrade(_))
        }),
        ("Sec-WebSocket-Key", "c2hvcnQ=", |e| {
            matches!(e, HandshakeError::BadKey(_))
        }),
        ("Sec-WebSocket-Key", "not base64 at all!!!!!!!", |e| {
            matches!(e, HandshakeError::BadKey(_))
        }),
        ("Sec-WebSocket-Protocol", "Ringpost.V1", |e| {
            *e == HandshakeError::SubprotocolRequired
        }),
        ("Sec-WebSocket-Protocol", "ringpost.v2", |e| {
            *e == HandshakeError::SubprotocolRequired
        }),
        ("Sec-WebSocket-Version", "13, 8", |e| {
            matches!(e, HandshakeError::UnsupportedVersion(_))
        }),
    ];
    for (name, value, check) in cases {
        let error = parse_err(&replaced(name, value));
        assert!(check(&error), "{name}: {value} gave {error:?}");
    }
}

#[test]
fn case_insensitive_values_are_accepted() {
    parse_ok(&replaced("Upgrade", "WebSocket"));
    parse_ok(&replaced("Connection", "keep-alive, UPGRADE"));
    parse_ok(&replaced("Sec-WebSocket-Protocol", "a,ringpost.v1 , b"));
    parse_ok(&request_with(|l| {
        l.push("Sec-WebSocket-Protocol: other".into())
    }));
}

#[test]
fn wrong_version_is_426_with_the_supported_version() {
    let error = parse_err(&replaced("Sec-WebSocket-Version", "8"));
    assert_eq!(error, HandshakeError::UnsupportedVersion("8".into()));
    let (status, headers, body) = split_response(&reject_response(&error));
    assert_eq!(status, 426);
    assert!(
        headers.iter().any(|h| h == "Sec-WebSocket-Version: 13"),
        "{headers:?}"
    );
    assert!(body.contains("13"), "{body}");
}

#[test]
fn duplicate_single_headers() {
    for (name, line) in [
        (
            "Sec-WebSocket-Key",
            "sec-websocket-key: AQIDBAUGBwgJCgsMDQ4PEA==",
        ),
        ("Host", "HOST: other"),
        ("Sec-WebSocket-Version", "Sec-WebSocket-Version: 13"),
    ] {
        let error = parse_err(&request_with(|l| l.push(line.into())));
        assert_eq!(error, HandshakeError::DuplicateHeader(name));
    }
}

#[test]
fn method_version_and_target() {
    let swap = |from: &str, to: &str| {
        let text = String::from_utf8(request_with(|_| {})).unwrap();
        text.replacen(from, to, 1).into_bytes()
    };
    let error = parse_err(&swap("GET ", "POST "));
    assert_eq!(error, HandshakeError::MethodNotAllowed("POST".into()));
    let (status, headers, _) = split_response(&reject_response(&error));
    assert_eq!(
        (status, headers.contains(&"Allow: GET".to_string())),
        (405, true)
    );
    let error = parse_err(&swap("HTTP/1.1", "HTTP/1.0"));
    assert_eq!(error, HandshakeError::HttpVersion("HTTP/1.0".into()));
    assert_eq!(error.status(), 505);
    for (from, to) in [
        ("/ws", "ws"),
        ("/ws", "http://h/ws"),
        ("/ws", "/w s"),
        ("HTTP/1.1", "HTTP/1.1 extra"),
    ] {
        assert!(
            matches!(
                parse_err(&swap(from, to)),
                HandshakeError::BadRequestLine(_)
            ),
            "{to}"
        );
    }
}

#[test]
fn a_bad_request_line_is_refused_before_the_head_completes() {
    assert_eq!(
        parse_request(b"POST /ws HTTP/1.1\r\nHost"),
        Err(HandshakeError::MethodNotAllowed("POST".into()))
    );
    // A TLS ClientHello on the plain-text port: refused on its first byte.
    assert_eq!(
        parse_request(&[0x16, 0x03, 0x01]),
        Err(HandshakeError::NotHttp)
    );
    assert_eq!(parse_request(b"\r\n"), Err(HandshakeError::NotHttp));
}

#[test]
fn bodies_are_refused() {
    let error = parse_err(&request_with(|l| l.push("Content-Length: 5".into())));
    assert_eq!(error, HandshakeError::UnexpectedBody("Content-Length"));
    let error = parse_err(&request_with(|l| {
        l.push("Transfer-Encoding: chunked".into())
    }));
    assert_eq!(error, HandshakeError::UnexpectedBody("Transfer-Encoding"));
    parse_ok(&request_with(|l| l.push("Content-Length: 0".into())));
}

#[test]
fn malformed_header_lines() {
    for line in [
        "No colon here",
        " Folded: continuation",
        "Bad Name: x",
        "X: a\u{1}b",
    ] {
        let error = parse_err(&request_with(|l| l.insert(1, line.into())));
        assert!(
            matches!(error, HandshakeError::BadHeader(_)),
            "{line}: {error:?}"
        );
    }
}

#[test]
fn oversize_heads_are_refused() {
    // A head that never ends is refused once the limit is reached, not buffered forever.
    let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
    endless.resize(HANDSHAKE_HEAD_BYTES_MAX - 1, b'a');
    assert_eq!(parse_request(&endless), Ok(None));
    endless.push(b'a');
    assert_eq!(parse_request(&endless), Err(HandshakeError::HeadTooLarge));
    // A complete head just over the limit.
    let big = request_with(|l| l.push(format!("X-Big: {}", "a".repeat(HANDSHAKE_HEAD_BYTES_MAX))));
    let error = parse_err(&big);
    assert_eq!(error, HandshakeError::HeadTooLarge);
    assert_eq!(split_response(&reject_response(&error)).0, 431);
    // A head that ends exactly at the limit is fine.
    let base = request_with(|_| {}).len();
    let filler = HANDSHAKE_HEAD_BYTES_MAX - base - "X-Fill: \r\n".len();
    let exact = request_with(|l| l.push(format!("X-Fill: {}", "a".repeat(filler))));
    assert_eq!(exact.len(), HANDSHAKE_HEAD_BYTES_MAX);
    assert_eq!(parse_ok(&exact).1, HANDSHAKE_HEAD_BYTES_MAX);
}

#[test]
fn too_many_headers_are_refused() {
    let at_limit = request_with(|l| (0..58).for_each(|i| l.push(format!("X-{i}: v"))));
    parse_ok(&at_limit); // 6 + 58 = 64 fields
    let over = request_with(|l| (0..59).for_each(|i| l.push(format!("X-{i}: v"))));
    let error = parse_err(&over);
    assert_eq!(error, HandshakeError::TooManyHeaders);
    assert_eq!(error.status(), 431);
}

#[test]
fn every_rejection_is_a_well_formed_closing_response_with_one_line() {
    let errors = [
        HandshakeError::HeadTooLarge,
        HandshakeError::TooManyHeaders,
        HandshakeError::NotHttp,
        parse_err(b"GET /\x7f HTTP/1.1\r\n"),
        HandshakeError::MethodNotAllowed("PUT".into()),
        HandshakeError::HttpVersion("HTTP/1.0".into()),
        parse_err(&request_with(|l| l.push("Evil\r: \x1b[31m".into()))),
        HandshakeError::MissingHeader("Host"),
        HandshakeError::DuplicateHeader("Host"),
        parse_err(&replaced("Upgrade", "\"quoted\"\\")),
        HandshakeError::NotConnectionUpgrade("close".into()),
        HandshakeError::UnsupportedVersion("8".into()),
        parse_err(&replaced("Sec-WebSocket-Key", &"k".repeat(500))),
        HandshakeError::SubprotocolRequired,
        HandshakeError::UnexpectedBody("Content-Length"),
    ];
    for error in errors {
        let response = reject_response(&error);
        let (status, headers, body) = split_response(&response);
        assert_eq!(status, error.status());
        assert!((400..600).contains(&status));
        assert!(
            headers.contains(&"Connection: close".to_string()),
            "{headers:?}"
        );
        assert!(headers.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body, format!("{error}\n"));
        assert!(body.len() < 200, "{body}");
        assert!(
            body[..body.len() - 1].chars().all(|c| !c.is_control()),
            "one clean line: {body:?}"
        );
    }
}

// --- client side -------------------------------------------------------------------------

const KEY: [u8; 16] = *b"the sample nonce";

fn server_accepts(key: [u8; 16]) -> Vec<u8> {
    let (request, _) = parse_ok(&client_request("h", "/ws", key));
    accept_response(&request)
}

#[test]
fn client_request_is_accepted_by_the_server() {
    let bytes = client_request("chat.example.com:443", "/ws?v=1", KEY);
    let (request, consumed) = parse_ok(&bytes);
    assert_eq!(consumed, bytes.len());
    assert_eq!(request.key, KEY);
    assert_eq!(request.host, "chat.example.com:443");
    assert_eq!(request.path, "/ws?v=1");
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.contains("\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
    assert!(text.contains(&format!("\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n")));
}

#[test]
fn client_request_cannot_be_used_to_inject_headers() {
    let bytes = client_request("evil\r\nX-Injected: 1", "x y\r\n", KEY);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(!text.contains("\r\nX-Injected"), "{text}");
    let (request, _) = parse_ok(&bytes);
    assert_eq!(request.path, "/x%20y%0D%0A");
    assert_eq!(parse_ok(&client_request("h", "", KEY)).0.path, "/");
}

#[test]
fn client_accepts_the_servers_answer_and_keeps_pipelined_frames() {
    let mut response = server_accepts(KEY);
    let head = response.len();
    assert_eq!(parse_response(&response, KEY), Ok(Some(head)));
    for end in 0..head {
        assert_eq!(parse_response(&response[..end], KEY), Ok(None));
    }
    response.extend_from_slice(&[0x82, 0x01, 0x2a]);
    assert_eq!(parse_response(&response, KEY), Ok(Some(head)));
}

#[test]
fn client_checks_the_accept_hash() {
    let response = server_accepts(KEY);
    let mut other = KEY;
    other[0] ^= 1;
    assert_eq!(
        parse_response(&response, other),
        Err(HandshakeError::BadAccept)
    );
}

#[test]
fn client_checks_status_upgrade_subprotocol_and_extensions() {
    let good = String::from_utf8(server_accepts(KEY)).unwrap();
    let cases: [(&str, &str, Check); 6] = [
        (
            "Sec-WebSocket-Protocol: ringpost.v1\r\n",
            "",
            |e| matches!(e, HandshakeError::SubprotocolNotSelected(v) if v == "none"),
        ),
        (
            "Sec-WebSocket-Protocol: ringpost.v1",
            "Sec-WebSocket-Protocol: chat",
            |e| matches!(e, HandshakeError::SubprotocolNotSelected(v) if v == "chat"),
        ),
        ("Upgrade: websocket\r\n", "", |e| {
            *e == HandshakeError::MissingHeader("Upgrade")
        }),
        ("Connection: Upgrade", "Connection: close", |e| {
            matches!(e, HandshakeError::NotConnectionUpgrade(_))
        }),
        (
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
            |e| matches!(e, HandshakeError::UnexpectedExtensions(_)),
        ),
        ("HTTP/1.1 101", "HTTP/1.1 200", |e| {
            matches!(e, HandshakeError::Rejected { status: 200, .. })
        }),
    ];
    for (from, to, check) in cases {
        let response = good.replacen(from, to, 1);
        let error = parse_response(response.as_bytes(), KEY).unwrap_err();
        assert!(check(&error), "{from:?} -> {to:?}: {error:?}");
    }
    let error = parse_response(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", KEY).unwrap_err();
    assert!(matches!(error, HandshakeError::BadResponse(_)), "{error:?}");
    assert_eq!(error.status(), 502);
}

#[test]
fn client_reports_the_servers_reason_for_a_refusal() {
    let response = reject_response(&HandshakeError::SubprotocolRequired);
    let error = parse_response(&response, KEY).unwrap_err();
    let HandshakeError::Rejected { status, reason } = &error else {
        panic!("{error:?}");
    };
    assert_eq!(*status, 400);
    assert_eq!(*reason, HandshakeError::SubprotocolRequired.to_string());
    assert!(error.to_string().contains("ringpost.v1"), "{error}");
    // The body is waited for, since it was announced and is short.
    let head = response.len() - reason.len() - 1;
    assert_eq!(parse_response(&response[..head + 3], KEY), Ok(None));
    // Without a body the reason phrase is reported.
    let bare = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(
        parse_response(bare, KEY),
        Err(HandshakeError::Rejected {
            status: 503,
            reason: "Service Unavailable".into()
        })
    );
}

// --- properties --------------------------------------------------------------------------

proptest! {
    #[test]
    fn client_and_server_agree(
        key in any::<[u8; 16]>(),
        host in "[a-z0-9.-]{1,30}(:[0-9]{1,5})?",
        path in "(/[a-zA-Z0-9._~%?=&-]{0,20}){0,4}",
    ) {
        let (request, consumed) = parse_request(&client_request(&host, &path, key)).unwrap().unwrap();
        prop_assert_eq!(request.key, key);
        prop_assert_eq!(&request.host, &host);
        let want_path = if path.is_empty() { "/".to_string() } else { path };
        prop_assert_eq!(&request.path, &want_path);
        prop_assert!(consumed > 0);
        let response = accept_response(&request);
        prop_assert_eq!(parse_response(&response, key), Ok(Some(response.len())));
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        if let Ok(Some((_, consumed))) = parse_request(&bytes) {
            prop_assert!(consumed <= bytes.len());
        }
        if let Ok(Some(consumed)) = parse_response(&bytes, KEY) {
            prop_assert!(consumed <= bytes.len());
        }
    }

    /// Valid requests and responses with a few bytes overwritten, inserted or removed never
    /// panic, and any refusal renders a well-formed response.
    #[test]
    fn mutated_handshakes_never_panic(
        which in 0..4usize,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let mut bytes = match which {
            0 => CHROME.as_bytes().to_vec(),
            1 => FIREFOX.as_bytes().to_vec(),
            2 => BEHIND_LB.as_bytes().to_vec(),
            _ => server_accepts(KEY),
        };
        for (index, byte, kind) in edits {
            let at = index.index(bytes.len());
            match kind {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => { bytes.remove(at); }
            }
        }
        match parse_request(&bytes) {
            Ok(Some((_, consumed))) => prop_assert!(consumed <= bytes.len()),
            Ok(None) => {}
            Err(error) => {
                let (status, _, body) = split_response(&reject_response(&error));
                prop_assert_eq!(status, error.status());
                prop_assert!(body.ends_with('\n') && !body[..body.len() - 1].contains(['\r', '\n']));
            }
        }
        let _ = parse_response(&bytes, KEY);
    }
}
