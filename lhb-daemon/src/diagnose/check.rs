//! What `lhb verify` and `lhb doctor` share: the rules to check, throwaway probe
//! namespaces (one plugged into a rule's bridge like a container, one outside every
//! bridge and routed to the host), connecting (TCP) or sending a datagram (UDP) from
//! them, and the host's TCP listeners and UDP sockets.
//!
//! The probes are real connections from real namespaces, not a reading of the
//! configuration: a check passes only if the kernel, the firewall and the data path
//! together behave as they must. Probe traffic only ever goes to the host's own
//! addresses.

use std::{
    fs::File,
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    engines::docker,
    host::netlink::Netlink,
    model::config,
    model::labels,
    model::rule::{self, Rule},
    reconcile::Observed,
};

/// What to check: every rule of the config file (and of network labels), or the one
/// the command line names.
pub struct Target {
    pub config: std::path::PathBuf,
    pub spec: Option<String>,
    /// The spec names an interface, not a Docker network.
    pub iface: bool,
    pub no_docker: bool,
    /// --label-allow, added to the config's `label_allow`.
    pub label_allow: Vec<labels::Entry>,
}

/// The rules to check, the host as observed, and the label entries refused (for the
/// rule checked, or all of them).
pub struct Checked {
    pub rules: Vec<Rule>,
    pub observed: Observed,
    pub label_refused: Vec<labels::Refusal>,
}

/// The rules `t` names, as `lhb run` would serve them: the file's, then what Docker
/// networks' `lhb.expose` labels ask for and `label_allow` allows. A spec that matches
/// one of these (source and port) takes that rule's target and label; otherwise the
/// spec is the rule (default target 127.0.0.1:PORT). Then the host, observed.
pub async fn rules(t: &Target) -> anyhow::Result<Checked> {
    let cfg = config::load(&t.config)?;
    let allowed = labels::merge_allowed(&t.label_allow, &cfg.label_allow);
    let parsed = t
        .spec
        .as_deref()
        .map(|spec| rule::parse_spec_for(spec, t.iface))
        .transpose()?;
    let docker = !t.no_docker
        && (!allowed.is_empty()
            || needs_docker(&cfg.rules)
            || parsed
                .as_ref()
                .is_some_and(|p| needs_docker(std::slice::from_ref(p))));
    let observed = observe(!docker, &cfg.engine).await?;
    let (asked, mut refused) = crate::startup::asked_by_labels(observed.engines.as_ref(), &allowed);
    let (labelled, _) = crate::model::labels::label_rules(&cfg.rules, &asked);
    let mut all = cfg.rules;
    all.extend(labelled);
    let Some(parsed) = parsed else {
        if all.is_empty() {
            let labels = if allowed.is_empty() {
                String::new()
            } else {
                format!(
                    " and no Docker network's {} label asks for an allowed entry",
                    labels::LABEL
                )
            };
            bail!(
                "no rule to check: {} holds no [[expose]] entry{labels}; name one (e.g. `lhb verify mynet:11434`, or `--iface virbr0:11434` for a plain bridge)",
                t.config.display()
            );
        }
        return Ok(Checked {
            rules: all,
            observed,
            label_refused: refused,
        });
    };
    let key = parsed.key();
    refused.retain(|f| {
        rule::Source::Network(f.network.clone()) == key.source
            && labels::Entry::parse(&f.entry).map_or(true, |e| e.port == key.port)
    });
    let known = all.into_iter().find(|r| r.key() == key);
    let explicit = t.spec.as_deref().is_some_and(|s| s.contains('='));
    Ok(Checked {
        rules: vec![match known {
            Some(r) if !explicit => r,
            _ => parsed,
        }],
        observed,
        label_refused: refused,
    })
}

/// Links and addresses now, and what the engines say (None: --no-docker).
pub async fn observe(no_docker: bool, engines: &[String]) -> anyhow::Result<Observed> {
    let links = Netlink::requests()?.snapshot().await?;
    let engines = docker::engines(no_docker, &[], engines).await?;
    Ok(crate::reconcile::Observed {
        links,
        engines: crate::engines::snapshot(&engines, crate::startup::FIRST_ANSWER).await,
    })
}

/// Why a gateway of the other address family than the target may go unserved.
pub const CROSS_FAMILY: &str = "a connection of the other address family than the target cannot be handed over in-kernel; `--mode auto` proxies it, or give a target of that family";

