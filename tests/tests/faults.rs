//! Fault injection on real namespaces, bridges and the real kernel: what a host does to
//! lhb (crashes and restarts racing each other, failed starts, firewall reloads, fd
//! exhaustion) and what lhb must do about it: keep serving, heal, leave nothing behind.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lhb_tests::{Lab, Lhb, PeerEcho, PinDir, Poller};

/// Two daemons (own pin directories, own bridges) are killed with -9 and restarted at
/// the same moment, five times, while a client on each bridge connects every 10 ms:
/// not one connection may fail, during the outage or the takeovers.
#[test]
fn two_daemons_killed_and_restarted_together_serve_without_a_gap() {
    let labs = [Lab::new(20).unwrap(), Lab::new(21).unwrap()];
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let pins = [PinDir::new("gap-a"), PinDir::new("gap-b")];
    let specs: Vec<String> = labs
        .iter()
        .map(|l| format!("{}:{}", l.bridge_name(), svc.port()))
        .collect();
    let args = |i: usize| -> Vec<&str> {
        vec![
            "--mode",
            "kernel",
            "--pin-dir",
            pins[i].0.as_str(),
            "--expose-iface",
            specs[i].as_str(),
        ]
    };
    let mut daemons: Vec<Lhb> = (0..2).map(|i| Lhb::start(&args(i)).unwrap()).collect();
    let pollers: Vec<Poller> = labs
        .iter()
        .map(|l| {
            let gw = SocketAddr::new(l.gateway(), svc.port());
            Poller::start(&l.container, gw, Duration::from_millis(10)).unwrap()
        })
        .collect();
    let started = Instant::now();
    for round in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        for d in &mut daemons {
            d.kill9();
        }
        std::thread::sleep(Duration::from_millis(100));
        daemons = (0..2).map(|i| Lhb::spawn(&args(i), &[]).unwrap()).collect();
        for d in &daemons {
            let ready =
                lhb_tests::wait_until(Duration::from_secs(20), || d.log().contains("ready:"));
            assert!(ready.is_some(), "round {round}: not ready:\n{}", d.log());
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    for (i, p) in pollers.into_iter().enumerate() {
        let (tries, failures) = p.finish();
        let shown: Vec<String> = failures
            .iter()
            .take(5)
            .map(|(at, e)| format!("{:?}: {e}", at.duration_since(started)))
            .collect();
        assert!(tries > 100, "bridge {i}: only {tries} tries");
        println!(
            "bridge {i}: {} of {tries} connections failed across five kill -9 and restarts",
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "bridge {i}: {} of {tries} connections failed, first: {shown:?}\n{}",
            failures.len(),
            daemons[i].log()
        );
    }
    for d in &mut daemons {
        assert!(d.stop().unwrap().success());
    }
    for l in &labs {
        assert!(
            lhb_tests::ingress_programs(&l.bridge_name())
                .unwrap()
                .is_empty(),
            "a program was left on {}",
            l.bridge_name()
        );
    }
}

/// Every way a start can fail after lhb has begun to set up (the kernel path loaded,
/// links pinned, sockets bound) leaves nothing behind; so does a daemon that started
/// attached to the bridge while another program held one of its gateway ports, once
/// stopped.
#[test]
fn failed_starts_leave_nothing_behind() {
    let lab = Lab::new(22).unwrap();
    let br = lab.bridge_name();
    let pins = PinDir::new("failed");
    struct RmDir(std::path::PathBuf);
    impl Drop for RmDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("lhbt22-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _rm = RmDir(dir.clone());
    let control = dir.join("lhb.sock");
    let control = control.to_str().unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    // The IPv6 gateway of an IPv4 target goes through the proxy in auto mode: with its
    // port taken the daemon starts anyway (that gateway is retried, security.rs), with
    // the kernel path attached; stopped, it too leaves nothing behind.
    let taken = std::net::TcpListener::bind((lab.gateway6(), svc.port())).unwrap();
    let good = format!("{br}:{}", svc.port());
    let nothing_left = |args: &[&str]| nothing_left_in(&pins.0, &br, &dir, args);
    let not_a_bridge = format!("{}:80", lab.container_veth());
    let _bare = lhb_tests::bridge("lhbt22bare", &[]).unwrap();
    let bare_rule = "lhbt22bare:80".to_string();
    let cases: [(&str, Vec<&str>, &str); 2] = [
        (
            "kernel",
            vec!["--expose-iface", &good, "--expose-iface", &bare_rule],
            "has no IP address",
        ),
        (
            "kernel",
            vec!["--expose-iface", &good, "--expose-iface", &not_a_bridge],
            "is not a bridge",
        ),
    ];
    for (mode, rules, want) in cases {
        let mut args = vec![
            "run",
            "--mode",
            mode,
            "--pin-dir",
            &pins.0,
            "--control",
            control,
        ];
        args.extend(rules.iter().copied());
        let (status, stderr) = lhb_tests::lhb_once(&args, &[]).unwrap();
        assert!(!status.success(), "{args:?} started");
        assert!(stderr.contains(want), "{args:?}: want `{want}` in {stderr}");
        nothing_left(&args);
    }
    let mut held = Lhb::start(&[
        "--mode",
        "auto",
        "--pin-dir",
        &pins.0,
        "--control",
        control,
        "--expose-iface",
        &good,
    ])
    .unwrap();
    assert!(held.log().contains("already in use"), "{}", held.log());
    assert_eq!(lhb_tests::ingress_programs(&br).unwrap().len(), 1);
    assert!(held.stop().unwrap().success(), "{}", held.log());
    nothing_left(&["a daemon with a held gateway, stopped"]);
    drop(taken);

    fn nothing_left_in(pins: &str, br: &str, dir: &std::path::Path, args: &[&str]) {
        let left: Vec<String> = std::fs::read_dir(pins)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{args:?}: pinned links left: {left:?}");
        assert!(
            !std::path::Path::new(pins).exists(),
            "{args:?}: pin directory left"
        );
        assert_eq!(
            lhb_tests::ingress_programs(br).unwrap(),
            Vec::<String>::new(),
            "{args:?}: a program was left on the bridge"
        );
        for sock in ["lhb.sock", "metrics.sock"] {
            assert!(!dir.join(sock).exists(), "{args:?}: {sock} left behind");
        }
    }
}

fn served(ns: &lhb_tests::Netns, to: SocketAddr) -> bool {
    ns.run(move || {
        matches!(
            lhb_tests::http_get(to, Duration::from_millis(300)),
            lhb_tests::Outcome::Served(_)
        )
    })
    .unwrap()
}

/// How long until `to` is served from `ns` again, if within 2 s.
fn healed_within_2s(ns: &lhb_tests::Netns, to: SocketAddr) -> Option<Duration> {
    lhb_tests::wait_until(Duration::from_secs(2), || served(ns, to))
}

/// The host's firewall is reloaded or rewritten under lhb (in a namespace that plays
/// the host): an `iptables-restore` without lhb's accept, `nft flush ruleset` followed
/// by the host's own chain coming back, a dropping policy that appears while lhb runs,
/// and a legacy-iptables restore (no notifications there). Each time lhb puts back
/// exactly its own accept within 2 s, and status and metrics count the heals.
#[test]
fn the_firewall_heals_within_two_seconds_of_reloads_and_new_dropping_chains() {
    let lab = lhb_tests::HostLab::new(23).unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let to = SocketAddr::new(lab.gateway(), svc.port());
    let spec = format!("br0:{}", svc.port());
    let args = ["--no-docker", "--mode", "kernel", "--expose-iface", &spec];
    lab.sh(&["iptables", "-w", "-I", "INPUT", "-i", "br0", "-j", "DROP"])
        .unwrap();
    assert!(!served(&lab.container, to), "the host does not drop");
    let mut lhb = lab.lhb(&args).unwrap();
    assert!(served(&lab.container, to), "{}", lhb.log());

    let mut times = Vec::new();
    // What netfilter-persistent and friends do: the saved ruleset, without lhb's rule.
    lab.shell("iptables-save | grep -v 'lhb ' | iptables-restore")
        .unwrap();
    times.push(("iptables-restore", healed_within_2s(&lab.container, to)));
    // A firewall service restart: everything flushed, then its own chain loaded again.
    lab.sh(&["nft", "flush", "ruleset"]).unwrap();
    lab.shell(
        "nft add table inet hostfw && nft add chain inet hostfw input \
         '{ type filter hook input priority 0; policy drop; }' && \
         nft add rule inet hostfw input iifname lo accept",
    )
    .unwrap();
    times.push((
        "nft flush ruleset + the host's chain back",
        healed_within_2s(&lab.container, to),
    ));
    // A dropping chain that was not there when the rule was opened.
    lab.sh(&["nft", "delete", "table", "inet", "hostfw"])
        .unwrap();
    lab.sh(&["iptables", "-w", "-P", "INPUT", "DROP"]).unwrap();
    times.push(("a new DROP policy", healed_within_2s(&lab.container, to)));
    let fw_rules = lab.sh(&["iptables", "-w", "-S", "INPUT"]).unwrap();
    assert_eq!(
        fw_rules.lines().filter(|l| l.contains("lhb ")).count(),
        1,
        "exactly one accept of lhb's: {fw_rules}"
    );
    let (ok, json, err) =
        lhb_tests::lhb_check(&["status", "--json", "--control", &lhb.control()]).unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let heals = v["firewall"]["heals"].as_u64().unwrap_or_default();
    assert!(heals >= 2, "heals: {heals} in {json}");
    assert!(
        v["firewall"]["last_heal"]["restored"][0]
            .as_str()
            .is_some_and(|r| r.contains(&spec.replace("br0:", ":"))),
        "{json}"
    );
    assert!(lhb.stop().unwrap().success());
    lab.sh(&["iptables", "-w", "-P", "INPUT", "ACCEPT"])
        .unwrap();

    // Legacy iptables announces nothing: the periodic check finds it.
    lab.sh(&[
        "iptables-legacy",
        "-w",
        "-I",
        "INPUT",
        "-i",
        "br0",
        "-j",
        "DROP",
    ])
    .unwrap();
    let mut lhb = lab.lhb(&args).unwrap();
    assert!(served(&lab.container, to), "{}", lhb.log());
    lab.shell("iptables-legacy-save | grep -v 'lhb ' | iptables-legacy-restore")
        .unwrap();
    times.push((
        "iptables-legacy-restore",
        healed_within_2s(&lab.container, to),
    ));
    assert!(lhb.stop().unwrap().success());
    for (what, t) in &times {
        assert!(t.is_some(), "not healed within 2 s after {what}");
        println!("healed after {what} in {:?}", t.unwrap());
    }
}

/// An echo service that holds every connection open until the client closes it, a
/// thread (small stack) per connection.
fn holding_echo() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let _ = std::thread::Builder::new()
                .stack_size(32 * 1024)
                .spawn(move || {
                    use std::io::{Read as _, Write as _};
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
        }
    });
    port
}

