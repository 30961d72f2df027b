//! Datagrams in batches: recvmmsg(2) and sendmmsg(2), up to BATCH per system call.

use super::*;

/// Datagrams received per recvmmsg(2).
pub(super) const BATCH: usize = 32;

thread_local! {
    /// The receive side's buffers, one set per runtime thread (see BUF).
    pub(super) static BATCH_BUF: std::cell::RefCell<Batch> = std::cell::RefCell::new(Batch::new());
}

/// recvmmsg(2) and sendmmsg(2) by hand: std, socket2 and tokio have neither, rustix no
/// recvmmsg, and a crate that has both (quinn-udp) brings a QUIC-shaped API for two
/// system calls. One
/// allocation of BATCH x 64 KiB: mapped lazily, so only the pages datagrams touch are
/// resident.
pub(super) struct Batch {
    pub(super) data: Vec<u8>,
    pub(super) addrs: Vec<libc::sockaddr_storage>,
    pub(super) iovs: Vec<libc::iovec>,
    pub(super) msgs: Vec<libc::mmsghdr>,
    /// sendmmsg(2)'s headers, pointing into `data`.
    pub(super) out_iovs: Vec<libc::iovec>,
    pub(super) out_msgs: Vec<libc::mmsghdr>,
}

impl Batch {
    pub(super) fn new() -> Batch {
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
    pub(super) fn recv(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
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
    pub(super) fn len(&self, i: usize) -> usize {
        (self.msgs[i].msg_len as usize).min(MAX_DATAGRAM)
    }

    /// The sender of datagram `i` of the last receive.
    pub(super) fn peer(&self, i: usize) -> Option<SocketAddr> {
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
    pub(super) fn send(
        &mut self,
        fd: std::os::fd::RawFd,
        run: std::ops::Range<usize>,
    ) -> io::Result<usize> {
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
