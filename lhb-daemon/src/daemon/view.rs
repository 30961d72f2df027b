//! What the daemon shows: `lhb status` (and the metrics made from it), STATUS= for
//! systemd, a log line per rule whose state changed, and the final counters.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use tracing::{debug, info, warn};

use super::Daemon;
use crate::{
    api::control,
    api::status::{self, DataPath, Status},
    datapath::gateway::GatewayKey,
    model::rule::RuleKey,
    reconcile::{Plan, RuleState},
    startup::RuleSet,
};

pub(super) fn serving(plan: &Plan) -> usize {
    plan.states
        .values()
        .filter(|s| matches!(s, RuleState::Serving { .. }))
        .count()
}

/// One log line per rule whose state changed; whether any did (or a rule came or went).
pub(super) fn log_states(
    rules: &RuleSet,
    before: &BTreeMap<RuleKey, RuleState>,
    after: &BTreeMap<RuleKey, RuleState>,
) -> bool {
    let mut changed = !before.keys().eq(after.keys());
    for rule in rules.iter().map(|a| &a.rule) {
        let key = rule.key();
        let Some(state) = after.get(&key) else {
            continue;
        };
        if before.get(&key) == Some(state) {
            continue;
        }
        changed = true;
        match state {
            RuleState::Serving {
                bridge,
                ifindex,
                gateways,
                proxied,
                forwarded,
                skipped,
            } => {
                for gw in forwarded {
                    info!(
                        service = %rule.service,
                        "serving {rule}: containers on {bridge} (ifindex {ifindex}) send datagrams to {}; data path: UDP forwarder",
                        std::net::SocketAddr::new(*gw, rule.port)
                    );
                }
                for gw in gateways {
                    info!(
                        service = %rule.service,
                        "serving {rule}: containers on {bridge} (ifindex {ifindex}) connect to {}; data path: kernel",
                        std::net::SocketAddr::new(*gw, rule.port)
                    );
                }
                for (gw, why) in proxied {
                    info!(
                        service = %rule.service,
                        "serving {rule}: containers on {bridge} (ifindex {ifindex}) connect to {}; data path: proxy ({why})",
                        std::net::SocketAddr::new(*gw, rule.port)
                    );
                }
                for (gw, why) in skipped {
                    info!(service = %rule.service, "{rule}: not serving gateway {gw}: {why}");
                }
            }
            RuleState::Waiting(why) => {
                warn!(service = %rule.service, "not serving {rule}: {why}");
            }
        }
    }
    changed
}

impl Daemon {
    /// Where one rule stands, in words.
    pub(super) fn state_of(&self, key: &RuleKey) -> String {
        if self.rules.get(key).is_none() {
            return "gone".into();
        }
        match self.applied.states.get(key) {
            Some(RuleState::Serving {
                bridge,
                gateways,
                proxied,
                forwarded,
                ..
            }) => {
                let mut at: Vec<String> = gateways
                    .iter()
                    .map(|g| format!("{} (kernel)", std::net::SocketAddr::new(*g, key.port)))
                    .collect();
                at.extend(
                    proxied.iter().map(|(g, _)| {
                        format!("{} (proxy)", std::net::SocketAddr::new(*g, key.port))
                    }),
                );
                at.extend(
                    forwarded
                        .iter()
                        .map(|g| format!("{}/udp", std::net::SocketAddr::new(*g, key.port))),
                );
                format!("serving on {bridge} at {}", at.join(", "))
            }
            Some(RuleState::Waiting(why)) => format!("waiting: {why}"),
            None => "not applied yet".into(),
        }
    }

    /// Who connected through each rule on every path, by (slot, address): the kernel
    /// programs' map and the proxy's and UDP forwarder's table, merged.
    fn client_table(&self) -> BTreeMap<(u32, IpAddr), status::ClientStatus> {
        let now = std::time::SystemTime::now();
        let unix = |ago: Duration| status::unix_time(now - ago);
        let mut t: BTreeMap<(u32, IpAddr), status::ClientStatus> = BTreeMap::new();
        let mut add = |slot: u32, ip: IpAddr, conns: u64, refused: u64, last: u64| {
            let c = t.entry((slot, ip)).or_insert_with(|| status::ClientStatus {
                address: ip.to_string(),
                ..Default::default()
            });
            c.connections += conns;
            c.refused += refused;
            c.last_seen = c.last_seen.max(last);
        };
        if let Some(k) = &self.kernel {
            let mono = monotonic_ns();
            for (slot, ip, c) in k.clients() {
                let ago = Duration::from_nanos(mono.saturating_sub(c.last_ns));
                add(slot, ip, c.connections, c.refused, unix(ago));
            }
        }
        for (slot, ip, c) in self.clients.snapshot() {
            add(slot, ip, c.connections, c.refused, unix(c.last.elapsed()));
        }
        t
    }

