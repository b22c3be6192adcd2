//! Registered devices for a run: read from a cache file, or registered through verification
//! codes (the dev node writes them to `DATA_DIR/verification-codes.txt`) in parallel with a
//! bound, and appended to the cache so the next run against the same data directory skips it.
//!
//! The cache file (`--accounts FILE`) has one device per line: `user device token_hex`, with
//! `#` comments and blank lines allowed. It holds live tokens: keep it next to the node's data.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use ringpost_wire::{Auth, Body, CodeChannel, DeviceId, RegisterRequest, RegisterVerify, UserId};
use tokio::sync::Mutex;

use crate::loadclient::{Dialer, HelloOutcome, CONNECT_TIMEOUT};

/// Registrations in flight at once by default: each holds one connection and waits on two
/// synced writes at the node; beyond a few dozen the node's write group is the limit.
pub const REGISTER_CONCURRENCY_DEFAULT: usize = 64;

/// How often a registration looks for its code in the codes file.
pub const CODE_POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How long a registration waits for its code to appear in the codes file.
pub const CODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Phones of bench accounts: `PHONE_BASE + n` with n random below `PHONE_SPAN`, so runs
/// against one data directory without a cache file do not collide with each other (a phone
/// asked for a code twice within a minute is refused).
pub const PHONE_BASE: UserId = 88_000_000_000_000;
/// See [`PHONE_BASE`].
pub const PHONE_SPAN: u64 = 1_000_000_000_000;

/// Attempts per account before registration gives up on it (each with a fresh phone).
pub const REGISTER_ATTEMPTS_MAX: u32 = 3;

/// One registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: UserId,
    pub device: DeviceId,
    pub token: [u8; 32],
}

impl Account {
    pub fn auth(&self) -> Auth {
        Auth {
            user: self.user,
            device: self.device,
            token: Bytes::copy_from_slice(&self.token),
        }
    }

    /// The cache-file line for this account (without newline).
    pub fn line(&self) -> String {
        format!("{} {} {}", self.user, self.device, hex::encode(self.token))
    }
}

/// Parses a cache file's text. Errors name the line.
pub fn parse_cache(text: &str) -> Result<Vec<Account>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: &str| anyhow!("accounts line {}: {what}: {raw:?}", i + 1);
        let mut parts = line.split_whitespace();
        let (Some(user), Some(device), Some(token), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected `user device token_hex`"));
        };
        let user = user.parse().map_err(|_| bad("user is not a number"))?;
        let device = device.parse().map_err(|_| bad("device is not a number"))?;
        let token: [u8; 32] = hex::decode(token)
            .map_err(|_| bad("token is not hex"))?
            .try_into()
            .map_err(|_| bad("token is not 32 bytes"))?;
        out.push(Account {
            user,
            device,
            token,
        });
    }
    Ok(out)
}

