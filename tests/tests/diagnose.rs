//! `lhb verify` and `lhb doctor` on real topologies: verify passes on a served rule and
//! fails on an exposed service (bound to 0.0.0.0, or the socat recipe's bind to the
//! gateway); doctor names each fault of the troubleshooting table with its fix (the
//! firewall fault lives with the firewall tests, the Docker network fault with the
//! Docker tests).

use std::{
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::Duration,
};

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use lhb_tests::{Lab, Lhb, PeerEcho, free_port, lhb_check, wait_until};

/// Doctor tells "lhb is not running" from "lhb runs without this rule" by the lhb
/// processes on the host: that test runs with no other test's daemon alive.
static DAEMONS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    DAEMONS.read().unwrap_or_else(|p| p.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    DAEMONS.write().unwrap_or_else(|p| p.into_inner())
}

fn spec(lab: &Lab, port: u16) -> String {
    format!("{}:{port}", lab.bridge_name())
}

fn fails(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("FAIL")).collect()
}

#[test]
fn verify_and_doctor_pass_on_a_served_rule_on_both_paths() {
    let _g = shared();
    for (n, mode) in [(60, "auto"), (61, "proxy")] {
        let lab = Lab::new(n).unwrap();
        let svc = PeerEcho::start("127.0.0.1:0").unwrap();
        let s = spec(&lab, svc.port());
        let lhb = Lhb::start(&["--mode", mode, "--expose-iface", &s]).unwrap();
        let (ok, out, err) = lhb_check(&["verify", "--iface", &s]).unwrap();
        assert!(ok, "{mode}: verify failed:\n{out}{err}\n{}", lhb.log());
        let gw = SocketAddr::new(lab.gateway(), svc.port());
        let gw6 = SocketAddr::new(lab.gateway6(), svc.port());
        for line in [
            format!("PASS  from the bridge: 10.201.{n}."),
            format!("-> {gw}: connected"),
            format!("-> {gw6}: connected"),
            format!("PASS  from outside the bridge -> {gw}: refused"),
            format!("PASS  from outside the bridge -> {gw6}: refused"),
            format!("PASS  port {}: no listener on a wildcard", svc.port()),
        ] {
            assert!(out.contains(&line), "{mode}: no `{line}` in:\n{out}");
        }
        assert!(fails(&out).is_empty(), "{out}");

        let (ok, out, err) = lhb_check(&["doctor", "--iface", &s]).unwrap();
        assert!(ok, "{mode}: doctor failed:\n{out}{err}");
        let path = if mode == "auto" {
            format!(
                "OK    data path {gw}: kernel (lhb_ingress on {}",
                lab.bridge_name()
            )
        } else {
            format!(
                "OK    data path {gw}: proxy, listening on {gw}%{}",
                lab.bridge_name()
            )
        };
        for line in [
            path.as_str(),
            "OK    target 127.0.0.1:",
            "OK    firewall:",
            &format!(
                "OK    probe: a namespace on {} -> {gw}: connected",
                lab.bridge_name()
            ),
            "no problem found",
        ] {
            assert!(out.contains(line), "{mode}: no `{line}` in:\n{out}");
        }
    }
}

/// A service on 0.0.0.0 is reachable from everywhere, whatever lhb does: verify must
/// say so, even though the bridge side works.
#[test]
fn verify_fails_on_a_service_bound_to_the_wildcard_address() {
    let _g = shared();
    let lab = Lab::new(62).unwrap();
    let wild = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = wild.local_addr().unwrap().port();
    let s = spec(&lab, port);
    let _lhb = Lhb::start(&["--mode", "kernel", "--expose-iface", &s]).unwrap();
    let (ok, out, _) = lhb_check(&["verify", "--iface", &s]).unwrap();
    assert!(!ok, "verify passed on an exposed service:\n{out}");
    let gw = SocketAddr::new(lab.gateway(), port);
    for line in [
        format!(
            "FAIL  from outside the bridge -> {gw}: connected: reachable from other interfaces"
        ),
        format!("FAIL  listening on 0.0.0.0:{port}"),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }
    let (_, out, _) = lhb_check(&["doctor", "--iface", &s]).unwrap();
    assert!(
        out.contains(&format!(
            "WARN  target 127.0.0.1:{port}: listening on a wildcard address"
        )),
        "{out}"
    );
    drop(wild);
}

