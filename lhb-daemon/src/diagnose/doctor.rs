//! `lhb doctor`: walks the chain a container's connection takes, one step per line, and
//! says for each step that fails what is wrong and how to fix it: Docker engine,
//! network, bridge, gateway address, target service (TCP and UDP), data path, firewall,
//! and a live probe (a connection, a datagram) from a namespace on the bridge. It reads
//! the system itself, so it works with or without a running daemon (and says which).

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

/// Steps 3 to 6 for a rule's UDP side: the target's socket, the forwarder's socket on
/// each gateway (or what else holds it), the firewall, and a datagram from a namespace
/// on the bridge (a DNS query where the target is port 53: it must be answered; else an
/// empty datagram: it must not be refused).
fn udp_steps(
    rule: &Rule,
    observed: &Observed,
    bridge: &str,
    gateways: &[IpAddr],
    daemons: &[u32],
    r: &mut Findings,
) -> anyhow::Result<()> {
    let target_up = check_target(rule, Transport::Udp, r)?;
    let bound = check::udp_sockets(rule.port)?;
    let mut served = Vec::new();
    for &gw in gateways {
        let to = SocketAddr::new(gw, rule.port);
        let ours = bound
            .iter()
            .find(|l| l.addr.ip() == gw && l.dev.as_deref() == Some(bridge));
        let squatter = bound
            .iter()
            .find(|l| l.covers(to) && l.dev.as_deref() != Some(bridge));
        match (ours, squatter) {
            (Some(l), _) => {
                served.push(gw);
                r.add(
                    Level::Ok,
                    format!("data path {to}/udp: UDP forwarder, bound to {}", l.describe()),
                    None,
                );
            }
            (None, Some(s)) => r.add(
                Level::Fail,
                format!(
                    "data path {to}/udp: not served by lhb; {} holds this address, and containers' datagrams reach that program",
                    s.describe()
                ),
                Some(format!(
                    "stop that program or move it off {to}; a running lhb retries and serves the address once it is free"
                )),
            ),
            (None, None) => r.add(
                Level::Fail,
                format!("data path {to}/udp: nothing serves it: {}", daemon_state(daemons)),
                daemon_fix(daemons),
            ),
        }
    }
    let (blockers, fw_err, fix) = firewall_blockers(bridge, gateways, rule.port, Transport::Udp);
    let own = observed
        .links
        .get(bridge)
        .map(|l| l.prefixes.as_slice())
        .unwrap_or_default();
    let payload = check::udp_probe_payload(rule);
    let probe = ProbeNs::for_gateways(bridge, own, gateways)?;
    let outcomes: Vec<(SocketAddr, Datagram)> = gateways
        .iter()
        .map(|&gw| {
            let to = SocketAddr::new(gw, rule.port);
            (to, probe.ask_udp(to, &payload, PROBE_TIMEOUT))
        })
        .collect();
    let outsider = outsider(rule, &probe.addrs);
    drop(probe);
    let one_way = payload.is_empty();
    let dropped = outcomes.iter().any(|(_, d)| match d {
        Datagram::Silent => !one_way,
        Datagram::Other(_) => true,
        _ => false,
    });
    firewall_finding(
        (rule.port, Transport::Udp),
        bridge,
        gateways,
        (&blockers, fw_err, fix),
        dropped,
        daemons,
        r,
    );
    for (to, d) in outcomes {
        if outsider(to.ip()) && matches!(d, Datagram::Answered | Datagram::Refused) {
            let served = d == Datagram::Answered;
            scoped_probe(bridge, to, "/udp", &d.describe(), served, !served, r);
            continue;
        }
        let fix = match &d {
            Datagram::Answered => None,
            Datagram::Silent if one_way => None,
            Datagram::Refused if !target_up => {
                Some("the target service is not listening (see above): start it".to_string())
            }
            Datagram::Refused if !served.contains(&to.ip()) => daemon_fix(daemons),
            Datagram::Silent | Datagram::Other(_) if !blockers.is_empty() => {
                Some("the firewall drops it (see above)".to_string())
            }
            Datagram::Silent => Some(format!(
                "no answer to a DNS query: check that the resolver on {} answers (`dig @{} -p {} .`), then `nft list ruleset` and rp_filter on {bridge}",
                rule.target,
                rule.target.ip(),
                rule.target.port()
            )),
            _ => Some("see lhb's log (`journalctl -u lhb`) and run `lhb verify`".to_string()),
        };
        let mut line = format!(
            "probe: a namespace on {bridge} -> {to}/udp: {}",
            d.describe()
        );
        if d == Datagram::Silent && one_way {
            line += " (a one-way service answers nothing)";
        }
        let level = if fix.is_none() {
            Level::Ok
        } else {
            Level::Fail
        };
        r.add(level, line, fix);
    }
    Ok(())
}

