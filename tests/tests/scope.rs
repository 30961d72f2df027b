//! Scoped rules (`@ALLOW` in a spec, `allow = [...]` in the config): on one bridge, a
//! client in the rule's allow list reaches the service and one that is not is refused at
//! once (a RST on the kernel path and the proxy, ICMP port unreachable over UDP), the
//! service never sees it, `lhb status` counts the refusals, and a reload that changes the
//! list moves the boundary on every path (both kernel variants, the proxy, the UDP
//! forwarder).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use lhb_tests::{Lab, Lhb, Netns, Outcome, PeerEcho, TempDir, http_get, lhb_check, plug};

const T: Duration = Duration::from_secs(3);

/// A second client on the lab's bridge: 10.201.N.3 and fd00:201:N::3.
struct Intruder {
    ns: Netns,
    _veth: lhb_tests::HostLink,
}

impl Intruder {
    fn plug(lab: &Lab) -> Intruder {
        let n = lab.n;
        let ns = Netns::new(&format!("lhbt{n}i")).unwrap();
        let veth = plug(
            &ns,
            &format!("lhbt{n}iv"),
            Some(&lab.bridge_name()),
            &[&format!("10.201.{n}.3/24"), &format!("fd00:201:{n}::3/64")],
            &[&format!("10.201.{n}.1"), &format!("fd00:201:{n}::1")],
        )
        .unwrap();
        Intruder { ns, _veth: veth }
    }

    fn ip(lab: &Lab) -> IpAddr {
        IpAddr::from([10, 201, lab.n, 3])
    }
}

/// The daemon's own guard table (each lhb has one, named after its control socket).
fn guard_table(lhb: &Lhb) -> String {
    let st = lhb.status().unwrap();
    let t = st["guard"]["table"].as_str().unwrap_or_default();
    assert!(t.starts_with("lhb_"), "a test daemon's guard table: {st:#}");
    t.to_string()
}

fn get(ns: &Netns, ip: IpAddr, port: u16) -> (Outcome, Duration) {
    let addr = SocketAddr::new(ip, port);
    ns.run(move || {
        let t = Instant::now();
        (http_get(addr, T), t.elapsed())
    })
    .unwrap()
}

fn served(o: &Outcome) -> bool {
    matches!(o, Outcome::Served(_))
}

/// Refused at once: a RST, at connect (the kernel path) or right after it (the proxy
/// accepts first, then resets), never a timeout.
fn refused_at_once(o: &Outcome, took: Duration) -> bool {
    matches!(o, Outcome::Refused | Outcome::Reset) && took < Duration::from_secs(1)
}

fn counters(lhb: &Lhb) -> serde_json::Value {
    lhb.status().unwrap()["rules"][0]["counters"].clone()
}

fn refused(lhb: &Lhb, path: &str) -> u64 {
    counters(lhb)[format!("{path}_refused")]
        .as_u64()
        .unwrap_or_default()
}

fn write_rule(cfg: &std::path::Path, lab: &Lab, port: u16, allow: &[String]) {
    let list: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    std::fs::write(
        cfg,
        format!(
            "[[expose]]\ninterface = \"{}\"\nport = {port}\nallow = [{}]\n",
            lab.bridge_name(),
            list.join(", ")
        ),
    )
    .unwrap();
}

fn reload(lhb: &Lhb) {
    let (ok, out, err) = lhb_check(&["reload", "--control", &lhb.control()]).unwrap();
    assert!(ok, "{out}{err}\n{}", lhb.log());
}

