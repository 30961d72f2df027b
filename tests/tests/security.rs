//! What lhb promises about who reaches a service and as whom (README "Security model"):
//! the service never sees a container as a local process, a port another program took
//! first is reported and retried without stopping the rest, and the control and metrics
//! endpoints bound what a client can make lhb do.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use lhb_tests::{
    Lab, Lhb, Netns, Outcome, PeerEcho, free_port, http_get, lhb_check, redis::Redis, wait_until,
};

const T: Duration = Duration::from_secs(5);

fn get_from(ns: &Netns, ip: IpAddr, port: u16) -> Outcome {
    let addr = SocketAddr::new(ip, port);
    ns.run(move || http_get(addr, T)).expect("thread in netns")
}

/// 127.128.0.0 + the bridge's ifindex: the proxy's source for an IPv4 target.
fn proxy_source(lab: &Lab) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(
        0x7f80_0000 | lab.bridge_ifindex().unwrap(),
    ))
}

fn peer_of(o: Outcome) -> IpAddr {
    match o {
        Outcome::Served(body) => {
            let p = body
                .trim()
                .strip_prefix("peer=")
                .unwrap_or_else(|| panic!("{body}"));
            p.parse::<SocketAddr>()
                .unwrap_or_else(|_| panic!("{body}"))
                .ip()
        }
        other => panic!("not served: {other:?}"),
    }
}

/// Auto mode on a dual-stack bridge with an IPv4 target: the IPv4 gateway is served
/// in-kernel (the service sees the container), the IPv6 gateway through the proxy,
/// which connects from the bridge's own loopback address, never 127.0.0.1. `lhb status`
/// says what the service sees through each gateway.
#[test]
fn the_service_never_sees_a_proxied_container_as_127_0_0_1() {
    let lab = Lab::new(80).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec = format!("{}:{}", lab.bridge_name(), svc.port());
    let lhb = Lhb::start(&["--mode", "auto", "--expose-iface", &spec]).unwrap();

    assert_eq!(
        peer_of(get_from(&lab.container, lab.gateway(), svc.port())),
        lab.container_ip(),
        "kernel path"
    );
    let via6 = peer_of(get_from(&lab.container, lab.gateway6(), svc.port()));
    assert_eq!(via6, proxy_source(&lab), "proxy path");
    assert_ne!(via6, IpAddr::from([127, 0, 0, 1]));

    let st = lhb.status().unwrap();
    let gws = st["rules"][0]["gateways"].as_array().unwrap().clone();
    let seen = |path: &str| -> String {
        gws.iter()
            .find(|g| g["path"] == path)
            .and_then(|g| g["client_seen_as"].as_str())
            .unwrap_or_else(|| panic!("no {path} gateway in {gws:?}"))
            .to_string()
    };
    assert_eq!(seen("kernel"), "the container's own address");
    assert_eq!(seen("proxy"), proxy_source(&lab).to_string());
    let (_, table, _) = lhb_check(&["status", "--control", &lhb.control()]).unwrap();
    assert!(
        table.contains(&format!(
            "the service sees clients as {}",
            proxy_source(&lab)
        )),
        "{table}"
    );
}

/// A real Redis left in its default protected mode (no password) lets in only local
/// clients (127.0.0.1 and ::1). A container must be refused on every path: the kernel
/// path shows its own address, the proxy its bridge's loopback address.
#[test]
fn redis_in_protected_mode_refuses_containers_on_every_path() {
    let lab = Lab::new(81).unwrap();
    let port = free_port("127.0.0.1").unwrap();
    let _redis = Redis::start([127, 0, 0, 1].into(), port, &["--protected-mode", "yes"]).unwrap();
    // The local check that protected mode is on: the host itself is let in.
    assert_eq!(redis_ping(None, IpAddr::from([127, 0, 0, 1]), port), "PONG");

    for mode in ["auto", "proxy"] {
        let spec = format!("{}:{port}", lab.bridge_name());
        let _lhb = Lhb::start(&["--mode", mode, "--expose-iface", &spec]).unwrap();
        for gw in [lab.gateway(), lab.gateway6()] {
            let answer = redis_ping(Some(&lab.container), gw, port);
            assert!(
                answer.contains("DENIED") && answer.contains("protected mode"),
                "--mode {mode}, via {gw}: {answer}"
            );
        }
    }
}