/// Opens `n` connections to `to` from `ns` and checks each with a one-byte round trip;
/// the ones that work are held open and returned.
fn hold(ns: &lhb_tests::Netns, to: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    ns.run(move || {
        use std::io::{Read as _, Write as _};
        (0..n)
            .filter_map(|_| {
                let mut s =
                    std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"x").ok()?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b).ok()?;
                Some(s)
            })
            .collect()
    })
    .unwrap()
}

fn status_json(lhb: &Lhb) -> serde_json::Value {
    let (ok, json, err) =
        lhb_tests::lhb_check(&["status", "--json", "--control", &lhb.control()]).unwrap();
    assert!(ok, "lhb status: {err}");
    serde_json::from_str(&json).unwrap()
}

/// Under systemd's default soft fd limit (1024) the proxy raises it to the hard limit
/// and carries 600 idle connections on one rule; with the hard limit at 1024 too, the
/// budget is (1024 - 384 - 160) / 6 = 80 (384 fds kept for everything else, 128 of them
/// for the pooled pipes; 160, a quarter of the rest, for UDP flows; 6 per connection),
/// each of two rules gets half, and the rule
/// flooded with 600 connections cannot starve the other. `lhb status` answers
/// throughout.
#[test]
fn one_rule_flooded_with_idle_connections_cannot_starve_another() {
    let mut hard = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
    assert!(
        hard.rlim_max >= 4096,
        "this test needs a hard fd limit of 4096 or more"
    );
    // The test's own 600 client and 600 service sockets.
    let raised = libc::rlimit {
        rlim_cur: hard.rlim_max,
        rlim_max: hard.rlim_max,
    };
    // SAFETY: setrlimit with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    let (a, b) = (Lab::new(24).unwrap(), Lab::new(25).unwrap());
    let flooded = holding_echo();
    let other = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec_a = format!("{}:{flooded}", a.bridge_name());
    let spec_b = format!("{}:{}", b.bridge_name(), other.port());
    let args = [
        "--mode",
        "proxy",
        "--no-docker",
        "--expose-iface",
        &spec_a,
        "--expose-iface",
        &spec_b,
    ];
    let to_a = SocketAddr::new(a.gateway(), flooded);
    let to_b = SocketAddr::new(b.gateway(), other.port());
    let soft_only = format!("--nofile=1024:{}", hard.rlim_max);
    for (limit, want_held) in [(soft_only.as_str(), 600), ("--nofile=1024:1024", 40)] {
        let lhb =
            Lhb::start_wrapped(&["prlimit", limit, "--"], &lhb_tests::lhb_bin(), &args).unwrap();
        let held = hold(&a.container, to_a, 600);
        assert_eq!(
            held.len(),
            want_held,
            "{limit}: connections held\n{}",
            lhb.log()
        );
        assert!(
            served(&b.container, to_b),
            "{limit}: the other rule starved"
        );
        let v = status_json(&lhb);
        let share = v["rules"][0]["counters"]["proxy_max_connections"]
            .as_u64()
            .unwrap_or_default();
        let refused = v["rules"][0]["counters"]["proxy_over_limit"]
            .as_u64()
            .unwrap_or_default();
        if want_held == 40 {
            assert_eq!(share, 40, "{v}");
            assert_eq!(refused, 600 - 40, "{v}");
            assert!(
                lhb.log()
                    .contains("this rule's share of connections (40) reached")
            );
        } else {
            assert_eq!(refused, 0, "{v}");
        }
        drop(held);
    }
}

