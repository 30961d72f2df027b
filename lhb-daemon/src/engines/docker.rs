//! Docker discovery: which Linux bridge and gateway addresses each Docker network has.
//!
//! A background task keeps an [`EngineState`] current: it lists the engine's networks,
//! follows the event stream (any network event -> list again), and when the engine goes
//! away or restarts it reconnects with backoff and lists again. While the engine is
//! unreachable the last known networks are kept: their bridges usually survive a
//! restart of dockerd, and netlink still says whether a bridge exists.

use std::{collections::BTreeMap, time::Duration};

use bollard::{
    Docker,
    query_parameters::{EventsOptions, ListNetworksOptions},
};

use super::{EngineState, Network, compat};
use futures::StreamExt as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

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
        let podman = std::path::Path::new(crate::engines::podman::DEFAULT_SOCKET);
        return Ok(Engines {
            docker: Some(None),
            podman: podman.exists().then(|| podman.to_path_buf()),
        });
    }
    let mut e = Engines::default();
    for addr in given {
        let path = crate::engines::podman::socket_path(addr);
        let podman = match crate::engines::podman::is_podman(&path).await {
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
pub fn watch(
    tasks: &crate::host::tasks::Tasks,
    socket: Option<String>,
) -> watch::Receiver<EngineState> {
    let (tx, rx) = watch::channel(EngineState {
        socket: socket_name(socket.as_deref()),
        ..Default::default()
    });
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

/// One connection to the engine: list, then list again on every network event.
async fn session(
    tx: &watch::Sender<EngineState>,
    was_up: &mut bool,
    socket: Option<&str>,
) -> Result<(), String> {
    let docker = compat::connect(socket).await?;
    // Events since just before the first list, so nothing falls between the two.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1))
        .unwrap_or(0);
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        filters: Some(compat::event_filters()),
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

/// The engine's networks once, for the one-shot commands (doctor, verify, plan).
pub async fn snapshot(limit: Duration, socket: Option<&str>) -> EngineState {
    let once = async {
        let docker = compat::connect(socket).await?;
        list(&docker).await
    };
    let mut v = EngineState {
        socket: socket_name(socket),
        ..Default::default()
    };
    match tokio::time::timeout(limit, once).await {
        Ok(Ok(networks)) => {
            v.available = true;
            v.networks = networks;
        }
        Ok(Err(e)) => v.problem = Some(e),
        Err(_) => v.problem = Some(format!("no answer within {}s", limit.as_secs())),
    }
    v
}

/// The socket, as messages name it: the `engine` setting's, else DOCKER_HOST's, else
/// the standard one.
fn socket_name(socket: Option<&str>) -> String {
    match socket {
        Some(s) => s.to_string(),
        None => std::env::var("DOCKER_HOST")
            .unwrap_or_else(|_| "unix:///var/run/docker.sock".to_string()),
    }
}

fn publish(tx: &watch::Sender<EngineState>, networks: BTreeMap<String, Network>) {
    tx.send_if_modified(|v| {
        let changed = !v.available || v.problem.is_some() || v.networks != networks;
        v.available = true;
        v.problem = None;
        v.networks = networks;
        changed
    });
}

async fn list(docker: &Docker) -> Result<BTreeMap<String, Network>, String> {
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
        let labels = crate::model::labels::ours(n.labels.unwrap_or_default());
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
            Network {
                driver: n.driver.unwrap_or_default(),
                bridge: bridge_name(&id, &options),
                gateways,
                labels,
                members: Vec::new(),
            },
        );
    }
    compat::members(docker, &mut out).await?;
    Ok(out)
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
