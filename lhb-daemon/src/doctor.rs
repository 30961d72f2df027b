//! `lhb doctor`: walks the chain a container's connection takes, one step per line, and
//! says for each step that fails what is wrong and how to fix it: Docker engine, network,
//! bridge, gateway address, target service, data path, firewall, and a live probe from a
//! namespace on the bridge. It reads the system itself, so it works with or without a
//! running daemon (and says which).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    check::{self, Outcome, ProbeNs, Target},
    firewall::{Firewall, FirewallMode, Opening},
    kernel,
    reconcile::{self, Observed},
    rule::{Rule, Source},
};

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Report {
    failed: usize,
}

impl Report {
    fn step(&mut self, level: Level, what: impl AsRef<str>, fix: Option<String>) {
        let tag = match level {
            Level::Ok => "OK  ",
            Level::Warn => "WARN",
            Level::Fail => {
                self.failed += 1;
                "FAIL"
            }
        };
        println!("{tag}  {}", what.as_ref());
        if let Some(fix) = fix {
            println!("      fix: {fix}");
        }
    }
}

/// True if no step failed.
pub async fn run(t: Target) -> anyhow::Result<bool> {
    let rules = check::rules(&t)?;
    let observed = check::observe(t.no_docker || !check::needs_docker(&rules)).await?;
    let daemons = check::running_daemons();
    let mut r = Report { failed: 0 };
    for (i, rule) in rules.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{rule} (service {})", rule.service);
        diagnose(rule, &observed, &daemons, &mut r)?;
    }
    if r.failed == 0 {
        println!("\nno problem found");
    } else {
        println!("\n{} step(s) failed; fix the first one first", r.failed);
    }
    Ok(r.failed == 0)
}

