//! The daemon's state as `lhb status` and the metrics endpoint show it. One snapshot
//! type, serialized as JSON over the control socket (`lhb status --json` prints it as
//! is; its schema is in the README), as a table, and as Prometheus text.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{
        gateway::GatewayKey,
        proxy::{self, ProxyTarget},
    },
    model::rule::{Origin, Rule, Source},
    reconcile::RuleState,
};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub mode: crate::reconcile::Mode,
    /// `tcx` or `tc clsact` when loaded; null when the kernel path is not used.
    pub kernel_attach: Option<String>,
    /// Why the kernel path is not used, if it is not.
    pub kernel_unavailable: Option<String>,
    /// Which program pair serves (`ingress-ifindex` or `syn-ticket`) and why; null when
    /// the kernel path is not used.
    #[serde(default)]
    pub kernel_variant: Option<KernelVariant>,
    /// null with --no-docker.
    pub docker: Option<EngineStatus>,
    /// null unless lhb reads a Podman socket.
    #[serde(default)]
    pub podman: Option<EngineStatus>,
    pub firewall: FirewallStatus,
    pub config: String,
    /// Link, address and Docker events that led to a reconciliation, since start.
    pub reconcile_events: u64,
    /// Control and metrics requests refused.
    #[serde(default)]
    pub requests: RequestCounters,
    /// Why the last config reload failed (the running rules were kept); null once a
    /// reload succeeds.
    #[serde(default)]
    pub reload_error: Option<String>,
    /// `label_allow` (config and --label-allow): what a Docker network's `lhb.expose`
    /// label may ask for.
    #[serde(default)]
    pub label_allow: Vec<String>,
    /// Label entries not served, with the reason.
    #[serde(default)]
    pub label_refused: Vec<crate::model::labels::Refusal>,
    /// The nftables table that ties admitted containers' addresses to their bridge
    /// ports (`guard.rs`); null from a daemon older than the field.
    #[serde(default)]
    pub guard: Option<GuardStatus>,
    pub rules: Vec<RuleStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GuardStatus {
    /// Its name in the bridge family, this daemon's own (after its control socket).
    pub table: String,
    /// (bridge port, address) pairs it holds; 0: no table.
    pub bindings: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RequestCounters {
    /// Malformed, too large or too slow.
    pub bad: u64,
    /// Answered "busy": too many requests at once on one endpoint.
    pub busy: u64,
}

/// The kernel path's program variant (see `kernel::Variant`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct KernelVariant {
    pub name: String,
    pub why: String,
}

/// Whether an engine answers (Docker's or Podman's).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct EngineStatus {
    pub available: bool,
    pub problem: Option<String>,
}

