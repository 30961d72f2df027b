//! UDP rules end to end, on plain bridges in a namespace that plays the host: a real
//! resolver (dnsmasq) on 127.0.0.53 asked with dig and busybox nslookup from a
//! container, StatsD-style one-way datagrams counted at the receiver, datagrams near
//! 64 KiB (fragmented on the bridge), the outside refused, a service that is down
//! answered with ICMP port unreachable, flows timing out, the flow limit refusing and
//! recovering, and a bridge re-created.

use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lhb_tests::{Dnsmasq, HostLab, Lhb, Netns, TempDir, lhb_check};

/// dnsmasq in `lab`'s host namespace on 127.0.0.53:53, answering x.example with
/// 10.1.2.3 and logging each query (with the client's address) to `log`.
fn dnsmasq(lab: &HostLab, log: &std::path::Path) -> Dnsmasq {
    Dnsmasq::on("127.0.0.53:53".parse().unwrap())
        .in_netns(&lab.host)
        .log_queries(log)
        .start()
        .unwrap()
}

/// `dig @server x.example +short` from `ns`, one try of one second: stdout and stderr.
fn dig(ns: &Netns, server: &str, extra: &[&str]) -> String {
    let name = "x.example";
    let out = ns
        .command("dig")
        .args([&format!("@{server}"), name, "+short", "+time=1", "+tries=1"])
        .args(extra)
        .output()
        .expect("dig (Debian package dnsutils; `cargo xtask setup` installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `f` on a thread of its own inside namespace `name` (for servers that outlive
/// the call).
fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{name}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap();
        // SAFETY: setns on this thread only; the fd is valid for the call.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        f()
    })
}