/// One path: `mode` with `env`; `path` names its counters and the gateway path status
/// reports.
fn only_the_allowed_client_gets_in(n: u8, mode: &str, env: &[(&str, &str)], path: &str) {
    let lab = Lab::new(n).unwrap();
    let intruder = Intruder::plug(&lab);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let tmp = TempDir::new(&format!("scope-{n}")).unwrap();
    let cfg = tmp.join("lhb.toml");
    let (mine, theirs) = (lab.container_ip(), Intruder::ip(&lab));
    write_rule(&cfg, &lab, svc.port(), &[mine.to_string()]);
    let lhb = Lhb::start_env(&["--mode", mode, "--config", cfg.to_str().unwrap()], env).unwrap();
    let st = lhb.status().unwrap();
    let r = &st["rules"][0];
    assert_eq!(r["allow"], serde_json::json!([mine.to_string()]), "{st}");
    let v4 = r["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["address"] == lab.gateway().to_string())
        .cloned()
        .unwrap_or_default();
    assert_eq!(v4["path"], path, "{st}");
    if !env.is_empty() {
        assert_eq!(st["kernel_variant"]["name"], "syn-ticket", "{st}");
    }

    let (o, _) = get(&lab.container, lab.gateway(), svc.port());
    assert!(served(&o), "the allowed container: {o:?}\n{}", lhb.log());
    for _ in 0..3 {
        let (o, took) = get(&intruder.ns, lab.gateway(), svc.port());
        assert!(
            refused_at_once(&o, took),
            "another container on the bridge: {o:?} after {took:?}\n{}",
            lhb.log()
        );
    }
    // The service saw one connection, the allowed one's.
    assert_eq!(svc.seen().len(), 1, "{:?}", svc.seen());
    if path == "kernel" {
        assert_eq!(svc.seen(), vec![mine]);
    }
    assert_eq!(refused(&lhb, path), 3, "{}", counters(&lhb));
    let (ok, table, _) = lhb_check(&["status", "--control", &lhb.control()]).unwrap();
    assert!(
        ok && table.contains(&format!("only for {mine} (3 refused)")),
        "{table}"
    );
    // Who connected, counted where the decision was made (the programs, the proxy).
    let c = lhb.client(0, &mine.to_string()).unwrap();
    let c = c.unwrap_or_else(|| panic!("{path}: no client {mine}: {}", lhb.status().unwrap()));
    assert_eq!(
        (&c["connections"], &c["refused"]),
        (&1.into(), &0.into()),
        "{c}"
    );
    let c = lhb
        .client(0, &theirs.to_string())
        .unwrap()
        .expect("the refused client");
    assert_eq!(
        (&c["connections"], &c["refused"]),
        (&0.into(), &3.into()),
        "{c}"
    );
    let (ok, table, _) = lhb_check(&["status", "--clients", "--control", &lhb.control()]).unwrap();
    let row = table.lines().find(|l| l.contains(&format!(" {theirs} ")));
    assert!(
        ok && row.is_some_and(|l| l.split_whitespace().nth(2) == Some("0")
            && l.split_whitespace().nth(3) == Some("3")),
        "{table}"
    );
    // One log line for the three refusals, naming the client (no engine: its address).
    let logged = lhb_tests::wait_until(Duration::from_secs(12), || {
        lhb.log().lines().any(|l| {
            l.contains(&format!("refused {theirs} (no container")) && l.contains("3 connection(s)")
        })
    });
    assert!(logged.is_some(), "{}", lhb.log());

    // The list changed by a reload: the boundary moves, on the same sockets and maps.
    write_rule(&cfg, &lab, svc.port(), &[format!("{theirs}/32")]);
    reload(&lhb);
    let (o, took) = get(&lab.container, lab.gateway(), svc.port());
    assert!(refused_at_once(&o, took), "taken off the list: {o:?}");
    let (o, _) = get(&intruder.ns, lab.gateway(), svc.port());
    assert!(served(&o), "put on the list: {o:?}\n{}", lhb.log());
    // A prefix holding both, then no list at all: everyone on the bridge.
    for allow in [vec![format!("10.201.{n}.0/30")], vec![]] {
        write_rule(&cfg, &lab, svc.port(), &allow);
        reload(&lhb);
        for ns in [&lab.container, &intruder.ns] {
            let (o, _) = get(ns, lab.gateway(), svc.port());
            assert!(served(&o), "{allow:?} from {}: {o:?}", ns.name);
        }
    }
    // Still nothing from outside the bridge.
    let (o, _) = get(&lab.outside, lab.gateway(), svc.port());
    assert!(!served(&o), "outside: {o:?}");
    assert_eq!(svc.seen().len(), 6, "{:?}", svc.seen());
}

#[test]
fn a_scoped_rule_admits_only_its_clients_in_kernel() {
    only_the_allowed_client_gets_in(140, "kernel", &[], "kernel");
}

#[test]
fn a_scoped_rule_admits_only_its_clients_on_the_ticket_variant() {
    only_the_allowed_client_gets_in(141, "kernel", &[("LHB_KERNEL_VARIANT", "ticket")], "kernel");
}

#[test]
fn a_scoped_rule_admits_only_its_clients_through_the_proxy() {
    only_the_allowed_client_gets_in(142, "proxy", &[], "proxy");
}

/// IPv6 clients are scoped too, by their own prefixes (the IPv6 gateway is proxied for
/// an IPv4 target in auto mode).
#[test]
fn ipv6_clients_are_scoped_by_their_prefixes() {
    let lab = Lab::new(143).unwrap();
    let intruder = Intruder::plug(&lab);
    let svc = PeerEcho::start("[::1]:0").unwrap();
    let spec = format!(
        "{}:{}=[::1]:{}@{}",
        lab.bridge_name(),
        svc.port(),
        svc.port(),
        lab.container_ip6()
    );
    let lhb = Lhb::start(&["--mode", "kernel", "--expose-iface", &spec]).unwrap();
    let (o, _) = get(&lab.container, lab.gateway6(), svc.port());
    assert!(served(&o), "{o:?}\n{}", lhb.log());
    let (o, took) = get(&intruder.ns, lab.gateway6(), svc.port());
    assert!(refused_at_once(&o, took), "{o:?} after {took:?}");
    // Its IPv4 address is not on the list either.
    let (o, took) = get(&lab.container, lab.gateway(), svc.port());
    assert!(!served(&o) && took < Duration::from_secs(1), "{o:?}");
    assert_eq!(svc.seen(), vec![lab.container_ip6()]);
}

/// UDP: a datagram from a client not on the list is answered with ICMP port unreachable
/// (the sender's socket reports "connection refused") and never reaches the service;
/// taken off the list, a client's open flow passes nothing more.
#[test]
fn udp_answers_a_client_not_on_the_list_with_port_unreachable() {
    let lab = Lab::new(144).unwrap();
    let intruder = Intruder::plug(&lab);
    let svc = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = svc.local_addr().unwrap().port();
    svc.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let echo = thread::spawn(move || {
        let mut seen = 0u32;
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((n, from)) = svc.recv_from(&mut buf) {
                if &buf[..n] == b"stop" {
                    break;
                }
                seen += 1;
                let _ = svc.send_to(&buf[..n], from);
            }
        }
        seen
    });
    let tmp = TempDir::new("scope-udp").unwrap();
    let cfg = tmp.join("lhb.toml");
    let rule = |allow: IpAddr| {
        format!(
            "[[expose]]\ninterface = \"{}\"\nport = {port}\nprotocol = \"udp\"\nallow = [\"{allow}\"]\n",
            lab.bridge_name()
        )
    };
    std::fs::write(&cfg, rule(lab.container_ip())).unwrap();
    let lhb = Lhb::start(&["--config", cfg.to_str().unwrap()]).unwrap();
    let to = SocketAddr::new(lab.gateway(), port);
    let open = |ns: &Netns| {
        ns.run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(to).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s
        })
        .unwrap()
    };
    let ask = |s: &UdpSocket| -> Result<(), String> {
        s.send(b"ping").map_err(|e| e.to_string())?;
        let mut b = [0u8; 8];
        match s.recv(&mut b) {
            Ok(4) => Ok(()),
            Ok(n) => Err(format!("{n} bytes")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err("refused".into()),
            Err(e) => Err(e.to_string()),
        }
    };
    let (mine, theirs) = (open(&lab.container), open(&intruder.ns));
    assert_eq!(ask(&mine), Ok(()), "{}", lhb.log());
    let t = Instant::now();
    assert_eq!(ask(&theirs), Err("refused".into()), "{}", lhb.log());
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(refused(&lhb, "udp"), 1, "{}", counters(&lhb));
    let c = lhb
        .client(0, &lab.container_ip().to_string())
        .unwrap()
        .expect("the flow's client");
    assert_eq!(
        (&c["connections"], &c["refused"]),
        (&1.into(), &0.into()),
        "{c}"
    );
    let c = lhb
        .client(0, &Intruder::ip(&lab).to_string())
        .unwrap()
        .expect("the refused client");
    assert_eq!(
        (&c["connections"], &c["refused"]),
        (&0.into(), &1.into()),
        "{c}"
    );

    std::fs::write(&cfg, rule(Intruder::ip(&lab))).unwrap();
    reload(&lhb);
    assert_eq!(
        ask(&mine),
        Err("refused".into()),
        "an open flow, taken off the list"
    );
    assert_eq!(ask(&theirs), Ok(()), "{}", lhb.log());
    let stop = UdpSocket::bind("127.0.0.1:0").unwrap();
    stop.send_to(b"stop", ("127.0.0.1", port)).unwrap();
    assert_eq!(
        echo.join().unwrap(),
        2,
        "the service saw only the allowed datagrams"
    );
}

