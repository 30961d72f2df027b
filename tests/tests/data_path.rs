//! End-to-end tests of both data paths: the real `lhb` binary, the real kernel, real
//! namespaces and bridges (see lhb_tests::Lab for the topology). Every test runs with
//! `--mode kernel`, with `--mode kernel` in the variant for kernels before 5.17 (SYN
//! tickets, forced with LHB_KERNEL_VARIANT=ticket on a newer kernel) and with `--mode
//! proxy` (the `both_paths!` list at the end); each owns a lab number (plus 200 for the
//! ticket variant, 100 for the proxy), so all run in parallel.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lhb_tests::{
    Lab, Lhb, Neighbour, Outcome, PeerEcho, bpf_ids_held_by, bpf_link_exists, bpf_program_exists,
    free_port, http_get, ingress_programs, lhb_once, redis::Redis, run, wait_until,
};

const T: Duration = Duration::from_secs(2);

/// The load tests (a thousand concurrent connections, ten thousand in a row) saturate
/// both CPUs; they run alone (`exclusive`), every other test beside the others
/// (`shared`), so no timing promise is judged on a machine starved by another test.
static LOAD: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().unwrap_or_else(|p| p.into_inner())
}

/// Declares every listed test once per data path (`kernel::name`, `proxy::name`), each
/// holding the guard `$lock` returns.
macro_rules! both_paths {
    ($lock:ident; $($name:ident),* $(,)?) => {
        mod kernel {
            $(#[test] fn $name() { let _g = crate::$lock(); crate::$name(&crate::KERNEL) })*
        }
        mod ticket {
            $(#[test] fn $name() { let _g = crate::$lock(); crate::$name(&crate::TICKET) })*
        }
        mod proxy {
            $(#[test] fn $name() { let _g = crate::$lock(); crate::$name(&crate::PROXY) })*
        }
    };
}

/// One data path under test.
struct Path {
    mode: &'static str,
    /// Added to each test's lab number.
    base: u8,
    /// The daemon's environment (the kernel path's variant).
    env: &'static [(&'static str, &'static str)],
}

const KERNEL: Path = Path {
    mode: "kernel",
    base: 0,
    env: &[],
};
const TICKET: Path = Path {
    mode: "kernel",
    base: 200,
    env: &[("LHB_KERNEL_VARIANT", "ticket")],
};
const PROXY: Path = Path {
    mode: "proxy",
    base: 100,
    env: &[],
};

impl Path {
    fn kernel(&self) -> bool {
        self.mode == "kernel"
    }

    fn lab(&self, n: u8) -> Lab {
        Lab::new(self.base + n).unwrap()
    }

    /// `lhb run --mode <this path> ARGS`.
    fn start(&self, args: &[&str]) -> Lhb {
        let mut all = vec!["--mode", self.mode];
        all.extend_from_slice(args);
        let lhb = Lhb::start_env(&all, self.env).unwrap();
        if self.kernel() {
            // The variant lhb must pick: from the kernel's version here, so the test
            // does not take the daemon's word (which asks the verifier) for it.
            let want = if self.env.is_empty() && has_ingress_ifindex() {
                "ingress-ifindex"
            } else {
                "syn-ticket"
            };
            let log = lhb.log();
            assert!(log.contains(&format!("{want} variant")), "{log}");
        }
        lhb
    }

    /// The source address the service sees: the container's own with the kernel path;
    /// from the proxy, the bridge's own loopback address (never 127.0.0.1) for an IPv4
    /// service, ::1 for an IPv6 one.
    fn peer_prefix(&self, lab: &Lab, container: IpAddr) -> String {
        if self.kernel() {
            match container {
                IpAddr::V4(_) => format!("peer={container}:"),
                IpAddr::V6(_) => format!("peer=[{container}]:"),
            }
        } else {
            match container {
                IpAddr::V4(_) => format!("peer={}:", proxy_source(lab)),
                IpAddr::V6(_) => "peer=[::1]:".into(),
            }
        }
    }

    /// What a connection to a stopped service gets: a refusal in-kernel; from the proxy,
    /// which accepted first, an immediate reset.
    fn down(&self, o: &Outcome) -> bool {
        *o == Outcome::Refused || (!self.kernel() && *o == Outcome::Reset)
    }
}

/// Whether this kernel's socket lookup has `ingress_ifindex` (Linux 5.17 and later).
fn has_ingress_ifindex() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    (major, minor) >= (5, 17)
}

/// The proxy's documented source for an IPv4 target: 127.128.0.0 + the bridge's ifindex.
fn proxy_source(lab: &Lab) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(0x7f80_0000 | lab.bridge_ifindex().unwrap())
}

fn get_from(ns: &lhb_tests::Netns, ip: IpAddr, port: u16) -> Outcome {
    let addr = SocketAddr::new(ip, port);
    ns.run(move || http_get(addr, T)).expect("thread in netns")
}

fn expose(lab: &Lab, spec: &str) -> String {
    format!("{}:{spec}", lab.bridge_name())
}

fn container_reaches_loopback_service_and_it_sees_the_container_address(p: &Path) {
    let lab = p.lab(1);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]);

    let want = p.peer_prefix(&lab, lab.container_ip());
    match get_from(&lab.container, lab.gateway(), svc.port()) {
        Outcome::Served(body) => assert!(body.starts_with(&want), "{body}"),
        other => panic!("container was not served: {other:?}"),
    }
    // A real client too.
    let out = lab
        .container
        .command("curl")
        .args(["-sS", "-m", "5"])
        .arg(format!("http://{}:{}/", lab.gateway(), svc.port()))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.starts_with(&want),
        "curl: {body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn without_lhb_the_service_is_refused(p: &Path) {
    let lab = p.lab(2);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    assert_eq!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Refused
    );
}

