//! The proxy data path, for where the kernel path cannot serve: a tokio listener per
//! (bridge, gateway, port), bound to the gateway address AND to the bridge device
//! ([`crate::datapath::gateway`]), so a packet for the gateway arriving on any other
//! interface finds no socket and is refused. A socket bound to an address alone would be
//! reachable from every interface that routes to it.
//!
//! Bytes move with splice(2) through one pipe per direction, never through user space.
//! Pipes left empty by a finished connection are kept for the next ones ([`PipePool`]):
//! creating and sizing two per connection was a fifth of its system calls.
//! A half-close on one side is passed on while the other direction keeps flowing. A
//! reset is passed on only after everything received before it was delivered: a
//! service that replies and resets still gets its reply to the client. The number of
//! connections is bounded, per rule and in total.
//!
//! The service must never take a container for a local process: connections to an
//! IPv4 target come from a loopback address of the bridge's own
//! ([`crate::datapath::gateway::loopback_source`],
//! in 127.128.0.0/9), never 127.0.0.1, so `127.0.0.1/32 trust` rules and "localhost
//! only" checks do not match them. IPv6 has one loopback address: a `[::1]` target sees
//! `::1`. A rule with `proxy_protocol` sends a PROXY v2 header with the container's
//! address first.
//!
//! Order across connections: the proxy runs on one thread of its own with a FIFO
//! scheduler ([`ProxyRuntime`]), so bytes that reached the proxy first on one
//! connection are passed on before bytes that reached it later on another, as a direct
//! connection delivers them. A client that writes EXEC on one connection and then LPUSH
//! on a second relies on that; on the daemon's two-worker runtime (whose LIFO slot runs
//! the last task woken first, and whose second worker runs tasks in parallel) the later
//! write overtook the earlier one in a quarter of the tries under load (Redis's own test
//! suite, "BRPOPLPUSH does not affect WATCH while still blocked").

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    datapath::{clients::Clients, gateway},
    host::{self, tasks::Tasks},
    model::scope::Scopes,
};
use rustix::{
    net::{RecvFlags, SendFlags},
    pipe::{PipeFlags, SpliceFlags},
};

use tokio::{
    io::Interest,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinHandle,
};
use tracing::{debug, warn};

pub use crate::reconcile::{GatewayKey, ProxyTarget};

/// What the service sees as the client of a connection proxied for bridge `ifindex`.
pub fn seen_as(ifindex: u32, target: &ProxyTarget) -> String {
    let from = gateway::seen_as(ifindex, target.target);
    if target.proxy_protocol {
        format!("{from}, with the container's address in a PROXY v2 header")
    } else {
        from
    }
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
    /// The most connections this rule may hold at once (its share of the total).
    pub limit: AtomicU64,
    /// accept(2) failures (EMFILE and friends).
    pub accept_errors: AtomicU64,
    /// Connections from a client a scoped rule does not admit: reset at once, the
    /// service never sees them.
    pub refused: AtomicU64,
}

struct Listening {
    target: ProxyTarget,
    task: JoinHandle<()>,
}

pub struct Proxy {
    runtime: ProxyRuntime,
    listeners: BTreeMap<GatewayKey, Listening>,
    limit: Arc<Semaphore>,
    max_connections: usize,
    backlog: i32,
    counters: Arc<parking_lot::Mutex<BTreeMap<u32, Arc<ProxyCounters>>>>,
    pipes: Arc<PipePool>,
    tasks: Tasks,
    scopes: Scopes,
    clients: Clients,
}

/// Bytes one splice call may move; also the pipe's size.
const CHUNK: usize = 1 << 20;
/// A read this long or longer is a bulk transfer, spliced; shorter ones are copied.
const COPY_BUF: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;
/// File descriptors one proxied connection holds: two sockets and two pipes.
pub const FDS_PER_CONNECTION: u64 = 6;
/// Empty pipes kept between connections, at most.
const POOLED_PIPES: usize = 64;
/// File descriptors kept for everything else (control and metrics clients, netlink,
/// BPF objects, firewall tools' pipes, listeners) and the pooled pipes.
pub const FD_RESERVE: u64 = 256 + 2 * POOLED_PIPES as u64;
/// A client that acknowledges nothing for this long is reset with its queue unsent.
const DRAIN_STALL: Duration = Duration::from_secs(5);

