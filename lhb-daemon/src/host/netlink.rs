//! Netlink, typed: the rest of lhb speaks of links and addresses, not of messages.
//!
//! [`Netlink::snapshot`] dumps every link and address into an [`Observed`]; [`Events`]
//! is a subscription to link and address changes (rtnetlink multicast, no polling) that
//! tells the daemon when to take a new snapshot.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv6Addr},
};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkInfo},
        nsid::{NsidAttribute, NsidMessage},
        tc::{TcAttribute, TcHandle},
    },
};

pub struct Netlink {
    handle: Handle,
}

/// A network interface as netlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub is_bridge: bool,
    /// Addresses a container on this link can use as its gateway (no IPv6 link-local).
    pub addrs: Vec<IpAddr>,
    /// The same addresses with their prefix lengths: where `lhb verify` and `lhb
    /// doctor` place a probe next to the gateway.
    pub prefixes: Vec<(IpAddr, u8)>,
    /// For a bridge: its ports that lead off this host, as "NAME (KIND)": anything but
    /// a veth (a container) or a tun/tap (a VM), e.g. a network card, bond, VLAN or
    /// tunnel. A service served on such a bridge is served to that whole network.
    pub uplinks: Vec<String>,
    /// For a bridge: its veth ports whose other end is in another network namespace.
    pub ports: Vec<Port>,
}

/// A bridge port leading into a container: the host-side veth, and the NSID of the
/// namespace its peer is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Port {
    pub ifindex: u32,
    pub netns: i32,
}

/// Link and address change notifications.
pub struct Events {
    rx: UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl Events {
    /// Waits for the next change that can matter to a rule. `None` when the socket closed.
    pub async fn next(&mut self) -> Option<()> {
        while let Some((msg, _)) = self.rx.next().await {
            if let NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewLink(_)
                | RouteNetlinkMessage::DelLink(_)
                | RouteNetlinkMessage::NewAddress(_)
                | RouteNetlinkMessage::DelAddress(_),
            ) = msg.payload
            {
                return Some(());
            }
        }
        None
    }

    /// Discards notifications already queued (a snapshot taken after them covers them).
    pub fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

impl Netlink {
    /// A request socket only, for one-shot reads (doctor, verify).
    pub fn requests() -> anyhow::Result<Netlink> {
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// Opens the request socket and the event subscription. Subscribing before the first
    /// snapshot means no change can fall between the two.
    pub fn connect() -> anyhow::Result<(Netlink, Events)> {
        let (conn, _h, rx) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .context("subscribing to rtnetlink link and address events")?;
        tokio::spawn(conn);
        let (conn, handle, _) =
            rtnetlink::new_connection().context("opening an rtnetlink socket")?;
        tokio::spawn(conn);
        Ok((Netlink { handle }, Events { rx }))
    }

    /// Every link with its usable gateway addresses.
    pub async fn snapshot(&self) -> anyhow::Result<BTreeMap<String, Link>> {
        let mut by_index: BTreeMap<u32, (String, Link)> = BTreeMap::new();
        // (bridge ifindex, "PORT (KIND)") for each bridge port that leads off the host.
        let mut uplinks: Vec<(u32, String)> = Vec::new();
        // (bridge ifindex, port) for each veth on a bridge whose peer is in another
        // namespace.
        let mut peers: Vec<(u32, Port)> = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(nl_err)? {
            let mut name = None;
            let mut kind = None;
            let mut master = None;
            let mut peer_netns = None;
            for attr in &msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Controller(m) => master = Some(*m),
                    LinkAttribute::LinkNetNsId(id) if *id >= 0 => peer_netns = Some(*id),
                    LinkAttribute::LinkInfo(infos) => {
                        kind = infos.iter().find_map(|i| match i {
                            LinkInfo::Kind(k) => Some(k.clone()),
                            _ => None,
                        });
                    }
                    _ => {}
                }
            }
            let Some(name) = name else { continue };
            if let Some(m) = master
                && let Some(what) = off_host(kind.as_ref())
            {
                uplinks.push((m, format!("{name} ({what})")));
            }
            let ifindex = msg.header.index;
            if let (Some(m), Some(netns), Some(InfoKind::Veth)) = (master, peer_netns, &kind) {
                peers.push((m, Port { ifindex, netns }));
            }
            by_index.insert(
                ifindex,
                (
                    name,
                    Link {
                        ifindex,
                        is_bridge: kind == Some(InfoKind::Bridge),
                        addrs: Vec::new(),
                        prefixes: Vec::new(),
                        uplinks: Vec::new(),
                        ports: Vec::new(),
                    },
                ),
            );
        }
        for (master, port) in uplinks {
            if let Some((_, l)) = by_index.get_mut(&master)
                && l.is_bridge
            {
                l.uplinks.push(port);
            }
        }
        for (master, port) in peers {
            if let Some((_, l)) = by_index.get_mut(&master)
                && l.is_bridge
            {
                l.ports.push(port);
            }
        }
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(nl_err)? {
            let Some((_, link)) = by_index.get_mut(&msg.header.index) else {
                continue;
            };
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on
            // point-to-point links and equals IFA_LOCAL elsewhere. IPv6 has only ADDRESS.
            let mut local = None;
            let mut address = None;
            for attr in &msg.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(address)
                && usable_gateway(ip)
                && !link.addrs.contains(&ip)
            {
                link.addrs.push(ip);
                link.prefixes.push((ip, msg.header.prefix_len));
            }
        }
        let mut links = BTreeMap::new();
        for (_, (name, mut link)) in by_index {
            link.addrs.sort();
            link.prefixes.sort();
            links.insert(name, link);
        }
        Ok(links)
    }
}

