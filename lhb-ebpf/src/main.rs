//! The kernel data path: a container's connection to GATEWAY:PORT lands on the host
//! service's loopback listener in-kernel, without NAT or a proxy, and the service sees the
//! container's real source address.
//!
//! Two programs share the work:
//! - `lhb_ingress`, a TC classifier on each bridge's ingress, finds the rule's loopback
//!   listener for every SYN to a configured (bridge, gateway, port) with
//!   `bpf_skc_lookup_tcp` and publishes it in the `LISTENERS` socket hash.
//! - `lhb_sk_lookup`, attached to the network namespace, runs when TCP looks for a
//!   listener for GATEWAY:PORT and hands it the published one with `bpf_sk_assign`,
//!   but only for connections that entered through that rule's bridge and, for a rule
//!   with an allow list, only for clients in `ALLOW` under the rule's slot.
//!
//! Why not `bpf_sk_assign` at TC directly: since 2025 the NAT LOCAL_IN hook drops any
//! socket attached to a packet whose remote port differs from the socket's, which is
//! always the case for a listener; every host with a NAT chain (every Docker host) loses
//! the assignment and the container gets a RST. The socket lookup runs after netfilter.
//!
//! Established connections never reach either program's slow path: their packets match
//! the child socket (local address = gateway) in the kernel's own lookup.
//!
//! Two variants, chosen by the daemon from the verifier's answer at load: the socket
//! lookup reads the interface the SYN came in by (`ingress_ifindex`, Linux 5.17+); on
//! kernels without that field (5.9 to 5.16) `lhb_ingress_tk` issues each SYN it admits a
//! ticket ([`SynTicket`]: per CPU, checked and voided by `lhb_sklookup_tk`), so the
//! lookup still serves only SYNs that came in through the rule's bridge.
#![no_std]
#![no_main]

use core::{
    ffi::c_void,
    ptr::{read_unaligned, read_volatile},
};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_CURRENT_NETNS, BPF_SK_LOOKUP_F_REPLACE, BPF_TCP_LISTEN, TC_ACT_UNSPEC,
        bpf_sock, bpf_sock_tuple,
    },
    helpers::generated::{
        bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_map_update_elem, bpf_sk_assign, bpf_sk_release,
        bpf_skc_lookup_tcp,
    },
    macros::{classifier, map, sk_lookup},
    maps::{HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, TcContext},
};
use aya_log_ebpf::debug;
use lhb_common::{
    ADMITTED_TTL_NS, ALLOW_KEY_BITS, Admitted, AllowAddr, ClientKey, ClientSeen, Counters,
    EndpointKey, FAMILY_V4, FAMILY_V6, FLAG_SCOPED, Flow, ListenerKey, MAX_ADMITTED, MAX_ALLOWED,
    MAX_CLIENTS, MAX_ENDPOINTS, MAX_RULES, Steer, SynTicket, TICKET_TTL_NS,
};

#[map(name = "LHB_ENDPOINTS")]
static ENDPOINTS: HashMap<EndpointKey, Steer> = HashMap::with_max_entries(MAX_ENDPOINTS, 0);

#[map(name = "LHB_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(MAX_RULES, 0);

#[map(name = "LHB_COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[map(name = "LHB_SYN_TICKET")]
static SYN_TICKET: PerCpuArray<SynTicket> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "LHB_ADMITTED")]
static ADMITTED: LruHashMap<Flow, Admitted> = LruHashMap::with_max_entries(MAX_ADMITTED, 0);

#[map(name = "LHB_ALLOW")]
static ALLOW: LpmTrie<AllowAddr, u8> = LpmTrie::with_max_entries(MAX_ALLOWED, 0);