/// The proxy's own single-threaded runtime (see the module header for why), on a
/// thread that lives as long as the [`Proxy`]. Dropping it stops the runtime, which
/// drops every task still on it.
struct ProxyRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProxyRuntime {
    fn start() -> io::Result<ProxyRuntime> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("lhb-proxy".into())
            .spawn(move || {
                // A dropped sender ends it too: the runtime never outlives the Proxy.
                let _ = runtime.block_on(stopped);
            })?;
        Ok(ProxyRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ProxyRuntime {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Proxy {
    pub fn new(
        max_connections: usize,
        backlog: i32,
        tasks: Tasks,
        clients: Clients,
    ) -> io::Result<Proxy> {
        Ok(Proxy {
            runtime: ProxyRuntime::start()?,
            listeners: BTreeMap::new(),
            limit: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            backlog,
            counters: Default::default(),
            pipes: Arc::new(PipePool::default()),
            tasks,
            scopes: Scopes::default(),
            clients,
        })
    }

    /// Listens for `key` and forwards to `target`.
    pub fn listen(&mut self, key: &GatewayKey, target: ProxyTarget) -> io::Result<()> {
        if self.listeners.get(key).map(|l| l.target) == Some(target) {
            return Ok(());
        }
        self.close(key);
        let listener = bind(key, self.backlog)?;
        let counters = self.counters_for(target.slot);
        let limit = self.limit.clone();
        let max = self.max_connections;
        let label = format!("{}:{}@{}", key.gateway, key.port, key.bridge);
        let upstream = Upstream {
            target: target.target,
            source: gateway::upstream_source(key.ifindex, target.target),
            proxy_protocol: target.proxy_protocol,
        };
        let conns = self.tasks.clone();
        let task = self.tasks.spawn_on(
            &self.runtime.handle,
            accept_loop(
                listener,
                Admission {
                    scopes: self.scopes.clone(),
                    clients: self.clients.clone(),
                    slot: target.slot,
                },
                upstream,
                limit,
                max,
                counters,
                label,
                conns,
                self.pipes.clone(),
            ),
        );
        self.listeners
            .insert(key.clone(), Listening { target, task });
        Ok(())
    }

    /// Stops listening on `key`; connections already established carry on.
    pub fn close(&mut self, key: &GatewayKey) {
        if let Some(l) = self.listeners.remove(key) {
            l.task.abort();
        }
    }

    fn counters_for(&self, slot: u32) -> Arc<ProxyCounters> {
        self.counters.lock().entry(slot).or_default().clone()
    }

    /// Who each scoped rule admits from now on (connections already carried stay).
    pub fn set_scopes(&self, scopes: BTreeMap<u32, crate::model::scope::AllowSet>) {
        self.scopes.set(scopes);
    }

    /// The counters of a rule slot (zero if it never proxied).
    pub fn counters(&self, slot: u32) -> Arc<ProxyCounters> {
        self.counters_for(slot)
    }

    /// The total every rule shares.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }
}

impl gateway::GatewaySockets for Proxy {
    type Target = ProxyTarget;
    const PATH: &'static str = "proxy";

    fn open(&mut self, key: &GatewayKey, target: ProxyTarget) -> io::Result<()> {
        self.listen(key, target)
    }

    fn close(&mut self, key: &GatewayKey) {
        Proxy::close(self, key)
    }

    fn keys(&self) -> Vec<GatewayKey> {
        self.listeners.keys().cloned().collect()
    }

    /// One container cannot take the connections of every other rule.
    fn set_limit(&self, slot: u32, limit: usize) {
        self.counters_for(slot)
            .limit
            .store(limit as u64, Ordering::Relaxed);
    }

    fn target(t: &ProxyTarget) -> SocketAddr {
        t.target
    }

    fn seen_as(key: &GatewayKey, t: &ProxyTarget) -> String {
        seen_as(key.ifindex, t)
    }
}

/// A listening socket on gateway:port that only the bridge's packets can reach. It is
/// registered with the proxy's runtime by `accept_loop`, on that runtime's thread.
fn bind(key: &GatewayKey, backlog: i32) -> io::Result<std::net::TcpListener> {
    let sock = gateway::bind(key, gateway::Kind::Tcp, |sock| {
        sock.set_reuse_address(true)?;
        // Accepted sockets inherit keepalive with its timers, and TCP_NODELAY: set once
        // here, not per connection.
        sock.set_tcp_keepalive(&keepalive())?;
        sock.set_tcp_nodelay(true)
    })?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// How the proxy reaches the service for one listener.
#[derive(Clone, Copy, Debug)]
struct Upstream {
    target: SocketAddr,
    /// Bound before connecting; None: the kernel's choice (::1 for [::1]).
    source: Option<IpAddr>,
    proxy_protocol: bool,
}

/// Whose connections a listener takes (its rule's scope), and who came.
struct Admission {
    scopes: Scopes,
    clients: Clients,
    slot: u32,
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: std::net::TcpListener,
    admission: Admission,
    upstream: Upstream,
    limit: Arc<Semaphore>,
    max: usize,
    counters: Arc<ProxyCounters>,
    label: String,
    conns: Tasks,
    pipes: Arc<PipePool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(listener = %label, "registering the listener with the proxy's runtime: {e}");
            return;
        }
    };
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: the connection waits in the backlog; back off
                // instead of spinning, and say so once per power of two.
                let n = counters.accept_errors.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() || n == 0 {
                    warn!(listener = %label, "accept: {e} ({} time(s) so far); retrying", n + 1);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Before any limit: a client the rule does not admit takes no share of it.
        // The daemon logs refused clients, rate-limited, from the client table.
        if !admission.scopes.allows(admission.slot, peer.ip()) {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            admission.clients.refused(admission.slot, peer.ip());
            reset(&client);
            continue;
        }
        // The rule's share first, then the total: a slot is taken only if both allow.
        let share = counters.limit.load(Ordering::Relaxed);
        let reserved = counters
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |a| {
                (share == 0 || a < share).then_some(a + 1)
            })
            .is_ok();
        let permit = if reserved {
            limit.clone().try_acquire_owned().ok()
        } else {
            None
        };
        let Some(permit) = permit else {
            if reserved {
                counters.active.fetch_sub(1, Ordering::Relaxed);
            }
            let n = counters.over_limit.fetch_add(1, Ordering::Relaxed);
            // One line per power of two: visible, but never a flood.
            if n.is_power_of_two() || n == 0 {
                let which = if reserved || share >= max as u64 {
                    format!("the proxy's connection limit ({max})")
                } else {
                    format!("this rule's share of connections ({share})")
                };
                warn!(listener = %label, "{which} reached: refusing {peer} ({} refused so far)", n + 1);
            }
            reset(&client);
            continue;
        };
        admission.clients.connected(admission.slot, peer.ip());
        let counters = counters.clone();
        let pipes = pipes.clone();
        conns.spawn(async move {
            counters.connections.fetch_add(1, Ordering::Relaxed);
            let r = serve(client, upstream, &counters, &pipes).await;
            counters.active.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = r {
                debug!("{peer} -> {}: {e}", upstream.target);
            }
            drop(permit);
        });
    }
}

/// Connects to the service from `up.source`, and writes the PROXY header if asked.
async fn connect(up: Upstream, client: &TcpStream) -> io::Result<TcpStream> {
    let sock = match up.target {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(src) = up.source {
        // The port is chosen at connect(), per destination, instead of reserving one
        // of this source's ports for every destination at bind().
        host::sockopt::set(
            &sock,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &1 as &libc::c_int,
        )?;
        sock.bind(SocketAddr::new(src, 0))?;
    }
    // Before connect: the SYN and the first bytes go out as they will for the rest.
    sock.set_nodelay(true)?;
    let mut s = sock.connect(up.target).await?;
    if up.proxy_protocol {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client.peer_addr()?, client.local_addr()?),
        )
        .build()?;
        tokio::io::AsyncWriteExt::write_all(&mut s, &header).await?;
    }
    Ok(s)
}