/// Step 4: for each gateway, which data path serves it (the kernel's map and program,
/// or a proxy listener on the bridge), or what else holds it. The gateways served, and
/// those left out on purpose (the other address family than the target's).
fn data_path_steps(
    rule: &Rule,
    bridge: &str,
    ifindex: u32,
    gateways: &[IpAddr],
    daemons: &[u32],
    r: &mut Findings,
) -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let mut served = Vec::new();
    let mut cross = Vec::new();
    let listening = check::listeners(rule.port)?;
    for &gw in gateways {
        let key = reconcile::Endpoint {
            ifindex,
            gateway: gw,
            port: rule.port,
        };
        let k = kernel::inspect(bridge, &key);
        let proxy = listening
            .iter()
            .find(|l| l.addr.ip() == gw && l.dev.as_deref() == Some(bridge));
        let to = SocketAddr::new(gw, rule.port);
        // Another program listening where lhb's proxy should: it gets the containers'
        // connections (a local user can bind a gateway port above 1023 first).
        let squatter = listening
            .iter()
            .find(|l| l.covers(to) && l.dev.as_deref() != Some(bridge));
        match (&k, proxy) {
            (Ok(kernel::Inspection { endpoint: true, attached: Some(how), variant }), _) => {
                served.push(gw);
                let variant = variant.map_or(String::new(), |v| {
                    format!("; {} variant: {}", v.as_str(), v.why(false))
                });
                r.add(
                    Level::Ok,
                    format!("data path {to}: kernel (lhb_ingress on {bridge}, {how}{variant})"),
                    None,
                );
            }
            (Ok(kernel::Inspection { endpoint: true, attached: None, .. }), _) => r.add(
                Level::Fail,
                format!("data path {to}: in lhb's endpoint map, but no lhb program on {bridge}"),
                Some("another program may have replaced the clsact qdisc; restart lhb (`systemctl restart lhb`)".into()),
            ),
            (_, Some(l)) => {
                served.push(gw);
                r.add(Level::Ok, format!("data path {to}: proxy, listening on {}", l.describe()), None);
            }
            (Err(e), None) => r.add(
                Level::Fail,
                format!("data path {to}: nothing serves it (cannot read BPF maps: {e:#})"),
                daemon_fix(daemons),
            ),
            (Ok(_), None) if let Some(s) = squatter => r.add(
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
                r.add(
                    Level::Warn,
                    format!("data path {to}: not served: {}", check::CROSS_FAMILY),
                    None,
                );
            }
            (Ok(_), None) => r.add(
                Level::Fail,
                format!("data path {to}: nothing serves it: {}", daemon_state(daemons)),
                daemon_fix(daemons),
            ),
        }
    }

    Ok((served, cross))
}

