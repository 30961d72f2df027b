//! The control socket (default /run/lhb/lhb.sock, mode 0600): `lhb status`, `lhb expose`
//! and `lhb unexpose` talk to the running daemon through it, one JSON request and one
//! JSON response per connection. Also the metrics endpoint (Prometheus text over HTTP, on
//! a Unix socket or a loopback TCP address), which asks the daemon the same way.

use crate::host::tasks::Tasks;
use std::os::unix::fs::FileTypeExt as _;
use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{
        AsyncBufRead, AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite,
        AsyncWriteExt as _,
    },
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::api::status::Status;

pub use crate::model::config::{DEFAULT_CONTROL, MetricsAddr, parse_metrics};

/// The metrics socket of a daemon whose control socket is `control`: `metrics.sock`
/// beside the default `lhb.sock`, else `NAME-metrics.sock` beside `NAME.sock`, so two
/// daemons whose control sockets share a directory do not share a metrics socket.
pub fn default_metrics_socket(control: &Path) -> PathBuf {
    let stem = control
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("lhb");
    if stem == "lhb" {
        control.with_file_name("metrics.sock")
    } else {
        control.with_file_name(format!("{stem}-metrics.sock"))
    }
}

/// The longest control request: a spec and a service name fit in far less.
pub const MAX_CONTROL_REQUEST: usize = 16 * 1024;
/// The longest metrics request head (request line and headers together).
const MAX_METRICS_REQUEST: usize = 8 * 1024;
/// The whole request must arrive within this: a client that trickles bytes holds a
/// slot for at most this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests served at once, per endpoint; more are answered "busy" at once rather than
/// queued, so a local user opening connections in a loop costs lhb nothing lasting.
const CONCURRENT_REQUESTS: usize = 16;

/// Requests refused, process-wide (every endpoint counts here): malformed, too large,
/// too slow, or over the concurrency limit.
pub static BAD_REQUESTS: AtomicU64 = AtomicU64::new(0);
pub static BUSY_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Why a request was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    TooLarge(usize),
    TimedOut,
    Closed,
    Invalid(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooLarge(max) => write!(f, "request larger than {max} bytes"),
            ReadError::TimedOut => write!(
                f,
                "request not complete within {}s",
                REQUEST_TIMEOUT.as_secs()
            ),
            ReadError::Closed => write!(f, "connection closed before a whole request"),
            ReadError::Invalid(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one `\n`-terminated line of at most `max` bytes.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<String, ReadError> {
    let mut buf = Vec::new();
    let n = r
        .take(max as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| ReadError::Invalid(e.to_string()))?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n > max {
            ReadError::TooLarge(max)
        } else {
            ReadError::Closed
        });
    }
    String::from_utf8(buf).map_err(|_| ReadError::Invalid("request is not UTF-8".into()))
}

/// One endpoint's slots; a connection that gets none is answered "busy".
#[derive(Clone)]
struct Slots(Arc<Semaphore>);

impl Slots {
    fn new() -> Slots {
        Slots(Arc::new(Semaphore::new(CONCURRENT_REQUESTS)))
    }