#[map(name = "LHB_CLIENTS")]
static CLIENTS: LruPerCpuHashMap<ClientKey, ClientSeen> =
    LruPerCpuHashMap::with_max_entries(MAX_CLIENTS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV6_HLEN: usize = 40;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SK_PASS: u32 = 1;

const TUPLE_V4_LEN: u32 = 12;
const TUPLE_V6_LEN: u32 = 36;

/// The fields of a SYN the decision needs, addresses in network byte order.
struct Syn {
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

#[classifier]
pub fn lhb_ingress(ctx: TcContext) -> i32 {
    ingress::<false>(&ctx)
}

/// `lhb_ingress` that also issues each SYN it admits a ticket (kernels before 5.17).
#[classifier]
pub fn lhb_ingress_tk(ctx: TcContext) -> i32 {
    ingress::<true>(&ctx)
}

#[inline(always)]
fn ingress<const TICKET: bool>(ctx: &TcContext) -> i32 {
    if may_be_syn(ctx) {
        on_syn::<TICKET>(ctx);
    }
    // The packet always continues: the socket lookup decides where it lands, and with no
    // listener the kernel answers the SYN with an immediate RST. UNSPEC (TCX_NEXT), not
    // OK (TCX_PASS): OK would end the pipeline here, so a program attached after this one
    // (another tool's, or the next lhb's while it takes over from this one) would never
    // run, and the next lhb's listener map would stay empty until this one is gone.
    TC_ACT_UNSPEC
}

/// The rest of a SYN's way, in a function of its own (a BPF subprogram): its stack
/// frame and saved registers are paid for on SYNs only, not on every packet.
#[inline(never)]
fn on_syn<const TICKET: bool>(ctx: &TcContext) {
    let syn = match classify(ctx) {
        Quick::Other => None,
        Quick::Syn(syn) => Some(syn),
        Quick::Unsure => parse_syn(ctx),
    };
    if let Some(syn) = syn {
        publish_listener::<TICKET>(ctx, &syn);
    }
}

/// Every packet of every connection on the bridge passes here: false for whatever is
/// surely not a TCP SYN, decided with direct packet access (one bounds check, fixed
/// offsets). True also when the headers are not where this looks (`classify` and
/// `parse_syn` then decide).
///
/// Fields are tested several at a time: one 32-bit load and compare covers the
/// ethertype with IPv4's version and header length, another the fragment fields with
/// the protocol. A bulk IPv4 TCP packet costs three loads and three branches.
#[inline(always)]
fn may_be_syn(ctx: &TcContext) -> bool {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HLEN + 20 + 14 > end {
        return true;
    }
    // Little-endian loads: byte 0 of the field is the lowest byte of the value.
    let word = |off: usize| u32::from_le(unsafe { read_unaligned((data + off) as *const u32) });
    let byte = |off: usize| unsafe { *((data + off) as *const u8) };
    // Ethertype 0x0800, then version 4 with a 20-byte header (0x45).
    let l4 = if word(12) & 0x00ff_ffff == 0x0045_0008 {
        // Flags+fragment offset (the reserved and DF bits masked out), TTL, protocol:
        // TCP and not a fragment (a fragment has no or a partial TCP header).
        if word(ETH_HLEN + 6) & 0xff00_ff3f != (IPPROTO_TCP as u32) << 24 {
            return false;
        }
        ETH_HLEN + 20
    } else {
        match (byte(12), byte(13)) {
            // IPv4 with options: the slow parse reads them.
            (0x08, 0x00) => return true,
            (0x86, 0xdd) => {
                if data + ETH_HLEN + IPV6_HLEN + 14 > end {
                    return true;
                }
                if byte(ETH_HLEN + 6) != IPPROTO_TCP {
                    return false;
                }
                ETH_HLEN + IPV6_HLEN
            }
            _ => return false,
        }
    };
    byte(l4 + 13) & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

#[sk_lookup]
pub fn lhb_sk_lookup(ctx: SkLookupContext) -> u32 {
    assign_listener(&ctx);
    // SK_PASS without an assignment lets the regular lookup continue.
    SK_PASS
}

/// `lhb_sk_lookup` for kernels without `ingress_ifindex`: the SYN's ticket says which
/// bridge it came in by.
#[sk_lookup]
pub fn lhb_sklookup_tk(ctx: SkLookupContext) -> u32 {
    assign_ticketed(&ctx);
    SK_PASS
}

/// What a first look at a frame's linear data found.
enum Quick {
    /// Not a TCP SYN: nothing to do.
    Other,
    Syn(Syn),
    /// The headers are not where the quick look reads them (IPv4 options, a frame
    /// shorter than the headers, headers outside the linear data): ask `parse_syn`.
    Unsure,
}

/// A possible SYN's fields, read with direct packet access; `bpf_skb_load_bytes`
/// (`parse_syn`) is left for the rare frames whose headers this cannot read.
#[inline(always)]
fn classify(ctx: &TcContext) -> Quick {
    let data = ctx.data();
    let end = ctx.data_end();
    // Ethernet, an IPv4 header without options, TCP up to its flags.
    if data + ETH_HLEN + 20 + 14 > end {
        return Quick::Unsure;
    }
    let at = |off: usize| data + off;
    let ethertype = u16::from_be(unsafe { read_unaligned(at(12) as *const u16) });
    match ethertype {
        ETH_P_IP => {
            let ip = ETH_HLEN;
            let vihl = unsafe { *(at(ip) as *const u8) };
            if vihl != 0x45 {
                return Quick::Unsure;
            }
            if unsafe { *(at(ip + 9) as *const u8) } != IPPROTO_TCP {
                return Quick::Other;
            }
            // A fragment carries no (or a partial) TCP header.
            let frag = u16::from_be(unsafe { read_unaligned(at(ip + 6) as *const u16) });
            if frag & 0x3fff != 0 {
                return Quick::Other;
            }
            let l4 = ip + 20;
            if unsafe { *(at(l4 + 13) as *const u8) } & (TCP_FLAG_SYN | TCP_FLAG_ACK)
                != TCP_FLAG_SYN
            {
                return Quick::Other;
            }
            let mut syn = Syn {
                family: FAMILY_V4,
                src: [0; 16],
                dst: [0; 16],
                sport: unsafe { read_unaligned(at(l4) as *const u16) },
                dport: unsafe { read_unaligned(at(l4 + 2) as *const u16) },
            };
            syn.src[..4].copy_from_slice(&unsafe { read_unaligned(at(ip + 12) as *const [u8; 4]) });
            syn.dst[..4].copy_from_slice(&unsafe { read_unaligned(at(ip + 16) as *const [u8; 4]) });
            Quick::Syn(syn)
        }
        ETH_P_IPV6 => {
            let ip = ETH_HLEN;
            let l4 = ip + IPV6_HLEN;
            if data + l4 + 14 > end {
                return Quick::Unsure;
            }
            // Extension headers are not followed: connections to a gateway don't use them.
            if unsafe { *(at(ip + 6) as *const u8) } != IPPROTO_TCP {
                return Quick::Other;
            }
            if unsafe { *(at(l4 + 13) as *const u8) } & (TCP_FLAG_SYN | TCP_FLAG_ACK)
                != TCP_FLAG_SYN
            {
                return Quick::Other;
            }
            Quick::Syn(Syn {
                family: FAMILY_V6,
                src: unsafe { read_unaligned(at(ip + 8) as *const [u8; 16]) },
                dst: unsafe { read_unaligned(at(ip + 24) as *const [u8; 16]) },
                sport: unsafe { read_unaligned(at(l4) as *const u16) },
                dport: unsafe { read_unaligned(at(l4 + 2) as *const u16) },
            })
        }
        _ => Quick::Other,
    }
}

/// Parses a TCP SYN (without ACK) through `bpf_skb_load_bytes`, for the frames
/// `classify` cannot read directly; everything else is left alone.
#[inline(always)]
fn parse_syn(ctx: &TcContext) -> Option<Syn> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (family, l4) = match ethertype {
        ETH_P_IP => {
            let vihl = ctx.load::<u8>(ETH_HLEN).ok()?;
            // A fragment carries no (or a partial) TCP header.
            let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
            if vihl >> 4 != 4 || frag & 0x3fff != 0 {
                return None;
            }
            if ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
                return None;
            }
            (FAMILY_V4, ETH_HLEN + ((vihl & 0x0f) as usize) * 4)
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: connections to a gateway don't use them.
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != IPPROTO_TCP {
                return None;
            }
            (FAMILY_V6, ETH_HLEN + IPV6_HLEN)
        }
        _ => return None,
    };
    let flags = ctx.load::<u8>(l4 + 13).ok()?;
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return None;
    }
    let mut syn = Syn {
        family,
        src: [0; 16],
        dst: [0; 16],
        // Ports stay in network byte order for the socket tuples.
        sport: ctx.load::<u16>(l4).ok()?,
        dport: ctx.load::<u16>(l4 + 2).ok()?,
    };
    if family == FAMILY_V4 {
        syn.src[..4].copy_from_slice(&ctx.load::<[u8; 4]>(ETH_HLEN + 12).ok()?);
        syn.dst[..4].copy_from_slice(&ctx.load::<[u8; 4]>(ETH_HLEN + 16).ok()?);
    } else {
        syn.src = ctx.load::<[u8; 16]>(ETH_HLEN + 8).ok()?;
        syn.dst = ctx.load::<[u8; 16]>(ETH_HLEN + 24).ok()?;
    }
    Some(syn)
}

