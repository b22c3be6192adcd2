//! The sliver of HTTP/1.1 the opening handshake needs: finding a bounded head, walking its
//! header fields in one pass without allocating, and comma-separated token lists.

use super::handshake::HandshakeError;
use super::{HANDSHAKE_HEADERS_MAX, HANDSHAKE_HEAD_BYTES_MAX};

/// The length of the head at the front of `buf` (through the empty line), `None` if it has not
/// all arrived, or an error once [`HANDSHAKE_HEAD_BYTES_MAX`] bytes have arrived without its end.
pub(super) fn head_len(buf: &[u8]) -> Result<Option<usize>, HandshakeError> {
    let window = &buf[..buf.len().min(HANDSHAKE_HEAD_BYTES_MAX)];
    match window.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(pos) => Ok(Some(pos + 4)),
        None if buf.len() >= HANDSHAKE_HEAD_BYTES_MAX => Err(HandshakeError::HeadTooLarge),
        None => Ok(None),
    }
}

/// Splits a complete head into its first line and the header block (each header line followed
/// by CRLF; the final empty line removed).
pub(super) fn split_head(head: &[u8]) -> (&[u8], &[u8]) {
    // A complete head ends with CRLF CRLF, so it holds at least one CRLF.
    let first_end = find_crlf(head).unwrap_or(head.len());
    let first = &head[..first_end];
    let rest_start = (first_end + 2).min(head.len());
    let rest_end = head.len().saturating_sub(2).max(rest_start);
    (first, &head[rest_start..rest_end])
}

/// Calls `field` with each header field's name and value (optional whitespace trimmed), after
/// checking the line's syntax and the field count. Names are tokens; values hold no control
/// characters but HTAB; obsolete line folding is refused.
pub(super) fn for_each_field<'a>(
    block: &'a [u8],
    mut field: impl FnMut(&'a [u8], &'a [u8]) -> Result<(), HandshakeError>,
) -> Result<(), HandshakeError> {
    let mut rest = block;
    let mut count = 0;
    while !rest.is_empty() {
        let end = find_crlf(rest).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[(end + 2).min(rest.len())..];
        count += 1;
        if count > HANDSHAKE_HEADERS_MAX {
            return Err(HandshakeError::TooManyHeaders);
        }
        let colon = line.iter().position(|&b| b == b':');
        let (name, value) = match colon {
            Some(i) if i > 0 && line[..i].iter().all(|&b| is_tchar(b)) => {
                (&line[..i], &line[i + 1..])
            }
            _ => return Err(HandshakeError::BadHeader(snippet(line, 40))),
        };
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(HandshakeError::BadHeader(snippet(line, 40)));
        }
        field(name, value.trim_ascii())?;
    }
    Ok(())
}

/// Whether the comma-separated list `value` holds `token`, compared case-insensitively.
pub(super) fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the comma-separated list `value` holds `token` exactly (subprotocol names are
/// compared case-sensitively).
pub(super) fn has_exact_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii() == token)
}

/// Client-supplied bytes made safe to echo in a one-line message: at most `max` bytes, with
/// control, quote and non-ASCII bytes escaped.
pub(super) fn snippet(bytes: &[u8], max: usize) -> String {
    let shown = &bytes[..bytes.len().min(max)];
    let mut out = shown.escape_ascii().to_string();
    if shown.len() < bytes.len() {
        out.push_str("...");
    }
    out
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// RFC 9110 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_len_finds_the_empty_line() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r\nrest"), Ok(Some(18)));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\n\r"), Ok(None));
        assert_eq!(head_len(b""), Ok(None));
    }

    #[test]
    fn head_len_is_bounded() {
        let mut head = vec![b'a'; HANDSHAKE_HEAD_BYTES_MAX - 4];
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head_len(&head), Ok(Some(HANDSHAKE_HEAD_BYTES_MAX)));
        let mut head = vec![b'a'; HANDSHAKE_HEAD_BYTES_MAX - 3];
        assert_eq!(head_len(&head), Ok(None));
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head_len(&head), Err(HandshakeError::HeadTooLarge));
    }

    #[test]
    fn split_head_and_fields() {
        let (first, block) = split_head(b"GET / HTTP/1.1\r\nA: 1\r\nB:2 \r\n\r\n");
        assert_eq!(first, b"GET / HTTP/1.1");
        let mut seen = Vec::new();
        for_each_field(block, |n, v| {
            seen.push((n.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (b"A".to_vec(), b"1".to_vec()),
                (b"B".to_vec(), b"2".to_vec())
            ]
        );
        let (first, block) = split_head(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!((first, block), (&b"GET / HTTP/1.1"[..], &b""[..]));
    }

    #[test]
    fn bad_field_lines_are_refused() {
        for block in [
            &b"NoColon\r\n"[..],
            b": empty name\r\n",
            b"Sp ace: x\r\n",
            b"Name : x\r\n",
            b" folded: x\r\n",
            b"Nul: a\0b\r\n",
            b"Bare: a\rb\r\n",
        ] {
            let result = for_each_field(block, |_, _| Ok(()));
            assert!(
                matches!(result, Err(HandshakeError::BadHeader(_))),
                "{block:?}"
            );
        }
    }

    #[test]
    fn tokens() {
        assert!(has_token(b"keep-alive, Upgrade", b"upgrade"));
        assert!(!has_token(b"keep-alive, Upgraded", b"upgrade"));
        assert!(has_exact_token(b"chat, ringpost.v1", b"ringpost.v1"));
        assert!(!has_exact_token(b"Ringpost.V1", b"ringpost.v1"));
    }

    #[test]
    fn snippets_are_one_escaped_line() {
        assert_eq!(snippet(b"a\r\nb", 10), "a\\r\\nb");
        assert_eq!(snippet(b"abcdef", 3), "abc...");
    }
}
