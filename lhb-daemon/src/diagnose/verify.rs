//! `lhb verify`: the "must succeed / must fail" security check, automated. For each
//! rule: a probe namespace on the rule's bridge must connect to every gateway; a probe
//! namespace outside every bridge, routed to the host, must not connect on the port to
//! any address the host has; and nothing may listen on the port (or the target's port)
//! on a wildcard address or on an address not tied to its bridge. A rule's UDP side is
//! probed with a datagram (a DNS query where the target is port 53, else an empty one)
//! and the same three checks. A scoped rule (`allow`) turns the bridge probe around: the
//! probe is a client the list does not admit and must be refused; an admitted client
//! (a named container, from inside its own namespace; for an interface rule, a probe at
//! a free address the list admits) must connect.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::{
    diagnose::check::{self, Datagram, Outcome, ProbeNs, Target},
    diagnose::findings::{Findings, Level},
    model::rule::Rule,
    reconcile::{self, Observed},
};

const BRIDGE_TIMEOUT: Duration = Duration::from_secs(2);
const OUTSIDE_TIMEOUT: Duration = Duration::from_secs(1);

/// True if every check passed.
pub async fn run(t: Target) -> anyhow::Result<bool> {
    let check::Checked {
        rules,
        observed,
        label_refused,
    } = check::rules(&t).await?;
    let (mut passed, mut failed) = (0, 0);
    for rule in &rules {
        // Printed rule by rule: the probes of the next one take seconds.
        let mut r = Findings::default();
        r.heading(rule.to_string());
        verify_rule(rule, &observed, &mut r)?;
        print!("{}", r.render(false));
        passed += r.count(Level::Pass);
        failed += r.count(Level::Fail);
    }
    if !label_refused.is_empty() {
        // Not served, so nothing to probe; said so that a missing rule is not a mystery.
        let mut r = Findings::default();
        r.heading("network labels");
        for f in &label_refused {
            r.add(Level::Note, f.to_string(), None);
        }
        print!("{}", r.render(false));
    }
    println!(
        "{passed} passed, {failed} failed{}",
        if failed > 0 {
            ": the rule is not served as it must be, or the service is reachable from elsewhere"
        } else {
            ""
        }
    );
    Ok(failed == 0)
}