/// Makes sure the rule's loopback listener is in `LISTENERS` before the SYN reaches TCP
/// (and, with `TICKET`, gives the SYN its ticket).
#[inline(always)]
fn publish_listener<const TICKET: bool>(ctx: &TcContext, syn: &Syn) {
    let key = EndpointKey {
        // At the bridge's ingress the skb's device is the bridge itself.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        addr: syn.dst,
        port: u16::from_be(syn.dport),
        family: syn.family,
        _pad: 0,
    };
    let Some(rule) = (unsafe { ENDPOINTS.get(&key) }) else {
        return;
    };
    if TICKET {
        issue_ticket(syn, &key);
    }
    let counters = COUNTERS.get_ptr_mut(rule.slot);
    let lkey = ListenerKey::of(rule);
    // The common case costs one lookup: a published socket that still listens serves
    // (it is the listener, or one of its SO_REUSEPORT group). One that stopped
    // listening while its owner keeps the fd open stays in the hash, so it is replaced
    // rather than trusted. A closed one leaves the hash by itself.
    let current = unsafe { bpf_map_lookup_elem(listeners(), (&lkey as *const ListenerKey).cast()) };
    if !current.is_null() {
        let live = unsafe { (*current.cast::<bpf_sock>()).state } == BPF_TCP_LISTEN;
        unsafe { bpf_sk_release(current) };
        if live {
            return;
        }
    }
    let Some(ln) = lookup_listener(ctx, syn, rule) else {
        count(counters, |c| c.no_listener += 1);
        return;
    };
    let ret = unsafe {
        bpf_map_update_elem(
            listeners(),
            (&lkey as *const ListenerKey).cast(),
            ln.cast::<c_void>(),
            BPF_ANY as u64,
        )
    };
    unsafe { bpf_sk_release(ln.cast()) };
    if ret != 0 {
        count(counters, |c| c.errors += 1);
        debug!(ctx, "publishing the listener failed: {}", ret);
    }
}