/// A network rule's container: a namespace plugged into `bridge` at `.2`.
fn container_on(name: &str, bridge: &str, net: u8) -> (lhb_tests::Netns, lhb_tests::HostLink) {
    let ns = lhb_tests::Netns::new(&format!("lhbt27{name}")).unwrap();
    let veth = lhb_tests::plug(
        &ns,
        &format!("lhbt27{name}v"),
        Some(bridge),
        &[&format!("10.227.{net}.2/24")],
        &[&format!("10.227.{net}.1")],
    )
    .unwrap();
    (ns, veth)
}

fn rule_state(lhb: &Lhb, network: &str) -> String {
    let v = status_json(lhb);
    v["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|r| r["network"] == network))
        .map(|r| r["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// The Docker engine itself is killed with -9 and restarted (an engine of the test's
/// own, so the machine's is untouched). The kernel path keeps serving while it is down;
/// once it is back, a network removed is dropped and a network created is served, each
/// within a second.
#[test]
fn a_docker_engine_killed_and_restarted_is_followed() {
    let docker0 = || std::path::Path::new("/sys/class/net/docker0").exists();
    let had_docker0 = docker0();
    let mut engine = lhb_tests::docker::Engine::start("restart", 1).unwrap();
    let br_a = engine.network("lhbt27a", "10.227.1.0/24").unwrap();
    let br_b = engine.network("lhbt27b", "10.227.2.0/24").unwrap();
    let (ca, _va) = container_on("a", &br_a, 1);
    let (cb, _vb) = container_on("b", &br_b, 2);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let rule = |n: &str| format!("{n}:{}", svc.port());
    let (ra, rb, rc) = (rule("lhbt27a"), rule("lhbt27b"), rule("lhbt27c"));
    let lhb = Lhb::start_env(
        &[
            "--mode", "kernel", "--expose", &ra, "--expose", &rb, "--expose", &rc,
        ],
        &[("DOCKER_HOST", engine.host.as_str())],
    )
    .unwrap();
    let gw = |net: u8| SocketAddr::new([10, 227, net, 1].into(), svc.port());
    assert!(served(&ca, gw(1)), "{}", lhb.log());
    assert!(served(&cb, gw(2)), "{}", lhb.log());
    let poller = Poller::start(&ca, gw(1), Duration::from_millis(10)).unwrap();

    engine.kill9();
    let lost = lhb_tests::wait_until(Duration::from_secs(5), || {
        lhb.log().contains("Docker engine lost")
    });
    assert!(lost.is_some(), "{}", lhb.log());
    // Down for a second: served all along (the poller counts).
    std::thread::sleep(Duration::from_secs(1));
    assert!(served(&cb, gw(2)), "not served while the engine was down");
    engine.restart().unwrap();
    let back = lhb_tests::wait_until(Duration::from_secs(10), || {
        lhb.log().matches("Docker engine connected").count() >= 2
    });
    assert!(back.is_some(), "not reconnected:\n{}", lhb.log());

    engine.docker(&["network", "rm", "lhbt27b"]).unwrap();
    let dropped = lhb_tests::wait_until(Duration::from_secs(1), || {
        rule_state(&lhb, "lhbt27b") == "waiting"
    });
    assert!(
        dropped.is_some(),
        "a removed network still served:\n{}",
        lhb.log()
    );
    let br_c = engine.network("lhbt27c", "10.227.3.0/24").unwrap();
    let created = std::time::Instant::now();
    let (cc, _vc) = container_on("c", &br_c, 3);
    let up = lhb_tests::wait_until(Duration::from_secs(1), || served(&cc, gw(3)));
    assert!(up.is_some(), "a created network not served:\n{}", lhb.log());
    let (tries, failures) = poller.finish();
    assert!(tries > 100, "{tries} tries");
    assert!(
        failures.is_empty(),
        "{} of {tries} failed while the engine restarted: {:?}",
        failures.len(),
        failures.first()
    );
    drop(lhb);
    drop(engine);
    assert_eq!(
        docker0(),
        had_docker0,
        "the test's engine changed the machine's docker0"
    );
    println!(
        "dropped {:?} after `network rm`, served {:?} after `network create`",
        dropped.unwrap(),
        created.elapsed()
    );
}

/// An interface rule whose bridge does not exist yet (libvirt's virbr0 comes up after
/// boot) does not stop the start: the daemon is ready, says at once that the rule waits
/// and why, and serves it when the bridge appears, on both data paths.
#[test]
fn an_interface_rule_waits_for_its_bridge_and_serves_when_it_appears() {
    for (n, mode) in [(26u8, "kernel"), (126, "proxy")] {
        let svc = PeerEcho::start("127.0.0.1:0").unwrap();
        let spec = format!("lhbt{n}br:{}", svc.port());
        let lhb = Lhb::start(&["--mode", mode, "--expose-iface", &spec]).unwrap();
        assert!(
            lhb.log().contains("does not exist (yet)") && lhb.log().contains("WARN"),
            "{}",
            lhb.log()
        );
        let st = lhb.status().unwrap();
        assert_eq!(st["rules"][0]["state"], "waiting", "{st}");
        let lab = Lab::new(n).unwrap();
        let to = SocketAddr::new(lab.gateway(), svc.port());
        let took = lhb_tests::wait_until(Duration::from_secs(2), || served(&lab.container, to));
        assert!(
            took.is_some(),
            "{mode}: not served after the bridge appeared:\n{}",
            lhb.log()
        );
        assert_eq!(lhb.status().unwrap()["rules"][0]["state"], "serving");
    }
}