fn outside_and_neighbour_namespaces_are_refused_on_every_host_address(p: &Path) {
    let lab = p.lab(3);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]);
    // Served from the bridge, so a refusal below is the scoping at work.
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));

    let host_addrs = [
        lab.gateway(),
        lab.host_outside_ip(),
        lab.neighbour_gateway(),
    ];
    for ip in host_addrs {
        assert_eq!(
            get_from(&lab.outside, ip, svc.port()),
            Outcome::Refused,
            "outside -> {ip}"
        );
        assert_eq!(
            get_from(&lab.neighbour, ip, svc.port()),
            Outcome::Refused,
            "neighbour -> {ip}"
        );
    }
    // From the bridge itself, only the gateway address is served.
    for ip in [lab.host_outside_ip(), lab.neighbour_gateway()] {
        assert_eq!(
            get_from(&lab.container, ip, svc.port()),
            Outcome::Refused,
            "container -> {ip}"
        );
    }
}

fn gateway_port_can_map_to_another_loopback_port(p: &Path) {
    let lab = p.lab(4);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let outer = free_port("127.0.0.1").unwrap();
    let spec = expose(&lab, &format!("{outer}=127.0.0.1:{}", svc.port()));
    let _lhb = p.start(&["--expose-iface", &spec]);
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), outer),
        Outcome::Served(_)
    ));
    // The target port itself is not exposed on the gateway.
    assert_eq!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Refused
    );
}

fn service_down_is_refused_at_once_not_timed_out(p: &Path) {
    let lab = p.lab(5);
    let mut svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let port = svc.port();
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &port.to_string())]);
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), port),
        Outcome::Served(_)
    ));
    svc.stop();
    let started = Instant::now();
    let outcome = lab
        .container
        .run({
            let addr = SocketAddr::new(lab.gateway(), port);
            move || http_get(addr, Duration::from_secs(1))
        })
        .unwrap();
    assert!(p.down(&outcome), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // And served again once the service is back on the same port.
    let _svc2 = PeerEcho::start(&format!("127.0.0.1:{port}")).unwrap();
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), port),
        Outcome::Served(_)
    ));
}

fn a_re_created_bridge_is_served_again_within_a_second(p: &Path) {
    let mut lab = p.lab(6);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let lhb = p.start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]);
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));
    let old = lab.bridge_ifindex().unwrap();
    lab.recreate_bridge().unwrap();
    let new = lab.bridge_ifindex().unwrap();
    assert_ne!(old, new, "the bridge must really be a new one");
    let addr = SocketAddr::new(lab.gateway(), svc.port());
    let took = wait_until(Duration::from_secs(1), || {
        matches!(
            lab.container
                .run(move || http_get(addr, Duration::from_millis(200))),
            Ok(Outcome::Served(_))
        )
    });
    assert!(
        took.is_some(),
        "not served within 1 s of the bridge coming back; lhb log:\n{}",
        lhb.log()
    );
    eprintln!(
        "served again {:?} after the bridge was re-created",
        took.unwrap()
    );
}

