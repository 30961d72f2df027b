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
    /// The client address of every connection it accepted.
    seen: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>>,
    listener: Arc<TcpListener>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PeerEcho {
    pub fn start(bind: &str) -> anyhow::Result<PeerEcho> {
        let listener =
            Arc::new(TcpListener::bind(bind).with_context(|| format!("binding {bind}"))?);
        let addr = listener.local_addr()?;
        let l = listener.clone();
        let seen: Arc<std::sync::Mutex<Vec<std::net::IpAddr>>> = Default::default();
        let record = seen.clone();
        let thread = thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { break };
                if let (Ok(p), Ok(mut v)) = (c.peer_addr(), record.lock()) {
                    v.push(p.ip());
                }
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
            seen,
            listener,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The client addresses of the connections accepted so far, in order.
    pub fn seen(&self) -> Vec<std::net::IpAddr> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
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

/// Another tool's TC program on a bridge's ingress: an empty classifier (two
/// instructions: return TC_ACT_UNSPEC, so the packet goes on to the next program and
/// the stack). BPF run-time statistics are on while it lives, so `runs()` counts the
/// packets that reached it.
///
/// Loaded with bpf(2) from its instructions rather than from lhb's object: the bench in
/// `xtask` uses it too, and xtask must build on a machine where the eBPF toolchain is
/// not installed yet (it is what installs it).
pub struct Neighbour {
    prog: aya::programs::SchedClassifier,
    link: Option<aya::programs::tc::SchedClassifierLinkId>,
    _stats: std::os::fd::OwnedFd,
}

/// The program's name, as `bpftool prog` and BPF stats show it.
pub const NEIGHBOUR_NAME: &str = "lhb_pass";

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
        let fd = load_empty_classifier()?;
        // aya adopts a loaded program only through a pin; the pin goes at once, the
        // program lives as long as aya's fd.
        let pin = std::path::Path::new("/sys/fs/bpf")
            .join(format!("lhb-test-neighbour-{}-{iface}", std::process::id()));
        let _ = std::fs::remove_file(&pin);
        pin_object(&fd, &pin)?;
        let adopted = SchedClassifier::from_pin(&pin);
        let _ = std::fs::remove_file(&pin);
        let mut prog = adopted?;
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
            prog,
            link: Some(link),
            _stats: stats,
        })
    }

    /// How many packets the program has run on.
    pub fn runs(&self) -> anyhow::Result<u64> {
        Ok(self.prog.info()?.run_count())
    }

    /// The program's id.
    pub fn id(&self) -> anyhow::Result<u32> {
        Ok(self.prog.info()?.id())
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            let _ = self.prog.detach(link);
        }
    }
}

/// `bpf(2)` through libc: neither aya nor rustix loads a program from raw instructions.
fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, writable bpf_attr prefix of the size passed; the
    // kernel zero-extends a shorter one.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_PROG_LOAD of `r0 = -1 (TC_ACT_UNSPEC); exit` as a SCHED_CLS program.
fn load_empty_classifier() -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // Kernels before 5.11 charge programs to RLIMIT_MEMLOCK (EPERM past it), as lhb
    // itself knows (kernel.rs, bump_memlock_rlimit).
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct; failing leaves the limit as it was.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    // BPF_ALU64|BPF_MOV|BPF_K into r0, imm -1; BPF_JMP|BPF_EXIT.
    let insns: [u8; 16] = [
        0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x95, 0, 0, 0, 0, 0, 0, 0,
    ];
    let license = c"GPL";
    // union bpf_attr, PROG_LOAD: prog_type@0 insn_cnt@4 insns@8 license@16 ...
    // prog_name@48 (16 bytes); the rest zero.
    let mut attr = [0u8; 72];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SCHED_CLS.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..48 + NEIGHBOUR_NAME.len()].copy_from_slice(NEIGHBOUR_NAME.as_bytes());
    let fd = bpf(BPF_PROG_LOAD, &mut attr)
        .map_err(|e| anyhow::anyhow!("loading the empty TC program: {e}"))?;
    // SAFETY: a fresh fd the kernel just returned, owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// BPF_OBJ_PIN of `fd` at `path`.
fn pin_object(fd: &std::os::fd::OwnedFd, path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _};
    const BPF_OBJ_PIN: libc::c_long = 6;
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // pathname@0 bpf_fd@8 file_flags@12.
    let mut attr = [0u8; 16];
    attr[0..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    bpf(BPF_OBJ_PIN, &mut attr)
        .map_err(|e| anyhow::anyhow!("pinning the empty TC program at {}: {e}", path.display()))?;
    Ok(())
}