async fn serve(
    client: TcpStream,
    up: Upstream,
    counters: &ProxyCounters,
    pipes: &PipePool,
) -> io::Result<()> {
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, connect(up, &client)).await {
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
    // TCP_NODELAY and keepalive on the client side come from the listener (see
    // `bind`). The upstream side needs no keepalive: the service is on loopback, so
    // its end can never vanish without the kernel closing it.
    let up = pump(&client, &upstream, pipes);
    let down = pump(&upstream, &client, pipes);
    tokio::pin!(up, down);
    let (mut up_end, mut down_end) = (None, None);
    // Both directions run to their own end: an error in one never discards what the
    // other has received. Only a client that is gone ends everything at once, since
    // nothing can reach it any more.
    while up_end.is_none() || down_end.is_none() {
        // Which direction ended, and how.
        let (from_client, r) = tokio::select! {
            r = &mut up, if up_end.is_none() => (true, r),
            r = &mut down, if down_end.is_none() => (false, r),
        };
        counters.bytes.fetch_add(r.bytes, Ordering::Relaxed);
        // The client reset (everything it sent is forwarded) or cannot be written to:
        // the service sees the reset at once.
        let client_gone = match &r.end {
            End::ReadFailed(_) => from_client,
            End::WriteFailed(_) => !from_client,
            End::Eof => false,
        };
        if client_gone {
            reset(&upstream);
            reset(&client);
            return Err(r.end.into_error());
        }
        let (this, other, to) = if from_client {
            (&mut up_end, &down_end, &upstream)
        } else {
            (&mut down_end, &up_end, &client)
        };
        // The source's close is passed on at once, unless the other direction has
        // closed too: then dropping the sockets, a moment from now, sends both FINs,
        // one system call fewer for every connection.
        if matches!(r.end, End::Eof) && !matches!(other, Some(End::Eof)) {
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
        }
        *this = Some(r.end);
        if matches!(down_end, Some(End::ReadFailed(_))) {
            // The service reset after its last bytes: those are in the client's send
            // queue; the reset is passed on once they are delivered.
            break;
        }
    }
    let failed = [up_end, down_end]
        .into_iter()
        .flatten()
        .find(|e| !matches!(e, End::Eof));
    match failed {
        None => Ok(()),
        Some(e) => {
            drain_then_reset(&client).await;
            reset(&upstream);
            Err(e.into_error())
        }
    }
}

