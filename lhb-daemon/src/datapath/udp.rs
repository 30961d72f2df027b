//! The UDP forwarder: a rule's UDP side (`PORT/udp`, `PORT/both`). Per (bridge, gateway,
//! port) one socket bound to the gateway address AND to the bridge device, like the TCP
//! proxy's listeners: a datagram for the gateway arriving on any other interface finds
//! no socket (the kernel answers it with ICMP port unreachable, as for any closed port).
//!
//! Why not the kernel path: sk_lookup could hand a datagram for GATEWAY:53 to a socket
//! bound to 127.0.0.53:53, but an unconnected UDP service answers from the address it is
//! bound to, so the answer would leave toward the container with a loopback source and
//! be dropped as a martian. TCP works there because an accepted socket's local address is
//! the one the SYN was sent to; UDP has no accepted socket.
//!
//! Each container address and port is a flow: a socket connected from the bridge's
//! loopback source ([`crate::datapath::gateway::loopback_source`], never 127.0.0.1) to the
//! target,
//! so the service's answers come back on that socket alone and go to that container,
//! sent from the gateway socket (source GATEWAY:PORT, what the container asked). A flow
//! idle for the idle timeout is closed. Flows are bounded per rule and in total; a
//! datagram that would open one more is dropped, counted and logged.
//!
//! A service that is down: the flow's socket gets ECONNREFUSED (the ICMP port unreachable
//! of the loopback), and the forwarder answers the container with an ICMP port
//! unreachable of its own, quoting the container's datagram, so a resolver fails over at
//! once instead of timing out. That takes a raw socket (CAP_NET_RAW); without it the
//! datagram is only counted.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::UdpSocket, task::JoinHandle, time::Instant};
use tracing::{debug, warn};

use crate::{
    datapath::{
        clients::Clients,
        gateway::{self, GatewayKey},
    },
    host::{sockopt, tasks::Tasks},
    model::scope::Scopes,
};

pub use crate::reconcile::UdpTarget;

/// Forwarder activity, per rule slot.
#[derive(Debug, Default)]
pub struct UdpCounters {
    /// Flows opened.
    pub flows: AtomicU64,
    /// Flows open now.
    pub active: AtomicU64,
    /// Datagrams from containers passed to the service.
    pub datagrams_in: AtomicU64,
    /// Datagrams from the service passed to containers.
    pub datagrams_out: AtomicU64,
    /// Payload bytes, both ways.
    pub bytes: AtomicU64,
    /// The service refused (nothing listening): answered with ICMP port unreachable.
    pub target_errors: AtomicU64,
    /// Datagrams that would have opened a flow over the rule's share or the total.
    pub over_limit: AtomicU64,
    /// Datagrams lost in lhb: a socket buffer full, or a send that failed.
    pub dropped: AtomicU64,
    /// The most flows this rule may hold at once (its share of the total).
    pub limit: AtomicU64,
    /// Datagrams from a client a scoped rule does not admit: answered with ICMP port
    /// unreachable, never passed on.
    pub refused: AtomicU64,
}

/// The largest datagram: an IPv4 UDP payload can be 65,507 bytes, IPv6 (without
/// jumbograms) 65,527.
const MAX_DATAGRAM: usize = 65_535;

/// Default idle timeout of a flow: a DNS query and its answer, a StatsD burst, a syslog
/// stream with pauses; short enough that a container's ephemeral ports do not pile up.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(30);

/// Default bound on flows over all rules; each flow holds one file descriptor.
pub const DEFAULT_MAX_FLOWS: usize = 1024;

struct Bound {
    target: UdpTarget,
    serving: Arc<Serving>,
    task: JoinHandle<()>,
}

/// What every socket of the forwarder shares.
struct Shared {
    /// Flows open over all rules.
    total: AtomicU64,
    max_flows: u64,
    idle: Duration,
    /// ICMP answers sent in the current second, and which second (a bound, as the
    /// kernel's own icmp_ratelimit: a flood toward a dead service cannot make lhb
    /// flood the bridge).
    icmp_budget: Mutex<(u64, u32)>,
    /// The raw sockets could not be opened (no CAP_NET_RAW): said once.
    icmp_warned: std::sync::atomic::AtomicBool,
    /// Who each scoped rule admits.
    scopes: Scopes,
    /// Who came: a flow opened counts as a connection.
    clients: Clients,
}

