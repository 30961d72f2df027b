//! `lhb doctor`: walks the chain a container's connection takes, one step per line, and
//! says for each step that fails what is wrong and how to fix it: Docker engine,
//! network, bridge, gateway address, target service (TCP and UDP), data path, firewall,
//! and a live probe (a connection, a datagram) from a namespace on the bridge. It reads
//! the system itself, so it works with or without a running daemon (and says which).
//!
//! The steps by kind: `bridge.rs` (engine, network, bridge, gateway, scope: pure over
//! what was observed), `data_path.rs` (what serves each gateway, TCP and UDP), `probe.rs`
//! (the firewall read only, and a live probe); here the walk, the target service and the
//! running daemons.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    datapath::kernel,
    diagnose::check::{self, Datagram, Outcome, ProbeNs, Target},
    diagnose::findings::{Findings, Level},
    firewall::{Firewall, FirewallMode, Opening, Transport},
    model::rule::{Rule, Source},
    reconcile::{self, Observed},
};

mod bridge;
mod data_path;
mod probe;

use bridge::*;
use data_path::*;
use probe::*;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// True if no step failed.
pub async fn run(t: Target) -> anyhow::Result<bool> {
    let check::Checked {
        rules,
        observed,
        label_refused,
    } = check::rules(&t).await?;
    let daemons = check::running_daemons();
    let mut failed = 0;
    for (i, rule) in rules.iter().enumerate() {
        if i > 0 {
            println!();
        }
        // Printed rule by rule: the probes of the next one take seconds.
        let mut r = Findings::default();
        r.heading(format!("{rule} (service {})", rule.service));
        diagnose(rule, &observed, &daemons, &mut r)?;
        print!("{}", r.render(false));
        failed += r.count(Level::Fail);
    }
    if !label_refused.is_empty() {
        let mut r = Findings::default();
        r.heading("network labels");
        label_steps(&label_refused, &mut r);
        print!("\n{}", r.render(false));
    }
    if failed == 0 {
        println!("\nno problem found");
    } else {
        println!("\n{failed} step(s) failed; fix the first one first");
    }
    Ok(failed == 0)
}

/// A label entry refused is a warning with its fix: the network's owner asked for it,
/// so either the label or `label_allow` is wrong.
pub(crate) fn label_steps(refused: &[crate::model::labels::Refusal], r: &mut Findings) {
    for f in refused {
        let fix = if f.reason.contains("label_allow") {
            format!(
                "if the network {} may reach it, add the entry to label_allow in the config (then `lhb reload`); otherwise remove it from the network's {} label",
                f.network,
                crate::model::labels::LABEL
            )
        } else {
            format!(
                "correct the network's {} label (entries PORT[=TARGET], comma-separated)",
                crate::model::labels::LABEL
            )
        };
        r.add(Level::Warn, f.to_string(), Some(fix));
    }
}

fn diagnose(
    rule: &Rule,
    observed: &Observed,
    daemons: &[u32],
    r: &mut Findings,
) -> anyhow::Result<()> {
    let Some((bridge, ifindex, gateways)) = bridge_steps(rule, observed, r) else {
        if rule.protocol.tcp() {
            check_target(rule, Transport::Tcp, r)?;
        }
        if rule.protocol.udp() {
            check_target(rule, Transport::Udp, r)?;
        }
        check_daemon(daemons, r);
        return Ok(());
    };

    if rule.protocol.tcp() {
        // 3. Target service.
        let target_up = check_target(rule, Transport::Tcp, r)?;

        // 4. Data path, per gateway.
        let (served, cross) = data_path_steps(rule, &bridge, ifindex, &gateways, daemons, r)?;
        // Gateways left out on purpose are not probed.
        let gateways: Vec<IpAddr> = gateways
            .iter()
            .copied()
            .filter(|g| !cross.contains(g))
            .collect();

        // 5. Firewall, and 6. the live probe.
        probe_steps(
            rule,
            observed,
            &bridge,
            &gateways,
            (target_up, &served),
            daemons,
            r,
        )?;
    }
    if rule.protocol.udp() {
        udp_steps(rule, observed, &bridge, &gateways, daemons, r)?;
    }
    Ok(())
}

/// Whether the target listens; a wildcard listener is a warning (exposed everywhere).
fn check_target(rule: &Rule, transport: Transport, r: &mut Findings) -> anyhow::Result<bool> {
    let (all, proto) = match transport {
        Transport::Tcp => (check::listeners(rule.target.port())?, ""),
        Transport::Udp => (check::udp_sockets(rule.target.port())?, "/udp"),
    };
    let covering: Vec<_> = all.iter().filter(|l| l.covers(rule.target)).collect();
    if covering.is_empty() {
        r.add(
            Level::Fail,
            format!(
                "target {}{proto}: nothing listens there (service down?)",
                rule.target
            ),
            Some(format!(
                "start the service on {} (containers get an immediate refusal until it listens)",
                rule.target
            )),
        );
        return Ok(false);
    }
    let who: Vec<String> = covering.iter().map(|l| l.describe()).collect();
    if covering.iter().any(|l| l.is_wildcard()) {
        r.add(
            Level::Warn,
            format!(
                "target {}{proto}: listening on a wildcard address ({}): exposed on every interface, not only to the bridge",
                rule.target,
                who.join(", ")
            ),
            Some(format!(
                "bind the service to {} (e.g. OLLAMA_HOST=127.0.0.1, listen_addresses='localhost'); `lhb verify` checks it",
                rule.target.ip()
            )),
        );
    } else {
        r.add(
            Level::Ok,
            format!(
                "target {}{proto}: listening ({})",
                rule.target,
                who.join(", ")
            ),
            None,
        );
    }
    Ok(true)
}

