//! Plans to drivers: the guard of container scopes, the kernel path (attachments and
//! endpoint map entries, by the difference between the applied plan and the wanted one),
//! the gateway sockets of the proxy and the UDP forwarder (one way for both:
//! [`GatewaySockets`]), and the openings the firewall task must hold; and the way back to
//! nothing.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{error, info};

use super::Daemon;
use crate::{
    datapath::gateway::{GatewayKey, GatewaySockets},
    datapath::kernel::KernelPath,
    host::netlink::Netlink,
    reconcile::{self, Plan},
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
        sync_sockets(
            &mut self.proxy,
            &mut self.applied.proxies,
            &mut self.proxy_errors,
            &wanted.proxies,
        );
        sync_sockets(
            &mut self.udp,
            &mut self.applied.udp,
            &mut self.udp_errors,
            &wanted.udp,
        );
        self.share_udp();
        self.share_proxy();
        if let Some(fw) = &self.firewall {
            fw.want(crate::firewall::openings(&self.applied));
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
    /// Each forwarded rule's share of the forwarder's flows: an equal part of the total.
    fn share_udp(&self) {
        let forwarded: BTreeSet<u32> = self.applied.udp.values().map(|t| t.slot).collect();
        let share = (self.udp.max_flows() / forwarded.len().max(1)).max(1);
        let limits = forwarded.iter().map(|&slot| (slot, share)).collect();
        self.udp.set_limits(&limits);
    }

    /// Each proxied rule's share of the proxy's connections: its `max_connections`, or
    /// an equal part of the total.
    fn share_proxy(&self) {
        let proxied: BTreeSet<u32> = self.applied.proxies.values().map(|t| t.slot).collect();
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

/// Brings one user-space path's sockets from `applied` to `wanted`. Only sockets no
/// longer wanted close: one whose rule now leads elsewhere is led there by `open` (the
/// forwarder keeps its socket, as closing it and binding again would race with the old
/// socket's release and read as taken; the proxy rebinds). A bind that fails is left out
/// of `applied` and retried at the next apply, never fatal: a local user who bound the
/// port first must not be able to stop lhb serving every other rule.
fn sync_sockets<S: GatewaySockets>(
    sockets: &mut S,
    applied: &mut BTreeMap<GatewayKey, S::Target>,
    errors: &mut BTreeMap<GatewayKey, String>,
    wanted: &BTreeMap<GatewayKey, S::Target>,
) {
    let gone: Vec<_> = applied
        .keys()
        .filter(|k| !wanted.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        sockets.close(&key);
        applied.remove(&key);
        info!(bridge = %key.bridge, "{} closed {}:{}", S::PATH, key.gateway, key.port);
    }
    errors.retain(|k, _| wanted.contains_key(k));
    for (key, target) in wanted {
        let before = applied.get(key).copied();
        if before == Some(*target) {
            continue;
        }
        match sockets.open(key, *target) {
            Ok(()) => {
                applied.insert(key.clone(), *target);
                errors.remove(key);
                if before.is_some() {
                    info!(bridge = %key.bridge, "{} on {}:{} now -> {}; the service sees clients as {}",
                          S::PATH, key.gateway, key.port, S::target(target), S::seen_as(key, target));
                } else {
                    info!(bridge = %key.bridge, "{} listening on {}:{} (bound to {}) -> {}; the service sees clients as {}",
                          S::PATH, key.gateway, key.port, key.bridge, S::target(target), S::seen_as(key, target));
                }
            }
            Err(e) => {
                // The proxy closed its old listener before binding anew.
                applied.remove(key);
                let e = format!(
                    "{} for {}:{} on {}: {e} (`lhb doctor` names the process; retrying)",
                    S::PATH,
                    key.gateway,
                    key.port,
                    key.bridge
                );
                if errors.get(key) != Some(&e) {
                    error!("{e}");
                }
                errors.insert(key.clone(), e);
            }
        }
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
