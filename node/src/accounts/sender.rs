//! [`CodeSender`]: how verification codes reach phones, and [`LogCodeSender`], the development
//! sender that writes them to the log and, optionally, to a file. The production sender,
//! [`super::HttpCodeSender`], posts them to an SMS/voice gateway.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use ringpost_wire::{CodeChannel, UserId};
use tokio::io::AsyncWriteExt;

/// What [`CodeSender::send`] returns: a boxed future, so the trait is object-safe.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), CodeSendError>> + Send + 'a>>;

/// Delivers a verification code to a phone number. Implementations bound their own time.
pub trait CodeSender: Send + Sync + 'static {
    fn send<'a>(&'a self, phone: UserId, code: &'a str, channel: CodeChannel) -> SendFuture<'a>;
}

/// Why a code could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum CodeSendError {
    /// The sender is misconfigured (bad URL, no root certificates, bad token).
    #[error("code sender configuration: {0}")]
    Config(String),
    #[error("code delivery I/O: {0}")]
    Io(String),
    #[error("code delivery timed out")]
    Timeout,
    /// The gateway answered with a non-2xx status.
    #[error("code gateway answered HTTP {0}")]
    Status(u16),
    /// The gateway's answer was not HTTP.
    #[error("code gateway answer malformed: {0}")]
    BadResponse(String),
}

/// Development sender: logs every code at `info` and, with a file, appends `"{phone} {code}\n"`
/// to it (the dev node uses `DATA_DIR/verification-codes.txt` so tests and the bench can read
/// codes). Never use it in production: the log then holds live codes.
pub struct LogCodeSender {
    file: Option<PathBuf>,
    /// Serialises appends so lines never interleave.
    append: tokio::sync::Mutex<()>,
}

impl LogCodeSender {
    pub fn new(file: Option<PathBuf>) -> LogCodeSender {
        LogCodeSender {
            file,
            append: tokio::sync::Mutex::new(()),
        }
    }
}

impl CodeSender for LogCodeSender {
    fn send<'a>(&'a self, phone: UserId, code: &'a str, channel: CodeChannel) -> SendFuture<'a> {
        Box::pin(async move {
            tracing::info!(phone, code, channel = ?channel, "verification code (dev sender)");
            if let Some(path) = &self.file {
                let _guard = self.append.lock().await;
                let mut f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await
                    .map_err(|e| CodeSendError::Io(format!("{}: {e}", path.display())))?;
                f.write_all(format!("{phone} {code}\n").as_bytes())
                    .await
                    .map_err(|e| CodeSendError::Io(format!("{}: {e}", path.display())))?;
                f.flush()
                    .await
                    .map_err(|e| CodeSendError::Io(e.to_string()))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn log_sender_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verification-codes.txt");
        let sender = LogCodeSender::new(Some(path.clone()));
        sender
            .send(15551234567, "123456", CodeChannel::Sms)
            .await
            .unwrap();
        sender
            .send(4930123456, "000042", CodeChannel::Voice)
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "15551234567 123456\n4930123456 000042\n");
        // Without a file it only logs.
        LogCodeSender::new(None)
            .send(1, "1", CodeChannel::Sms)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn log_sender_reports_unwritable_file() {
        let dir = tempfile::tempdir().unwrap();
        let sender = LogCodeSender::new(Some(dir.path().join("missing-dir").join("codes.txt")));
        let err = sender
            .send(1, "123456", CodeChannel::Sms)
            .await
            .unwrap_err();
        assert!(matches!(err, CodeSendError::Io(_)), "{err}");
    }
}
