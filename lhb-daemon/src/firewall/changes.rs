//! nf_tables announces every ruleset change (nft, iptables-nft, UFW and firewalld on
//! top of them) to the NFNLGRP_NFTABLES netlink group. lhb listens there so that a
//! reload that drops its accepts is healed at once, without polling the ruleset. Legacy
//! iptables announces nothing: the firewall task checks those tables periodically.

use std::{io, os::fd::AsRawFd as _};

use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::debug;

/// `NFNLGRP_NFTABLES` (linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;

/// Says "changed" on `tx` once per burst of ruleset changes (a full channel already
/// says it); a lost notification (ENOBUFS) counts as a change.
pub fn subscribe(tx: mpsc::Sender<()>) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind(&SocketAddr::new(0, 0))?;
    sock.add_membership(NFNLGRP_NFTABLES)?;
    sock.set_non_blocking(true)?;
    // SAFETY: the socket owns its fd and moves into the AsyncFd, which deregisters it
    // before dropping it.
    let fd = unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    tokio::spawn(async move {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            let r = ready.try_io(|s| {
                buf.clear();
                s.get_ref().recv(&mut buf, 0)
            });
            match r {
                Err(_would_block) => continue,
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Ok(Err(e)) => {
                    debug!(
                        "nftables notifications (fd {}): {e}",
                        fd.get_ref().as_raw_fd()
                    );
                    continue;
                }
            }
            if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                return;
            }
        }
    });
    Ok(())
}