/// `redis-cli PING` from `ns` (the host if None): its answer, errors included.
fn redis_ping(ns: Option<&Netns>, ip: IpAddr, port: u16) -> String {
    let mut cmd = match ns {
        Some(ns) => ns.command("redis-cli"),
        None => Command::new("redis-cli"),
    };
    let out = cmd
        .args(["-h", &ip.to_string(), "-p", &port.to_string(), "PING"])
        .output()
        .expect("redis-cli");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// A service that reads a PROXY protocol v2 header first and answers with the source
/// and destination it names, and the address the connection itself came from.
struct ProxyProtocolEcho {
    port: u16,
}

impl ProxyProtocolEcho {
    fn start(bind: &str) -> ProxyProtocolEcho {
        let l = TcpListener::bind(bind).unwrap();
        let port = l.local_addr().unwrap().port();
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { break };
                thread::spawn(move || {
                    let peer = c.peer_addr().unwrap();
                    c.set_read_timeout(Some(T)).unwrap();
                    // 16 bytes of fixed header, then the address block it announces.
                    let mut head = vec![0u8; 16];
                    if c.read_exact(&mut head).is_err() {
                        return;
                    }
                    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
                    head.resize(16 + len, 0);
                    let answer = match c.read_exact(&mut head[16..]) {
                        Err(e) => format!("short header: {e}"),
                        Ok(()) => match ppp::v2::Header::try_from(&head[..]) {
                            Ok(h) => match h.addresses {
                                ppp::v2::Addresses::IPv4(a) => format!(
                                    "src={}:{} dst={}:{}",
                                    a.source_address,
                                    a.source_port,
                                    a.destination_address,
                                    a.destination_port
                                ),
                                ppp::v2::Addresses::IPv6(a) => format!(
                                    "src=[{}]:{} dst=[{}]:{}",
                                    a.source_address,
                                    a.source_port,
                                    a.destination_address,
                                    a.destination_port
                                ),
                                other => format!("unexpected addresses {other:?}"),
                            },
                            Err(e) => format!("bad header: {e}"),
                        },
                    };
                    let _ = writeln!(c, "{answer} peer={peer}");
                });
            }
        });
        ProxyProtocolEcho { port }
    }
}

/// `proxy_protocol = true`: every connection starts with a PROXY v2 header naming the
/// container and the gateway it connected to, on both gateways, also with `--mode
/// kernel` (such a rule is always proxied: only the proxy can write the header).
#[test]
fn proxy_protocol_v2_names_the_container_to_the_service() {
    let lab = Lab::new(82).unwrap();
    let svc = ProxyProtocolEcho::start("127.0.0.1:0");
    let outer = free_port("127.0.0.1").unwrap();
    let dir = tempdir("pp");
    let cfg = dir.join("lhb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[expose]]\ninterface = \"{}\"\nport = {outer}\ntarget = {}\nproxy_protocol = true\n",
            lab.bridge_name(),
            svc.port
        ),
    )
    .unwrap();
    let lhb = Lhb::start(&["--mode", "kernel", "--config", cfg.to_str().unwrap()]).unwrap();
    assert!(lhb.log().contains("proxy_protocol = true"), "{}", lhb.log());
    let src = proxy_source(&lab);
    for (gw, client) in [
        (lab.gateway(), lab.container_ip()),
        (lab.gateway6(), lab.container_ip6()),
    ] {
        let to = SocketAddr::new(gw, outer);
        let line = lab
            .container
            .run(move || -> std::io::Result<(SocketAddr, String)> {
                let c = TcpStream::connect_timeout(&to, T)?;
                c.set_read_timeout(Some(T))?;
                let local = c.local_addr()?;
                let mut line = String::new();
                BufReader::new(c).read_line(&mut line)?;
                Ok((local, line))
            })
            .unwrap()
            .unwrap();
        let (local, line) = line;
        assert_eq!(local.ip(), client);
        let want = format!("src={local} dst={to} peer={src}:");
        assert!(line.starts_with(&want), "via {gw}: {line:?}, want {want:?}");
    }
    let st = lhb.status().unwrap();
    for g in st["rules"][0]["gateways"].as_array().unwrap() {
        assert_eq!(g["path"], "proxy", "{g}");
        assert!(
            g["client_seen_as"]
                .as_str()
                .unwrap()
                .contains("PROXY v2 header"),
            "{g}"
        );
    }
}