/// Overwrites this CPU's ticket: the previous one's SYN has gone through TCP's lookup
/// already (both run to completion on this CPU) or was dropped on the way.
#[inline(always)]
fn issue_ticket(syn: &Syn, key: &EndpointKey) {
    let Some(t) = SYN_TICKET.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        *t = SynTicket {
            flow: Flow {
                src: syn.src,
                dst: syn.dst,
                sport: syn.sport,
                dport: key.port,
                family: syn.family,
                _pad: [0; 3],
            },
            ifindex: key.ifindex,
            live: 1,
            issued_ns: bpf_ktime_get_ns(),
        };
    }
}

/// Finds the target's listener as the kernel would for a SYN sent to it directly.
#[inline(always)]
fn lookup_listener(ctx: &TcContext, syn: &Syn, rule: &Steer) -> Option<*mut bpf_sock> {
    let dport = rule.target_port.to_be();
    let (mut t, family) = match (syn.family, rule.target_family) {
        (FAMILY_V4, FAMILY_V4) | (FAMILY_V6, FAMILY_V6) => (
            tuple(syn.family, &syn.src, &rule.target_addr, syn.sport, dport),
            syn.family,
        ),
        // An IPv4 client reaches an IPv6 listener as a v4-mapped peer.
        (FAMILY_V4, FAMILY_V6) => {
            let mut mapped = [0u8; 16];
            mapped[10] = 0xff;
            mapped[11] = 0xff;
            mapped[12..].copy_from_slice(&syn.src[..4]);
            (
                tuple(FAMILY_V6, &mapped, &rule.target_addr, syn.sport, dport),
                FAMILY_V6,
            )
        }
        // An IPv6 packet cannot go to an IPv4 socket; the daemon never adds such an
        // endpoint, this only keeps the program total.
        _ => return None,
    };
    let len = if family == FAMILY_V4 {
        TUPLE_V4_LEN
    } else {
        TUPLE_V6_LEN
    };
    let sk =
        unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut t, len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return None;
    }
    if unsafe { (*sk).state } != BPF_TCP_LISTEN {
        unsafe { bpf_sk_release(sk.cast()) };
        return None;
    }
    Some(sk)
}