fn ipv6_loopback_only_listener_is_reached_through_the_ipv6_gateway(p: &Path) {
    let lab = p.lab(7);
    let svc = PeerEcho::start("[::1]:0").unwrap();
    let spec = expose(&lab, &format!("{0}=[::1]:{0}", svc.port()));
    let _lhb = p.start(&["--expose-iface", &spec]);
    let want = p.peer_prefix(&lab, lab.container_ip6());
    match get_from(&lab.container, lab.gateway6(), svc.port()) {
        Outcome::Served(body) => assert!(body.starts_with(&want), "{body}"),
        other => panic!("not served over IPv6: {other:?}"),
    }
}

fn sigterm_detaches_everything(p: &Path) {
    let lab = p.lab(8);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let mut lhb = p.start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]);
    let br = lab.bridge_name();
    let (progs, links) = bpf_ids_held_by(lhb.pid()).unwrap();
    let listening = run("ss", &["-Hltn", &format!("sport = :{}", svc.port())]).unwrap();
    if p.kernel() {
        assert_eq!(
            progs.len(),
            2,
            "the TC and socket-lookup programs: {progs:?}"
        );
        assert_eq!(
            ingress_programs(&br).unwrap().len(),
            1,
            "not attached to the bridge"
        );
        // Nothing but the service itself listens on the port.
        assert_eq!(listening.lines().count(), 1, "{listening}");
    } else {
        assert!(
            progs.is_empty(),
            "the proxy loads no BPF program: {progs:?}"
        );
        // The proxy listens on each gateway (IPv4 and IPv6), bound to the bridge device,
        // and nowhere else.
        let proxy: Vec<&str> = listening
            .lines()
            .filter(|l| !l.contains(&format!("127.0.0.1:{}", svc.port())))
            .collect();
        assert_eq!(proxy.len(), 2, "{listening}");
        assert!(
            proxy[0].contains(&format!("{}%{br}:", lab.gateway()))
                && proxy[1].contains(&format!("[{}]%{br}:", lab.gateway6())),
            "not bound to the gateways on the bridge: {listening}"
        );
    }

    let status = lhb.stop().unwrap();
    assert!(status.success(), "exit status {status}:\n{}", lhb.log());
    assert_eq!(ingress_programs(&br).unwrap(), Vec::<String>::new());
    for id in progs {
        assert!(!bpf_program_exists(id), "program {id} still loaded");
    }
    for id in links {
        assert!(!bpf_link_exists(id), "link {id} still exists");
    }
    let listening = run("ss", &["-Hltn", &format!("sport = :{}", svc.port())]).unwrap();
    assert_eq!(listening.lines().count(), 1, "left listening: {listening}");
    assert_eq!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Refused
    );
}

fn redis_benchmark_through_the_gateway_has_no_errors(p: &Path) {
    let lab = p.lab(9);
    let redis = Redis::loopback(&["--protected-mode", "no"]).unwrap();
    let port = redis.port;
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &port.to_string())]);
    let out = lab
        .container
        .command("redis-benchmark")
        .args(["-h", &lab.gateway().to_string(), "-p", &port.to_string()])
        .args(["-n", "100000", "-c", "20", "-t", "set,get", "--csv"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {stderr}");
    assert!(
        !stderr.to_lowercase().contains("error") && !stdout.to_lowercase().contains("error"),
        "errors: {stdout} {stderr}"
    );
    // One CSV row per test with its request rate.
    for test in ["\"SET\"", "\"GET\""] {
        let row = stdout.lines().find(|l| l.starts_with(test));
        let rps: f64 = row
            .and_then(|r| r.split(',').nth(1))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("no {test} row in: {stdout}"));
        assert!(rps > 0.0);
    }
}

