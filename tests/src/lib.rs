//! A testbed of real network namespaces, bridges and veths, and the pieces the
//! end-to-end tests, `cargo xtask demo` and `cargo xtask bench` build on.
//!
//! Everything created here carries a name that starts with [`PREFIX`] and is removed by a
//! guard's `Drop`, so a failing test still leaves the machine clean and any leftover is
//! easy to find (`ip netns list | grep lhbt`).

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub mod docker;

/// Every namespace, bridge and veth made here starts with this.
pub const PREFIX: &str = "lhbt";

/// Runs a command to completion; a failure is an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(|_| ())
}

/// Best-effort removal for guards: the object may already be gone.
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A network namespace, deleted on drop (with the veth ends inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        ip_quiet(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let handle = thread::spawn(move || -> anyhow::Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only; the fd is valid for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// A command run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip_quiet(&["netns", "del", &self.name]);
    }
}

/// A link in the host namespace (bridge or veth), deleted on drop.
pub struct HostLink {
    pub name: String,
}

impl HostLink {
    pub fn ifindex(&self) -> anyhow::Result<u32> {
        let s = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.name))
            .with_context(|| format!("ifindex of {}", self.name))?;
        Ok(s.trim().parse()?)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        ip_quiet(&["link", "del", &self.name]);
    }
}

/// Creates bridge `name` with the given addresses (CIDR), up.
pub fn bridge(name: &str, addrs: &[&str]) -> anyhow::Result<HostLink> {
    ip_quiet(&["link", "del", name]);
    // A fixed address, as Docker and libvirt give their bridges: otherwise the bridge
    // takes the lowest address of its ports, and plugging a port in or out changes the
    // gateway's MAC under the containers' neighbour caches.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mac = format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h as u8,
        (h >> 8) as u8,
        (h >> 16) as u8,
        (h >> 24) as u8,
        (h >> 32) as u8
    );
    ip(&["link", "add", name, "address", &mac, "type", "bridge"])?;
    let link = HostLink {
        name: name.to_string(),
    };
    for a in addrs {
        add_addr(name, a)?;
    }
    ip(&["link", "set", name, "up"])?;
    Ok(link)
}

