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

/// Every way a start can fail after lhb has begun to set up (the kernel path loaded,
/// links pinned, the bridge attached, sockets bound) leaves nothing behind.
#[test]
fn failed_starts_leave_nothing_behind() {
    let lab = Lab::new(22).unwrap();
    let br = lab.bridge_name();
    let pins = PinDir::new("failed");
    let dir = std::env::temp_dir().join(format!("lhbt22-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let control = dir.join("lhb.sock");
    let control = control.to_str().unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    // The IPv6 gateway of an IPv4 target goes through the proxy in auto mode: with its
    // port taken, the start fails after the kernel path is attached to the bridge.
    let taken = std::net::TcpListener::bind((lab.gateway6(), svc.port())).unwrap();
    let good = format!("{br}:{}", svc.port());
    let not_a_bridge = format!("{}:80", lab.container_veth());
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "kernel",
            vec!["--expose-iface", "nosuch0:80"],
            "does not exist",
        ),
        (
            "kernel",
            vec!["--expose-iface", &good, "--expose-iface", &not_a_bridge],
            "is not a bridge",
        ),
        ("auto", vec!["--expose-iface", &good], "already in use"),
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
        let left: Vec<String> = std::fs::read_dir(&pins.0)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{args:?}: pinned links left: {left:?}");
        assert!(
            !std::path::Path::new(&pins.0).exists(),
            "{args:?}: pin directory left"
        );
        assert_eq!(
            lhb_tests::ingress_programs(&br).unwrap(),
            Vec::<String>::new(),
            "{args:?}: a program was left on the bridge"
        );
        for sock in ["lhb.sock", "metrics.sock"] {
            assert!(!dir.join(sock).exists(), "{args:?}: {sock} left behind");
        }
    }
    drop(taken);
    std::fs::remove_dir_all(&dir).ok();
}
