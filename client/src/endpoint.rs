//! [`Endpoint`]: where to connect, parsed from `ws://`, `wss://` or `quic://` URLs.

use std::fmt;

use ringpost_wire::{Migrate, Redirect};

use crate::error::{ClientError, Result};

/// Longest URL accepted, in bytes (a host name is at most 253 bytes; the rest is a path).
pub const URL_BYTES_MAX: usize = 1024;

/// How to reach a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// WebSocket over TCP; default port 80.
    Ws,
    /// WebSocket over TLS; default port 443.
    Wss,
    /// QUIC with ALPN `ringpost/1`; default port 443.
    Quic,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Quic => "quic",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Ws => 80,
            Scheme::Wss | Scheme::Quic => 443,
        }
    }
}

/// A parsed node address: `scheme://host[:port][/path]`.
///
/// `host` is kept without the brackets of an IPv6 literal. `path` (with any query) is only used by
/// WebSocket upgrades and is `/` when the URL has none; QUIC URLs take no path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Endpoint {
    /// Parses `ws://host:port`, `wss://host:port/path`, `quic://host:port`, `quic://[::1]:4433`.
    ///
    /// Refused: other schemes, user info (`user@host`), an empty host, a port of 0 or over 65535,
    /// a path on a QUIC URL, fragments, and whitespace or control characters anywhere.
    pub fn parse(url: &str) -> Result<Endpoint> {
        let bad = |reason: &str| ClientError::InvalidUrl {
            url: url.chars().take(URL_BYTES_MAX).collect(),
            reason: reason.to_string(),
        };
        if url.len() > URL_BYTES_MAX {
            return Err(bad("longer than URL_BYTES_MAX"));
        }
        if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace or control characters"));
        }
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("missing scheme (ws://, wss:// or quic://)"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            "quic" => Scheme::Quic,
            _ => return Err(bad("scheme must be ws, wss or quic")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains('#') {
            return Err(bad("fragments are not allowed"));
        }
        if authority.contains('@') {
            return Err(bad("user info is not allowed"));
        }
        let (host, port) = split_host_port(authority).map_err(bad)?;
        let port = match port {
            Some(p) => p,
            None => scheme.default_port(),
        };
        let path = match (scheme, path) {
            (Scheme::Quic, "" | "/") => "/".to_string(),
            (Scheme::Quic, _) => return Err(bad("a quic:// URL takes no path")),
            (_, "") => "/".to_string(),
            (_, p) if p.starts_with('?') => format!("/{p}"),
            (_, p) => p.to_string(),
        };
        Ok(Endpoint {
            scheme,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// `host:port` as it goes in a `Host` header or a QUIC address (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Where a `Redirect` sends a client that reached us over this endpoint's transport:
    /// `ws_url` for WebSocket (plain or TLS), `quic_addr` for QUIC.
    pub fn redirect_target(&self, redirect: &Redirect) -> Result<Endpoint> {
        self.target(&redirect.ws_url, &redirect.quic_addr, "redirected")
    }

    /// Where a `Migrate` sends a client that reached us over this endpoint's transport: chosen
    /// exactly as for a `Redirect` ([`Endpoint::redirect_target`]).
    pub fn migrate_target(&self, migrate: &Migrate) -> Result<Endpoint> {
        self.target(&migrate.ws_url, &migrate.quic_addr, "migrated")
    }

    fn target(&self, ws_url: &str, quic_addr: &str, how: &str) -> Result<Endpoint> {
        let url = match self.scheme {
            Scheme::Ws | Scheme::Wss => ws_url.to_string(),
            Scheme::Quic if quic_addr.contains("://") => quic_addr.to_string(),
            Scheme::Quic if !quic_addr.is_empty() => format!("quic://{quic_addr}"),
            Scheme::Quic => String::new(),
        };
        if url.is_empty() {
            return Err(ClientError::Protocol(format!(
                "{how} to a node without a {} address",
                self.scheme.as_str()
            )));
        }
        Endpoint::parse(&url)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())?;
        if self.scheme != Scheme::Quic && self.path != "/" {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self> {
        Endpoint::parse(s)
    }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(authority: &str) -> std::result::Result<(&str, Option<u16>), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [ in host")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("not an IPv6 address inside [ ]");
        }
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("junk after ]")?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err("IPv6 addresses must be in brackets")
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("empty host");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
    {
        return Err("host has characters other than letters, digits, '.', '-', '_'");
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err("port must be 1-65535"),
            Ok(p) => Some(p),
        },
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(url: &str) -> Endpoint {
        Endpoint::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn parses_the_three_schemes() {
        assert_eq!(
            ep("ws://127.0.0.1:8080"),
            Endpoint {
                scheme: Scheme::Ws,
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/".into()
            }
        );
        let wss = ep("wss://localhost:8443/v1/ws?x=1");
        assert_eq!(
            (wss.scheme, wss.host.as_str(), wss.port, wss.path.as_str()),
            (Scheme::Wss, "localhost", 8443, "/v1/ws?x=1")
        );
        let quic = ep("quic://node-1.example.com:4433");
        assert_eq!(
            (quic.scheme, quic.host.as_str(), quic.port),
            (Scheme::Quic, "node-1.example.com", 4433)
        );
        assert_eq!(ep("QUIC://h:1/").scheme, Scheme::Quic);
    }

    #[test]
    fn default_ports_and_queries() {
        assert_eq!(ep("ws://h").port, 80);
        assert_eq!(ep("wss://h").port, 443);
        assert_eq!(ep("quic://h").port, 443);
        assert_eq!(ep("ws://h:1?a=b").path, "/?a=b");
    }

    #[test]
    fn ipv6_literals() {
        let e = ep("quic://[::1]:4433");
        assert_eq!((e.host.as_str(), e.port), ("::1", 4433));
        assert_eq!(e.authority(), "[::1]:4433");
        assert_eq!(e.to_string(), "quic://[::1]:4433");
        assert_eq!(ep("ws://[fe80::1]").port, 80);
        assert!(Endpoint::parse("ws://::1:80").is_err());
        assert!(Endpoint::parse("ws://[::1").is_err());
        assert!(Endpoint::parse("ws://[nothex]:1").is_err());
    }

    #[test]
    fn refuses_bad_urls() {
        for url in [
            "",
            "127.0.0.1:80",
            "http://h:80",
            "ws://",
            "ws://:80",
            "ws://h:0",
            "ws://h:65536",
            "ws://h:port",
            "ws://user@h:80",
            "ws://h:80/a b",
            "ws://h:80/\r\nX: y",
            "ws://h:80/#frag",
            "quic://h:1/path",
            "ws://h%41:1",
        ] {
            assert!(
                matches!(Endpoint::parse(url), Err(ClientError::InvalidUrl { .. })),
                "{url:?} should be refused"
            );
        }
        let long = format!("ws://h:1/{}", "a".repeat(URL_BYTES_MAX));
        assert!(Endpoint::parse(&long).is_err());
    }

    #[test]
    fn display_round_trips() {
        for url in ["ws://h:1", "wss://h:2/p?q", "quic://1.2.3.4:5"] {
            assert_eq!(ep(url).to_string(), url);
            assert_eq!(ep(&ep(url).to_string()), ep(url));
        }
    }

    #[test]
    fn redirect_targets_follow_the_transport() {
        let redirect = Redirect {
            user: 1,
            epoch: 2,
            ws_url: "wss://b:8443".into(),
            quic_addr: "b:4433".into(),
        };
        assert_eq!(
            ep("ws://a:1").redirect_target(&redirect).unwrap(),
            ep("wss://b:8443")
        );
        assert_eq!(
            ep("quic://a:1").redirect_target(&redirect).unwrap(),
            ep("quic://b:4433")
        );
        let none = Redirect {
            quic_addr: String::new(),
            ..redirect
        };
        assert!(matches!(
            ep("quic://a:1").redirect_target(&none),
            Err(ClientError::Protocol(_))
        ));
    }

    #[test]
    fn migrate_targets_follow_the_transport_like_redirects() {
        let migrate = Migrate {
            user: 1,
            epoch: 3,
            ws_url: "ws://b:7700".into(),
            quic_addr: "b:4433".into(),
            reconnect_after_ms: 10,
        };
        for from in ["ws://a:1", "wss://a:2", "quic://a:3"] {
            let redirect = Redirect {
                user: migrate.user,
                epoch: migrate.epoch,
                ws_url: migrate.ws_url.clone(),
                quic_addr: migrate.quic_addr.clone(),
            };
            assert_eq!(
                ep(from).migrate_target(&migrate).unwrap(),
                ep(from).redirect_target(&redirect).unwrap(),
                "from {from}"
            );
        }
        assert_eq!(
            ep("quic://a:1").migrate_target(&migrate).unwrap(),
            ep("quic://b:4433")
        );
        let no_ws = Migrate {
            ws_url: String::new(),
            ..migrate
        };
        assert!(matches!(
            ep("ws://a:1").migrate_target(&no_ws),
            Err(ClientError::Protocol(m)) if m.contains("migrated to a node without a ws address")
        ));
    }
}
