//! Clients and services the tests measure with (HTTP probes, a peer-echo server, a
//! polling client) and what they read from the kernel (programs on a link, BPF ids).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::*;

/// How a connection attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The HTTP body.
    Served(String),
    Refused,
    /// Accepted, then reset: what a proxy answers when its target is down.
    Reset,
    TimedOut,
    Other(String),
}

/// One HTTP/1.0 request to `addr`, from whatever namespace the calling thread is in.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Outcome {
    // A reset can surface at connect already (it arrived before connect's poll returned),
    // or at the first write or read.
    let reset = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => Outcome::Reset,
        _ => Outcome::Other(e.to_string()),
    };
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Outcome::TimedOut,
        Err(e) => return reset(e),
    };
    let _ = s.set_read_timeout(Some(timeout));
    if let Err(e) = s.write_all(b"GET / HTTP/1.0\r\nHost: lhb\r\n\r\n") {
        return reset(e);
    }
    let mut buf = String::new();
    match s.read_to_string(&mut buf) {
        Ok(_) => match buf.split_once("\r\n\r\n") {
            Some((_, body)) => Outcome::Served(body.to_string()),
            None => Outcome::Other(format!("not HTTP: {buf:?}")),
        },
        Err(e) => reset(e),
    }
}

/// A tiny HTTP server bound to a loopback address that answers every request with
/// `peer=<the client's address>`, so a test can see which source address arrived.
pub struct PeerEcho {
    pub addr: SocketAddr,
    listener: Arc<TcpListener>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PeerEcho {
    pub fn start(bind: &str) -> anyhow::Result<PeerEcho> {
        let listener =
            Arc::new(TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?);
        let addr = listener.local_addr()?;
        let l = listener.clone();
        let thread = thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { break };
                thread::spawn(move || {
                    let peer = c.peer_addr().map(|p| p.to_string()).unwrap_or_default();
                    // Read the request before answering, so closing does not send a RST.
                    let mut reader = BufReader::new(match c.try_clone() {
                        Ok(r) => r,
                        Err(_) => return,
                    });
                    let mut line = String::new();
                    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                        if line == "\r\n" || line == "\n" {
                            break;
                        }
                        line.clear();
                    }
                    let body = format!("peer={peer}\n");
                    let _ = write!(
                        c,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.shutdown(Shutdown::Write);
                });
            }
        });
        Ok(PeerEcho {
            addr,
            listener,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes the listening socket: from then on the service is down.
    pub fn stop(&mut self) {
        // SAFETY: shutdown on a valid fd; wakes the thread blocked in accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PeerEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` every 10 ms until it returns true or `limit` passes; the time it took.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Programs on `iface`'s ingress: TCX attachments (by id, queried from the kernel)
/// plus one line per legacy `tc` filter. Empty means nothing is attached.
pub fn ingress_programs(iface: &str) -> anyhow::Result<Vec<String>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut found = Vec::new();
    // Kernels before 6.6 have no TCX; the tc filter listing below covers them.
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    if tcx {
        match SchedClassifier::query_tcx(iface, TcAttachType::Ingress) {
            Ok((_, progs)) => found.extend(progs.iter().map(|p| format!("tcx prog {}", p.id()))),
            Err(e) => return Err(anyhow::anyhow!("querying TCX on {iface}: {e}")),
        }
    }
    // `tc` prints a header line per priority and a line per filter; the latter names
    // the program (`... id N name ...`), so one entry per program.
    let filters = run("tc", &["filter", "show", "dev", iface, "ingress"])?;
    found.extend(
        filters
            .lines()
            .filter(|l| l.contains(" id "))
            .map(String::from),
    );
    Ok(found)
}

/// The BPF programs and links a process holds open: (program ids, link ids).
pub fn bpf_ids_held_by(pid: u32) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let mut progs = Vec::new();
    let mut links = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("prog_id:") {
                progs.push(v.trim().parse()?);
            } else if let Some(v) = line.strip_prefix("link_id:") {
                links.push(v.trim().parse()?);
            }
        }
    }
    progs.sort_unstable();
    progs.dedup();
    links.sort_unstable();
    links.dedup();
    Ok((progs, links))
}

