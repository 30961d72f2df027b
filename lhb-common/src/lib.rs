//! The single definition of every map the eBPF side and the daemon share.
//!
//! The kernel programs read `ENDPOINTS` to decide whether a connection entering a bridge
//! is for a configured (gateway, port), and which loopback listener it goes to; the TC
//! program publishes that listener in `LISTENERS` and the socket-lookup program hands it
//! over. Both write `COUNTERS` so the daemon can report per-rule activity without a log
//! line per connection. Both sides compile these exact types, so a layout change cannot
//! drift between them.
#![no_std]

/// Name of the hash map from [`EndpointKey`] to [`Steer`].
pub const ENDPOINTS_MAP: &str = "LHB_ENDPOINTS";
/// Name of the per-CPU array of [`Counters`], indexed by [`Steer::slot`].
pub const COUNTERS_MAP: &str = "LHB_COUNTERS";
/// Name of the socket hash of loopback listeners, keyed by [`ListenerKey`].
pub const LISTENERS_MAP: &str = "LHB_LISTENERS";
/// Name of the TC classifier program attached to bridges.
pub const INGRESS_PROGRAM: &str = "lhb_ingress";
/// Name of the socket-lookup program attached to the network namespace.
pub const SK_LOOKUP_PROGRAM: &str = "lhb_sk_lookup";
/// The TC program of the variant for kernels whose socket lookup has no
/// `ingress_ifindex` (5.9 to 5.16): it also issues each admitted SYN a [`SynTicket`].
pub const INGRESS_TICKET_PROGRAM: &str = "lhb_ingress_tk";
/// That variant's socket-lookup program: it serves a SYN only with its ticket.
pub const SK_LOOKUP_TICKET_PROGRAM: &str = "lhb_sklookup_tk";
/// Name of the per-CPU array (one entry) holding each CPU's last [`SynTicket`].
pub const SYN_TICKET_MAP: &str = "LHB_SYN_TICKET";
/// A ticket older than this is void: its SYN never reached TCP's lookup (dropped on the
/// way, or queued by netfilter and overtaken).
pub const TICKET_TTL_NS: u64 = 100_000_000;
/// Name of the LRU hash of SYNs the ticket variant assigned ([`Flow`] -> [`Admitted`]),
/// for the ACK that completes a SYN-cookie handshake.
pub const ADMITTED_MAP: &str = "LHB_ADMITTED";
/// Its capacity: a flood evicts a record only after this many SYNs within one
/// round trip of its owner's handshake.
pub const MAX_ADMITTED: u32 = 4096;
/// A cookie ACK comes one round trip after its SYN; a record older than this is void.
pub const ADMITTED_TTL_NS: u64 = 3_000_000_000;

/// Name of the LPM trie of the addresses scoped rules admit ([`AllowAddr`] -> 1).
pub const ALLOW_MAP: &str = "LHB_ALLOW";
/// Its capacity: prefixes over all scoped rules.
pub const MAX_ALLOWED: u32 = 16384;
/// The trie's key length for one address: the slot, then the address as IPv6.
pub const ALLOW_KEY_BITS: u32 = 160;
/// [`Steer::flags`]: the rule has an `allow` list; a connection whose source is not in
/// [`ALLOW_MAP`] under the rule's slot is not assigned (the kernel answers with a RST).
pub const FLAG_SCOPED: u8 = 1;

/// Name of the per-CPU LRU hash of who connected through each rule ([`ClientKey`] ->
/// [`ClientSeen`]), written on every SYN the socket lookup decides.
pub const CLIENTS_MAP: &str = "LHB_CLIENTS";
/// Its capacity: clients over all rules. Past it the least recently seen client of a
/// CPU is forgotten, so the map's memory is fixed whatever the containers do.
pub const MAX_CLIENTS: u32 = 4096;

/// Capacity of the endpoint map: one entry per (bridge, gateway address, port).
pub const MAX_ENDPOINTS: u32 = 8192;
/// Number of counter slots: one per rule the daemon serves at a time.
pub const MAX_RULES: u32 = 4096;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// What the program matches: a TCP destination on one bridge.
///
/// The bridge's ifindex is part of the key so that a rule for one bridge never steers
/// packets that arrive on another bridge, even if they are addressed to the same IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub ifindex: u32,
    /// Gateway address in network byte order; IPv4 uses the first 4 bytes, rest zero.
    pub addr: [u8; 16],
    /// Destination port in host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: u8,
}

/// Where a matched connection goes: the loopback listener of the rule's target.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Steer {
    /// Loopback address in network byte order (127.0.0.1 in the first 4 bytes, or ::1).
    pub target_addr: [u8; 16],
    /// Target port in host byte order.
    pub target_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub target_family: u8,
    /// [`FLAG_SCOPED`].
    pub flags: u8,
    /// Index into the counters array; one slot per rule.
    pub slot: u32,
}

/// The data of an [`ALLOW_MAP`] key: a rule's slot, then a client address. The slot is
/// matched whole (it is the first 32 bits of every prefix), so a prefix of one rule
/// never admits a client to another. IPv4 addresses are stored as `::ffff:a.b.c.d`, so
/// one trie holds both families and an IPv4 /N is a /(96+N) after the slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowAddr {
    /// The slot in network byte order: the trie compares bits from the first byte.
    pub slot: [u8; 4],
    pub addr: [u8; 16],
}

