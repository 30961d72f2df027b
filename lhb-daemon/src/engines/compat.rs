//! The Docker API as both engines speak it (Docker's own, Podman's compatible one):
//! a client, the events that change who is on a network, and the containers on the
//! networks with the namespaces their veths lead into.

use std::{collections::BTreeMap, net::IpAddr};

use bollard::{
    Docker,
    query_parameters::{InspectContainerOptions, ListContainersOptions},
};
use tracing::debug;

use super::{Member, NetnsHold, Network};

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

/// Every running or starting container with an address on one of `nets`, as a
/// [`Member`] of each such network. Also Podman's, through its Docker-compatible API:
/// it lists containers with their addresses and inspects them with their `SandboxKey`
/// as Docker does.
pub(crate) async fn members(
    docker: &Docker,
    nets: &mut BTreeMap<String, Network>,
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
    let nl = crate::host::netlink::Netlink::requests().ok();
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
    nl: &crate::host::netlink::Netlink,
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
