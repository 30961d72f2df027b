//! Rules ("exposures"): which port on which bridge's gateway leads to which loopback
//! service. Parsing and validation live here so that every way of giving a rule (the
//! command line, the config file, `lhb expose` over the control socket) rejects the
//! same mistakes with the same words.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use thiserror::Error;

/// Where the containers come from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// A Docker network, by name: its bridge is found through the engine.
    Network(String),
    /// A Linux bridge, by interface name: no Docker needed.
    Interface(String),
}

impl Source {
    /// The network or interface name.
    pub fn name(&self) -> &str {
        match self {
            Source::Network(n) | Source::Interface(n) => n,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Network(name) => write!(f, "{name}"),
            Source::Interface(name) => write!(f, "{name}"),
        }
    }
}

/// What names a rule: at most one rule per source and port, and a rule keeps its
/// counters, state and origin under its key across reloads and runtime changes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleKey {
    pub source: Source,
    pub port: u16,
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.port)
    }
}

/// Which transport a rule serves (`PORT/udp`, `protocol = "udp"`). TCP is the default.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    /// TCP and UDP on the same port, to the same target (DNS).
    Both,
}

impl Protocol {
    pub fn tcp(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Both)
    }

    pub fn udp(self) -> bool {
        matches!(self, Protocol::Udp | Protocol::Both)
    }

    /// The transports the rule serves, TCP first.
    pub fn transports(self) -> impl Iterator<Item = Transport> {
        [Transport::Tcp, Transport::Udp]
            .into_iter()
            .filter(move |&t| self.carries(t))
    }

    pub fn carries(self, t: Transport) -> bool {
        match t {
            Transport::Tcp => self.tcp(),
            Transport::Udp => self.udp(),
        }
    }

    /// `tcp`, `udp` or `both`, as written after `PORT/`.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "both" => Some(Protocol::Both),
            _ => None,
        }
    }

    /// What a spec writes after the port: nothing for TCP, so every TCP rule reads as
    /// it always did.
    pub fn suffix(self) -> &'static str {
        match self {
            Protocol::Tcp => "",
            Protocol::Udp => "/udp",
            Protocol::Both => "/both",
        }
    }
}

/// One transport: what a socket, a kernel slot or a firewall opening carries (a rule's
/// [`Protocol`] may name both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

impl Transport {
    /// As iptables, nft and firewalld write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Both => "both",
        })
    }
}

/// Where a running rule comes from (`origin` in `lhb status`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// --expose, --expose-iface.
    CommandLine,
    /// An `[[expose]]` entry of the config file.
    #[default]
    Config,
    /// `lhb expose` without --persist: until the daemon restarts.
    Runtime,
    /// A Docker network's `lhb.expose` label, allowed by `label_allow`: while the
    /// network has it.
    Label,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::CommandLine => "command-line",
            Origin::Config => "config",
            Origin::Runtime => "runtime",
            Origin::Label => "label",
        })
    }
}

/// One exposure: containers on `source` reach `target` at `gateway:port`.
#[derive(Clone, Debug)]
pub struct Rule {
    pub source: Source,
    pub port: u16,
    /// TCP, UDP or both: one rule per source and port either way, so a port's TCP and
    /// UDP sides never lead to two different services by accident.
    pub protocol: Protocol,
    /// Always a loopback address: checked when the rule is made.
    pub target: SocketAddr,
    /// Label for logs and status.
    pub service: String,
    /// The most proxied connections this rule may hold at once (`max_connections =` in
    /// the config); None: an equal share of the proxy's total.
    pub max_connections: Option<usize>,
    /// Send a PROXY protocol v2 header first, so that the service learns the
    /// container's address (`proxy_protocol = true`); always served by the proxy.
    pub proxy_protocol: bool,
    /// Serve even when the bridge has ports that lead off the host (`allow_uplinks =
    /// true`, `--allow-uplinks`): a NIC, bond, VLAN or tunnel makes the service reachable
    /// from that network too.
    pub allow_uplinks: bool,
    /// Who may connect (`@ALLOW,...` in a spec, `allow = [...]` in the config); empty:
    /// everyone on the source, as before scoping existed.
    pub allow: Vec<Client>,
    /// Where the rule was given, for messages: `--expose-iface br0:80`,
    /// `/etc/lhb/lhb.toml:12`, `lhb expose`. Not part of what the rule is.
    pub given: String,
}