/// Another program bound the gateway port first (as a local user could, above 1023):
/// lhb starts anyway, serves its other rule, reports the held gateway in its log, in
/// `lhb status` and in `lhb doctor` (which names the process), and takes the address
/// within its retry backoff once it is free.
#[test]
fn a_gateway_port_taken_first_is_reported_retried_and_the_rest_served() {
    let lab = Lab::new(83).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let other = PeerEcho::start("127.0.0.1:0").unwrap();
    let gw = SocketAddr::new(lab.gateway(), svc.port());
    let squatter = TcpListener::bind(gw).unwrap();
    let br = lab.bridge_name();
    let lhb = Lhb::start(&[
        "--mode",
        "proxy",
        "--expose-iface",
        &format!("{br}:{}", svc.port()),
        "--expose-iface",
        &format!("{br}:{}", other.port()),
    ])
    .unwrap();
    assert!(
        lhb.log().contains(&format!("proxy for {gw} on {br}")) && lhb.log().contains("in use"),
        "{}",
        lhb.log()
    );
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), other.port()),
        Outcome::Served(_)
    ));
    let st = lhb.status().unwrap();
    let held = st["rules"][0]["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["address"] == lab.gateway().to_string())
        .cloned()
        .unwrap();
    assert!(held["error"].as_str().unwrap().contains("in use"), "{held}");
    let (ok, out, _) = lhb_check(&[
        "doctor",
        "--no-docker",
        "--iface",
        &format!("{br}:{}", svc.port()),
    ])
    .unwrap();
    let me = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("holds this address") && out.contains(me.trim()),
        "{out}"
    );

    drop(squatter);
    let served = wait_until(Duration::from_secs(12), || {
        matches!(
            get_from(&lab.container, lab.gateway(), svc.port()),
            Outcome::Served(_)
        )
    });
    assert!(
        served.is_some(),
        "not served after the port was freed:\n{}",
        lhb.log()
    );
    let st = lhb.status().unwrap();
    assert!(
        st["rules"][0]["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["error"].is_null()),
        "{st}"
    );
}

/// The metrics endpoint on loopback TCP, open to every local user: an endless header,
/// a client that sends nothing and a crowd of idle connections each get an answer and
/// are counted, and a normal scrape is served throughout. The control socket refuses an
/// oversized request with an error answer.
#[test]
fn control_and_metrics_requests_are_bounded() {
    let lab = Lab::new(84).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let mport = free_port("127.0.0.1").unwrap();
    let dir = tempdir("bounds");
    let cfg = dir.join("lhb.toml");
    std::fs::write(&cfg, format!("metrics = \"127.0.0.1:{mport}\"\n")).unwrap();
    let lhb = Lhb::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--expose-iface",
        &format!("{}:{}", lab.bridge_name(), svc.port()),
    ])
    .unwrap();
    let m = SocketAddr::from(([127, 0, 0, 1], mport));
    let answer = |send: &[u8]| -> String {
        let mut c = TcpStream::connect(m).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(send);
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out.lines().next().unwrap_or_default().to_string()
    };
    let scrape_ok = || answer(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == "HTTP/1.1 200 OK";
    assert!(scrape_ok());

    let mut endless = b"GET /metrics HTTP/1.1\r\n".to_vec();
    endless.extend(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n".repeat(4096));
    assert_eq!(
        answer(&endless),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(answer(b"GET /metrics\r\n\r\n"), "HTTP/1.1 400 Bad Request");

    // Idle connections: the first 16 hold the slots (and are timed out after 5 s), the
    // rest are answered "busy" at once.
    let idle: Vec<TcpStream> = (0..16).map(|_| TcpStream::connect(m).unwrap()).collect();
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    assert_eq!(answer(b""), "HTTP/1.1 503 Service Unavailable");
    assert!(started.elapsed() < Duration::from_secs(2));
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408 Request Timeout"), "{out:?}");
    }
    let back = wait_until(Duration::from_secs(2), scrape_ok);
    assert!(
        back.is_some(),
        "scrapes not served after the idle clients timed out"
    );

    // The control socket: an oversized request gets an error answer.
    let mut c = std::os::unix::net::UnixStream::connect(lhb.control()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = c.write_all(&vec![b'{'; 100_000]);
    let mut reply = String::new();
    let _ = BufReader::new(c).read_line(&mut reply);
    assert!(reply.contains("larger than"), "{reply:?}");

    let st = lhb.status().unwrap();
    let bad = st["requests"]["bad"].as_u64().unwrap();
    let busy = st["requests"]["busy"].as_u64().unwrap();
    // 431, 400, 16 timeouts, the control request.
    assert!(bad >= 19, "bad requests counted: {bad}");
    assert!(busy >= 1, "busy requests counted: {busy}");
    // And the daemon kept serving.
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));
}

fn tempdir(name: &str) -> lhb_tests::TempDir {
    lhb_tests::TempDir::new(&format!("sec-{name}")).unwrap()
}

