//! `ringpost-node`: the edge node binary.
//!
//! Every option is a flag, an environment variable (`RINGPOST_<NAME>`), and a key of the
//! `--config` TOML file (`name = value`, the flag's name without dashes, `-` or `_`). Precedence:
//! flag, then environment, then file, then the default `--help` prints.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use ringpost_node::accounts::{HttpCodeSenderConfig, HTTP_TIMEOUT_MS_DEFAULT};
use ringpost_node::admission::{self, PreAuthLimits};
use ringpost_node::runtime::{CodeDelivery, Node, NodeOptions};
use ringpost_node::session::{Keepalive, IDLE_TIMEOUT_MS, PING_INTERVAL_MS};
use ringpost_node::storage::rocks::RocksConfig;
use ringpost_node::transport::tls::CertPaths;

/// mimalloc, unless built with `--features system-alloc` (for heap profilers such as heaptrack,
/// which see only the C library's allocator).
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ringpost edge node: terminates WebSocket and QUIC connections, routes end-to-end-encrypted
/// messages, and keeps offline inboxes in RocksDB.
#[derive(Parser, Debug)]
#[command(name = "ringpost-node", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, env = "RINGPOST_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One self-contained node for development: an embedded single-member coordinator, data in
    /// ./data, a generated dev CA and certificate, verification codes written to the log and to
    /// DATA_DIR/verification-codes.txt.
    Dev(Box<DevArgs>),
    /// A node for real traffic: TLS certificate, SMS gateway and coordinator from configuration.
    /// Options come from flags, RINGPOST_* environment variables and `--config node.toml`.
    /// Without --coordinator the node is a one-node cluster with an embedded coordinator.
    Run(Box<RunArgs>),
}

/// Options shared by `dev` and `run`.
#[derive(clap::Args, Debug)]
struct Common {
    /// Where RocksDB (and, for dev, the certificate and codes file) live.
    #[arg(long, default_value = "./data", env = "RINGPOST_DATA_DIR")]
    data_dir: PathBuf,
    /// What drives the ws and wss listeners' connections: tokio (epoll), or io_uring
    /// (Linux 6.0+; less memory per connection; experimental). Where io_uring is refused the
    /// node says why and uses tokio. QUIC always uses tokio.
    #[arg(long, value_enum, default_value = "tokio", env = "RINGPOST_WS_DRIVER")]
    ws_driver: ringpost_node::runtime::WsDriver,
    /// Tasks that run the QUIC listener's connections (its driver's shards; the first also
    /// receives every datagram for the others). 1 keeps all QUIC work on one core at the
    /// lowest cost per packet; raise it (up to the cores the node has) where QUIC traffic needs
    /// more than one core. Each shard past the first costs a hand-over per datagram.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64), env = "RINGPOST_QUIC_SHARDS")]
    quic_shards: u16,
    /// RocksDB's block cache (one for every column family, index and filter blocks included),
    /// in MiB: at most this much memory. Lower it where many nodes share a host.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..), env = "RINGPOST_ROCKSDB_BLOCK_CACHE_MIB")]
    rocksdb_block_cache_mib: u32,
    /// RocksDB's memtables, every column family together, in MiB: at most this much memory
    /// (the largest is flushed when it is reached).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..), env = "RINGPOST_ROCKSDB_WRITE_BUFFER_MIB")]
    rocksdb_write_buffer_mib: u32,
    /// Sends, receipts and typing indicators one device may make per second.
    #[arg(long, default_value_t = ringpost_node::server::DEVICE_RATE_PER_S, env = "RINGPOST_DEVICE_RATE")]
    device_rate: u32,
    /// Burst allowance on top of --device-rate.
    #[arg(long, default_value_t = ringpost_node::server::DEVICE_BURST, env = "RINGPOST_DEVICE_BURST")]
    device_burst: u32,
    /// Most entries kept in one device's inbox; senders get InboxFull beyond it.
    #[arg(long, default_value_t = ringpost_node::inbox::DEVICE_QUOTA_DEFAULT, env = "RINGPOST_INBOX_QUOTA")]
    inbox_quota: u64,
    /// Ping interval announced to clients, in milliseconds.
    #[arg(long, default_value_t = PING_INTERVAL_MS, env = "RINGPOST_PING_INTERVAL_MS")]
    ping_interval_ms: u32,
    /// A connection silent for this long is closed (half-open connections are reaped).
    #[arg(long, default_value_t = IDLE_TIMEOUT_MS, env = "RINGPOST_IDLE_TIMEOUT_MS")]
    idle_timeout_ms: u32,
    /// A new connection must finish its TLS/WebSocket or QUIC handshake and its Hello within
    /// this time of its accept; pings do not extend it.
    #[arg(long, default_value_t = admission::HANDSHAKE_TIMEOUT_MS_DEFAULT, env = "RINGPOST_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: u32,
    /// An anonymous session (Hello without credentials, to register or link a device) is
    /// closed this long after its Hello, however active.
    #[arg(long, default_value_t = admission::ANONYMOUS_SESSION_MS_DEFAULT, env = "RINGPOST_ANONYMOUS_SESSION_MS")]
    anonymous_session_ms: u32,
    /// Most unauthenticated connections (handshaking, before Hello, or anonymous) from one
    /// IPv4 address or IPv6 /64; more are refused at accept.
    #[arg(long, default_value_t = admission::PREAUTH_PER_SOURCE_MAX_DEFAULT, env = "RINGPOST_PREAUTH_PER_SOURCE_MAX")]
    preauth_per_source_max: u32,
    /// Most unauthenticated connections in all; more are refused at accept.
    #[arg(long, default_value_t = admission::PREAUTH_TOTAL_MAX_DEFAULT, env = "RINGPOST_PREAUTH_MAX")]
    preauth_max: u32,
    #[command(flatten)]
    push: PushArgs,
    #[command(flatten)]
    media: MediaArgs,
}

