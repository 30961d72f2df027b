//! Doctor's bridge steps, pure over what was observed: the engine, the network, the
//! bridge and its gateway, and for an `allow` list the containers it admits and refuses.

use super::*;

/// Steps 1 and 2, from what was observed alone (no probe, no I/O): the Docker engine
/// and network, the bridge, its gateway addresses. The bridge, its ifindex and the
/// gateways to probe, or None if there is nothing to probe.
pub(super) fn bridge_steps(
    rule: &Rule,
    observed: &Observed,
    r: &mut Findings,
) -> Option<(String, u32, Vec<IpAddr>)> {
    docker_step(rule, observed, r);

    // 2. Bridge and gateway.
    let resolved = reconcile::bridge_of(rule, observed);
    let bridge_name = match &rule.source {
        Source::Interface(i) => Some(i.clone()),
        Source::Network(n) => observed.engines.as_ref().and_then(|d| match d.find(n) {
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
pub(super) const NAMED_AT_MOST: usize = 12;

/// Step 2b, for a scoped rule: whom its allow list admits and how firmly, each entry
/// that names nobody, and each container on the network it refuses with what to write
/// to admit it. Pure: from what was observed.
pub(super) fn scope_steps(rule: &Rule, res: &reconcile::Resolved<'_>, r: &mut Findings) {
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
pub(super) fn docker_step(rule: &Rule, observed: &Observed, r: &mut Findings) {
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
    let Some(view) = &observed.engines else {
        r.add(
            Level::Fail,
            format!("network {net}: lhb reads no engine (--no-docker)"),
            Some("drop --no-docker, or write the rule for the bridge (`BRIDGE:PORT`)".into()),
        );
        return;
    };
    let (only, name) = engine_of(net);
    if only != Some(Engine::Podman) {
        match view.docker_down() {
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
            Some(p) => match p.down() {
                None => r.add(
                    Level::Ok,
                    format!("Podman: reachable ({})", p.socket),
                    None,
                ),
                Some(why) => r.add(
                    Level::Fail,
                    format!("Podman: not reachable at {} ({why})", p.socket),
                    Some("start its API socket (`systemctl enable --now podman.socket`), or name the right one with `engine`; lhb waits for it".into()),
                ),
            },
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
pub(super) fn link_step(rule: &Rule, name: &str, link: Option<&reconcile::Link>, r: &mut Findings) {
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