/// More rules than lhb can hold, given on SIGHUP: the reload is refused with the
/// reason, and the running rules keep serving.
#[test]
fn a_config_over_the_rule_limit_is_refused_on_sighup_and_nothing_changes() {
    let lab = Lab::new(85).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let dir = tempdir("limit");
    let cfg = dir.join("lhb.toml");
    let br = lab.bridge_name();
    std::fs::write(
        &cfg,
        format!("[[expose]]\ninterface = \"{br}\"\nport = {}\n", svc.port()),
    )
    .unwrap();
    let lhb = Lhb::start(&["--mode", "kernel", "--config", cfg.to_str().unwrap()]).unwrap();
    let mut big = String::new();
    for port in 1..=4097u32 {
        big += &format!("[[expose]]\ninterface = \"{br}\"\nport = {port}\n");
    }
    std::fs::write(&cfg, big).unwrap();
    // SAFETY: signalling the daemon this test started.
    unsafe { libc::kill(lhb.pid() as i32, libc::SIGHUP) };
    let refused = wait_until(Duration::from_secs(5), || {
        lhb.log().contains("4097 rules: lhb serves at most 4096")
    });
    assert!(refused.is_some(), "{}", lhb.log());
    assert!(
        lhb.log().contains("keeping the 1 running rule(s)"),
        "{}",
        lhb.log()
    );
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));
    assert_eq!(lhb.status().unwrap()["rules"].as_array().unwrap().len(), 1);
}

/// A bridge that also has a port leading off the host (a VXLAN tunnel here; a network
/// card, bond or VLAN alike) would serve the whole network behind it. The rule waits
/// with the port named, from the moment the port is added (also at start), `lhb
/// verify` and `lhb doctor` fail on it, it is served again when the port goes, and
/// `--allow-uplinks` serves it anyway.
#[test]
fn a_bridge_with_an_uplink_is_not_served_unless_allowed() {
    let lab = Lab::new(86).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let br = lab.bridge_name();
    let spec = format!("{br}:{}", svc.port());
    let served = || {
        matches!(
            get_from(&lab.container, lab.gateway(), svc.port()),
            Outcome::Served(_)
        )
    };
    let refused = || get_from(&lab.container, lab.gateway(), svc.port()) == Outcome::Refused;
    let lhb = Lhb::start(&["--mode", "kernel", "--expose-iface", &spec]).unwrap();
    let first = get_from(&lab.container, lab.gateway(), svc.port());
    assert!(
        matches!(first, Outcome::Served(_)),
        "{first:?}\n{}",
        lhb.log()
    );

    let vx = vxlan("lhbt86vx", &br);
    assert!(
        wait_until(Duration::from_secs(2), refused).is_some(),
        "still served with an uplink"
    );
    let st = lhb.status().unwrap();
    assert_eq!(st["rules"][0]["state"], "waiting");
    let why = st["rules"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        why.contains("lhbt86vx (vxlan)") && why.contains("allow_uplinks"),
        "{why}"
    );
    assert!(lhb.log().contains("lhbt86vx (vxlan)"), "{}", lhb.log());
    for check in ["verify", "doctor"] {
        let (ok, out, err) = lhb_check(&[check, "--no-docker", "--iface", &spec]).unwrap();
        assert!(!ok, "{check} passed: {out}{err}");
        assert!(out.contains("lhbt86vx (vxlan)"), "{check}: {out}{err}");
    }

    // A second daemon started while the uplink is there: it starts, and waits.
    let pins = lhb_tests::PinDir::new("uplink-b");
    let other = Lhb::start(&[
        "--mode",
        "proxy",
        "--pin-dir",
        &pins.0,
        "--expose-iface",
        &spec,
    ])
    .unwrap();
    assert!(other.log().contains("lhbt86vx (vxlan)"), "{}", other.log());
    drop(other);

    drop(vx);
    assert!(
        wait_until(Duration::from_secs(2), served).is_some(),
        "not served after the uplink went: {:?}\n{}",
        get_from(&lab.container, lab.gateway(), svc.port()),
        lhb.log()
    );
    drop(lhb);

    let _vx = vxlan("lhbt86vx", &br);
    let _lhb = Lhb::start(&[
        "--mode",
        "kernel",
        "--expose-iface",
        &spec,
        "--allow-uplinks",
        &br,
    ])
    .unwrap();
    assert!(served(), "--allow-uplinks: not served");
}

/// A VXLAN device plugged into `bridge`, removed on drop.
fn vxlan(name: &str, bridge: &str) -> lhb_tests::HostLink {
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let _ = Command::new("ip").args(["link", "del", name]).output();
    ip(&[
        "link", "add", name, "type", "vxlan", "id", "86", "dstport", "4789",
    ]);
    let link = lhb_tests::HostLink {
        name: name.to_string(),
    };
    ip(&["link", "set", name, "master", bridge, "up"]);
    link
}