/// Wake-up pushes to devices without a connection (docs/operations.md, "Push"). With no
/// provider configured none are queued.
#[derive(clap::Args, Debug)]
struct PushArgs {
    /// Webhook that receives wake-up pushes as JSON POSTs
    /// ({"token","user","device","collapse_key"}); 2xx sent, 410 removes the token.
    #[arg(long, env = "RINGPOST_PUSH_WEBHOOK_URL")]
    push_webhook_url: Option<String>,
    /// Bearer token sent to the push webhook.
    #[arg(long, env = "RINGPOST_PUSH_WEBHOOK_TOKEN", hide_env_values = true)]
    push_webhook_token: Option<String>,
    /// File with a secret that signs each webhook body (X-Ringpost-Signature: sha256=<hex HMAC>).
    #[arg(long, env = "RINGPOST_PUSH_WEBHOOK_HMAC_SECRET_FILE")]
    push_webhook_hmac_secret_file: Option<PathBuf>,
    /// APNs token-auth signing key (the .p8 file from Apple). Needs the key id, team id and topic.
    #[arg(long, env = "RINGPOST_PUSH_APNS_KEY_FILE")]
    push_apns_key_file: Option<PathBuf>,
    /// APNs key id (the 10-character id of the .p8 key).
    #[arg(long, env = "RINGPOST_PUSH_APNS_KEY_ID")]
    push_apns_key_id: Option<String>,
    /// APNs team id.
    #[arg(long, env = "RINGPOST_PUSH_APNS_TEAM_ID")]
    push_apns_team_id: Option<String>,
    /// APNs topic: the app's bundle id.
    #[arg(long, env = "RINGPOST_PUSH_APNS_TOPIC")]
    push_apns_topic: Option<String>,
    /// APNs base URL (https://api.sandbox.push.apple.com for development builds).
    #[arg(long, default_value = ringpost_node::push::config::APNS_URL_DEFAULT, env = "RINGPOST_PUSH_APNS_URL")]
    push_apns_url: String,
    /// background (content-available, priority 5) or alert (visible, priority 10).
    #[arg(long, value_enum, default_value_t = ApnsPushTypeArg::Background, env = "RINGPOST_PUSH_APNS_PUSH_TYPE")]
    push_apns_push_type: ApnsPushTypeArg,
    /// FCM service account JSON key file (project_id, client_email, private_key, token_uri).
    #[arg(long, env = "RINGPOST_PUSH_FCM_SERVICE_ACCOUNT_FILE")]
    push_fcm_service_account_file: Option<PathBuf>,
    /// FCM base URL; messages go to <url>/v1/projects/<project>/messages:send.
    #[arg(long, default_value = ringpost_node::push::config::FCM_URL_DEFAULT, env = "RINGPOST_PUSH_FCM_URL")]
    push_fcm_url: String,
    /// OAuth2 token URL for FCM (default: the service account file's token_uri).
    #[arg(long, env = "RINGPOST_PUSH_FCM_TOKEN_URL")]
    push_fcm_token_url: Option<String>,
    /// PEM file of extra CA certificates trusted for push provider connections (a private
    /// relay; tests), besides the system's.
    #[arg(long, env = "RINGPOST_PUSH_CA_FILE")]
    push_ca_file: Option<PathBuf>,
    /// Timeout of one provider call, connect included.
    #[arg(long, default_value_t = ringpost_node::push::config::TIMEOUT_MS_DEFAULT, env = "RINGPOST_PUSH_TIMEOUT_MS")]
    push_timeout_ms: u64,
    /// Provider calls in flight at once.
    #[arg(long, default_value_t = ringpost_node::push::config::CONCURRENCY_DEFAULT, env = "RINGPOST_PUSH_CONCURRENCY")]
    push_concurrency: usize,
    /// Provider calls per push, the first included; then the push is dropped.
    #[arg(long, default_value_t = ringpost_node::push::config::ATTEMPTS_MAX_DEFAULT, env = "RINGPOST_PUSH_ATTEMPTS_MAX",
          value_parser = clap::value_parser!(u32).range(1..=32))]
    push_attempts_max: u32,
    /// Delay before the second call; doubles per call, jittered within [d/2, d].
    #[arg(long, default_value_t = ringpost_node::push::config::BACKOFF_BASE_MS_DEFAULT, env = "RINGPOST_PUSH_BACKOFF_BASE_MS")]
    push_backoff_base_ms: u64,
    /// Longest delay between two calls.
    #[arg(long, default_value_t = ringpost_node::push::config::BACKOFF_MAX_MS_DEFAULT, env = "RINGPOST_PUSH_BACKOFF_MAX_MS")]
    push_backoff_max_ms: u64,
    /// Pending pushes at most (one per device, about 100 bytes each); more are dropped.
    #[arg(long, default_value_t = ringpost_node::push::config::QUEUE_MAX_DEFAULT, env = "RINGPOST_PUSH_QUEUE_MAX")]
    push_queue_max: usize,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ApnsPushTypeArg {
    Background,
    Alert,
}