impl PartialEq for Rule {
    fn eq(&self, o: &Rule) -> bool {
        // Destructured, not field by field: a field added to Rule fails to compile here
        // until it is either compared or, like `given`, deliberately left out.
        let Rule {
            source,
            port,
            protocol,
            target,
            service,
            max_connections,
            proxy_protocol,
            allow_uplinks,
            allow,
            given: _,
        } = self;
        (
            source,
            port,
            protocol,
            target,
            service,
            max_connections,
            proxy_protocol,
            allow_uplinks,
            allow,
        ) == (
            &o.source,
            &o.port,
            &o.protocol,
            &o.target,
            &o.service,
            &o.max_connections,
            &o.proxy_protocol,
            &o.allow_uplinks,
            &o.allow,
        )
    }
}

impl Eq for Rule {}

impl Rule {
    pub fn key(&self) -> RuleKey {
        RuleKey {
            source: self.source.clone(),
            port: self.port,
        }
    }

    pub fn new(
        source: Source,
        port: u16,
        target: Option<SocketAddr>,
        service: Option<String>,
    ) -> Self {
        Rule {
            source,
            port,
            protocol: Protocol::Tcp,
            target: target.unwrap_or(default_target(port)),
            service: service.unwrap_or_else(|| format!("port-{port}")),
            max_connections: None,
            proxy_protocol: false,
            allow_uplinks: false,
            allow: Vec::new(),
            given: String::new(),
        }
    }
}

/// A rule's target when none is given: the same port on 127.0.0.1.
pub fn default_target(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}{} -> {}",
            self.source,
            self.port,
            self.protocol.suffix(),
            self.target
        )?;
        if !self.allow.is_empty() {
            write!(f, " for {}", allow_text(&self.allow))?;
        }
        Ok(())
    }
}

/// The allow list as a spec writes it after `@`.
pub fn allow_text(allow: &[Client]) -> String {
    allow
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One entry of a rule's `allow` list: who may connect through it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Client {
    /// An address or prefix (`192.168.122.10`, `192.168.122.0/28`, `fd00::/64`): for
    /// interface rules, whose bridges have no engine to say who is who.
    Net(ipnet::IpNet),
    /// A container, by name.
    Container(String),
    /// A compose service: `project/service`.
    Service { project: String, service: String },
    /// Containers with a label: `label:KEY=VALUE`.
    Label { key: String, value: String },
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Client::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            Client::Net(n) => write!(f, "{n}"),
            Client::Container(c) => f.write_str(c),
            Client::Service { project, service } => write!(f, "{project}/{service}"),
            Client::Label { key, value } => write!(f, "label:{key}={value}"),
        }
    }
}

impl Client {
    /// Parses one entry; `spec` is what the user wrote, for the message, and `network`
    /// whether the rule's source is an engine's network.
    pub fn parse(spec: &str, text: &str, network: bool) -> Result<Client, RuleError> {
        let t = text.trim();
        let bad = |why: String| RuleError::Allow {
            spec: spec.to_string(),
            entry: text.to_string(),
            why,
        };
        if t.is_empty() {
            return Err(bad("an empty entry (two commas, or a trailing one)".into()));
        }
        let client = if let Some(label) = t.strip_prefix("label:") {
            let (key, value) = label
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| bad("a label entry is label:KEY=VALUE".into()))?;
            if !key.chars().all(label_char) || !value.chars().all(label_char) {
                return Err(bad(
                    "a label's key and value are letters, digits and `.`, `-`, `_`, `/`, `:`"
                        .into(),
                ));
            }
            Client::Label {
                key: key.to_string(),
                value: value.to_string(),
            }
        } else if let Some(net) = parse_net(t).map_err(bad)? {
            net
        } else if let Some((project, service)) = t.split_once('/') {
            if !compose_name(project) || !compose_name(service) {
                return Err(bad(
                    "not an address, a prefix or a compose service (project/service: lower-case letters, digits, `-` and `_`)".into(),
                ));
            }
            Client::Service {
                project: project.to_string(),
                service: service.to_string(),
            }
        } else if docker_name(t) {
            Client::Container(t.to_string())
        } else {
            return Err(bad(
                "not a container name, project/service, label:KEY=VALUE, address or prefix".into(),
            ));
        };
        match (&client, network) {
            (Client::Net(_), true) => Err(bad(
                "a network rule is scoped by container, compose service or label, not by address: an engine hands a stopped container's address to the next one, and any container can send from an address it does not own".into(),
            )),
            (Client::Net(_), false) => Ok(client),
            (_, false) => Err(bad(
                "an interface rule has no engine to name its clients: allow addresses or prefixes (e.g. 192.168.122.10 or 192.168.122.0/28)".into(),
            )),
            (_, true) => Ok(client),
        }
    }
}

