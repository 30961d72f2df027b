//! Plans to drivers: the kernel path (attachments and endpoint map entries, by the
//! difference between the applied plan and the wanted one), the proxy listeners, and the
//! openings the firewall task must hold; and the way back to nothing.

use std::collections::BTreeSet;

use tracing::{error, info};

use super::{Daemon, StartError};
use crate::{
    datapath::kernel::KernelPath,
    datapath::proxy,
    firewall::{Opening, Transport},
    host::netlink::Netlink,
    model::rule::{Rule, Source},
    reconcile::{self, BridgeProblem, Observed, Plan, RuleState},
};

impl Daemon {
    /// Detaches and removes everything, or with `keep` leaves the kernel path and the
    /// firewall rules serving for the next start to take over (the proxy cannot stay).
    pub(super) async fn shutdown(&mut self, keep: bool) {
        if let Some(fw) = self.firewall.take() {
            fw.shutdown(keep).await;
        }
        self.proxy.shutdown();
        self.udp.shutdown();
        if let Some(k) = self.kernel.as_mut() {
            k.shutdown(&self.netlink, keep).await;
        }
        // Also with --keep-on-exit: the kept kernel path then admits no container until
        // the next start has its guard in place (fail closed).
        if let Some(k) = self.kernel.as_mut()
            && keep
            && !self.guard.held().is_empty()
            && let Err(e) = k.set_scopes(&closed(&self.applied.scopes, &self.applied.guarded))
        {
            error!("closing the container scopes of the kept kernel path: {e:#}");
        }
        self.guard.remove().await;
    }