impl From<&crate::engines::EngineState> for EngineStatus {
    fn from(s: &crate::engines::EngineState) -> EngineStatus {
        EngineStatus {
            available: s.available,
            problem: s.problem.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FirewallStatus {
    /// The firewall tools managed (e.g. `iptables`, `nftables`); empty: none.
    pub backends: Vec<String>,
    /// Accept rules lhb holds: `tcp to GATEWAY:PORT in on IFACE`.
    pub rules: Vec<String>,
    /// Times lhb found its accepts gone from the ruleset (a reload, a rewrite, a new
    /// dropping chain) and restored them.
    #[serde(default)]
    pub heals: u64,
    #[serde(default)]
    pub last_heal: Option<HealStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HealStatus {
    /// Seconds since the Unix epoch.
    pub unix_time: u64,
    /// `OPENING in CHAIN` for each accept put back.
    pub restored: Vec<String>,
}

/// Where a rule stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Serving,
    #[default]
    Waiting,
}

/// Which data path serves a gateway; `none`: it cannot be served (the reason is in
/// `why`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    Kernel,
    Proxy,
    /// The UDP forwarder (a rule's UDP side).
    Udp,
    #[default]
    None,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // pad, not write: the status table aligns its columns with width specifiers.
        f.pad(match self {
            State::Serving => "serving",
            State::Waiting => "waiting",
        })
    }
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            DataPath::Kernel => "kernel",
            DataPath::Proxy => "proxy",
            DataPath::Udp => "udp",
            DataPath::None => "none",
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RuleStatus {
    /// Exactly one of `network` / `interface`.
    pub network: Option<String>,
    pub interface: Option<String>,
    pub port: u16,
    /// `tcp`, `udp` or `both`.
    #[serde(default)]
    pub protocol: crate::model::rule::Protocol,
    pub target: String,
    pub service: String,
    /// `command-line`, `config`, `runtime` (`lhb expose` without --persist) or `label`
    /// (a Docker network's `lhb.expose` label).
    pub origin: crate::model::rule::Origin,
    /// Who may connect, as the rule's `allow` list writes it; empty: everyone on the
    /// source.
    #[serde(default)]
    pub allow: Vec<String>,
    pub state: State,
    /// Why it waits, in words.
    pub reason: Option<String>,
    pub bridge: Option<String>,
    pub ifindex: Option<u32>,
    pub gateways: Vec<GatewayStatus>,
    /// The firewall accept rules held for it.
    pub firewall: Vec<String>,
    pub counters: Counters,
    /// Who connected through it, on every path, most recently seen first (at most
    /// [`crate::datapath::clients::MAX_CLIENTS`] over all rules: the least recently seen are
    /// forgotten first).
    #[serde(default)]
    pub clients: Vec<ClientStatus>,
    /// The last error applying it (attach, bind), if the last attempt failed.
    pub last_error: Option<String>,
}

/// One client of one rule.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientStatus {
    pub address: String,
    /// The container that has this address on the rule's bridge now, if an engine
    /// names one.
    pub container: Option<String>,
    /// Connections (TCP) and flows (UDP) served.
    pub connections: u64,
    /// Connections and datagrams the rule's `allow` list refused.
    pub refused: u64,
    /// When it was last seen, seconds since the Unix epoch.
    pub last_seen: u64,
}

impl ClientStatus {
    /// The container's name, or the address where no engine names it.
    pub fn name(&self) -> &str {
        self.container.as_deref().unwrap_or(&self.address)
    }
}

/// At most this many clients get series of their own in the metrics (the most
/// recently seen first), so a rule open to a large network cannot blow up a
/// Prometheus server; `lhb_clients_not_exported` counts the rest.
pub const MAX_CLIENT_SERIES: usize = 256;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GatewayStatus {
    pub address: String,
    pub path: DataPath,
    /// Why this path (or why none).
    pub why: Option<String>,
    /// The client address the service sees for connections through this gateway.
    #[serde(default)]
    pub client_seen_as: Option<String>,
    /// Why this gateway is not served right now (its proxy address is held by another
    /// program); retried.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Counters {
    /// Connections the kernel path handed to the target (summed over CPUs).
    pub kernel_connections: u64,
    /// SYNs for which the target had no listener (refused).
    pub kernel_no_listener: u64,
    pub kernel_errors: u64,
    /// Connections from clients the rule's `allow` list does not admit, refused (RST
    /// from the kernel path or the proxy; ICMP port unreachable per UDP datagram).
    #[serde(default)]
    pub kernel_refused: u64,
    #[serde(default)]
    pub proxy_refused: u64,
    #[serde(default)]
    pub udp_refused: u64,
    pub proxy_connections: u64,
    pub proxy_active: u64,
    pub proxy_bytes: u64,
    pub proxy_target_errors: u64,
    pub proxy_over_limit: u64,
    /// This rule's share of the proxy's connections (0 while it proxies nothing).
    #[serde(default)]
    pub proxy_max_connections: u64,
    /// accept(2) failures on its proxy listeners (EMFILE and friends).
    #[serde(default)]
    pub proxy_accept_errors: u64,
    /// UDP flows (container address and port) opened, and open now.
    #[serde(default)]
    pub udp_flows: u64,
    #[serde(default)]
    pub udp_active_flows: u64,
    /// Datagrams passed from containers to the service, and back.
    #[serde(default)]
    pub udp_datagrams_in: u64,
    #[serde(default)]
    pub udp_datagrams_out: u64,
    #[serde(default)]
    pub udp_bytes: u64,
    /// Datagrams the service refused (nothing listening): answered with ICMP port
    /// unreachable.
    #[serde(default)]
    pub udp_target_errors: u64,
    /// Datagrams dropped because they would have opened a flow over the limit.
    #[serde(default)]
    pub udp_over_limit: u64,
    /// Datagrams lost in lhb (a socket buffer full, a send that failed).
    #[serde(default)]
    pub udp_dropped: u64,
    /// This rule's share of the forwarder's flows (0 while it forwards nothing).
    #[serde(default)]
    pub udp_max_flows: u64,
}

impl RuleStatus {
    pub fn name(&self) -> String {
        format!(
            "{}:{}{}",
            self.network
                .as_deref()
                .or(self.interface.as_deref())
                .unwrap_or("?"),
            self.port,
            self.protocol.suffix()
        )
    }
}

impl Status {
    /// The human view of `lhb status`; with `clients`, each rule's clients under it.
    pub fn table(&self, clients: bool) -> String {
        let mut s = String::new();
        let kernel = match (&self.kernel_attach, &self.kernel_unavailable) {
            (Some(a), _) => match &self.kernel_variant {
                Some(v) => format!("kernel path loaded ({a}; {} variant: {})", v.name, v.why),
                None => format!("kernel path loaded ({a})"),
            },
            (None, Some(why)) => format!("kernel path unavailable: {why}"),
            (None, None) => "kernel path not used".into(),
        };
        let mut docker = match &self.docker {
            None => "Docker: not used".to_string(),
            Some(d) if d.available => "Docker: reachable".to_string(),
            Some(d) => format!(
                "Docker: not reachable ({})",
                d.problem.as_deref().unwrap_or("?")
            ),
        };
        match &self.podman {
            None => {}
            Some(p) if p.available => docker += "; Podman: reachable",
            Some(p) => {
                docker += &format!(
                    "; Podman: not reachable ({})",
                    p.problem.as_deref().unwrap_or("?")
                )
            }
        }
        let fw = if self.firewall.backends.is_empty() {
            "firewall: none managed".to_string()
        } else {
            let healed = match &self.firewall.last_heal {
                Some(h) => format!(
                    "; restored after a ruleset change {} time(s), last {}s ago",
                    self.firewall.heals,
                    unix_now().saturating_sub(h.unix_time)
                ),
                None => String::new(),
            };
            format!(
                "firewall: {} ({} rule(s) held{healed})",
                self.firewall.backends.join(", "),
                self.firewall.rules.len()
            )
        };
        let _ = writeln!(
            s,
            "lhb {} (pid {}), mode {}, {kernel}\n{docker}; {fw}; config {}",
            self.version, self.pid, self.mode, self.config
        );
        if let Some(g) = self.guard.as_ref().filter(|g| g.bindings > 0) {
            let _ = writeln!(
                s,
                "guard: table bridge {} ties {} admitted address(es) to their containers' bridge ports",
                g.table, g.bindings
            );
        }
        if let Some(e) = &self.reload_error {
            let _ = writeln!(s, "config reload FAILED (running rules kept): {e}");
        }
        let _ = writeln!(
            s,
            "\n{:<28} {:<8} {:<16} {:<26} {:<7} {:<22} {:>8}",
            "RULE", "STATE", "BRIDGE", "GATEWAY", "PATH", "TARGET", "CONNS"
        );
        for r in &self.rules {
            // UDP flows count as connections here; the JSON and the metrics tell them
            // apart.
            let conns =
                r.counters.kernel_connections + r.counters.proxy_connections + r.counters.udp_flows;
            let first = r.gateways.first();
            let _ = writeln!(
                s,
                "{:<28} {:<8} {:<16} {:<26} {:<7} {:<22} {:>8}",
                r.name(),
                r.state,
                r.bridge.as_deref().unwrap_or("-"),
                first.map(|g| g.address.as_str()).unwrap_or("-"),
                first.map(|g| g.path.to_string()).as_deref().unwrap_or("-"),
                r.target,
                conns
            );
            for g in r.gateways.iter().skip(1) {
                let _ = writeln!(
                    s,
                    "{:<28} {:<8} {:<16} {:<26} {:<7}",
                    "", "", "", g.address, g.path
                );
            }
            if let Some(why) = &r.reason {
                let _ = writeln!(s, "  {}: {why}", r.name());
            }
            if !r.allow.is_empty() {
                let refused =
                    r.counters.kernel_refused + r.counters.proxy_refused + r.counters.udp_refused;
                let _ = writeln!(
                    s,
                    "  {}: only for {} ({refused} refused)",
                    r.name(),
                    r.allow.join(", ")
                );
            }
            for g in &r.gateways {
                if let (Some(why), true) = (&g.why, g.path != DataPath::Kernel) {
                    let _ = writeln!(s, "  {} via {}: {why}", r.name(), g.address);
                }
                if let (Some(seen), true) = (&g.client_seen_as, g.path == DataPath::Proxy) {
                    let _ = writeln!(
                        s,
                        "  {} via {}: the service sees clients as {seen}",
                        r.name(),
                        g.address
                    );
                }
                if let Some(e) = &g.error {
                    let _ = writeln!(s, "  {} via {}: NOT SERVED: {e}", r.name(), g.address);
                }
            }
            if let Some(e) = &r.last_error {
                let _ = writeln!(s, "  {}: last error: {e}", r.name());
            }
            if clients {
                client_rows(&mut s, r);
            }
        }
        if !self.label_refused.is_empty() {
            let _ = writeln!(s, "\nlabel entries NOT served:");
            for f in &self.label_refused {
                let _ = writeln!(s, "  {f}");
            }
        }
        s
    }