fn label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/' | ':')
}

fn compose_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_'))
}

fn docker_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// An address or a prefix, or None if `t` is neither. A prefix with host bits set is
/// refused rather than widened: `10.0.0.5/24` is as likely a typo for one host as it
/// is the network.
fn parse_net(t: &str) -> Result<Option<Client>, String> {
    let looks_like_an_address = t.contains(':')
        || t.split('/')
            .next()
            .is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_digit() || c == '.'));
    let net = match t.split_once('/') {
        None => match t.parse::<IpAddr>() {
            Ok(ip) => ipnet::IpNet::from(ip),
            Err(_) if looks_like_an_address => return Err(format!("`{t}` is not an address")),
            Err(_) => return Ok(None),
        },
        Some(_) => match t.parse::<ipnet::IpNet>() {
            Ok(n) => {
                if n.trunc() != n {
                    return Err(format!(
                        "`{t}` has host bits set: write {} for the network or {} for one host",
                        n.trunc(),
                        n.addr()
                    ));
                }
                n
            }
            Err(_) if looks_like_an_address => {
                return Err(format!("`{t}` is not an address/prefix-length"));
            }
            Err(_) => return Ok(None),
        },
    };
    Ok(Some(Client::Net(unmap(net))))
}

/// `::ffff:a.b.c.d/N` is the IPv4 prefix it maps: one spelling per set of clients.
fn unmap(net: ipnet::IpNet) -> ipnet::IpNet {
    match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(ipnet::IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// Parses the part of a spec after `@`.
pub fn parse_allow(spec: &str, text: &str, network: bool) -> Result<Vec<Client>, RuleError> {
    let mut allow = Vec::new();
    for entry in text.split(',') {
        let c = Client::parse(spec, entry, network)?;
        if !allow.contains(&c) {
            allow.push(c);
        }
    }
    Ok(allow)
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RuleError {
    #[error(
        "`{spec}`: `{name}` is not a valid Docker network name (letters, digits, `_`, `.` and `-`, starting with a letter or digit; `docker:NAME` or `podman:NAME` where a name is on both engines)"
    )]
    NetworkName { spec: String, name: String },
    #[error(
        "`{spec}`: expected NAME:PORT[/PROTOCOL][=TARGET][@ALLOW,...], e.g. `docker0:11434`, `virbr0:8080=127.0.0.1:80`, `docker0:53/udp=127.0.0.53:53` or `virbr0:5432@192.168.122.10`"
    )]
    Syntax { spec: String },
    #[error("`{spec}`: allow entry `{entry}`: {why}")]
    Allow {
        spec: String,
        entry: String,
        why: String,
    },
    #[error(
        "`{spec}`: interface name `{name}` is not one lhb accepts (1 to 15 letters, digits, `_`, `.` or `-`; no wildcards, quotes or spaces)"
    )]
    InterfaceName { spec: String, name: String },
    #[error("`{spec}`: port `{port}` is not in 1..=65535")]
    Port { spec: String, port: String },
    #[error(
        "`{spec}`: target `{target}` is not a loopback address; lhb only forwards to services on 127.0.0.1 or [::1] (write TARGET as PORT, 127.0.0.1:PORT or [::1]:PORT)"
    )]
    NotLoopback { spec: String, target: String },
    #[error("`{spec}`: protocol `{protocol}` is not tcp, udp or both")]
    Protocol { spec: String, protocol: String },
    #[error("`{spec}`: target `{target}` is not PORT, 127.0.0.1:PORT or [::1]:PORT")]
    Target { spec: String, target: String },
    #[error(
        "rule {rule} is given twice (the same source and port may be exposed once; PORT/both serves TCP and UDP)"
    )]
    Duplicate { rule: String },
    #[error("{count} rules: lhb serves at most {max} at a time")]
    TooMany { count: usize, max: u32 },
    #[error("{count} allow entries over all rules: lhb holds at most {max}")]
    TooManyAllowed { count: usize, max: u32 },
}

