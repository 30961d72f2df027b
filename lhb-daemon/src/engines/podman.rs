//! Podman (rootful; netavark makes `podman0`, `podman1`, ... bridges): its networks by
//! name, from the libpod API socket (`/run/podman/podman.sock` when it exists, or an
//! `engine`/`--engine` socket that answers libpod's ping).
//!
//! Podman's Docker-compatible API lists networks without their bridge, and Podman sends
//! no network create/destroy events (measured with Podman 4.3). Its libpod endpoint
//! names the bridge (`network_interface`) with the subnets and gateways, and netavark
//! creates a network's bridge only when a container first joins it: so lhb lists again
//! whenever a link comes or goes (the daemon pokes [`PodmanWatch::relist`] on netlink
//! link events), and every [`RELIST_EVERY`] in case a network changed without one.
//!
//! Its containers (for rules scoped to containers) come from its Docker-compatible API,
//! through bollard and the same code as Docker's: the list has each container's
//! addresses, the inspection its `SandboxKey` (`/run/netns/netns-...`). Podman does send
//! container events there (start, die, ...): each one, like a link event, makes lhb
//! list again, so a container started is admitted at its start, not at the next relist.
//!
//! bollard speaks only the Docker API, so the one libpod request lhb needs is a plain
//! HTTP/1.0 GET over the socket (no keep-alive, no chunked body to decode).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    sync::{Notify, watch},
};
use tracing::{debug, info, warn};

use super::{EngineState, Network, compat};

/// Podman's system socket (`podman.socket`).
pub const DEFAULT_SOCKET: &str = "/run/podman/podman.sock";
/// The longest an answer may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer read (thousands of networks fit).
const MAX_ANSWER: usize = 16 << 20;
/// A list this often even without a link event.
pub const RELIST_EVERY: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The task following Podman, and the way to make it list again.
pub struct PodmanWatch {
    pub rx: watch::Receiver<EngineState>,
    relist: Arc<Notify>,
}

impl PodmanWatch {
    /// Lists again soon (a link came or went).
    pub fn relist(&self) {
        self.relist.notify_one();
    }
}

/// The path of a `unix://PATH` (or plain PATH) engine address.
pub fn socket_path(addr: &str) -> PathBuf {
    PathBuf::from(addr.strip_prefix("unix://").unwrap_or(addr))
}

