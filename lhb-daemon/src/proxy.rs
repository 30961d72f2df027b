//! The proxy data path, for where the kernel path cannot serve: a tokio listener per
//! (bridge, gateway, port), bound to the gateway address AND to the bridge device
//! (SO_BINDTODEVICE), so a packet for the gateway arriving on any other interface finds
//! no socket and is refused. A socket bound to an address alone would be reachable from
//! every interface that routes to it.
//!
//! Bytes move with splice(2) through one pipe per direction, never through user space.
//! A half-close on one side is passed on while the other direction keeps flowing; a
//! reset on either side resets the other. The number of connections is bounded.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};
use tracing::{debug, warn};

/// Where a listener sits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProxyKey {
    pub bridge: String,
    /// A re-created bridge (new ifindex) needs a new socket bound to it.
    pub ifindex: u32,
    pub gateway: IpAddr,
    pub port: u16,
}

/// Where its connections go, and which rule's counters they count on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    pub target: SocketAddr,
    pub slot: u32,
}

/// Proxy activity, per rule slot.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub bytes: AtomicU64,
    /// The target refused or could not be reached.
    pub target_errors: AtomicU64,
    /// Turned away because the connection limit was reached.
    pub over_limit: AtomicU64,
}

struct Listening {
    target: ProxyTarget,
    task: JoinHandle<()>,
}

pub struct Proxy {
    listeners: BTreeMap<ProxyKey, Listening>,
    limit: Arc<Semaphore>,
    max_connections: usize,
    backlog: i32,
    counters: Arc<std::sync::Mutex<BTreeMap<u32, Arc<ProxyCounters>>>>,
}

/// Bytes one splice call may move; also the pipe's size.
const CHUNK: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Proxy {
    pub fn new(max_connections: usize, backlog: i32) -> Proxy {
        Proxy {
            listeners: BTreeMap::new(),
            limit: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            backlog,
            counters: Default::default(),
        }
    }

    /// Listens for `key` and forwards to `target`.
    pub fn listen(&mut self, key: &ProxyKey, target: ProxyTarget) -> io::Result<()> {
        if self.listeners.get(key).map(|l| l.target) == Some(target) {
            return Ok(());
        }
        self.close(key);
        let listener = bind(key, self.backlog)?;
        let counters = self.counters_for(target.slot);
        let limit = self.limit.clone();
        let max = self.max_connections;
        let label = format!("{}:{}@{}", key.gateway, key.port, key.bridge);
        let task = tokio::spawn(accept_loop(
            listener,
            target.target,
            limit,
            max,
            counters,
            label,
        ));
        self.listeners
            .insert(key.clone(), Listening { target, task });
        Ok(())
    }

    /// Stops listening on `key`; connections already established carry on.
    pub fn close(&mut self, key: &ProxyKey) {
        if let Some(l) = self.listeners.remove(key) {
            l.task.abort();
        }
    }

    fn counters_for(&self, slot: u32) -> Arc<ProxyCounters> {
        let mut map = match self.counters.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(slot).or_default().clone()
    }

    /// The counters of a rule slot (zero if it never proxied).
    pub fn counters(&self, slot: u32) -> Arc<ProxyCounters> {
        self.counters_for(slot)
    }

    pub fn shutdown(&mut self) {
        let keys: Vec<ProxyKey> = self.listeners.keys().cloned().collect();
        for k in keys {
            self.close(&k);
        }
    }
}

/// A listening socket on gateway:port that only the bridge's packets can reach.
fn bind(key: &ProxyKey, backlog: i32) -> io::Result<TcpListener> {
    let addr = SocketAddr::new(key.gateway, key.port);
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if key.gateway.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind_device(Some(key.bridge.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("binding to device {}: {e}", key.bridge)))?;
    sock.bind(&addr.into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            if e.kind() == io::ErrorKind::AddrInUse {
                format!(
                    "{addr} is already in use by another program on {}",
                    key.bridge
                )
            } else {
                format!("binding {addr}: {e}")
            },
        )
    })?;
    sock.listen(backlog)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    limit: Arc<Semaphore>,
    max: usize,
    counters: Arc<ProxyCounters>,
    label: String,
) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(listener = %label, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            let n = counters.over_limit.fetch_add(1, Ordering::Relaxed);
            // One line per power of two: visible, but never a flood.
            if n.is_power_of_two() || n == 0 {
                warn!(listener = %label, "connection limit ({max}) reached: refusing {peer} ({} refused so far)", n + 1);
            }
            reset(&client);
            continue;
        };
        let counters = counters.clone();
        tokio::spawn(async move {
            counters.connections.fetch_add(1, Ordering::Relaxed);
            counters.active.fetch_add(1, Ordering::Relaxed);
            let r = serve(client, target, &counters).await;
            counters.active.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = r {
                debug!("{peer} -> {target}: {e}");
            }
            drop(permit);
        });
    }
}

async fn serve(client: TcpStream, target: SocketAddr, counters: &ProxyCounters) -> io::Result<()> {
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            counters.target_errors.fetch_add(1, Ordering::Relaxed);
            // The container sees what it would see from the service itself: a reset.
            reset(&client);
            return Err(e);
        }
        Err(_) => {
            counters.target_errors.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connecting to the target",
            ));
        }
    };
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let up = pump(&client, &upstream);
    let down = pump(&upstream, &client);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let result = loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(n) => { counters.bytes.fetch_add(n, Ordering::Relaxed); up_done = true; }
                Err(e) => break Err(e),
            },
            r = &mut down, if !down_done => match r {
                Ok(n) => { counters.bytes.fetch_add(n, Ordering::Relaxed); down_done = true; }
                Err(e) => break Err(e),
            },
        }
        if up_done && down_done {
            break Ok(());
        }
    };
    if result.is_err() {
        // A reset (or any failure) on one side resets the other.
        reset(&client);
        reset(&upstream);
    }
    result
}

/// Closing with SO_LINGER 0 sends a RST instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 fills two valid fds on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned here.
        let pipe = unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A bigger pipe moves more per call; the default 64 KiB also works.
        // SAFETY: plain fcntl on a valid fd.
        unsafe { libc::fcntl(pipe.w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two valid fds with null offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let pipe = Pipe::new()?;
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN can only mean the socket has nothing.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.w.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // SAFETY: shutdown on a valid socket fd.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}