/// Steps 5 and 6: the firewall's verdict for each gateway and a live probe from a
/// namespace on the bridge (run first: the firewall's verdict uses it). `target`:
/// whether the service listens, and the gateways step 4 found served.
fn probe_steps(
    rule: &Rule,
    observed: &Observed,
    bridge: &str,
    gateways: &[IpAddr],
    target: (bool, &[IpAddr]),
    daemons: &[u32],
    r: &mut Findings,
) -> anyhow::Result<()> {
    let (blockers, fw_err, fix) = firewall_blockers(bridge, gateways, rule.port, Transport::Tcp);
    let own = observed
        .links
        .get(bridge)
        .map(|l| l.prefixes.as_slice())
        .unwrap_or_default();
    let probe = ProbeNs::for_gateways(bridge, own, gateways)?;
    let outcomes: Vec<(SocketAddr, Outcome)> = gateways
        .iter()
        .map(|&gw| {
            let to = SocketAddr::new(gw, rule.port);
            (to, probe.connect(to, PROBE_TIMEOUT))
        })
        .collect();
    let outsider = outsider(rule, &probe.addrs);
    drop(probe);
    // Dropped (no answer), or rejected with an ICMP error (firewalld's
    // admin-prohibited arrives as "no route to host").
    let dropped = outcomes
        .iter()
        .any(|(_, o)| matches!(o, Outcome::TimedOut | Outcome::Other(_)));

    firewall_finding(
        (rule.port, Transport::Tcp),
        bridge,
        gateways,
        (&blockers, fw_err, fix),
        dropped,
        daemons,
        r,
    );
    for (to, o) in outcomes {
        if outsider(to.ip()) {
            scoped_probe(
                bridge,
                to,
                "",
                &o.describe(),
                o == Outcome::Served,
                matches!(o, Outcome::Refused | Outcome::Reset),
                r,
            );
            if o != Outcome::TimedOut && !matches!(o, Outcome::Other(_)) {
                continue;
            }
        }
        let fix = probe_fix(&o, to, target, !blockers.is_empty(), bridge, daemons);
        let level = if fix.is_none() {
            Level::Ok
        } else {
            Level::Fail
        };
        r.add(
            level,
            format!("probe: a namespace on {bridge} -> {to}: {}", o.describe()),
            fix,
        );
    }
    Ok(())
}

/// For a scoped rule: whether the probe that went to a gateway of this family is a
/// client the allow list does not admit (always, for a list of containers: a probe
/// namespace is none of them), so its refusal is the rule working.
fn outsider(rule: &Rule, probe: &[IpAddr]) -> impl Fn(IpAddr) -> bool + use<> {
    let scope = crate::model::scope::AllowSet::of(rule);
    let probe = probe.to_vec();
    move |gw: IpAddr| {
        scope.as_ref().is_some_and(|s| {
            probe
                .iter()
                .find(|a| a.is_ipv4() == gw.is_ipv4())
                .is_some_and(|a| !s.allows(*a))
        })
    }
}

/// The live probe's line for a scoped rule whose probe the list does not admit.
fn scoped_probe(
    bridge: &str,
    to: SocketAddr,
    proto: &str,
    described: &str,
    served: bool,
    refused: bool,
    r: &mut Findings,
) {
    let what = format!(
        "probe: a namespace on {bridge}, not on the allow list -> {to}{proto}: {described}"
    );
    if refused {
        r.add(
            Level::Ok,
            format!(
                "{what}, as the allow list wants (`lhb verify` also connects as a client it admits)"
            ),
            None,
        );
    } else if served {
        r.add(
            Level::Fail,
            what,
            Some("a client the allow list does not admit was served: is the running rule the one checked here (`lhb status` shows its allow list)?".into()),
        );
    }
}

