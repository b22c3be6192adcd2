//! docs/protocol.md stays accurate: its frame type, error code, limit and bound tables are
//! compared with the code. A change to any of them that is not made in the page fails here.

use std::collections::BTreeMap;

use ringpost_wire::codec::{FieldBound, BOUNDS};
use ringpost_wire::limits::*;
use ringpost_wire::*;

const PAGE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"));

/// The table rows of the page's section `heading` (`## heading`), as trimmed cells.
fn rows(heading: &str) -> Vec<Vec<String>> {
    let start = PAGE
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("docs/protocol.md has no section '## {heading}'"));
    let section = &PAGE[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    section[..end]
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|--") && !l.starts_with("|-"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .filter(|cells: &Vec<String>| !cells[0].is_empty() && !cells[0].starts_with("---"))
        .collect()
}

#[test]
fn frame_type_table_matches_the_code() {
    let table: Vec<(u8, String, String)> = rows("Frame types")
        .into_iter()
        .filter_map(|r| Some((r[0].parse().ok()?, r[1].clone(), r[2].clone())))
        .collect();
    assert_eq!(table.len(), FrameKind::ALL.len(), "one row per frame type");
    for (&kind, (tag, name, direction)) in FrameKind::ALL.iter().zip(&table) {
        assert_eq!(
            (kind.tag(), kind.name()),
            (*tag, name.as_str()),
            "row for {kind}"
        );
        let want = match kind.direction() {
            Direction::ToServer => "c→s",
            Direction::ToClient => "s→c",
            Direction::Both => "both",
        };
        assert_eq!(direction, want, "direction of {kind}");
    }
}

#[test]
fn error_code_table_matches_the_code() {
    let table: Vec<(u16, String, String)> = rows("Error codes")
        .into_iter()
        .filter_map(|r| Some((r[0].parse().ok()?, r[1].clone(), r[2].clone())))
        .collect();
    assert_eq!(table.len(), ErrorCode::ALL.len(), "one row per error code");
    for (&code, (value, name, closes)) in ErrorCode::ALL.iter().zip(&table) {
        assert_eq!((code.as_u16(), format!("{code:?}")), (*value, name.clone()));
        let want = if code.is_fatal() { "yes" } else { "no" };
        assert_eq!(closes, want, "whether {code:?} closes");
    }
}

#[test]
fn bound_table_matches_the_code() {
    let table: BTreeMap<String, String> = rows("Limits")
        .into_iter()
        .filter(|r| r.len() == 2 && r[0].starts_with('`'))
        .map(|r| (r[0].trim_matches('`').to_owned(), r[1].clone()))
        .collect();
    assert_eq!(table.len(), BOUNDS.len(), "one row per bounded field");
    for &FieldBound {
        field,
        limit,
        exact,
    } in BOUNDS
    {
        let want = if exact {
            format!("exactly {limit}")
        } else {
            format!("at most {limit}")
        };
        assert_eq!(table.get(field), Some(&want), "bound of {field}");
    }
}

#[test]
fn limit_table_matches_the_code() {
    let table: BTreeMap<String, String> = rows("Limits")
        .into_iter()
        .filter(|r| r.len() == 3 && r[0].starts_with('`'))
        .map(|r| (r[0].trim_matches('`').to_owned(), r[1].clone()))
        .collect();
    let limits: [(&str, u64); 29] = [
        ("FRAME_BYTES_MAX", FRAME_BYTES_MAX as u64),
        ("CIPHERTEXT_BYTES_MAX", CIPHERTEXT_BYTES_MAX as u64),
        ("DEVICES_PER_USER_MAX", DEVICES_PER_USER_MAX as u64),
        ("SEND_CIPHERTEXTS_MAX", SEND_CIPHERTEXTS_MAX as u64),
        ("ACK_SEQS_MAX", ACK_SEQS_MAX as u64),
        ("RECEIPT_MSG_IDS_MAX", RECEIPT_MSG_IDS_MAX as u64),
        ("BROADCAST_RECIPIENTS_MAX", BROADCAST_RECIPIENTS_MAX as u64),
        (
            "BROADCAST_CIPHERTEXTS_MAX",
            BROADCAST_CIPHERTEXTS_MAX as u64,
        ),
        ("PRESENCE_USERS_MAX", PRESENCE_USERS_MAX as u64),
        ("PRIVACY_CONTACTS_MAX", PRIVACY_CONTACTS_MAX as u64),
        ("CONTACTS_MAX", CONTACTS_MAX as u64),
        ("BLOCKED_MAX", BLOCKED_MAX as u64),
        ("TYPING_PER_S_MAX", u64::from(TYPING_PER_S_MAX)),
        ("PREKEYS_PER_UPLOAD_MAX", PREKEYS_PER_UPLOAD_MAX as u64),
        ("KEY_BYTES_MAX", KEY_BYTES_MAX as u64),
        ("PREKEY_LOW_WATERMARK", u64::from(PREKEY_LOW_WATERMARK)),
        ("SIGNATURE_BYTES_MAX", SIGNATURE_BYTES_MAX as u64),
        ("GROUP_MEMBERS_MAX", GROUP_MEMBERS_MAX as u64),
        ("GROUP_META_BYTES_MAX", GROUP_META_BYTES_MAX as u64),
        ("STRING_BYTES_MAX", STRING_BYTES_MAX as u64),
        ("TOKEN_BYTES", TOKEN_BYTES as u64),
        ("MSG_ID_BYTES", MSG_ID_BYTES as u64),
        ("GROUP_ID_BYTES", GROUP_ID_BYTES as u64),
        ("GROUP_INVITE_CODE_BYTES", GROUP_INVITE_CODE_BYTES as u64),
        (
            "GROUP_CIPHERTEXT_BYTES_MAX",
            GROUP_CIPHERTEXT_BYTES_MAX as u64,
        ),
        ("MEDIA_BYTES_MAX", MEDIA_BYTES_MAX),
        ("PUSH_TOKEN_BYTES_MAX", PUSH_TOKEN_BYTES_MAX as u64),
        ("MEDIA_SHA256_BYTES", MEDIA_SHA256_BYTES as u64),
        (
            "MIGRATE_RECONNECT_AFTER_MS_MAX",
            u64::from(MIGRATE_RECONNECT_AFTER_MS_MAX),
        ),
    ];
    assert_eq!(table.len(), limits.len(), "one row per limit");
    for (name, value) in limits {
        assert_eq!(table.get(name), Some(&value.to_string()), "{name}");
    }
}

#[test]
fn transport_names_match_the_code() {
    assert!(PAGE.contains(&format!("`{}`", ws::SUBPROTOCOL)));
    assert!(
        PAGE.contains(&format!("{} bytes", 56)),
        "the annotated Ping's size"
    );
}