/// Whether any rule needs the Docker engine.
pub fn needs_docker(rules: &[Rule]) -> bool {
    rules
        .iter()
        .any(|r| matches!(r.source, rule::Source::Network(_)))
}

/// How a connection attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handshake completed and the far end did not reset it at once.
    Served,
    /// RST to the SYN (or an ICMP port unreachable): nothing accepts there.
    Refused,
    /// The handshake completed, then a reset: the far end accepted for a service
    /// that is not there (the proxy does this when the target is down).
    Reset,
    /// No answer at all: something dropped the packets.
    TimedOut,
    /// Any other error (no route, host unreachable, ...).
    Other(String),
}

impl Outcome {
    pub fn describe(&self) -> String {
        match self {
            Outcome::Served => "connected".into(),
            Outcome::Refused => "refused".into(),
            Outcome::Reset => "connected, then reset".into(),
            Outcome::TimedOut => "no answer (dropped)".into(),
            Outcome::Other(e) => e.clone(),
        }
    }
}

/// How a UDP probe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// The service answered (for DNS: an answer to the probe's query).
    Answered,
    /// ICMP port unreachable: nothing listens, or nothing serves the gateway.
    Refused,
    /// Neither an answer nor a refusal: a one-way service (StatsD, syslog) answers
    /// nothing, and a firewall that drops looks the same.
    Silent,
    Other(String),
}

impl Datagram {
    pub fn describe(&self) -> String {
        match self {
            Datagram::Answered => "answered".into(),
            Datagram::Refused => "refused (ICMP port unreachable)".into(),
            Datagram::Silent => "sent; no answer and no refusal".into(),
            Datagram::Other(e) => e.clone(),
        }
    }
}

/// The probe id of a DNS query, checked in the answer.
const DNS_ID: u16 = 0x6c68;

/// What a UDP probe sends for `rule`: a DNS query (the root's NS, which any resolver
/// answers, if only with REFUSED) where the port or the target's port is 53, else an
/// empty datagram, which a metrics or log agent drops without recording anything.
pub fn udp_probe_payload(rule: &Rule) -> Vec<u8> {
    if rule.port != 53 && rule.target.port() != 53 {
        return Vec::new();
    }
    let mut q = DNS_ID.to_be_bytes().to_vec();
    // Recursion desired; one question: ".", NS, IN.
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1]);
    q
}

/// Whether `answer` answers `query` (for a DNS query: its id and the response bit).
fn answers(query: &[u8], answer: &[u8]) -> bool {
    if query.len() >= 2 && query[..2] == DNS_ID.to_be_bytes() {
        return answer.len() >= 12 && answer[..2] == query[..2] && answer[2] & 0x80 != 0;
    }
    true
}

/// Runs `ip`; its stderr is the error.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running `ip` (iproute2) for the probe namespaces: install iproute2")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A throwaway network namespace with one veth to the host; removed on drop, with
/// the veth.
pub struct ProbeNs {
    name: String,
    host_veth: String,
    /// The probe's own addresses.
    pub addrs: Vec<IpAddr>,
}

impl Drop for ProbeNs {
    fn drop(&mut self) {
        // The veth goes synchronously here; a namespace's own teardown is deferred,
        // and its veth would linger under a name the next probe wants.
        ip_quiet(&["link", "del", &self.host_veth]);
        ip_quiet(&["netns", "del", &self.name]);
    }
}

impl ProbeNs {
    fn create(role: char) -> anyhow::Result<ProbeNs> {
        let pid = std::process::id();
        let ns = ProbeNs {
            name: format!("lhb-probe-{role}-{pid}"),
            host_veth: format!("lhbp{role}{pid}"),
            addrs: Vec::new(),
        };
        ip_quiet(&["link", "del", &ns.host_veth]);
        ip_quiet(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ])?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A namespace plugged into `bridge` like a container, with a free address next to
    /// each of `gateways` (address and prefix length).
    pub fn on_bridge(bridge: &str, gateways: &[(IpAddr, u8)]) -> anyhow::Result<ProbeNs> {
        let used = neighbours(bridge);
        let mut at = Vec::new();
        for &(gw, plen) in gateways {
            let addr = free_address(gw, plen, &used)
                .with_context(|| format!("no free address for a probe next to {gw}/{plen}"))?;
            at.push((addr, plen, gw));
        }
        ProbeNs::at(bridge, &at)
    }