fn read_text(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// RocksDB's memory bounds from the flags; everything else at its default.
fn rocks_config(block_cache_mib: u32, write_buffer_mib: u32) -> RocksConfig {
    const MIB: usize = 1024 * 1024;
    let d = RocksConfig::default();
    let total = write_buffer_mib as usize * MIB;
    RocksConfig {
        block_cache_bytes: block_cache_mib as usize * MIB,
        write_buffer_bytes_total_max: total,
        write_buffer_bytes_per_cf: d.write_buffer_bytes_per_cf.min(total),
        ..d
    }
}

fn push_config(a: PushArgs) -> Result<ringpost_node::push::PushConfig> {
    use ringpost_node::push::{
        ApnsConfig, ApnsPushType, FcmConfig, PushConfig, RetryPolicy, WebhookConfig,
    };
    let webhook = match a.push_webhook_url {
        Some(url) => Some(WebhookConfig {
            url,
            bearer_token: a.push_webhook_token,
            hmac_secret: match a.push_webhook_hmac_secret_file {
                Some(path) => Some(read_text(&path)?.trim_end().to_owned()),
                None => None,
            },
        }),
        None => None,
    };
    let apns = match (
        a.push_apns_key_file,
        a.push_apns_key_id,
        a.push_apns_team_id,
        a.push_apns_topic,
    ) {
        (None, None, None, None) => None,
        (Some(key), Some(key_id), Some(team_id), Some(topic)) => Some(ApnsConfig {
            key_pem: read_text(&key)?,
            key_id,
            team_id,
            topic,
            url: a.push_apns_url,
            push_type: match a.push_apns_push_type {
                ApnsPushTypeArg::Background => ApnsPushType::Background,
                ApnsPushTypeArg::Alert => ApnsPushType::Alert,
            },
        }),
        _ => anyhow::bail!(
            "APNs needs all of --push-apns-key-file, --push-apns-key-id, --push-apns-team-id and --push-apns-topic"
        ),
    };
    let fcm = match a.push_fcm_service_account_file {
        Some(path) => Some(FcmConfig {
            service_account_json: read_text(&path)?,
            url: a.push_fcm_url,
            token_url: a.push_fcm_token_url,
        }),
        None => None,
    };
    let extra_ca_pem = match a.push_ca_file {
        Some(path) => {
            Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    anyhow::ensure!(
        (1..=4096).contains(&a.push_concurrency),
        "--push-concurrency must be 1 to 4096"
    );
    anyhow::ensure!(
        a.push_backoff_base_ms <= a.push_backoff_max_ms,
        "--push-backoff-base-ms must not exceed --push-backoff-max-ms"
    );
    Ok(PushConfig {
        webhook,
        apns,
        fcm,
        extra_ca_pem,
        timeout_ms: a.push_timeout_ms,
        concurrency: a.push_concurrency,
        retry: RetryPolicy {
            attempts_max: a.push_attempts_max,
            backoff_base_ms: a.push_backoff_base_ms,
            backoff_max_ms: a.push_backoff_max_ms,
            queue_max: a.push_queue_max,
        },
    })
}

/// Media (encrypted blobs; docs/protocol.md#media), with `--listen-media`.
#[derive(clap::Args, Debug)]
struct MediaArgs {
    /// The URL clients reach the media listener at, e.g. https://media.example.com (a TLS
    /// proxy in front of it); at most 72 bytes. Default: http://<bound --listen-media address>.
    #[arg(long, env = "RINGPOST_MEDIA_PUBLIC_URL")]
    media_public_url: Option<String>,
    /// Where blobs are stored: a local directory (--media-dir) or an S3-compatible bucket
    /// (--media-s3-*).
    #[arg(long, value_enum, default_value_t = MediaStoreKind::Local, env = "RINGPOST_MEDIA_STORE")]
    media_store: MediaStoreKind,
    /// Directory of the local blob store (default: DATA_DIR/media).
    #[arg(long, env = "RINGPOST_MEDIA_DIR")]
    media_dir: Option<PathBuf>,
    /// S3 bucket of the blob store (with --media-store s3).
    #[arg(long, env = "RINGPOST_MEDIA_S3_BUCKET")]
    media_s3_bucket: Option<String>,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000 (default: AWS for the region).
    #[arg(long, env = "RINGPOST_MEDIA_S3_ENDPOINT")]
    media_s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, else us-east-1).
    #[arg(long, env = "RINGPOST_MEDIA_S3_REGION")]
    media_s3_region: Option<String>,
    /// S3 access key id (default: AWS_ACCESS_KEY_ID and the other AWS_* variables).
    #[arg(long, env = "RINGPOST_MEDIA_S3_ACCESS_KEY_ID")]
    media_s3_access_key_id: Option<String>,
    /// S3 secret access key (default: AWS_SECRET_ACCESS_KEY).
    #[arg(
        long,
        env = "RINGPOST_MEDIA_S3_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    media_s3_secret_access_key: Option<String>,
    /// Largest blob a device may upload, in bytes (at most 100 MiB).
    #[arg(long, default_value_t = ringpost_wire::limits::MEDIA_BYTES_MAX, env = "RINGPOST_MEDIA_BYTES_MAX",
          value_parser = clap::value_parser!(u64).range(1..=ringpost_wire::limits::MEDIA_BYTES_MAX))]
    media_bytes_max: u64,
    /// A local media store takes an upload only if its filesystem keeps this many bytes free
    /// after it (so media never fills the database's disk).
    #[arg(long, default_value_t = ringpost_node::media::LOCAL_FREE_BYTES_MIN_DEFAULT, env = "RINGPOST_MEDIA_FREE_BYTES_MIN")]
    media_free_bytes_min: u64,
    /// Upload grants one device may get per hour (burst the same).
    #[arg(long, default_value_t = ringpost_node::media::MEDIA_UPLOADS_PER_HOUR_DEFAULT, env = "RINGPOST_MEDIA_UPLOADS_PER_HOUR",
          value_parser = clap::value_parser!(u32).range(1..))]
    media_uploads_per_hour: u32,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum MediaStoreKind {
    Local,
    S3,
}