/// Whether the socket at `path` is Podman's: it answers libpod's ping.
pub async fn is_podman(path: &Path) -> Result<bool, String> {
    match get(path, "/libpod/_ping").await {
        Ok((200, _)) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Starts following the Podman socket at `path`.
pub fn watch(tasks: &crate::host::tasks::Tasks, path: PathBuf) -> PodmanWatch {
    let (tx, rx) = watch::channel(EngineState {
        socket: path.display().to_string(),
        ..Default::default()
    });
    let relist = Arc::new(Notify::new());
    let poke = relist.clone();
    tasks.spawn(follow_events(path.clone(), relist.clone()));
    tasks.spawn(async move {
        let mut backoff = BACKOFF_MIN;
        let mut was_up = false;
        let mut compat = None;
        loop {
            match list(&path, &mut compat).await {
                Ok(networks) => {
                    if !was_up {
                        info!("Podman connected ({})", path.display());
                    }
                    was_up = true;
                    backoff = BACKOFF_MIN;
                    tx.send_if_modified(|v| {
                        let changed = !v.available || v.networks != networks;
                        v.available = true;
                        v.problem = None;
                        v.networks = networks;
                        changed
                    });
                    let _ = tokio::time::timeout(RELIST_EVERY, poke.notified()).await;
                }
                Err(problem) => {
                    if was_up {
                        warn!("Podman lost ({}): {problem}; retrying", path.display());
                    } else {
                        debug!("Podman not answering ({}): {problem}", path.display());
                    }
                    was_up = false;
                    tx.send_if_modified(|v| {
                        let changed = v.available || v.problem.as_ref() != Some(&problem);
                        v.available = false;
                        v.problem = Some(problem.clone());
                        changed
                    });
                    // A link event may mean Podman is back: try again at once then.
                    let _ = tokio::time::timeout(backoff, poke.notified()).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    });
    PodmanWatch { rx, relist }
}

/// Pokes `relist` at every container or network event from Podman's Docker-compatible
/// API; and once at every (re)connection, for the events missed while it was not
/// following.
async fn follow_events(path: PathBuf, relist: Arc<Notify>) {
    use futures::StreamExt as _;
    let socket = path.display().to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        match compat::connect(Some(&socket)).await {
            Ok(d) => {
                let mut events = d.events(Some(bollard::query_parameters::EventsOptions {
                    filters: Some(filters()),
                    ..Default::default()
                }));
                relist.notify_one();
                while let Some(ev) = events.next().await {
                    match ev {
                        Ok(ev) => {
                            debug!(action = ?ev.action, "Podman event");
                            backoff = BACKOFF_MIN;
                            relist.notify_one();
                        }
                        Err(e) => {
                            debug!("Podman events ({socket}): {e}");
                            break;
                        }
                    }
                }
            }
            Err(e) => debug!("Podman events ({socket}): {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Docker's, and `remove`: Podman's word for Docker's `destroy`.
fn filters() -> std::collections::HashMap<String, Vec<String>> {
    let mut f = compat::event_filters();
    f.entry("event".into()).or_default().push("remove".into());
    f
}

/// Podman's networks once, for the one-shot commands.
pub async fn snapshot(path: &Path) -> EngineState {
    let mut v = EngineState {
        socket: path.display().to_string(),
        ..Default::default()
    };
    match list(path, &mut None).await {
        Ok(networks) => {
            v.available = true;
            v.networks = networks;
        }
        Err(e) => v.problem = Some(e),
    }
    v
}

#[derive(serde::Deserialize)]
struct LibpodNetwork {
    name: String,
    #[serde(default)]
    driver: String,
    #[serde(default)]
    network_interface: String,
    #[serde(default)]
    subnets: Option<Vec<LibpodSubnet>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(serde::Deserialize)]
struct LibpodSubnet {
    #[serde(default)]
    gateway: Option<String>,
}

/// The networks, and their containers through `compat`, a client of Podman's
/// Docker-compatible API made at the first call and kept while it works: Podman takes
/// 0.3-0.4 s to answer the version request a new client negotiates with (measured,
/// Podman 4.3), which would delay each new container's admission by as much.
async fn list(
    path: &Path,
    compat: &mut Option<bollard::Docker>,
) -> Result<BTreeMap<String, Network>, String> {
    let (status, body) = get(path, "/v4.0.0/libpod/networks/json").await?;
    if status != 200 {
        return Err(format!(
            "libpod networks: HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
        ));
    }
    let mut networks = parse(&body)?;
    let docker = match compat.take() {
        Some(d) => d,
        None => compat::connect(Some(&path.display().to_string())).await?,
    };
    compat::members(&docker, &mut networks).await?;
    *compat = Some(docker);
    Ok(networks)
}

fn parse(body: &[u8]) -> Result<BTreeMap<String, Network>, String> {
    let nets: Vec<LibpodNetwork> =
        serde_json::from_slice(body).map_err(|e| format!("libpod networks: {e}"))?;
    Ok(nets
        .into_iter()
        .map(|n| {
            let gateways = n
                .subnets
                .unwrap_or_default()
                .into_iter()
                .filter_map(|s| s.gateway?.parse::<IpAddr>().ok())
                .collect();
            let labels = crate::model::labels::ours(n.labels.unwrap_or_default());
            (
                n.name,
                Network {
                    driver: n.driver,
                    bridge: n.network_interface,
                    gateways,
                    labels,
                    members: Vec::new(),
                },
            )
        })
        .collect())
}

/// `GET PATH` on the socket: the status and the body.
async fn get(socket: &Path, path: &str) -> Result<(u16, Vec<u8>), String> {
    let once = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: podman\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        (&mut s)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        if answer.len() > MAX_ANSWER {
            return Err(format!("answer larger than {MAX_ANSWER} bytes"));
        }
        split(&answer)
    };
    tokio::time::timeout(TIMEOUT, once)
        .await
        .map_err(|_| format!("no answer within {}s", TIMEOUT.as_secs()))?
}

/// An HTTP/1.x answer: its status and its body (HTTP/1.0 asked: no chunked encoding).
fn split(answer: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("an answer without HTTP headers")?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {:?}", head.lines().next()))?;
    Ok((status, answer[end + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpod_networks_give_bridge_and_gateways() {
        // As Podman 4.3 answers (trimmed).
        let body = br#"[{"name":"podman","id":"2f25","driver":"bridge","network_interface":"podman0","subnets":[{"subnet":"10.88.0.0/16","gateway":"10.88.0.1"}],"ipv6_enabled":false},
            {"name":"web","driver":"bridge","network_interface":"podman1","subnets":[{"subnet":"10.232.1.0/24","gateway":"10.232.1.1"},{"subnet":"fd00::/64","gateway":"fd00::1"}],"labels":{"lhb.expose":"80","other":"x"}},
            {"name":"mac","driver":"macvlan","network_interface":"eth0"}]"#;
        let nets = parse(body).unwrap();
        assert_eq!(nets["podman"].bridge, "podman0");
        assert_eq!(
            nets["web"].gateways,
            vec![
                "10.232.1.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        assert_eq!(nets["web"].labels.len(), 1);
        assert_eq!(nets["mac"].driver, "macvlan");
        assert!(nets["mac"].gateways.is_empty());
        assert!(parse(b"{}").is_err());
    }

    #[test]
    fn http_answers_split_into_status_and_body() {
        let (s, b) = split(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nOK").unwrap();
        assert_eq!((s, b.as_slice()), (200, b"OK".as_slice()));
        assert_eq!(split(b"HTTP/1.0 404 Not Found\r\n\r\n").unwrap().0, 404);
        assert!(split(b"garbage").is_err());
        assert_eq!(
            socket_path("unix:///run/podman/podman.sock"),
            PathBuf::from(DEFAULT_SOCKET)
        );
    }
}
