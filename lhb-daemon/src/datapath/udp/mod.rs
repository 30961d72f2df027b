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
//!
//! Here the forwarder and its gateway sockets; `flows.rs` the flows, the receive loop
//! and the answers; `mmsg.rs` the batched system calls; `icmp.rs` the port unreachable
//! errors.

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

mod flows;
mod icmp;
mod mmsg;

use flows::{Route, Serving, receive_loop};
use icmp::Icmp;

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

    fn keys(&self) -> Vec<GatewayKey> {
        self.sockets.keys().cloned().collect()
    }

    fn set_limit(&self, slot: u32, limit: usize) {
        self.counters_for(slot)
            .limit
            .store(limit as u64, Ordering::Relaxed);
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
