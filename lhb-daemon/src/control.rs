//! The control socket (default /run/lhb/lhb.sock, mode 0600): `lhb status`, `lhb expose`
//! and `lhb unexpose` talk to the running daemon through it, one JSON request and one
//! JSON response per connection. Also the metrics endpoint (Prometheus text over HTTP, on
//! a Unix socket or a loopback TCP address), which asks the daemon the same way.

use std::os::unix::fs::FileTypeExt as _;
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _},
    sync::{mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::status::Status;

pub const DEFAULT_CONTROL: &str = "/run/lhb/lhb.sock";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "lowercase")]
pub enum Request {
    Status,
    Expose {
        /// NETWORK:PORT[=TARGET] (IFACE:... with `iface`).
        spec: String,
        iface: bool,
        service: Option<String>,
        persist: bool,
    },
    Unexpose {
        spec: String,
        iface: bool,
        persist: bool,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// What went wrong, for the user (when !ok).
    pub error: Option<String>,
    /// What was done, for the user.
    pub message: Option<String>,
    pub status: Option<Status>,
}

impl Response {
    pub fn error(e: impl std::fmt::Display) -> Response {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// A request on its way to the daemon's loop, with where the answer goes.
pub type Call = (Request, oneshot::Sender<Response>);

/// Binds the control socket at `path` (0600) and serves it; requests go to `tx`.
/// A socket file nobody answers on is a leftover of a crash and is replaced; one that
/// answers belongs to a running lhb, and that is an error.
pub fn serve(path: &Path, tx: mpsc::Sender<Call>) -> anyhow::Result<()> {
    let listener = bind_unix(path, "control socket")?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Err(e) = handle_control(conn, tx).await {
                    debug!("control connection: {e:#}");
                }
            });
        }
    });
    Ok(())
}

fn bind_unix(path: &Path, what: &str) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} for the {what}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            // A typo'd path must never cost a file (`metrics = "unix:/etc/lhb/lhb.toml"`).
            bail!(
                "{what} {} exists and is not a socket: refusing to replace it (choose another path)",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "{what} {} answers: another lhb is running (stop it, or give this one its own --control PATH)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale {what} {}", path.display()))?;
    }
    // Created 0600 from the start: no window in which others could connect.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("binding the {what} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn handle_control(
    conn: tokio::net::UnixStream,
    tx: mpsc::Sender<Call>,
) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(r).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(req) => ask(&tx, req).await,
        Err(e) => Response::error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await?;
    Ok(())
}

async fn ask(tx: &mpsc::Sender<Call>, req: Request) -> Response {
    let (rtx, rrx) = oneshot::channel();
    if tx.send((req, rtx)).await.is_err() {
        return Response::error("the daemon is shutting down");
    }
    rrx.await
        .unwrap_or_else(|_| Response::error("the daemon is shutting down"))
}

/// Where the metrics are served: `unix:PATH` or a loopback `ADDR:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
    Off,
}

pub fn parse_metrics(s: &str) -> Result<MetricsAddr, String> {
    if s == "none" || s == "off" {
        return Ok(MetricsAddr::Off);
    }
    if let Some(p) = s.strip_prefix("unix:") {
        if !p.starts_with('/') {
            return Err(format!("metrics `{s}`: the socket path must be absolute"));
        }
        return Ok(MetricsAddr::Unix(p.into()));
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!("metrics `{s}` is not `unix:/PATH`, a loopback `ADDR:PORT` (e.g. 127.0.0.1:9464) or `none`")
    })?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "metrics `{s}`: only a loopback address (127.0.0.1, [::1]) is allowed; lhb exposes nothing elsewhere"
        ));
    }
    Ok(MetricsAddr::Tcp(addr))
}

