//! The gateway sockets of the user-space paths: the proxy's listeners, the UDP
//! forwarder's sockets and its raw ICMP sockets. Each is bound to the gateway address AND
//! to the bridge device (SO_BINDTODEVICE), so a packet for the gateway arriving by any
//! other interface finds no socket. Also the loopback source both paths reach the service
//! from, and [`GatewaySockets`], what the daemon's apply drives both paths by.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};

pub use crate::reconcile::GatewayKey;

/// The address a user-space path connects from to reach an IPv4 target for bridge
/// `ifindex`: 127.128.0.0 plus the ifindex (23 bits). The whole of 127.0.0.0/8 is local
/// on Linux, so no address needs adding; this half is clear of 127.0.0.1, 127.0.0.53
/// (systemd-resolved) and 127.0.1.1 (Debian's hostname entry), and one address per
/// bridge lets a service tell bridges apart.
pub fn loopback_source(ifindex: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x7f80_0000 | (ifindex & 0x007f_ffff))
}

/// The source to bind before connecting to `target` for bridge `ifindex`; None for an
/// IPv6 target: ::1 is the only IPv6 loopback address, the kernel's choice anyway.
pub fn upstream_source(ifindex: u32, target: SocketAddr) -> Option<IpAddr> {
    match target {
        SocketAddr::V4(_) => Some(IpAddr::V4(loopback_source(ifindex))),
        SocketAddr::V6(_) => None,
    }
}

/// The address the service sees its clients from for bridge `ifindex`.
pub fn seen_as(ifindex: u32, target: SocketAddr) -> String {
    upstream_source(ifindex, target).map_or_else(|| "::1".to_string(), |a| a.to_string())
}

/// What a gateway socket carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A TCP listener on gateway:port (not yet listening).
    Tcp,
    /// A UDP socket on gateway:port.
    Udp,
    /// A raw ICMP socket on the gateway, for the errors the UDP forwarder sends.
    Icmp,
}

/// A non-blocking socket for `key`, bound to its bridge device and then to its gateway
/// address (port 0 for ICMP); `setup` runs before the bind, for what must be set first.
pub fn bind(
    key: &GatewayKey,
    kind: Kind,
    setup: impl FnOnce(&Socket) -> io::Result<()>,
) -> io::Result<Socket> {
    let v6 = key.gateway.is_ipv6();
    let (ty, proto, port, suffix) = match kind {
        Kind::Tcp => (Type::STREAM, Protocol::TCP, key.port, ""),
        Kind::Udp => (Type::DGRAM, Protocol::UDP, key.port, "/udp"),
        Kind::Icmp if v6 => (Type::RAW, Protocol::ICMPV6, 0, ""),
        Kind::Icmp => (Type::RAW, Protocol::ICMPV4, 0, ""),
    };
    let addr = SocketAddr::new(key.gateway, port);
    let sock = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if v6 && kind != Kind::Icmp {
        sock.set_only_v6(true)?;
    }
    sock.bind_device(Some(key.bridge.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("binding to device {}: {e}", key.bridge)))?;
    setup(&sock)?;
    sock.bind(&addr.into()).map_err(|e| {
        io::Error::new(
            e.kind(),
            if e.kind() == io::ErrorKind::AddrInUse {
                format!(
                    "{addr}{suffix} is already in use by another program on {}",
                    key.bridge
                )
            } else {
                format!("binding {addr}{suffix}: {e}")
            },
        )
    })?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A user-space path's gateway sockets as the daemon's apply sees them: the proxy's
/// listeners and the UDP forwarder's sockets are brought to a plan the same way.
pub trait GatewaySockets {
    /// Where a socket leads, and whose counters it counts on.
    type Target: Copy + PartialEq;
    /// The path, as messages name it.
    const PATH: &'static str;
    /// Serves `key` toward `target`: binds, or leads a socket already bound elsewhere.
    fn open(&mut self, key: &GatewayKey, target: Self::Target) -> io::Result<()>;
    fn close(&mut self, key: &GatewayKey);
    /// The keys served now.
    fn keys(&self) -> Vec<GatewayKey>;
    /// How many connections (proxy) or flows (UDP) rule `slot` may hold at once.
    fn set_limit(&self, slot: u32, limit: usize);

    fn set_limits(&self, limits: &std::collections::BTreeMap<u32, usize>) {
        for (&slot, &limit) in limits {
            self.set_limit(slot, limit);
        }
    }

    /// Closes every socket.
    fn shutdown(&mut self) {
        for k in self.keys() {
            self.close(&k);
        }
    }
    /// The service's address.
    fn target(t: &Self::Target) -> SocketAddr;
    /// Who the service sees as the client of `key`'s traffic.
    fn seen_as(key: &GatewayKey, t: &Self::Target) -> String {
        seen_as(key.ifindex, Self::target(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_source_is_per_bridge_and_clear_of_the_well_known_addresses() {
        assert_eq!(loopback_source(5), Ipv4Addr::new(127, 128, 0, 5));
        assert_eq!(loopback_source(0x1_0203), Ipv4Addr::new(127, 129, 2, 3));
        // 23 bits: never outside 127.128.0.0/9.
        assert_eq!(loopback_source(u32::MAX), Ipv4Addr::new(127, 255, 255, 255));
        let v6: SocketAddr = "[::1]:53".parse().unwrap();
        assert_eq!(upstream_source(5, v6), None);
        assert_eq!(seen_as(5, v6), "::1");
        assert_eq!(seen_as(5, "127.0.0.1:53".parse().unwrap()), "127.128.0.5");
    }
}