fn verify_rule(rule: &Rule, observed: &Observed, r: &mut Findings) -> anyhow::Result<()> {
    let (bridge, gateways, network) = match reconcile::bridge_of(rule, observed) {
        Ok(reconcile::Resolved {
            bridge,
            link,
            gateways,
            network,
        }) => {
            if !link.uplinks.is_empty() {
                r.add(
                    Level::Note,
                    format!(
                        "bridge {bridge} has port(s) leading off this host ({}): with allow_uplinks the service is reachable from that network too; the outside probes below cannot see it",
                        link.uplinks.join(", ")
                    ),
                    None,
                );
            }
            (bridge.to_string(), gateways, network)
        }
        Err(why) => {
            r.check(
                false,
                format!("cannot check {rule}: {why} (`lhb doctor` says more)"),
            );
            // The exposure checks below need no bridge.
            check_outside(rule, observed, &[], r)?;
            check_listeners(rule, observed, r)?;
            return Ok(());
        }
    };

    let own = observed
        .links
        .get(&bridge)
        .map(|l| l.prefixes.as_slice())
        .unwrap_or_default();
    let probe = ProbeNs::for_gateways(&bridge, own, &gateways)?;
    let from = |gw: IpAddr| {
        probe
            .addrs
            .iter()
            .find(|a| a.is_ipv4() == gw.is_ipv4())
            .map(|a| a.to_string())
            .unwrap_or_else(|| "a probe".into())
    };
    let scope = crate::model::scope::AllowSet::of(rule);
    // A network rule's list names containers: a probe namespace is none of them.
    let admitted = |a: &str| {
        scope
            .as_ref()
            .is_none_or(|s| a.parse().is_ok_and(|ip| s.allows(ip)))
    };
    if rule.protocol.tcp() {
        for &gw in &gateways {
            let to = SocketAddr::new(gw, rule.port);
            let o = probe.connect(to, BRIDGE_TIMEOUT);
            if !admitted(&from(gw)) {
                // The proxy accepts before it can check, then resets.
                let held = matches!(o, Outcome::Refused | Outcome::Reset);
                r.check(
                    held,
                    format!(
                        "from the bridge, a client the allow list does not admit: {} on {bridge} -> {to}: {}{}",
                        from(gw),
                        o.describe(),
                        if held { ", as it must be" } else { "" }
                    ),
                );
                continue;
            }
            let line = format!(
                "from the bridge: {} on {bridge} -> {to}: {}",
                from(gw),
                o.describe()
            );
            if o != Outcome::Served && gw.is_ipv4() != rule.target.is_ipv4() {
                // `--mode kernel` leaves these out on purpose (the daemon logs it).
                r.add(
                    Level::Skip,
                    format!("{line}: {}", check::CROSS_FAMILY),
                    None,
                );
                continue;
            }
            r.check(o == Outcome::Served, line);
        }
    }
    if rule.protocol.udp() {
        let payload = check::udp_probe_payload(rule);
        for &gw in &gateways {
            let to = SocketAddr::new(gw, rule.port);
            let d = probe.ask_udp(to, &payload, BRIDGE_TIMEOUT);
            if !admitted(&from(gw)) {
                let held = d == Datagram::Refused;
                r.check(
                    held,
                    format!(
                        "from the bridge, a client the allow list does not admit: {} on {bridge} -> {to}/udp: {}{}",
                        from(gw),
                        d.describe(),
                        if held { ", as it must be" } else { "" }
                    ),
                );
                continue;
            }
            let line = format!(
                "from the bridge: {} on {bridge} -> {to}/udp: {}",
                from(gw),
                d.describe()
            );
            udp_served(d, &payload, line, r);
        }
    }
    if let Some(scope) = &scope {
        let probed: Vec<IpAddr> = probe.addrs.clone();
        drop(probe);
        match network {
            Some(net) => check_admitted_containers(rule, net, &gateways, r),
            None => check_admitted_address(rule, &bridge, own, scope, &probed, &gateways, r)?,
        }
    } else {
        drop(probe);
    }
    check_outside(rule, observed, &gateways, r)?;
    check_listeners(rule, observed, r)
}

/// A datagram's outcome from a client that must be served.
fn udp_served(d: Datagram, payload: &[u8], line: String, r: &mut Findings) {
    match d {
        Datagram::Answered => r.check(true, line),
        // A DNS service answers every query; a one-way one never does.
        Datagram::Silent if payload.is_empty() => r.check(
            true,
            format!("{line} (a one-way service answers nothing; a refusal would have come back)"),
        ),
        _ => r.check(false, line),
    }
}

/// Containers the allow list admits, at most this many, connect from their own
/// namespaces.
const ADMITTED_PROBES: usize = 3;

/// A network rule's admitted side: from inside each named container (its sandbox), as
/// the container itself, to every gateway of its address families.
fn check_admitted_containers(
    rule: &Rule,
    net: &crate::engines::Network,
    gateways: &[IpAddr],
    r: &mut Findings,
) {
    let named: Vec<_> = net
        .members
        .iter()
        .filter(|m| rule.allow.iter().any(|c| reconcile::names(c, m)))
        .collect();
    if named.is_empty() {
        r.add(
            Level::Skip,
            format!(
                "no container on the network is named by the allow list now ({}): the admitted side was not checked",
                rule.allow.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
            ),
            Some("start one of them, or see `lhb doctor` for the names on the network".into()),
        );
        return;
    }
    let payload = check::udp_probe_payload(rule);
    for m in named.iter().take(ADMITTED_PROBES) {
        let Some(sandbox) = &m.sandbox else {
            r.add(
                Level::Skip,
                format!(
                    "container {}: its namespace is not known; not probed",
                    m.name
                ),
                None,
            );
            continue;
        };
        for &gw in gateways
            .iter()
            .filter(|g| m.addrs.iter().any(|a| a.is_ipv4() == g.is_ipv4()))
        {
            let to = SocketAddr::new(gw, rule.port);
            if rule.protocol.tcp() {
                let o = check::connect_from(sandbox, to, BRIDGE_TIMEOUT);
                r.check(
                    o == Outcome::Served,
                    format!(
                        "from an admitted container: {} -> {to}: {}",
                        m.name,
                        o.describe()
                    ),
                );
            }
            if rule.protocol.udp() {
                let d = check::ask_from(sandbox, to, &payload, BRIDGE_TIMEOUT);
                let line = format!(
                    "from an admitted container: {} -> {to}/udp: {}",
                    m.name,
                    d.describe()
                );
                udp_served(d, &payload, line, r);
            }
        }
    }
    if named.len() > ADMITTED_PROBES {
        r.add(
            Level::Note,
            format!(
                "{} more admitted container(s) not probed",
                named.len() - ADMITTED_PROBES
            ),
            None,
        );
    }
}

