//! What the container engines say: Docker (bollard, events) and rootful Podman (libpod
//! for networks, its Docker-compatible API for containers), one view of both. Imports
//! [`crate::model`] and [`crate::host`].

use std::{collections::BTreeMap, net::IpAddr};

pub mod compat;
pub mod docker;
pub mod podman;

pub use crate::model::rule::{Engine, engine_of};

/// One Docker network, as far as lhb cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub driver: String,
    /// The Linux bridge carrying the network.
    pub bridge: String,
    /// Gateway addresses from the network's IPAM configuration.
    pub gateways: Vec<IpAddr>,
    /// The network's labels lhb reads (`lhb.expose`), none other.
    pub labels: BTreeMap<String, String>,
    /// The containers attached to it, for rules scoped to containers.
    pub members: Vec<Member>,
}

/// A container on a network: what a rule's `allow` list can name it by, the addresses
/// the engine gave its endpoint there, and the network namespace its end of the veth
/// is in (how lhb finds the bridge port its frames enter by: see `reconcile::clients`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Compose's `com.docker.compose.project` and `.service` labels.
    pub project: Option<String>,
    pub service: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<IpAddr>,
    /// The namespace's id as this host's namespace knows it (netlink's NSID), the
    /// same number its veth peers on the bridge report; None where it could not be
    /// read (the container is then admitted nowhere).
    pub netns: Option<i32>,
    /// The namespace `netns` names, held open while this view is in use.
    pub netns_held: Option<NetnsHold>,
    /// Its sandbox file (Docker's `SandboxKey`, a bind mount of its network namespace):
    /// where `lhb verify` connects from as this container.
    pub sandbox: Option<String>,
}

/// A container's network namespace, held open. The kernel frees a namespace's NSID
/// when the namespace goes and gives the lowest free id to the next one: without the
/// hold, a container started where a stopped one was (the address it had, given again
/// by IPAM) could get the NSID that a view not yet relisted still has for the stopped
/// one, and be admitted through its own port as that container. Held, the id cannot
/// pass to anyone while a view names it.
///
/// Equal to any other hold: two views that give a member the same NSID name the same
/// namespace (the older view's hold keeps the id from passing on), so the hold is not
/// what tells views apart.
#[derive(Clone, Debug)]
pub struct NetnsHold {
    _ns: std::sync::Arc<std::fs::File>,
}

impl PartialEq for NetnsHold {
    fn eq(&self, _: &NetnsHold) -> bool {
        true
    }
}

impl Eq for NetnsHold {}

/// What the engine said last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineView {
    /// False until the engine answered once, and while it is unreachable.
    pub available: bool,
    /// Why it is unreachable, in words.
    pub problem: Option<String>,
    /// By network name; the last known list while the engine is unreachable.
    pub networks: BTreeMap<String, Network>,
    /// Podman's networks, where lhb reads a Podman socket too.
    pub podman: Option<PodmanView>,
}

/// A network a rule names, looked up on the engines.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(Engine, &'a Network),
    /// On none of the engines asked; the problem of an engine that does not answer.
    Missing {
        unreachable: Option<(Engine, String)>,
    },
    /// The name is on both engines, and the rule did not say which.
    Ambiguous {
        docker: &'a Network,
        podman: &'a Network,
    },
}

impl EngineView {
    /// The network `name` names (`NAME`, `docker:NAME` or `podman:NAME`).
    pub fn find(&self, name: &str) -> Lookup<'_> {
        let (engine, bare) = engine_of(name);
        let docker = (engine != Some(Engine::Podman))
            .then(|| self.networks.get(bare))
            .flatten();
        let podman = (engine != Some(Engine::Docker))
            .then(|| self.podman.as_ref().and_then(|p| p.networks.get(bare)))
            .flatten();
        match (docker, podman) {
            (Some(d), Some(p)) => Lookup::Ambiguous {
                docker: d,
                podman: p,
            },
            (Some(d), None) => Lookup::Found(Engine::Docker, d),
            (None, Some(p)) => Lookup::Found(Engine::Podman, p),
            (None, None) => {
                let docker_down = (engine != Some(Engine::Podman) && !self.available)
                    .then(|| self.problem.clone())
                    .flatten()
                    .map(|p| (Engine::Docker, p));
                let podman_down = (engine != Some(Engine::Docker))
                    .then_some(self.podman.as_ref())
                    .flatten()
                    .filter(|p| !p.available)
                    .and_then(|p| p.problem.clone())
                    .map(|p| (Engine::Podman, p));
                Lookup::Missing {
                    unreachable: docker_down.or(podman_down),
                }
            }
        }
    }

    /// The default `bridge` network, whose IPv4 gateway is what `host-gateway`
    /// (`--add-host host.docker.internal:host-gateway`) resolves to in every container.
    pub fn default_bridge(&self) -> Option<&Network> {
        self.networks.get("bridge")
    }
}

/// What Podman said last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodmanView {
    /// The socket, for messages.
    pub socket: String,
    /// False until Podman answered once, and while it does not answer.
    pub available: bool,
    pub problem: Option<String>,
    /// By network name; the last known list while Podman does not answer.
    pub networks: BTreeMap<String, Network>,
}

/// Docker's view with Podman's networks in it; None when neither engine is read.
pub fn view(docker: Option<EngineView>, podman: Option<PodmanView>) -> Option<EngineView> {
    if docker.is_none() && podman.is_none() {
        return None;
    }
    let mut v = docker.unwrap_or_else(|| EngineView {
        problem: Some("no Docker engine is configured (`engine`)".into()),
        ..Default::default()
    });
    v.podman = podman;
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(bridge: &str) -> Network {
        Network {
            driver: "bridge".into(),
            bridge: bridge.into(),
            gateways: vec![],
            labels: Default::default(),
            members: Vec::new(),
        }
    }

    #[test]
    fn a_name_on_both_engines_needs_the_engine_said() {
        let mut v = EngineView {
            available: true,
            ..Default::default()
        };
        v.networks.insert("web".into(), net("br-1"));
        v.networks.insert("db".into(), net("br-2"));
        let mut p = crate::engines::PodmanView {
            available: true,
            ..Default::default()
        };
        p.networks.insert("web".into(), net("podman1"));
        p.networks.insert("cache".into(), net("podman2"));
        v.podman = Some(p);
        assert!(matches!(v.find("web"), Lookup::Ambiguous { .. }));
        assert!(
            matches!(v.find("docker:web"), Lookup::Found(Engine::Docker, n) if n.bridge == "br-1")
        );
        assert!(
            matches!(v.find("podman:web"), Lookup::Found(Engine::Podman, n) if n.bridge == "podman1")
        );
        assert!(matches!(v.find("cache"), Lookup::Found(Engine::Podman, _)));
        assert!(matches!(v.find("db"), Lookup::Found(Engine::Docker, _)));
        assert!(matches!(
            v.find("docker:cache"),
            Lookup::Missing { unreachable: None }
        ));
        // Podman down: a name not on Docker may be Podman's; its problem is the reason.
        let p = v.podman.as_mut().unwrap();
        p.available = false;
        p.problem = Some("connection refused".into());
        p.networks.clear();
        assert!(matches!(
            v.find("nope"),
            Lookup::Missing {
                unreachable: Some((Engine::Podman, _))
            }
        ));
        assert!(matches!(v.find("web"), Lookup::Found(Engine::Docker, _)));
    }
}