impl MediaArgs {
    fn options(
        self,
        listen: SocketAddr,
        data_dir: &std::path::Path,
    ) -> Result<ringpost_node::runtime::MediaOptions> {
        use ringpost_node::media::store::{S3Config, StoreConfig};
        let store = match self.media_store {
            MediaStoreKind::Local => StoreConfig::Local {
                dir: self.media_dir.unwrap_or_else(|| data_dir.join("media")),
            },
            MediaStoreKind::S3 => StoreConfig::S3(S3Config {
                bucket: self
                    .media_s3_bucket
                    .context("--media-store s3 needs --media-s3-bucket")?,
                endpoint: self.media_s3_endpoint.unwrap_or_default(),
                region: self
                    .media_s3_region
                    .or_else(|| std::env::var("AWS_REGION").ok())
                    .unwrap_or_default(),
                access_key_id: self.media_s3_access_key_id.unwrap_or_default(),
                secret_access_key: self.media_s3_secret_access_key.unwrap_or_default(),
            }),
        };
        Ok(ringpost_node::runtime::MediaOptions {
            listen,
            public_url: self.media_public_url,
            store,
            blob_bytes_max: self.media_bytes_max,
            local_free_bytes_min: self.media_free_bytes_min,
        })
    }
}

#[derive(clap::Args, Debug)]
struct DevArgs {
    /// WebSocket listener (plain). Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7700", env = "RINGPOST_LISTEN_WS")]
    listen_ws: SocketAddr,
    /// WebSocket over TLS listener.
    #[arg(long, default_value = "127.0.0.1:7743", env = "RINGPOST_LISTEN_WSS")]
    listen_wss: SocketAddr,
    /// QUIC listener (UDP).
    #[arg(long, default_value = "127.0.0.1:7744", env = "RINGPOST_LISTEN_QUIC")]
    listen_quic: SocketAddr,
    /// Admin HTTP listener: /metrics, /healthz, /readyz.
    #[arg(long, default_value = "127.0.0.1:7780", env = "RINGPOST_LISTEN_ADMIN")]
    listen_admin: SocketAddr,
    /// Media HTTP listener: uploads and downloads of encrypted blobs.
    #[arg(long, default_value = "127.0.0.1:7781", env = "RINGPOST_LISTEN_MEDIA")]
    listen_media: SocketAddr,
    /// A host name or IP address the dev certificate must also cover, for wss and QUIC from
    /// other hosts (repeat it; the addresses the node listens on are added by themselves).
    #[arg(long = "tls-name", env = "RINGPOST_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// TOML file with any of these options (keys are flag names with `_` for `-`).
    #[arg(long, env = "RINGPOST_CONFIG")]
    config: Option<PathBuf>,
    /// Load and check the configuration as a start would (the files it names are read, the
    /// TLS certificate and key parsed), then exit: 0 and `configuration ok`, or the error.
    /// Binds nothing and opens no data. Also refuses config file keys that are no option
    /// (a start ignores them).
    #[arg(long)]
    check_config: bool,
    /// WebSocket listener (plain; put it behind a TLS load balancer). Omit to disable.
    #[arg(long, env = "RINGPOST_LISTEN_WS")]
    listen_ws: Option<SocketAddr>,
    /// WebSocket over TLS listener; needs --tls-cert and --tls-key. Omit to disable.
    #[arg(long, env = "RINGPOST_LISTEN_WSS")]
    listen_wss: Option<SocketAddr>,
    /// QUIC listener (UDP); needs --tls-cert and --tls-key. Omit to disable.
    #[arg(long, env = "RINGPOST_LISTEN_QUIC")]
    listen_quic: Option<SocketAddr>,
    /// Admin HTTP listener. Bind it to a private interface.
    #[arg(long, default_value = "127.0.0.1:7780", env = "RINGPOST_LISTEN_ADMIN")]
    listen_admin: SocketAddr,
    /// Media HTTP listener (uploads and downloads of encrypted blobs; put a TLS proxy in front
    /// and give its URL as --media-public-url). Omit to disable media.
    #[arg(long, env = "RINGPOST_LISTEN_MEDIA")]
    listen_media: Option<SocketAddr>,
    /// PEM certificate chain for wss and QUIC.
    #[arg(long, env = "RINGPOST_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for wss and QUIC.
    #[arg(long, env = "RINGPOST_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// SMS gateway that receives verification codes as JSON POSTs
    /// ({"to":"+<phone>","code":"<code>","channel":"sms|voice"}).
    #[arg(long, env = "RINGPOST_SMS_GATEWAY_URL")]
    sms_gateway_url: Option<String>,
    /// Bearer token for the SMS gateway.
    #[arg(long, env = "RINGPOST_SMS_GATEWAY_TOKEN", hide_env_values = true)]
    sms_gateway_token: Option<String>,
    /// SMS gateway request timeout.
    #[arg(long, default_value_t = HTTP_TIMEOUT_MS_DEFAULT, env = "RINGPOST_SMS_GATEWAY_TIMEOUT_MS")]
    sms_gateway_timeout_ms: u64,
    /// Verification codes (SMS or calls) one source address (IPv4, IPv6 /64) may request per
    /// hour, burst the same; 0: unbounded. Put the node's ws listener behind a proxy only if
    /// the proxy's address is not every client's (or raise this).
    #[arg(long, default_value_t = 10, env = "RINGPOST_CODES_PER_SOURCE_PER_HOUR")]
    codes_per_source_per_hour: u32,
    /// Verification codes this node may send per second, burst ten times it; 0: unbounded.
    #[arg(long, default_value_t = 10, env = "RINGPOST_CODES_PER_SECOND")]
    codes_per_second: u32,
    /// Write verification codes to the log instead of an SMS gateway (testing only).
    #[arg(long, env = "RINGPOST_CODES_TO_LOG")]
    codes_to_log: bool,
    /// Also append "<phone> <code>" lines to this file (testing only; implies --codes-to-log).
    #[arg(long, env = "RINGPOST_CODES_FILE")]
    codes_file: Option<PathBuf>,
    /// This node's id in the cluster (unique, stable across restarts).
    #[arg(long, default_value_t = 1, env = "RINGPOST_NODE_ID")]
    node_id: u64,
    /// Client addresses of the coordinator replicas, comma-separated. Omit to run a
    /// one-node cluster with an embedded coordinator.
    #[arg(long, env = "RINGPOST_COORDINATOR", value_delimiter = ',')]
    coordinator: Vec<SocketAddr>,
    /// File holding the cluster secret shared with the coordinators and the other nodes.
    #[arg(long, env = "RINGPOST_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// The cluster secret itself (prefer --cluster-secret-file).
    #[arg(long, env = "RINGPOST_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String>,
    /// Node-to-node QUIC listener (UDP).
    #[arg(long, default_value = "127.0.0.1:7790", env = "RINGPOST_LISTEN_PEER")]
    listen_peer: SocketAddr,
    /// Keep-alive interval of the node-to-node links, in ms: sent on a link with nothing else
    /// to send. At most half of --peer-idle-timeout-ms.
    #[arg(long, default_value_t = ringpost_node::peer::link::PEER_KEEP_ALIVE_MS, env = "RINGPOST_PEER_KEEP_ALIVE_MS")]
    peer_keep_alive_ms: u64,
    /// A peer silent this long (ms, 1000 to 60000) is dead: its link fails, with the calls
    /// waiting on it. Raise both where many nodes share a host (each node keeps a link to every
    /// node it shares a shard with, and pays for its keep-alives).
    #[arg(long, default_value_t = ringpost_node::peer::link::PEER_IDLE_TIMEOUT_MS, env = "RINGPOST_PEER_IDLE_TIMEOUT_MS")]
    peer_idle_timeout_ms: u32,
    /// Peer address other nodes dial (default: the bound --listen-peer address).
    #[arg(long, env = "RINGPOST_ADVERTISE_PEER")]
    advertise_peer: Option<String>,
    /// WebSocket URL announced for redirects (default: ws://<bound address>).
    #[arg(long, env = "RINGPOST_ADVERTISE_WS")]
    advertise_ws: Option<String>,
    /// WebSocket-over-TLS URL announced for redirects (default: wss://<bound address>).
    #[arg(long, env = "RINGPOST_ADVERTISE_WSS")]
    advertise_wss: Option<String>,
    /// QUIC host:port announced for redirects (default: the bound address).
    #[arg(long, env = "RINGPOST_ADVERTISE_QUIC")]
    advertise_quic: Option<String>,
    /// Failure zone (rack, availability zone) of this node.
    #[arg(long, default_value = "", env = "RINGPOST_ZONE")]
    zone: String,
    /// Shards of the cluster (must equal the coordinator's, fixed at `init`).
    #[arg(long, default_value_t = ringpost_node::shard::SHARD_COUNT_DEFAULT, env = "RINGPOST_SHARD_COUNT")]
    shard_count: u16,
    /// Ship every shard write to the shard's in-sync replicas and acknowledge it only once
    /// they have it, fail shards over to them, catch replicas up and move shards live (with
    /// --coordinator; docs/replication.md). On by default; `--replicate false` (or
    /// RINGPOST_REPLICATE=false) keeps one copy per shard, as before replication existed.
    #[arg(
        long,
        env = "RINGPOST_REPLICATE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    replicate: bool,
    /// How long a replica has to answer one replication request, in ms. A replica that does
    /// not is dropped from the shards' in-sync sets (their writes go on without it) and must be
    /// caught up to come back. Longer keeps a slow replica (an overloaded host) in sync; a dead
    /// one then holds its shards' writes this long before it is dropped.
    #[arg(long, default_value_t = ringpost_node::replication::sink::REPLICA_ACK_TIMEOUT_MS,
          env = "RINGPOST_REPLICA_ACK_TIMEOUT_MS",
          value_parser = clap::value_parser!(u64).range(
              ringpost_node::replication::sink::REPLICA_ACK_TIMEOUT_MS_MIN
                  ..=ringpost_node::replication::sink::REPLICA_ACK_TIMEOUT_MS_MAX))]
    replica_ack_timeout_ms: u64,
    /// When a user's shard moves to another node (a join, a drain, a failover), its connected
    /// devices are told to reconnect there after a delay drawn from [0, this] milliseconds:
    /// N moved devices reconnect at about N / this per millisecond, and each is offline at
    /// most this long plus its reconnect.
    #[arg(long, default_value_t = ringpost_node::conn::MIGRATE_SPREAD_MS_DEFAULT, env = "RINGPOST_MIGRATE_SPREAD_MS",
          value_parser = clap::value_parser!(u32).range(0..=i64::from(ringpost_node::conn::MIGRATE_SPREAD_MS_MAX)))]
    migrate_spread_ms: u32,
    /// How long a status item lives after it is posted, in milliseconds (24 hours; shorter
    /// only for tests).
    #[arg(long, default_value_t = ringpost_node::status::STATUS_TTL_MS, env = "RINGPOST_STATUS_TTL_MS",
          value_parser = clap::value_parser!(u64).range(1..=ringpost_node::status::STATUS_TTL_MS))]
    status_ttl_ms: u64,
    #[command(flatten)]
    common: Common,
}