/// A loopback listener: the target of one or more rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    /// Loopback address in network byte order, as in [`Steer::target_addr`].
    pub addr: [u8; 16],
    /// Port in host byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

impl ListenerKey {
    pub fn of(steer: &Steer) -> ListenerKey {
        ListenerKey {
            addr: steer.target_addr,
            port: steer.target_port,
            family: steer.target_family,
            _pad: 0,
        }
    }
}

/// The proof that a SYN entered through a rule's bridge, for kernels whose socket
/// lookup cannot tell the interface (no `ingress_ifindex` before 5.17).
///
/// The TC program on the bridge writes it for a SYN to an endpoint; the socket lookup
/// for the same SYN, a moment later in the same softirq on the same CPU (bridge ingress,
/// netfilter, IP, TCP run to completion there), finds it, checks the SYN's addresses and
/// ports, and voids it. One entry per CPU: nothing accumulates, and no other CPU (no
/// flood from another bridge) can overwrite it. A SYN that came in anywhere else has no
/// ticket on its CPU, or one for other addresses: it is never assigned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynTicket {
    pub flow: Flow,
    /// The bridge the SYN entered by.
    pub ifindex: u32,
    /// 1 until used.
    pub live: u32,
    /// bpf_ktime_get_ns() when issued (see [`TICKET_TTL_NS`]).
    pub issued_ns: u64,
}

/// A connection's addresses and ports, as a SYN carries them and the socket lookup
/// sees them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    /// Source and destination addresses as in [`EndpointKey::addr`].
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Source port in network byte order, as the socket lookup sees it.
    pub sport: u16,
    /// Destination port in host byte order.
    pub dport: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// A SYN the ticket variant assigned: the bridge it came by, and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    pub ifindex: u32,
    pub _pad: u32,
    pub issued_ns: u64,
}

/// Per-rule activity, summed over CPUs by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections handed to the loopback listener.
    pub connections: u64,
    /// SYNs for which no listener exists: the kernel answers them with a RST.
    pub no_listener: u64,
    /// The kernel refused to publish or assign the listener.
    pub errors: u64,
    /// SYNs from a client a scoped rule does not admit: not assigned, so the kernel
    /// answers them with a RST.
    pub refused: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.connections += other.connections;
        self.no_listener += other.no_listener;
        self.errors += other.errors;
        self.refused += other.refused;
    }
}

/// A client of one rule: the rule's counter slot and the client's address as IPv6 (an
/// IPv4 address mapped, `::ffff:a.b.c.d`), as in [`AllowAddr`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub slot: u32,
    pub addr: [u8; 16],
}

/// What one client did through one rule, on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientSeen {
    /// Connections assigned to the rule's listener.
    pub connections: u64,
    /// SYNs the rule's `allow` list refused.
    pub refused: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last SYN.
    pub last_ns: u64,
}

impl ClientSeen {
    pub fn add(&mut self, other: &ClientSeen) {
        self.connections += other.connections;
        self.refused += other.refused;
        self.last_ns = self.last_ns.max(other.last_ns);
    }
}

#[cfg(feature = "user")]
impl ClientKey {
    pub fn ip(&self) -> core::net::IpAddr {
        core::net::Ipv6Addr::from(self.addr).to_canonical()
    }
}

/// The address's family and its bytes in network order (IPv4 in the first 4 bytes).
#[cfg(feature = "user")]
fn ip_bytes(ip: core::net::IpAddr) -> (u8, [u8; 16]) {
    match ip {
        core::net::IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (FAMILY_V4, b)
        }
        core::net::IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
    }
}

/// The one place the daemon's addresses become the maps' wire layout.
#[cfg(feature = "user")]
impl EndpointKey {
    pub fn new(ifindex: u32, gateway: core::net::IpAddr, port: u16) -> EndpointKey {
        let (family, addr) = ip_bytes(gateway);
        EndpointKey {
            ifindex,
            addr,
            port,
            family,
            _pad: 0,
        }
    }
}

#[cfg(feature = "user")]
impl Steer {
    pub fn new(target: core::net::SocketAddr, slot: u32, scoped: bool) -> Steer {
        let (target_family, target_addr) = ip_bytes(target.ip());
        Steer {
            target_addr,
            target_port: target.port(),
            target_family,
            flags: if scoped { FLAG_SCOPED } else { 0 },
            slot,
        }
    }
}

#[cfg(feature = "user")]
impl AllowAddr {
    /// The trie key (prefix length, data) of `prefix_len` bits of `addr` for `slot`.
    pub fn prefix(slot: u32, addr: core::net::IpAddr, prefix_len: u8) -> (u32, AllowAddr) {
        let (bits, addr) = match addr {
            core::net::IpAddr::V4(v4) => (96 + u32::from(prefix_len), v4.to_ipv6_mapped()),
            core::net::IpAddr::V6(v6) => (u32::from(prefix_len), v6),
        };
        (
            32 + bits,
            AllowAddr {
                slot: slot.to_be_bytes(),
                addr: addr.octets(),
            },
        )
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] data with explicit padding fields and no pointers.
    unsafe impl aya::Pod for super::EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Steer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SynTicket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Admitted {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AllowAddr {}
    // SAFETY: as above (20 bytes, no padding).
    unsafe impl aya::Pod for super::ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientSeen {}
}