    /// A namespace plugged into `bridge` like a container, with the given (address,
    /// prefix length, gateway) triples.
    pub fn at(bridge: &str, addrs: &[(IpAddr, u8, IpAddr)]) -> anyhow::Result<ProbeNs> {
        let mut ns = ProbeNs::create('b')?;
        ip(&["link", "set", &ns.host_veth, "master", bridge, "up"])?;
        for &(addr, plen, _) in addrs {
            let cidr = format!("{addr}/{plen}");
            if addr.is_ipv6() {
                ns.ip(&["addr", "add", &cidr, "dev", "eth0", "nodad"])?;
            } else {
                ns.ip(&["addr", "add", &cidr, "dev", "eth0"])?;
            }
            ns.addrs.push(addr);
        }
        ns.ip(&["link", "set", "eth0", "up"])?;
        // Like a container: everything via the bridge's address, so that gateways not on
        // this bridge (Docker's host-gateway) are reachable too.
        for &(_, _, gw) in addrs {
            let family = if gw.is_ipv6() { "-6" } else { "-4" };
            ns.ip(&[family, "route", "add", "default", "via", &gw.to_string()])?;
        }
        Ok(ns)
    }

    /// A free address for a probe inside one of `allowed`'s prefixes and inside the
    /// bridge's own prefix `own` (address, length), from the top down, skipping the
    /// addresses in use on `bridge` and its own: a client the list admits that is not
    /// there now. Never an address the list names alone: that is one client's, which
    /// may be up without being in the neighbour table yet.
    pub fn admitted_address(
        bridge: &str,
        own: (IpAddr, u8),
        allowed: &[ipnet::IpNet],
    ) -> Option<IpAddr> {
        let subnet = ipnet::IpNet::new(own.0, own.1).ok()?.trunc();
        let used = neighbours(bridge);
        allowed
            .iter()
            .filter(|n| {
                subnet.contains(&n.network())
                    && n.prefix_len() >= subnet.prefix_len()
                    && n.prefix_len() < n.max_prefix_len()
            })
            .flat_map(|n| n.hosts().rev().take(64))
            .find(|a| *a != own.0 && !used.contains(a))
    }

    /// A namespace on `bridge` that can reach each of `gateways`: one address per
    /// address family, next to the bridge's own address of that family (`own`: the
    /// bridge's addresses with their prefix lengths, as netlink reports them).
    pub fn for_gateways(
        bridge: &str,
        own: &[(IpAddr, u8)],
        gateways: &[IpAddr],
    ) -> anyhow::Result<ProbeNs> {
        let mut nets: Vec<(IpAddr, u8)> = Vec::new();
        for gw in gateways {
            if let Some(p) = own.iter().find(|(a, _)| a.is_ipv4() == gw.is_ipv4())
                && !nets.iter().any(|(a, _)| a.is_ipv4() == gw.is_ipv4())
            {
                nets.push(*p);
            }
        }
        ProbeNs::on_bridge(bridge, &nets)
    }

    /// A namespace outside every bridge, on a veth of its own, routed to the host (and
    /// so to every address the host has): the view of another machine on the network.
    pub fn outside(v6: bool) -> anyhow::Result<ProbeNs> {
        let mut ns = ProbeNs::create('o')?;
        let pid = std::process::id();
        // A /30 of the link-local range, picked by pid so that parallel runs differ.
        let k = 64 + (pid % 16_000);
        let base = u32::from(Ipv4Addr::new(169, 254, 0, 0)) + k * 4;
        let (host4, probe4) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        ip(&["addr", "add", &format!("{host4}/30"), "dev", &ns.host_veth])?;
        ip(&["link", "set", &ns.host_veth, "up"])?;
        ns.ip(&["addr", "add", &format!("{probe4}/30"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &host4.to_string()])?;
        ns.addrs.push(probe4.into());
        if v6 {
            let host6 = Ipv6Addr::new(0xfd6c, 0x6862, (pid >> 16) as u16, pid as u16, 0, 0, 0, 1);
            let probe6 = Ipv6Addr::new(0xfd6c, 0x6862, (pid >> 16) as u16, pid as u16, 0, 0, 0, 2);
            ip(&[
                "addr",
                "add",
                &format!("{host6}/64"),
                "dev",
                &ns.host_veth,
                "nodad",
            ])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{probe6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["-6", "route", "add", "default", "via", &host6.to_string()])?;
            ns.addrs.push(probe6.into());
        }
        Ok(ns)
    }

    /// Connects to `to` from inside the namespace.
    pub fn connect(&self, to: SocketAddr, timeout: Duration) -> Outcome {
        let path = format!("/run/netns/{}", self.name);
        // setns() changes only the calling thread's namespace: a thread of its own.
        std::thread::spawn(move || connect_in(Path::new(&path), to, timeout))
            .join()
            .unwrap_or_else(|_| Outcome::Other("probe thread panicked".into()))
    }

    /// Sends `payload` to `to` from inside the namespace and waits for an answer.
    pub fn ask_udp(&self, to: SocketAddr, payload: &[u8], timeout: Duration) -> Datagram {
        self.ask_udp_all(&[to], payload, timeout).remove(0)
    }

    /// Sends `payload` to each of `to` at once; the outcomes in the same order.
    pub fn ask_udp_all(
        &self,
        to: &[SocketAddr],
        payload: &[u8],
        timeout: Duration,
    ) -> Vec<Datagram> {
        let handles: Vec<_> = to
            .iter()
            .map(|&a| {
                let path = format!("/run/netns/{}", self.name);
                let payload = payload.to_vec();
                std::thread::spawn(move || ask_in(Path::new(&path), a, &payload, timeout))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Datagram::Other("probe thread panicked".into()))
            })
            .collect()
    }