fn diagnose(
    rule: &Rule,
    observed: &Observed,
    daemons: &[u32],
    r: &mut Report,
) -> anyhow::Result<()> {
    // 1. Docker engine and network (network rules only).
    match &rule.source {
        Source::Network(net) => {
            let view = observed.docker.clone().unwrap_or_default();
            match check::docker_problem(&view) {
                Some(p) => {
                    r.step(
                        Level::Fail,
                        format!("Docker engine: not reachable ({p})"),
                        Some("start it (`systemctl start docker`), or point DOCKER_HOST at it; lhb waits for it and serves the network once it answers".into()),
                    );
                }
                None => r.step(Level::Ok, "Docker engine: reachable", None),
            }
            match view.networks.get(net) {
                Some(n) if n.driver == "bridge" => r.step(
                    Level::Ok,
                    format!("Docker network {net}: exists, bridge {}", n.bridge),
                    None,
                ),
                Some(n) => r.step(
                    Level::Fail,
                    format!("Docker network {net}: uses the {} driver, not bridge", n.driver),
                    Some("lhb serves bridge networks; attach the containers to a bridge network".into()),
                ),
                None if view.available => r.step(
                    Level::Fail,
                    format!("Docker network {net}: does not exist"),
                    Some(format!(
                        "create it (`docker network create {net}`, or start its compose project) or correct the rule; a running lhb serves it within a second of its creation"
                    )),
                ),
                None => {}
            }
        }
        Source::Interface(_) => r.step(
            Level::Ok,
            "Docker engine: not needed (interface rule)",
            None,
        ),
    }

    // 2. Bridge and gateway.
    let resolved = reconcile::bridge_of(rule, observed);
    let bridge_name = match &rule.source {
        Source::Interface(i) => Some(i.clone()),
        Source::Network(n) => observed
            .docker
            .as_ref()
            .and_then(|d| d.networks.get(n))
            .map(|n| n.bridge.clone()),
    };
    if let Some(name) = &bridge_name {
        match observed.links.get(name) {
            None => r.step(
                Level::Fail,
                format!("bridge {name}: no such interface"),
                Some(match &rule.source {
                    Source::Interface(_) => "create the bridge, or correct the rule (bridges here: `ip -br link show type bridge`)".to_string(),
                    Source::Network(n) => format!("Docker has not created it yet: it appears when a container joins {n}, or re-create the network"),
                }),
            ),
            Some(l) if !l.is_bridge => r.step(
                Level::Fail,
                format!("bridge {name}: is not a bridge"),
                Some("lhb serves containers on Linux bridges; name the bridge they are plugged into".into()),
            ),
            Some(l) => {
                r.step(Level::Ok, format!("bridge {name}: up (ifindex {})", l.ifindex), None);
                if !l.uplinks.is_empty() {
                    let ports = l.uplinks.join(", ");
                    if rule.allow_uplinks {
                        r.step(
                            Level::Warn,
                            format!("bridge {name}: port(s) leading off this host: {ports}; allow_uplinks = true, so the service is served to every machine on that network too"),
                            None,
                        );
                    } else {
                        r.step(
                            Level::Fail,
                            format!("bridge {name}: port(s) leading off this host: {ports}; lhb does not serve here, since every machine on that network could connect"),
                            Some(format!("take the port(s) off the bridge, or, if serving that network is intended, set `allow_uplinks = true` on the rule (--allow-uplinks {})", rule.source.name())),
                        );
                    }
                }
                if l.addrs.is_empty() {
                    r.step(
                        Level::Fail,
                        format!("gateway: bridge {name} has no IP address"),
                        Some(format!("give it one (`ip addr add ADDR/LEN dev {name}`); containers use it as their gateway")),
                    );
                }
            }
        }
    }
    let (bridge, ifindex, gateways) = match resolved {
        Ok(reconcile::Resolved {
            bridge,
            link,
            gateways,
        }) => {
            let list: Vec<String> = gateways.iter().map(IpAddr::to_string).collect();
            r.step(Level::Ok, format!("gateway: {}", list.join(", ")), None);
            (bridge.to_string(), link.ifindex, gateways)
        }
        Err(why) => {
            // An uplink was reported above, with its fix.
            if !matches!(why, reconcile::BridgeProblem::Uplinks { .. }) {
                r.step(Level::Fail, format!("gateway: {why}"), None);
            }
            check_target(rule, r)?;
            check_daemon(daemons, r);
            return Ok(());
        }
    };

    // 3. Target service.
    let target_up = check_target(rule, r)?;

    // 4. Data path, per gateway.
    let mut served = Vec::new();
    let mut cross = Vec::new();
    let listening = check::listeners(rule.port)?;
    for &gw in &gateways {
        let key = reconcile::endpoint_key(ifindex, gw, rule.port);
        let k = kernel::inspect(&bridge, &key);
        let proxy = listening
            .iter()
            .find(|l| l.addr.ip() == gw && l.dev.as_deref() == Some(bridge.as_str()));
        let to = SocketAddr::new(gw, rule.port);
        // Another program listening where lhb's proxy should: it gets the containers'
        // connections (a local user can bind a gateway port above 1023 first).
        let squatter = listening
            .iter()
            .find(|l| l.covers(to) && l.dev.as_deref() != Some(bridge.as_str()));
        match (&k, proxy) {
            (Ok(kernel::Inspection { endpoint: true, attached: Some(how) }), _) => {
                served.push(gw);
                r.step(Level::Ok, format!("data path {to}: kernel (lhb_ingress on {bridge}, {how})"), None);
            }
            (Ok(kernel::Inspection { endpoint: true, attached: None }), _) => r.step(
                Level::Fail,
                format!("data path {to}: in lhb's endpoint map, but no lhb program on {bridge}"),
                Some("another program may have replaced the clsact qdisc; restart lhb (`systemctl restart lhb`)".into()),
            ),
            (_, Some(l)) => {
                served.push(gw);
                r.step(Level::Ok, format!("data path {to}: proxy, listening on {}", l.describe()), None);
            }
            (Err(e), None) => r.step(
                Level::Fail,
                format!("data path {to}: nothing serves it (cannot read BPF maps: {e:#})"),
                daemon_fix(daemons),
            ),
            (Ok(_), None) if let Some(s) = squatter => r.step(
                Level::Fail,
                format!(
                    "data path {to}: not served by lhb; {} holds this address, and containers connecting to it reach that program",
                    s.describe()
                ),
                Some(format!(
                    "stop that program or move it off {to}; a running lhb retries and serves the address once it is free"
                )),
            ),
            (Ok(_), None) if gw.is_ipv4() != rule.target.is_ipv4() => {
                cross.push(gw);
                r.step(
                    Level::Warn,
                    format!("data path {to}: not served: {}", check::CROSS_FAMILY),
                    None,
                );
            }
            (Ok(_), None) => r.step(
                Level::Fail,
                format!("data path {to}: nothing serves it: {}", daemon_state(daemons)),
                daemon_fix(daemons),
            ),
        }
    }

    // Gateways left out on purpose are not probed.
    let gateways: Vec<IpAddr> = gateways
        .into_iter()
        .filter(|g| !cross.contains(g))
        .collect();

    // 5. Firewall, and 6. the live probe (run first: the firewall's verdict uses it).
    let mut blockers = Vec::new();
    let mut fw = Firewall::detect(FirewallMode::Auto);
    let mut fw_err = None;
    for &gw in &gateways {
        let o = Opening {
            iface: bridge.clone(),
            gateway: gw,
            port: rule.port,
        };
        match fw.blockers(&o) {
            Ok(b) => {
                for c in b {
                    if !blockers.contains(&c) {
                        blockers.push(c);
                    }
                }
            }
            Err(e) => fw_err = Some(format!("{e:#}")),
        }
    }
    let own = observed
        .links
        .get(&bridge)
        .map(|l| l.prefixes.as_slice())
        .unwrap_or_default();
    let probe = ProbeNs::for_gateways(&bridge, own, &gateways)?;
    let outcomes: Vec<(SocketAddr, Outcome)> = gateways
        .iter()
        .map(|&gw| {
            let to = SocketAddr::new(gw, rule.port);
            (to, probe.connect(to, PROBE_TIMEOUT))
        })
        .collect();
    drop(probe);
    let dropped = outcomes.iter().any(|(_, o)| *o == Outcome::TimedOut);

    let example = gateways
        .first()
        .map(|gw| {
            let ipt = if gw.is_ipv6() {
                "ip6tables"
            } else {
                "iptables"
            };
            format!(
                "{ipt} -I INPUT -i {bridge} -d {gw} -p tcp --dport {} -j ACCEPT",
                rule.port
            )
        })
        .unwrap_or_default();
    match (&fw_err, blockers.is_empty()) {
        (Some(e), _) => r.step(Level::Warn, format!("firewall: cannot read it: {e}"), None),
        (None, true) => r.step(
            Level::Ok,
            format!("firewall: nothing on the input path drops tcp to port {} in on {bridge} (or lhb's accept is in place)", rule.port),
            None,
        ),
        (None, false) if dropped => r.step(
            Level::Fail,
            format!(
                "firewall: drops the traffic: {} may drop tcp to port {} in on {bridge}, and holds no accept of lhb's",
                blockers.join(", "),
                rule.port
            ),
            Some(if daemons.is_empty() {
                format!(
                    "let lhb manage it (`--firewall auto`, the default, or `firewall = \"auto\"` in the config; `none` turns it off), or add the accept yourself: `{example}`"
                )
            } else {
                format!(
                    "lhb runs (pid {}); with `--firewall auto` (the default) it restores its accept within 2 s of any ruleset change, so either it runs with `--firewall none`, or its firewall tool fails: `lhb status` shows the firewall it manages and its log (`journalctl -u lhb`) the error. Meanwhile, add the accept yourself: `{example}`",
                    daemons.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
                )
            }),
        ),
        (None, false) => r.step(
            Level::Warn,
            format!(
                "firewall: {} may drop tcp to port {} in on {bridge} and holds no accept of lhb's; the probe got through anyway",
                blockers.join(", "),
                rule.port
            ),
            None,
        ),
    }

    for (to, o) in outcomes {
        let (level, fix) = match &o {
            Outcome::Served => (Level::Ok, None),
            Outcome::Refused | Outcome::Reset if !target_up => (
                Level::Fail,
                Some("the target service is not listening (see above): start it".to_string()),
            ),
            Outcome::Refused | Outcome::Reset if !served.contains(&to.ip()) => {
                (Level::Fail, daemon_fix(daemons))
            }
            Outcome::TimedOut if !blockers.is_empty() => (
                Level::Fail,
                Some("the firewall drops it (see above)".to_string()),
            ),
            Outcome::TimedOut => (
                Level::Fail,
                Some(format!(
                    "something drops the packets: check `nft list ruleset`, br_netfilter (`sysctl net.bridge.bridge-nf-call-iptables`) and rp_filter on {bridge}"
                )),
            ),
            _ => (
                Level::Fail,
                Some("see lhb's log (`journalctl -u lhb`) and run `lhb verify`".to_string()),
            ),
        };
        r.step(
            level,
            format!("probe: a namespace on {bridge} -> {to}: {}", o.describe()),
            fix,
        );
    }
    Ok(())
}

