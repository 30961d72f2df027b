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
    query_parameters::{EventsOptions, ListNetworksOptions},
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
}

/// What the engine said last.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DockerView {
    /// False until the engine answered once, and while it is unreachable.
    pub available: bool,
    /// Why it is unreachable, in words.
    pub problem: Option<String>,
    /// By network name; the last known list while the engine is unreachable.
    pub networks: BTreeMap<String, DockerNetwork>,
}

impl DockerView {
    /// The default `bridge` network, whose IPv4 gateway is what `host-gateway`
    /// (`--add-host host.docker.internal:host-gateway`) resolves to in every container.
    pub fn default_bridge(&self) -> Option<&DockerNetwork> {
        self.networks.get("bridge")
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts following the local engine; the receiver always holds the latest view.
pub fn watch(tasks: &crate::tasks::Tasks) -> watch::Receiver<DockerView> {
    let (tx, rx) = watch::channel(DockerView::default());
    tasks.spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut was_up = false;
        loop {
            let problem = match session(&tx, &mut was_up).await {
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
async fn session(tx: &watch::Sender<DockerView>, was_up: &mut bool) -> Result<(), String> {
    let docker = Docker::connect_with_local_defaults()
        .map_err(|e| e.to_string())?
        // The engine may be older than bollard's default API version.
        .negotiate_version()
        .await
        .map_err(|e| e.to_string())?;
    // Events since just before the first list, so nothing falls between the two.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1))
        .unwrap_or(0);
    // Only what changes a bridge: a container joining or leaving a network (connect,
    // disconnect: every container start and stop) changes none.
    let filters = [
        ("type".to_string(), vec!["network".to_string()]),
        (
            "event".to_string(),
            vec!["create".to_string(), "destroy".to_string()],
        ),
    ]
    .into();
    let mut events = docker.events(Some(EventsOptions {
        since: Some(since.to_string()),
        filters: Some(filters),
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

/// The engine's networks once, for the one-shot commands (doctor, verify).
pub async fn snapshot(limit: Duration) -> DockerView {
    let once = async {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| e.to_string())?
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        list(&docker).await
    };
    match tokio::time::timeout(limit, once).await {
        Ok(Ok(networks)) => DockerView {
            available: true,
            problem: None,
            networks,
        },
        Ok(Err(e)) => DockerView {
            available: false,
            problem: Some(e),
            networks: BTreeMap::new(),
        },
        Err(_) => DockerView {
            available: false,
            problem: Some(format!("no answer within {}s", limit.as_secs())),
            networks: BTreeMap::new(),
        },
    }
}

fn publish(tx: &watch::Sender<DockerView>, networks: BTreeMap<String, DockerNetwork>) {
    tx.send_if_modified(|v| {
        let new = DockerView {
            available: true,
            problem: None,
            networks,
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
        let labels = n
            .labels
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k == crate::labels::LABEL)
            .collect();
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
            },
        );
    }
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
