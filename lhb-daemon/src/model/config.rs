//! The configuration file (TOML; its keys are in the README under "Use"): `[[expose]]`
//! entries become rules.
//!
//! Every mistake is reported with the file, the line and the reason, and a file that
//! fails to load changes nothing: the caller keeps what it had.

use std::{ops::Range, path::Path};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

use crate::model::rule::{self, Rule, RuleError};

/// The control socket when none is given (`--control`).
pub const DEFAULT_CONTROL: &str = "/run/lhb/lhb.sock";

/// `--mode` and `mode =`: which data path serves the rules. One definition for the
/// command line (clap), the config file and `lhb status` (serde).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The kernel path where it can serve, the proxy elsewhere.
    #[default]
    Auto,
    Kernel,
    Proxy,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Kernel => "kernel",
            Mode::Proxy => "proxy",
        })
    }
}

/// `--firewall` and `firewall =`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FirewallMode {
    /// Whatever filters input on this host: firewalld if it runs, the iptables
    /// variants in use, and native nftables base chains (not firewalld's own).
    #[default]
    Auto,
    /// firewalld alone, over D-Bus: runtime rich rules in the bridge's zone.
    Firewalld,
    Nftables,
    Iptables,
    None,
}

/// Where the metrics are served: `unix:PATH` or a loopback `ADDR:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(std::path::PathBuf),
    Tcp(std::net::SocketAddr),
    Off,
}

pub fn parse_metrics(s: &str) -> Result<MetricsAddr, String> {
    if s == "none" || s == "off" {
        return Ok(MetricsAddr::Off);
    }
    if let Some(p) = s.strip_prefix("unix:") {
        if !p.starts_with('/') {
            return Err(format!("metrics `{s}`: the socket path must be absolute"));
        }
        return Ok(MetricsAddr::Unix(p.into()));
    }
    let addr: std::net::SocketAddr = s.parse().map_err(|_| {
        format!("metrics `{s}` is not `unix:/PATH`, a loopback `ADDR:PORT` (e.g. 127.0.0.1:9464) or `none`")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "metrics `{s}`: only a loopback address (127.0.0.1, [::1]) is allowed; lhb exposes nothing elsewhere"
        ));
    }
    Ok(MetricsAddr::Tcp(addr))
}

/// What a config file holds.
#[derive(Debug, Default)]
pub struct Config {
    pub rules: Vec<Rule>,
    pub mode: Option<Mode>,
    pub firewall: Option<FirewallMode>,
    /// `metrics =`: where the Prometheus endpoint is served.
    pub metrics: Option<MetricsAddr>,
    /// `label_allow =`: what a Docker network's `lhb.expose` label may ask for.
    pub label_allow: Vec<crate::model::labels::Entry>,
    /// `engine =`: the Docker and Podman API sockets to read (`unix://PATH`).
    pub engine: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: {error}")]
    Read { file: String, error: std::io::Error },
    #[error("{file}:{line}: {reason}")]
    Invalid {
        file: String,
        line: usize,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    mode: Option<Mode>,
    firewall: Option<FirewallMode>,
    metrics: Option<Spanned<String>>,
    #[serde(default)]
    label_allow: Vec<Spanned<String>>,
    #[serde(default)]
    engine: Vec<Spanned<String>>,
    #[serde(default)]
    expose: Vec<Spanned<Expose>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expose {
    network: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    service: Option<String>,
    port: Spanned<i64>,
    protocol: Option<Spanned<String>>,
    target: Option<Spanned<TargetValue>>,
    max_connections: Option<Spanned<i64>>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    allow_uplinks: bool,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
}

/// `target = 8080` and `target = "127.0.0.1:8080"` are both accepted.
#[derive(Deserialize)]
#[serde(untagged)]
enum TargetValue {
    Port(i64),
    Text(String),
}

/// Reads `path`. A file that does not exist holds no rules.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
        Err(error) => return Err(ConfigError::Read { file, error }),
    };
    parse(&file, &text)
}