/// The chains that may drop `transport` to `port` on each gateway of `bridge` and hold
/// no accept of lhb's, and the error if the firewall could not be read.
fn firewall_blockers(
    bridge: &str,
    gateways: &[IpAddr],
    port: u16,
    transport: Transport,
) -> (Vec<String>, Option<String>, Option<String>) {
    let mut blockers = Vec::new();
    let mut fw = Firewall::detect(FirewallMode::Auto);
    let mut fw_err = None;
    let mut fix = None;
    for &gw in gateways {
        let o = Opening {
            iface: bridge.to_string(),
            gateway: gw,
            port,
            transport,
        };
        if fix.is_none() {
            fix = fw.fix(&o);
        }
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
    (blockers, fw_err, fix)
}

/// Step 5: the firewall's verdict, sharpened by whether the probe was dropped.
fn firewall_finding(
    (port, transport): (u16, Transport),
    bridge: &str,
    gateways: &[IpAddr],
    (blockers, fw_err, fix): (&[String], Option<String>, Option<String>),
    dropped: bool,
    daemons: &[u32],
    r: &mut Findings,
) {
    let example = fix
        .or_else(|| {
            gateways.first().map(|gw| {
                let ipt = if gw.is_ipv6() {
                    "ip6tables"
                } else {
                    "iptables"
                };
                format!(
                    "{ipt} -I INPUT -i {bridge} -d {gw} -p {} --dport {port} -j ACCEPT",
                    transport.as_str()
                )
            })
        })
        .unwrap_or_default();
    match (&fw_err, blockers.is_empty()) {
        (Some(e), _) => r.add(Level::Warn, format!("firewall: cannot read it: {e}"), None),
        (None, true) => r.add(
            Level::Ok,
            format!("firewall: nothing on the input path drops {} to port {port} in on {bridge} (or lhb's accept is in place)", transport.as_str()),
            None,
        ),
        (None, false) if dropped => r.add(
            Level::Fail,
            format!(
                "firewall: drops the traffic: {} may drop {} to port {port} in on {bridge}, and holds no accept of lhb's",
                blockers.join(", "),
                transport.as_str()
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
        (None, false) => r.add(
            Level::Warn,
            format!(
                "firewall: {} may drop {} to port {port} in on {bridge} and holds no accept of lhb's; the probe got through anyway",
                blockers.join(", "),
                transport.as_str()
            ),
            None,
        ),
    }
}

/// What to do about one probe's outcome; `None` when it was served.
fn probe_fix(
    o: &Outcome,
    to: SocketAddr,
    (target_up, served): (bool, &[IpAddr]),
    firewall_blocks: bool,
    bridge: &str,
    daemons: &[u32],
) -> Option<String> {
    match o {
        Outcome::Served => None,
        Outcome::Refused | Outcome::Reset if !target_up => {
            Some("the target service is not listening (see above): start it".to_string())
        }
        Outcome::Refused | Outcome::Reset if !served.contains(&to.ip()) => daemon_fix(daemons),
        Outcome::TimedOut if firewall_blocks => {
            Some("the firewall drops it (see above)".to_string())
        }
        Outcome::Other(_) if firewall_blocks => {
            Some("the firewall rejects it (see above)".to_string())
        }
        Outcome::TimedOut => Some(format!(
            "something drops the packets: check `nft list ruleset`, br_netfilter (`sysctl net.bridge.bridge-nf-call-iptables`) and rp_filter on {bridge}"
        )),
        _ => Some("see lhb's log (`journalctl -u lhb`) and run `lhb verify`".to_string()),
    }
}

/// Steps 1 and 2, from what was observed alone (no probe, no I/O): the Docker engine
/// and network, the bridge, its gateway addresses. The bridge, its ifindex and the
/// gateways to probe, or None if there is nothing to probe.
fn bridge_steps(
    rule: &Rule,
    observed: &Observed,
    r: &mut Findings,
) -> Option<(String, u32, Vec<IpAddr>)> {
    docker_step(rule, observed, r);

    // 2. Bridge and gateway.
    let resolved = reconcile::bridge_of(rule, observed);
    let bridge_name = match &rule.source {
        Source::Interface(i) => Some(i.clone()),
        Source::Network(n) => observed.docker.as_ref().and_then(|d| match d.find(n) {
            crate::engines::Lookup::Found(_, n) => Some(n.bridge.clone()),
            _ => None,
        }),
    };
    if let Some(name) = &bridge_name {
        link_step(rule, name, observed.links.get(name), r);
    }
    match resolved {
        Ok(res) => {
            let list: Vec<String> = res.gateways.iter().map(IpAddr::to_string).collect();
            r.add(Level::Ok, format!("gateway: {}", list.join(", ")), None);
            scope_steps(rule, &res, r);
            Some((res.bridge.to_string(), res.link.ifindex, res.gateways))
        }
        Err(why) => {
            // An uplink was reported above, with its fix.
            if !matches!(why, reconcile::BridgeProblem::Uplinks { .. }) {
                r.add(Level::Fail, format!("gateway: {why}"), None);
            }
            None
        }
    }
}

/// Containers named in one finding at most; the rest are counted.
const NAMED_AT_MOST: usize = 12;

/// Step 2b, for a scoped rule: whom its allow list admits and how firmly, each entry
/// that names nobody, and each container on the network it refuses with what to write
/// to admit it. Pure: from what was observed.
fn scope_steps(rule: &Rule, res: &reconcile::Resolved<'_>, r: &mut Findings) {
    if rule.allow.is_empty() {
        return;
    }
    let list = rule
        .allow
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let Some(net) = res.network else {
        r.add(
            Level::Note,
            format!(
                "allow: only {list}, by address: anything on {} that sends with one of these addresses gets in (no engine names this bridge's ports, so lhb cannot tie an address to a port)",
                res.bridge
            ),
            None,
        );
        return;
    };
    let veth = |m: &crate::engines::Member| {
        m.netns
            .and_then(|id| res.link.ports.iter().find(|p| p.netns == id))
    };
    for c in &rule.allow {
        let named: Vec<_> = net
            .members
            .iter()
            .filter(|m| reconcile::names(c, m))
            .collect();
        if named.is_empty() {
            let on: Vec<&str> = net.members.iter().map(|m| m.name.as_str()).collect();
            r.add(
                Level::Warn,
                format!("allow entry `{c}` names no container on the network now"),
                Some(if on.is_empty() {
                    "no container is on the network: it is admitted when one it names starts".into()
                } else {
                    format!(
                        "the containers on it are {}: write a name, a compose service (PROJECT/SERVICE) or label:KEY=VALUE one of them has (or start the one it names)",
                        on.join(", ")
                    )
                }),
            );
        }
    }
    let (admitted, refused): (Vec<_>, Vec<_>) = net
        .members
        .iter()
        .partition(|m| rule.allow.iter().any(|c| reconcile::names(c, m)));
    for m in &admitted {
        let addrs: Vec<String> = m.addrs.iter().map(IpAddr::to_string).collect();
        match veth(m) {
            Some(p) => r.add(
                Level::Ok,
                format!(
                    "allow: admits container {} ({}), only through its own port on {} (ifindex {})",
                    m.name,
                    addrs.join(", "),
                    res.bridge,
                    p.ifindex
                ),
                None,
            ),
            None => r.add(
                Level::Warn,
                format!(
                    "allow: names container {} ({}), but its port on {} is not found: it is admitted nowhere",
                    m.name,
                    addrs.join(", "),
                    res.bridge
                ),
                Some("lhb ties a container to its veth through its namespace; if it stays so after the container restarted, see lhb's log".into()),
            ),
        }
    }
    for m in refused.iter().take(NAMED_AT_MOST) {
        let addrs: Vec<String> = m.addrs.iter().map(IpAddr::to_string).collect();
        let by = match (&m.project, &m.service) {
            (Some(p), Some(s)) => format!("\"{}\" or \"{p}/{s}\"", m.name),
            _ => format!("\"{}\"", m.name),
        };
        r.add(
            Level::Note,
            format!(
                "allow: refuses container {} ({}): the list ({list}) names neither it, nor its compose service, nor a label it has",
                m.name,
                addrs.join(", ")
            ),
            Some(format!("to admit it, add {by} to the rule's allow list, then `lhb reload`")),
        );
    }
    if refused.len() > NAMED_AT_MOST {
        r.add(
            Level::Note,
            format!(
                "allow: refuses {} more container(s) on the network",
                refused.len() - NAMED_AT_MOST
            ),
            None,
        );
    }
}

/// Step 1: the engines and the network (network rules only).
fn docker_step(rule: &Rule, observed: &Observed, r: &mut Findings) {
    use crate::engines::{Engine, Lookup, engine_of};
    let net = match &rule.source {
        Source::Network(net) => net,
        Source::Interface(_) => {
            r.add(
                Level::Ok,
                "Docker engine: not needed (interface rule)",
                None,
            );
            return;
        }
    };
    let view = observed.docker.clone().unwrap_or_default();
    let (only, name) = engine_of(net);
    if only != Some(Engine::Podman) {
        match check::docker_problem(&view) {
            Some(p) => {
                r.add(
                    Level::Fail,
                    format!("Docker engine: not reachable ({p})"),
                    Some("start it (`systemctl start docker`), or point DOCKER_HOST at it; lhb waits for it and serves the network once it answers".into()),
                );
            }
            None => r.add(Level::Ok, "Docker engine: reachable", None),
        }
    }
    if only != Some(Engine::Docker) {
        match &view.podman {
            Some(p) if p.available => r.add(
                Level::Ok,
                format!("Podman: reachable ({})", p.socket),
                None,
            ),
            Some(p) => r.add(
                Level::Fail,
                format!(
                    "Podman: not reachable at {} ({})",
                    p.socket,
                    p.problem.as_deref().unwrap_or("no answer")
                ),
                Some("start its API socket (`systemctl enable --now podman.socket`), or name the right one with `engine`; lhb waits for it".into()),
            ),
            None if only == Some(Engine::Podman) => r.add(
                Level::Fail,
                "Podman: lhb reads no Podman socket".to_string(),
                Some(format!(
                    "start Podman's API socket ({}) or name it with `engine = [\"unix:///PATH\"]` / --engine",
                    crate::engines::podman::DEFAULT_SOCKET
                )),
            ),
            None => {}
        }
    }
    match view.find(net) {
        Lookup::Found(engine, n) if n.driver == "bridge" => r.add(
            Level::Ok,
            format!("{engine} network {name}: exists, bridge {}", n.bridge),
            None,
        ),
        Lookup::Found(engine, n) => r.add(
            Level::Fail,
            format!(
                "{engine} network {name}: uses the {} driver, not bridge",
                n.driver
            ),
            Some("lhb serves bridge networks; attach the containers to a bridge network".into()),
        ),
        Lookup::Ambiguous { docker, podman } => r.add(
            Level::Fail,
            format!(
                "network {name}: exists on Docker (bridge {}) and on Podman (bridge {})",
                docker.bridge, podman.bridge
            ),
            Some(format!(
                "say which in the rule: docker:{name} or podman:{name}"
            )),
        ),
        Lookup::Missing { unreachable: None } => {
            let engine = only.unwrap_or(Engine::Docker);
            let create = match engine {
                Engine::Docker => {
                    format!("`docker network create {name}`, or start its compose project")
                }
                Engine::Podman => format!("`podman network create {name}`"),
            };
            r.add(
                Level::Fail,
                format!("{engine} network {name}: does not exist"),
                Some(format!(
                    "create it ({create}) or correct the rule; a running lhb serves it within a second of its creation"
                )),
            );
        }
        Lookup::Missing {
            unreachable: Some(_),
        } => {}
    }
}

/// Step 2, the bridge itself: there, a bridge, up, free of uplinks, addressed.
fn link_step(rule: &Rule, name: &str, link: Option<&reconcile::Link>, r: &mut Findings) {
    match link {
        None => r.add(
            Level::Fail,
            format!("bridge {name}: no such interface"),
            Some(match &rule.source {
                Source::Interface(_) => "create the bridge, or correct the rule (bridges here: `ip -br link show type bridge`)".to_string(),
                Source::Network(n) => format!("Docker has not created it yet: it appears when a container joins {n}, or re-create the network"),
            }),
        ),
        Some(l) if !l.is_bridge => r.add(
            Level::Fail,
            format!("bridge {name}: is not a bridge"),
            Some("lhb serves containers on Linux bridges; name the bridge they are plugged into".into()),
        ),
        Some(l) => {
            r.add(Level::Ok, format!("bridge {name}: up (ifindex {})", l.ifindex), None);
            if !l.uplinks.is_empty() {
                let ports = l.uplinks.join(", ");
                if rule.allow_uplinks {
                    r.add(
                        Level::Warn,
                        format!("bridge {name}: port(s) leading off this host: {ports}; allow_uplinks = true, so the service is served to every machine on that network too"),
                        None,
                    );
                } else {
                    r.add(
                        Level::Fail,
                        format!("bridge {name}: port(s) leading off this host: {ports}; lhb does not serve here, since every machine on that network could connect"),
                        Some(format!("take the port(s) off the bridge, or, if serving that network is intended, set `allow_uplinks = true` on the rule (--allow-uplinks {})", rule.source.name())),
                    );
                }
            }
            if l.addrs.is_empty() {
                r.add(
                    Level::Fail,
                    format!("gateway: bridge {name} has no IP address"),
                    Some(format!("give it one (`ip addr add ADDR/LEN dev {name}`); containers use it as their gateway")),
                );
            }
        }
    }
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
        engines::{EngineView, Network},
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
            docker: Some(EngineView {
                available: true,
                ..Default::default()
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
        o.docker.as_mut().unwrap().networks.insert(
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