fn main() -> Result<()> {
    let thp = disable_transparent_huge_pages();
    let config = load_config_file()?;
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = thp {
        tracing::warn!(error = %e, "could not turn transparent huge pages off for this process");
    }
    let dev = matches!(cli.command, Command::Dev(_));
    let opts = match cli.command {
        Command::Dev(args) => dev_options(*args)?,
        Command::Run(args) if args.check_config => return check_config(*args, config),
        Command::Run(args) => run_options(*args)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(opts, dev))
}

/// Transparent huge pages off for this process (prctl `PR_SET_THP_DISABLE`, Linux 3.15+),
/// first thing in `main`. mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), so the
/// kernel backs them 2 MiB at a time, and khugepaged fills the pages mimalloc hands back in
/// again. On one host (BENCHMARKS.md, "Huge pages"): after a 72-node cluster restart, 18 nodes
/// with huge pages held 186 MiB each on average at rest, 18 without (`MIMALLOC_ALLOW_THP=0`,
/// which makes this same call) 126 MiB; single nodes restarted into the settled cluster held
/// 143–175 MiB with them and 65–67 MiB with this call. Nothing here is large and hot enough to
/// gain from huge pages.
fn disable_transparent_huge_pages() -> nix::Result<()> {
    nix::sys::prctl::set_thp_disable(true)
}