/// Each bad input: non-zero exit, one line naming the culprit, nothing attached.
fn bad_input_gets_a_clear_error_and_nothing_is_attached(p: &Path) {
    let lab = p.lab(10);
    let br = lab.bridge_name();
    let bare_name = format!("lhbt{}bare", p.base + 10);
    let bare = lhb_tests::bridge(&bare_name, &[]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "no rule to serve"),
        (
            vec![format!("{}:80", lab.container_veth())],
            "is not a bridge",
        ),
        (vec![format!("{bare_name}:80")], "has no IP address"),
        (vec![format!("{br}:0")], "port `0` is not in 1..=65535"),
        (
            vec![format!("{br}:65536")],
            "port `65536` is not in 1..=65535",
        ),
        (
            vec![format!("{br}:80=10.0.0.1:80")],
            "is not a loopback address",
        ),
        (
            vec![format!("{br}:80"), format!("{br}:80=81")],
            "given twice",
        ),
    ];
    for (specs, want) in cases {
        let mut args = vec!["run".to_string(), "--mode".into(), p.mode.into()];
        for s in &specs {
            args.push("--expose-iface".into());
            args.push(s.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (status, stderr) = lhb_once(&args, &[]).unwrap();
        assert!(!status.success(), "{specs:?} succeeded");
        assert!(
            stderr.contains(want),
            "{specs:?}: want `{want}` in: {stderr}"
        );
        assert_eq!(
            ingress_programs(&br).unwrap(),
            Vec::<String>::new(),
            "{specs:?}"
        );
    }
    drop(bare);

    if !p.kernel() {
        // A gateway port another program holds is not a start failure: see
        // security.rs, a_gateway_port_taken_first_is_reported_retried_and_the_rest_served.
        return;
    }
    // Without the capabilities, the error names them (and nothing is attached).
    let spec = format!("{br}:80");
    let (status, stderr) = lhb_once(
        &["run", "--mode", "kernel", "--expose-iface", &spec],
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-net_admin,-sys_admin",
            "--",
        ],
    )
    .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert_eq!(ingress_programs(&br).unwrap(), Vec::<String>::new());
}

fn sighup_reloads_the_config_and_a_bad_file_keeps_the_running_rules(p: &Path) {
    let lab = p.lab(11);
    let a = PeerEcho::start("127.0.0.1:0").unwrap();
    let b = PeerEcho::start("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("lhbt{}-{}", p.base + 11, std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lhb.toml");
    let rule = |port: u16| {
        format!(
            "[[expose]]\ninterface = \"{}\"\nport = {port}\n",
            lab.bridge_name()
        )
    };
    std::fs::write(&file, rule(a.port())).unwrap();
    let lhb = p.start(&["--config", file.to_str().unwrap()]);
    let served = |port| {
        matches!(
            get_from(&lab.container, lab.gateway(), port),
            Outcome::Served(_)
        )
    };
    assert!(served(a.port()));
    let hup = |lhb: &Lhb| unsafe { libc::kill(lhb.pid() as i32, libc::SIGHUP) };

    // A bad file: the error names the line, and the running rule keeps serving.
    std::fs::write(&file, format!("{}colour = 1\n", rule(b.port()))).unwrap();
    hup(&lhb);
    let logged = wait_until(Duration::from_secs(5), || {
        lhb.log().contains("config reload failed")
    });
    assert!(logged.is_some(), "{}", lhb.log());
    assert!(
        lhb.log().contains(":4: unknown field `colour`"),
        "{}",
        lhb.log()
    );
    assert!(served(a.port()));
    assert!(!served(b.port()));

    // A good file replaces the rules.
    std::fs::write(&file, rule(b.port())).unwrap();
    hup(&lhb);
    let switched = wait_until(Duration::from_secs(5), || {
        served(b.port()) && !served(a.port())
    });
    std::fs::remove_dir_all(&dir).ok();
    assert!(switched.is_some(), "{}", lhb.log());
}

/// A server that reads its client to EOF before it answers: only a correctly passed-on
/// half-close gets a reply.
fn eof_then_answer(bind: &str) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind(bind).unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        let reply = format!("got {} bytes", all.len());
        c.write_all(reply.as_bytes()).unwrap();
    });
    (addr, t)
}

fn half_close_is_passed_on_and_the_reply_still_flows(p: &Path) {
    let lab = p.lab(12);
    let (addr, server) = eof_then_answer("127.0.0.1:0");
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &addr.port().to_string())]);
    let gw = SocketAddr::new(lab.gateway(), addr.port());
    let reply = lab
        .container
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&gw, T).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&vec![7u8; 100_000]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            reply
        })
        .unwrap();
    server.join().unwrap();
    assert_eq!(reply, "got 100000 bytes");
}

