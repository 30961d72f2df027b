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

/// What one engine said last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineState {
    /// Where lhb reads it, for messages.
    pub socket: String,
    /// False until the engine answered once, and while it does not answer.
    pub available: bool,
    /// Why it does not answer, in words.
    pub problem: Option<String>,
    /// By network name; the last known list while the engine does not answer.
    pub networks: BTreeMap<String, Network>,
}

impl EngineState {
    /// Why the engine does not answer; None while it does.
    pub fn down(&self) -> Option<&str> {
        (!self.available).then(|| self.problem.as_deref().unwrap_or("no answer"))
    }
}

/// What the engines lhb reads said last, side by side; None for an engine not read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineView {
    pub docker: Option<EngineState>,
    pub podman: Option<EngineState>,
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
        let asked = |e: Engine| engine.is_none_or(|only| only == e);
        let on = |e: Engine| {
            self.engine(e)
                .filter(|_| asked(e))
                .and_then(|s| s.networks.get(bare))
        };
        let (docker, podman) = (on(Engine::Docker), on(Engine::Podman));
        match (docker, podman) {
            (Some(d), Some(p)) => Lookup::Ambiguous {
                docker: d,
                podman: p,
            },
            (Some(d), None) => Lookup::Found(Engine::Docker, d),
            (None, Some(p)) => Lookup::Found(Engine::Podman, p),
            (None, None) => Lookup::Missing {
                // An engine that said why it does not answer; Docker, the engine a
                // bare name means first, also when lhb does not read it.
                unreachable: Engine::ALL.into_iter().filter(|&e| asked(e)).find_map(|e| {
                    let why = match self.engine(e) {
                        Some(s) => s.problem.clone().filter(|_| !s.available),
                        None => (e == Engine::Docker).then(|| NO_DOCKER.to_string()),
                    };
                    Some((e, why?))
                }),
            },
        }
    }

    /// What `engine` said last; None if lhb does not read it.
    pub fn engine(&self, engine: Engine) -> Option<&EngineState> {
        match engine {
            Engine::Docker => self.docker.as_ref(),
            Engine::Podman => self.podman.as_ref(),
        }
    }

    /// Every network of every engine read, Docker's first.
    pub fn networks(&self) -> impl Iterator<Item = (Engine, &str, &Network)> {
        Engine::ALL
            .into_iter()
            .filter_map(|e| Some((e, self.engine(e)?)))
            .flat_map(|(e, s)| s.networks.iter().map(move |(n, net)| (e, n.as_str(), net)))
    }

    /// Why the Docker engine does not answer (also: lhb reads none); None while it does.
    pub fn docker_down(&self) -> Option<String> {
        match &self.docker {
            Some(d) => d.down().map(str::to_string),
            None => Some(NO_DOCKER.into()),
        }
    }

    /// The default `bridge` network, whose IPv4 gateway is what `host-gateway`
    /// (`--add-host host.docker.internal:host-gateway`) resolves to in every container.
    pub fn default_bridge(&self) -> Option<&Network> {
        self.docker.as_ref()?.networks.get("bridge")
    }
}

/// Why Docker is not read where Podman is.
pub const NO_DOCKER: &str = "no Docker engine is configured (`engine`)";

/// The engines' view; None when neither engine is read.
pub fn view(docker: Option<EngineState>, podman: Option<EngineState>) -> Option<EngineView> {
    (docker.is_some() || podman.is_some()).then_some(EngineView { docker, podman })
}

/// What the engines lhb reads say once, both asked at the same time, Docker within
/// `limit`: for the commands that only look (plan, verify, doctor).
pub async fn snapshot(engines: &docker::Engines, limit: std::time::Duration) -> Option<EngineView> {
    let docker = async {
        match &engines.docker {
            Some(socket) => Some(docker::snapshot(limit, socket.as_deref()).await),
            None => None,
        }
    };
    let podman = async {
        match &engines.podman {
            Some(path) => Some(podman::snapshot(path).await),
            None => None,
        }
    };
    let (docker, podman) = tokio::join!(docker, podman);
    view(docker, podman)
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
        let mut d = EngineState {
            available: true,
            ..Default::default()
        };
        d.networks.insert("web".into(), net("br-1"));
        d.networks.insert("db".into(), net("br-2"));
        let mut p = EngineState {
            available: true,
            ..Default::default()
        };
        p.networks.insert("web".into(), net("podman1"));
        p.networks.insert("cache".into(), net("podman2"));
        let mut v = EngineView {
            docker: Some(d),
            podman: Some(p),
        };
        assert!(matches!(v.find("web"), Lookup::Ambiguous { .. }));
        let all: Vec<_> = v.networks().map(|(e, n, _)| (e, n)).collect();
        assert_eq!(
            all,
            [
                (Engine::Docker, "db"),
                (Engine::Docker, "web"),
                (Engine::Podman, "cache"),
                (Engine::Podman, "web")
            ]
        );
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
        // Docker not read: a name on no engine says so.
        v.docker = None;
        assert!(matches!(
            v.find("web"),
            Lookup::Missing {
                unreachable: Some((Engine::Docker, _))
            }
        ));
    }
}