/// Reads a cache file; a missing file is an empty cache.
pub fn load_cache(path: &Path) -> Result<Vec<Account>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_cache(&text).with_context(|| format!("{}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Appends accounts to a cache file (creating it with a header; with no accounts, only
/// creates it).
pub fn append_cache(path: &Path, accounts: &[Account]) -> Result<()> {
    let exists = path.exists();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut text = String::new();
    if !exists {
        text.push_str("# ringpost-bench accounts: user device token_hex (live tokens)\n");
    }
    for a in accounts {
        text.push_str(&a.line());
        text.push('\n');
    }
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The codes file of a dev node, read incrementally as it grows.
pub struct CodeBook {
    path: PathBuf,
    state: Mutex<CodeBookState>,
}

struct CodeBookState {
    offset: u64,
    /// A line's start that has not got its newline yet.
    partial: String,
    codes: HashMap<UserId, String>,
}

impl CodeBook {
    /// Starts reading at the file's current end: only codes issued from now on are looked up.
    pub fn new(path: &Path) -> CodeBook {
        let offset = std::fs::metadata(path).map_or(0, |m| m.len());
        CodeBook {
            path: path.to_path_buf(),
            state: Mutex::new(CodeBookState {
                offset,
                partial: String::new(),
                codes: HashMap::new(),
            }),
        }
    }

    /// The latest code issued to `phone`, waiting up to [`CODE_TIMEOUT`] for it to appear.
    pub async fn code(&self, phone: UserId) -> Result<String> {
        let deadline = tokio::time::Instant::now() + CODE_TIMEOUT;
        loop {
            {
                let mut st = self.state.lock().await;
                if let Some(code) = st.codes.remove(&phone) {
                    return Ok(code);
                }
                self.read_more(&mut st)?;
                if let Some(code) = st.codes.remove(&phone) {
                    return Ok(code);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no code for {phone} in {} after {CODE_TIMEOUT:?} (is it the node's codes file?)",
                    self.path.display()
                );
            }
            tokio::time::sleep(CODE_POLL_INTERVAL).await;
        }
    }

    fn read_more(&self, st: &mut CodeBookState) -> Result<()> {
        let mut f = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("open {}", self.path.display())),
        };
        f.seek(SeekFrom::Start(st.offset))?;
        let mut text = String::new();
        let n = f.read_to_string(&mut text)?;
        st.offset += n as u64;
        let mut all = std::mem::take(&mut st.partial);
        all.push_str(&text);
        let mut rest = all.as_str();
        while let Some((line, tail)) = rest.split_once('\n') {
            if let Some((phone, code)) = line.trim().split_once(' ') {
                if let Ok(phone) = phone.parse() {
                    st.codes.insert(phone, code.trim().to_string());
                }
            }
            rest = tail;
        }
        st.partial = rest.to_string();
        Ok(())
    }
}

/// Redirects a registration follows to the user's node before it fails.
const REGISTER_REDIRECTS_MAX: u32 = 3;

/// Registers one device for `phone`: anonymous `Hello`, `RegisterRequest`, the code from the
/// codes file, `RegisterVerify`.
pub async fn register_one(dialer: &Dialer, codes: &CodeBook, phone: UserId) -> Result<Account> {
    let work = async {
        let mut conn = dialer.connect().await?;
        // Accounts live on their user's node: a RegisterRequest elsewhere is redirected there.
        let mut redirects = 0;
        loop {
            match conn.hello(None).await? {
                HelloOutcome::Welcome(_) => {}
                HelloOutcome::Redirect(_) => bail!("an anonymous Hello was redirected"),
            }
            let req = RegisterRequest {
                phone,
                channel: CodeChannel::Sms,
            };
            match conn.request(2, req).await?.body {
                Body::Redirect(r) if redirects < REGISTER_REDIRECTS_MAX => {
                    redirects += 1;
                    conn.abort().await;
                    conn = dialer.connect_redirected(&r).await?;
                }
                Body::RegisterChallenge(_) => break,
                other => bail!("RegisterRequest answered with {}", other.name()),
            }
        }
        let code = codes.code(phone).await?;
        let verify = RegisterVerify {
            phone,
            code,
            pin: String::new(),
            device_name: "ringpost-bench".into(),
        };
        let answer = conn.request(3, verify).await?;
        conn.abort().await;
        match answer.body {
            Body::Registered(r) => Ok(Account {
                user: r.user,
                device: r.device,
                token: r.token[..]
                    .try_into()
                    .map_err(|_| anyhow!("token is not 32 bytes"))?,
            }),
            other => bail!("RegisterVerify answered with {}", other.name()),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT + CODE_TIMEOUT, work)
        .await
        .map_err(|_| anyhow!("registration of {phone} timed out"))?
}

/// `needed` accounts: the first ones from the cache file, the rest registered now (at most
/// `concurrency` at once) and appended to the cache. `progress` is called with each new one.
pub async fn ensure(
    dialer: Arc<Dialer>,
    codes_file: Option<&Path>,
    cache: Option<&Path>,
    needed: usize,
    concurrency: usize,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<Vec<Account>> {
    let mut accounts = match cache {
        Some(p) => load_cache(p)?,
        None => Vec::new(),
    };
    if accounts.len() >= needed {
        accounts.truncate(needed);
        return Ok(accounts);
    }
    let missing = needed - accounts.len();
    let Some(codes_file) = codes_file else {
        bail!(
            "{missing} more registered devices are needed: give --codes-file (the node's \
             verification-codes.txt) or an --accounts file with {needed} lines"
        );
    };
    let codes = Arc::new(CodeBook::new(codes_file));
    let mut taken: HashSet<UserId> = accounts.iter().map(|a| a.user).collect();
    let mut phones = Vec::with_capacity(missing * REGISTER_ATTEMPTS_MAX as usize);
    while phones.len() < missing * REGISTER_ATTEMPTS_MAX as usize {
        let p = PHONE_BASE + rand::random::<u64>() % PHONE_SPAN;
        if taken.insert(p) {
            phones.push(p);
        }
    }
    let phones = Arc::new(std::sync::Mutex::new(phones));
    let progress = Arc::new(progress);
    // Each registration is appended as soon as it succeeds, so an interrupted run keeps
    // what it registered.
    let sink = match cache {
        Some(p) => {
            append_cache(p, &[])?;
            let f = std::fs::OpenOptions::new()
                .append(true)
                .open(p)
                .with_context(|| format!("open {}", p.display()))?;
            Some(Arc::new(std::sync::Mutex::new(f)))
        }
        None => None,
    };
    // `concurrency` tasks, each registering one account after another until `missing` are
    // claimed: memory stays that of `concurrency` registrations however many are asked for
    // (a task per account held ~3 KiB each: 3 GiB for a million).
    let claimed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, missing) {
        let (dialer, codes, phones, progress, sink, claimed) = (
            dialer.clone(),
            codes.clone(),
            phones.clone(),
            progress.clone(),
            sink.clone(),
            claimed.clone(),
        );
        tasks.spawn(async move {
            let mut done: Vec<Result<Account>> = Vec::new();
            while claimed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < missing {
                let mut last = None;
                let mut registered = None;
                for _ in 0..REGISTER_ATTEMPTS_MAX {
                    let Some(phone) = phones.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                        last = Some(anyhow!("out of phones"));
                        break;
                    };
                    match register_one(&dialer, &codes, phone).await {
                        Ok(a) => {
                            registered = Some(a);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                match registered {
                    Some(a) => {
                        if let Some(f) = &sink {
                            let line = format!("{}\n", a.line());
                            f.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .write_all(line.as_bytes())?;
                        }
                        progress(1);
                        done.push(Ok(a));
                    }
                    None => done.push(Err(last.unwrap_or_else(|| anyhow!("registration failed")))),
                }
            }
            anyhow::Ok(done)
        });
    }
    let mut fresh = Vec::with_capacity(missing);
    let mut first_error = None;
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        for one in r?? {
            match one {
                Ok(a) => fresh.push(a),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    accounts.extend(fresh);
    if let Some(e) = first_error {
        bail!("{errors} of {missing} registrations failed; the first: {e:#}");
    }
    Ok(accounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_lines_round_trip() {
        let a = Account {
            user: 88_000_000_000_123,
            device: 1,
            token: [0xab; 32],
        };
        let text = format!("# header\n\n{}\n  {}  \n", a.line(), a.line());
        assert_eq!(parse_cache(&text).unwrap(), vec![a.clone(), a]);
    }

    #[test]
    fn bad_cache_lines_name_the_line() {
        let token = "ab".repeat(32);
        for (text, what) in [
            ("1 1\n".to_string(), "expected"),
            (format!("x 1 {token}\n"), "user is not a number"),
            (format!("1 y {token}\n"), "device is not a number"),
            ("1 1 zz\n".to_string(), "not hex"),
            ("1 1 abab\n".to_string(), "not 32 bytes"),
            (format!("1 1 {token} extra\n"), "expected"),
        ] {
            let e = parse_cache(&format!("# ok\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("line 2") && e.contains(what), "{e}");
        }
    }

    #[test]
    fn cache_file_appends_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounts.txt");
        assert!(load_cache(&path).unwrap().is_empty());
        let a = Account {
            user: 1,
            device: 2,
            token: [7; 32],
        };
        append_cache(&path, std::slice::from_ref(&a)).unwrap();
        append_cache(&path, std::slice::from_ref(&a)).unwrap();
        assert_eq!(load_cache(&path).unwrap(), vec![a.clone(), a]);
    }

    #[tokio::test]
    async fn code_book_reads_codes_as_the_file_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codes.txt");
        std::fs::write(&path, "5 111111\n").unwrap();
        let book = CodeBook::new(&path);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"6 222222\n7 33").unwrap();
        assert_eq!(book.code(6).await.unwrap(), "222222");
        f.write_all(b"3333\n").unwrap();
        assert_eq!(book.code(7).await.unwrap(), "333333");
    }
}