/// Messages of every size, each echoed back: tiny ones, ones either side of the size
/// where the proxy switches from copying to splicing and back, and bulk ones. Every
/// byte must come back, in order, whatever way each message went.
fn messages_of_every_size_arrive_intact_both_ways(p: &Path) {
    let lab = p.lab(35);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut r = c.try_clone().unwrap();
        std::io::copy(&mut r, &mut c).unwrap();
    });
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &port.to_string())]);
    let gw = SocketAddr::new(lab.gateway(), port);
    let sizes: &[usize] = &[
        1, 100, 4095, 4096, 4097, 3, 65_536, 1_000_000, 17, 8192, 200_000, 1, 4096, 2,
    ];
    let s = lab
        .container
        .run(move || std::net::TcpStream::connect_timeout(&gw, T))
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut seed = 0x9e37_79b9_u32;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed as u8
    };
    let messages: Vec<Vec<u8>> = sizes
        .iter()
        .map(|&n| (0..n).map(|_| next()).collect())
        .collect();
    let mut w = s.try_clone().unwrap();
    let sent = messages.clone();
    // Writing and reading at once: an echo of a large message fills the buffers both
    // ways long before it is all written.
    let writer = std::thread::spawn(move || {
        for m in &sent {
            w.write_all(m).unwrap();
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut r = s;
    for (i, m) in messages.iter().enumerate() {
        let mut got = vec![0u8; m.len()];
        r.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("message {i} ({} bytes): {e}", m.len()));
        assert!(
            got == *m,
            "message {i} ({} bytes) came back altered",
            m.len()
        );
    }
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{} bytes more than were sent", rest.len());
    writer.join().unwrap();
    echo.join().unwrap();
}

/// Bytes a socket has sent that its peer has not acknowledged yet.
fn unacked(s: &std::net::TcpStream) -> i32 {
    use std::os::fd::AsRawFd as _;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the valid pointer.
    unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    n
}

/// Redis answers a protocol error and closes with the client's input unread, which
/// makes its kernel send a reset right behind the answer. The answer must still reach
/// the client, which is still writing when it arrives.
fn a_reply_followed_by_a_reset_reaches_the_client(p: &Path) {
    let lab = p.lab(15);
    let redis = Redis::loopback(&["--protected-mode", "no"]).unwrap();
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &redis.port.to_string())]);
    let gw = SocketAddr::new(lab.gateway(), redis.port);
    for round in 0..10 {
        let got = lab
            .container
            .run(move || {
                let mut s = std::net::TcpStream::connect_timeout(&gw, T).unwrap();
                s.write_all(b"*1\r\n$x\r\n").unwrap();
                // Keep writing for a while, as a pipelining client would, and ignore
                // the errors the reset causes.
                let until = Instant::now() + Duration::from_millis(150);
                let pings = b"*1\r\n$4\r\nPING\r\n".repeat(256);
                while Instant::now() < until && s.write_all(&pings).is_ok() {}
                s.set_read_timeout(Some(T)).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                String::from_utf8_lossy(&got).into_owned()
            })
            .unwrap();
        assert!(
            got.starts_with("-ERR Protocol error"),
            "round {round}: the client got {got:?}"
        );
    }
}

/// Several MiB still on their way to a slow client when the service resets: all of it
/// arrives, intact, and then the reset.
fn a_large_reply_in_flight_when_the_service_resets_arrives_intact(p: &Path) {
    const SIZE: usize = 6 << 20;
    let lab = p.lab(16);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut hello = [0u8; 5];
        c.read_exact(&mut hello).unwrap();
        c.write_all(&payload(7, SIZE)).unwrap();
        // Everything is handed over to the peer before the reset, which otherwise
        // discards what the service's own kernel still queues.
        let until = Instant::now() + Duration::from_secs(20);
        while unacked(&c) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    });
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &port.to_string())]);
    let gw = SocketAddr::new(lab.gateway(), port);
    let (got, end) = lab
        .container
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&gw, T).unwrap();
            s.write_all(b"hello").unwrap();
            // Slow at first: the reply piles up in every buffer on the way.
            std::thread::sleep(Duration::from_millis(300));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut got = Vec::with_capacity(SIZE);
            let mut buf = vec![0u8; 64 * 1024];
            let end = loop {
                match s.read(&mut buf) {
                    Ok(0) => break "eof".to_string(),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break format!("{:?}", e.kind()),
                }
            };
            (got, end)
        })
        .unwrap();
    server.join().unwrap();
    assert_eq!(got.len(), SIZE, "bytes received (then {end})");
    assert_eq!(digest(&got), digest(&payload(7, SIZE)), "checksum");
    assert_eq!(
        end, "ConnectionReset",
        "the reset is passed on after the data"
    );
}