/// Adds an address without duplicate address detection, so IPv6 is usable at once.
pub fn add_addr(dev: &str, cidr: &str) -> anyhow::Result<()> {
    if cidr.contains(':') {
        ip(&["addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ip(&["addr", "add", cidr, "dev", dev])
    }
}

/// Joins `ns` to the host through a veth pair: host end `host_end` (enslaved to `master`
/// if given), namespace end `eth0` with `addrs` and default routes via `gateways`.
pub fn plug(
    ns: &Netns,
    host_end: &str,
    master: Option<&str>,
    addrs: &[&str],
    gateways: &[&str],
) -> anyhow::Result<HostLink> {
    ip_quiet(&["link", "del", host_end]);
    ip(&[
        "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    let link = HostLink {
        name: host_end.to_string(),
    };
    if let Some(m) = master {
        ip(&["link", "set", host_end, "master", m])?;
    }
    ip(&["link", "set", host_end, "up"])?;
    for a in addrs {
        let mut args = vec!["-n", &ns.name, "addr", "add", a, "dev", "eth0"];
        if a.contains(':') {
            args.push("nodad");
        }
        ip(&args)?;
    }
    ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
    for gw in gateways {
        let fam = if gw.contains(':') { "-6" } else { "-4" };
        ip(&["-n", &ns.name, fam, "route", "add", "default", "via", gw])?;
    }
    Ok(link)
}

/// The standard topology of TESTBED.md, numbered so parallel tests never collide:
/// - bridge `lhbt<n>br` with gateway 10.201.<n>.1 and fd00:201:<n>::1, one "container"
///   namespace on it (10.201.<n>.2);
/// - an "outside" namespace routed to the host through its own veth (10.202.<n>.2, host
///   side 10.202.<n>.1), not on the bridge;
/// - a "neighbour" bridge `lhbt<n>nb` (10.203.<n>.1) with a namespace of its own, for
///   which no rule exists.
pub struct Lab {
    pub n: u8,
    pub container: Netns,
    pub outside: Netns,
    pub neighbour: Netns,
    // Dropped after the namespaces (field order), taking what is left with them.
    pub links: Vec<HostLink>,
}

impl Lab {
    pub fn new(n: u8) -> anyhow::Result<Lab> {
        let p = format!("{PREFIX}{n}");
        let container = Netns::new(&format!("{p}c"))?;
        let outside = Netns::new(&format!("{p}o"))?;
        let neighbour = Netns::new(&format!("{p}n"))?;
        let mut lab = Lab {
            n,
            container,
            outside,
            neighbour,
            links: Vec::new(),
        };
        let br = lab.bridge_name();
        lab.links.push(bridge(
            &br,
            &[&format!("10.201.{n}.1/24"), &format!("fd00:201:{n}::1/64")],
        )?);
        let c_addrs = [format!("10.201.{n}.2/24"), format!("fd00:201:{n}::2/64")];
        let c_gws = [format!("10.201.{n}.1"), format!("fd00:201:{n}::1")];
        lab.links.push(plug(
            &lab.container,
            &format!("{p}cv"),
            Some(&br),
            &[&c_addrs[0], &c_addrs[1]],
            &[&c_gws[0], &c_gws[1]],
        )?);
        let ov = plug(
            &lab.outside,
            &format!("{p}ov"),
            None,
            &[&format!("10.202.{n}.2/24")],
            &[&format!("10.202.{n}.1")],
        )?;
        add_addr(&ov.name, &format!("10.202.{n}.1/24"))?;
        lab.links.push(ov);
        let nb = format!("{p}nb");
        lab.links.push(bridge(&nb, &[&format!("10.203.{n}.1/24")])?);
        lab.links.push(plug(
            &lab.neighbour,
            &format!("{p}nv"),
            Some(&nb),
            &[&format!("10.203.{n}.2/24")],
            &[&format!("10.203.{n}.1")],
        )?);
        Ok(lab)
    }

    pub fn bridge_name(&self) -> String {
        format!("{PREFIX}{}br", self.n)
    }
    /// The bridge's current ifindex (a re-created bridge has a new one).
    pub fn bridge_ifindex(&self) -> anyhow::Result<u32> {
        let br = self.bridge_name();
        self.links
            .iter()
            .find(|l| l.name == br)
            .context("bridge guard missing")?
            .ifindex()
    }
    pub fn container_veth(&self) -> String {
        format!("{PREFIX}{}cv", self.n)
    }
    pub fn gateway(&self) -> IpAddr {
        format!("10.201.{}.1", self.n)
            .parse()
            .expect("valid literal")
    }
    pub fn gateway6(&self) -> IpAddr {
        format!("fd00:201:{}::1", self.n)
            .parse()
            .expect("valid literal")
    }
    pub fn container_ip(&self) -> IpAddr {
        format!("10.201.{}.2", self.n)
            .parse()
            .expect("valid literal")
    }
    pub fn container_ip6(&self) -> IpAddr {
        format!("fd00:201:{}::2", self.n)
            .parse()
            .expect("valid literal")
    }
    /// The host's address on the outside link.
    pub fn host_outside_ip(&self) -> IpAddr {
        format!("10.202.{}.1", self.n)
            .parse()
            .expect("valid literal")
    }
    /// The host's address on the neighbour bridge.
    pub fn neighbour_gateway(&self) -> IpAddr {
        format!("10.203.{}.1", self.n)
            .parse()
            .expect("valid literal")
    }

    /// Deletes and re-creates the bridge with the same name and addresses (new ifindex),
    /// and puts the container's veth back on it, as Docker does when it re-creates a
    /// network. Returns when the bridge is fully set up again.
    pub fn recreate_bridge(&mut self) -> anyhow::Result<()> {
        let br = self.bridge_name();
        let pos = self
            .links
            .iter()
            .position(|l| l.name == br)
            .context("bridge guard missing")?;
        drop(self.links.remove(pos));
        let n = self.n;
        self.links.push(bridge(
            &br,
            &[&format!("10.201.{n}.1/24"), &format!("fd00:201:{n}::1/64")],
        )?);
        ip(&["link", "set", &self.container_veth(), "master", &br])?;
        Ok(())
    }
}

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

/// The `lhb` binary under test: `$LHB_BIN`, else target/debug/lhb of this workspace.
pub fn lhb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LHB_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lhb");
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// A running `lhb run`, stopped with SIGTERM on drop.
pub struct Lhb {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    // Dropped after the child is stopped (Drop below runs first).
    private: Private,
}

impl Lhb {
    /// Starts `lhb run ARGS` and waits until it says it is ready.
    pub fn start(args: &[&str]) -> anyhow::Result<Lhb> {
        Self::start_bin(&lhb_bin(), args)
    }

    /// Starts `BIN run ARGS` (e.g. a release build) and waits until it is ready.
    pub fn start_bin(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<Lhb> {
        Self::start_wrapped(&[], bin, args)
    }

    /// Like `start_bin`, run through `wrapper` (e.g. `setpriv ... --`).
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<Lhb> {
        Self::start_full(wrapper, bin, args, &[])
    }

    /// `lhb run ARGS` with extra environment variables (NOTIFY_SOCKET, ...).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Lhb> {
        Self::start_full(&[], &lhb_bin(), args, env)
    }

    /// Starts the daemon without waiting for it to be ready.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Lhb> {
        Self::spawn_full(&[], &lhb_bin(), args, env).map(|(l, _)| l)
    }

    fn start_full(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Lhb> {
        let (mut lhb, rx) = Self::spawn_full(wrapper, bin, args, env)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(lhb);
            }
            if let Some(status) = lhb.child.try_wait()? {
                thread::sleep(Duration::from_millis(50));
                bail!("lhb exited with {status} before ready:\n{}", lhb.log());
            }
            if Instant::now() > deadline {
                bail!("lhb not ready after 20 s:\n{}", lhb.log());
            }
        }
    }

    fn spawn_full(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Lhb, mpsc::Receiver<()>)> {
        let private = Private::new(args)?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .arg("run")
            .args(no_host_config(args))
            .args(private.args())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let l = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready:") {
                    let _ = tx.send(());
                }
                if let Ok(mut v) = l.lock() {
                    v.push(line);
                }
            }
        });
        Ok((
            Lhb {
                child,
                log,
                private,
            },
            rx,
        ))
    }

    /// SIGKILL: a crash, nothing cleaned up by lhb itself.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The control socket this daemon listens on.
    pub fn control(&self) -> String {
        self.private.control.display().to_string()
    }

    /// Its pin directory (bpffs).
    pub fn pin_dir(&self) -> PathBuf {
        self.private.pins.clone()
    }

    /// Its metrics socket (the default: beside the control socket).
    pub fn metrics_socket(&self) -> PathBuf {
        self.private.control.with_file_name("metrics.sock")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|v| v.join("\n")).unwrap_or_default()
    }

    /// `lhb status --json` of this daemon.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (ok, json, err) = lhb_check(&["status", "--json", "--control", &self.control()])?;
        anyhow::ensure!(ok, "lhb status: {err}");
        Ok(serde_json::from_str(&json)?)
    }

    /// SIGTERM, then the exit status (SIGKILL after 10 s).
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("lhb ignored SIGTERM for 10 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lhb {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

/// A directory of one test daemon's own (control and metrics sockets), so parallel
/// daemons never meet; removed with it.
pub struct Private {
    dir: PathBuf,
    control: PathBuf,
    given: bool,
    /// bpffs directory for the daemon's pinned links (--pin-dir).
    pins: PathBuf,
    pins_given: bool,
}

impl Private {
    fn new(args: &[&str]) -> anyhow::Result<Private> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let given = args.iter().position(|a| *a == "--control");
        let control = match given {
            Some(i) => PathBuf::from(args.get(i + 1).copied().unwrap_or_default()),
            None => dir.join("lhb.sock"),
        };
        let pins_at = args.iter().position(|a| *a == "--pin-dir");
        let pins = match pins_at {
            Some(i) => PathBuf::from(args.get(i + 1).copied().unwrap_or_default()),
            None => PathBuf::from(format!("/sys/fs/bpf/{PREFIX}-{}-{n}", std::process::id())),
        };
        Ok(Private {
            dir,
            control,
            given: given.is_some(),
            pins,
            pins_given: pins_at.is_some(),
        })
    }

    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if !self.given {
            a.extend(["--control".into(), self.control.display().to_string()]);
        }
        if !self.pins_given {
            a.extend(["--pin-dir".into(), self.pins.display().to_string()]);
        }
        a
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Pins a crashed or --keep-on-exit daemon left: removing them detaches.
        if !self.pins_given {
            let _ = std::fs::remove_dir_all(&self.pins);
        }
    }
}