/// How one direction ended.
enum End {
    /// The source closed (`serve` passes the close on).
    Eof,
    /// Reading the source failed (a reset): every byte read before was delivered.
    ReadFailed(io::Error),
    /// Writing to the destination failed: it is gone.
    WriteFailed(io::Error),
}

impl End {
    fn into_error(self) -> io::Error {
        match self {
            End::Eof => io::Error::other("closed"),
            End::ReadFailed(e) | End::WriteFailed(e) => e,
        }
    }
}

struct Pumped {
    bytes: u64,
    end: End,
}

/// A peer that vanished (a container killed, a host gone) frees its slot after about
/// two minutes instead of holding it for ever.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES)
}

/// Closing with SO_LINGER 0 sends a RST instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// A reset discards the send queue, so the bytes still queued for the client go out
/// first; a client that stops acknowledging is reset after [`DRAIN_STALL`] anyway.
async fn drain_then_reset(s: &TcpStream) {
    let mut last = usize::MAX;
    let mut since = tokio::time::Instant::now();
    loop {
        let queued = unsent(s);
        if queued == 0 {
            break;
        }
        if queued < last {
            last = queued;
            since = tokio::time::Instant::now();
        } else if since.elapsed() > DRAIN_STALL {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reset(s);
}

/// Bytes in the socket's send queue not yet acknowledged by the peer. SIOCOUTQ through
/// libc: neither socket2 nor rustix wraps it.
fn unsent(s: &TcpStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the valid pointer.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) } != 0 {
        return 0;
    }
    n.max(0) as usize
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Empty pipes, for the next connections. Only a pipe known to be empty comes back: one
/// whose connection ended with bytes in it is closed instead.
#[derive(Default)]
struct PipePool {
    free: parking_lot::Mutex<Vec<Pipe>>,
}

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        let pooled = self.free.lock().pop();
        match pooled {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    fn give_back(&self, pipe: Pipe) {
        let mut free = self.free.lock();
        if free.len() < POOLED_PIPES {
            free.push(pipe);
        }
    }
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A bigger pipe moves more per call; the default 64 KiB also works.
        let _ = rustix::pipe::fcntl_setpipe_size(&w, CHUNK);
        Ok(Pipe { r, w })
    }
}

fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    Ok(rustix::pipe::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFlags::MOVE | SpliceFlags::NONBLOCK,
    )?)
}

/// Moves bytes from `from` to `to` until `from` ends. Whatever was read is written
/// before the next read, so a read error loses nothing (and leaves the pipe empty, for
/// the pool).
///
/// Short messages (requests, replies, a database's rows) are copied through a small
/// buffer: for a few hundred bytes, recv and send cost less than splicing through a
/// pipe, and need no pipe at all. A read that fills the buffer means a bulk transfer:
/// from then on the direction splices, until a read comes back short again.
async fn pump(from: &TcpStream, to: &TcpStream, pipes: &PipePool) -> Pumped {
    let mut buf = [0u8; COPY_BUF];
    let mut pipe: Option<Pipe> = None;
    let mut bytes = 0u64;
    let end = 'pumping: loop {
        // A pipe is empty here, so EAGAIN can only mean the socket has nothing.
        let read = match &pipe {
            Some(p) => when_ready(from, Interest::READABLE, || splice(from, &p.w, CHUNK)).await,
            None => {
                when_ready(from, Interest::READABLE, || {
                    Ok(rustix::net::recv(from, &mut buf, RecvFlags::empty())?.0)
                })
                .await
            }
        };
        let n = match read {
            Ok(0) => break End::Eof,
            Ok(n) => n,
            Err(e) => break End::ReadFailed(e),
        };
        let mut done = 0;
        while done < n {
            let wrote = match &pipe {
                Some(p) => when_ready(to, Interest::WRITABLE, || splice(&p.r, to, n - done)).await,
                None => {
                    when_ready(to, Interest::WRITABLE, || {
                        Ok(rustix::net::send(to, &buf[done..n], SendFlags::NOSIGNAL)?)
                    })
                    .await
                }
            };
            match wrote {
                Ok(m) => done += m,
                Err(e) => {
                    // Bytes left in the pipe: it cannot go back to the pool.
                    pipe = None;
                    break 'pumping End::WriteFailed(e);
                }
            }
        }
        bytes += n as u64;
        match (&pipe, n) {
            (None, n) if n == COPY_BUF => match pipes.take() {
                Ok(p) => pipe = Some(p),
                // No pipe to be had (fds exhausted): copying still works.
                Err(e) => debug!("no pipe for a bulk transfer, copying: {e}"),
            },
            (Some(_), n) if n < COPY_BUF => {
                if let Some(p) = pipe.take() {
                    pipes.give_back(p);
                }
            }
            _ => {}
        }
    };
    if let Some(p) = pipe {
        pipes.give_back(p);
    }
    Pumped { bytes, end }
}

/// Runs `op` on `s` once `s` is ready for it, again each time it would block.
async fn when_ready<T>(
    s: &TcpStream,
    interest: Interest,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    loop {
        s.ready(interest).await?;
        match s.try_io(interest, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}