/// In TCP's listener lookup: a connection to a configured (bridge, gateway, port) gets
/// the published loopback listener.
#[inline(always)]
fn assign_listener(ctx: &SkLookupContext) {
    // Each context field is read once, unconditionally: the verifier only accepts loads
    // at a constant offset from the unmodified context pointer, and the compiler would
    // otherwise share one address computation between the IPv4 and IPv6 branches.
    let l = ctx.lookup;
    let (protocol, family, ip4, ip6, local_port, ifindex, rip4, rip6) = unsafe {
        (
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).local_ip4),
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).ingress_ifindex),
            // For scoped rules: who is connecting.
            read_volatile(&raw const (*l).remote_ip4),
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
        )
    };
    if protocol != IPPROTO_TCP as u32 {
        return;
    }
    let (mut addr, mut remote) = ([0u8; 16], [0u8; 16]);
    let family = match family {
        AF_INET => {
            addr[..4].copy_from_slice(&ip4.to_ne_bytes());
            remote[..4].copy_from_slice(&rip4.to_ne_bytes());
            FAMILY_V4
        }
        AF_INET6 => {
            for i in 0..4 {
                addr[4 * i..4 * i + 4].copy_from_slice(&ip6[i].to_ne_bytes());
                remote[4 * i..4 * i + 4].copy_from_slice(&rip6[i].to_ne_bytes());
            }
            FAMILY_V6
        }
        _ => return,
    };
    assign_endpoint(
        ctx,
        &remote,
        &EndpointKey {
            // The interface the packet came in on: the rule's bridge and nothing else, so
            // a host that routes to the gateway address from elsewhere is never served.
            ifindex,
            addr,
            port: local_port as u16,
            family,
            _pad: 0,
        },
    );
}