/// `ringpost-node run --check-config`: everything a start checks before it opens data or
/// binds ([`run_options`], then [`ringpost_node::runtime::check_options`]), and no file key
/// that is no option of `run`.
fn check_config(args: RunArgs, config: Option<ConfigFile>) -> Result<()> {
    if let Some(file) = &config {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").context("the run subcommand")?;
        // `run`'s own options and the global ones (--log-format).
        let known: std::collections::HashSet<String> = run
            .get_arguments()
            .chain(cli.get_arguments())
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        let unknown: Vec<&str> = file
            .keys
            .iter()
            .filter(|k| !known.contains(&config_key_var(k)))
            .map(String::as_str)
            .collect();
        anyhow::ensure!(
            unknown.is_empty(),
            "config {}: unknown option(s) {} (a start would ignore them)",
            file.path,
            unknown.join(", ")
        );
    }
    let opts = run_options(args)?;
    ringpost_node::runtime::check_options(&opts)?;
    match &config {
        Some(file) => println!("configuration ok: {}", file.path),
        None => println!("configuration ok"),
    }
    Ok(())
}

/// The config file read by [`load_config_file`]: its path and keys.
struct ConfigFile {
    path: String,
    keys: Vec<String>,
}

/// The environment variable a config file key sets.
fn config_key_var(key: &str) -> String {
    format!("RINGPOST_{}", key.replace('-', "_").to_ascii_uppercase())
}