    /// Connects to each of `to` at once; the outcomes in the same order.
    pub fn connect_all(&self, to: &[SocketAddr], timeout: Duration) -> Vec<Outcome> {
        let handles: Vec<_> = to
            .iter()
            .map(|&a| {
                let path = format!("/run/netns/{}", self.name);
                std::thread::spawn(move || connect_in(Path::new(&path), a, timeout))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Outcome::Other("probe thread panicked".into()))
            })
            .collect()
    }
}

/// Connects to `to` from inside the network namespace at `ns` (a container's sandbox).
pub fn connect_from(ns: &str, to: SocketAddr, timeout: Duration) -> Outcome {
    let path = ns.to_string();
    // setns() changes only the calling thread's namespace: a thread of its own.
    std::thread::spawn(move || connect_in(Path::new(&path), to, timeout))
        .join()
        .unwrap_or_else(|_| Outcome::Other("probe thread panicked".into()))
}

/// Sends `payload` to `to` from inside the network namespace at `ns`.
pub fn ask_from(ns: &str, to: SocketAddr, payload: &[u8], timeout: Duration) -> Datagram {
    let (path, payload) = (ns.to_string(), payload.to_vec());
    std::thread::spawn(move || ask_in(Path::new(&path), to, &payload, timeout))
        .join()
        .unwrap_or_else(|_| Datagram::Other("probe thread panicked".into()))
}

fn connect_in(ns: &Path, to: SocketAddr, timeout: Duration) -> Outcome {
    let f = match File::open(ns) {
        Ok(f) => f,
        Err(e) => return Outcome::Other(format!("opening {}: {e}", ns.display())),
    };
    // Affects only this thread, which was started for this probe.
    if let Err(e) = rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    ) {
        return Outcome::Other(format!("entering the probe namespace: {e}"));
    }
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(mut s) => {
            // A service that is there either waits for the client or greets it; a
            // reset within this time means whoever accepted had nothing behind it.
            let _ = s.set_read_timeout(Some(Duration::from_millis(300)));
            let mut b = [0u8; 1];
            match s.read(&mut b) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Outcome::Reset,
                _ => Outcome::Served,
            }
        }
        Err(e) => match e.kind() {
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::TimedOut,
            // The reset can beat connect()'s poll: accepted, then reset, all the same.
            io::ErrorKind::ConnectionReset => Outcome::Reset,
            _ => Outcome::Other(e.to_string()),
        },
    }
}

fn ask_in(ns: &Path, to: SocketAddr, payload: &[u8], timeout: Duration) -> Datagram {
    let f = match File::open(ns) {
        Ok(f) => f,
        Err(e) => return Datagram::Other(format!("opening {}: {e}", ns.display())),
    };
    // Affects only this thread, which was started for this probe.
    if let Err(e) = rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    ) {
        return Datagram::Other(format!("entering the probe namespace: {e}"));
    }
    let any: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Connected, so that an ICMP port unreachable comes back as ECONNREFUSED.
    let sock = match UdpSocket::bind(any).and_then(|s| s.connect(to).map(|()| s)) {
        Ok(s) => s,
        Err(e) => return Datagram::Other(e.to_string()),
    };
    let deadline = std::time::Instant::now() + timeout;
    if let Err(e) = sock.send(payload) {
        return Datagram::Other(e.to_string());
    }
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return Datagram::Silent;
        }
        match sock.recv(&mut buf) {
            Ok(n) if answers(payload, &buf[..n]) => return Datagram::Answered,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Datagram::Refused,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Datagram::Silent;
            }
            Err(e) => return Datagram::Other(e.to_string()),
        }
    }
}