/// ICMP errors sent per second at most, over all flows.
const ICMP_PER_SECOND: u32 = 100;

pub struct Forwarder {
    sockets: BTreeMap<GatewayKey, Bound>,
    shared: Arc<Shared>,
    counters: Arc<Mutex<BTreeMap<u32, Arc<UdpCounters>>>>,
    tasks: Tasks,
}

impl Forwarder {
    pub fn new(max_flows: usize, idle: Duration, tasks: Tasks, clients: Clients) -> Forwarder {
        Forwarder {
            sockets: BTreeMap::new(),
            shared: Arc::new(Shared {
                total: AtomicU64::new(0),
                max_flows: max_flows as u64,
                idle,
                icmp_budget: Mutex::new((0, 0)),
                icmp_warned: Default::default(),
                scopes: Scopes::default(),
                clients,
            }),
            counters: Default::default(),
            tasks,
        }
    }

    /// Binds `key` and forwards its datagrams to `target`. A socket already bound for
    /// `key` is kept and only led elsewhere: closing it and binding again would race
    /// with its task's end (the address is held until then, and lhb's socket takes no
    /// SO_REUSEADDR, so that no other program can share it).
    pub fn bind(&mut self, key: &GatewayKey, target: UdpTarget) -> io::Result<()> {
        if let Some(current) = self.sockets.get(key).map(|b| b.target) {
            if current != target {
                let route = self.route(key, target);
                if let Some(b) = self.sockets.get_mut(key) {
                    b.serving.retarget(route);
                    b.target = target;
                }
            }
            return Ok(());
        }
        let sock = Arc::new(bind(key)?);
        let icmp = match Icmp::open(key) {
            Ok(i) => Some(i),
            Err(e) => {
                if !self.shared.icmp_warned.swap(true, Ordering::Relaxed) {
                    warn!(
                        "UDP: cannot open a raw ICMP socket ({e}); a container sending to a service that is down gets no port unreachable and waits for its own timeout (grant CAP_NET_RAW)"
                    );
                }
                None
            }
        };
        let serving = Arc::new(Serving {
            sock,
            icmp: icmp.map(Arc::new),
            gateway: key.gateway,
            port: key.port,
            route: parking_lot::RwLock::new(Arc::new(self.route(key, target))),
            label: format!("{}:{}/udp@{}", key.gateway, key.port, key.bridge),
            shared: self.shared.clone(),
            flows: Default::default(),
            closed: Default::default(),
            tasks: self.tasks.clone(),
        });
        let task = self.tasks.spawn(receive_loop(serving.clone()));
        self.sockets.insert(
            key.clone(),
            Bound {
                target,
                serving,
                task,
            },
        );
        Ok(())
    }

    fn route(&self, key: &GatewayKey, target: UdpTarget) -> Route {
        Route {
            target: target.target,
            source: gateway::upstream_source(key.ifindex, target.target),
            counters: self.counters_for(target.slot),
            slot: target.slot,
            retired: Default::default(),
        }
    }

    /// Who each scoped rule admits from now on; a flow of a client no longer admitted
    /// passes nothing more.
    pub fn set_scopes(
        &self,
        scopes: std::collections::BTreeMap<u32, crate::model::scope::AllowSet>,
    ) {
        self.shared.scopes.set(scopes);
    }

    /// Closes `key`'s socket. Its flows end with it: their answers could no longer be
    /// sent from the address the containers asked.
    pub fn close(&mut self, key: &GatewayKey) {
        if let Some(b) = self.sockets.remove(key) {
            b.task.abort();
        }
    }

    fn counters_for(&self, slot: u32) -> Arc<UdpCounters> {
        self.counters.lock().entry(slot).or_default().clone()
    }

    /// The counters of a rule slot (zero if it never forwarded).
    pub fn counters(&self, slot: u32) -> Arc<UdpCounters> {
        self.counters_for(slot)
    }

    pub fn max_flows(&self) -> usize {
        self.shared.max_flows as usize
    }

    /// How many flows each rule slot may hold at once.
    pub fn set_limits(&self, limits: &BTreeMap<u32, usize>) {
        for (&slot, &limit) in limits {
            self.counters_for(slot)
                .limit
                .store(limit as u64, Ordering::Relaxed);
        }
    }

    pub fn shutdown(&mut self) {
        let keys: Vec<GatewayKey> = self.sockets.keys().cloned().collect();
        for k in keys {
            self.close(&k);
        }
    }
}