/// Reads `--config FILE` (or RINGPOST_CONFIG) before clap runs and exports each key as its
/// RINGPOST_* variable unless the environment already sets it, so flags and environment
/// override the file and clap validates every value the same way.
fn load_config_file() -> Result<Option<ConfigFile>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_string))
        })
        .or_else(|| std::env::var("RINGPOST_CONFIG").ok());
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config {path}"))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("parsing config {path}"))?;
    let keys = table.keys().cloned().collect();
    for (key, value) in table {
        let var = config_key_var(&key);
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => anyhow::bail!(
                "config {path}: `{key}` must be a string, integer or boolean, not {other}"
            ),
        };
        if std::env::var_os(&var).is_none() {
            // Single-threaded here: nothing else reads the environment concurrently.
            std::env::set_var(var, value);
        }
    }
    Ok(Some(ConfigFile { path, keys }))
}

fn node_options(common: Common) -> Result<(NodeOptions, MediaArgs)> {
    let server = ringpost_node::server::ServerConfig {
        device_rate_per_s: common.device_rate,
        device_burst: common.device_burst,
        keepalive: Keepalive {
            ping_interval_ms: common.ping_interval_ms,
            idle_timeout_ms: common.idle_timeout_ms,
        },
        preauth: PreAuthLimits {
            handshake_timeout_ms: common.handshake_timeout_ms,
            anonymous_session_ms: common.anonymous_session_ms,
            per_source_max: common.preauth_per_source_max,
            total_max: common.preauth_max,
        },
        ..Default::default()
    };
    let mut server = server;
    use ringpost_node::budgets::Budget;
    server.budgets.media_uploads = Budget::per_hour(
        common.media.media_uploads_per_hour,
        common.media.media_uploads_per_hour,
    );
    let inbox = ringpost_node::inbox::InboxConfig {
        device_quota: common.inbox_quota,
        ..Default::default()
    };
    let opts = NodeOptions {
        codes: CodeDelivery::Log { file: None },
        cluster: None,
        data_dir: common.data_dir,
        listen_ws: None,
        ws_driver: common.ws_driver,
        quic_shards: usize::from(common.quic_shards),
        listen_wss: None,
        listen_quic: None,
        listen_admin: None,
        tls: None,
        tls_names: Vec::new(),
        server,
        inbox,
        rocks: rocks_config(
            common.rocksdb_block_cache_mib,
            common.rocksdb_write_buffer_mib,
        ),
        replicate: false,
        replica_ack_timeout: std::time::Duration::from_millis(
            ringpost_node::replication::sink::REPLICA_ACK_TIMEOUT_MS,
        ),
        replication: None,
        push: push_config(common.push)?,
        media: None,
    };
    Ok((opts, common.media))
}

fn dev_options(args: DevArgs) -> Result<NodeOptions> {
    let (mut opts, media) = node_options(args.common)?;
    opts.media = Some(media.options(args.listen_media, &opts.data_dir)?);
    opts.codes = CodeDelivery::Log {
        file: Some(opts.data_dir.join("verification-codes.txt")),
    };
    opts.listen_ws = Some(args.listen_ws);
    opts.listen_wss = Some(args.listen_wss);
    opts.listen_quic = Some(args.listen_quic);
    opts.listen_admin = Some(args.listen_admin);
    opts.tls_names = args.tls_names;
    Ok(opts)
}