/// Whether the target listens; a wildcard listener is a warning (exposed everywhere).
fn check_target(rule: &Rule, r: &mut Report) -> anyhow::Result<bool> {
    let all = check::listeners(rule.target.port())?;
    let covering: Vec<_> = all.iter().filter(|l| l.covers(rule.target)).collect();
    if covering.is_empty() {
        r.step(
            Level::Fail,
            format!(
                "target {}: nothing listens there (service down?)",
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
        r.step(
            Level::Warn,
            format!(
                "target {}: listening on a wildcard address ({}): exposed on every interface, not only to the bridge",
                rule.target,
                who.join(", ")
            ),
            Some(format!(
                "bind the service to {} (e.g. OLLAMA_HOST=127.0.0.1, listen_addresses='localhost'); `lhb verify` checks it",
                rule.target.ip()
            )),
        );
    } else {
        r.step(
            Level::Ok,
            format!("target {}: listening ({})", rule.target, who.join(", ")),
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

fn check_daemon(daemons: &[u32], r: &mut Report) {
    match daemons {
        [] => r.step(Level::Warn, "lhb: not running", daemon_fix(daemons)),
        _ => r.step(
            Level::Ok,
            daemon_state(daemons).replace(" but does not serve this rule", ""),
            None,
        ),
    }
}