/// An interface rule's admitted side: a probe at a free address the list admits, next
/// to each gateway family the first probe was refused on.
fn check_admitted_address(
    rule: &Rule,
    bridge: &str,
    own: &[(IpAddr, u8)],
    scope: &crate::model::scope::AllowSet,
    probed: &[IpAddr],
    gateways: &[IpAddr],
    r: &mut Findings,
) -> anyhow::Result<()> {
    let mut at = Vec::new();
    for &(a, plen) in own {
        let Some(&gw) = gateways.iter().find(|g| g.is_ipv4() == a.is_ipv4()) else {
            continue;
        };
        if probed
            .iter()
            .any(|p| p.is_ipv4() == a.is_ipv4() && scope.allows(*p))
            || at
                .iter()
                .any(|(x, _, _): &(IpAddr, u8, IpAddr)| x.is_ipv4() == a.is_ipv4())
        {
            // Already admitted and checked above, or this family has its probe.
            continue;
        }
        match ProbeNs::admitted_address(bridge, (a, plen), scope.nets()) {
            Some(addr) => at.push((addr, plen, gw)),
            None => r.add(
                Level::Skip,
                format!(
                    "no free address on {bridge} the allow list admits next to {a}/{plen} (the list names single addresses there, or prefixes whose free addresses are all taken, or none on the bridge's subnet): the admitted side was not checked"
                ),
                None,
            ),
        }
    }
    if at.is_empty() {
        return Ok(());
    }
    let probe = ProbeNs::at(bridge, &at)?;
    let payload = check::udp_probe_payload(rule);
    for &(addr, _, _) in &at {
        for &gw in gateways.iter().filter(|g| g.is_ipv4() == addr.is_ipv4()) {
            let to = SocketAddr::new(gw, rule.port);
            if rule.protocol.tcp() {
                let o = probe.connect(to, BRIDGE_TIMEOUT);
                r.check(
                    o == Outcome::Served,
                    format!(
                        "from the bridge, a client the allow list admits: {addr} on {bridge} -> {to}: {}",
                        o.describe()
                    ),
                );
            }
            if rule.protocol.udp() {
                let d = probe.ask_udp(to, &payload, BRIDGE_TIMEOUT);
                let line = format!(
                    "from the bridge, a client the allow list admits: {addr} on {bridge} -> {to}/udp: {}",
                    d.describe()
                );
                udp_served(d, &payload, line, r);
            }
        }
    }
    Ok(())
}