impl gateway::GatewaySockets for Forwarder {
    type Target = UdpTarget;
    const PATH: &'static str = "UDP forwarder";

    fn open(&mut self, key: &GatewayKey, target: UdpTarget) -> io::Result<()> {
        self.bind(key, target)
    }

    fn close(&mut self, key: &GatewayKey) {
        Forwarder::close(self, key)
    }

    fn target(t: &UdpTarget) -> SocketAddr {
        t.target
    }
}

/// The gateway socket: only the bridge's datagrams reach it.
fn bind(key: &GatewayKey) -> io::Result<UdpSocket> {
    let sock = gateway::bind(key, gateway::Kind::Udp, |sock| {
        // A burst of datagrams from many containers waits here instead of being
        // dropped. SO_RCVBUFFORCE (CAP_NET_ADMIN, which lhb has) goes past
        // net.core.rmem_max, whose default (208 KiB) holds only about 150 small datagrams.
        if sockopt::set(
            sock,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &(RECV_BUFFER as libc::c_int),
        )
        .is_err()
        {
            let _ = sock.set_recv_buffer_size(RECV_BUFFER);
        }
        Ok(())
    })?;
    UdpSocket::from_std(sock.into())
}

/// The gateway socket's receive buffer.
const RECV_BUFFER: usize = 4 << 20;

/// One gateway socket and its flows.
struct Serving {
    sock: Arc<UdpSocket>,
    icmp: Option<Arc<Icmp>>,
    gateway: IpAddr,
    port: u16,
    route: parking_lot::RwLock<Arc<Route>>,
    label: String,
    shared: Arc<Shared>,
    flows: Mutex<HashMap<SocketAddr, Arc<Flow>>>,
    /// Cancelled when the gateway socket closes: its flows end with it.
    closed: tokio_util::sync::CancellationToken,
    tasks: Tasks,
}

/// Where a socket's datagrams go; replaced whole when its rule's target changes.
struct Route {
    target: SocketAddr,
    /// Bound before connecting; None: the kernel's choice (::1 for [::1]).
    source: Option<IpAddr>,
    counters: Arc<UdpCounters>,
    /// The rule's counter slot, which names its scope.
    slot: u32,
    /// Cancelled when the route is replaced: the flows opened under it end.
    retired: tokio_util::sync::CancellationToken,
}

impl Serving {
    fn route(&self) -> Arc<Route> {
        self.route.read().clone()
    }

    /// New datagrams go to `route`; the flows toward the old target end.
    fn retarget(&self, route: Route) {
        let old = std::mem::replace(&mut *self.route.write(), Arc::new(route));
        self.flows.lock().clear();
        old.retired.cancel();
    }
}

/// One container address and port, and its socket toward the service.
struct Flow {
    sock: UdpSocket,
    /// The route it was opened under: its target and its rule's counters.
    route: Arc<Route>,
    /// When a datagram last passed, either way.
    last: Mutex<Instant>,
    /// The length of the container's last datagram: the ICMP error quotes its header.
    last_len: AtomicU64,
}

impl Flow {
    fn touch(&self) {
        *self.last.lock() = Instant::now();
    }
}

/// The flows of one socket close with it, also when the socket's task is aborted.
struct FlowGuard(Arc<Serving>);

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.0.flows.lock().clear();
        self.0.closed.cancel();
    }
}