impl Netlink {
    /// The NSID this namespace gives the network namespace bound at `path` (a
    /// container's sandbox), with the namespace held open; None if it has none: then no
    /// veth here leads into it, as the kernel gives an id to a namespace as soon as a
    /// link here reports a peer there. The id is the namespace's only while it lives:
    /// the caller keeps the file for as long as it relies on the id.
    pub async fn nsid_of(
        &self,
        path: &std::path::Path,
    ) -> anyhow::Result<Option<(i32, std::fs::File)>> {
        use std::os::fd::AsRawFd as _;
        let ns =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut msg = NsidMessage::default();
        msg.attributes = vec![NsidAttribute::Fd(ns.as_raw_fd() as u32)];
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = rtnetlink::packet_core::NLM_F_REQUEST;
        let mut answers = self.handle.clone().request(req).map_err(nl_err)?;
        let mut id = None;
        while let Some(a) = answers.next().await {
            match a.payload {
                NetlinkPayload::Error(e) => {
                    return Err(anyhow::anyhow!("RTM_GETNSID: {e}"));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    id = m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(i) if *i >= 0 => Some(*i),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        Ok(id.map(|id| (id, ns)))
    }

    /// Deletes the clsact qdisc of `ifindex` (and with it every filter lhb put there).
    /// Whether the clsact qdisc on `ifindex` holds any filter (ingress or egress):
    /// another tool's, once lhb's own is gone.
    pub async fn clsact_has_filters(&self, ifindex: u32) -> anyhow::Result<bool> {
        let mut filters = self.handle.clone().traffic_filter(ifindex as i32);
        for get in [filters.get().ingress(), filters.get().egress()] {
            if get.execute().try_next().await.map_err(nl_err)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn remove_clsact(&self, ifindex: u32) -> anyhow::Result<()> {
        let mut req = self.handle.clone().qdisc().del(ifindex as i32);
        let msg = req.message_mut();
        msg.header.parent = TcHandle::CLSACT;
        msg.header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        msg.attributes.push(TcAttribute::Kind("clsact".to_string()));
        req.execute().await.map_err(nl_err)
    }
}

/// What a bridge port of link kind `kind` is, if it leads off this host. A veth's other
/// end is a container (or another namespace) here, a tun/tap's a VM or a process here;
/// everything else (a NIC has no kind; bond, team, VLAN, macvlan, VXLAN, GENEVE, GRE,
/// WireGuard...) carries frames to and from other machines.
fn off_host(kind: Option<&InfoKind>) -> Option<String> {
    match kind {
        Some(InfoKind::Veth | InfoKind::Tun) => None,
        None => Some("a network card".into()),
        Some(k) => Some(k.to_string()),
    }
}

/// Link-local IPv6 addresses need a scope a container's resolver never gives them.
fn usable_gateway(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_loopback(),
        IpAddr::V6(v6) => {
            !v6.is_unspecified()
                && v6 != Ipv6Addr::LOCALHOST
                && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

fn nl_err(e: rtnetlink::Error) -> anyhow::Error {
    match e {
        rtnetlink::Error::NetlinkError(ref m) if m.raw_code() == -libc::EPERM => {
            anyhow::Error::new(io::Error::from_raw_os_error(libc::EPERM))
                .context("netlink request refused")
        }
        other => anyhow::Error::new(other).context("netlink request failed"),
    }
}
