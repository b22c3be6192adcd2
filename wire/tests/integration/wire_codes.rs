//! Wire-stable numbers, pinned: error codes and frame type tags never change meaning. A failure
//! here means a change that breaks every deployed client; add new values instead.

use ringpost_wire::*;

#[test]
fn error_codes_are_pinned() {
    let pinned: [(ErrorCode, u16); 25] = [
        (ErrorCode::Malformed, 1),
        (ErrorCode::FrameTooLarge, 2),
        (ErrorCode::UnsupportedVersion, 3),
        (ErrorCode::UnknownFrameType, 4),
        (ErrorCode::LimitExceeded, 5),
        (ErrorCode::UnexpectedFrame, 6),
        (ErrorCode::TransportProtocol, 7),
        (ErrorCode::Unauthenticated, 10),
        (ErrorCode::BadCredentials, 11),
        (ErrorCode::Forbidden, 12),
        (ErrorCode::RateLimited, 20),
        (ErrorCode::InboxFull, 21),
        (ErrorCode::MismatchedDevices, 22),
        (ErrorCode::VerificationFailed, 30),
        (ErrorCode::VerificationExpired, 31),
        (ErrorCode::TooManyAttempts, 32),
        (ErrorCode::RegistrationLocked, 33),
        (ErrorCode::BadSignature, 34),
        (ErrorCode::NotFound, 40),
        (ErrorCode::DeviceLimit, 41),
        (ErrorCode::Internal, 50),
        (ErrorCode::StorageUnavailable, 51),
        (ErrorCode::WrongOwner, 52),
        (ErrorCode::ShuttingDown, 53),
        (ErrorCode::NotImplemented, 60),
    ];
    assert_eq!(
        ErrorCode::ALL.len(),
        pinned.len(),
        "a code was added: pin it here"
    );
    for (code, value) in pinned {
        assert_eq!(code.as_u16(), value, "{code:?}");
        assert_eq!(ErrorCode::from_u16(value), Some(code));
        assert!(ErrorCode::ALL.contains(&code));
    }
    for unknown in [0, 8, 9, 13, 61, u16::MAX] {
        assert_eq!(ErrorCode::from_u16(unknown), None);
    }
}

#[test]
fn decode_and_encode_errors_map_to_pinned_codes() {
    let decode = [
        (DecodeError::Empty, ErrorCode::Malformed),
        (
            DecodeError::TooLarge { len: 2, max: 1 },
            ErrorCode::FrameTooLarge,
        ),
        (DecodeError::Malformed("x".into()), ErrorCode::Malformed),
        (
            DecodeError::UnsupportedVersion { got: 2 },
            ErrorCode::UnsupportedVersion,
        ),
        (
            DecodeError::UnknownFrameType { tag: 99 },
            ErrorCode::UnknownFrameType,
        ),
        (
            DecodeError::LimitExceeded {
                field: "f",
                len: 2,
                max: 1,
            },
            ErrorCode::LimitExceeded,
        ),
        (
            DecodeError::WrongLength {
                field: "f",
                len: 2,
                expected: 1,
            },
            ErrorCode::Malformed,
        ),
        (DecodeError::MissingField("f"), ErrorCode::Malformed),
        (
            DecodeError::UnknownEnumValue {
                field: "f",
                value: 9,
            },
            ErrorCode::Malformed,
        ),
    ];
    for (err, code) in decode {
        assert_eq!(err.code(), code, "{err:?}");
    }
    let encode = [
        (
            EncodeError::FrameTooLarge { len: 2, max: 1 },
            ErrorCode::FrameTooLarge,
        ),
        (
            EncodeError::LimitExceeded {
                field: "f",
                len: 2,
                max: 1,
            },
            ErrorCode::LimitExceeded,
        ),
        (
            EncodeError::WrongLength {
                field: "f",
                len: 2,
                expected: 1,
            },
            ErrorCode::Malformed,
        ),
        (EncodeError::Empty, ErrorCode::Malformed),
    ];
    for (err, code) in encode {
        assert_eq!(err.code(), code, "{err:?}");
    }
}

