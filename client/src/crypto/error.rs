//! [`CryptoError`]: why an end-to-end encryption step failed.

use std::path::PathBuf;

use ringpost_wire::{DeviceId, UserId};

use crate::error::ClientError;

/// Why an end-to-end encryption operation failed. A failed operation leaves the persisted state
/// as it was before it (the store file is replaced whole or not at all).
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The transport failed or the node refused the request.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The store file could not be read or written.
    #[error("store {path}: {source}")]
    StoreIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store file exists but the key does not open it: a wrong key, or a file that was
    /// altered or truncated. Nothing was changed on disk.
    #[error(
        "store {path}: the store key does not decrypt it (wrong key, or the file was altered)"
    )]
    StoreKey { path: PathBuf },
    /// The store file is not a Ringpost E2EE store, or of a version this SDK does not read.
    #[error("store {path}: {reason}")]
    StoreFormat { path: PathBuf, reason: String },
    /// The store belongs to another device than the client it is opened with.
    #[error(
        "store {path} belongs to user {store_user} device {store_device}, not {user}/{device}"
    )]
    StoreDevice {
        path: PathBuf,
        store_user: UserId,
        store_device: DeviceId,
        user: UserId,
        device: DeviceId,
    },
    /// The client is not authenticated as a device (register or link first).
    #[error("the client is not a registered device")]
    NotADevice,
    /// The wrapped client acknowledges deliveries on hand-out; the encrypting layer must ack only
    /// after the decrypted state is saved, so it needs `ClientConfig::auto_ack == false`.
    #[error("the client must be connected with auto_ack = false")]
    AutoAck,
    /// A claimed prekey bundle failed verification: wrong key sizes or a bad signature.
    #[error("prekey bundle of user {user} device {device}: {reason}")]
    BadBundle {
        user: UserId,
        device: DeviceId,
        reason: String,
    },
    /// A device we must encrypt for has published no usable keys.
    #[error("user {user} device {device} has no published prekeys")]
    NoPrekeys { user: UserId, device: DeviceId },
    /// The node kept answering `MismatchedDevices` after the device lists were refreshed.
    #[error("device lists of user {user} kept changing over {attempts} attempts")]
    DeviceListsUnstable { user: UserId, attempts: u32 },
    /// An Olm or Megolm operation failed (a non-contributory key, a session that could not be
    /// created).
    #[error("olm: {0}")]
    Olm(String),
    /// The plaintext is longer than a ciphertext may be once encrypted.
    #[error("plaintext of {len} bytes is longer than {max} bytes")]
    TooLong { len: usize, max: usize },
}

/// Results of end-to-end encryption operations.
pub type CryptoResult<T> = std::result::Result<T, CryptoError>;