    /// The clients that get metric series: (rule, client), most recently seen first.
    fn client_series(&self) -> (Vec<(&RuleStatus, &ClientStatus)>, usize) {
        let mut all: Vec<_> = self
            .rules
            .iter()
            .flat_map(|r| r.clients.iter().map(move |c| (r, c)))
            .collect();
        all.sort_by_key(|(_, c)| std::cmp::Reverse(c.last_seen));
        let omitted = all.len().saturating_sub(MAX_CLIENT_SERIES);
        all.truncate(MAX_CLIENT_SERIES);
        (all, omitted)
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut m = Exposition::default();
        m.family(
            "lhb_connections_total",
            "counter",
            "Connections served, by rule and data path.",
            self.rules.iter().flat_map(|r| {
                [
                    (r.labels(",path=\"kernel\""), r.counters.kernel_connections),
                    (r.labels(",path=\"proxy\""), r.counters.proxy_connections),
                    (r.labels(",path=\"udp\""), r.counters.udp_flows),
                ]
            }),
        );
        for (name, kind, help, field) in PER_RULE {
            m.family(
                name,
                kind,
                help,
                self.rules
                    .iter()
                    .map(|r| (r.labels(""), field(&r.counters))),
            );
        }
        m.family(
            "lhb_rule_serving",
            "gauge",
            "1 if the rule is served on its bridge, 0 if it waits.",
            self.rules
                .iter()
                .map(|r| (r.labels(""), u64::from(r.state == State::Serving))),
        );
        m.family(
            "lhb_attached",
            "gauge",
            "1 per gateway endpoint served, by bridge, gateway, port and data path.",
            self.rules.iter().flat_map(RuleStatus::attached),
        );
        let (series, omitted) = self.client_series();
        let label = |r: &RuleStatus, c: &ClientStatus| {
            r.labels(&format!(
                ",client=\"{}\",address=\"{}\"",
                escape(c.container.as_deref().unwrap_or("")),
                c.address
            ))
        };
        m.family(
            "lhb_client_connections_total",
            "counter",
            "Connections (UDP: flows) served, by rule and client (container name where known, and address); the most recently seen clients only, see lhb_clients_not_exported.",
            series.iter().map(|(r, c)| (label(r, c), c.connections)),
        );
        m.family(
            "lhb_client_refused_total",
            "counter",
            "Connections and datagrams the rule's allow list refused, by rule and client.",
            series.iter().map(|(r, c)| (label(r, c), c.refused)),
        );
        m.family(
            "lhb_clients_not_exported",
            "gauge",
            "Clients lhb tracks but gives no series of their own (over the bound of 256).",
            [(String::new(), omitted as u64)],
        );
        self.daemon_families(&mut m);
        m.0
    }

