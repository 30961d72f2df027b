//! End-to-end tests of the kernel data path: the real `lhb` binary, the real kernel, real
//! namespaces and bridges (see lhb_tests::Lab for the topology). Each test owns a lab
//! number, so the tests run in parallel without sharing a name or an address.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lhb_tests::{
    Lab, Lhb, Outcome, PeerEcho, bpf_ids_held_by, bpf_link_exists, bpf_program_exists, free_port,
    http_get, ingress_programs, lhb_once, wait_until,
};

const T: Duration = Duration::from_secs(2);

fn get_from(ns: &lhb_tests::Netns, ip: IpAddr, port: u16) -> Outcome {
    let addr = SocketAddr::new(ip, port);
    ns.run(move || http_get(addr, T)).expect("thread in netns")
}

fn expose(lab: &Lab, spec: &str) -> String {
    format!("{}:{spec}", lab.bridge_name())
}

#[test]
fn container_reaches_loopback_service_and_it_sees_the_container_address() {
    let lab = Lab::new(1).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let _lhb = Lhb::start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]).unwrap();

    let want = format!("peer={}:", lab.container_ip());
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

#[test]
fn without_lhb_the_service_is_refused() {
    let lab = Lab::new(2).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    assert_eq!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Refused
    );
}

#[test]
fn outside_and_neighbour_namespaces_are_refused_on_every_host_address() {
    let lab = Lab::new(3).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let _lhb = Lhb::start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]).unwrap();
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

#[test]
fn gateway_port_can_map_to_another_loopback_port() {
    let lab = Lab::new(4).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let outer = free_port("127.0.0.1").unwrap();
    let spec = expose(&lab, &format!("{outer}=127.0.0.1:{}", svc.port()));
    let _lhb = Lhb::start(&["--expose-iface", &spec]).unwrap();
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

#[test]
fn service_down_is_refused_at_once_not_timed_out() {
    let lab = Lab::new(5).unwrap();
    let mut svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let port = svc.port();
    let _lhb = Lhb::start(&["--expose-iface", &expose(&lab, &port.to_string())]).unwrap();
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
    assert_eq!(outcome, Outcome::Refused);
    assert!(started.elapsed() < Duration::from_secs(1));

    // And served again once the service is back on the same port.
    let _svc2 = PeerEcho::start(&format!("127.0.0.1:{port}")).unwrap();
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), port),
        Outcome::Served(_)
    ));
}

#[test]
fn a_re_created_bridge_is_served_again_within_a_second() {
    let mut lab = Lab::new(6).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let lhb = Lhb::start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]).unwrap();
    assert!(matches!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Served(_)
    ));
    let old = lab
        .links
        .iter()
        .find(|l| l.name == lab.bridge_name())
        .unwrap()
        .ifindex()
        .unwrap();

    lab.recreate_bridge().unwrap();
    let new = lab
        .links
        .iter()
        .find(|l| l.name == lab.bridge_name())
        .unwrap()
        .ifindex()
        .unwrap();
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

#[test]
fn ipv6_loopback_only_listener_is_reached_through_the_ipv6_gateway() {
    let lab = Lab::new(7).unwrap();
    let svc = PeerEcho::start("[::1]:0").unwrap();
    let spec = expose(&lab, &format!("{0}=[::1]:{0}", svc.port()));
    let _lhb = Lhb::start(&["--expose-iface", &spec]).unwrap();
    let want = format!("peer=[{}]:", lab.container_ip6());
    match get_from(&lab.container, lab.gateway6(), svc.port()) {
        Outcome::Served(body) => assert!(body.starts_with(&want), "{body}"),
        other => panic!("not served over IPv6: {other:?}"),
    }
}

#[test]
fn sigterm_detaches_everything() {
    let lab = Lab::new(8).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let mut lhb = Lhb::start(&["--expose-iface", &expose(&lab, &svc.port().to_string())]).unwrap();
    let br = lab.bridge_name();
    let (progs, links) = bpf_ids_held_by(lhb.pid()).unwrap();
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

    let status = lhb.stop().unwrap();
    assert!(status.success(), "exit status {status}:\n{}", lhb.log());
    assert_eq!(ingress_programs(&br).unwrap(), Vec::<String>::new());
    for id in progs {
        assert!(!bpf_program_exists(id), "program {id} still loaded");
    }
    for id in links {
        assert!(!bpf_link_exists(id), "link {id} still exists");
    }
    assert_eq!(
        get_from(&lab.container, lab.gateway(), svc.port()),
        Outcome::Refused
    );
}

#[test]
fn redis_benchmark_through_the_gateway_has_no_errors() {
    let lab = Lab::new(9).unwrap();
    let port = free_port("127.0.0.1").unwrap();
    let mut redis = std::process::Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server (installed by `cargo xtask setup`)");
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let result = (|| {
        up.ok_or("redis-server did not start")?;
        let _lhb = Lhb::start(&["--expose-iface", &expose(&lab, &port.to_string())])
            .map_err(|e| e.to_string())?;
        let out = lab
            .container
            .command("redis-benchmark")
            .args(["-h", &lab.gateway().to_string(), "-p", &port.to_string()])
            .args(["-n", "100000", "-c", "20", "-t", "set,get", "--csv"])
            .output()
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(out)
    })();
    let _ = redis.kill();
    let _ = redis.wait();
    let out = result.unwrap();
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
#[test]
fn bad_input_gets_a_clear_error_and_nothing_is_attached() {
    let lab = Lab::new(10).unwrap();
    let br = lab.bridge_name();
    let bare = lhb_tests::bridge("lhbt10bare", &[]).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec![], "no rule to serve"),
        (
            vec![format!("lhbt10nosuch:80")],
            "lhbt10nosuch does not exist",
        ),
        (
            vec![format!("{}:80", lab.container_veth())],
            "is not a bridge",
        ),
        (vec!["lhbt10bare:80".into()], "has no IP address"),
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
        let mut args = vec!["run".to_string()];
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

    // Without the capabilities, the error names them (and nothing is attached).
    let spec = format!("{br}:80");
    let (status, stderr) = lhb_once(
        &["run", "--expose-iface", &spec],
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

#[test]
fn sighup_reloads_the_config_and_a_bad_file_keeps_the_running_rules() {
    let lab = Lab::new(11).unwrap();
    let a = PeerEcho::start("127.0.0.1:0").unwrap();
    let b = PeerEcho::start("127.0.0.1:0").unwrap();
    let dir = std::env::temp_dir().join(format!("lhbt11-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lhb.toml");
    let rule = |port: u16| {
        format!(
            "[[expose]]\ninterface = \"{}\"\nport = {port}\n",
            lab.bridge_name()
        )
    };
    std::fs::write(&file, rule(a.port())).unwrap();
    let lhb = Lhb::start(&["--config", file.to_str().unwrap()]).unwrap();
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
