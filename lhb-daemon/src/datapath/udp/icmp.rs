//! The forwarder's ICMP errors: a raw socket per gateway that only sends, and the port
//! unreachable messages it sends, quoting the container's datagram.

use super::*;

/// A raw ICMP socket bound to the gateway and the bridge, for port unreachable errors
/// from the gateway address. It never reads: a filter lets no ICMP message queue on it.
pub(super) struct Icmp {
    pub(super) sock: Socket,
    v6: bool,
}

impl Icmp {
    pub(super) fn open(key: &GatewayKey) -> io::Result<Icmp> {
        let v6 = key.gateway.is_ipv6();
        let sock = gateway::bind(key, gateway::Kind::Icmp, |sock| block_all_input(sock, v6))?;
        Ok(Icmp { sock, v6 })
    }

    /// Port unreachable to `peer`, quoting its datagram to `local` (`len` payload
    /// bytes): the IP and UDP headers are what the container's kernel matches its
    /// socket with.
    pub(super) fn port_unreachable(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        len: usize,
    ) -> io::Result<()> {
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
pub(super) fn block_all_input(sock: &Socket, v6: bool) -> io::Result<()> {
    // A set bit blocks that type. ICMP6_FILTER (IPPROTO_ICMPV6, 1): all 256 types;
    // ICMP_FILTER (SOL_RAW, 1): types 0..31, one word.
    if v6 {
        sockopt::set(sock, libc::IPPROTO_ICMPV6, 1, &[u32::MAX; 8])
    } else {
        sockopt::set(sock, libc::SOL_RAW, 1, &u32::MAX)
    }
}

pub(super) fn checksum(data: &[u8]) -> u16 {
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
pub(super) fn icmp4(
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
pub(super) fn icmp6(
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
    pub(super) fn the_icmp_error_quotes_what_the_container_sent() {
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
