//! Helpers for a dev node (`ringpost-node dev`), used by tests, the load generator and chaos.
//!
//! The dev node "sends" verification codes by appending `"<phone> <code>"` lines to
//! `DATA_DIR/verification-codes.txt`; these helpers read them back and run the whole
//! registration flow.
//!
//! ```no_run
//! # async fn f(codes: std::path::PathBuf) -> Result<(), ringpost_client::ClientError> {
//! use ringpost_client::{dev, ClientConfig, DeviceCiphertext, Event};
//! let cfg = |url: &str| ClientConfig::new(url);
//! let (alice, _) = dev::register_device(cfg("ws://127.0.0.1:7000"), 15550001, &codes).await?;
//! let (bob, _) = dev::register_device(cfg("ws://127.0.0.1:7000"), 15550002, &codes).await?;
//! let msg_id = ringpost_client::new_msg_id();
//! let body = bytes::Bytes::from_static(b"ciphertext");
//! let ack = alice
//!     .send(15550002, msg_id, vec![DeviceCiphertext { user: 15550002, device: 1, body }])
//!     .await?;
//! let Some(Event::Message(d)) = bob.next_event().await else { panic!() };
//! assert_eq!(d.msg_id, msg_id);
//! # Ok(()) }
//! ```

use std::path::Path;
use std::time::Duration;

use ringpost_wire::{Registered, UserId};

use crate::client::{Client, ClientConfig};
use crate::endpoint::Endpoint;
use crate::error::{ClientError, Result};

/// How often [`read_code`] looks at the codes file.
pub const CODE_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long [`register_device`] waits for the node to write the code.
pub const CODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest codes file read, in bytes. A dev node appends ~20 bytes per code; a file this big
/// means something else is wrong.
pub const CODES_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// The device name [`register_device`] and [`link_device`] register.
pub const DEV_DEVICE_NAME: &str = "ringpost-client dev";

/// Where a codes file ends now: pass it to [`read_code_after`] to wait for a code written later.
pub fn codes_mark(codes_file: impl AsRef<Path>) -> u64 {
    std::fs::metadata(codes_file).map_or(0, |m| m.len())
}

/// The newest code for `phone` in the codes file, waiting (up to `timeout`) for one to appear.
pub async fn read_code(
    codes_file: impl AsRef<Path>,
    phone: UserId,
    timeout: Duration,
) -> Result<String> {
    read_code_after(codes_file, phone, 0, timeout).await
}

/// The newest code for `phone` written after byte `mark` of the codes file (from
/// [`codes_mark`]), waiting up to `timeout` for one to appear. Use it when an older code for the
/// same number may be in the file.
pub async fn read_code_after(
    codes_file: impl AsRef<Path>,
    phone: UserId,
    mark: u64,
    timeout: Duration,
) -> Result<String> {
    let path = codes_file.as_ref();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(code) = newest_code(path, phone, mark)? {
            return Ok(code);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClientError::Timeout("verification code"));
        }
        tokio::time::sleep(CODE_POLL_INTERVAL).await;
    }
}

fn newest_code(path: &Path, phone: UserId, mark: u64) -> Result<Option<String>> {
    let text = match std::fs::metadata(path) {
        Ok(meta) if meta.len() > CODES_FILE_BYTES_MAX => {
            return Err(ClientError::Io(std::io::Error::other(format!(
                "{} is larger than CODES_FILE_BYTES_MAX",
                path.display()
            ))))
        }
        Ok(_) => std::fs::read(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let start = usize::try_from(mark).unwrap_or(usize::MAX).min(text.len());
    let text = String::from_utf8_lossy(&text[start..]);
    let phone = phone.to_string();
    // Only whole lines: the node may be half way through appending one.
    let newest = text
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .rev()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(p), Some(code)) if p == phone => Some(code.to_string()),
                _ => None,
            }
        });
    Ok(newest)
}

/// Connects anonymously with `config` (its `auth` is ignored), registers `phone` with the code
/// the dev node writes to `codes_file`, and returns the client (now that device, also for
/// reconnects) and its credentials.
pub async fn register_device(
    config: ClientConfig,
    phone: UserId,
    codes_file: impl AsRef<Path>,
) -> Result<(Client, Registered)> {
    let codes_file = codes_file.as_ref();
    let mut config = ClientConfig {
        auth: None,
        ..config
    };
    let mut hops = 0;
    loop {
        let client = Client::connect(config.clone()).await?;
        let mark = codes_mark(codes_file);
        match client.register_request(phone).await {
            Ok(_) => {}
            Err(ClientError::Redirected(r)) if hops < config.max_redirects => {
                // Accounts live on their user's node: register there.
                hops += 1;
                client.close().await;
                config.url = Endpoint::parse(&config.url)?
                    .redirect_target(&r)?
                    .to_string();
                continue;
            }
            Err(e) => return Err(e),
        }
        let code = read_code_after(codes_file, phone, mark, CODE_TIMEOUT).await?;
        let registered = client
            .register_verify(phone, &code, "", DEV_DEVICE_NAME)
            .await?;
        return Ok((client, registered));
    }
}

/// Links a new device to `primary`'s user: asks the primary for a provisioning code and uses
/// it on a new anonymous connection (at the user's node, following a redirect).
pub async fn link_device(config: ClientConfig, primary: &Client) -> Result<(Client, Registered)> {
    let user = primary
        .auth()
        .ok_or_else(|| ClientError::Protocol("the primary client is not a device".to_string()))?
        .user;
    let code = primary.link_code().await?;
    let mut config = ClientConfig {
        auth: None,
        ..config
    };
    let mut hops = 0;
    loop {
        let client = Client::connect(config.clone()).await?;
        match client.link_device(user, &code.code, DEV_DEVICE_NAME).await {
            Ok(registered) => return Ok((client, registered)),
            Err(ClientError::Redirected(r)) if hops < config.max_redirects => {
                hops += 1;
                client.close().await;
                config.url = Endpoint::parse(&config.url)?
                    .redirect_target(&r)?
                    .to_string();
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_the_newest_whole_line_for_the_phone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codes.txt");
        assert!(matches!(
            read_code(&path, 1, Duration::from_millis(50)).await,
            Err(ClientError::Timeout(_))
        ));
        std::fs::write(
            &path,
            "15550001 111111\n15550002 222222\n15550001 333333\n15550001 44",
        )
        .unwrap();
        let code = read_code(&path, 15550001, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(code, "333333", "the partial last line is not read yet");
        assert_eq!(
            read_code(&path, 15550002, Duration::from_secs(1))
                .await
                .unwrap(),
            "222222"
        );
        // Phone numbers match whole: 1555000 is not a prefix match of 15550001.
        assert!(read_code(&path, 1555000, Duration::from_millis(50))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn waits_for_a_code_after_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codes.txt");
        std::fs::write(&path, "15550001 111111\n").unwrap();
        let mark = codes_mark(&path);
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
                f.write_all(b"15550001 999999\n").unwrap();
            })
        };
        let code = read_code_after(&path, 15550001, mark, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(code, "999999");
        writer.await.unwrap();
    }
}
