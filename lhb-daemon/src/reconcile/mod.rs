//! The reconciler: desired rules x observed links -> the state the data path must have.
//!
//! Pure logic, no I/O: given what netlink reports right now, [`plan`] says which bridges
//! carry the program and which (bridge, gateway, port) endpoints steer where, and why a
//! rule is not served. The daemon applies the difference between two plans, so a bridge
//! that is deleted and re-created with a new ifindex or address is simply a new plan.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use crate::{
    engines::{EngineView, Member, Network},
    model::rule::{Client, Rule, RuleKey, Source, Transport},
    model::scope::AllowSet,
};

pub use crate::model::config::Mode;

pub mod labels;

/// What the data paths can do on this host right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paths {
    pub mode: Mode,
    /// The kernel programs are loaded.
    pub kernel: bool,
}

pub use crate::host::netlink::{Link, Port};

/// A gateway socket: where a proxy listener or a UDP forwarder socket sits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayKey {
    pub bridge: String,
    /// A re-created bridge (new ifindex) needs a new socket bound to it.
    pub ifindex: u32,
    pub gateway: IpAddr,
    pub port: u16,
}

/// Where its connections go, and which rule's counters they count on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    pub target: std::net::SocketAddr,
    pub slot: u32,
    /// Start each connection with a PROXY protocol v2 header.
    pub proxy_protocol: bool,
}

/// Where a forwarder socket's datagrams go, and which rule's counters they count on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpTarget {
    pub target: std::net::SocketAddr,
    pub slot: u32,
}

/// Every interface of the host, by name, and what the engines say (`None`: --no-docker).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub links: BTreeMap<String, Link>,
    pub engines: Option<EngineView>,
}

/// Where one rule stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleState {
    /// Served on `bridge` at each of `gateways` (kernel path) and `proxied`.
    Serving {
        bridge: String,
        ifindex: u32,
        gateways: Vec<IpAddr>,
        /// Gateways the proxy serves, with why the kernel path does not.
        proxied: Vec<(IpAddr, &'static str)>,
        /// Gateways the UDP forwarder serves (a rule's UDP side is always forwarded:
        /// see `datapath/udp`).
        forwarded: Vec<IpAddr>,
        /// Gateways that cannot be served, with the reason.
        skipped: Vec<(IpAddr, &'static str)>,
    },
    /// Not served, with the reason in words a user can act on.
    Waiting(String),
}

/// A gateway port on a bridge that the kernel path serves. The kernel driver turns it
/// into the endpoints map's key (`lhb_common::EndpointKey::new`), nothing before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ifindex: u32,
    pub gateway: IpAddr,
    pub port: u16,
}

/// Where an endpoint's connections go, and which rule's counters they count on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Steering {
    pub target: std::net::SocketAddr,
    pub slot: u32,
    /// The rule has an `allow` list: only clients in the plan's `scopes[slot]` are
    /// handed over.
    pub scoped: bool,
}

/// What the data path must look like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Bridges that carry the program: ifindex -> name.
    pub attach: BTreeMap<u32, String>,
    pub endpoints: BTreeMap<Endpoint, Steering>,
    /// Proxy listeners.
    pub proxies: BTreeMap<GatewayKey, ProxyTarget>,
    /// UDP forwarder sockets.
    pub udp: BTreeMap<GatewayKey, UdpTarget>,
    /// Where each rule stands.
    pub states: BTreeMap<RuleKey, RuleState>,
    /// The clients each scoped rule admits, by counter slot (every path checks these).
    pub scopes: BTreeMap<u32, AllowSet>,
    /// The guard's bindings: (bridge port, address) for each address of each admitted
    /// container, the only port a frame from that address may enter its bridge by
    /// (`guard.rs`).
    pub bindings: BTreeSet<(u32, IpAddr)>,
    /// Slots whose scope names containers: admitted only while the guard is in place.
    pub guarded: BTreeSet<u32>,
}

/// Why a rule with `proxy_protocol = true` is proxied even where the kernel path could
/// serve it: only the proxy can write the header.
const PROXY_PROTOCOL: &str = "proxy_protocol = true (only the proxy can send the header)";