/// Parses the text of a config file named `file` (for messages).
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
    let invalid = |span: Option<Range<usize>>, reason: String| ConfigError::Invalid {
        file: file.to_string(),
        line: span.map(|s| line_of(text, s.start)).unwrap_or(1),
        reason,
    };
    let parsed: File =
        toml::from_str(text).map_err(|e| invalid(e.span(), e.message().to_string()))?;
    let (mode, firewall) = (parsed.mode, parsed.firewall);
    let metrics = parsed
        .metrics
        .map(|m| parse_metrics(m.get_ref()).map_err(|why| invalid(Some(m.span()), why)))
        .transpose()?;
    let mut label_allow = Vec::new();
    for entry in parsed.label_allow {
        let e = crate::model::labels::Entry::parse(entry.get_ref())
            .map_err(|err| invalid(Some(entry.span()), format!("label_allow: {err}")))?;
        if !label_allow.contains(&e) {
            label_allow.push(e);
        }
    }
    let mut engine = Vec::new();
    for e in parsed.engine {
        let addr = e.get_ref();
        if !addr.starts_with("unix:///") || addr.contains(char::is_whitespace) {
            return Err(invalid(
                Some(e.span()),
                format!("engine `{addr}` is not unix:///PATH (an API socket of Docker or Podman)"),
            ));
        }
        engine.push(addr.clone());
    }
    let mut rules = Vec::new();
    let mut seen: Vec<(Rule, Range<usize>)> = Vec::new();
    for entry in parsed.expose {
        let span = entry.span();
        let e = entry.into_inner();
        let (name, network) = match (e.network, e.interface) {
            (Some(n), None) => (n, true),
            (None, Some(i)) => (i, false),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    Some(span),
                    "[[expose]] has both `network` and `interface`; give exactly one".into(),
                ));
            }
            (None, None) => {
                return Err(invalid(
                    Some(span),
                    "[[expose]] needs `network = \"NAME\"` (a Docker network) or `interface = \"IFACE\"` (a bridge)".into(),
                ));
            }
        };
        let source = rule::source(name.get_ref(), name.get_ref(), network)
            .map_err(|err| invalid(Some(name.span()), err.to_string()))?;
        let port_span = e.port.span();
        let port = port_value(*e.port.get_ref()).ok_or_else(|| {
            invalid(
                Some(port_span.clone()),
                format!("port {} is not in 1..=65535", e.port.get_ref()),
            )
        })?;
        let target = match e.target {
            None => None,
            Some(t) => {
                let span = t.span();
                let parsed = match t.into_inner() {
                    TargetValue::Port(p) => port_value(p)
                        .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
                        .ok_or_else(|| RuleError::Port {
                            spec: "target".into(),
                            port: p.to_string(),
                        }),
                    TargetValue::Text(s) => rule::parse_target(&s, &s),
                };
                Some(parsed.map_err(|err| invalid(Some(span), err.to_string()))?)
            }
        };
        let mut r = Rule::new(source, port, target, e.service);
        if let Some(p) = e.protocol {
            r.protocol = rule::Protocol::parse(p.get_ref()).ok_or_else(|| {
                invalid(
                    Some(p.span()),
                    format!(
                        "protocol = \"{}\" is not \"tcp\", \"udp\" or \"both\"",
                        p.get_ref()
                    ),
                )
            })?;
            if e.proxy_protocol && r.protocol.udp() {
                return Err(invalid(
                    Some(p.span()),
                    format!(
                        "proxy_protocol = true is for TCP rules; a {} rule's datagrams carry no PROXY header (the service sees the bridge's loopback source)",
                        r.protocol
                    ),
                ));
            }
        }
        r.proxy_protocol = e.proxy_protocol;
        r.given = format!("{file}:{}", line_of(text, span.start));
        r.allow_uplinks = e.allow_uplinks;
        for entry in &e.allow {
            let c =
                rule::Client::parse(entry.get_ref(), entry.get_ref(), network).map_err(|err| {
                    let reason = match err {
                        RuleError::Allow { entry, why, .. } => {
                            format!("allow entry `{entry}`: {why}")
                        }
                        other => other.to_string(),
                    };
                    invalid(Some(entry.span()), reason)
                })?;
            if !r.allow.contains(&c) {
                r.allow.push(c);
            }
        }
        if let Some(m) = e.max_connections {
            let span = m.span();
            let n = *m.get_ref();
            if !(1..=1_000_000).contains(&n) {
                return Err(invalid(
                    Some(span),
                    format!("max_connections = {n} is not in 1..=1000000"),
                ));
            }
            r.max_connections = Some(n as usize);
        }
        if let Some((_, first)) = seen.iter().find(|(o, _)| o.key() == r.key()) {
            return Err(invalid(
                Some(span),
                format!(
                    "duplicate rule {}:{} (first given on line {})",
                    r.source,
                    r.port,
                    line_of(text, first.start)
                ),
            ));
        }
        seen.push((r.clone(), span));
        rules.push(r);
    }
    Ok(Config {
        rules,
        mode,
        firewall,
        metrics,
        label_allow,
        engine,
    })
}