thread_local! {
    /// One datagram buffer per runtime thread, not per socket or flow: a datagram is
    /// received and sent on without an await in between, so no two users share it at
    /// once, and a thousand flows do not hold a thousand 64 KiB buffers.
    static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

async fn receive_loop(s: Arc<Serving>) {
    let _guard = FlowGuard(s.clone());
    let mut errors = 0u64;
    loop {
        if let Err(e) = s.sock.readable().await {
            warn!(socket = %s.label, "waiting for datagrams: {e}");
            return;
        }
        // Everything queued, then wait again: one wake-up for a burst, and up to BATCH
        // datagrams per system call.
        loop {
            let got = BATCH_BUF.with_borrow_mut(|b| -> io::Result<()> {
                let n = s
                    .sock
                    .try_io(Interest::READABLE, || b.recv(s.sock.as_raw_fd()))?;
                // Each datagram's flow; a burst is mostly one container's, whose flow is
                // looked up once.
                let mut flows: Vec<Option<(SocketAddr, Arc<Flow>)>> = Vec::with_capacity(n);
                for i in 0..n {
                    let peer = b.peer(i);
                    let flow = match (peer, flows.last()) {
                        (Some(p), Some(Some((q, f)))) if p == *q => Some((p, f.clone())),
                        (Some(p), _) => flow_for(&s, p, b.len(i)).map(|f| (p, f)),
                        (None, _) => None,
                    };
                    flows.push(flow);
                }
                // Runs of one flow go out in one sendmmsg(2).
                let mut i = 0;
                while i < n {
                    let Some((peer, flow)) = &flows[i] else {
                        i += 1;
                        continue;
                    };
                    let mut end = i + 1;
                    while end < n
                        && flows[end]
                            .as_ref()
                            .is_some_and(|(_, f)| Arc::ptr_eq(f, flow))
                    {
                        end += 1;
                    }
                    forward(&s, *peer, flow, b, i..end);
                    i = end;
                }
                Ok(())
            });
            match got {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    errors += 1;
                    if errors.is_power_of_two() {
                        warn!(socket = %s.label, "receive: {e} ({errors} time(s) so far)");
                    }
                    // The socket stays readable after an error: no busy loop.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
            }
        }
    }
}

/// Datagrams received per recvmmsg(2).
const BATCH: usize = 32;

thread_local! {
    /// The receive side's buffers, one set per runtime thread (see BUF).
    static BATCH_BUF: std::cell::RefCell<Batch> = std::cell::RefCell::new(Batch::new());
}

/// recvmmsg(2) and sendmmsg(2) by hand: std, socket2 and tokio have neither, rustix no
/// recvmmsg, and a crate that has both (quinn-udp) brings a QUIC-shaped API for two
/// system calls. One
/// allocation of BATCH x 64 KiB: mapped lazily, so only the pages datagrams touch are
/// resident.
struct Batch {
    data: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    /// sendmmsg(2)'s headers, pointing into `data`.
    out_iovs: Vec<libc::iovec>,
    out_msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            data: vec![0; BATCH * MAX_DATAGRAM],
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            iovs: (0..BATCH)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: as above; the pointers are set before each call.
            msgs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
            out_iovs: (0..BATCH)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: as above.
            out_msgs: (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect(),
        }
    }

    /// Receives up to BATCH datagrams without blocking: how many.
    fn recv(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.data[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&raw mut self.addrs[i]).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &raw mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers of this struct, alive and not
        // otherwise borrowed for the call; the count matches the array.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                // musl declares the flags unsigned, glibc signed.
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The length of datagram `i` of the last receive.
    fn len(&self, i: usize) -> usize {
        (self.msgs[i].msg_len as usize).min(MAX_DATAGRAM)
    }

    /// The sender of datagram `i` of the last receive.
    fn peer(&self, i: usize) -> Option<SocketAddr> {
        let a = &self.addrs[i];
        match a.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in, which fits in the storage.
                let v4 = unsafe { &*(a as *const _ as *const libc::sockaddr_in) };
                Some(SocketAddr::from((
                    u32::from_be(v4.sin_addr.s_addr).to_be_bytes(),
                    u16::from_be(v4.sin_port),
                )))
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6, which fits in the storage.
                let v6 = unsafe { &*(a as *const _ as *const libc::sockaddr_in6) };
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    v6.sin6_addr.s6_addr.into(),
                    u16::from_be(v6.sin6_port),
                    v6.sin6_flowinfo,
                    v6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// Sends datagrams `run` of the last receive on the connected socket `fd` without
    /// blocking: how many went out.
    fn send(&mut self, fd: std::os::fd::RawFd, run: std::ops::Range<usize>) -> io::Result<usize> {
        let count = run.len();
        for (j, i) in run.enumerate() {
            self.out_iovs[j] = libc::iovec {
                iov_base: self.data[i * MAX_DATAGRAM..].as_mut_ptr().cast(),
                iov_len: self.len(i),
            };
            // SAFETY: all-zero is a valid msghdr (no name: the socket is connected).
            self.out_msgs[j] = unsafe { std::mem::zeroed() };
            self.out_msgs[j].msg_hdr.msg_iov = &raw mut self.out_iovs[j];
            self.out_msgs[j].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `count` headers, each pointing at a datagram in `data`, alive for the
        // call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.out_msgs.as_mut_ptr(),
                count as libc::c_uint,
                // musl declares the flags unsigned, glibc signed.
                libc::MSG_DONTWAIT as _,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Datagrams `run` of the last receive, all of `peer`, to its flow.
fn forward(
    s: &Arc<Serving>,
    peer: SocketAddr,
    flow: &Flow,
    b: &mut Batch,
    run: std::ops::Range<usize>,
) {
    let counters = &flow.route.counters;
    flow.last_len
        .store(b.len(run.end - 1) as u64, Ordering::Relaxed);
    // Straight to the socket, not through tokio's readiness: a flow's socket is new,
    // and tokio reports a socket writable only after its first poll.
    let fd = flow.sock.as_raw_fd();
    let mut i = run.start;
    let mut refusals = 0;
    while i < run.end {
        match b.send(fd, i..run.end) {
            Ok(k) => {
                let bytes: usize = (i..i + k).map(|j| b.len(j)).sum();
                counters.datagrams_in.fetch_add(k as u64, Ordering::Relaxed);
                counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                i += k;
                refusals = 0;
            }
            // A refusal of an earlier datagram is reported by this send, which then did
            // not go out: answer the container, and send again (once; a second refusal
            // in a row is the service refusing this one).
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                refused(s, &flow.route, peer, b.len(i));
                refusals += 1;
                if refusals > 1 {
                    i += 1;
                }
            }
            Err(e) => {
                let lost = (run.end - i) as u64;
                let d = counters.dropped.fetch_add(lost, Ordering::Relaxed) + lost;
                debug!(socket = %s.label, "{lost} datagram(s) from {peer} dropped: {e} ({d} so far)");
                return;
            }
        }
    }
}

/// The flow of `peer`, opened if the limits allow. Touched under the table's lock, so
/// an idle flow closing at the same moment sees the datagram and stays.
fn flow_for(s: &Arc<Serving>, peer: SocketAddr, len: usize) -> Option<Arc<Flow>> {
    let route = s.route();
    // Before the flow table: a client taken off the allow list passes nothing more,
    // even on a flow it opened before.
    // The daemon logs refused clients, rate-limited, from the client table.
    if !s.shared.scopes.allows(route.slot, peer.ip()) {
        route.counters.refused.fetch_add(1, Ordering::Relaxed);
        s.shared.clients.refused(route.slot, peer.ip());
        unreachable(s, peer, len);
        return None;
    }
    let mut flows = s.flows.lock();
    if let Some(f) = flows.get(&peer) {
        f.touch();
        return Some(f.clone());
    }
    let counters = &route.counters;
    let share = counters.limit.load(Ordering::Relaxed);
    let admitted = counters.active.load(Ordering::Relaxed) < share.max(1)
        && s.shared
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |t| {
                (t < s.shared.max_flows).then_some(t + 1)
            })
            .is_ok();
    if !admitted {
        let n = counters.over_limit.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            let total = s.shared.total.load(Ordering::Relaxed);
            let which = if total >= s.shared.max_flows {
                format!("the forwarder's flow limit ({})", s.shared.max_flows)
            } else {
                format!("this rule's share of flows ({share})")
            };
            warn!(socket = %s.label, "{which} reached: datagram from {peer} dropped ({n} so far); flows idle for {:?} close", s.shared.idle);
        }
        return None;
    }
    let sock = match connect(route.source, route.target) {
        Ok(sock) => sock,
        Err(e) => {
            s.shared.total.fetch_sub(1, Ordering::AcqRel);
            let n = counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(socket = %s.label, "cannot open a flow toward {}: {e} ({n} datagram(s) dropped so far)", route.target);
            }
            return None;
        }
    };
    counters.flows.fetch_add(1, Ordering::Relaxed);
    counters.active.fetch_add(1, Ordering::Relaxed);
    s.shared.clients.connected(route.slot, peer.ip());
    let flow = Arc::new(Flow {
        sock,
        route: route.clone(),
        last: Mutex::new(Instant::now()),
        last_len: AtomicU64::new(0),
    });
    flows.insert(peer, flow.clone());
    let task = answers(s.clone(), peer, flow.clone());
    s.tasks.spawn(task);
    Some(flow)
}

/// A socket toward the service, from the bridge's loopback source.
fn connect(source: Option<IpAddr>, target: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if let Some(src) = source {
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    sock.connect(&target.into())?;
    sock.set_nonblocking(true)?;
    UdpSocket::from_std(sock.into())
}

/// Passes the service's answers on to `peer` until the flow is idle for the timeout
/// (or its gateway socket closes).
async fn answers(s: Arc<Serving>, peer: SocketAddr, flow: Arc<Flow>) {
    // Reset only when it fires: a datagram costs no timer work.
    let idle = tokio::time::sleep(s.shared.idle);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            // ERROR too: a refusal on the service's side sets only the socket's error.
            // async_io, not ready() + try_io(): tokio's try_io gates on a single
            // interest, and an error alone would never be read.
            r = flow.sock.async_io(Interest::READABLE | Interest::ERROR, || answer(&s, peer, &flow)) => match r {
                Ok(()) => flow.touch(),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    refused(&s, &flow.route, peer, flow.last_len.load(Ordering::Relaxed) as usize);
                }
                Err(e) => {
                    // A socket that fails for another reason: the flow ends, and the
                    // container's next datagram opens a new one.
                    debug!(socket = %s.label, "flow of {peer}: {e}");
                    flow.route.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    s.flows.lock().retain(|_, f| !Arc::ptr_eq(f, &flow));
                    break;
                }
            },
            () = &mut idle => {
                let mut flows = s.flows.lock();
                let last = *flow.last.lock();
                if last.elapsed() >= s.shared.idle {
                    // Only this flow: the table may hold a newer one for the same peer.
                    if flows.get(&peer).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
                        flows.remove(&peer);
                    }
                    break;
                }
                idle.as_mut().reset(last + s.shared.idle);
            }
            // The gateway socket closed (bridge gone, rule removed): nothing more can
            // be answered.
            _ = s.closed.cancelled() => break,
            // The rule now leads elsewhere.
            _ = flow.route.retired.cancelled() => break,
        }
    }
    flow.route.counters.active.fetch_sub(1, Ordering::Relaxed);
    s.shared.total.fetch_sub(1, Ordering::AcqRel);
}