/// The socket lookup of the ticket variant: only a lookup whose addresses and ports are
/// those of this CPU's live ticket is served, for the bridge the ticket names. The
/// assigned SYN is remembered for a few seconds ([`ADMITTED`]): when the listener's SYN
/// queue is full it answers with a SYN cookie and keeps nothing, and the ACK that
/// completes the handshake comes to this lookup again, without a ticket (the TC program
/// tickets SYNs only). Only a flow that came in through a rule's bridge is remembered,
/// so nothing from elsewhere is assigned: an ACK with that flow's addresses from
/// elsewhere would also need the cookie the listener sent to the container.
#[inline(always)]
fn assign_ticketed(ctx: &SkLookupContext) {
    // As in assign_listener: each field read once, at a constant offset. remote_port is
    // a 16-bit field since 5.19 and a 32-bit one before; a 16-bit load at its offset
    // reads the port (network byte order) on both.
    let l = ctx.lookup;
    let (protocol, family, lip4, lip6, local_port, rip4, rip6, remote_port) = unsafe {
        (
            read_volatile(&raw const (*l).protocol),
            read_volatile(&raw const (*l).family),
            read_volatile(&raw const (*l).local_ip4),
            [
                read_volatile(&raw const (*l).local_ip6[0]),
                read_volatile(&raw const (*l).local_ip6[1]),
                read_volatile(&raw const (*l).local_ip6[2]),
                read_volatile(&raw const (*l).local_ip6[3]),
            ],
            read_volatile(&raw const (*l).local_port),
            read_volatile(&raw const (*l).remote_ip4),
            [
                read_volatile(&raw const (*l).remote_ip6[0]),
                read_volatile(&raw const (*l).remote_ip6[1]),
                read_volatile(&raw const (*l).remote_ip6[2]),
                read_volatile(&raw const (*l).remote_ip6[3]),
            ],
            read_volatile(&raw const (*l).remote_port),
        )
    };
    if protocol != IPPROTO_TCP as u32 {
        return;
    }
    let (mut local, mut remote) = ([0u8; 16], [0u8; 16]);
    let family = match family {
        AF_INET => {
            local[..4].copy_from_slice(&lip4.to_ne_bytes());
            remote[..4].copy_from_slice(&rip4.to_ne_bytes());
            FAMILY_V4
        }
        AF_INET6 => {
            for i in 0..4 {
                local[4 * i..4 * i + 4].copy_from_slice(&lip6[i].to_ne_bytes());
                remote[4 * i..4 * i + 4].copy_from_slice(&rip6[i].to_ne_bytes());
            }
            FAMILY_V6
        }
        _ => return,
    };
    let flow = Flow {
        src: remote,
        dst: local,
        sport: remote_port,
        dport: local_port as u16,
        family,
        _pad: [0; 3],
    };
    let Some(t) = SYN_TICKET.get_ptr_mut(0) else {
        return;
    };
    let t = unsafe { &mut *t };
    let now = unsafe { bpf_ktime_get_ns() };
    let ifindex = if t.live != 0 && same_flow(&t.flow, &flow) {
        // Used once, and only fresh.
        t.live = 0;
        if now.wrapping_sub(t.issued_ns) > TICKET_TTL_NS {
            return;
        }
        let admitted = Admitted {
            ifindex: t.ifindex,
            _pad: 0,
            issued_ns: now,
        };
        let _ = ADMITTED.insert(&flow, &admitted, BPF_ANY as u64);
        t.ifindex
    } else {
        let Some(a) = (unsafe { ADMITTED.get(&flow) }) else {
            return;
        };
        let (ifindex, issued) = (a.ifindex, a.issued_ns);
        if now.wrapping_sub(issued) > ADMITTED_TTL_NS {
            let _ = ADMITTED.remove(&flow);
            return;
        }
        ifindex
    };
    assign_endpoint(
        ctx,
        &remote,
        &EndpointKey {
            ifindex,
            addr: local,
            port: local_port as u16,
            family,
            _pad: 0,
        },
    );
}

/// Two flows as five 64-bit compares (no memcmp in BPF).
#[inline(always)]
fn same_flow(a: &Flow, b: &Flow) -> bool {
    let w = |x: &Flow| unsafe { read_unaligned((x as *const Flow).cast::<[u64; 5]>()) };
    let (a, b) = (w(a), w(b));
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
}

