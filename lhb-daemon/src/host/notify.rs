//! systemd's notify protocol (sd_notify(3)), without libsystemd: datagrams to
//! `$NOTIFY_SOCKET`. READY=1 once every rule that can be served is served, STATUS= on
//! changes, WATCHDOG=1 every half `$WATCHDOG_USEC` while the main loop turns.
//! Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::{os::unix::net::UnixDatagram, time::Duration};

use tracing::debug;

#[derive(Clone)]
pub struct Notifier {
    socket: Option<std::path::PathBuf>,
    abstract_name: Option<Vec<u8>>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier {
                socket: None,
                abstract_name: None,
            };
        };
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
        if let Some(name) = bytes.strip_prefix(b"@") {
            Notifier {
                socket: None,
                abstract_name: Some(name.to_vec()),
            }
        } else {
            Notifier {
                socket: Some(path.into()),
                abstract_name: None,
            }
        }
    }

    pub fn send(&self, msg: &str) {
        let sock = match UnixDatagram::unbound() {
            Ok(s) => s,
            Err(e) => {
                debug!("notify socket: {e}");
                return;
            }
        };
        let r = if let Some(p) = &self.socket {
            sock.send_to(msg.as_bytes(), p)
        } else if let Some(name) = &self.abstract_name {
            use std::os::linux::net::SocketAddrExt as _;
            match std::os::unix::net::SocketAddr::from_abstract_name(name) {
                Ok(addr) => sock.send_to_addr(msg.as_bytes(), &addr),
                Err(e) => Err(e),
            }
        } else {
            return;
        };
        if let Err(e) = r {
            debug!("sd_notify {msg:?}: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=shutting down");
    }

    /// How often to send WATCHDOG=1, if systemd asks for it (half its timeout).
    pub fn watchdog_interval() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        // WATCHDOG_PID, when set, names the process meant.
        if let Some(pid) = std::env::var("WATCHDOG_PID").ok()
            && pid.parse::<u32>().ok() != Some(std::process::id())
        {
            return None;
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}