/// Each rule with its counter slot, in order: where two rules claim the same bridge and
/// port, the earlier one is served.
pub fn plan<'a>(
    rules: impl IntoIterator<Item = (&'a Rule, u32)>,
    observed: &Observed,
    paths: Paths,
) -> Plan {
    let mut plan = Plan::default();
    // Which rule serves each (bridge, port, transport): a network rule and an interface
    // rule can name the same bridge, and the second must not silently take the first's
    // place.
    let mut claimed: BTreeMap<(u32, u16, Transport), &Rule> = BTreeMap::new();
    for (rule, slot) in rules {
        let resolved = bridge_of(rule, observed);
        if let Some(mut set) = AllowSet::of(rule) {
            if rule.allow.iter().any(|c| !matches!(c, Client::Net(_))) {
                plan.guarded.insert(slot);
                if let Ok(r) = &resolved {
                    for (port, ip) in clients(rule, r) {
                        set.add(IpNet::from(ip));
                        plan.bindings.insert((port, ip));
                    }
                }
            }
            plan.scopes.insert(slot, set);
        }
        let transports: Vec<Transport> = rule.protocol.transports().collect();
        let state = match resolved {
            Err(why) => RuleState::Waiting(why.to_string()),
            Ok(Resolved {
                bridge: name, link, ..
            }) if transports
                .iter()
                .any(|&u| claimed.contains_key(&(link.ifindex, rule.port, u))) =>
            {
                let first = transports
                    .iter()
                    .find_map(|&u| claimed.get(&(link.ifindex, rule.port, u)))
                    .expect("checked above");
                RuleState::Waiting(format!(
                    "bridge {name} port {} is already served by rule {first} (given as {}); this rule (given as {}) is not served: remove one of the two",
                    rule.port,
                    given(first),
                    given(rule)
                ))
            }
            Ok(Resolved {
                bridge: name,
                link,
                gateways,
                ..
            }) => {
                for &u in &transports {
                    claimed.insert((link.ifindex, rule.port, u), rule);
                }
                let mut served = Vec::new();
                let mut proxied = Vec::new();
                let mut forwarded = Vec::new();
                let mut skipped = Vec::new();
                for gw in gateways {
                    let key = GatewayKey {
                        bridge: name.to_string(),
                        ifindex: link.ifindex,
                        gateway: gw,
                        port: rule.port,
                    };
                    if rule.protocol.udp() {
                        // The forwarder is in user space: any gateway reaches any
                        // loopback target, of either family.
                        plan.udp.insert(
                            key.clone(),
                            UdpTarget {
                                target: rule.target,
                                slot,
                            },
                        );
                        forwarded.push(gw);
                    }
                    if !rule.protocol.tcp() {
                        continue;
                    }
                    let kernel = match (paths.mode, paths.kernel) {
                        _ if rule.proxy_protocol => Err(PROXY_PROTOCOL),
                        (Mode::Proxy, _) => Err("--mode proxy"),
                        (_, false) => Err("the kernel path is not loaded"),
                        _ => endpoint(link.ifindex, gw, rule, slot),
                    };
                    match kernel {
                        Ok((k, v)) => {
                            plan.endpoints.insert(k, v);
                            served.push(gw);
                        }
                        Err(why) if paths.mode != Mode::Kernel || why == PROXY_PROTOCOL => {
                            plan.proxies.insert(
                                key,
                                ProxyTarget {
                                    target: rule.target,
                                    slot,
                                    proxy_protocol: rule.proxy_protocol,
                                },
                            );
                            proxied.push((gw, why));
                        }
                        Err(why) => skipped.push((gw, why)),
                    }
                }
                if served.is_empty() && proxied.is_empty() && forwarded.is_empty() {
                    RuleState::Waiting(format!(
                        "no gateway of bridge {name} can reach target {}: {}",
                        rule.target,
                        skipped.first().map(|s| s.1).unwrap_or("")
                    ))
                } else {
                    if !served.is_empty() {
                        plan.attach.insert(link.ifindex, name.to_string());
                    }
                    RuleState::Serving {
                        bridge: name.to_string(),
                        ifindex: link.ifindex,
                        gateways: served,
                        proxied,
                        forwarded,
                        skipped,
                    }
                }
            }
        };
        plan.states.insert(rule.key(), state);
    }
    plan
}

fn given(r: &Rule) -> &str {
    if r.given.is_empty() { "?" } else { &r.given }
}

/// docker0's IPv4 gateway: from IPAM when Docker reports it (older engines leave an
/// automatic gateway out), else the address on the default bridge itself.
fn host_gateway(engines: &EngineView, observed: &Observed) -> Option<IpAddr> {
    let n = engines.default_bridge()?;
    n.gateways
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .or_else(|| {
            observed
                .links
                .get(&n.bridge)?
                .addrs
                .iter()
                .copied()
                .find(IpAddr::is_ipv4)
        })
}

/// Why a rule has no bridge to serve on. One triage for the reconciler (a waiting
/// rule's reason: [`fmt::Display`]), the start-up's preflight (fatal or not), `lhb
/// verify` and `lhb doctor` (each with its own wording and fix).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BridgeProblem {
    /// A network rule, but lhb runs with --no-docker.
    NoDocker {
        network: String,
    },
    EngineUnreachable {
        engine: crate::engines::Engine,
        problem: String,
    },
    NoSuchNetwork {
        network: String,
    },
    /// The name is a Docker network and a Podman network, and the rule did not say
    /// which (`docker:NAME` / `podman:NAME`).
    Ambiguous {
        network: String,
        docker_bridge: String,
        podman_bridge: String,
    },
    NotBridgeDriver {
        network: String,
        driver: String,
    },
    NoSuchInterface {
        name: String,
    },
    NotABridge {
        name: String,
    },
    NoAddress {
        name: String,
    },
    /// Ports that lead off the host ("NAME (KIND)"), and the rule does not allow them.
    Uplinks {
        bridge: String,
        uplinks: Vec<String>,
    },
    /// None of a Docker network's IPAM gateways is on its bridge (yet).
    NoGatewayOnBridge {
        bridge: String,
    },
}

