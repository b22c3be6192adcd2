//! A real S3-compatible server for the S3 media tests: `moto_server` (PyPI `moto[server]`,
//! installed into the repository's `.venv/` by `scripts/deps.sh`) on a free loopback port,
//! killed on drop. A missing or failing moto fails the test; it never skips.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub endpoint: String,
    addr: String,
}

impl Moto {
    #[allow(clippy::disallowed_methods)] // polls a child process's port from a plain thread
    pub fn start() -> Moto {
        let bin = std::env::var_os("RINGPOST_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/moto_server")
            });
        assert!(
            bin.exists(),
            "moto_server not found at {}: run scripts/deps.sh (make test does) to install \
             moto[server] into .venv, or point RINGPOST_MOTO_SERVER at one",
            bin.display()
        );
        // A free port: bound, read and released (moto binds it a moment later).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited at start ({status}); is port {port} taken?");
            }
            if TcpStream::connect(&addr).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not listen on {addr} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto {
            child,
            endpoint: format!("http://{addr}"),
            addr,
        }
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        let mut s = TcpStream::connect(&self.addr).expect("connect to moto");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .expect("write to moto");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "creating bucket {name} on moto: {answer}"
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