    /// The container that has `ip` on `bridge` now, as an engine says.
    fn container_at(&self, bridge: &str, ip: IpAddr) -> Option<String> {
        let docker = self.docker.as_ref().map(|d| d.borrow());
        let podman = self.podman.as_ref().map(|p| p.rx.borrow());
        let nets = docker
            .iter()
            .flat_map(|v| v.networks.values())
            .chain(podman.iter().flat_map(|v| v.networks.values()));
        for n in nets.filter(|n| n.bridge == bridge) {
            if let Some(m) = n.members.iter().find(|m| m.addrs.contains(&ip)) {
                return Some(m.name.clone());
            }
        }
        None
    }

    /// One line per client refused since the last call, at most [`REFUSAL_LINES`] per
    /// call (every [`REFUSALS_EVERY`]): a container knocking a thousand times a
    /// second makes one line per period, not a thousand.
    pub(super) fn log_refusals(&mut self) {
        // Only scoped rules refuse anyone.
        if self.rules.iter().all(|a| a.rule.allow.is_empty()) {
            self.refusals_logged.clear();
            return;
        }
        let table = self.client_table();
        let mut logged = std::collections::HashMap::new();
        let (mut lines, mut more) = (0, 0);
        for (&(slot, ip), c) in table.iter().filter(|(_, c)| c.refused > 0) {
            let before = self.refusals_logged.get(&(slot, ip)).copied();
            logged.insert((slot, ip), c.refused);
            // Fewer than before: the kernel's LRU forgot it and it came back.
            let new = match before {
                Some(b) if b <= c.refused => c.refused - b,
                _ => c.refused,
            };
            if new == 0 {
                continue;
            }
            if lines == REFUSAL_LINES {
                more += 1;
                continue;
            }
            lines += 1;
            let Some(a) = self.rules.iter().find(|a| a.slot == slot) else {
                continue;
            };
            let bridge = match self.applied.states.get(&a.rule.key()) {
                Some(RuleState::Serving { bridge, .. }) => Some(bridge.clone()),
                _ => None,
            };
            let who = match bridge.and_then(|b| self.container_at(&b, ip)) {
                Some(name) => format!("container {name} ({ip})"),
                None => format!("{ip} (no container has this address on the bridge)"),
            };
            let allow: Vec<String> = a.rule.allow.iter().map(|c| c.to_string()).collect();
            warn!(
                rule = %a.rule.key(),
                "refused {who}: {new} connection(s) or datagram(s) since the last report; the rule allows only {}; `lhb doctor` says what to write",
                allow.join(", ")
            );
        }
        if more > 0 {
            warn!(
                "and {more} other client(s) refused since the last report; `lhb status --clients` lists them"
            );
        }
        self.refusals_logged = logged;
    }

