//! Docker discovery: which Linux bridge and gateway addresses each Docker network has.
//!
//! A background task keeps a [`DockerView`] current: it lists the engine's networks,
//! follows the event stream (any network event -> list again), and when the engine goes
//! away or restarts it reconnects with backoff and lists again. While the engine is
//! unreachable the last known networks are kept: their bridges usually survive a
//! restart of dockerd, and netlink still says whether a bridge exists.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use bollard::{
    Docker,
    query_parameters::{
        EventsOptions, InspectContainerOptions, ListContainersOptions, ListNetworksOptions,
    },
};
use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// One Docker network, as far as lhb cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerNetwork {
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
pub struct DockerView {
    /// False until the engine answered once, and while it is unreachable.
    pub available: bool,
    /// Why it is unreachable, in words.
    pub problem: Option<String>,
    /// By network name; the last known list while the engine is unreachable.
    pub networks: BTreeMap<String, DockerNetwork>,
    /// Podman's networks, where lhb reads a Podman socket too.
    pub podman: Option<crate::podman::PodmanView>,
}

/// Which engine a network is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Engine::Docker => "Docker",
            Engine::Podman => "Podman",
        })
    }
}

/// A network a rule names, looked up on the engines.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(Engine, &'a DockerNetwork),
    /// On none of the engines asked; the problem of an engine that does not answer.
    Missing {
        unreachable: Option<(Engine, String)>,
    },
    /// The name is on both engines, and the rule did not say which.
    Ambiguous {
        docker: &'a DockerNetwork,
        podman: &'a DockerNetwork,
    },
}

/// `docker:NAME` / `podman:NAME`: the engine a rule's network name asks for, and the
/// name.
pub fn engine_of(name: &str) -> (Option<Engine>, &str) {
    if let Some(n) = name.strip_prefix("docker:") {
        (Some(Engine::Docker), n)
    } else if let Some(n) = name.strip_prefix("podman:") {
        (Some(Engine::Podman), n)
    } else {
        (None, name)
    }
}

impl DockerView {
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
    pub fn default_bridge(&self) -> Option<&DockerNetwork> {
        self.networks.get("bridge")
    }
}

/// The engines lhb reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Engines {
    /// Docker: Some(None) is DOCKER_HOST, else the standard socket; Some(Some(s)) an
    /// `engine` socket; None: no Docker engine.
    pub docker: Option<Option<String>>,
    /// Podman's socket, if lhb reads one.
    pub podman: Option<std::path::PathBuf>,
}

/// The engines of the `engine` setting (`--engine` then the file's `engine = [...]`:
/// `unix://PATH` each), or without any: Docker's standard socket (or DOCKER_HOST) and
/// Podman's system socket if it exists; none with --no-docker. A socket is Podman's if
/// it answers libpod's ping; one that does not answer now is taken for Podman's if its
/// path says `podman`. One engine of each kind at most.
pub async fn engines(no_docker: bool, cli: &[String], file: &[String]) -> anyhow::Result<Engines> {
    if no_docker {
        return Ok(Engines::default());
    }
    let given: Vec<&String> = cli.iter().chain(file).collect();
    if given.is_empty() {
        let podman = std::path::Path::new(crate::podman::DEFAULT_SOCKET);
        return Ok(Engines {
            docker: Some(None),
            podman: podman.exists().then(|| podman.to_path_buf()),
        });
    }
    let mut e = Engines::default();
    for addr in given {
        let path = crate::podman::socket_path(addr);
        let podman = match crate::podman::is_podman(&path).await {
            Ok(p) => p,
            Err(why) => {
                let guess = addr.contains("podman");
                info!(
                    "engine {addr} does not answer now ({why}); taken for {}'s by its name",
                    if guess { "Podman" } else { "Docker" }
                );
                guess
            }
        };
        let (slot, kind) = if podman {
            (e.podman.is_some(), "Podman")
        } else {
            (e.docker.is_some(), "Docker")
        };
        anyhow::ensure!(
            !slot,
            "engine {addr}: a second {kind} engine; lhb follows one Docker and one Podman engine"
        );
        if podman {
            e.podman = Some(path);
        } else {
            e.docker = Some(Some(format!("unix://{}", path.display())));
        }
    }
    Ok(e)
}

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts following the local engine (`socket`: a `unix://PATH` of the `engine`
/// setting; None: DOCKER_HOST, else the standard socket); the receiver always holds
/// the latest view.
pub fn watch(tasks: &crate::tasks::Tasks, socket: Option<String>) -> watch::Receiver<DockerView> {
    let (tx, rx) = watch::channel(DockerView::default());
    tasks.spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut was_up = false;
        loop {
            let problem = match session(&tx, &mut was_up, socket.as_deref()).await {
                Ok(()) => "the engine closed the event stream".to_string(),
                Err(e) => e,
            };
            if was_up {
                warn!("Docker engine lost: {problem}; reconnecting");
                backoff = BACKOFF_MIN;
            } else {
                debug!("Docker engine not reachable: {problem}");
            }
            was_up = false;
            tx.send_modify(|v| {
                v.available = false;
                v.problem = Some(problem.clone());
            });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    });
    rx
}