impl std::fmt::Display for BridgeProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BridgeProblem::NoDocker { network } => write!(
                f,
                "{network} is a Docker network rule, but lhb runs with --no-docker"
            ),
            BridgeProblem::EngineUnreachable { engine, problem } => {
                write!(
                    f,
                    "{engine} engine not reachable ({problem}); waiting for it"
                )
            }
            BridgeProblem::NoSuchNetwork { network } => {
                let (engine, name) = crate::engines::engine_of(network);
                let engine = engine.map_or("Docker".to_string(), |e| e.to_string());
                write!(f, "{engine} network {name} does not exist (yet)")
            }
            BridgeProblem::Ambiguous {
                network,
                docker_bridge,
                podman_bridge,
            } => write!(
                f,
                "network {network} exists on Docker (bridge {docker_bridge}) and on Podman (bridge {podman_bridge}); write docker:{network} or podman:{network}"
            ),
            BridgeProblem::NotBridgeDriver { network, driver } => write!(
                f,
                "Docker network {network} uses the {driver} driver; lhb serves bridge networks"
            ),
            BridgeProblem::NoSuchInterface { name } => write!(
                f,
                "interface {name} does not exist (yet); served once it appears (bridges here: `ip -br link show type bridge`)"
            ),
            BridgeProblem::NotABridge { name } => write!(f, "interface {name} is not a bridge"),
            BridgeProblem::NoAddress { name } => {
                write!(f, "bridge {name} has no IP address to serve on")
            }
            BridgeProblem::Uplinks { bridge, uplinks } => write!(
                f,
                "bridge {bridge} has port(s) leading off this host: {}; serving on it would expose the service to every machine on that network (set `allow_uplinks = true` on the rule, or --allow-uplinks {bridge}, if that is intended)",
                uplinks.join(", ")
            ),
            BridgeProblem::NoGatewayOnBridge { bridge } => write!(
                f,
                "none of the network's IPAM gateways is on bridge {bridge} yet"
            ),
        }
    }
}

/// A rule's bridge: its name, its link and the gateway addresses to serve.
#[derive(Clone, Debug)]
pub struct Resolved<'a> {
    pub bridge: &'a str,
    pub link: &'a Link,
    pub gateways: Vec<IpAddr>,
    /// The engine's network, for a network rule.
    pub network: Option<&'a Network>,
}

/// The containers a scoped network rule's `allow` list names, as (bridge port,
/// address) for each address the engine gave each of them on the rule's network. A
/// container is admitted only through the port its own namespace's veth is on: the
/// NSID its sandbox has here equals the one the host-side veth reports for its peer.
/// One whose port cannot be found (its namespace unreadable, the veth not seen yet) is
/// admitted nowhere.
pub fn clients(rule: &Rule, r: &Resolved<'_>) -> Vec<(u32, IpAddr)> {
    let Some(net) = r.network else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in &net.members {
        if !rule.allow.iter().any(|c| names(c, m)) {
            continue;
        }
        let Some(port) = m
            .netns
            .and_then(|id| r.link.ports.iter().find(|p| p.netns == id))
        else {
            continue;
        };
        for &ip in &m.addrs {
            out.push((port.ifindex, ip));
        }
    }
    out
}

/// Whether allow entry `c` names container `m`.
pub fn names(c: &Client, m: &Member) -> bool {
    match c {
        Client::Net(_) => false,
        Client::Container(name) => m.name == *name,
        Client::Service { project, service } => {
            m.project.as_deref() == Some(project) && m.service.as_deref() == Some(service)
        }
        Client::Label { key, value } => m.labels.get(key) == Some(value),
    }
}

/// The rule's bridge, or why there is none to serve on.
pub fn bridge_of<'a>(
    rule: &'a Rule,
    observed: &'a Observed,
) -> Result<Resolved<'a>, BridgeProblem> {
    type Named<'n> = (
        &'n str,
        Option<&'n [IpAddr]>,
        Option<IpAddr>,
        Option<&'n Network>,
    );
    let (name, wanted, host_gateway, network): Named<'a> = match &rule.source {
        Source::Interface(name) => (name, None, None, None),
        Source::Network(net) => {
            let Some(engines) = &observed.engines else {
                return Err(BridgeProblem::NoDocker {
                    network: net.clone(),
                });
            };
            let (engine, n) = match engines.find(net) {
                crate::engines::Lookup::Found(e, n) => (e, n),
                crate::engines::Lookup::Missing {
                    unreachable: Some((engine, problem)),
                } => return Err(BridgeProblem::EngineUnreachable { engine, problem }),
                crate::engines::Lookup::Missing { unreachable: None } => {
                    return Err(BridgeProblem::NoSuchNetwork {
                        network: net.clone(),
                    });
                }
                crate::engines::Lookup::Ambiguous { docker, podman } => {
                    return Err(BridgeProblem::Ambiguous {
                        network: net.clone(),
                        docker_bridge: docker.bridge.clone(),
                        podman_bridge: podman.bridge.clone(),
                    });
                }
            };
            if n.driver != "bridge" {
                return Err(BridgeProblem::NotBridgeDriver {
                    network: net.clone(),
                    driver: n.driver.clone(),
                });
            }
            // docker0's address (`host-gateway`) serves Docker's networks only.
            let host = match engine {
                crate::engines::Engine::Docker => host_gateway(engines, observed),
                crate::engines::Engine::Podman => None,
            };
            (
                n.bridge.as_str(),
                Some(n.gateways.as_slice()),
                host,
                Some(n),
            )
        }
    };
    let (name, link) =
        observed
            .links
            .get_key_value(name)
            .ok_or_else(|| BridgeProblem::NoSuchInterface {
                name: name.to_string(),
            })?;
    if !link.is_bridge {
        return Err(BridgeProblem::NotABridge { name: name.clone() });
    }
    if link.addrs.is_empty() {
        return Err(BridgeProblem::NoAddress { name: name.clone() });
    }
    if !link.uplinks.is_empty() && !rule.allow_uplinks {
        return Err(BridgeProblem::Uplinks {
            bridge: name.clone(),
            uplinks: link.uplinks.clone(),
        });
    }
    // A Docker network's gateways are the IPAM ones actually on its bridge; a plain
    // bridge serves on every address it has.
    let mut gateways: Vec<IpAddr> = match wanted {
        Some(ipam) if !ipam.is_empty() => ipam
            .iter()
            .copied()
            .filter(|g| link.addrs.contains(g))
            .collect(),
        _ => link.addrs.clone(),
    };
    if gateways.is_empty() {
        return Err(BridgeProblem::NoGatewayOnBridge {
            bridge: name.clone(),
        });
    }
    // Containers on any network reach host.docker.internal (host-gateway) at docker0's
    // address through their own bridge; the endpoint is still keyed to that bridge.
    if let Some(hg) = host_gateway
        && !gateways.contains(&hg)
    {
        gateways.push(hg);
    }
    Ok(Resolved {
        bridge: name,
        link,
        gateways,
        network,
    })
}