    /// The families about the daemon as a whole, one sample each.
    fn daemon_families(&self, m: &mut Exposition) {
        let one = |v: u64| [(String::new(), v)];
        m.family(
            "lhb_reconcile_events_total",
            "counter",
            "Link, address, Docker and config events that led to a reconciliation.",
            one(self.reconcile_events),
        );
        m.family(
            "lhb_requests_refused_total",
            "counter",
            "Control and metrics requests refused: malformed, too large or too slow (bad), or too many at once (busy).",
            [
                ("{reason=\"bad\"}".into(), self.requests.bad),
                ("{reason=\"busy\"}".into(), self.requests.busy),
            ],
        );
        m.family(
            "lhb_firewall_rules",
            "gauge",
            "Firewall accept rules lhb holds.",
            one(self.firewall.rules.len() as u64),
        );
        m.family(
            "lhb_firewall_heals_total",
            "counter",
            "Times lhb restored its firewall accepts after the ruleset changed under it.",
            one(self.firewall.heals),
        );
        if let Some(h) = &self.firewall.last_heal {
            m.family(
                "lhb_firewall_last_heal_timestamp_seconds",
                "gauge",
                "When lhb last restored its firewall accepts (Unix time).",
                one(h.unix_time),
            );
        }
        let engines = [
            ("docker", "the Docker engine", &self.docker),
            ("podman", "Podman", &self.podman),
        ];
        for (name, who, e) in engines {
            if let Some(e) = e {
                m.family(
                    &format!("lhb_{name}_available"),
                    "gauge",
                    &format!("1 if {who} answers."),
                    one(u64::from(e.available)),
                );
            }
        }
    }
}

/// The per-rule counter families: name, type, help, and the counter.
type PerRule = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Counters) -> u64,
);
const PER_RULE: &[PerRule] = &[
    (
        "lhb_kernel_no_listener_total",
        "counter",
        "Connections the kernel path refused because the target was not listening.",
        |c| c.kernel_no_listener,
    ),
    (
        "lhb_kernel_refused_total",
        "counter",
        "Connections the kernel path refused (RST) because the rule's allow list does not admit the client.",
        |c| c.kernel_refused,
    ),
    (
        "lhb_proxy_refused_total",
        "counter",
        "Connections the proxy reset because the rule's allow list does not admit the client.",
        |c| c.proxy_refused,
    ),
    (
        "lhb_udp_refused_total",
        "counter",
        "Datagrams answered with ICMP port unreachable because the rule's allow list does not admit the client.",
        |c| c.udp_refused,
    ),
    (
        "lhb_kernel_errors_total",
        "counter",
        "Kernel path failures (socket lookup or assignment).",
        |c| c.kernel_errors,
    ),
    (
        "lhb_proxy_bytes_total",
        "counter",
        "Bytes the proxy carried, both directions.",
        |c| c.proxy_bytes,
    ),
    (
        "lhb_proxy_active_connections",
        "gauge",
        "Connections the proxy carries now.",
        |c| c.proxy_active,
    ),
    (
        "lhb_proxy_target_errors_total",
        "counter",
        "Proxied connections whose target refused or could not be reached.",
        |c| c.proxy_target_errors,
    ),
    (
        "lhb_proxy_over_limit_total",
        "counter",
        "Connections turned away at --max-connections.",
        |c| c.proxy_over_limit,
    ),
    (
        "lhb_udp_active_flows",
        "gauge",
        "UDP flows (container address and port) the forwarder holds now.",
        |c| c.udp_active_flows,
    ),
    (
        "lhb_udp_datagrams_in_total",
        "counter",
        "Datagrams forwarded from containers to the service.",
        |c| c.udp_datagrams_in,
    ),
    (
        "lhb_udp_datagrams_out_total",
        "counter",
        "Datagrams forwarded from the service to containers.",
        |c| c.udp_datagrams_out,
    ),
    (
        "lhb_udp_bytes_total",
        "counter",
        "UDP payload bytes forwarded, both directions.",
        |c| c.udp_bytes,
    ),
    (
        "lhb_udp_target_errors_total",
        "counter",
        "Datagrams the service refused (nothing listening), answered with ICMP port unreachable.",
        |c| c.udp_target_errors,
    ),
    (
        "lhb_udp_over_limit_total",
        "counter",
        "Datagrams dropped because they would have opened a flow over --udp-max-flows or the rule's share.",
        |c| c.udp_over_limit,
    ),
    (
        "lhb_udp_dropped_total",
        "counter",
        "Datagrams lost in lhb: a socket buffer full or a send that failed.",
        |c| c.udp_dropped,
    ),
];

