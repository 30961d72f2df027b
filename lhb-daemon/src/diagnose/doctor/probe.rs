//! Doctor's probe steps: the host's firewall read only (what would drop, and the fix),
//! and a live connection or datagram from a namespace on the bridge.

use super::*;

/// Steps 5 and 6: the firewall's verdict for each gateway and a live probe from a
/// namespace on the bridge (run first: the firewall's verdict uses it). `target`:
/// whether the service listens, and the gateways step 4 found served.
pub(super) fn probe_steps(
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
pub(super) fn outsider(rule: &Rule, probe: &[IpAddr]) -> impl Fn(IpAddr) -> bool + use<> {
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
pub(super) fn scoped_probe(
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
pub(super) fn firewall_blockers(
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
pub(super) fn firewall_finding(
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
pub(super) fn probe_fix(
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
