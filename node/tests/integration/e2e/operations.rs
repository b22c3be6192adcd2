//! Operating a node: the production `run` mode with a config file and an SMS gateway, and the
//! keepalive that reaps silent connections.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use ringpost_client::{Client, ClientConfig, Connection, Endpoint, TlsOptions};
use ringpost_wire::{Body, Frame, Hello, SendStatus, PROTOCOL_VERSION};

use super::harness::TestNode;
use super::messaging::{msg_id, next_message, to_device, ALICE, BOB};

/// A one-shot-per-request HTTP server on 127.0.0.1:0 that records each POST body.
fn sms_gateway() -> (String, mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            let mut authorized = false;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                authorized |= lower.starts_with("authorization: bearer sekrit");
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let status = if authorized {
                "200 OK"
            } else {
                "401 Unauthorized"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
        }
    });
    (url, rx)
}

fn code_from(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    v["code"].as_str().expect("code field").to_string()
}

#[tokio::test]
async fn run_mode_reads_its_config_file_and_sends_codes_to_the_sms_gateway() {
    let (gateway, posts) = sms_gateway();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{{dir}}\"\nlisten_ws = \"127.0.0.1:0\"\nlisten_admin = \"127.0.0.1:0\"\n\
             sms_gateway_url = \"{gateway}\"\nsms_gateway_token = \"sekrit\"\ndevice_rate = 1000\n"
        ),
    )
    .unwrap();
    // The harness replaces {dir} in arguments, not in files: pass the data dir as a flag too,
    // which also shows that flags override the file.
    let node = TestNode::start_args(vec![
        "run".into(),
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--data-dir".into(),
        "{dir}".into(),
    ]);
    assert!(
        node.wss.is_empty() && node.quic.is_empty(),
        "only the configured listeners"
    );

    let mut devices = Vec::new();
    for phone in [ALICE, BOB] {
        let client = Client::connect(ClientConfig::new(node.ws.clone()))
            .await
            .unwrap();
        client.register_request(phone).await.unwrap();
        let body = posts
            .recv_timeout(Duration::from_secs(10))
            .expect("the gateway got a POST");
        assert!(body.contains(&format!("\"to\":\"+{phone}\"")), "{body}");
        client
            .register_verify(phone, &code_from(&body), "", "phone")
            .await
            .unwrap();
        devices.push(client);
    }
    let ack = devices[0]
        .send(BOB, msg_id(1), vec![to_device(BOB, 1, "via run")])
        .await
        .unwrap();
    assert_eq!(ack.status, SendStatus::Ok);
    assert_eq!(&next_message(&devices[1]).await.body[..], b"via run");
}

#[tokio::test]
async fn run_mode_refuses_an_incomplete_configuration() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpost-node"))
        .args(["run", "--listen-quic", "127.0.0.1:0", "--codes-to-log"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tls-cert"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringpost-node"))
        .args(["run", "--listen-ws", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sms-gateway-url"));
}

/// `run --check-config` checks what a start checks before it opens data or binds (here: the
/// TLS certificate and the cluster secret), exits 0 on a good file without creating the data
/// dir, and refuses keys that are no option.
#[test]
fn run_check_config_checks_without_starting() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secret = dir.path().join("cluster-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
    let tls = ringpost_node::transport::tls::dev_certificate(&dir.path().join("tls"), &[]).unwrap();
    let config = dir.path().join("node.toml");
    let write = |extra: &str, cert: &std::path::Path| {
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nlisten_wss = \"127.0.0.1:1\"\nlisten_quic = \"127.0.0.1:1\"\n\
                 tls_cert = {:?}\ntls_key = {:?}\ncodes_to_log = true\nnode_id = 3\n\
                 coordinator = \"127.0.0.1:1,127.0.0.1:2,127.0.0.1:3\"\n\
                 cluster_secret_file = {:?}\n{extra}",
                data.to_str().unwrap(),
                cert.to_str().unwrap(),
                tls.key.to_str().unwrap(),
                secret.to_str().unwrap(),
            ),
        )
        .unwrap();
    };
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ringpost-node"))
            .args(["run", "--check-config", "--config"])
            .arg(&config)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };

    write("", &tls.cert);
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(!data.exists(), "the check opened no data");

    write("", &dir.path().join("missing.pem"));
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.pem"), "{err}");

    write("listen_wsss = \"127.0.0.1:1\"\n", &tls.cert);
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown option(s) listen_wsss"), "{err}");

    std::fs::write(&secret, "short").unwrap();
    write("", &tls.cert);
    let out = check();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster secret"), "{err}");
    assert!(!data.exists());
}