/// Prometheus text exposition being written.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        rows: impl IntoIterator<Item = (String, u64)>,
    ) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(self.0, "{name}{labels} {v}");
        }
    }
}

impl RuleStatus {
    /// The rule's metric labels, then `extra` (`,key="value"`...).
    fn labels(&self, extra: &str) -> String {
        format!(
            "{{rule=\"{}\",service=\"{}\",origin=\"{}\",protocol=\"{}\"{extra}}}",
            escape(&self.name()),
            escape(&self.service),
            self.origin,
            self.protocol
        )
    }

    /// `lhb_attached` samples: 1 per gateway endpoint served.
    fn attached(&self) -> Vec<(String, u64)> {
        self.gateways
            .iter()
            .map(|g| {
                let l = format!(
                    "{{bridge=\"{}\",gateway=\"{}\",port=\"{}\",path=\"{}\"}}",
                    escape(self.bridge.as_deref().unwrap_or("")),
                    g.address,
                    self.port,
                    g.path
                );
                (l, u64::from(g.path != DataPath::None && g.error.is_none()))
            })
            .collect()
    }
}

/// A rule's clients under its row in `lhb status --clients`.
fn client_rows(s: &mut String, r: &RuleStatus) {
    if r.clients.is_empty() {
        let _ = writeln!(s, "  {}: no client yet", r.name());
        return;
    }
    let _ = writeln!(
        s,
        "  {:<32} {:<26} {:>8} {:>8}  LAST SEEN",
        "CLIENT", "ADDRESS", "CONNS", "REFUSED"
    );
    let now = unix_now();
    for c in &r.clients {
        let _ = writeln!(
            s,
            "  {:<32} {:<26} {:>8} {:>8}  {}s ago",
            c.container.as_deref().unwrap_or("-"),
            c.address,
            c.connections,
            c.refused,
            now.saturating_sub(c.last_seen)
        );
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn unix_now() -> u64 {
    unix_time(std::time::SystemTime::now())
}

/// Seconds since the Unix epoch.
pub fn unix_time(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A rule as `lhb status` shows it, from where it stands; counters, firewall rules
/// and errors are the running daemon's to add. `lhb plan` shows the same view.
pub fn rule_view(
    rule: &Rule,
    origin: Origin,
    state: Option<&RuleState>,
    proxies: &std::collections::BTreeMap<GatewayKey, ProxyTarget>,
) -> RuleStatus {
    let mut r = RuleStatus {
        port: rule.port,
        protocol: rule.protocol,
        target: rule.target.to_string(),
        service: rule.service.clone(),
        origin,
        allow: rule.allow.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    match &rule.source {
        Source::Network(n) => r.network = Some(n.clone()),
        Source::Interface(n) => r.interface = Some(n.clone()),
    }
    match state {
        Some(RuleState::Serving {
            bridge,
            ifindex,
            gateways,
            proxied,
            forwarded,
            skipped,
        }) => {
            r.state = State::Serving;
            r.bridge = Some(bridge.clone());
            r.ifindex = Some(*ifindex);
            let gw = |a: &std::net::IpAddr, path: DataPath, why: Option<&str>| GatewayStatus {
                address: a.to_string(),
                path,
                why: why.map(String::from),
                ..Default::default()
            };
            r.gateways.extend(gateways.iter().map(|a| {
                let mut g = gw(a, DataPath::Kernel, None);
                g.client_seen_as = Some("the container's own address".into());
                g
            }));
            r.gateways.extend(proxied.iter().map(|(a, why)| {
                let mut g = gw(a, DataPath::Proxy, Some(why));
                let key = GatewayKey {
                    bridge: bridge.clone(),
                    ifindex: *ifindex,
                    gateway: *a,
                    port: rule.port,
                };
                if let Some(t) = proxies.get(&key) {
                    g.client_seen_as = Some(proxy::seen_as(*ifindex, t));
                }
                g
            }));
            r.gateways.extend(forwarded.iter().map(|a| {
                let mut g = gw(a, DataPath::Udp, None);
                g.client_seen_as = Some(crate::datapath::gateway::seen_as(*ifindex, rule.target));
                g
            }));
            r.gateways.extend(
                skipped
                    .iter()
                    .map(|(a, why)| gw(a, DataPath::None, Some(why))),
            );
        }
        Some(RuleState::Waiting(why)) => {
            r.state = State::Waiting;
            r.reason = Some(why.clone());
        }
        None => {
            r.state = State::Waiting;
            r.reason = Some("not applied yet".into());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let st = Status {
            rules: vec![RuleStatus {
                network: Some("app".into()),
                port: 80,
                service: "web\"x".into(),
                origin: crate::model::rule::Origin::Label,
                state: State::Serving,
                bridge: Some("br-1".into()),
                gateways: vec![GatewayStatus {
                    address: "172.18.0.1".into(),
                    path: DataPath::Kernel,
                    why: None,
                    ..Default::default()
                }],
                counters: Counters {
                    kernel_connections: 7,
                    ..Default::default()
                },
                ..Default::default()
            }],
            reconcile_events: 3,
            ..Default::default()
        };
        let text = st.prometheus();
        assert!(text.contains("# TYPE lhb_connections_total counter"));
        assert!(text.contains(
            "lhb_connections_total{rule=\"app:80\",service=\"web\\\"x\",origin=\"label\",protocol=\"tcp\",path=\"kernel\"} 7"
        ));
        assert!(text.contains("lhb_reconcile_events_total 3"));
        assert!(text.contains(
            "lhb_attached{bridge=\"br-1\",gateway=\"172.18.0.1\",port=\"80\",path=\"kernel\"} 1"
        ));
        // Every sample line is `name{labels} value` or `name value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.rsplit_once(' ').unwrap().1.parse::<u64>().is_ok(), "{l}");
        }
    }
}