fn port_value(p: i64) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    /// The package's /etc/lhb/lhb.toml: serves nothing as shipped, and each example in
    /// it, uncommented, is a valid rule (so the comments cannot rot).
    #[test]
    fn the_packaged_config_holds_no_rule_and_valid_examples() {
        let text = include_str!("../../debian/lhb.toml");
        let shipped = parse("lhb.toml", text).unwrap();
        assert!(shipped.rules.is_empty() && shipped.mode.is_none());
        let examples: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(rest) if !rest.starts_with([' ', '\t']) && !rest.is_empty() => rest,
                _ => l,
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let all = parse("lhb.toml", &examples).unwrap();
        assert_eq!(all.rules.len(), 3, "{examples}");
        assert!(all.mode.is_some() && all.firewall.is_some() && all.metrics.is_some());
        assert_eq!(all.label_allow.len(), 2);
        assert_eq!(all.engine.len(), 2);
    }

    use super::*;
    use crate::model::rule::Source;

    fn err(text: &str) -> String {
        parse("lhb.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn the_product_example_loads() {
        let cfg = parse(
            "lhb.toml",
            r#"
mode = "proxy"

[[expose]]
network = "windmill_default"   # Docker network name
service = "gateway"
port = 18789
target = "127.0.0.1:18789"
max_connections = 200

[[expose]]
interface = "virbr0"
port = 11434
"#,
        )
        .unwrap();
        assert_eq!(cfg.mode, Some(Mode::Proxy));
        let rules = cfg.rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].source, Source::Network("windmill_default".into()));
        assert_eq!(rules[0].service, "gateway");
        assert_eq!(rules[1].source, Source::Interface("virbr0".into()));
        assert_eq!(rules[1].target, "127.0.0.1:11434".parse().unwrap());
        assert_eq!(rules[1].service, "port-11434");
        assert_eq!(rules[0].max_connections, Some(200));
        assert_eq!(rules[1].max_connections, None);
    }

    #[test]
    fn a_rule_may_name_its_clients() {
        let c = parse(
            "f",
            "[[expose]]\ninterface = \"virbr0\"\nport = 5432\nallow = [\"192.168.122.10\", \"fd00::/64\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.rules[0],
            crate::model::rule::parse_iface_spec("virbr0:5432@192.168.122.10,fd00::/64").unwrap()
        );
    }

    #[test]
    fn a_rule_may_serve_udp() {
        let c = parse(
            "f",
            "[[expose]]\ninterface = \"br0\"\nport = 53\nprotocol = \"both\"\ntarget = \"127.0.0.53:53\"\n\n[[expose]]\ninterface = \"br0\"\nport = 8125\nprotocol = \"udp\"\n",
        )
        .unwrap();
        assert_eq!(c.rules[0].protocol, crate::model::rule::Protocol::Both);
        assert_eq!(c.rules[1].protocol, crate::model::rule::Protocol::Udp);
        assert_eq!(c.rules[1].target, "127.0.0.1:8125".parse().unwrap());
    }

    #[test]
    fn every_mistake_names_the_line_and_the_reason() {
        let cases = [
            (
                "[[expose]]\nnetwork = \"n\"\nport = 80\ncolour = 1\n",
                4,
                "unknown field `colour`",
            ),
            ("bogus = 1\n", 1, "unknown field `bogus`"),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 80\nmax_connections = 0\n",
                4,
                "max_connections = 0 is not in 1..=1000000",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 0\n",
                3,
                "port 0 is not in 1..=65535",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 70000\n",
                3,
                "port 70000",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 80\ntarget = \"10.0.0.1:80\"\n",
                4,
                "not a loopback address",
            ),
            (
                "\n[[expose]]\nnetwork = \"n\"\ninterface = \"i\"\nport = 80\n",
                2,
                "both",
            ),
            ("[[expose]]\nport = 80\n", 1, "needs `network"),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 80\n\n[[expose]]\nnetwork = \"n\"\nport = 80\ntarget = 81\n",
                5,
                "duplicate rule n:80 (first given on line 1)",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = \"80\"\n",
                3,
                "invalid type",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 53\nprotocol = \"sctp\"\n",
                4,
                "protocol = \"sctp\" is not \"tcp\", \"udp\" or \"both\"",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 53\nproxy_protocol = true\nprotocol = \"udp\"\n",
                5,
                "proxy_protocol = true is for TCP rules",
            ),
            (
                "[[expose]]\ninterface = \"br0\"\nport = 80\nallow = [\"10.0.0.2\",\n  \"10.0.0.5/24\"]\n",
                5,
                "allow entry `10.0.0.5/24`: `10.0.0.5/24` has host bits set",
            ),
            (
                "[[expose]]\nnetwork = \"n\"\nport = 80\nallow = [\"172.18.0.5\"]\n",
                4,
                "allow entry `172.18.0.5`: a network rule is scoped by container",
            ),
            ("[[expose\n", 1, ""),
            (
                "label_allow = [\"11434\",\n  \"5432=10.0.0.1:5432\"]\n",
                2,
                "label_allow: `5432=10.0.0.1:5432`: target `10.0.0.1:5432` is not a loopback",
            ),
            ("label_allow = [\"0\"]\n", 1, "label_allow: `0`: port `0`"),
            (
                "engine = [\"tcp://10.0.0.1:2375\"]\n",
                1,
                "engine `tcp://10.0.0.1:2375` is not unix:///PATH",
            ),
            (
                "mode = \"fast\"\n",
                1,
                "unknown variant `fast`, expected one of `auto`, `kernel`, `proxy`",
            ),
        ];
        for (text, line, reason) in cases {
            let e = err(text);
            assert!(
                e.starts_with(&format!("lhb.toml:{line}: ")),
                "{text:?} -> {e}"
            );
            assert!(e.contains(reason), "{text:?} -> {e}");
        }
    }

    #[test]
    fn label_allow_entries_load_once_each() {
        let cfg = parse(
            "lhb.toml",
            "label_allow = [\"11434\", \"5432=127.0.0.1:15432\", \"11434=127.0.0.1:11434\"]\n",
        )
        .unwrap();
        let shown: Vec<String> = cfg.label_allow.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown, ["11434", "5432=127.0.0.1:15432"]);
        assert!(cfg.rules.is_empty());
    }

    #[test]
    fn a_missing_file_holds_no_rules() {
        assert!(
            load(Path::new("/nonexistent/lhb.toml"))
                .unwrap()
                .rules
                .is_empty()
        );
    }
}