/// A client of the engine at `socket` (None: DOCKER_HOST, else the standard socket),
/// speaking the engine's API version.
pub(crate) async fn connect(socket: Option<&str>) -> Result<Docker, String> {
    let docker = match socket {
        Some(s) => Docker::connect_with_unix(s, 120, bollard::API_DEFAULT_VERSION),
        None => Docker::connect_with_local_defaults(),
    };
    docker
        .map_err(|e| e.to_string())?
        // The engine may be older than bollard's default API version.
        .negotiate_version()
        .await
        .map_err(|e| e.to_string())
}

/// One connection to the engine: list, then list again on every network event.
async fn session(
    tx: &watch::Sender<DockerView>,
    was_up: &mut bool,
    socket: Option<&str>,
) -> Result<(), String> {
    let docker = connect(socket).await?;
    // Events since just before the first list, so nothing falls between the two.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1))
        .unwrap_or(0);
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        filters: Some(event_filters()),
        ..Default::default()
    }));
    publish(tx, list(&docker).await?);
    if !*was_up {
        info!("Docker engine connected");
    }
    *was_up = true;
    while let Some(ev) = events.next().await {
        let ev = ev.map_err(|e| e.to_string())?;
        debug!(action = ?ev.action, "Docker network event");
        publish(tx, list(&docker).await?);
    }
    Ok(())
}

/// What changes a bridge (a network created or destroyed) or who is on it (a
/// container joining or leaving: every start and stop; a rename), for rules scoped
/// to containers. The network's connect comes before the container's start, and its
/// disconnect after the container died: the address is released after both.
pub(crate) fn event_filters() -> std::collections::HashMap<String, Vec<String>> {
    [
        (
            "type".to_string(),
            vec!["network".to_string(), "container".to_string()],
        ),
        (
            "event".to_string(),
            [
                "create",
                "destroy",
                "connect",
                "disconnect",
                "start",
                "die",
                "rename",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ]
    .into()
}

/// The engine's networks once, for the one-shot commands (doctor, verify).
pub async fn snapshot(limit: Duration, socket: Option<&str>) -> DockerView {
    let once = async {
        let docker = connect(socket).await?;
        list(&docker).await
    };
    match tokio::time::timeout(limit, once).await {
        Ok(Ok(networks)) => DockerView {
            available: true,
            networks,
            ..Default::default()
        },
        Ok(Err(e)) => DockerView {
            problem: Some(e),
            ..Default::default()
        },
        Err(_) => DockerView {
            problem: Some(format!("no answer within {}s", limit.as_secs())),
            ..Default::default()
        },
    }
}

fn publish(tx: &watch::Sender<DockerView>, networks: BTreeMap<String, DockerNetwork>) {
    tx.send_if_modified(|v| {
        let new = DockerView {
            available: true,
            networks,
            ..Default::default()
        };
        if *v == new {
            return false;
        }
        *v = new;
        true
    });
}

async fn list(docker: &Docker) -> Result<BTreeMap<String, DockerNetwork>, String> {
    let nets = docker
        .list_networks(None::<ListNetworksOptions>)
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for n in nets {
        let (Some(name), Some(id)) = (n.name, n.id) else {
            continue;
        };
        let options = n.options.unwrap_or_default();
        let labels = crate::labels::ours(n.labels.unwrap_or_default());
        let gateways = n
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.gateway)
            .filter_map(|g| g.split('/').next().and_then(|a| a.parse().ok()))
            .collect();
        out.insert(
            name,
            DockerNetwork {
                driver: n.driver.unwrap_or_default(),
                bridge: bridge_name(&id, &options),
                gateways,
                labels,
                members: Vec::new(),
            },
        );
    }
    members(docker, &mut out).await?;
    Ok(out)
}

/// Every running or starting container with an address on one of `nets`, as a
/// [`Member`] of each such network. Also Podman's, through its Docker-compatible API:
/// it lists containers with their addresses and inspects them with their `SandboxKey`
/// as Docker does.
pub(crate) async fn members(
    docker: &Docker,
    nets: &mut BTreeMap<String, DockerNetwork>,
) -> Result<(), String> {
    // `all`: a container between its network's connect and its start is not running yet,
    // and its endpoint is already up.
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            ..Default::default()
        }))
        .await
        .map_err(|e| e.to_string())?;
    let nl = crate::netlink::Netlink::requests().ok();
    for c in containers {
        let (Some(id), Some(settings)) = (c.id, c.network_settings) else {
            continue;
        };
        let endpoints: Vec<(String, Vec<IpAddr>)> = settings
            .networks
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(net, ep)| {
                let addrs: Vec<IpAddr> = [ep.ip_address, ep.global_ipv6_address]
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a.parse().ok())
                    .collect();
                (nets.contains_key(&net) && !addrs.is_empty()).then_some((net, addrs))
            })
            .collect();
        if endpoints.is_empty() {
            continue;
        }
        let name = c
            .names
            .unwrap_or_default()
            .first()
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default();
        let sandbox = sandbox_of(docker, &id).await;
        let held = match (&nl, &sandbox) {
            (Some(nl), Some(key)) => netns_of(nl, &id, key).await,
            _ => None,
        };
        let (netns, netns_held) = match held {
            Some((nsid, file)) => (
                Some(nsid),
                Some(NetnsHold {
                    _ns: std::sync::Arc::new(file),
                }),
            ),
            None => (None, None),
        };
        let labels: BTreeMap<String, String> = c.labels.unwrap_or_default().into_iter().collect();
        for (net, addrs) in endpoints {
            if let Some(n) = nets.get_mut(&net) {
                n.members.push(Member {
                    name: name.clone(),
                    project: labels.get("com.docker.compose.project").cloned(),
                    service: labels.get("com.docker.compose.service").cloned(),
                    labels: labels.clone(),
                    addrs,
                    netns,
                    netns_held: netns_held.clone(),
                    sandbox: sandbox.clone(),
                });
            }
        }
    }
    for n in nets.values_mut() {
        n.members.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(())
}