#[tokio::test]
async fn silent_connections_are_reaped_and_pinging_ones_kept() {
    let node = TestNode::start_with(&["--idle-timeout-ms", "1500", "--ping-interval-ms", "500"]);
    let endpoint = Endpoint::parse(&node.ws).unwrap();
    let mut silent = Connection::open(&endpoint, &TlsOptions::default())
        .await
        .unwrap();
    let mut chatty = Connection::open(&endpoint, &TlsOptions::default())
        .await
        .unwrap();
    for c in [&mut silent, &mut chatty] {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            auth: None,
            user_agent: "t".into(),
        };
        c.send(&Frame::new(1, hello)).await.unwrap();
        match c.recv().await.unwrap().unwrap().body {
            Body::Welcome(w) => assert_eq!((w.ping_interval_ms, w.idle_timeout_ms), (500, 1500)),
            other => panic!("{other:?}"),
        }
    }
    // The chatty one pings every 400 ms for 10 s; the silent one must be closed meanwhile.
    let mut silent_closed = false;
    for n in 0..25u64 {
        chatty
            .send(&Frame::new(2, ringpost_wire::Ping { nonce: n }))
            .await
            .unwrap();
        assert!(matches!(
            chatty.recv().await.unwrap().unwrap().body,
            Body::Pong(_)
        ));
        if !silent_closed {
            silent_closed = matches!(
                tokio::time::timeout(Duration::from_millis(400), silent.recv()).await,
                Ok(Ok(None)) | Ok(Err(_))
            );
        } else {
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    assert!(silent_closed, "a silent connection is reaped");
    let (_, metrics) = node.admin_get("/metrics");
    assert!(
        metrics.contains("ringpost_connections{transport=\"ws\"} 1"),
        "{metrics}"
    );
}

/// GETs `path` on the node's admin port until the body contains `want`; returns the body.
#[allow(clippy::disallowed_methods)] // a plain test thread polling a child process
fn admin_until(node: &TestNode, path: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = node.admin_get(path);
        if status == 200 && body.contains(want) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} never showed {want:?}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_admin_port_shows_the_shard_placement() {
    let node = TestNode::start();
    // A dev cluster has the default factor, 2, and one node: one copy per shard, all its own.
    let body = admin_until(&node, "/placement", "copies per shard 1,");
    assert!(body.contains("replication factor 2,"), "{body}");
    assert!(
        body.contains("primary for 4096 shards, replica for 0"),
        "{body}"
    );
    assert!(body.contains("not replicated yet"), "{body}");
    let (status, body) = node.admin_get("/placement?shard=4095");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("replicas none"), "{body}");
    let (status, body) = node.admin_get("/placement?shard=4096");
    assert_eq!(status, 400, "{body}");
    let (status, _) = node.admin_get("/nowhere");
    assert_eq!(status, 404);
}

#[test]
fn a_dev_node_serves_readiness_process_and_embedded_coordinator_metrics() {
    let node = TestNode::start();
    let body = admin_until(&node, "/metrics", "\nringpost_ready 1\n");
    for line in [
        "ringpost_coord_is_leader 1",
        "ringpost_coord_voters 1",
        "ringpost_coord_initialized 1",
        "ringpost_coord_members{state=\"active\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "no {line:?} in {body}");
    }
    for name in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(
            body.lines().any(|l| l.starts_with(&format!("{name} "))),
            "no {name} in {body}"
        );
    }
    // Once each: the node renders the process metrics, the embedded replica does not.
    assert_eq!(
        body.matches("# TYPE process_open_fds ").count(),
        1,
        "{body}"
    );
}