/// Outside the bridge, the port must not answer on any host address. The rule's
/// gateways get a line each; the rest of the host's addresses share one line unless
/// one of them answers.
fn check_outside(
    rule: &Rule,
    observed: &Observed,
    gateways: &[IpAddr],
    r: &mut Findings,
) -> anyhow::Result<()> {
    let mut addrs = check::host_addresses(observed);
    for g in gateways {
        if !addrs.contains(g) {
            addrs.push(*g);
        }
    }
    if addrs.is_empty() {
        return Ok(());
    }
    let outside = ProbeNs::outside(addrs.iter().any(IpAddr::is_ipv6))?;
    let targets: Vec<SocketAddr> = addrs
        .iter()
        .map(|a| SocketAddr::new(*a, rule.port))
        .collect();
    let mut outcomes: Vec<(&str, Vec<(bool, String)>)> = Vec::new();
    if rule.protocol.tcp() {
        let o = outside.connect_all(&targets, OUTSIDE_TIMEOUT);
        outcomes.push((
            "",
            o.iter()
                .map(|o| (*o == Outcome::Served || *o == Outcome::Reset, o.describe()))
                .collect(),
        ));
    }
    if rule.protocol.udp() {
        let payload = check::udp_probe_payload(rule);
        // The gateways first, then the rest: the host answers every probe with an ICMP
        // port unreachable to the one probe address, and the kernel allows a peer a
        // burst of six before it rate-limits them (icmp_ratelimit), so on a host with
        // many addresses a gateway asked in the same burst could go unanswered and read
        // as silent (found on a host with 11 addresses).
        let (first, rest): (Vec<SocketAddr>, Vec<SocketAddr>) =
            targets.iter().partition(|t| gateways.contains(&t.ip()));
        let mut answers: std::collections::HashMap<SocketAddr, Datagram> = first
            .iter()
            .copied()
            .zip(outside.ask_udp_all(&first, &payload, OUTSIDE_TIMEOUT))
            .collect();
        answers.extend(rest.iter().copied().zip(outside.ask_udp_all(
            &rest,
            &payload,
            OUTSIDE_TIMEOUT,
        )));
        let o: Vec<Datagram> = targets
            .iter()
            .map(|t| answers.remove(t).unwrap_or(Datagram::Silent))
            .collect();
        outcomes.push((
            "/udp",
            o.iter()
                .map(|d| (*d == Datagram::Answered, d.describe()))
                .collect(),
        ));
    }
    for (proto, results) in outcomes {
        let mut others = 0;
        for (to, (reachable, described)) in targets.iter().zip(&results) {
            if gateways.contains(&to.ip()) || *reachable {
                r.check(
                    !reachable,
                    format!(
                        "from outside the bridge -> {to}{proto}: {described}{}",
                        if *reachable {
                            ": reachable from other interfaces"
                        } else {
                            ""
                        }
                    ),
                );
            } else {
                others += 1;
            }
        }
        if others > 0 {
            r.check(
                true,
                format!(
                    "from outside the bridge -> port {}{proto} on the host's {others} other address(es): not reachable",
                    rule.port
                ),
            );
        }
    }
    Ok(())
}

/// Listening on the port (or the target's port) is fine on loopback, and on a bridge's
/// own address when bound to that bridge (the proxy). Anything else takes connections
/// from other interfaces too.
fn check_listeners(rule: &Rule, observed: &Observed, r: &mut Findings) -> anyhow::Result<()> {
    let mut ports = vec![rule.port];
    if rule.target.port() != rule.port {
        ports.push(rule.target.port());
    }
    let mut lists = Vec::new();
    for &port in &ports {
        if rule.protocol.tcp() {
            lists.push((port, "", check::listeners(port)?));
        }
        if rule.protocol.udp() {
            lists.push((port, "/udp", check::udp_sockets(port)?));
        }
    }
    for (port, proto, all) in lists {
        let mut fine = Vec::new();
        let mut bad = 0;
        for l in &all {
            let ip = l.addr.ip();
            let bound_to_its_bridge = l.dev.as_ref().is_some_and(|d| {
                observed
                    .links
                    .get(d)
                    .is_some_and(|link| link.is_bridge && link.addrs.contains(&ip))
            });
            if ip.is_loopback() || bound_to_its_bridge {
                fine.push(l.describe());
                continue;
            }
            bad += 1;
            let why = if l.is_wildcard() {
                "a wildcard address takes connections from every interface; bind the service to 127.0.0.1 (or ::1)"
            } else if check::is_bridge_address(observed, ip) {
                "a bridge address not bound to its bridge is reachable from other interfaces by routing"
            } else {
                "an address outside any bridge"
            };
            r.check(false, format!("listening on {}: {why}", l.describe()));
        }
        if bad == 0 {
            r.check(
                true,
                format!(
                    "port {port}{proto}: no listener on a wildcard or non-bridge address{}",
                    if fine.is_empty() {
                        String::new()
                    } else {
                        format!(" (listening: {})", fine.join(", "))
                    }
                ),
            );
        }
    }
    Ok(())
}