/// The client sends, then resets while the service is still sending: the service gets
/// every byte the client sent and then sees the reset.
fn a_client_reset_reaches_the_service_and_nothing_it_sent_is_lost(p: &Path) {
    const SENT: usize = 256 * 1024;
    let lab = p.lab(17);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || -> (u64, String) {
        let (mut c, _) = l.accept().unwrap();
        let mut got = vec![0u8; SENT];
        c.read_exact(&mut got).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![1u8; 64 * 1024];
        let end = loop {
            if let Err(e) = c.write_all(&chunk) {
                break format!("{:?}", e.kind());
            }
        };
        (digest(&got), end)
    });
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &port.to_string())]);
    let gw = SocketAddr::new(lab.gateway(), port);
    lab.container
        .run(move || {
            let mut s = std::net::TcpStream::connect_timeout(&gw, T).unwrap();
            s.write_all(&payload(3, SENT)).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            s.read_exact(&mut buf).unwrap();
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        })
        .unwrap();
    let (sent, end) = server.join().unwrap();
    assert_eq!(sent, digest(&payload(3, SENT)), "what the client sent");
    assert!(
        end == "ConnectionReset" || end == "BrokenPipe",
        "the service saw {end}"
    );
}

/// An echo server on loopback, a thread per connection, with a backlog for a burst of
/// a thousand SYNs (std's 128 would drop them with either data path, or none).
fn echo_server(bind: &str) -> SocketAddr {
    let addr: SocketAddr = bind.parse().unwrap();
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    sock.bind(&addr.into()).unwrap();
    sock.listen(4096).unwrap();
    let l: std::net::TcpListener = sock.into();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut r = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut c);
                    let _ = c.shutdown(std::net::Shutdown::Write);
                })
                .unwrap();
        }
    });
    addr
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

fn a_thousand_concurrent_connections_move_a_mebibyte_each_intact(p: &Path) {
    const CONNS: u64 = 1000;
    const SIZE: usize = 1 << 20;
    let lab = p.lab(13);
    let echo = echo_server("127.0.0.1:0");
    let _lhb = p.start(&["--expose-iface", &expose(&lab, &echo.port().to_string())]);
    let gw = SocketAddr::new(lab.gateway(), echo.port());
    let bad = lab
        .container
        .run(move || {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..CONNS)
                    .map(|i| {
                        std::thread::Builder::new()
                            .stack_size(256 * 1024)
                            .spawn_scoped(s, move || -> Result<(), String> {
                                let data = payload(i, SIZE);
                                let mut c = std::net::TcpStream::connect_timeout(
                                    &gw,
                                    Duration::from_secs(10),
                                )
                                .map_err(|e| format!("connect {i}: {e}"))?;
                                c.set_read_timeout(Some(Duration::from_secs(60))).ok();
                                let mut w = c.try_clone().map_err(|e| e.to_string())?;
                                let sent = digest(&data);
                                let writer = std::thread::Builder::new()
                                    .stack_size(64 * 1024)
                                    .spawn(move || {
                                        let r = w.write_all(&data);
                                        let _ = w.shutdown(std::net::Shutdown::Write);
                                        r
                                    })
                                    .map_err(|e| e.to_string())?;
                                let mut back = Vec::with_capacity(SIZE);
                                c.read_to_end(&mut back)
                                    .map_err(|e| format!("read {i}: {e}"))?;
                                writer
                                    .join()
                                    .map_err(|_| "writer panicked")?
                                    .map_err(|e| format!("write {i}: {e}"))?;
                                if back.len() != SIZE || digest(&back) != sent {
                                    return Err(format!(
                                        "connection {i}: {} bytes back, checksum differs",
                                        back.len()
                                    ));
                                }
                                Ok(())
                            })
                            .unwrap()
                    })
                    .collect();
                handles
                    .into_iter()
                    .filter_map(|h| h.join().unwrap().err())
                    .collect::<Vec<String>>()
            })
        })
        .unwrap();
    assert!(
        bad.is_empty(),
        "{} failed, first: {:?}",
        bad.len(),
        bad.first()
    );
}

fn the_daemon_holds_no_more_fds_after_ten_thousand_connections(p: &Path) {
    let lab = p.lab(14);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    // Without Docker: its event stream's connection may open a moment after "ready" on a
    // loaded machine, which is not what this test measures (fds per connection).
    let lhb = p.start(&[
        "--no-docker",
        "--expose-iface",
        &expose(&lab, &svc.port().to_string()),
    ]);
    // What each fd is (socket:[inode], anon_inode:[...], a path), to name a leak.
    let open_fds = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", lhb.pid()))
            .unwrap()
            .flatten()
            .map(|e| {
                std::fs::read_link(e.path())
                    .map(|t| t.display().to_string())
                    .unwrap_or_default()
            })
            .collect()
    };
    let fds = || open_fds().len();
    let before = open_fds();
    let baseline = before.len();
    let gw = SocketAddr::new(lab.gateway(), svc.port());
    let failures: Vec<Outcome> = lab
        .container
        .run(move || {
            // A generous timeout: other tests may be moving gigabytes on the same 2 CPUs.
            (0..10_000)
                .map(|_| http_get(gw, Duration::from_secs(10)))
                .filter(|o| !matches!(o, Outcome::Served(_)))
                .collect()
        })
        .unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    let settled = wait_until(Duration::from_secs(5), || fds() <= baseline);
    assert!(
        settled.is_some(),
        "fds: {before:?} before, {:?} after",
        open_fds()
    );
}