/// Parses `IFACE:PORT[=TARGET]` (`--expose-iface`).
pub fn parse_iface_spec(spec: &str) -> Result<Rule, RuleError> {
    parse_spec(spec, false)
}

/// Parses `NETWORK:PORT[=TARGET]` (`--expose`).
pub fn parse_network_spec(spec: &str) -> Result<Rule, RuleError> {
    parse_spec(spec, true)
}

/// A spec from `lhb expose`/`unexpose`/`verify`/`doctor`: an interface with `--iface`,
/// else a Docker network.
pub fn parse_spec_for(spec: &str, iface: bool) -> Result<Rule, RuleError> {
    parse_spec(spec, !iface)
}

fn parse_spec(spec: &str, network: bool) -> Result<Rule, RuleError> {
    // `@` first: an allow entry may hold `=` and `:` (label:KEY=VALUE, an IPv6 prefix).
    let (rule, allow) = match spec.split_once('@') {
        Some((r, a)) => (r, Some(a)),
        None => (spec, None),
    };
    let (left, target) = match rule.split_once('=') {
        Some((l, t)) => (l, Some(t)),
        None => (rule, None),
    };
    let (name, port) = left.rsplit_once(':').ok_or_else(|| RuleError::Syntax {
        spec: spec.to_string(),
    })?;
    let source = source(spec, name, network)?;
    let (port, protocol) = parse_port_protocol(spec, port)?;
    let target = target.map(|t| parse_target(spec, t)).transpose()?;
    let mut rule = Rule::new(source, port, target, None);
    rule.protocol = protocol;
    if let Some(allow) = allow {
        rule.allow = parse_allow(spec, allow, network)?;
    }
    Ok(rule)
}

/// Parses `PORT[/tcp|/udp|/both]`.
pub fn parse_port_protocol(spec: &str, text: &str) -> Result<(u16, Protocol), RuleError> {
    match text.split_once('/') {
        None => Ok((parse_port(spec, text)?, Protocol::Tcp)),
        Some((port, protocol)) => {
            let port = parse_port(spec, port)?;
            let protocol = Protocol::parse(protocol.trim()).ok_or_else(|| RuleError::Protocol {
                spec: spec.to_string(),
                protocol: protocol.to_string(),
            })?;
            Ok((port, protocol))
        }
    }
}

/// Checks a source name; `spec` is what the user wrote, for the message.
pub fn source(spec: &str, name: &str, network: bool) -> Result<Source, RuleError> {
    if network {
        if !valid_network_name(name) {
            return Err(RuleError::NetworkName {
                spec: spec.to_string(),
                name: name.to_string(),
            });
        }
        Ok(Source::Network(name.to_string()))
    } else {
        if !valid_ifname(name) {
            return Err(RuleError::InterfaceName {
                spec: spec.to_string(),
                name: name.to_string(),
            });
        }
        Ok(Source::Interface(name.to_string()))
    }
}

/// Docker's (and Podman's) rule for network names, after an optional `docker:` or
/// `podman:` saying which engine's network it is.
fn valid_network_name(name: &str) -> bool {
    let (_, name) = engine_of(name);
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Parses a port, refusing 0 and anything above 65535 with the value in the message.
pub fn parse_port(spec: &str, port: &str) -> Result<u16, RuleError> {
    match port.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(RuleError::Port {
            spec: spec.to_string(),
            port: port.to_string(),
        }),
    }
}