/// `--config /dev/null` unless the test gives a config: the host's /etc/lhb/lhb.toml
/// must not leak into a test.
fn no_host_config(args: &[&str]) -> Vec<&'static str> {
    if args.contains(&"--config") {
        vec![]
    } else {
        vec!["--config", "/dev/null"]
    }
}

/// Runs `lhb ARGS` to completion: (exit status, stderr).
pub fn lhb_once(args: &[&str], wrapper: &[&str]) -> anyhow::Result<(ExitStatus, String)> {
    let mut cmd = if wrapper.is_empty() {
        Command::new(lhb_bin())
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(lhb_bin());
        c
    };
    let private = Private::new(args)?;
    if args.first() == Some(&"run") {
        cmd.arg("run")
            .args(no_host_config(args))
            .args(private.args())
            .args(&args[1..]);
    } else {
        cmd.args(args);
    }
    // A run that was meant to fail but started serves until killed: end it after 30 s
    // so the test fails on its assertion instead of hanging the suite.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap_or_default();
    Ok((status, stderr))
}

/// Runs a one-shot command (`lhb verify ...`, `lhb status ...`): (success, stdout,
/// stderr). A check's rules never come from the host's config file.
pub fn lhb_check(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let checks = matches!(args.first(), Some(&"verify") | Some(&"doctor"));
    let out = Command::new(lhb_bin())
        .args(args)
        .args(if checks { no_host_config(args) } else { vec![] })
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
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

/// A namespace that plays the host, for tests that change the host's firewall: the
/// machine running the tests keeps its own. Inside it a bridge `br0` (10.204.N.1/24);
/// a container namespace on that bridge, and an outside namespace routed to the host
/// (10.205.N.1).
pub struct HostLab {
    pub host: Netns,
    pub container: Netns,
    pub outside: Netns,
    pub n: u8,
}

impl HostLab {
    pub fn new(n: u8) -> anyhow::Result<HostLab> {
        let host = Netns::new(&format!("{PREFIX}{n}h"))?;
        let container = Netns::new(&format!("{PREFIX}{n}c"))?;
        let outside = Netns::new(&format!("{PREFIX}{n}o"))?;
        let lab = HostLab {
            host,
            container,
            outside,
            n,
        };
        let (gw, host_out) = (lab.gateway().to_string(), lab.host_outside_ip().to_string());
        lab.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["addr", "add", &format!("{gw}/24"), "dev", "br0"])?;
        lab.ip(&["link", "set", "br0", "up"])?;
        for (ns, veth, addr, route_via, master) in [
            (&lab.container, "cv", format!("10.204.{n}.2/24"), &gw, true),
            (
                &lab.outside,
                "ov",
                format!("10.205.{n}.2/24"),
                &host_out,
                false,
            ),
        ] {
            lab.ip(&[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            if master {
                lab.ip(&["link", "set", veth, "master", "br0"])?;
            } else {
                lab.ip(&["addr", "add", &format!("{host_out}/24"), "dev", veth])?;
            }
            lab.ip(&["link", "set", veth, "up"])?;
            run("ip", &["-n", &ns.name, "addr", "add", &addr, "dev", "eth0"])?;
            run("ip", &["-n", &ns.name, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &["-n", &ns.name, "route", "add", "default", "via", route_via],
            )?;
        }
        Ok(lab)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.host.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all).map(|_| ())
    }

    pub fn gateway(&self) -> IpAddr {
        IpAddr::from([10, 204, self.n, 1])
    }

    pub fn host_outside_ip(&self) -> IpAddr {
        IpAddr::from([10, 205, self.n, 1])
    }

    /// Runs a command in the host namespace; its stdout.
    pub fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", self.host.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a shell pipeline in the host namespace.
    pub fn shell(&self, script: &str) -> anyhow::Result<String> {
        self.sh(&["sh", "-c", script])
    }

    /// `lhb run ARGS` inside the host namespace, ready.
    pub fn lhb(&self, args: &[&str]) -> anyhow::Result<Lhb> {
        Lhb::start_wrapped(&["ip", "netns", "exec", &self.host.name], &lhb_bin(), args)
    }
}

/// Removes a pin directory a test chose itself (whatever a daemon left in it).
pub struct PinDir(pub String);

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        let d = format!("/sys/fs/bpf/lhbt-{name}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(&d);
        PinDir(d)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