/// Bad lists are refused with the entry and the reason, and the running rules stay.
#[test]
fn a_bad_allow_list_is_refused_and_the_running_rule_stays() {
    let lab = Lab::new(145).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let tmp = TempDir::new("scope-bad").unwrap();
    let cfg = tmp.join("lhb.toml");
    write_rule(&cfg, &lab, svc.port(), &[lab.container_ip().to_string()]);
    let lhb = Lhb::start(&["--mode", "kernel", "--config", cfg.to_str().unwrap()]).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[[expose]]\ninterface = \"{}\"\nport = {}\nallow = [\n  \"10.201.145.2/24\",\n]\n",
            lab.bridge_name(),
            svc.port()
        ),
    )
    .unwrap();
    let (ok, out, err) = lhb_check(&["reload", "--control", &lhb.control()]).unwrap();
    assert!(!ok, "{out}{err}");
    assert!(
        err.contains(&format!("{}:5:", cfg.display()))
            && err.contains("allow entry `10.201.145.2/24`")
            && err.contains("write 10.201.145.0/24 for the network or 10.201.145.2 for one host"),
        "{err}"
    );
    let (o, _) = get(&lab.container, lab.gateway(), svc.port());
    assert!(served(&o), "{o:?}");
    // On the command line: the spec and the reason, before anything starts.
    let spec = format!("{}:80@web", lab.bridge_name());
    let (ok, _, err) =
        lhb_check(&["plan", "--config", "/dev/null", "--expose-iface", &spec]).unwrap();
    assert!(
        !ok && err.contains("an interface rule has no engine"),
        "{err}"
    );
}