/// Parses `PORT`, `127.0.0.1:PORT` or `[::1]:PORT` (any loopback address is accepted).
pub fn parse_target(spec: &str, target: &str) -> Result<SocketAddr, RuleError> {
    let t = target.trim();
    if !t.contains(':') {
        let port = parse_port(spec, t)?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    let addr: SocketAddr = match t.parse() {
        Ok(a) => a,
        Err(_) => {
            // Tell a bad port apart from a bad address: "127.0.0.1:0" is a port problem.
            if let Some((host, port)) = t.rsplit_once(':')
                && host
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<IpAddr>()
                    .is_ok()
            {
                parse_port(spec, port)?;
            }
            return Err(RuleError::Target {
                spec: spec.to_string(),
                target: target.to_string(),
            });
        }
    };
    if addr.port() == 0 {
        return Err(RuleError::Port {
            spec: spec.to_string(),
            port: "0".to_string(),
        });
    }
    let loopback = match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip == Ipv6Addr::LOCALHOST,
    };
    if !loopback {
        return Err(RuleError::NotLoopback {
            spec: spec.to_string(),
            target: target.to_string(),
        });
    }
    Ok(addr)
}

/// An interface name lhb accepts: one the kernel accepts (1 to 15 bytes, not `.` or
/// `..`) made only of letters, digits, `_`, `.` and `-`. Narrower than the kernel on
/// purpose: the name ends up in nft and iptables rules, where `*` and `+` are wildcards
/// and a quote or a space is syntax. Every bridge naming scheme in use (docker0, br-<id>,
/// virbr0, podman0, vmbr0, lxcbr0, cni0) fits.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Refuses two rules for the same source and port, and more rules than the kernel
/// maps have room for.
pub fn check_unique(rules: &[Rule]) -> Result<(), RuleError> {
    if rules.len() > lhb_common::MAX_RULES as usize {
        return Err(RuleError::TooMany {
            count: rules.len(),
            max: lhb_common::MAX_RULES,
        });
    }
    let allowed: usize = rules.iter().map(|r| r.allow.len()).sum();
    if allowed > lhb_common::MAX_ALLOWED as usize {
        return Err(RuleError::TooManyAllowed {
            count: allowed,
            max: lhb_common::MAX_ALLOWED,
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in rules {
        if !seen.insert(r.key()) {
            return Err(RuleError::Duplicate {
                rule: r.key().to_string(),
            });
        }
    }
    Ok(())
}

/// Which engine a network is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Docker => "Docker",
            Engine::Podman => "Podman",
        })
    }
}

impl Engine {
    /// Docker first: the engine a bare network name means first.
    pub const ALL: [Engine; 2] = [Engine::Docker, Engine::Podman];