    /// Brings both data paths from what is applied to `wanted`. A failed attachment or
    /// bind is left out of `applied`, so the next call tries again. Returns the kernel
    /// path's error; proxy binds that failed are in `proxy_errors`.
    pub(super) async fn apply(&mut self, wanted: &Plan) -> anyhow::Result<()> {
        let mut first_err: Option<anyhow::Error> = None;
        // The guard grows before any path admits an address it protects, and shrinks
        // only after they stopped admitting one (below). Without it, the rules scoped to
        // containers admit nobody: an address alone can be forged.
        let grown: crate::datapath::guard::Bindings =
            self.guard.held().union(&wanted.bindings).copied().collect();
        let guarded = match self.guard.set(&grown).await {
            Ok(()) => true,
            Err(e) => {
                first_err = Some(e.context("the guard of container-scoped rules"));
                false
            }
        };
        let closed_plan;
        let wanted = if guarded || wanted.guarded.is_empty() {
            wanted
        } else {
            closed_plan = Plan {
                scopes: closed(&wanted.scopes, &wanted.guarded),
                ..wanted.clone()
            };
            &closed_plan
        };
        // Scopes before sockets: a listener bound below serves under the new scope from
        // its first connection.
        self.proxy.set_scopes(wanted.scopes.clone());
        self.udp.set_scopes(wanted.scopes.clone());
        if let Some(kernel) = self.kernel.as_mut()
            && let Err(e) = apply_kernel(kernel, &self.netlink, &mut self.applied, wanted).await
        {
            first_err.get_or_insert(e.into());
        }
        let gone: Vec<_> = self
            .applied
            .proxies
            .iter()
            .filter(|(k, t)| wanted.proxies.get(*k) != Some(*t))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.proxy.close(&key);
            self.applied.proxies.remove(&key);
            info!(bridge = %key.bridge, "proxy stopped listening on {}:{}", key.gateway, key.port);
        }
        self.proxy_errors
            .retain(|k, _| wanted.proxies.contains_key(k));
        for (key, target) in &wanted.proxies {
            if self.applied.proxies.contains_key(key) {
                continue;
            }
            match self.proxy.listen(key, *target) {
                Ok(()) => {
                    self.applied.proxies.insert(key.clone(), *target);
                    self.proxy_errors.remove(key);
                    info!(bridge = %key.bridge, "proxy listening on {}:{} (bound to {}) -> {}; the service sees clients as {}",
                          key.gateway, key.port, key.bridge, target.target, proxy::seen_as(key.ifindex, target));
                }
                Err(e) => {
                    // Never fatal: a local user who bound the port first must not be
                    // able to stop lhb serving every other rule. Retried with backoff.
                    let e = format!(
                        "proxy for {}:{} on {}: {e} (`lhb doctor` names the process; retrying)",
                        key.gateway, key.port, key.bridge
                    );
                    if self.proxy_errors.get(key) != Some(&e) {
                        error!("{e}");
                    }
                    self.proxy_errors.insert(key.clone(), e);
                }
            }
        }
        self.apply_udp(wanted);
        self.share_proxy();
        if let Some(fw) = &self.firewall {
            fw.want(openings(&self.applied));
        }
        self.applied.states = wanted.states.clone();
        self.applied.guarded = wanted.guarded.clone();
        if guarded && let Err(e) = self.guard.set(&wanted.bindings).await {
            first_err.get_or_insert(e.context("the guard of container-scoped rules"));
        }
        self.applied.bindings = self.guard.held().clone();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Daemon {
    /// The UDP forwarder's sockets, from what is applied to `wanted`; a bind that fails
    /// is left out of `applied` and retried, like a proxy listener.
    fn apply_udp(&mut self, wanted: &Plan) {
        // Only sockets no longer wanted close: one whose rule now leads elsewhere is
        // kept and led there by `bind` (closing it and binding again would race with
        // the old socket's release, and the address would read as taken).
        let gone: Vec<_> = self
            .applied
            .udp
            .keys()
            .filter(|k| !wanted.udp.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.udp.close(&key);
            self.applied.udp.remove(&key);
            info!(bridge = %key.bridge, "UDP forwarder closed {}:{}", key.gateway, key.port);
        }
        self.udp_errors.retain(|k, _| wanted.udp.contains_key(k));
        for (key, target) in &wanted.udp {
            let before = self.applied.udp.get(key).copied();
            if before == Some(*target) {
                continue;
            }
            match self.udp.bind(key, *target) {
                Ok(()) if before.is_some() => {
                    self.applied.udp.insert(key.clone(), *target);
                    info!(bridge = %key.bridge, "UDP forwarder on {}:{} now -> {}", key.gateway, key.port, target.target);
                }
                Ok(()) => {
                    self.applied.udp.insert(key.clone(), *target);
                    self.udp_errors.remove(key);
                    info!(bridge = %key.bridge, "UDP forwarder on {}:{} (bound to {}) -> {}; the service sees datagrams from {}",
                          key.gateway, key.port, key.bridge, target.target, udp_seen_as(key.ifindex, target));
                }
                Err(e) => {
                    let e = format!(
                        "UDP forwarder for {}:{} on {}: {e} (`lhb doctor` names the process; retrying)",
                        key.gateway, key.port, key.bridge
                    );
                    if self.udp_errors.get(key) != Some(&e) {
                        error!("{e}");
                    }
                    self.udp_errors.insert(key.clone(), e);
                }
            }
        }
        let forwarded: BTreeSet<u32> = self.applied.udp.values().map(|t| t.slot).collect();
        let share = (self.udp.max_flows() / forwarded.len().max(1)).max(1);
        let limits = forwarded.iter().map(|&slot| (slot, share)).collect();
        self.udp.set_limits(&limits);
    }

    /// Each proxied rule's share of the proxy's connections: its `max_connections`, or
    /// an equal part of the total.
    fn share_proxy(&self) {
        let proxied: std::collections::BTreeSet<u32> =
            self.applied.proxies.values().map(|t| t.slot).collect();
        let share = (self.proxy.max_connections() / proxied.len().max(1)).max(1);
        let limits = self
            .rules
            .iter()
            .filter(|a| proxied.contains(&a.slot))
            .map(|a| (a.slot, a.rule.max_connections.unwrap_or(share)))
            .collect();
        self.proxy.set_limits(&limits);
    }
}

/// `scopes` with the sets of the `guarded` slots emptied: those rules admit nobody.
fn closed(
    scopes: &std::collections::BTreeMap<u32, crate::model::scope::AllowSet>,
    guarded: &BTreeSet<u32>,
) -> std::collections::BTreeMap<u32, crate::model::scope::AllowSet> {
    scopes
        .iter()
        .map(|(slot, set)| {
            let set = if guarded.contains(slot) {
                crate::model::scope::AllowSet::default()
            } else {
                set.clone()
            };
            (*slot, set)
        })
        .collect()
}

fn udp_seen_as(ifindex: u32, target: &crate::datapath::udp::UdpTarget) -> String {
    match target.target {
        std::net::SocketAddr::V4(_) => proxy::loopback_source(ifindex).to_string(),
        std::net::SocketAddr::V6(_) => "::1".to_string(),
    }
}

/// The traffic the firewall must let in for what is applied: every served gateway port,
/// on its bridge.
pub(crate) fn openings(plan: &Plan) -> BTreeSet<Opening> {
    let kernel = plan.endpoints.keys().filter_map(|k| {
        Some(Opening {
            iface: plan.attach.get(&k.ifindex)?.clone(),
            gateway: k.gateway,
            port: k.port,
            transport: Transport::Tcp,
        })
    });
    let proxied = plan.proxies.keys().map(|k| Opening {
        iface: k.bridge.clone(),
        gateway: k.gateway,
        port: k.port,
        transport: Transport::Tcp,
    });
    let forwarded = plan.udp.keys().map(|k| Opening {
        iface: k.bridge.clone(),
        gateway: k.gateway,
        port: k.port,
        transport: Transport::Udp,
    });
    kernel.chain(proxied).chain(forwarded).collect()
}

/// Refuses, before anything is attached, interface rules that cannot work at all (not a
/// bridge, no address) under `plan` (made from `observed`). A bridge that does not
/// exist yet is waited for, as a Docker network is.
pub(crate) fn preflight<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    observed: &Observed,
    plan: &Plan,
) -> Result<(), StartError> {
    for rule in rules {
        let Source::Interface(iface) = &rule.source else {
            continue;
        };
        let state = plan.states.get(&rule.key());
        let r = rule.to_string();
        match reconcile::bridge_of(rule, observed) {
            // Waits, like a network rule: a bridge may come up after lhb (libvirt's
            // virbr0 after boot). A typo shows at once as a warning, in `lhb status`
            // and in `lhb doctor`. An uplink may be removed: the rule waits too, and the
            // reason is logged and in `lhb status`.
            Err(BridgeProblem::NoSuchInterface { .. } | BridgeProblem::Uplinks { .. }) => {
                continue;
            }
            Err(BridgeProblem::NotABridge { .. }) => {
                return Err(StartError::NotABridge {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Err(BridgeProblem::NoAddress { .. }) => {
                return Err(StartError::NoAddress {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Err(_) | Ok(_) => {}
        }
        if let Some(RuleState::Waiting(reason)) = state {
            return Err(StartError::Unservable {
                rule: r,
                reason: reason.clone(),
            });
        }
    }
    Ok(())
}

/// Brings the kernel path from `applied` to `wanted`. On an attach failure the bridge's
/// endpoints are left out of `applied`, so the next call tries again.
async fn apply_kernel(
    kernel: &mut KernelPath,
    netlink: &Netlink,
    applied: &mut Plan,
    wanted: &Plan,
) -> Result<(), crate::datapath::kernel::KernelPathError> {
    // Before the endpoints: an endpoint turned scoped finds its set in place. A set
    // written in part fails closed (a scoped endpoint admits only what is written), so
    // the endpoints still follow.
    let mut first_err = None;
    if applied.scopes != wanted.scopes {
        match kernel.set_scopes(&wanted.scopes) {
            Ok(()) => applied.scopes = wanted.scopes.clone(),
            Err(e) => {
                first_err = Some(crate::datapath::kernel::KernelPathError::Load(format!(
                    "writing the allow lists: {e:#}"
                )));
            }
        }
    }
    let d = reconcile::diff(applied, wanted);
    if d.is_empty() {
        return first_err.map_or(Ok(()), Err);
    }
    for key in &d.remove_endpoints {
        kernel.remove_endpoint(key);
        applied.endpoints.remove(key);
    }
    for (ifindex, name) in &d.detach {
        kernel.detach(*ifindex, netlink).await;
        applied.attach.remove(ifindex);
        info!(bridge = %name, ifindex, "detached");
    }
    for (ifindex, name) in &d.attach {
        match kernel.attach(*ifindex, name) {
            Ok(()) => {
                applied.attach.insert(*ifindex, name.clone());
                info!(bridge = %name, ifindex, mode = kernel.mode().as_str(), "attached");
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    for (key, steer) in &d.upsert_endpoints {
        if !applied.attach.contains_key(&key.ifindex) {
            continue;
        }
        match kernel.upsert_endpoint(*key, *steer) {
            Ok(()) => {
                applied.endpoints.insert(*key, *steer);
            }
            Err(e) => {
                first_err.get_or_insert(crate::datapath::kernel::KernelPathError::Load(format!(
                    "writing an endpoint to the map: {e:#}"
                )));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