/// Serves `GET /metrics` at `addr`; each scrape asks the daemon for a fresh status.
pub async fn serve_metrics(addr: &MetricsAddr, tx: mpsc::Sender<Call>) -> anyhow::Result<()> {
    match addr {
        MetricsAddr::Off => {}
        MetricsAddr::Unix(path) => {
            let listener = bind_unix(path, "metrics socket")?;
            tokio::spawn(async move {
                loop {
                    if let Ok((c, _)) = listener.accept().await {
                        tokio::spawn(scrape(c, tx.clone()));
                    }
                }
            });
        }
        MetricsAddr::Tcp(a) => {
            let listener = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics address {a}"))?;
            tokio::spawn(async move {
                loop {
                    if let Ok((c, _)) = listener.accept().await {
                        tokio::spawn(scrape(c, tx.clone()));
                    }
                }
            });
        }
    }
    Ok(())
}

async fn scrape<S: AsyncRead + AsyncWrite + Unpin>(conn: S, tx: mpsc::Sender<Call>) {
    let mut reader = tokio::io::BufReader::new(conn);
    let mut request = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            if first {
                request = line.trim().to_string();
                first = false;
            }
            if line == "\r\n" || line == "\n" {
                return Some(());
            }
        }
    })
    .await;
    if !matches!(read, Ok(Some(()))) {
        return;
    }
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (code, body) = if !request.starts_with("GET ") {
        ("405 Method Not Allowed", "only GET\n".to_string())
    } else if path == "/metrics" || path == "/" {
        match ask(&tx, Request::Status).await {
            Response {
                status: Some(st), ..
            } => ("200 OK", st.prometheus()),
            r => (
                "503 Service Unavailable",
                r.error.unwrap_or_default() + "\n",
            ),
        }
    } else {
        ("404 Not Found", "try /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut conn = reader.into_inner();
    if conn.write_all(head.as_bytes()).await.is_ok() {
        let _ = conn.write_all(body.as_bytes()).await;
    }
    let _ = conn.shutdown().await;
}

/// The client side: one request to the daemon at `path`.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        anyhow::anyhow!(
            "no lhb daemon answers on {} ({e}): is it running (`systemctl status lhb`)? A daemon started with --control PATH needs the same --control here",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("the daemon closed the control connection without an answer");
    }
    serde_json::from_str(&answer).context("the daemon's answer")
}

pub fn remove_socket(path: &Path) {
    // Only ever a socket: whatever else is there now is not lhb's.
    if !std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        return;
    }
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!("removing {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_path_that_names_another_file_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("lhb-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lhb.toml");
        std::fs::write(&file, "[[expose]]\n").unwrap();
        let err = bind_unix(&file, "metrics socket").unwrap_err().to_string();
        assert!(err.contains("is not a socket"), "{err}");
        remove_socket(&file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "[[expose]]\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metrics_addresses_are_unix_or_loopback_only() {
        assert_eq!(
            parse_metrics("unix:/run/lhb/metrics.sock"),
            Ok(MetricsAddr::Unix("/run/lhb/metrics.sock".into()))
        );
        assert!(matches!(
            parse_metrics("127.0.0.1:9464"),
            Ok(MetricsAddr::Tcp(_))
        ));
        assert!(matches!(
            parse_metrics("[::1]:9464"),
            Ok(MetricsAddr::Tcp(_))
        ));
        assert!(
            parse_metrics("0.0.0.0:9464")
                .unwrap_err()
                .contains("loopback")
        );
        assert!(parse_metrics("10.0.0.1:9464").is_err());
        assert!(parse_metrics("unix:relative").is_err());
        assert_eq!(parse_metrics("none"), Ok(MetricsAddr::Off));
    }

    #[test]
    fn requests_are_tagged_json() {
        let r = Request::Expose {
            spec: "app:80".into(),
            iface: false,
            service: None,
            persist: true,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.contains("\"command\":\"expose\""), "{j}");
        assert!(matches!(
            serde_json::from_str::<Request>("{\"command\":\"status\"}").unwrap(),
            Request::Status
        ));
    }
}