    /// What a rule's network name starts with to ask for this engine (`docker:NAME`).
    pub fn prefix(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// `docker:NAME` / `podman:NAME`: the engine a rule's network name asks for, and the
/// name.
pub fn engine_of(name: &str) -> (Option<Engine>, &str) {
    Engine::ALL
        .into_iter()
        .find_map(|e| {
            let n = name.strip_prefix(e.prefix())?.strip_prefix(':')?;
            Some((Some(e), n))
        })
        .unwrap_or((None, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    #[test]
    fn parses_the_three_target_forms() {
        let r = parse_iface_spec("virbr0:11434").unwrap();
        assert_eq!(r.source, Source::Interface("virbr0".into()));
        assert_eq!((r.port, r.target), (11434, v4(11434)));
        assert_eq!(r.service, "port-11434");
        assert_eq!(parse_iface_spec("br0:80=8080").unwrap().target, v4(8080));
        assert_eq!(
            parse_iface_spec("br0:80=127.0.0.1:81").unwrap().target,
            v4(81)
        );
        let r = parse_iface_spec("br0:80=[::1]:82").unwrap();
        assert_eq!(r.target, "[::1]:82".parse().unwrap());
    }

    #[test]
    fn rejects_bad_ports_with_the_value() {
        for (spec, port) in [
            ("br0:0", "0"),
            ("br0:65536", "65536"),
            ("br0:x", "x"),
            ("br0:", ""),
            ("br0:80=0", "0"),
            ("br0:80=127.0.0.1:0", "0"),
            ("br0:80=127.0.0.1:70000", "70000"),
        ] {
            match parse_iface_spec(spec) {
                Err(RuleError::Port { port: p, .. }) => assert_eq!(p, port, "{spec}"),
                other => panic!("{spec}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_non_loopback_targets() {
        for spec in [
            "br0:80=10.0.0.1:80",
            "br0:80=0.0.0.0:80",
            "br0:80=[::]:80",
            "br0:80=[fe80::1]:80",
        ] {
            let err = parse_iface_spec(spec).unwrap_err();
            assert!(
                matches!(err, RuleError::NotLoopback { .. }),
                "{spec}: {err:?}"
            );
            assert!(err.to_string().contains("not a loopback address"));
        }
    }

    #[test]
    fn rejects_malformed_specs() {
        assert!(matches!(
            parse_iface_spec("br0"),
            Err(RuleError::Syntax { .. })
        ));
        assert!(matches!(
            parse_iface_spec(":80"),
            Err(RuleError::InterfaceName { .. })
        ));
        assert!(matches!(
            parse_iface_spec("averyveryverylongname:80"),
            Err(RuleError::InterfaceName { .. })
        ));
        for name in [
            "br*", "br+", "br\"0", "br 0", "br0;", ".", "..", "b/r", "br\u{e9}",
        ] {
            assert!(
                matches!(
                    parse_iface_spec(&format!("{name}:80")),
                    Err(RuleError::InterfaceName { .. })
                ),
                "{name}"
            );
        }
        for name in [
            "docker0",
            "br-0123456789ab",
            "virbr0",
            "vmbr0.100",
            "lxc_br-1",
        ] {
            assert!(parse_iface_spec(&format!("{name}:80")).is_ok(), "{name}");
        }
        assert!(matches!(
            parse_iface_spec("br0:80=localhost:80"),
            Err(RuleError::Target { .. })
        ));
    }

    #[test]
    fn network_specs_use_docker_names() {
        let r = parse_network_spec("windmill_default:18789").unwrap();
        assert_eq!(r.source, Source::Network("windmill_default".into()));
        assert_eq!(r.target, v4(18789));
        assert!(matches!(
            parse_network_spec("-bad:80"),
            Err(RuleError::NetworkName { .. })
        ));
        assert!(matches!(
            parse_network_spec("a b:80"),
            Err(RuleError::NetworkName { .. })
        ));
        // The engine, where a name is on both.
        let p = parse_network_spec("podman:web:8080=80").unwrap();
        assert_eq!(p.source, Source::Network("podman:web".into()));
        assert_eq!((p.port, p.target), (8080, v4(80)));
        assert!(parse_network_spec("docker:web:80").is_ok());
        for bad in ["lxd:web:80", "podman::80", "podman:-x:80"] {
            assert!(
                matches!(parse_network_spec(bad), Err(RuleError::NetworkName { .. })),
                "{bad}"
            );
        }
        // A network and an interface with the same name are different sources.
        let n = parse_network_spec("app:80").unwrap();
        let i = parse_iface_spec("app:80").unwrap();
        assert!(check_unique(&[r, n, i]).is_ok());
    }

    #[test]
    fn a_protocol_may_follow_the_port() {
        let r = parse_iface_spec("br0:53/udp=127.0.0.53:53").unwrap();
        assert_eq!((r.port, r.protocol), (53, Protocol::Udp));
        assert_eq!(r.target, "127.0.0.53:53".parse().unwrap());
        assert_eq!(r.to_string(), "br0:53/udp -> 127.0.0.53:53");
        assert_eq!(
            parse_network_spec("n:53/both").unwrap().protocol,
            Protocol::Both
        );
        let t = parse_network_spec("n:80/tcp").unwrap();
        assert_eq!(
            (t.protocol, t.to_string()),
            (Protocol::Tcp, "n:80 -> 127.0.0.1:80".into())
        );
        assert!(matches!(
            parse_iface_spec("br0:53/sctp"),
            Err(RuleError::Protocol { .. })
        ));
        assert!(matches!(
            parse_iface_spec("br0:0/udp"),
            Err(RuleError::Port { .. })
        ));
        // One rule per source and port, whatever the protocol.
        let u = parse_iface_spec("br0:53/udp").unwrap();
        let t = parse_iface_spec("br0:53").unwrap();
        assert!(check_unique(&[u, t]).is_err());
    }

    #[test]
    fn an_interface_rule_may_name_its_clients() {
        let r = parse_iface_spec(
            "virbr0:5432=127.0.0.1:5433@192.168.122.10,192.168.122.64/26,fd00::/64",
        )
        .unwrap();
        assert_eq!(r.target, v4(5433));
        assert_eq!(
            r.allow,
            vec![
                Client::Net("192.168.122.10/32".parse().unwrap()),
                Client::Net("192.168.122.64/26".parse().unwrap()),
                Client::Net("fd00::/64".parse().unwrap()),
            ]
        );
        assert_eq!(
            r.to_string(),
            "virbr0:5432 -> 127.0.0.1:5433 for 192.168.122.10,192.168.122.64/26,fd00::/64"
        );
        // Without a target, with a protocol; duplicates kept once; a mapped prefix is
        // the IPv4 one.
        let u = parse_iface_spec("br0:53/udp@10.0.0.2,10.0.0.2,::ffff:10.1.0.0/112").unwrap();
        assert_eq!((u.port, u.protocol, u.target), (53, Protocol::Udp, v4(53)));
        assert_eq!(
            u.to_string(),
            "br0:53/udp -> 127.0.0.1:53 for 10.0.0.2,10.1.0.0/16"
        );
        // Same rule, same list: the same rule; another list: another rule.
        assert_eq!(
            parse_iface_spec("br0:80@10.0.0.2").unwrap(),
            parse_iface_spec("br0:80@10.0.0.2").unwrap()
        );
        assert_ne!(
            parse_iface_spec("br0:80@10.0.0.2").unwrap(),
            parse_iface_spec("br0:80").unwrap()
        );
    }

    #[test]
    fn bad_allow_entries_say_which_and_why() {
        for (spec, entry, why) in [
            ("br0:80@", "", "empty entry"),
            ("br0:80@10.0.0.2,", "", "empty entry"),
            (
                "br0:80@10.0.0.5/24",
                "10.0.0.5/24",
                "write 10.0.0.0/24 for the network or 10.0.0.5 for one host",
            ),
            ("br0:80@10.0.0.300", "10.0.0.300", "not an address"),
            (
                "br0:80@10.0.0.0/33",
                "10.0.0.0/33",
                "not an address/prefix-length",
            ),
            (
                "br0:80@fd00::/129",
                "fd00::/129",
                "not an address/prefix-length",
            ),
            ("br0:80@web", "web", "an interface rule has no engine"),
            (
                "br0:80@label:a=b",
                "label:a=b",
                "an interface rule has no engine",
            ),
            ("br0:80@label:=b", "label:=b", "label:KEY=VALUE"),
            ("br0:80@we b", "we b", "not a container name"),
            ("br0:80@Proj/Web", "Proj/Web", "compose service"),
        ] {
            match parse_iface_spec(spec) {
                Err(RuleError::Allow {
                    entry: e, why: w, ..
                }) => {
                    assert_eq!(e, entry, "{spec}");
                    assert!(w.contains(why), "{spec}: {w}");
                }
                other => panic!("{spec}: {other:?}"),
            }
        }
        // Addresses are no identity on an engine's network.
        let e = parse_network_spec("app:80@172.18.0.5").unwrap_err();
        assert!(e.to_string().contains("not by address"), "{e}");
        // Engine clients are a network rule's own.
        let r = parse_network_spec("app:80@n8n,proj/web,label:com.example.role=db").unwrap();
        assert_eq!(
            r.allow,
            vec![
                Client::Container("n8n".into()),
                Client::Service {
                    project: "proj".into(),
                    service: "web".into()
                },
                Client::Label {
                    key: "com.example.role".into(),
                    value: "db".into()
                },
            ]
        );
        assert!(
            r.to_string()
                .contains("for n8n,proj/web,label:com.example.role=db")
        );
    }

    #[test]
    fn duplicates_are_refused() {
        let a = parse_iface_spec("br0:80").unwrap();
        let b = parse_iface_spec("br0:80=81").unwrap();
        let c = parse_iface_spec("br1:80").unwrap();
        assert!(check_unique(&[a.clone(), c.clone()]).is_ok());
        assert_eq!(
            check_unique(&[a, c, b]),
            Err(RuleError::Duplicate {
                rule: "br0:80".into()
            })
        );
    }
}