/// Addresses in use on `bridge` (its neighbour table), so a probe takes none of them.
fn neighbours(bridge: &str) -> Vec<IpAddr> {
    let Ok(text) = ip(&["-j", "neigh", "show", "dev", bridge]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["dst"].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// An address in `gw/plen` for a probe: from the top of the range down (allocators such
/// as Docker's hand out the bottom first), skipping `used` and the gateway.
fn free_address(gw: IpAddr, plen: u8, used: &[IpAddr]) -> Option<IpAddr> {
    match gw {
        IpAddr::V4(g) => {
            if plen > 29 {
                return None;
            }
            let mask = u32::MAX << (32 - plen);
            let net = u32::from(g) & mask;
            let broadcast = net | !mask;
            (1..64u32)
                .map(|i| IpAddr::V4(Ipv4Addr::from(broadcast - i)))
                .find(|a| *a != gw && !used.contains(a))
        }
        IpAddr::V6(g) => {
            if plen > 120 {
                return None;
            }
            let mask = u128::MAX << (128 - plen);
            let net = u128::from(g) & mask;
            // A host part no SLAAC or DHCPv6 allocator picks ("lhb" + pid).
            let pid = u128::from(std::process::id());
            (0..64u128)
                .map(|i| {
                    let host = (0x6c68_6200_0000 | (pid << 8) | i) & !mask;
                    IpAddr::V6(Ipv6Addr::from(net | host))
                })
                .find(|a| *a != gw && !used.contains(a))
        }
    }
}

/// A TCP socket in LISTEN state in this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// The device it is bound to (SO_BINDTODEVICE), if any.
    pub dev: Option<String>,
    /// An IPv6 wildcard that takes IPv4 too (not IPV6_V6ONLY).
    pub dual: bool,
    /// The process holding it, as "NAME pid N", where it could be found.
    pub owner: Option<String>,
}

impl Listener {
    pub fn describe(&self) -> String {
        let mut s = match &self.dev {
            Some(d) => format!("{}%{d}", self.addr),
            None => self.addr.to_string(),
        };
        if self.dual {
            s = format!("*:{}", self.addr.port());
        }
        match &self.owner {
            Some(o) => format!("{s} ({o})"),
            None => s,
        }
    }

    /// Whether a connection to `to` would reach this socket (exact or wildcard).
    pub fn covers(&self, to: SocketAddr) -> bool {
        self.addr.port() == to.port()
            && (self.addr.ip() == to.ip()
                || (self.addr.ip().is_unspecified()
                    && (self.addr.is_ipv4() == to.is_ipv4() || self.dual)))
    }

    pub fn is_wildcard(&self) -> bool {
        self.addr.ip().is_unspecified()
    }
}

/// Every listening TCP socket with the given port (IPv4 and IPv6), from `ss`, which
/// also tells the bound device and the owning process.
pub fn listeners(port: u16) -> anyhow::Result<Vec<Listener>> {
    sockets(port, "-Hltnp")
}

/// Every bound UDP socket with the given local port, as [`listeners`] does for TCP.
/// Connected sockets (lhb's own flows, a client's) are left out: they take datagrams
/// from their peer alone.
pub fn udp_sockets(port: u16) -> anyhow::Result<Vec<Listener>> {
    sockets(port, "-Hlunp")
}

fn sockets(port: u16, flags: &str) -> anyhow::Result<Vec<Listener>> {
    let out = Command::new("ss")
        .args([flags, &format!("sport = :{port}")])
        .stdin(Stdio::null())
        .output()
        .context("running `ss` (iproute2) to list listening sockets: install iproute2")?;
    if !out.status.success() {
        bail!("ss: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_ss_line)
        .collect())
}

/// `LISTEN 0 128 127.0.0.1%lo:8080 0.0.0.0:* users:(("python3",pid=5,fd=3))`.
fn parse_ss_line(line: &str) -> Option<Listener> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let local = *f.get(3)?;
    let (host, port) = local.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let (host, dev) = match host.split_once('%') {
        Some((h, d)) => (h, Some(d.to_string())),
        None => (host, None),
    };
    let (ip, dual) = if host == "*" {
        (IpAddr::V6(Ipv6Addr::UNSPECIFIED), true)
    } else {
        (host.trim_matches(['[', ']']).parse().ok()?, false)
    };
    let owner = line.split_once("users:((\"").and_then(|(_, rest)| {
        let (name, rest) = rest.split_once('"')?;
        let pid = rest.split_once("pid=")?.1.split([',', ')']).next()?;
        Some(format!("{name} pid {pid}"))
    });
    Some(Listener {
        addr: SocketAddr::new(ip, port),
        dev,
        dual,
        owner,
    })
}

/// Every address of the host a remote machine could send to (no loopback, no IPv6
/// link-local: those never arrive from another machine).
pub fn host_addresses(observed: &Observed) -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> = observed
        .links
        .values()
        .flat_map(|l| l.addrs.iter().copied())
        .filter(|a| !a.is_loopback())
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Whether `addr` is a gateway address of some bridge.
pub fn is_bridge_address(observed: &Observed, addr: IpAddr) -> bool {
    observed
        .links
        .values()
        .any(|l| l.is_bridge && l.addrs.contains(&addr))
}

/// Other lhb processes (not this one), as "pid N".
pub fn running_daemons() -> Vec<u32> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
            if pid == me {
                return None;
            }
            let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
            let mut args = cmdline.split(|&b| b == 0);
            let exe = args.next()?;
            let is_lhb = Path::new(std::str::from_utf8(exe).ok()?)
                .file_name()
                .is_some_and(|n| n == "lhb");
            (is_lhb && args.next() == Some(b"run".as_slice())).then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_parse() {
        let l = parse_ss_line(
            r#"LISTEN 0      128    127.0.0.1%lo:18555 0.0.0.0:* users:(("python3",pid=2892,fd=3))"#,
        )
        .unwrap();
        assert_eq!(l.addr, "127.0.0.1:18555".parse().unwrap());
        assert_eq!(l.dev.as_deref(), Some("lo"));
        assert_eq!(l.owner.as_deref(), Some("python3 pid 2892"));
        let l = parse_ss_line("LISTEN 0 128 *:18556 *:*").unwrap();
        assert!(l.dual && l.is_wildcard() && l.owner.is_none());
        assert!(l.covers("10.0.0.1:18556".parse().unwrap()));
        let l = parse_ss_line("LISTEN 0 128 [::]:18555 [::]:*").unwrap();
        assert!(!l.dual && l.is_wildcard());
        assert!(!l.covers("10.0.0.1:18555".parse().unwrap()));
        let l = parse_ss_line("LISTEN 0 4096 [fd00::1]%br0:80 [::]:*").unwrap();
        assert_eq!(l.addr, "[fd00::1]:80".parse().unwrap());
        assert_eq!(l.dev.as_deref(), Some("br0"));
    }

    #[test]
    fn probe_addresses_come_from_the_top_and_skip_what_is_used() {
        let gw: IpAddr = "10.201.5.1".parse().unwrap();
        let used: Vec<IpAddr> = vec!["10.201.5.254".parse().unwrap()];
        assert_eq!(
            free_address(gw, 24, &used),
            Some("10.201.5.253".parse().unwrap())
        );
        assert_eq!(free_address(gw, 31, &[]), None);
        let gw6: IpAddr = "fd00:201:5::1".parse().unwrap();
        let a = free_address(gw6, 64, &[]).unwrap();
        assert_ne!(a, gw6);
        let IpAddr::V6(a6) = a else { panic!() };
        assert_eq!(a6.segments()[..4], [0xfd00, 0x201, 5, 0]);
    }

    #[test]
    fn wildcard_listeners_cover_their_family() {
        let l = |a: &str| Listener {
            addr: a.parse().unwrap(),
            dev: None,
            dual: a.starts_with("[::]"),
            owner: None,
        };
        let to: SocketAddr = "127.0.0.1:80".parse().unwrap();
        assert!(l("127.0.0.1:80").covers(to));
        assert!(l("0.0.0.0:80").covers(to));
        assert!(l("[::]:80").covers(to));
        assert!(!l("0.0.0.0:81").covers(to));
        assert!(!l("10.0.0.1:80").covers(to));
        assert!(!l("0.0.0.0:80").covers("[::1]:80".parse().unwrap()));
    }
}