/// A network rule scoped to containers, with the real engine: the container named and
/// one with the label named are served (the service sees their own addresses), one on
/// the same network that is not named is refused at once and never seen; a container
/// that takes an admitted container's IP and MAC (as any container with CAP_NET_RAW
/// can, here with NET_ADMIN and `ip`) gets no connection; and when the admitted
/// container is gone, another given its address is refused. On the kernel path and on
/// the proxy.
#[test]
fn a_network_rule_scoped_to_containers_admits_them_alone_and_cannot_be_forged() {
    use lhb_tests::docker::{self, Container, DockerNet};
    if !docker::required("a_network_rule_scoped_to_containers...") {
        return;
    }
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let net = DockerNet::create("lhbt-s1", "10.230.150.0/24").unwrap();
    let gw = net.gateway().unwrap();
    let url = format!("http://{gw}:{p}/");
    let allowed_ip = "10.230.150.10";
    let allowed = Container::run("lhbt-s1-allowed", &net.name, &["--ip", allowed_ip]).unwrap();
    let other = Container::run("lhbt-s1-other", &net.name, &["--ip", "10.230.150.11"]).unwrap();
    let mac = allowed
        .inspect("{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}")
        .unwrap();
    let spec = format!("lhbt-s1:{p}@lhbt-s1-allowed,label:lhbt.role=client");
    for mode in ["kernel", "proxy"] {
        let lhb = Lhb::start(&["--mode", mode, "--expose", &spec]).unwrap();
        let body = allowed
            .wget(&url)
            .unwrap_or_else(|e| panic!("{mode}: {e}\n{}", lhb.log()));
        let want = if mode == "kernel" {
            format!("peer={allowed_ip}")
        } else {
            // The proxy's connection to the service comes from the bridge's loopback
            // source; the service cannot see the container.
            "peer=127.128.".to_string()
        };
        assert!(body.starts_with(&want), "{mode}: {body}");
        let seen = svc.seen().len();
        let e = other.wget(&url).unwrap_err().to_string();
        assert!(at_once(&e), "{mode}: not named: {e}");
        assert_eq!(
            svc.seen().len(),
            seen,
            "{mode}: the service saw a refused container"
        );

        // Started after lhb: admitted when the engine says it is there. The gap between
        // `docker run` returning and the first connection served is what a user sees.
        let t0 = Instant::now();
        let labelled = Container::run(
            &format!("lhbt-s1-label-{mode}"),
            &net.name,
            &["--label", "lhbt.role=client"],
        )
        .unwrap();
        let started = t0.elapsed();
        let gap = lhb_tests::wait_until(Duration::from_secs(5), || labelled.wget(&url).is_ok())
            .unwrap_or_else(|| panic!("{mode}: labelled container never served\n{}", lhb.log()));
        eprintln!("{mode}: docker run took {started:?}; served {gap:?} after it returned");

        // The forger: another container on the bridge with the admitted one's IP and MAC.
        let forger = Container::run(
            &format!("lhbt-s1-forger-{mode}"),
            &net.name,
            &["--cap-add", "NET_ADMIN"],
        )
        .unwrap();
        let out = forger
            .exec(&[
                "sh",
                "-c",
                &format!(
                    "ip addr flush dev eth0 && ip link set eth0 down && ip link set eth0 address {mac} && ip link set eth0 up && ip addr add {allowed_ip}/24 dev eth0 && ip -o addr show dev eth0"
                ),
            ])
            .unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(allowed_ip),
            "{mode}: forging failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = svc.seen().len();
        let e = match forger.wget(&url) {
            Ok(body) => panic!(
                "{mode}: the forger was served: {body}\nguard: {}\n{}",
                lhb_tests::run("nft", &["list", "table", "bridge", &guard_table(&lhb)])
                    .unwrap_or_default(),
                lhb.log()
            ),
            Err(e) => e.to_string(),
        };
        assert!(!e.contains("peer="), "{mode}: forged: {e}");
        assert_eq!(svc.seen().len(), seen, "{mode}: the service saw the forger");
        drop(forger);
        // The forger moved the admitted container's MAC in the bridge's table: its next
        // frame moves it back.
        let _ = allowed.exec(&[
            "busybox", "arping", "-c", "1", "-U", "-I", "eth0", allowed_ip,
        ]);
        let served = lhb_tests::wait_until(Duration::from_secs(5), || allowed.wget(&url).is_ok());
        assert!(
            served.is_some(),
            "{mode}: the admitted container after the forger"
        );
        let st = lhb.status().unwrap();
        let rule = &st["rules"][0];
        assert_eq!(rule["state"], "serving", "{st:#}");
        // Who connected, by container name: the admitted one served, the other (and the
        // forger, whose frames never got past the guard) refused or unseen.
        let c = lhb
            .client(0, allowed_ip)
            .unwrap()
            .expect("the admitted container");
        assert_eq!(c["container"], "lhbt-s1-allowed", "{mode}: {c}");
        assert!(c["connections"].as_u64() >= Some(2), "{mode}: {c}");
        assert_eq!(c["refused"], 0, "{mode}: {c}");
        let c = lhb
            .client(0, "10.230.150.11")
            .unwrap()
            .expect("the refused container");
        assert_eq!(c["container"], "lhbt-s1-other", "{mode}: {c}");
        assert_eq!(
            (&c["connections"], &c["refused"]),
            (&0.into(), &1.into()),
            "{mode}: {c}"
        );
        let m = lhb.metrics().unwrap();
        let sample = m.lines().find(|l| {
            l.starts_with("lhb_client_refused_total{")
                && l.contains("client=\"lhbt-s1-other\",address=\"10.230.150.11\"")
        });
        assert!(sample.is_some_and(|l| l.ends_with(" 1")), "{mode}: {m}");
        let logged = lhb_tests::wait_until(Duration::from_secs(12), || {
            lhb.log()
                .contains("refused container lhbt-s1-other (10.230.150.11): 1 connection(s)")
        });
        assert!(logged.is_some(), "{mode}: {}", lhb.log());
        drop(labelled);
    }

    // The admitted container gone, its address handed to another: refused.
    let lhb = Lhb::start(&["--mode", "kernel", "--expose", &spec]).unwrap();
    assert!(allowed.wget(&url).is_ok(), "{}", lhb.log());
    // verify connects as the admitted container (from its own namespace) and as a
    // probe the list does not name; doctor says whom the list admits and refuses.
    let (ok, out, err) = lhb_check(&["verify", &spec]).unwrap();
    for line in [
        "PASS  from the bridge, a client the allow list does not admit: 10.230.150.".to_string(),
        format!("PASS  from an admitted container: lhbt-s1-allowed -> {gw}:{p}: connected"),
    ] {
        assert!(
            ok && out.contains(&line),
            "no `{line}` in:\n{out}{err}\n{}",
            lhb.log()
        );
    }
    let (ok, out, err) = lhb_check(&["doctor", &spec]).unwrap();
    for line in [
        "OK    allow: admits container lhbt-s1-allowed (10.230.150.10), only through its own port on ",
        "NOTE  allow: refuses container lhbt-s1-other (10.230.150.11): the list (lhbt-s1-allowed, label:lhbt.role=client) names neither",
        "      fix: to admit it, add \"lhbt-s1-other\" to the rule's allow list, then `lhb reload`",
        ", not on the allow list -> ",
        // The labelled containers of the loop above are gone.
        "WARN  allow entry `label:lhbt.role=client` names no container on the network now",
    ] {
        assert!(ok && out.contains(line), "no `{line}` in:\n{out}{err}");
    }
    // Its guard removed by someone else (a reload that flushes the ruleset): back at once.
    let table = guard_table(&lhb);
    let guard = || {
        std::process::Command::new("nft")
            .args(["list", "table", "bridge", &table])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    assert!(guard(), "no guard table while serving");
    lhb_tests::run("nft", &["delete", "table", "bridge", &table]).unwrap();
    let back = lhb_tests::wait_until(Duration::from_secs(2), guard);
    assert!(back.is_some(), "the guard was not healed\n{}", lhb.log());
    eprintln!("guard table written again {back:?} after it was deleted");
    drop(allowed);
    let heir = Container::run("lhbt-s1-heir", &net.name, &["--ip", allowed_ip]).unwrap();
    let seen = svc.seen().len();
    // Until lhb has the engine's word that the admitted container left, the heir's
    // frames are the forger's (its address from another port) and dropped; then it is
    // refused like any container not named. Never served.
    let refused = lhb_tests::wait_until(Duration::from_secs(10), || match heir.wget(&url) {
        Ok(body) => panic!("the heir of an admitted address was served: {body}"),
        Err(e) => at_once(&e.to_string()),
    });
    assert!(
        refused.is_some(),
        "the heir never refused at once\n{}",
        lhb.log()
    );
    assert_eq!(svc.seen().len(), seen, "the service saw the heir");
    drop(lhb);
    assert!(!guard(), "the guard table outlived lhb");
    drop(other);
}

/// busybox wget's words for a RST: at connect (kernel path) or after the proxy's accept.
fn at_once(e: &str) -> bool {
    e.contains("refused") || e.contains("reset")
}

/// A compose service named in the list (`PROJECT/SERVICE`), over TCP and UDP: the
/// service's container reaches the web service and the host's resolver, its neighbour
/// in the same project gets a refusal on both, and `lhb status` names them.
#[test]
fn a_compose_service_is_admitted_over_tcp_and_udp_and_its_neighbour_is_not() {
    use lhb_tests::docker;
    if !docker::required("a_compose_service_is_admitted...") {
        return;
    }
    let _dnsmasq = lhb_tests::Dnsmasq::start("127.0.0.154:15354".parse().unwrap()).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let yaml = format!(
        r#"version: "3.8"
services:
  agent:
    image: {image}
    command: ["sleep", "3600"]
  web:
    image: {image}
    command: ["sleep", "3600"]
networks:
  default:
    ipam:
      config: [{{subnet: 10.230.151.0/24}}]
"#,
        image = docker::IMAGE
    );
    let compose = docker::Compose::new("lhbt-s2", &yaml).unwrap();
    let net = "lhbt-s2_default";
    let lhb = Lhb::start(&[
        "--expose",
        &format!("{net}:{p}@lhbt-s2/agent"),
        "--expose",
        &format!("{net}:53/udp=127.0.0.154:15354@lhbt-s2/agent"),
    ])
    .unwrap();
    compose.up().unwrap();
    let gw = docker::gateway_of(net).unwrap();
    let url = format!("http://{gw}:{p}/");
    let served = lhb_tests::wait_until(Duration::from_secs(5), || {
        compose.wget("agent", &url).is_ok()
    });
    assert!(
        served.is_some(),
        "the named service never served\n{}",
        lhb.log()
    );
    let seen = svc.seen().len();
    let e = compose.wget("web", &url).unwrap_err().to_string();
    assert!(at_once(&e), "its neighbour: {e}");
    assert_eq!(svc.seen().len(), seen, "the service saw the neighbour");

    let lookup = |service: &str| {
        compose
            .command(&[
                "exec",
                "-T",
                service,
                "busybox",
                "timeout",
                "4",
                "busybox",
                "nslookup",
                "x.example",
                &gw.to_string(),
            ])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap()
    };
    let a = lookup("agent");
    assert!(a.contains("10.1.2.3"), "agent: {a}\n{}", lhb.log());
    let w = lookup("web");
    assert!(
        !w.contains("10.1.2.3"),
        "web resolved through a rule that does not name it: {w}"
    );

    let st = lhb.status().unwrap();
    for (i, refusals) in [(0, "kernel_refused"), (1, "udp_refused")] {
        let r = &st["rules"][i];
        assert_eq!(r["state"], "serving", "{st:#}");
        assert!(r["counters"][refusals].as_u64() >= Some(1), "{st:#}");
        let clients = r["clients"].as_array().unwrap();
        let by = |svc: &str| {
            clients
                .iter()
                .find(|c| c["container"].as_str().is_some_and(|n| n.contains(svc)))
                .unwrap_or_else(|| panic!("no {svc} among {clients:?}"))
        };
        assert!(
            by("agent")["connections"].as_u64() >= Some(1),
            "{clients:?}"
        );
        assert_eq!(by("agent")["refused"], 0, "{clients:?}");
        assert_eq!(by("web")["connections"], 0, "{clients:?}");
        assert!(by("web")["refused"].as_u64() >= Some(1), "{clients:?}");
    }
}

/// Rootful Podman (netavark) in a namespace that plays the host: a Podman network rule
/// scoped to containers admits the one named and refuses its neighbour at once; a named
/// container started after lhb is admitted at Podman's start event (the gap measured); a
/// container that takes the admitted one's IP and MAC gets nothing; another container
/// given the admitted address after it left is refused, never served. And the guard is
/// the daemon's own: killed, its table stays (the kept data path stays closed to
/// forgers), and the next start on the same control socket removes it.
#[test]
fn a_podman_network_rule_scoped_to_containers_admits_them_alone() {
    use lhb_tests::docker;
    if !docker::required("a_podman_network_rule_scoped...")
        || !lhb_tests::podman::required("a_podman_network_rule_scoped...")
    {
        return;
    }
    let lab = lhb_tests::HostLab::new(149).unwrap();
    let pod = lhb_tests::podman::Podman::start(&lab.host.name).unwrap();
    let net = "lhbt-pod149";
    pod.podman(&[
        "network",
        "create",
        "--disable-dns",
        "--subnet",
        "10.232.149.0/24",
        net,
    ])
    .unwrap();
    let run = |name: &str, extra: &[&str]| {
        let mut a = vec!["run", "-d", "--name", name, "--network", net];
        a.extend_from_slice(extra);
        a.extend_from_slice(&[docker::IMAGE, "sleep", "3600"]);
        pod.podman(&a).unwrap();
    };
    let allowed_ip = "10.232.149.10";
    run("pa149", &["--ip", allowed_ip]);
    run("po149", &["--ip", "10.232.149.11"]);
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let p = svc.port();
    let url = format!("http://10.232.149.1:{p}/");
    let get = |name: &str| {
        pod.podman(&[
            "exec", name, "busybox", "timeout", "4", "wget", "-q", "-O", "-", &url,
        ])
    };
    let engine = format!("unix://{}", pod.socket.display());
    let spec = format!("podman:{net}:{p}@pa149,pl149");
    let mut lhb = lab.lhb(&["--engine", &engine, "--expose", &spec]).unwrap();
    let body = get("pa149").unwrap_or_else(|e| panic!("{e}\n{}", lhb.log()));
    assert!(body.starts_with(&format!("peer={allowed_ip}:")), "{body}");
    let seen = svc.seen().len();
    let e = get("po149").unwrap_err().to_string();
    assert!(at_once(&e), "not named: {e}");
    assert_eq!(
        svc.seen().len(),
        seen,
        "the service saw a refused container"
    );
    let c = lhb.client(0, "10.232.149.11").unwrap().expect("refused");
    assert_eq!(
        (&c["container"], &c["refused"]),
        (&"po149".into(), &1.into()),
        "{c}"
    );

    // Started after lhb: admitted at Podman's start event.
    let t0 = Instant::now();
    run("pl149", &[]);
    let started = t0.elapsed();
    let mut attempts = 0;
    let gap = lhb_tests::wait_until(Duration::from_secs(5), || {
        attempts += 1;
        get("pl149").is_ok()
    })
    .unwrap_or_else(|| {
        panic!(
            "a named container started later never served\n{}",
            lhb.log()
        )
    });
    eprintln!(
        "MEASURED: podman run took {started:?}; served {gap:?} after it returned, at attempt {attempts}"
    );

    // The forger: another container with the admitted one's IP and MAC.
    let mac = pod
        .podman(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}",
            "pa149",
        ])
        .unwrap();
    run("pf149", &["--cap-add", "NET_ADMIN"]);
    pod.podman(&[
        "exec",
        "pf149",
        "sh",
        "-c",
        &format!(
            "ip addr flush dev eth0 && ip link set eth0 down && ip link set eth0 address {mac} && ip link set eth0 up && ip addr add {allowed_ip}/24 dev eth0"
        ),
    ])
    .unwrap();
    let seen = svc.seen().len();
    if let Ok(body) = get("pf149") {
        panic!(
            "the forger was served: {body}\nguard: {}\n{}",
            lhb_tests::run(
                "ip",
                &["netns", "exec", &lab.host.name, "nft", "list", "ruleset"]
            )
            .unwrap_or_default(),
            lhb.log()
        );
    }
    assert_eq!(svc.seen().len(), seen, "the service saw the forger");
    pod.podman(&["rm", "-f", "-t", "0", "pf149"]).unwrap();

    // The admitted container gone, its address given to one not named: refused (its
    // frames dropped as forged until lhb relisted), never served.
    pod.podman(&["rm", "-f", "-t", "0", "pa149"]).unwrap();
    run("ph149", &["--ip", allowed_ip]);
    let refused = lhb_tests::wait_until(Duration::from_secs(10), || match get("ph149") {
        Ok(body) => panic!(
            "the heir of an admitted address was served: {body}\n{}\n{}",
            lhb_tests::run("ip", &["-n", &lab.host.name, "-d", "link"]).unwrap_or_default(),
            lhb.log()
        ),
        Err(e) => at_once(&e.to_string()),
    });
    assert!(
        refused.is_some(),
        "the heir never refused at once\n{}",
        lhb.log()
    );
    assert_eq!(svc.seen().len(), seen, "the service saw the heir");

    // The guard's table is this daemon's; a crash leaves it, the next start on the
    // same control socket removes it.
    let table = guard_table(&lhb);
    let listed = || {
        lhb_tests::run(
            "ip",
            &[
                "netns",
                "exec",
                &lab.host.name,
                "nft",
                "list",
                "table",
                "bridge",
                &table,
            ],
        )
        .is_ok()
    };
    assert!(listed(), "no guard table while serving");
    let (control, pins) = (lhb.control(), lhb.pin_dir());
    lhb.kill9();
    assert!(
        listed(),
        "the guard of a crashed daemon's kept data path went with it"
    );
    // Its rule now unscoped: this daemon needs no table of its own.
    let next = lab
        .lhb(&[
            "--engine",
            &engine,
            "--expose",
            &format!("podman:{net}:{p}"),
            "--control",
            &control,
            "--pin-dir",
            pins.to_str().unwrap(),
        ])
        .unwrap();
    assert_eq!(guard_table(&next), table, "the same socket, another table");
    assert!(
        !listed(),
        "the next start left the crashed daemon's table\n{}",
        next.log()
    );
}