mod light {
    both_paths!(shared;
    container_reaches_loopback_service_and_it_sees_the_container_address,
    without_lhb_the_service_is_refused,
    outside_and_neighbour_namespaces_are_refused_on_every_host_address,
    gateway_port_can_map_to_another_loopback_port,
    service_down_is_refused_at_once_not_timed_out,
    a_re_created_bridge_is_served_again_within_a_second,
    ipv6_loopback_only_listener_is_reached_through_the_ipv6_gateway,
    sigterm_detaches_everything,
    redis_benchmark_through_the_gateway_has_no_errors,
    bad_input_gets_a_clear_error_and_nothing_is_attached,
    sighup_reloads_the_config_and_a_bad_file_keeps_the_running_rules,
    half_close_is_passed_on_and_the_reply_still_flows,
    messages_of_every_size_arrive_intact_both_ways,
    a_reply_followed_by_a_reset_reaches_the_client,
    a_large_reply_in_flight_when_the_service_resets_arrives_intact,
    a_client_reset_reaches_the_service_and_nothing_it_sent_is_lost,
    );
}

mod load {
    both_paths!(exclusive;
        a_thousand_concurrent_connections_move_a_mebibyte_each_intact,
        the_daemon_holds_no_more_fds_after_ten_thousand_connections,
    );
}

/// Without CAP_BPF the kernel path cannot load: auto mode says why and serves through
/// the proxy.
#[test]
fn auto_mode_falls_back_to_the_proxy_without_cap_bpf_and_serves() {
    let _g = shared();
    let lab = Lab::new(30).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec = expose(&lab, &svc.port().to_string());
    let lhb = Lhb::start_wrapped(
        &["setpriv", "--bounding-set", "-bpf,-sys_admin", "--"],
        &lhb_tests::lhb_bin(),
        &["--mode", "auto", "--expose-iface", &spec],
    )
    .unwrap();
    let log = lhb.log();
    assert!(
        log.contains("kernel path unavailable") && log.contains("CAP_BPF"),
        "{log}"
    );
    assert!(log.contains("data path: proxy"), "{log}");
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));
    assert!(bpf_ids_held_by(lhb.pid()).unwrap().0.is_empty());
}

/// Past --max-connections the proxy refuses (a reset), logs it, and serves again once
/// connections end.
#[test]
fn proxy_connection_limit_refuses_logs_and_recovers() {
    let _g = shared();
    let lab = Lab::new(31).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec = expose(&lab, &svc.port().to_string());
    let lhb = Lhb::start(&[
        "--mode",
        "proxy",
        "--max-connections",
        "2",
        "--expose-iface",
        &spec,
    ])
    .unwrap();
    let gw = SocketAddr::new(lab.gateway(), svc.port());
    // Two connections that send nothing: the service waits for their request.
    let held = lab
        .container
        .run(move || {
            [
                std::net::TcpStream::connect_timeout(&gw, T).unwrap(),
                std::net::TcpStream::connect_timeout(&gw, T).unwrap(),
            ]
        })
        .unwrap();
    let refused = wait_until(Duration::from_secs(5), || {
        get_from(&lab.container, gw.ip(), gw.port()) == Outcome::Reset
    });
    assert!(refused.is_some(), "a third connection was not refused");
    // The log line is written after the reset goes out: give it a moment.
    assert!(
        wait_until(Duration::from_secs(2), || lhb
            .log()
            .contains("connection limit (2) reached"))
        .is_some(),
        "{}",
        lhb.log()
    );
    drop(held);
    let served = wait_until(Duration::from_secs(5), || {
        matches!(
            get_from(&lab.container, gw.ip(), gw.port()),
            Outcome::Served(_)
        )
    });
    assert!(
        served.is_some(),
        "not served again after the held connections ended"
    );
}