fn endpoint(
    ifindex: u32,
    gw: IpAddr,
    rule: &Rule,
    slot: u32,
) -> Result<(Endpoint, Steering), &'static str> {
    if gw.is_ipv4() != rule.target.is_ipv4() {
        // The socket lookup hands a connection only to a socket of its own family (a
        // socket bound to ::1 is IPv6-only, whatever IPV6_V6ONLY says).
        return Err(if gw.is_ipv6() {
            "an IPv6 connection cannot be handed to an IPv4 listener in-kernel (target [::1] instead)"
        } else {
            "an IPv4 connection cannot be handed to an IPv6-only listener in-kernel (target 127.0.0.1, or give the bridge an IPv6 address)"
        });
    }
    Ok((
        Endpoint {
            ifindex,
            gateway: gw,
            port: rule.port,
        },
        Steering {
            target: rule.target,
            slot,
            scoped: !rule.allow.is_empty(),
        },
    ))
}

/// The changes that turn `old` into `new`, in an order that never leaves an endpoint
/// on a bridge without the program: removals first, then attachments, then endpoints.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub remove_endpoints: Vec<Endpoint>,
    pub detach: Vec<(u32, String)>,
    pub attach: Vec<(u32, String)>,
    pub upsert_endpoints: Vec<(Endpoint, Steering)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