/// One answer of the service, to `peer` from the gateway socket.
fn answer(s: &Serving, peer: SocketAddr, flow: &Flow) -> io::Result<()> {
    BUF.with_borrow_mut(|buf| {
        let n = rustix::net::recv(&flow.sock, &mut buf[..], rustix::net::RecvFlags::empty())?.0;
        let counters = &flow.route.counters;
        match socket2::SockRef::from(&*s.sock).send_to(&buf[..n], &peer.into()) {
            Ok(_) => {
                counters.datagrams_out.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    })
}

/// The service refused a datagram of `peer` (`len` payload bytes): count it and answer
/// the container with a port unreachable, as the service's own host would have.
fn refused(s: &Serving, route: &Route, peer: SocketAddr, len: usize) {
    let n = route.counters.target_errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!(socket = %s.label, "{} refused a datagram from {peer}: nothing listening ({n} so far); the container gets ICMP port unreachable", route.target);
    }
    unreachable(s, peer, len);
}

/// ICMP port unreachable to `peer` for its datagram of `len` bytes, within the
/// forwarder's budget.
fn unreachable(s: &Serving, peer: SocketAddr, len: usize) {
    let Some(icmp) = &s.icmp else { return };
    {
        let second = now_second();
        let mut b = s.shared.icmp_budget.lock();
        if b.1 != second {
            *b = (0, second);
        }
        if b.0 >= ICMP_PER_SECOND as u64 {
            return;
        }
        b.0 += 1;
    }
    if let Err(e) = icmp.port_unreachable(peer, SocketAddr::new(s.gateway, s.port), len) {
        debug!(socket = %s.label, "ICMP port unreachable to {peer}: {e}");
    }
}

fn now_second() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

/// A raw ICMP socket bound to the gateway and the bridge, for port unreachable errors
/// from the gateway address. It never reads: a filter lets no ICMP message queue on it.
struct Icmp {
    sock: Socket,
    v6: bool,
}

impl Icmp {
    fn open(key: &GatewayKey) -> io::Result<Icmp> {
        let v6 = key.gateway.is_ipv6();
        let sock = gateway::bind(key, gateway::Kind::Icmp, |sock| block_all_input(sock, v6))?;
        Ok(Icmp { sock, v6 })
    }

    /// Port unreachable to `peer`, quoting its datagram to `local` (`len` payload
    /// bytes): the IP and UDP headers are what the container's kernel matches its
    /// socket with.
    fn port_unreachable(&self, peer: SocketAddr, local: SocketAddr, len: usize) -> io::Result<()> {
        let msg = match (peer.ip(), local.ip()) {
            (IpAddr::V4(p), IpAddr::V4(l)) if !self.v6 => {
                icmp4(p, peer.port(), l, local.port(), len)
            }
            (IpAddr::V6(p), IpAddr::V6(l)) if self.v6 => {
                icmp6(p, peer.port(), l, local.port(), len)
            }
            _ => return Ok(()),
        };
        let to = SocketAddr::new(peer.ip(), 0);
        self.sock.send_to(&msg, &to.into()).map(|_| ())
    }
}

/// Lets no ICMP message queue on a send-only raw socket: every ICMP packet the host
/// receives would otherwise be copied to it.
fn block_all_input(sock: &Socket, v6: bool) -> io::Result<()> {
    // A set bit blocks that type. ICMP6_FILTER (IPPROTO_ICMPV6, 1): all 256 types;
    // ICMP_FILTER (SOL_RAW, 1): types 0..31, one word.
    if v6 {
        sockopt::set(sock, libc::IPPROTO_ICMPV6, 1, &[u32::MAX; 8])
    } else {
        sockopt::set(sock, libc::SOL_RAW, 1, &u32::MAX)
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Type 3 code 3, quoting the IPv4 header and the UDP header of the datagram.
fn icmp4(
    peer: std::net::Ipv4Addr,
    peer_port: u16,
    local: std::net::Ipv4Addr,
    local_port: u16,
    len: usize,
) -> Vec<u8> {
    let udp_len = (8 + len).min(u16::MAX as usize) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + udp_len as u32).min(u16::MAX as u32).to_be_bytes()[2..]);
    ip[8] = 64;
    ip[9] = libc::IPPROTO_UDP as u8;
    ip[12..16].copy_from_slice(&peer.octets());
    ip[16..20].copy_from_slice(&local.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut msg = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&ip);
    msg.extend_from_slice(&peer_port.to_be_bytes());
    msg.extend_from_slice(&local_port.to_be_bytes());
    msg.extend_from_slice(&udp_len.to_be_bytes());
    msg.extend_from_slice(&[0, 0]);
    let c = checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    msg
}

/// Type 1 code 4, quoting the IPv6 header and the UDP header; the kernel fills in the
/// ICMPv6 checksum.
fn icmp6(
    peer: std::net::Ipv6Addr,
    peer_port: u16,
    local: std::net::Ipv6Addr,
    local_port: u16,
    len: usize,
) -> Vec<u8> {
    let udp_len = (8 + len).min(u16::MAX as usize) as u16;
    let mut msg = vec![1u8, 4, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&[0x60, 0, 0, 0]);
    msg.extend_from_slice(&udp_len.to_be_bytes());
    msg.push(libc::IPPROTO_UDP as u8);
    msg.push(64);
    msg.extend_from_slice(&peer.octets());
    msg.extend_from_slice(&local.octets());
    msg.extend_from_slice(&peer_port.to_be_bytes());
    msg.extend_from_slice(&local_port.to_be_bytes());
    msg.extend_from_slice(&udp_len.to_be_bytes());
    msg.extend_from_slice(&[0, 0]);
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_icmp_error_quotes_what_the_container_sent() {
        let m = icmp4(
            "10.1.0.2".parse().unwrap(),
            40000,
            "10.1.0.1".parse().unwrap(),
            53,
            30,
        );
        assert_eq!(m.len(), 8 + 20 + 8);
        assert_eq!((m[0], m[1]), (3, 3));
        // A valid checksum sums to zero, for the message and the quoted header.
        assert_eq!(checksum(&m), 0);
        assert_eq!(checksum(&m[8..28]), 0);
        assert_eq!(&m[20..24], &[10, 1, 0, 2]);
        assert_eq!(&m[24..28], &[10, 1, 0, 1]);
        assert_eq!(u16::from_be_bytes([m[28], m[29]]), 40000);
        assert_eq!(u16::from_be_bytes([m[30], m[31]]), 53);
        assert_eq!(u16::from_be_bytes([m[32], m[33]]), 38);
        let m6 = icmp6(
            "fd00::2".parse().unwrap(),
            1,
            "fd00::1".parse().unwrap(),
            53,
            0,
        );
        assert_eq!(m6.len(), 8 + 40 + 8);
        assert_eq!((m6[0], m6[1], m6[8] >> 4, m6[14]), (1, 4, 6, 17));
    }
}