/// The attachment kernels before 6.6 get (clsact qdisc + netlink filter), forced here:
/// it serves, and on exit the qdisc lhb created is gone with its filter.
#[test]
fn the_clsact_attachment_serves_and_is_removed_on_exit() {
    let _g = shared();
    let lab = Lab::new(32).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec = expose(&lab, &svc.port().to_string());
    let mut lhb = Lhb::start_wrapped(
        &["env", "LHB_ATTACH=clsact"],
        &lhb_tests::lhb_bin(),
        &["--mode", "kernel", "--expose-iface", &spec],
    )
    .unwrap();
    assert!(lhb.log().contains("tc clsact"), "{}", lhb.log());
    let br = lab.bridge_name();
    let qdiscs = run("tc", &["qdisc", "show", "dev", &br]).unwrap();
    assert!(qdiscs.contains("clsact"), "{qdiscs}");
    assert_eq!(ingress_programs(&br).unwrap().len(), 1);
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));
    assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
    let qdiscs = run("tc", &["qdisc", "show", "dev", &br]).unwrap();
    assert!(!qdiscs.contains("clsact"), "left behind: {qdiscs}");
    assert_eq!(ingress_programs(&br).unwrap(), Vec::<String>::new());
}

/// A good neighbour, on TCX and on clsact: another tool's program on the same bridge
/// keeps seeing every packet while lhb serves, whether it came after lhb (which created
/// the clsact qdisc) or was there before it; lhb's exit leaves it attached and running.
#[test]
fn another_tools_program_on_the_bridge_keeps_running_beside_lhb() {
    let _g = shared();
    // TCX exists from 6.6 on; before, lhb attaches with clsact whatever it is asked.
    let tcx = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0));
    // (lab, clsact, the SYN-ticket variant)
    let modes: &[(u8, bool, bool)] = if tcx {
        &[(33, false, false), (34, true, false), (36, false, true)]
    } else {
        &[(34, true, false), (36, true, true)]
    };
    for &(n, clsact, ticket) in modes {
        let lab = Lab::new(n).unwrap();
        let br = lab.bridge_name();
        let svc = PeerEcho::start("127.0.0.1:0").unwrap();
        let spec = expose(&lab, &svc.port().to_string());
        let mut wrapper = vec!["env"];
        if clsact {
            wrapper.push("LHB_ATTACH=clsact");
        }
        if ticket {
            wrapper.push("LHB_KERNEL_VARIANT=ticket");
        }
        let start = || {
            Lhb::start_wrapped(
                &wrapper,
                &lhb_tests::lhb_bin(),
                &["--mode", "kernel", "--expose-iface", &spec],
            )
            .unwrap()
        };
        let connect = |n: usize| -> Vec<Outcome> {
            (0..n)
                .map(|_| get_from(&lab.container, lab.gateway(), svc.port()))
                .collect()
        };
        // A served connection sends at least SYN, ACK, request and FIN through the
        // bridge; a refused one its SYN.
        let runs_over = |nb: &Neighbour, want_served: bool, what: &str| {
            let least = if want_served { 30 } else { 10 };
            let before = nb.runs().unwrap();
            let outcomes = connect(10);
            let runs = nb.runs().unwrap() - before;
            assert!(
                outcomes
                    .iter()
                    .all(|o| matches!(o, Outcome::Served(_)) == want_served),
                "clsact {clsact}, {what}: {outcomes:?}"
            );
            assert!(
                runs >= least,
                "clsact {clsact}, {what}: the other program ran {runs} times for 10 connections"
            );
        };

        let mut lhb = start();
        let nb = Neighbour::attach(&br, clsact).unwrap();
        assert_eq!(ingress_programs(&br).unwrap().len(), 2);
        runs_over(&nb, true, "attached after lhb");
        assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
        assert_eq!(
            ingress_programs(&br).unwrap().len(),
            1,
            "clsact {clsact}: lhb's exit took the other program along"
        );
        runs_over(&nb, false, "after lhb's exit");

        let mut lhb = start();
        assert_eq!(ingress_programs(&br).unwrap().len(), 2);
        runs_over(&nb, true, "there before lhb");
        assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
        assert_eq!(ingress_programs(&br).unwrap().len(), 1);
        drop(nb);
        if clsact {
            // The qdisc is the test's to remove now (lhb left it: it held a filter).
            run("tc", &["qdisc", "del", "dev", &br, "clsact"]).unwrap();
        }
    }
}