    pub(super) fn status(&self) -> Status {
        let fw = self.firewall_chains.borrow().clone();
        let chains = &fw.chains;
        let mut rules = Vec::new();
        let clients = self.client_table();
        for a in self.rules.iter() {
            let (rule, slot) = (&a.rule, a.slot);
            let state = self.applied.states.get(&rule.key());
            let mut r = status::rule_view(rule, a.origin, state, &self.applied.proxies);
            if let Some(RuleState::Serving { bridge, .. }) = state {
                for g in r.gateways.iter_mut() {
                    let errors = match g.path {
                        DataPath::Proxy => &self.proxy_errors,
                        DataPath::Udp => &self.udp_errors,
                        _ => continue,
                    };
                    let key = g.address.parse().ok().map(|gateway| GatewayKey {
                        bridge: bridge.clone(),
                        ifindex: r.ifindex.unwrap_or_default(),
                        gateway,
                        port: rule.port,
                    });
                    g.error = key.and_then(|k| errors.get(&k).cloned());
                }
                for (o, c) in chains {
                    let ours = rule.protocol.carries(o.transport);
                    if &o.iface == bridge && o.port == rule.port && ours && !c.is_empty() {
                        r.firewall.push(format!("{o}: {}", c.join(", ")));
                    }
                }
                if let Some(e) = &self.last_error
                    && e.contains(bridge.as_str())
                {
                    r.last_error = Some(e.clone());
                }
            }
            if let Some(Ok(c)) = self.kernel.as_ref().map(|k| k.counters(slot)) {
                r.counters.kernel_connections = c.connections;
                r.counters.kernel_no_listener = c.no_listener;
                r.counters.kernel_errors = c.errors;
                r.counters.kernel_refused = c.refused;
            }
            let p = self.proxy.counters(slot);
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            r.counters.proxy_connections = get(&p.connections);
            r.counters.proxy_active = get(&p.active);
            r.counters.proxy_bytes = get(&p.bytes);
            r.counters.proxy_target_errors = get(&p.target_errors);
            r.counters.proxy_over_limit = get(&p.over_limit);
            r.counters.proxy_max_connections = get(&p.limit);
            r.counters.proxy_accept_errors = get(&p.accept_errors);
            r.counters.proxy_refused = get(&p.refused);
            let u = self.udp.counters(slot);
            r.counters.udp_flows = get(&u.flows);
            r.counters.udp_active_flows = get(&u.active);
            r.counters.udp_datagrams_in = get(&u.datagrams_in);
            r.counters.udp_datagrams_out = get(&u.datagrams_out);
            r.counters.udp_bytes = get(&u.bytes);
            r.counters.udp_target_errors = get(&u.target_errors);
            r.counters.udp_over_limit = get(&u.over_limit);
            r.counters.udp_dropped = get(&u.dropped);
            r.counters.udp_max_flows = get(&u.limit);
            r.counters.udp_refused = get(&u.refused);
            let bridge = r.bridge.clone();
            r.clients = clients
                .range((slot, IpAddr::from([0u8; 4]))..)
                .take_while(|((s, _), _)| *s == slot)
                .map(|(&(_, ip), c)| {
                    let mut c = c.clone();
                    c.container = bridge.as_deref().and_then(|b| self.container_at(b, ip));
                    c
                })
                .collect();
            r.clients
                .sort_by_key(|c| std::cmp::Reverse((c.last_seen, c.connections + c.refused)));
            rules.push(r);
        }
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            mode: self.paths.mode,
            kernel_attach: self.kernel.as_ref().map(|k| k.mode().as_str().to_string()),
            kernel_variant: self.kernel.as_ref().map(|k| status::KernelVariant {
                name: k.variant().as_str().into(),
                why: k.variant_why().into(),
            }),
            kernel_unavailable: self.kernel_unavailable.clone(),
            podman: self.podman.as_ref().map(|p| (&*p.rx.borrow()).into()),
            docker: self.docker.as_ref().map(|d| (&*d.borrow()).into()),
            firewall: status::FirewallStatus {
                backends: self.firewall_backends.clone(),
                rules: chains
                    .iter()
                    .flat_map(|(o, c)| c.iter().map(move |c| format!("{o} in {c}")))
                    .collect(),
                heals: fw.heals,
                last_heal: fw.last_heal.as_ref().map(|h| status::HealStatus {
                    unix_time: status::unix_time(h.at),
                    restored: h.restored.clone(),
                }),
            },
            config: self.config_path.display().to_string(),
            reconcile_events: self.reconcile_events,
            reload_error: self.reload_error.clone(),
            label_allow: self.label_allow.iter().map(|e| e.to_string()).collect(),
            label_refused: self.label_refused.clone(),
            guard: Some(status::GuardStatus {
                table: self.guard.table().into(),
                bindings: self.guard.held().len(),
            }),
            requests: status::RequestCounters {
                bad: control::BAD_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
                busy: control::BUSY_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
            },
            rules,
        }
    }

    /// STATUS= for systemd.
    pub(super) fn summary(&self) -> String {
        let mut s = if self.rules.is_empty() {
            let labels = if self.label_allow.is_empty() {
                ""
            } else {
                " or a network label lhb.expose"
            };
            format!(
                "no rule yet: add [[expose]] entries to {}, then `lhb reload`{labels}",
                self.config_path.display()
            )
        } else {
            format!(
                "serving {} of {} rule(s)",
                serving(&self.applied),
                self.rules.len()
            )
        };
        if let Some(e) = &self.reload_error {
            s += &format!("; config reload FAILED, running rules kept: {e}");
        }
        s
    }

    pub(super) fn log_final_counters(&self) {
        for a in self.rules.iter() {
            let (rule, slot) = (&a.rule, a.slot);
            if let Some(Ok(c)) = self.kernel.as_ref().map(|k| k.counters(slot)) {
                debug!(rule = %rule, connections = c.connections, no_listener = c.no_listener,
                       errors = c.errors, "final kernel counters");
            }
            let p = self.proxy.counters(slot);
            debug!(rule = %rule, connections = ?p.connections, bytes = ?p.bytes,
                   target_errors = ?p.target_errors, over_limit = ?p.over_limit, "final proxy counters");
        }
    }
}

/// How often refused clients are logged: one line per client per period at most.
pub(super) const REFUSALS_EVERY: Duration = Duration::from_secs(10);
/// Lines per period at most; the rest are counted in one more.
const REFUSAL_LINES: usize = 16;

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns` (and of `Instant`).
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
}
