//! `lhb run`: the long-running daemon.
//!
//! Flow: rules (desired state) + a netlink snapshot (observed state) -> [`reconcile::plan`]
//! -> the difference to what is applied goes to the kernel data path. Every link or
//! address event triggers a new snapshot and plan, so bridges that come, go, or come back
//! with a new ifindex or address are followed without polling. SIGINT/SIGTERM detach
//! everything before exit.

use std::time::Duration;

use anyhow::{Context as _, bail};
use thiserror::Error;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    caps,
    kernel::{KernelPath, KernelPathError},
    netlink::Netlink,
    reconcile::{self, Observed, Plan, RuleState},
    rule::{Rule, Source},
};

/// Events arriving in a burst (a bridge and its address, a veth and its port) are
/// coalesced: one snapshot after this quiet time covers all of them.
const SETTLE: Duration = Duration::from_millis(15);
/// An attachment that failed is retried this often until it succeeds or its bridge goes.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(
        "no rule to serve: give at least one --expose-iface IFACE:PORT[=TARGET] (e.g. `lhb run --expose-iface virbr0:11434`)"
    )]
    NoRules,
    #[error(
        "missing capability {caps}: the kernel data path needs CAP_BPF and CAP_NET_ADMIN (run lhb as root, or grant them, e.g. AmbientCapabilities=CAP_BPF CAP_NET_ADMIN in its unit)",
        caps = .0.join(" and ")
    )]
    MissingCapabilities(Vec<&'static str>),
    #[error("rule {rule}: interface {iface} does not exist (check `ip -br link show type bridge`)")]
    NoSuchInterface { rule: String, iface: String },
    #[error(
        "rule {rule}: interface {iface} is not a bridge; lhb serves containers on Linux bridges (docker0, br-*, virbr0, podman0, ...)"
    )]
    NotABridge { rule: String, iface: String },
    #[error(
        "rule {rule}: bridge {iface} has no IP address, so containers have no gateway to connect to (add one with `ip addr add ADDR/LEN dev {iface}`)"
    )]
    NoAddress { rule: String, iface: String },
    #[error("rule {rule}: {reason}")]
    Unservable { rule: String, reason: String },
}

pub async fn run(rules: Vec<Rule>) -> anyhow::Result<()> {
    if rules.is_empty() {
        return Err(StartError::NoRules.into());
    }
    let eff = caps::effective().context("reading this process's capabilities")?;
    let missing = caps::missing_for_kernel_path(eff);
    if !missing.is_empty() {
        return Err(StartError::MissingCapabilities(missing).into());
    }

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    let (netlink, mut events) = Netlink::connect()?;
    let observed = netlink.snapshot().await?;
    let slots: Vec<u32> = (0..rules.len() as u32).collect();
    preflight(&rules, &observed)?;
    let wanted = reconcile::plan(&rules, &slots, &observed);
    for (rule, state) in rules.iter().zip(&wanted.states) {
        if let RuleState::Waiting(reason) = state {
            return Err(StartError::Unservable {
                rule: rule.to_string(),
                reason: reason.clone(),
            }
            .into());
        }
    }

    let mut kernel = KernelPath::load()?;
    for &slot in &slots {
        kernel.reset_counters(slot)?;
    }
    info!(
        attach = kernel.mode().as_str(),
        "kernel data path loaded ({} rule(s))",
        rules.len()
    );

    let mut applied = Plan::default();
    // At start every bridge exists (preflight), so a failure to attach is fatal and
    // nothing stays behind: dropping `kernel` detaches what was attached.
    if let Err(e) = apply(&mut kernel, &netlink, &mut applied, &wanted).await {
        kernel.shutdown(&netlink).await;
        return Err(e.into());
    }
    log_states(&rules, &[], &applied.states);
    let serving = applied
        .states
        .iter()
        .filter(|s| matches!(s, RuleState::Serving { .. }))
        .count();
    info!("ready: serving {serving} of {} rule(s)", rules.len());

    let mut retry_pending = false;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            ev = events.next() => {
                if ev.is_none() {
                    kernel.shutdown(&netlink).await;
                    bail!("the rtnetlink event socket closed; cannot follow bridges any more");
                }
                tokio::time::sleep(SETTLE).await;
                events.drain();
            }
            _ = tokio::time::sleep(RETRY), if retry_pending => {}
        }
        let observed = match netlink.snapshot().await {
            Ok(o) => o,
            Err(e) => {
                warn!("reading links and addresses: {e:#}");
                retry_pending = true;
                continue;
            }
        };
        let wanted = reconcile::plan(&rules, &slots, &observed);
        let before = applied.states.clone();
        retry_pending = match apply(&mut kernel, &netlink, &mut applied, &wanted).await {
            Ok(()) => false,
            Err(e) => {
                error!("{e} (retrying in {}s)", RETRY.as_secs());
                true
            }
        };
        log_states(&rules, &before, &applied.states);
    }

    for (i, rule) in rules.iter().enumerate() {
        if let Ok(c) = kernel.counters(slots[i]) {
            debug!(rule = %rule, connections = c.connections, no_listener = c.no_listener,
                   errors = c.errors, "final counters");
        }
    }
    kernel.shutdown(&netlink).await;
    info!("detached from every bridge; bye");
    Ok(())
}

/// Refuses, before anything is loaded, interface rules that cannot work at all.
fn preflight(rules: &[Rule], observed: &Observed) -> Result<(), StartError> {
    for rule in rules {
        let Source::Interface(iface) = &rule.source;
        let r = rule.to_string();
        match observed.links.get(iface) {
            None => {
                return Err(StartError::NoSuchInterface {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Some(l) if !l.is_bridge => {
                return Err(StartError::NotABridge {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Some(l) if l.addrs.is_empty() => {
                return Err(StartError::NoAddress {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Brings the data path from `applied` to `wanted`. On an attach failure the bridge's
/// endpoints are left out of `applied`, so the next call tries again.
async fn apply(
    kernel: &mut KernelPath,
    netlink: &Netlink,
    applied: &mut Plan,
    wanted: &Plan,
) -> Result<(), KernelPathError> {
    let d = reconcile::diff(applied, wanted);
    if d.is_empty() {
        applied.states = wanted.states.clone();
        return Ok(());
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
    let mut first_err = None;
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
                first_err.get_or_insert(KernelPathError::Load(format!(
                    "writing an endpoint to the map: {e:#}"
                )));
            }
        }
    }
    applied.states = wanted.states.clone();
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One log line per rule whose state changed.
fn log_states(rules: &[Rule], before: &[RuleState], after: &[RuleState]) {
    for (i, (rule, state)) in rules.iter().zip(after).enumerate() {
        if before.get(i) == Some(state) {
            continue;
        }
        match state {
            RuleState::Serving {
                bridge,
                ifindex,
                gateways,
                skipped,
            } => {
                let gws: Vec<String> = gateways.iter().map(|g| g.to_string()).collect();
                info!(
                    service = %rule.service,
                    "serving {rule}: containers on {bridge} (ifindex {ifindex}) connect to {}:{}",
                    gws.join(","),
                    rule.port
                );
                for (gw, why) in skipped {
                    info!(service = %rule.service, "{rule}: not serving gateway {gw}: {why}");
                }
            }
            RuleState::Waiting(why) => {
                warn!(service = %rule.service, "not serving {rule}: {why}");
            }
        }
    }
}