pub fn diff(old: &Plan, new: &Plan) -> Diff {
    let old_eps: BTreeSet<_> = old.endpoints.keys().collect();
    Diff {
        remove_endpoints: old
            .endpoints
            .keys()
            .filter(|k| !new.endpoints.contains_key(k))
            .copied()
            .collect(),
        detach: old
            .attach
            .iter()
            .filter(|(i, n)| new.attach.get(i) != Some(n))
            .map(|(i, n)| (*i, n.clone()))
            .collect(),
        attach: new
            .attach
            .iter()
            .filter(|(i, n)| old.attach.get(i) != Some(n))
            .map(|(i, n)| (*i, n.clone()))
            .collect(),
        upsert_endpoints: new
            .endpoints
            .iter()
            .filter(|(k, v)| !old_eps.contains(k) || old.endpoints.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    /// The tests give rules and slots side by side.
    fn plan(rules: &[Rule], slots: &[u32], observed: &Observed, paths: Paths) -> Plan {
        super::plan(rules.iter().zip(slots.iter().copied()), observed, paths)
    }

    use super::*;
    use crate::{
        engines::{EngineState, Network},
        model::rule::parse_iface_spec,
    };

    const KERNEL: Paths = Paths {
        mode: Mode::Kernel,
        kernel: true,
    };

    fn link(ifindex: u32, addrs: &[&str]) -> Link {
        Link {
            ifindex,
            is_bridge: true,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            prefixes: Vec::new(),
            uplinks: Vec::new(),
            ports: Vec::new(),
        }
    }

    fn observed(links: &[(&str, Link)]) -> Observed {
        Observed {
            links: links
                .iter()
                .map(|(n, l)| (n.to_string(), l.clone()))
                .collect(),
            engines: Some(EngineView {
                docker: Some(EngineState {
                    available: true,
                    ..Default::default()
                }),
                podman: None,
            }),
        }
    }

    /// Docker's state in `o`, there from now on.
    fn docker(o: &mut Observed) -> &mut EngineState {
        o.engines
            .get_or_insert_with(Default::default)
            .docker
            .get_or_insert_with(Default::default)
    }

    fn with_networks(mut o: Observed, nets: &[(&str, &str, &[&str])]) -> Observed {
        let d = docker(&mut o);
        for (name, bridge, gws) in nets {
            d.networks.insert(
                name.to_string(),
                Network {
                    driver: "bridge".into(),
                    bridge: bridge.to_string(),
                    gateways: gws.iter().map(|g| g.parse().unwrap()).collect(),
                    labels: Default::default(),
                    members: Vec::new(),
                },
            );
        }
        o
    }

    fn net_rules(specs: &[&str]) -> (Vec<Rule>, Vec<u32>) {
        let r: Vec<_> = specs
            .iter()
            .map(|s| crate::model::rule::parse_network_spec(s).unwrap())
            .collect();
        let slots = (0..r.len() as u32).collect();
        (r, slots)
    }

    /// The state of `r[i]`.
    fn nth<'a>(p: &'a Plan, r: &[Rule], i: usize) -> &'a RuleState {
        &p.states[&r[i].key()]
    }

    fn waiting(p: &Plan, r: &[Rule], i: usize) -> String {
        match nth(p, r, i) {
            RuleState::Waiting(w) => w.clone(),
            other => panic!("rule {i}: {other:?}"),
        }
    }

    /// A rule's UDP side is always the forwarder's, in every mode; its TCP side takes
    /// the usual path; a TCP rule and a UDP rule on the same bridge and port are two
    /// services, but two UDP rules there are one too many.
    #[test]
    fn udp_is_forwarded_and_claims_its_own_port() {
        let specs = ["br0:53/both=127.0.0.53:53", "br0:8125/udp", "br0:9/udp"];
        let rules: Vec<Rule> = specs.iter().map(|s| parse_iface_spec(s).unwrap()).collect();
        let o = observed(&[("br0", link(7, &["10.1.0.1"]))]);
        for paths in [
            KERNEL,
            Paths {
                mode: Mode::Proxy,
                kernel: false,
            },
        ] {
            let p = plan(&rules, &[0, 1, 2], &o, paths);
            assert_eq!(p.udp.len(), 3, "{paths:?}");
            let k = p.udp.keys().find(|k| k.port == 53).unwrap();
            assert_eq!(p.udp[k].target, "127.0.0.53:53".parse().unwrap());
            // The TCP side of 53 only.
            assert_eq!(p.endpoints.len() + p.proxies.len(), 1, "{paths:?}");
            match nth(&p, &rules, 0) {
                RuleState::Serving { forwarded, .. } => assert_eq!(forwarded.len(), 1),
                other => panic!("{other:?}"),
            }
        }
        // A UDP-only rule attaches no program.
        let p = plan(&rules[1..], &[1, 2], &o, KERNEL);
        assert!(p.attach.is_empty() && p.endpoints.is_empty());
        // The same bridge and port: TCP from one rule and UDP from another both serve;
        // a second UDP rule waits.
        let net = {
            let mut o = o.clone();
            o.engines = Some(Default::default());
            with_networks(
                o,
                &[
                    ("app", "br0", &["10.1.0.1"]),
                    ("alias", "br0", &["10.1.0.1"]),
                ],
            )
        };
        let both = [
            crate::model::rule::parse_network_spec("app:53").unwrap(),
            parse_iface_spec("br0:53/udp").unwrap(),
            crate::model::rule::parse_network_spec("alias:53/udp").unwrap(),
        ];
        let p = plan(&both[..], &[0, 1, 2], &net, KERNEL);
        assert!(matches!(nth(&p, &both, 0), RuleState::Serving { .. }));
        assert!(matches!(nth(&p, &both, 1), RuleState::Serving { .. }));
        assert!(waiting(&p, &both, 2).contains("already served by rule"));
    }

    /// Table-driven: each case is a sequence of observations, and after each one the
    /// plan must hold exactly the expected endpoints (bridge ifindex, gateway, port).
    #[test]
    fn docker_networks_through_their_lifecycle() {
        type Step<'a> = (&'a str, Observed, Vec<(u32, &'a str, u16)>);
        let (rules, slots) = net_rules(&["app:80", "app:443", "other:80"]);
        let app = |ifx: u32, gw: &str| {
            with_networks(
                observed(&[("br-aaaaaaaaaaaa", link(ifx, &[gw]))]),
                &[("app", "br-aaaaaaaaaaaa", &[gw])],
            )
        };
        let cases: Vec<(&str, Vec<Step>)> = vec![
            (
                "network appears late",
                vec![
                    ("before", observed(&[]), vec![]),
                    (
                        "created",
                        app(10, "172.20.0.1"),
                        vec![(10, "172.20.0.1", 80), (10, "172.20.0.1", 443)],
                    ),
                ],
            ),
            (
                "network disappears, then is re-created with another subnet",
                vec![
                    (
                        "up",
                        app(10, "172.20.0.1"),
                        vec![(10, "172.20.0.1", 80), (10, "172.20.0.1", 443)],
                    ),
                    ("removed", observed(&[]), vec![]),
                    (
                        "re-created",
                        app(11, "172.21.0.1"),
                        vec![(11, "172.21.0.1", 80), (11, "172.21.0.1", 443)],
                    ),
                ],
            ),
            (
                "two networks with a rule for the same port",
                vec![(
                    "both up",
                    with_networks(
                        observed(&[
                            ("br-aaaaaaaaaaaa", link(10, &["172.20.0.1"])),
                            ("br-bbbbbbbbbbbb", link(12, &["172.22.0.1"])),
                        ]),
                        &[
                            ("app", "br-aaaaaaaaaaaa", &["172.20.0.1"]),
                            ("other", "br-bbbbbbbbbbbb", &["172.22.0.1"]),
                        ],
                    ),
                    vec![
                        (10, "172.20.0.1", 80),
                        (10, "172.20.0.1", 443),
                        (12, "172.22.0.1", 80),
                    ],
                )],
            ),
            (
                "Docker restarted: engine away, bridge still there, then back",
                vec![
                    (
                        "up",
                        app(10, "172.20.0.1"),
                        vec![(10, "172.20.0.1", 80), (10, "172.20.0.1", 443)],
                    ),
                    (
                        "engine down, last known networks kept",
                        {
                            let mut o = app(10, "172.20.0.1");
                            let d = docker(&mut o);
                            d.available = false;
                            d.problem = Some("connection refused".into());
                            o
                        },
                        vec![(10, "172.20.0.1", 80), (10, "172.20.0.1", 443)],
                    ),
                    (
                        "back",
                        app(10, "172.20.0.1"),
                        vec![(10, "172.20.0.1", 80), (10, "172.20.0.1", 443)],
                    ),
                ],
            ),
        ];
        for (case, steps) in cases {
            let mut prev = Plan::default();
            for (step, obs, want) in steps {
                let p = plan(&rules, &slots, &obs, KERNEL);
                let mut got: Vec<(u32, String, u16)> = p
                    .endpoints
                    .keys()
                    .map(|k| {
                        let ip = k.gateway;
                        (k.ifindex, ip.to_string(), k.port)
                    })
                    .collect();
                got.sort();
                let mut want: Vec<(u32, String, u16)> = want
                    .into_iter()
                    .map(|(i, g, p)| (i, g.to_string(), p))
                    .collect();
                want.sort();
                assert_eq!(got, want, "{case} / {step}");
                // Applying the diff from the previous plan leaves exactly the new plan:
                // never an entry for a gone gateway.
                let d = diff(&prev, &p);
                let mut applied: BTreeSet<Endpoint> = prev.endpoints.keys().copied().collect();
                for k in &d.remove_endpoints {
                    applied.remove(k);
                }
                applied.extend(d.upsert_endpoints.iter().map(|(k, _)| *k));
                assert_eq!(
                    applied,
                    p.endpoints.keys().copied().collect(),
                    "{case} / {step}"
                );
                prev = p;
            }
        }
    }

    #[test]
    fn host_docker_internal_is_served_on_each_networks_own_bridge() {
        let (r, s) = net_rules(&["app:80", "bridge:80"]);
        let o = with_networks(
            observed(&[
                ("br-x", link(3, &["172.30.0.1"])),
                ("docker0", link(2, &["172.17.0.1"])),
            ]),
            // Engines like 20.10 report no IPAM gateway when Docker chose it.
            &[("app", "br-x", &[]), ("bridge", "docker0", &[])],
        );
        let p = plan(&r, &s, &o, KERNEL);
        let mut eps: Vec<(u32, IpAddr)> =
            p.endpoints.keys().map(|k| (k.ifindex, k.gateway)).collect();
        eps.sort();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            eps,
            vec![
                (2, ip("172.17.0.1")),
                (3, ip("172.17.0.1")),
                (3, ip("172.30.0.1"))
            ]
        );
    }

    #[test]
    fn a_rule_scoped_to_containers_admits_the_named_ones_through_their_own_port() {
        let (r, s) = net_rules(&["app:80@n8n,label:role=db", "app:81"]);
        let mut bridge = link(3, &["10.9.0.1"]);
        bridge.ports = vec![
            Port {
                ifindex: 50,
                netns: 7,
            },
            Port {
                ifindex: 51,
                netns: 8,
            },
        ];
        let mut o = with_networks(
            observed(&[("br-x", bridge)]),
            &[("app", "br-x", &["10.9.0.1"])],
        );
        let member = |name: &str, netns: Option<i32>, ip: &str, label: Option<&str>| Member {
            name: name.into(),
            labels: label
                .map(|v| [("role".to_string(), v.to_string())].into())
                .unwrap_or_default(),
            addrs: vec![ip.parse().unwrap()],
            netns,
            ..Default::default()
        };
        docker(&mut o).networks.get_mut("app").unwrap().members = vec![
            member("n8n", Some(7), "10.9.0.5", None),
            // Named by its label, on port 51.
            member("pg", Some(8), "10.9.0.6", Some("db")),
            // Named, but no port of this bridge leads into its namespace.
            member("ghost", Some(9), "10.9.0.7", Some("db")),
            // Not named.
            member("other", Some(8), "10.9.0.8", Some("web")),
        ];
        let p = plan(&r, &s, &o, KERNEL);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            p.scopes[&0].nets(),
            &[
                "10.9.0.5/32".parse::<IpNet>().unwrap(),
                "10.9.0.6/32".parse().unwrap()
            ]
        );
        assert_eq!(
            p.bindings,
            [(50, ip("10.9.0.5")), (51, ip("10.9.0.6"))].into()
        );
        assert_eq!(p.guarded, [0].into());
        assert!(!p.scopes.contains_key(&1), "a rule without allow is open");
        assert!(p.endpoints.values().any(|st| st.slot == 0 && st.scoped));
    }

    #[test]
    fn network_rules_say_why_they_wait() {
        let (r, s) = net_rules(&["app:80"]);
        let mut o = observed(&[]);
        o.engines = None;
        assert!(waiting(&plan(&r, &s, &o, KERNEL), &r, 0).contains("--no-docker"));
        let o = observed(&[]);
        assert!(waiting(&plan(&r, &s, &o, KERNEL), &r, 0).contains("does not exist"));
        let mut o = observed(&[]);
        *docker(&mut o) = EngineState {
            available: false,
            problem: Some("no socket".into()),
            ..Default::default()
        };
        assert!(waiting(&plan(&r, &s, &o, KERNEL), &r, 0).contains("not reachable (no socket)"));
        let mut o = with_networks(observed(&[]), &[("app", "br-x", &["10.9.0.1"])]);
        docker(&mut o).networks.get_mut("app").unwrap().driver = "macvlan".into();
        assert!(waiting(&plan(&r, &s, &o, KERNEL), &r, 0).contains("macvlan"));
        // IPAM gateway not (yet) on the bridge.
        let o = with_networks(
            observed(&[("br-x", link(3, &["10.9.0.254"]))]),
            &[("app", "br-x", &["10.9.0.1"])],
        );
        assert!(waiting(&plan(&r, &s, &o, KERNEL), &r, 0).contains("IPAM gateways"));
    }

    #[test]
    fn one_network_with_ipv4_and_ipv6_gateways() {
        let (r, s) = net_rules(&["app:80", "app:81=[::1]:81"]);
        let o = with_networks(
            observed(&[("br-x", link(3, &["172.30.0.1", "fd00:30::1"]))]),
            &[("app", "br-x", &["172.30.0.1", "fd00:30::1"])],
        );
        let p = plan(&r, &s, &o, KERNEL);
        let fams: Vec<(u16, bool)> = p
            .endpoints
            .keys()
            .map(|k| (k.port, k.gateway.is_ipv4()))
            .collect();
        assert_eq!(fams, vec![(80, true), (81, false)]);
    }

    #[test]
    fn a_rule_removed_while_serving_takes_only_its_endpoints() {
        let (r, s) = net_rules(&["app:80", "app:81"]);
        let o = with_networks(
            observed(&[("br-x", link(3, &["172.30.0.1"]))]),
            &[("app", "br-x", &["172.30.0.1"])],
        );
        let both = plan(&r, &s, &o, KERNEL);
        let one = plan(&r[..1], &s[..1], &o, KERNEL);
        let d = diff(&both, &one);
        assert_eq!(d.remove_endpoints.len(), 1);
        assert_eq!(d.remove_endpoints[0].port, 81);
        assert!(d.detach.is_empty(), "the bridge still serves port 80");
    }

    fn rules(specs: &[&str]) -> (Vec<Rule>, Vec<u32>) {
        let r: Vec<_> = specs.iter().map(|s| parse_iface_spec(s).unwrap()).collect();
        let slots = (0..r.len() as u32).collect();
        (r, slots)
    }

    #[test]
    fn missing_non_bridge_and_addressless_links_wait_with_a_reason() {
        let (r, s) = rules(&["br0:80", "eth9:80", "br2:80"]);
        let mut eth = link(3, &["10.0.0.1"]);
        eth.is_bridge = false;
        let p = plan(
            &r,
            &s,
            &observed(&[("eth9", eth), ("br2", link(4, &[]))]),
            KERNEL,
        );
        assert!(p.attach.is_empty() && p.endpoints.is_empty());
        let reasons: Vec<_> = (0..r.len()).map(|i| waiting(&p, &r, i)).collect();
        assert!(reasons[0].contains("does not exist"));
        assert!(reasons[1].contains("not a bridge"));
        assert!(reasons[2].contains("no IP address"));
    }

    #[test]
    fn a_bridge_appearing_late_is_attached_and_re_creation_moves_everything() {
        let (r, s) = rules(&["br0:80=8080"]);
        let empty = plan(&r, &s, &Observed::default(), KERNEL);
        let first = plan(
            &r,
            &s,
            &observed(&[("br0", link(7, &["10.1.0.1"]))]),
            KERNEL,
        );
        let d = diff(&empty, &first);
        assert_eq!(d.attach, vec![(7, "br0".to_string())]);
        assert_eq!(d.upsert_endpoints.len(), 1);
        let (k, v) = d.upsert_endpoints[0];
        assert_eq!(
            (k.ifindex, k.port, k.gateway),
            (7, 80, "10.1.0.1".parse().unwrap())
        );
        assert_eq!(v.target, "127.0.0.1:8080".parse().unwrap());

        // Re-created: new ifindex, new subnet. Nothing of the old bridge may remain.
        let second = plan(
            &r,
            &s,
            &observed(&[("br0", link(9, &["10.2.0.1"]))]),
            KERNEL,
        );
        let d = diff(&first, &second);
        assert_eq!(d.remove_endpoints, vec![k]);
        assert_eq!(d.detach, vec![(7, "br0".to_string())]);
        assert_eq!(d.attach, vec![(9, "br0".to_string())]);
        assert_eq!(d.upsert_endpoints.len(), 1);
        assert_eq!(d.upsert_endpoints[0].0.ifindex, 9);

        // Gone: everything goes.
        let d = diff(&second, &empty);
        assert_eq!(d.remove_endpoints.len(), 1);
        assert_eq!(d.detach.len(), 1);
        assert!(d.attach.is_empty() && d.upsert_endpoints.is_empty());
    }

    #[test]
    fn each_gateway_serves_targets_of_its_own_family() {
        let (r, s) = rules(&["br0:80", "br0:81=[::1]:81", "br1:82=[::1]:82"]);
        let o = observed(&[
            ("br0", link(5, &["10.3.0.1", "fd00:3::1"])),
            ("br1", link(6, &["10.4.0.1"])),
        ]);
        let p = plan(&r, &s, &o, KERNEL);
        let served = |i: usize| match nth(&p, &r, i) {
            RuleState::Serving {
                gateways, skipped, ..
            } => (gateways.clone(), skipped.len()),
            other => panic!("{other:?}"),
        };
        // IPv4 target: the IPv4 gateway, the IPv6 one skipped with a reason.
        assert_eq!(served(0), (vec!["10.3.0.1".parse().unwrap()], 1));
        // [::1] target: the IPv6 gateway, the IPv4 one skipped.
        assert_eq!(served(1), (vec!["fd00:3::1".parse().unwrap()], 1));
        // [::1] target on an IPv4-only bridge: not served, and the reason says why.
        match nth(&p, &r, 2) {
            RuleState::Waiting(why) => assert!(why.contains("IPv6-only"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(p.attach.len(), 1);
    }

    #[test]
    fn auto_mode_proxies_what_the_kernel_path_cannot_serve() {
        let (r, s) = rules(&["br0:80", "br1:82=[::1]:82"]);
        let o = observed(&[
            ("br0", link(5, &["10.3.0.1", "fd00:3::1"])),
            ("br1", link(6, &["10.4.0.1"])),
        ]);
        let proxied = |p: &Plan| -> Vec<(String, String, u16)> {
            p.proxies
                .keys()
                .map(|k| (k.bridge.clone(), k.gateway.to_string(), k.port))
                .collect()
        };
        let auto = Paths {
            mode: Mode::Auto,
            kernel: true,
        };
        let p = plan(&r, &s, &o, auto);
        // IPv4 -> 127.0.0.1 in-kernel; the other family through the proxy.
        assert_eq!(p.endpoints.len(), 1);
        assert_eq!(p.attach.keys().copied().collect::<Vec<_>>(), vec![5]);
        assert_eq!(
            proxied(&p),
            vec![
                ("br0".into(), "fd00:3::1".into(), 80),
                ("br1".into(), "10.4.0.1".into(), 82)
            ]
        );
        assert!(
            p.states
                .values()
                .all(|s| matches!(s, RuleState::Serving { .. }))
        );
        // Without the kernel path, or with --mode proxy: every gateway proxied, no BPF.
        for paths in [
            Paths {
                mode: Mode::Auto,
                kernel: false,
            },
            Paths {
                mode: Mode::Proxy,
                kernel: false,
            },
        ] {
            let p = plan(&r, &s, &o, paths);
            assert!(p.endpoints.is_empty() && p.attach.is_empty());
            assert_eq!(proxied(&p).len(), 3);
        }
        // A proxy listener follows its bridge: a re-created bridge is a new key.
        let o2 = observed(&[
            ("br0", link(5, &["10.3.0.1", "fd00:3::1"])),
            ("br1", link(9, &["10.4.0.1"])),
        ]);
        let p2 = plan(&r, &s, &o2, auto);
        assert_ne!(p.proxies, p2.proxies);
    }

    #[test]
    fn a_network_rule_and_an_interface_rule_on_one_bridge_and_port_collide() {
        let mut n = crate::model::rule::parse_network_spec("app:80").unwrap();
        n.given = "--expose app:80".into();
        let mut i = parse_iface_spec("br-app:80=81").unwrap();
        i.given = "/etc/lhb/lhb.toml:7".into();
        let other = parse_iface_spec("br-app:81").unwrap();
        let o = with_networks(
            observed(&[("br-app", link(5, &["10.4.0.1"]))]),
            &[("app", "br-app", &["10.4.0.1"])],
        );
        let rs = [n, i, other];
        let p = plan(&rs, &[0, 1, 2], &o, KERNEL);
        assert!(matches!(nth(&p, &rs, 0), RuleState::Serving { .. }));
        let why = waiting(&p, &rs, 1);
        assert!(
            why.contains("already served by rule app:80")
                && why.contains("--expose app:80")
                && why.contains("/etc/lhb/lhb.toml:7"),
            "{why}"
        );
        assert!(matches!(nth(&p, &rs, 2), RuleState::Serving { .. }));
        // The first rule's target, untouched by the second.
        let port80 = Endpoint {
            ifindex: 5,
            gateway: "10.4.0.1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(p.endpoints[&port80].target.port(), 80);
        assert_eq!(p.endpoints.len(), 2);
    }

    #[test]
    fn a_bridge_with_an_uplink_waits_unless_the_rule_allows_it() {
        let (mut r, s) = rules(&["br0:80", "br0:81"]);
        r[1].allow_uplinks = true;
        let mut br0 = link(5, &["10.3.0.1"]);
        br0.uplinks = vec!["vx0 (vxlan)".into()];
        let p = plan(&r, &s, &observed(&[("br0", br0.clone())]), KERNEL);
        let why = waiting(&p, &r, 0);
        assert!(
            why.contains("vx0 (vxlan)") && why.contains("allow_uplinks"),
            "{why}"
        );
        assert!(matches!(nth(&p, &r, 1), RuleState::Serving { .. }));
        // The uplink goes: served again.
        br0.uplinks.clear();
        let p = plan(&r, &s, &observed(&[("br0", br0)]), KERNEL);
        assert!(
            p.states
                .values()
                .all(|s| matches!(s, RuleState::Serving { .. }))
        );
    }

    #[test]
    fn proxy_protocol_rules_are_proxied_even_in_kernel_mode() {
        let (mut r, s) = rules(&["br0:80"]);
        r[0].proxy_protocol = true;
        let o = observed(&[("br0", link(5, &["10.3.0.1", "fd00:3::1"]))]);
        let p = plan(&r, &s, &o, KERNEL);
        assert!(p.endpoints.is_empty() && p.attach.is_empty());
        assert_eq!(p.proxies.len(), 2);
        assert!(p.proxies.values().all(|t| t.proxy_protocol));
    }

    #[test]
    fn two_bridges_with_the_same_port_are_independent() {
        let (r, s) = rules(&["br0:80", "br1:80=81"]);
        let o = observed(&[
            ("br0", link(5, &["10.4.0.1"])),
            ("br1", link(6, &["10.5.0.1"])),
        ]);
        let p = plan(&r, &s, &o, KERNEL);
        assert_eq!(p.attach.len(), 2);
        let by_if: BTreeMap<u32, (u16, u32)> = p
            .endpoints
            .iter()
            .map(|(k, v)| (k.ifindex, (v.target.port(), v.slot)))
            .collect();
        assert_eq!(by_if[&5], (80, 0));
        assert_eq!(by_if[&6], (81, 1));
    }

    #[test]
    fn an_address_change_updates_only_the_endpoints() {
        let (r, s) = rules(&["br0:80"]);
        let a = plan(
            &r,
            &s,
            &observed(&[("br0", link(5, &["10.6.0.1"]))]),
            KERNEL,
        );
        let b = plan(
            &r,
            &s,
            &observed(&[("br0", link(5, &["10.6.0.254"]))]),
            KERNEL,
        );
        let d = diff(&a, &b);
        assert!(d.attach.is_empty() && d.detach.is_empty());
        assert_eq!((d.remove_endpoints.len(), d.upsert_endpoints.len()), (1, 1));
        assert!(diff(&b, &b).is_empty());
    }
}
