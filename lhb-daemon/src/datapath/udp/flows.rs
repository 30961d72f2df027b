//! The flows of a gateway socket: one per container address and port, each a socket
//! connected to the service from the bridge's loopback source; the receive loop, the
//! answers back, and the refusals (ICMP port unreachable).

use super::*;
use super::{
    icmp::Icmp,
    mmsg::{BATCH_BUF, Batch},
};

/// One gateway socket and its flows.
pub(super) struct Serving {
    pub(super) sock: Arc<UdpSocket>,
    pub(super) icmp: Option<Arc<Icmp>>,
    pub(super) gateway: IpAddr,
    pub(super) port: u16,
    pub(super) route: parking_lot::RwLock<Arc<Route>>,
    pub(super) label: String,
    pub(super) shared: Arc<Shared>,
    pub(super) flows: Mutex<HashMap<SocketAddr, Arc<Flow>>>,
    /// Cancelled when the gateway socket closes: its flows end with it.
    pub(super) closed: tokio_util::sync::CancellationToken,
    pub(super) tasks: Tasks,
}

/// Where a socket's datagrams go; replaced whole when its rule's target changes.
pub(super) struct Route {
    pub(super) target: SocketAddr,
    /// Bound before connecting; None: the kernel's choice (::1 for [::1]).
    pub(super) source: Option<IpAddr>,
    pub(super) counters: Arc<UdpCounters>,
    /// The rule's counter slot, which names its scope.
    pub(super) slot: u32,
    /// Cancelled when the route is replaced: the flows opened under it end.
    pub(super) retired: tokio_util::sync::CancellationToken,
}

impl Serving {
    pub(super) fn route(&self) -> Arc<Route> {
        self.route.read().clone()
    }

    /// New datagrams go to `route`; the flows toward the old target end.
    pub(super) fn retarget(&self, route: Route) {
        let old = std::mem::replace(&mut *self.route.write(), Arc::new(route));
        self.flows.lock().clear();
        old.retired.cancel();
    }
}

/// One container address and port, and its socket toward the service.
pub(super) struct Flow {
    pub(super) sock: UdpSocket,
    /// The route it was opened under: its target and its rule's counters.
    pub(super) route: Arc<Route>,
    /// When a datagram last passed, either way.
    pub(super) last: Mutex<Instant>,
    /// The length of the container's last datagram: the ICMP error quotes its header.
    pub(super) last_len: AtomicU64,
}

impl Flow {
    pub(super) fn touch(&self) {
        *self.last.lock() = Instant::now();
    }
}

/// The flows of one socket close with it, also when the socket's task is aborted.
pub(super) struct FlowGuard(pub(super) Arc<Serving>);

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
    pub(super) static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; MAX_DATAGRAM]);
}

pub(super) async fn receive_loop(s: Arc<Serving>) {
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

/// Datagrams `run` of the last receive, all of `peer`, to its flow.
pub(super) fn forward(
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
pub(super) fn flow_for(s: &Arc<Serving>, peer: SocketAddr, len: usize) -> Option<Arc<Flow>> {
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
pub(super) fn connect(source: Option<IpAddr>, target: SocketAddr) -> io::Result<UdpSocket> {
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
pub(super) async fn answers(s: Arc<Serving>, peer: SocketAddr, flow: Arc<Flow>) {
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
pub(super) fn answer(s: &Serving, peer: SocketAddr, flow: &Flow) -> io::Result<()> {
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
pub(super) fn refused(s: &Serving, route: &Route, peer: SocketAddr, len: usize) {
    let n = route.counters.target_errors.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!(socket = %s.label, "{} refused a datagram from {peer}: nothing listening ({n} so far); the container gets ICMP port unreachable", route.target);
    }
    unreachable(s, peer, len);
}

/// ICMP port unreachable to `peer` for its datagram of `len` bytes, within the
/// forwarder's budget.
pub(super) fn unreachable(s: &Serving, peer: SocketAddr, len: usize) {
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

pub(super) fn now_second() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}