/// Container `id`'s sandbox file (Docker's `SandboxKey`, a bind mount of its network
/// namespace). A file rather than the pid: a pid can be reused, the sandbox is the
/// container's own.
async fn sandbox_of(docker: &Docker, id: &str) -> Option<String> {
    let c = docker
        .inspect_container(id, None::<InspectContainerOptions>)
        .await
        .ok()?;
    c.network_settings?.sandbox_key.filter(|k| !k.is_empty())
}

/// The NSID of the network namespace at `key` (container `id`'s), asked of netlink.
async fn netns_of(
    nl: &crate::netlink::Netlink,
    id: &str,
    key: &str,
) -> Option<(i32, std::fs::File)> {
    match nl.nsid_of(std::path::Path::new(key)).await {
        Ok(id) => id,
        Err(e) => {
            debug!("container {id}: namespace {key}: {e:#}");
            None
        }
    }
}

/// Docker's own naming: the `com.docker.network.bridge.name` option (docker0 for the
/// default network), else `br-` and the first 12 characters of the network id.
pub fn bridge_name(id: &str, options: &std::collections::HashMap<String, String>) -> String {
    match options.get("com.docker.network.bridge.name") {
        Some(name) if !name.is_empty() => name.clone(),
        _ => format!("br-{}", &id[..id.len().min(12)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(bridge: &str) -> DockerNetwork {
        DockerNetwork {
            driver: "bridge".into(),
            bridge: bridge.into(),
            gateways: vec![],
            labels: Default::default(),
            members: Vec::new(),
        }
    }

    #[test]
    fn a_name_on_both_engines_needs_the_engine_said() {
        let mut v = DockerView {
            available: true,
            ..Default::default()
        };
        v.networks.insert("web".into(), net("br-1"));
        v.networks.insert("db".into(), net("br-2"));
        let mut p = crate::podman::PodmanView {
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

    #[test]
    fn bridge_names_follow_docker() {
        let mut opts = std::collections::HashMap::new();
        assert_eq!(
            bridge_name("0123456789abcdef0123", &opts),
            "br-0123456789ab"
        );
        opts.insert(
            "com.docker.network.bridge.name".to_string(),
            "docker0".to_string(),
        );
        assert_eq!(bridge_name("0123456789abcdef0123", &opts), "docker0");
    }
}