/// Hands the connection from `remote` (laid out as `key.addr`) to `key`'s published
/// listener, if `key` is an endpoint and its rule admits `remote`.
#[inline(always)]
fn assign_endpoint(ctx: &SkLookupContext, remote: &[u8; 16], key: &EndpointKey) {
    let Some(rule) = (unsafe { ENDPOINTS.get(key) }) else {
        return;
    };
    let counters = COUNTERS.get_ptr_mut(rule.slot);
    let client = ClientKey {
        slot: rule.slot,
        addr: as_v6(key.family, remote),
    };
    if rule.flags & FLAG_SCOPED != 0 && !admitted(&client) {
        // Not assigned: nothing listens on GATEWAY:PORT itself, so TCP answers with a
        // RST, and the service never sees the SYN.
        count(counters, |c| c.refused += 1);
        seen(&client, false);
        return;
    }
    let lkey = ListenerKey::of(rule);
    let sk = unsafe { bpf_map_lookup_elem(listeners(), (&lkey as *const ListenerKey).cast()) };
    if sk.is_null() {
        return;
    }
    // A listener shut down while its owner keeps the fd stays in the hash (TCP_CLOSE).
    // Some kernels' bpf_sk_assign take it (5.10 does), and TCP then drops the SYN unanswered:
    // the container would wait for a timeout instead of a refusal (seen on 5.10).
    if unsafe { (*sk.cast::<bpf_sock>()).state } != BPF_TCP_LISTEN {
        unsafe { bpf_sk_release(sk) };
        count(counters, |c| c.no_listener += 1);
        return;
    }
    // REPLACE: while one lhb takes over from another both programs run and select the
    // same listener; the later one (the newer lhb) wins instead of failing with EEXIST.
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk, BPF_SK_LOOKUP_F_REPLACE as u64) };
    unsafe { bpf_sk_release(sk) };
    if ret == 0 {
        count(counters, |c| c.connections += 1);
        seen(&client, true);
    } else {
        count(counters, |c| c.errors += 1);
        debug!(ctx, "bpf_sk_assign failed: {}", ret);
    }
}

/// `remote` (laid out as an endpoint key's address) as IPv6, IPv4 mapped.
#[inline(always)]
fn as_v6(family: u8, remote: &[u8; 16]) -> [u8; 16] {
    if family == FAMILY_V4 {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12..].copy_from_slice(&remote[..4]);
        a
    } else {
        *remote
    }
}

/// Whether the client's rule admits it: the longest prefix of (slot, address) in
/// [`ALLOW`] exists. The slot's 32 bits are part of every stored prefix, so only that
/// rule's entries can match.
#[inline(always)]
fn admitted(client: &ClientKey) -> bool {
    let data = AllowAddr {
        slot: client.slot.to_be_bytes(),
        addr: client.addr,
    };
    ALLOW.get(&Key::new(ALLOW_KEY_BITS, data)).is_some()
}

/// Counts a client's connection (or refusal) in [`CLIENTS`], on this CPU: no lock, no
/// sharing, so the count costs a hash lookup per SYN and nothing per packet.
#[inline(always)]
fn seen(client: &ClientKey, connected: bool) {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(c) = CLIENTS.get_ptr_mut(client) {
        let c = unsafe { &mut *c };
        if connected {
            c.connections += 1;
        } else {
            c.refused += 1;
        }
        c.last_ns = now;
        return;
    }
    let first = ClientSeen {
        connections: u64::from(connected),
        refused: u64::from(!connected),
        last_ns: now,
    };
    // ANY: if another CPU's first SYN from this client created the entry meanwhile, a
    // program's update of a per-CPU entry writes only this CPU's value.
    let _ = CLIENTS.insert(client, &first, BPF_ANY as u64);
}

#[inline(always)]
fn listeners() -> *mut c_void {
    (&raw const LISTENERS).cast_mut().cast()
}

#[inline(always)]
fn tuple(family: u8, src: &[u8; 16], dst: &[u8; 16], sport: u16, dport: u16) -> bpf_sock_tuple {
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    if family == FAMILY_V4 {
        let v4 = unsafe { &mut t.__bindgen_anon_1.ipv4 };
        v4.saddr = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        v4.daddr = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
        v4.sport = sport;
        v4.dport = dport;
    } else {
        let v6 = unsafe { &mut t.__bindgen_anon_1.ipv6 };
        for i in 0..4 {
            let b = 4 * i;
            v6.saddr[i] = u32::from_ne_bytes([src[b], src[b + 1], src[b + 2], src[b + 3]]);
            v6.daddr[i] = u32::from_ne_bytes([dst[b], dst[b + 1], dst[b + 2], dst[b + 3]]);
        }
        v6.sport = sport;
        v6.dport = dport;
    }
    t
}

#[inline(always)]
fn count(ptr: Option<*mut Counters>, f: impl FnOnce(&mut Counters)) {
    if let Some(p) = ptr {
        f(unsafe { &mut *p });
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