    fn take(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let p = self.0.clone().try_acquire_owned().ok();
        if p.is_none() {
            BUSY_REQUESTS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

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
    /// Re-read the config file, as SIGHUP does, and answer whether it loaded.
    Reload,
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
pub fn serve(path: &Path, tx: mpsc::Sender<Call>, tasks: &Tasks) -> anyhow::Result<()> {
    let listener = bind_unix(path, "control socket")?;
    let slots = Slots::new();
    let each = tasks.clone();
    tasks.spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                // EMFILE: do not spin; the connection waits in the backlog.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let tx = tx.clone();
            let permit = slots.take();
            each.spawn(async move {
                if let Err(e) = handle_control(conn, tx, permit).await {
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
                "{what} {} answers: another lhb is running (stop it, or give this one a --control PATH {})",
                path.display(),
                if what == "metrics socket" {
                    "of another name, whose metrics socket is named after it, or a `metrics` address of its own"
                } else {
                    "of its own"
                }
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale {what} {}", path.display()))?;
    }
    // Created 0600 from the start: no window in which others could connect. The umask
    // is process-wide; the sockets are bound at start, before any task creates files.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.with_context(|| format!("binding the {what} {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn handle_control(
    conn: tokio::net::UnixStream,
    tx: mpsc::Sender<Call>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> anyhow::Result<()> {
    let (r, mut w) = conn.into_split();
    let resp = if permit.is_none() {
        Response::error(format!(
            "busy: {CONCURRENT_REQUESTS} control requests already in progress; try again"
        ))
    } else {
        let mut r = tokio::io::BufReader::new(r);
        let line = tokio::time::timeout(
            REQUEST_TIMEOUT,
            read_line_bounded(&mut r, MAX_CONTROL_REQUEST),
        )
        .await
        .unwrap_or(Err(ReadError::TimedOut))
        .and_then(|l| {
            serde_json::from_str::<Request>(&l).map_err(|e| ReadError::Invalid(e.to_string()))
        });
        match line {
            Ok(req) => ask(&tx, req).await,
            // A connect-and-close (a liveness check, another lhb looking for this one)
            // is no bad request, and there is no one to answer.
            Err(ReadError::Closed) => return Ok(()),
            Err(e) => {
                BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
                Response::error(format!("bad request: {e}"))
            }
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    // Freed before the end of the answer: see `scrape`.
    drop(permit);
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

/// Serves `GET /metrics` at `addr`; each scrape asks the daemon for a fresh status.
pub async fn serve_metrics(
    addr: &MetricsAddr,
    tx: mpsc::Sender<Call>,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    let each = tasks.clone();
    match addr {
        MetricsAddr::Off => {}
        MetricsAddr::Unix(path) => {
            let listener = bind_unix(path, "metrics socket")?;
            let slots = Slots::new();
            tasks.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((c, _)) => {
                            each.spawn(scrape(c, tx.clone(), slots.take()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
        }
        MetricsAddr::Tcp(a) => {
            let listener = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics address {a}"))?;
            let slots = Slots::new();
            tasks.spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((c, _)) => {
                            each.spawn(scrape(c, tx.clone(), slots.take()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            });
        }
    }
    Ok(())
}

async fn scrape<S: AsyncRead + AsyncWrite + Unpin>(
    conn: S,
    tx: mpsc::Sender<Call>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut reader = tokio::io::BufReader::new(conn);
    let head = if permit.is_none() {
        Err(None)
    } else {
        tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut reader))
            .await
            .unwrap_or(Err(ReadError::TimedOut))
            .map_err(Some)
    };
    let (code, body) = match head {
        Err(None) => (
            "503 Service Unavailable",
            format!("busy: {CONCURRENT_REQUESTS} scrapes already in progress\n"),
        ),
        Err(Some(ReadError::Closed)) => return,
        Err(Some(e)) => {
            BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
            let code = match e {
                ReadError::TooLarge(_) => "431 Request Header Fields Too Large",
                ReadError::TimedOut => "408 Request Timeout",
                _ => "400 Bad Request",
            };
            (code, format!("{e}\n"))
        }
        Ok(request) => answer(&request, &tx).await,
    };
    let head = format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut conn = reader.into_inner();
    let write = async {
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await
    };
    // A scraper that does not read its answer holds its slot no longer than a slow sender.
    let written = tokio::time::timeout(REQUEST_TIMEOUT, write).await;
    // Freed before the end of the answer goes out: a client that has read all of it
    // finds the slot free (a CI run saw the next connection refused "busy" otherwise).
    drop(permit);
    if matches!(written, Ok(Ok(()))) {
        let _ = conn.shutdown().await;
    }
}

/// Reads an HTTP request head (request line and headers, up to the blank line), at most
/// [`MAX_METRICS_REQUEST`] bytes in all, and returns the request line.
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<String, ReadError> {
    let mut left = MAX_METRICS_REQUEST;
    let mut request = None;
    loop {
        let line = read_line_bounded(r, left).await.map_err(|e| match e {
            ReadError::TooLarge(_) => ReadError::TooLarge(MAX_METRICS_REQUEST),
            e => e,
        })?;
        left -= line.len();
        if line == "\r\n" || line == "\n" {
            return request.ok_or(ReadError::Invalid("no request line".into()));
        }
        request.get_or_insert_with(|| line.trim().to_string());
    }
}

async fn answer(request: &str, tx: &mpsc::Sender<Call>) -> (&'static str, String) {
    let mut words = request.split(' ');
    let (method, path, version) = (words.next(), words.next(), words.next());
    if words.next().is_some() || !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
        return ("400 Bad Request", "not an HTTP/1.x request line\n".into());
    }
    if method != Some("GET") {
        return ("405 Method Not Allowed", "only GET\n".into());
    }
    if !matches!(path, Some("/metrics" | "/")) {
        return ("404 Not Found", "try /metrics\n".into());
    }
    match ask(tx, Request::Status).await {
        Response {
            status: Some(st), ..
        } => ("200 OK", st.prometheus()),
        r => (
            "503 Service Unavailable",
            r.error.unwrap_or_default() + "\n",
        ),
    }
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

    #[tokio::test]
    async fn requests_are_read_within_bounds() {
        let mut ok: &[u8] = b"{\"command\":\"status\"}\nrest";
        assert_eq!(
            read_line_bounded(&mut ok, 64).await.unwrap(),
            "{\"command\":\"status\"}\n"
        );
        let long = [b'a'; 100];
        assert_eq!(
            read_line_bounded(&mut &long[..], 64).await,
            Err(ReadError::TooLarge(64))
        );
        assert_eq!(
            read_line_bounded(&mut &b"no newline"[..], 64).await,
            Err(ReadError::Closed)
        );
        assert_eq!(
            read_line_bounded(&mut &b"\xff\xfe\n"[..], 64).await,
            Err(ReadError::Invalid("request is not UTF-8".into()))
        );
        let mut head: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(read_head(&mut head).await.unwrap(), "GET /metrics HTTP/1.1");
        let mut endless = "X-A: b\r\n".repeat(2000);
        endless.insert_str(0, "GET / HTTP/1.1\r\n");
        assert_eq!(
            read_head(&mut endless.as_bytes()).await,
            Err(ReadError::TooLarge(MAX_METRICS_REQUEST))
        );
    }

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

    /// Two daemons with control sockets in one directory get metrics sockets of their
    /// own (they collided on metrics.sock, and the error told the second to choose the
    /// --control PATH it already had).
    #[test]
    fn the_metrics_socket_is_named_after_the_control_socket() {
        let m = |c: &str| default_metrics_socket(Path::new(c));
        assert_eq!(
            m("/run/lhb/lhb.sock"),
            PathBuf::from("/run/lhb/metrics.sock")
        );
        assert_eq!(m("/tmp/a.sock"), PathBuf::from("/tmp/a-metrics.sock"));
        assert_eq!(m("/tmp/b.sock"), PathBuf::from("/tmp/b-metrics.sock"));
        assert_eq!(m("/tmp/ctl"), PathBuf::from("/tmp/ctl-metrics.sock"));
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
