//! Doctor's data path steps: what serves each gateway (the kernel's maps and attachments,
//! the listeners and UDP sockets, or another program holding the address).

use super::*;

/// Steps 3 to 6 for a rule's UDP side: the target's socket, the forwarder's socket on
/// each gateway (or what else holds it), the firewall, and a datagram from a namespace
/// on the bridge (a DNS query where the target is port 53: it must be answered; else an
/// empty datagram: it must not be refused).
pub(super) fn udp_steps(
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
pub(super) fn data_path_steps(
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