#[test]
fn frame_type_tags_are_pinned() {
    let pinned: [(FrameKind, u8); 48] = [
        (FrameKind::Hello, 1),
        (FrameKind::Welcome, 2),
        (FrameKind::Redirect, 3),
        (FrameKind::RegisterRequest, 4),
        (FrameKind::RegisterChallenge, 5),
        (FrameKind::RegisterVerify, 6),
        (FrameKind::Registered, 7),
        (FrameKind::LinkCodeRequest, 8),
        (FrameKind::LinkCode, 9),
        (FrameKind::LinkDevice, 10),
        (FrameKind::RemoveDevice, 11),
        (FrameKind::SetRegistrationLock, 12),
        (FrameKind::DeviceListRequest, 13),
        (FrameKind::DeviceList, 14),
        (FrameKind::Send, 15),
        (FrameKind::SendAck, 16),
        (FrameKind::Deliver, 17),
        (FrameKind::DeliverAck, 18),
        (FrameKind::Receipt, 19),
        (FrameKind::PresenceSubscribe, 20),
        (FrameKind::PresenceUpdate, 21),
        (FrameKind::SetPrivacy, 22),
        (FrameKind::Typing, 23),
        (FrameKind::PrekeyUpload, 24),
        (FrameKind::PrekeyClaim, 25),
        (FrameKind::PrekeyBundle, 26),
        (FrameKind::PrekeyCountRequest, 27),
        (FrameKind::PrekeyCount, 28),
        (FrameKind::GroupCreate, 29),
        (FrameKind::GroupUpdate, 30),
        (FrameKind::GroupInfoRequest, 31),
        (FrameKind::GroupInfo, 32),
        (FrameKind::MediaUploadRequest, 33),
        (FrameKind::MediaUploadGrant, 34),
        (FrameKind::Ping, 35),
        (FrameKind::Pong, 36),
        (FrameKind::Done, 37),
        (FrameKind::Error, 38),
        (FrameKind::GoingAway, 39),
        (FrameKind::Migrate, 40),
        (FrameKind::ContactsUpdate, 41),
        (FrameKind::GroupSend, 42),
        (FrameKind::GroupEvent, 43),
        (FrameKind::GroupReceipt, 44),
        (FrameKind::BroadcastSend, 45),
        (FrameKind::BroadcastAck, 46),
        (FrameKind::StatusPost, 47),
        (FrameKind::PushRegister, 48),
    ];
    assert_eq!(
        FrameKind::ALL.len(),
        pinned.len(),
        "a frame type was added: pin it here"
    );
    for (kind, tag) in pinned {
        assert_eq!(kind.tag(), tag, "{kind}");
    }
}

/// The smallest frames' exact bytes: a decoder written from docs/protocol.md must read these.
#[test]
fn golden_bytes() {
    let ping = Frame::new(1, Ping { nonce: 2 }).encode().unwrap();
    assert_eq!(Frame::decode(&ping), Ok(Frame::new(1, Ping { nonce: 2 })));
    // The root offset, then tables; `version` equals its default (1) and is not written.
    let hex: String = ping.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, GOLDEN_PING_HEX, "the encoding of Ping changed");
}

/// `Frame{req: 1, body: Ping{nonce: 2}}`, annotated in docs/protocol.md.
const GOLDEN_PING_HEX: &str = concat!(
    "14000000",         // root: Frame table at 20
    "00000000",         // padding
    "0c00120000000800", // Frame vtable: 12 bytes, table 18 bytes, version absent, req @8,
    "07000c00",         //   body_type @7, body @12
    "0c000000",         // Frame table (20): vtable at 20 - 12 = 8
    "00000023",         //   padding, body_type = 35 (Ping)
    "01000000",         //   req = 1
    "0c000000",         //   body: Ping table at 32 + 12 = 44
    "0000",             // padding
    "06000c000400",     // Ping vtable (38): 6 bytes, table 12 bytes, nonce @4
    "06000000",         // Ping table (44): vtable at 44 - 6 = 38
    "0200000000000000", //   nonce = 2
);
