//! Fault injection on real namespaces, bridges and the real kernel: what a host does to
//! lhb (crashes and restarts racing each other, failed starts, firewall reloads, fd
//! exhaustion) and what lhb must do about it: keep serving, heal, leave nothing behind.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lhb_tests::{Lab, Lhb, PeerEcho, Poller};

/// Removes a pin directory a test chose itself (whatever a daemon left in it).
struct PinDir(String);

impl PinDir {
    fn new(name: &str) -> PinDir {
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