fn run_options(args: RunArgs) -> Result<NodeOptions> {
    let (mut opts, media) = node_options(args.common)?;
    if let Some(listen) = args.listen_media {
        opts.media = Some(media.options(listen, &opts.data_dir)?);
    }
    use ringpost_node::budgets::Budget;
    opts.server.budgets.codes_per_source = (args.codes_per_source_per_hour > 0).then(|| {
        Budget::per_hour(
            args.codes_per_source_per_hour,
            args.codes_per_source_per_hour,
        )
    });
    opts.server.budgets.codes_total = (args.codes_per_second > 0).then(|| {
        Budget::per_second(
            args.codes_per_second,
            args.codes_per_second.saturating_mul(10),
        )
    });
    let needs_tls = args.listen_wss.is_some() || args.listen_quic.is_some();
    opts.tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(CertPaths {
            cert,
            key,
            ca: None,
        }),
        (None, None) if !needs_tls => None,
        _ => anyhow::bail!("--listen-wss and --listen-quic need both --tls-cert and --tls-key"),
    };
    anyhow::ensure!(
        args.listen_ws.is_some() || needs_tls,
        "no client listener: set at least one of --listen-ws, --listen-wss, --listen-quic"
    );
    let codes_to_log = args.codes_to_log || args.codes_file.is_some();
    opts.codes = match (args.sms_gateway_url, codes_to_log) {
        (Some(url), false) => CodeDelivery::Http(HttpCodeSenderConfig {
            url,
            bearer_token: args.sms_gateway_token,
            timeout_ms: args.sms_gateway_timeout_ms,
        }),
        (None, true) => CodeDelivery::Log {
            file: args.codes_file,
        },
        (Some(_), true) => anyhow::bail!("choose one of --sms-gateway-url and --codes-to-log"),
        (None, false) => anyhow::bail!(
            "verification codes need a destination: --sms-gateway-url URL (or --codes-to-log for testing)"
        ),
    };
    opts.server.node_id = args.node_id;
    opts.server.shard_count = args.shard_count;
    opts.replicate = args.replicate;
    opts.replica_ack_timeout = std::time::Duration::from_millis(args.replica_ack_timeout_ms);
    opts.server.migrate_spread_ms = args.migrate_spread_ms;
    opts.server.status_ttl_ms = args.status_ttl_ms;
    if !args.coordinator.is_empty() {
        let secret = match (args.cluster_secret, args.cluster_secret_file) {
            (Some(s), None) => s.into_bytes(),
            (None, Some(path)) => {
                let mut raw =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                while raw.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    raw.pop();
                }
                raw
            }
            (Some(_), Some(_)) => {
                anyhow::bail!("give either --cluster-secret or --cluster-secret-file, not both")
            }
            (None, None) => {
                anyhow::bail!("--coordinator needs the cluster secret: --cluster-secret-file FILE")
            }
        };
        let peer_liveness = ringpost_node::peer::link::PeerLiveness::new(
            std::time::Duration::from_millis(args.peer_keep_alive_ms),
            std::time::Duration::from_millis(args.peer_idle_timeout_ms.into()),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let secret = ringpost_coordinator::ClusterSecret::new(secret).map_err(|e| {
            anyhow::anyhow!("the cluster secret must be 16 to 1024 bytes, not {}", e.0)
        })?;
        opts.cluster = Some(ringpost_node::cluster::ClusterOptions {
            coordinators: args.coordinator,
            secret,
            listen_peer: args.listen_peer,
            advertise_peer: args.advertise_peer,
            advertise_ws: args.advertise_ws,
            advertise_wss: args.advertise_wss,
            advertise_quic: args.advertise_quic,
            zone: args.zone,
            peer_liveness,
        });
    }
    opts.listen_ws = args.listen_ws;
    opts.listen_wss = args.listen_wss;
    opts.listen_quic = args.listen_quic;
    opts.listen_admin = Some(args.listen_admin);
    Ok(opts)
}

async fn serve(opts: NodeOptions, dev: bool) -> Result<()> {
    let data_dir = opts.data_dir.clone();
    let codes_file = match &opts.codes {
        CodeDelivery::Log { file } => file.clone(),
        CodeDelivery::Http(_) => None,
    };
    let mut signals = Signals::register()?;
    let node = Node::start(opts).await?;
    // Machine-readable lines (tests and scripts parse them), then a human summary.
    let b = &node.bound;
    if let Some(a) = b.ws {
        println!("listening ws ws://{a}");
    }
    if let Some(a) = b.wss {
        println!("listening wss wss://{a}");
    }
    if let Some(a) = b.quic {
        println!("listening quic quic://{a}");
    }
    if let Some(a) = b.admin {
        println!("listening admin http://{a}");
    }
    if let Some(a) = b.media {
        println!("listening media http://{a}");
    }
    if let Some(ca) = &node.ca {
        println!("dev CA certificate (trust it in clients): {}", ca.display());
    }
    // Clients are accepted once the node has taken over its shards; say ready only then.
    tokio::select! {
        _ = node.ready() => {}
        _ = signals.wait() => {
            node.shutdown().await;
            return Ok(());
        }
    }
    match codes_file {
        Some(f) if dev => println!(
            "ringpost dev node ready; data in {}; verification codes in {}; Ctrl-C stops it",
            data_dir.display(),
            f.display()
        ),
        Some(f) => println!(
            "ringpost node ready; data in {}; verification codes in {}",
            data_dir.display(),
            f.display()
        ),
        None => println!("ringpost node ready; data in {}", data_dir.display()),
    }
    tokio::select! {
        _ = signals.wait() => {}
        _ = node.left_cluster() => println!("ringpost node drained and left the cluster"),
    }
    node.shutdown().await;
    Ok(())
}

/// SIGTERM and SIGINT, registered before the node says it is ready, so a signal sent right
/// after the ready line is handled gracefully rather than killing the process.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("registering SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("registering SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The log filter without `RUST_LOG`: ours at info (one line per event), libraries (openraft,
/// quinn, rustls, RocksDB's bindings) at warn, so their internals stay out of an operator's way.
const DEFAULT_LOG_FILTER: &str = "warn,ringpost_node=info,ringpost_coordinator=info";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