fn daemon_state(daemons: &[u32]) -> String {
    match daemons {
        [] => "lhb is not running".to_string(),
        pids => format!(
            "lhb runs (pid {}) but does not serve this rule",
            pids.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn daemon_fix(daemons: &[u32]) -> Option<String> {
    Some(match daemons {
        [] => "start lhb (`systemctl start lhb`, or `lhb run --config FILE`)".to_string(),
        _ => "add the rule to its config and reload it (`systemctl reload lhb`, i.e. SIGHUP), and check its log (`journalctl -u lhb`)".to_string(),
    })
}

fn check_daemon(daemons: &[u32], r: &mut Findings) {
    match daemons {
        [] => r.add(Level::Warn, "lhb: not running", daemon_fix(daemons)),
        _ => r.add(
            Level::Ok,
            daemon_state(daemons).replace(" but does not serve this rule", ""),
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engines::{EngineState, EngineView, Network},
        model::rule::{parse_iface_spec, parse_network_spec},
        reconcile::Link,
    };

    fn bridge(ifindex: u32, addr: &str, uplinks: &[&str]) -> Link {
        let ip: IpAddr = addr.parse().unwrap();
        Link {
            ifindex,
            is_bridge: true,
            addrs: vec![ip],
            prefixes: vec![(ip, 24)],
            uplinks: uplinks.iter().map(|u| u.to_string()).collect(),
            ports: Vec::new(),
        }
    }

    fn steps(rule: &Rule, observed: &Observed) -> (Option<String>, Vec<(Level, String, String)>) {
        let mut f = Findings::default();
        let got = bridge_steps(rule, observed, &mut f).map(|(b, i, g)| format!("{b} {i} {g:?}"));
        let lines = f
            .iter()
            .map(|x| (x.level, x.what.clone(), x.fix.clone().unwrap_or_default()))
            .collect();
        (got, lines)
    }

    #[test]
    fn a_served_bridge_is_ok_and_gives_its_gateway_to_probe() {
        let mut o = Observed::default();
        o.links.insert("br0".into(), bridge(5, "10.0.0.1", &[]));
        let (got, lines) = steps(&parse_iface_spec("br0:80").unwrap(), &o);
        assert_eq!(got.as_deref(), Some("br0 5 [10.0.0.1]"));
        assert!(lines.iter().all(|l| l.0 == Level::Ok), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.1 == "gateway: 10.0.0.1"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_missing_bridge_fails_with_where_to_look() {
        let (got, lines) = steps(&parse_iface_spec("br9:80").unwrap(), &Observed::default());
        assert_eq!(got, None);
        let fail = lines.iter().find(|l| l.0 == Level::Fail).unwrap();
        assert_eq!(fail.1, "bridge br9: no such interface");
        assert!(fail.2.contains("ip -br link show type bridge"), "{fail:?}");
    }

    #[test]
    fn an_uplink_fails_once_with_the_opt_in_as_the_fix() {
        let mut o = Observed::default();
        o.links.insert(
            "br0".into(),
            bridge(5, "10.0.0.1", &["eth1 (a network card)"]),
        );
        let (got, lines) = steps(&parse_iface_spec("br0:80").unwrap(), &o);
        assert_eq!(got, None);
        let fails: Vec<_> = lines.iter().filter(|l| l.0 == Level::Fail).collect();
        assert_eq!(fails.len(), 1, "{lines:?}");
        assert!(fails[0].1.contains("eth1 (a network card)"));
        assert!(fails[0].2.contains("allow_uplinks = true"));
    }

    #[test]
    fn a_missing_docker_network_fails_with_how_to_create_it() {
        let mut o = Observed {
            engines: Some(EngineView {
                docker: Some(EngineState {
                    available: true,
                    ..Default::default()
                }),
                podman: None,
            }),
            ..Default::default()
        };
        let (got, lines) = steps(&parse_network_spec("app:80").unwrap(), &o);
        assert_eq!(got, None);
        assert!(
            lines
                .iter()
                .any(|l| l.0 == Level::Ok && l.1 == "Docker engine: reachable")
        );
        let fail = lines.iter().find(|l| l.0 == Level::Fail).unwrap();
        assert_eq!(fail.1, "Docker network app: does not exist");
        assert!(fail.2.contains("docker network create app"), "{fail:?}");
        // Once it exists, with its bridge: served.
        let docker = o.engines.as_mut().and_then(|e| e.docker.as_mut()).unwrap();
        docker.networks.insert(
            "app".into(),
            Network {
                driver: "bridge".into(),
                bridge: "br-1".into(),
                gateways: vec!["172.18.0.1".parse().unwrap()],
                labels: Default::default(),
                members: Vec::new(),
            },
        );
        o.links.insert("br-1".into(), bridge(7, "172.18.0.1", &[]));
        let (got, _) = steps(&parse_network_spec("app:80").unwrap(), &o);
        assert_eq!(got.as_deref(), Some("br-1 7 [172.18.0.1]"));
    }
}