/// The recipe lhb replaces, `socat TCP-LISTEN:PORT,bind=GATEWAY,fork`, is reachable from
/// other interfaces by routing: verify catches it.
#[test]
fn verify_fails_on_the_socat_recipe() {
    let _g = shared();
    let lab = Lab::new(63).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let port = svc.port();
    let gw = lab.gateway();
    let _socat = lhb_tests::KillOnDrop(
        Command::new("socat")
            .args([
                &format!("TCP-LISTEN:{port},bind={gw},fork,reuseaddr"),
                &format!("TCP:127.0.0.1:{port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (cargo xtask setup installs it)"),
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::net::TcpStream::connect((gw, port)).is_ok()
        })
        .is_some(),
        "socat did not start"
    );
    let s = spec(&lab, port);
    let (ok, out, _) = lhb_check(&["verify", "--iface", &s]).unwrap();
    assert!(!ok, "verify passed on the socat recipe:\n{out}");
    let to = SocketAddr::new(gw, port);
    for line in [
        format!(
            "PASS  from the bridge: 10.201.63.254 on {} -> {to}: connected",
            lab.bridge_name()
        ),
        format!(
            "FAIL  from outside the bridge -> {to}: connected: reachable from other interfaces"
        ),
        format!("FAIL  listening on {to} (socat"),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }
}

#[test]
fn doctor_names_a_service_that_is_not_running() {
    let _g = shared();
    let lab = Lab::new(64).unwrap();
    let port = free_port("127.0.0.1").unwrap();
    let s = spec(&lab, port);
    for mode in ["kernel", "proxy"] {
        let _lhb = Lhb::start(&["--mode", mode, "--expose-iface", &s]).unwrap();
        let (ok, out, _) = lhb_check(&["doctor", "--iface", &s]).unwrap();
        assert!(!ok, "{out}");
        let f = fails(&out);
        assert!(
            f.first().is_some_and(
                |l| l.contains(&format!("target 127.0.0.1:{port}: nothing listens there"))
            ),
            "{mode}: the first failure is not the service:\n{out}"
        );
        assert!(
            out.contains(&format!("fix: start the service on 127.0.0.1:{port}")),
            "{out}"
        );
        assert!(
            out.contains("fix: the target service is not listening"),
            "{out}"
        );
    }
}

#[test]
fn doctor_names_lhb_not_running() {
    let _g = exclusive();
    let lab = Lab::new(65).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let s = spec(&lab, svc.port());
    let (ok, out, _) = lhb_check(&["doctor", "--iface", &s]).unwrap();
    assert!(!ok, "{out}");
    let gw = SocketAddr::new(lab.gateway(), svc.port());
    assert!(
        out.contains(&format!(
            "FAIL  data path {gw}: nothing serves it: lhb is not running"
        )),
        "{out}"
    );
    assert!(out.contains("fix: start lhb"), "{out}");
    assert!(out.contains(&format!("-> {gw}: refused")), "{out}");
    // And verify agrees: the bridge side is not served.
    let (ok, out, _) = lhb_check(&["verify", "--iface", &s]).unwrap();
    assert!(!ok);
    assert!(out.contains(&format!("-> {gw}: refused")), "{out}");
}

/// Docker re-creating a network deletes the bridge and makes a new one (new ifindex):
/// the fault that breaks hand-made setups. Gone: doctor names the missing bridge; back:
/// lhb has followed and doctor finds nothing wrong on the new bridge.
#[test]
fn doctor_follows_a_re_created_bridge() {
    let _g = shared();
    let mut lab = Lab::new(66).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let s = spec(&lab, svc.port());
    let lhb = Lhb::start(&["--mode", "kernel", "--expose-iface", &s]).unwrap();
    let br = lab.bridge_name();
    let old = lab.bridge_ifindex().unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["link", "del", &br]);
    assert!(cmd.status().unwrap().success());
    let (ok, out, _) = lhb_check(&["doctor", "--iface", &s]).unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("FAIL  bridge {br}: no such interface")),
        "{out}"
    );
    assert!(out.contains("fix: create the bridge"), "{out}");

    lab.recreate_bridge().unwrap();
    let new = lab.bridge_ifindex().unwrap();
    assert_ne!(old, new);
    let mut last = String::new();
    let healthy = wait_until(Duration::from_secs(5), || {
        let (ok, out, _) = lhb_check(&["doctor", "--iface", &s]).unwrap();
        last = out;
        ok
    });
    assert!(
        healthy.is_some(),
        "not healthy after re-creation:\n{last}\n{}",
        lhb.log()
    );
    assert!(
        last.contains(&format!("OK    bridge {br}: up (ifindex {new})")),
        "{last}"
    );
}