/// A UDP service on 127.0.0.1:`port` in the host namespace: counts datagrams and bytes,
/// echoes each one back if `echo`, records the sources it saw.
struct Receiver {
    count: Arc<AtomicU64>,
    sources: Arc<std::sync::Mutex<std::collections::BTreeSet<std::net::IpAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    fn start(lab: &HostLab, port: u16, echo: bool) -> Receiver {
        let count = Arc::new(AtomicU64::new(0));
        let sources: Arc<std::sync::Mutex<std::collections::BTreeSet<std::net::IpAddr>>> =
            Default::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s, st) = (count.clone(), sources.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = spawn_in(&lab.host.name, move || {
            let sock = UdpSocket::bind(("127.0.0.1", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    c.fetch_add(1, Ordering::Relaxed);
                    s.lock().unwrap().insert(from.ip());
                    if echo {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        Receiver {
            count,
            sources,
            stop,
            thread: Some(thread),
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `payload` from a fresh socket in `ns` to `to` and waits up to `wait` for an
/// answer: Ok(answer), Err("refused") on ICMP port unreachable, Err("timeout").
fn ask(ns: &Netns, to: SocketAddr, payload: Vec<u8>, wait: Duration) -> Result<Vec<u8>, String> {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(wait)).unwrap();
        s.send(&payload).map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 65536];
        match s.recv(&mut buf) {
            Ok(n) => Ok(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err("refused".into()),
            Err(_) => Err("timeout".into()),
        }
    })
    .unwrap()
}

fn status(lhb: &Lhb) -> serde_json::Value {
    lhb.status().unwrap()
}

fn counter(v: &serde_json::Value, name: &str) -> u64 {
    v["rules"][0]["counters"][name].as_u64().unwrap_or_default()
}

/// Polls `f` for up to `limit`.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The host's resolver, as the issue asks: a rule `br0:53/both=127.0.0.53:53`; dig over
/// UDP and over TCP and busybox nslookup from the container get dnsmasq's answer; the
/// resolver sees the bridge's loopback source, never 127.0.0.1; the outside gets
/// nothing; a resolver that is down is answered with port unreachable at once (dig says
/// "connection refused") and served again when it is back; a re-created bridge is
/// followed.
#[test]
fn a_container_asks_the_hosts_resolver_on_127_0_0_53_through_its_gateway() {
    let lab = HostLab::new(90).unwrap();
    let tmp = TempDir::new("udp-dns").unwrap();
    let log = tmp.join("dnsmasq.log");
    let mut resolver = Some(dnsmasq(&lab, &log));
    let gw = lab.gateway().to_string();
    // Nothing serves the gateway before lhb.
    assert!(!dig(&lab.container, &gw, &[]).contains("10.1.2.3"));
    let lhb = lab
        .lhb(&[
            "--no-docker",
            "--firewall",
            "none",
            "--expose-iface",
            "br0:53/both=127.0.0.53:53",
        ])
        .unwrap();
    assert_eq!(
        dig(&lab.container, &gw, &[]).trim(),
        "10.1.2.3",
        "{}",
        lhb.log()
    );
    assert_eq!(dig(&lab.container, &gw, &["+tcp"]).trim(), "10.1.2.3");
    let ns = lab
        .container
        .command("busybox")
        .args(["nslookup", "x.example", &gw])
        .output()
        .unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    assert!(ns.contains("10.1.2.3"), "busybox nslookup: {ns}");

    // What the resolver saw: the bridge's own loopback source (127.128.0.0/9).
    let seen = std::fs::read_to_string(&log).unwrap();
    let froms: Vec<&str> = seen
        .lines()
        .filter(|l| l.contains("query[A] x.example from"))
        .filter_map(|l| l.rsplit(' ').next())
        .collect();
    assert!(
        froms
            .iter()
            .any(|f| f.starts_with("127.") && *f != "127.0.0.1"),
        "{seen}"
    );
    assert!(!froms.contains(&"127.0.0.1"), "{seen}");

    // The outside namespace, routed to the host: the gateway and the host's own address
    // on its link answer nothing.
    for server in [gw.clone(), lab.host_outside_ip().to_string()] {
        let out = dig(&lab.outside, &server, &[]);
        assert!(!out.contains("10.1.2.3"), "outside via {server}: {out}");
    }

    let v = status(&lhb);
    let r = &v["rules"][0];
    assert_eq!(r["protocol"], "both", "{v}");
    let paths: Vec<&str> = r["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["path"].as_str())
        .collect();
    assert!(
        paths.contains(&"udp") && paths.iter().any(|p| *p != "udp"),
        "{v}"
    );
    assert!(counter(&v, "udp_datagrams_in") >= 2, "{v}");
    assert!(counter(&v, "udp_datagrams_out") >= 2, "{v}");
    assert!(counter(&v, "udp_flows") >= 2, "{v}");
    let (ok, table, _) = lhb_check(&["status", "--control", &lhb.control()]).unwrap();
    assert!(ok && table.contains("br0:53/both"), "{table}");

    // The resolver down: refused at once, not a timeout.
    resolver.take();
    let t = Instant::now();
    let out = dig(&lab.container, &gw, &[]);
    assert!(out.contains("connection refused"), "{out}\n{}", lhb.log());
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(counter(&status(&lhb), "udp_target_errors") >= 1);
    // Back: served again, on the flows already open too.
    resolver = Some(dnsmasq(&lab, &log));
    assert!(
        eventually(Duration::from_secs(3), || dig(&lab.container, &gw, &[])
            .trim()
            == "10.1.2.3"),
        "{}",
        lhb.log()
    );

    // The bridge re-created (new ifindex), the container's veth back on it.
    let h = &lab.host.name;
    for args in [
        vec!["-n", h, "link", "del", "br0"],
        vec!["-n", h, "link", "add", "br0", "type", "bridge"],
        vec!["-n", h, "addr", "add", &format!("{gw}/24"), "dev", "br0"],
        vec!["-n", h, "link", "set", "br0", "up"],
        vec!["-n", h, "link", "set", "cv", "master", "br0"],
    ] {
        lhb_tests::run("ip", &args).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || dig(&lab.container, &gw, &[])
            .trim()
            == "10.1.2.3"),
        "not served after the bridge was re-created\n{}",
        lhb.log()
    );
    drop(resolver);
}

/// StatsD-style one-way datagrams all arrive (counted at the receiver), 64 KiB datagrams
/// cross the bridge fragmented and come back intact, flows close when idle, and the flow
/// limit drops a new flow's datagrams until an idle flow frees a place.
#[test]
fn datagrams_are_counted_large_ones_arrive_and_the_flow_limit_recovers() {
    let lab = HostLab::new(91).unwrap();
    let statsd = Receiver::start(&lab, 8125, false);
    let echo = Receiver::start(&lab, 9999, true);
    let lhb = lab
        .lhb(&[
            "--no-docker",
            "--firewall",
            "none",
            "--expose-iface",
            "br0:8125/udp",
            "--expose-iface",
            "br0:9999/udp",
            "--udp-max-flows",
            "4",
            "--udp-idle-timeout",
            "2",
        ])
        .unwrap();
    let gw = lab.gateway();

    // 2,000 metrics of 512 bytes, in bursts of 100: each burst must arrive whole.
    let to = SocketAddr::new(gw, 8125);
    let sender = lab
        .container
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(to).unwrap();
            s
        })
        .unwrap();
    let line = {
        let mut l = b"lhb.test.metric:1|c|#".to_vec();
        l.resize(512, b'x');
        l
    };
    for burst in 1..=20u64 {
        for _ in 0..100 {
            sender.send(&line).unwrap();
        }
        assert!(
            eventually(Duration::from_secs(2), || statsd.count() == burst * 100),
            "burst {burst}: {} of {} arrived\n{}",
            statsd.count(),
            burst * 100,
            lhb.log()
        );
    }
    drop(sender);
    let sources = statsd.sources.lock().unwrap().clone();
    assert_eq!(sources.len(), 1, "{sources:?}");
    let src = sources.iter().next().unwrap().to_string();
    assert!(src.starts_with("127.") && src != "127.0.0.1", "{src}");

    // Near 64 KiB: fragmented on the bridge both ways, echoed intact.
    let big: Vec<u8> = (0..65_000u32).map(|i| (i % 251) as u8).collect();
    let back = ask(
        &lab.container,
        SocketAddr::new(gw, 9999),
        big.clone(),
        Duration::from_secs(2),
    )
    .expect("the 65,000-byte datagram came back");
    assert!(back == big, "echo differs: {} bytes back", back.len());

    // The outside gets nothing through, and the receiver sees nothing from it.
    let before = statsd.count();
    let out = ask(
        &lab.outside,
        SocketAddr::new(gw, 8125),
        b"x:1|c".to_vec(),
        Duration::from_millis(500),
    );
    assert!(out.is_err(), "{out:?}");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(statsd.count(), before);

    // A container forging an off-bridge source (the outside namespace's address): the
    // answer goes nowhere, since lhb sends only through the bridge.
    let spoofed = std::net::IpAddr::from([10, 205, lab.n, 2]);
    let echoed_before = echo.count();
    lhb_tests::run(
        "ip",
        &[
            "-n",
            &lab.container.name,
            "addr",
            "add",
            &format!("{spoofed}/32"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();
    let victim = lab
        .outside
        .run(move || {
            let v = UdpSocket::bind((spoofed, 40404)).unwrap();
            v.set_read_timeout(Some(Duration::from_millis(700)))
                .unwrap();
            v
        })
        .unwrap();
    let to_echo = SocketAddr::new(gw, 9999);
    lab.container
        .run(move || {
            let s = UdpSocket::bind((spoofed, 40404)).unwrap();
            s.send_to(b"forged", to_echo).unwrap();
        })
        .unwrap();
    let mut b = [0u8; 16];
    assert!(
        victim.recv_from(&mut b).is_err(),
        "an answer to a forged source left the bridge"
    );
    // The service did answer: the answer was dropped by lhb's routing, not the
    // datagram by the host's reverse-path filter.
    assert_eq!(echo.count(), echoed_before + 1, "{}", lhb.log());
    lhb_tests::run(
        "ip",
        &[
            "-n",
            &lab.container.name,
            "addr",
            "del",
            &format!("{spoofed}/32"),
            "dev",
            "eth0",
        ],
    )
    .unwrap();

    // Every flow idle: all closed after the timeout.
    assert!(
        eventually(Duration::from_secs(6), || {
            let v = status(&lhb);
            v["rules"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["counters"]["udp_active_flows"] == 0)
        }),
        "flows did not close when idle: {}",
        status(&lhb)
    );

    // The limit: 4 flows over two rules, 2 each. Two container sockets hold this
    // rule's share; a third gets nothing until they are idle.
    let to = SocketAddr::new(gw, 9999);
    let held: Vec<UdpSocket> = lab
        .container
        .run(move || {
            (0..2)
                .map(|_| {
                    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                    s.connect(to).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                    s.send(b"hold").unwrap();
                    let mut b = [0u8; 16];
                    assert_eq!(s.recv(&mut b).unwrap(), 4);
                    s
                })
                .collect()
        })
        .unwrap();
    let third = ask(
        &lab.container,
        to,
        b"third".to_vec(),
        Duration::from_millis(500),
    );
    assert_eq!(third, Err("timeout".into()));
    let v = status(&lhb);
    let r = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == 9999)
        .unwrap()
        .clone();
    assert_eq!(r["counters"]["udp_max_flows"], 2, "{v}");
    assert!(
        r["counters"]["udp_over_limit"].as_u64().unwrap() >= 1,
        "{v}"
    );
    assert!(
        lhb.log().contains("this rule's share of flows (2) reached"),
        "{}",
        lhb.log()
    );
    drop(held);
    // Idle flows close: the third is served.
    assert!(
        eventually(Duration::from_secs(6), || ask(
            &lab.container,
            to,
            b"third".to_vec(),
            Duration::from_millis(300)
        ) == Ok(b"third".to_vec())),
        "{}",
        lhb.log()
    );
}

/// A reload that leads a UDP rule to another target keeps the gateway socket (no moment
/// where the address is unbound or "in use") and moves even a flow already open: the
/// same container socket's next datagram reaches the new service.
#[test]
fn a_reload_moves_a_udp_rule_to_its_new_target_with_its_open_flows() {
    let lab = HostLab::new(97).unwrap();
    let old = Receiver::start(&lab, 7001, true);
    let new = Receiver::start(&lab, 7002, true);
    let tmp = TempDir::new("udp-retarget").unwrap();
    let cfg = tmp.join("lhb.toml");
    let rule = |target: u16| {
        format!(
            "[[expose]]\ninterface = \"br0\"\nport = 7000\nprotocol = \"udp\"\ntarget = {target}\n"
        )
    };
    std::fs::write(&cfg, rule(7001)).unwrap();
    let lhb = lab
        .lhb(&[
            "--no-docker",
            "--firewall",
            "none",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .unwrap();
    let to = SocketAddr::new(lab.gateway(), 7000);
    let sock = lab
        .container
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(to).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            s
        })
        .unwrap();
    let echo = |s: &UdpSocket| {
        s.send(b"ping").unwrap();
        let mut b = [0u8; 8];
        s.recv(&mut b).map(|n| n == 4).unwrap_or(false)
    };
    assert!(echo(&sock), "{}", lhb.log());
    assert_eq!((old.count(), new.count()), (1, 0));

    std::fs::write(&cfg, rule(7002)).unwrap();
    let (ok, out, err) = lhb_check(&["reload", "--control", &lhb.control()]).unwrap();
    assert!(ok, "{out}{err}");
    assert!(
        eventually(
            Duration::from_secs(2),
            || status(&lhb)["rules"][0]["target"] == "127.0.0.1:7002"
        ),
        "{}",
        status(&lhb)
    );
    assert!(echo(&sock), "{}", lhb.log());
    assert_eq!((old.count(), new.count()), (1, 1), "{}", lhb.log());
    // The socket was kept, not closed and bound again (which races with its release).
    assert!(!lhb.log().contains("in use"), "{}", lhb.log());
    assert!(
        lhb.log().contains("now -> 127.0.0.1:7002") && !lhb.log().contains("forwarder closed"),
        "{}",
        lhb.log()
    );
    let v = status(&lhb);
    assert!(v["rules"][0]["gateways"][0]["error"].is_null(), "{v}");
}