/// Whether a BPF program with this id is still loaded.
pub fn bpf_program_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether a BPF link with this id still exists.
pub fn bpf_link_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A loopback TCP port that is free right now.
pub fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// A client that connects to `addr` from a namespace every `every` (connect, write a
/// line, read something back, close) until stopped, counting tries and failures: the
/// measure of "no gap" while faults are injected.
pub struct Poller {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tries: Arc<std::sync::atomic::AtomicU64>,
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Poller {
    pub fn start(ns: &Netns, addr: SocketAddr, every: Duration) -> anyhow::Result<Poller> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let path = format!("/run/netns/{}", ns.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let tries = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, t, f) = (stop.clone(), tries.clone(), failures.clone());
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is valid for the call.
            let ok = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0;
            let _ = ready_tx.send(ok);
            if !ok {
                return;
            }
            while !s.load(Ordering::Relaxed) {
                let started = Instant::now();
                t.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = poll_once(addr)
                    && let Ok(mut v) = f.lock()
                {
                    v.push((started, e));
                }
                thread::sleep(every.saturating_sub(started.elapsed()));
            }
        });
        if !ready_rx.recv().unwrap_or(false) {
            bail!("setns({path}) failed");
        }
        Ok(Poller {
            stop,
            tries,
            failures,
            handle: Some(handle),
        })
    }

    pub fn tries(&self) -> u64 {
        self.tries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Each failure: when it started and what happened.
    pub fn failures(&self) -> Vec<(Instant, String)> {
        self.failures.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Stops and returns (tries, failures).
    pub fn finish(mut self) -> (u64, Vec<(Instant, String)>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        (self.tries(), self.failures())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// One round trip to an echo or peer-echo service: something must come back.
fn poll_once(addr: SocketAddr) -> Result<(), String> {
    let t = Duration::from_millis(500);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => Err("closed without an answer".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// Another tool's TC program on a bridge's ingress: lhb's `lhb_pass`, which does nothing
/// and passes every packet on. BPF run-time statistics are on while it lives, so
/// `runs()` counts the packets that reached it.
pub struct Neighbour {
    ebpf: aya::Ebpf,
    link: Option<aya::programs::tc::SchedClassifierLinkId>,
    _stats: std::os::fd::OwnedFd,
}

impl Neighbour {
    /// Attached after every program there: TCX's last, or a clsact filter with a
    /// priority below any `tc` assigns by itself (`clsact`; the qdisc is added if
    /// missing and left in place).
    pub fn attach(iface: &str, clsact: bool) -> anyhow::Result<Neighbour> {
        Self::attach_at(iface, clsact, false)
    }

    /// As `attach`, or before every program there (`first`).
    pub fn attach_at(iface: &str, clsact: bool, first: bool) -> anyhow::Result<Neighbour> {
        use aya::programs::{SchedClassifier, TcAttachType, tc};
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
        let mut ebpf = aya::Ebpf::load(lhb_daemon::kernel::object())?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("lhb_pass")
            .ok_or_else(|| anyhow::anyhow!("no lhb_pass in the object"))?
            .try_into()?;
        prog.load()?;
        let options = if clsact {
            let _ = tc::qdisc_add_clsact(iface);
            tc::TcAttachOptions::Netlink(tc::NlOptions {
                priority: if first { 1 } else { 60000 },
                ..Default::default()
            })
        } else if first {
            tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::first())
        } else {
            tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::last())
        };
        let link = prog.attach_with_options(iface, TcAttachType::Ingress, options)?;
        Ok(Neighbour {
            ebpf,
            link: Some(link),
            _stats: stats,
        })
    }

    fn info(&self) -> anyhow::Result<aya::programs::ProgramInfo> {
        let prog: &aya::programs::SchedClassifier = self
            .ebpf
            .program("lhb_pass")
            .ok_or_else(|| anyhow::anyhow!("no lhb_pass"))?
            .try_into()?;
        Ok(prog.info()?)
    }

    /// How many packets the program has run on.
    pub fn runs(&self) -> anyhow::Result<u64> {
        Ok(self.info()?.run_count())
    }

    /// The program's id.
    pub fn id(&self) -> anyhow::Result<u32> {
        Ok(self.info()?.id())
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        if let (Some(link), Some(aya::programs::Program::SchedClassifier(p))) =
            (self.link.take(), self.ebpf.program_mut("lhb_pass"))
        {
            let _ = p.detach(link);
        }
    }
}