/// A UDP echo service on `addr` in this namespace, on a thread that ends with the test
/// process (the socket is dropped with the returned guard's thread only at exit).
fn udp_echo(addr: &str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let sock = std::net::UdpSocket::bind(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let port = sock.local_addr().unwrap().port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    (port, stop)
}

/// A UDP rule: verify probes it with a datagram from the bridge (answered) and from
/// outside (refused), and checks the UDP sockets on the port; doctor names the
/// forwarder's socket and its probe is answered; with the service stopped, doctor says
/// the target is down and the probe was refused; a service on 0.0.0.0 fails verify.
#[test]
fn verify_and_doctor_check_a_udp_rule() {
    let _g = shared();
    let lab = Lab::new(92).unwrap();
    let (port, stop) = udp_echo("127.0.0.1:0");
    let s = format!("{}:{port}/udp", lab.bridge_name());
    let lhb = Lhb::start(&["--expose-iface", &s]).unwrap();
    let (ok, out, err) = lhb_check(&["verify", "--iface", &s]).unwrap();
    assert!(ok, "verify failed:\n{out}{err}\n{}", lhb.log());
    let gw = SocketAddr::new(lab.gateway(), port);
    for line in [
        "PASS  from the bridge: 10.201.92.".to_string(),
        format!("-> {gw}/udp: answered"),
        format!("PASS  from outside the bridge -> {gw}/udp: refused (ICMP port unreachable)"),
        format!("PASS  port {port}/udp: no listener on a wildcard"),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }
    assert!(
        !out.contains(&format!("{gw}: connected")),
        "a TCP probe for a UDP rule:\n{out}"
    );
    let (ok, out, err) = lhb_check(&["doctor", "--iface", &s]).unwrap();
    assert!(ok, "doctor failed:\n{out}{err}");
    let br = lab.bridge_name();
    for line in [
        format!("OK    target 127.0.0.1:{port}/udp: listening"),
        format!("OK    data path {gw}/udp: UDP forwarder, bound to {gw}%{br}"),
        format!("OK    probe: a namespace on {br} -> {gw}/udp: answered"),
        "no problem found".to_string(),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }

    // The service stopped: its socket closes within the echo thread's 100 ms poll.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gone = wait_until(Duration::from_secs(2), || {
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
    });
    assert!(gone.is_some());
    let (ok, out, _) = lhb_check(&["doctor", "--iface", &s]).unwrap();
    assert!(!ok, "{out}");
    for line in [
        format!("FAIL  target 127.0.0.1:{port}/udp: nothing listens there"),
        format!("FAIL  probe: a namespace on {br} -> {gw}/udp: refused (ICMP port unreachable)"),
        "the target service is not listening".to_string(),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }

    // The same port on 0.0.0.0: reachable from everywhere, verify fails. (lhb stopped
    // first: its socket on the gateway takes no SO_REUSEADDR, so no other program can
    // bind that port on an address that covers the gateway while it serves.)
    drop(lhb);
    let (_wide, stop_wide) = udp_echo(&format!("0.0.0.0:{port}"));
    let (ok, out, _) = lhb_check(&["verify", "--iface", &s]).unwrap();
    stop_wide.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("FAIL  listening on 0.0.0.0:{port}")),
        "{out}"
    );
}

/// A scoped rule: verify checks both sides (a probe the list does not admit is refused,
/// one at a free address it admits connects), and doctor calls the refusal the rule
/// working and says the boundary is an address check on a bridge no engine names.
#[test]
fn verify_and_doctor_understand_an_allow_list() {
    let _g = shared();
    for (n, mode) in [(146, "auto"), (147, "proxy")] {
        let lab = Lab::new(n).unwrap();
        let svc = PeerEcho::start("127.0.0.1:0").unwrap();
        // .254 (the first probe's address, from the top) is not admitted; .94 (the top
        // of the /27) is.
        let s = format!(
            "{}:{}@{},10.201.{n}.64/27",
            lab.bridge_name(),
            svc.port(),
            lab.container_ip()
        );
        let lhb = Lhb::start(&["--mode", mode, "--expose-iface", &s]).unwrap();
        let (ok, out, err) = lhb_check(&["verify", "--iface", &s]).unwrap();
        assert!(ok, "{mode}: verify failed:\n{out}{err}\n{}", lhb.log());
        let gw = SocketAddr::new(lab.gateway(), svc.port());
        for line in [
            format!(
                "PASS  from the bridge, a client the allow list does not admit: 10.201.{n}.254 on {} -> {gw}: ",
                lab.bridge_name()
            ),
            format!(
                "PASS  from the bridge, a client the allow list admits: 10.201.{n}.94 on {} -> {gw}: connected",
                lab.bridge_name()
            ),
            format!("PASS  from outside the bridge -> {gw}: refused"),
        ] {
            assert!(out.contains(&line), "{mode}: no `{line}` in:\n{out}");
        }
        assert!(fails(&out).is_empty(), "{out}");
        // The service saw the admitted probe only (the proxy's own source in proxy mode).
        assert_eq!(svc.seen().len(), 1, "{mode}: {:?}", svc.seen());

        let (ok, out, err) = lhb_check(&["doctor", "--iface", &s]).unwrap();
        assert!(ok, "{mode}: doctor failed:\n{out}{err}");
        for line in [
            format!(
                "OK    probe: a namespace on {}, not on the allow list -> {gw}: ",
                lab.bridge_name()
            ),
            format!(
                "NOTE  allow: only {}, 10.201.{n}.64/27, by address: anything on {}",
                lab.container_ip(),
                lab.bridge_name()
            ),
            "no problem found".to_string(),
        ] {
            assert!(out.contains(&line), "{mode}: no `{line}` in:\n{out}");
        }
    }
}
