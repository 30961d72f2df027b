//! End-to-end tests against the real Docker engine: rules by network name, containers
//! from the local busybox image, networks created late, removed and re-created.
//!
//! Each test uses its own network names (lhbt-dN...) and subnets (10.230.N.0/24 and up).
//! Where a probe needs to poll quickly (the 1 s promises), it is a namespace plugged
//! into the Docker bridge; a real container then confirms.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lhb_tests::{
    Lhb, Netns, Outcome, PeerEcho,
    docker::{self, DockerNet},
    http_get, lhb_check, plug, wait_until,
};

fn url(ip: std::net::IpAddr, port: u16) -> String {
    format!("http://{ip}:{port}/")
}

/// A namespace on a Docker network's bridge at `addr` (CIDR), for fast polling.
fn probe_on(net: &DockerNet, ns: &str, veth: &str, addr: &str) -> (Netns, lhb_tests::HostLink) {
    let ns = Netns::new(ns).unwrap();
    let gw = net.gateway().unwrap().to_string();
    let link = plug(&ns, veth, Some(&net.bridge().unwrap()), &[addr], &[&gw]).unwrap();
    (ns, link)
}

/// Time until the probe is served at gateway:port, polling every 10 ms.
fn served_within(ns: &Netns, gw: std::net::IpAddr, port: u16, limit: Duration) -> Option<Duration> {
    let addr = SocketAddr::new(gw, port);
    wait_until(limit, || {
        matches!(
            ns.run(move || http_get(addr, Duration::from_millis(200))),
            Ok(Outcome::Served(_))
        )
    })
}

#[test]
fn containers_on_the_default_and_a_user_network_reach_the_gateway_and_host_docker_internal() {
    if !docker::required("containers_on_the_default_and_a_user_network...") {
        return;
    }
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let _net = DockerNet::create("lhbt-d1", "10.230.1.0/24").unwrap();
    let _lhb = Lhb::start(&[
        "--expose",
        &format!("bridge:{p}"),
        "--expose",
        &format!("lhbt-d1:{p}"),
    ])
    .unwrap();
    let host_gw = ["--add-host", "host.docker.internal:host-gateway"];
    for (network, prefix) in [("bridge", "peer=172.17."), ("lhbt-d1", "peer=10.230.1.")] {
        let gw = docker::gateway_of(network).unwrap();
        let body = docker::wget_from(network, &url(gw, p), &[]).unwrap();
        assert!(body.starts_with(prefix), "{network} via gateway: {body}");
        let body = docker::wget_from(
            network,
            &format!("http://host.docker.internal:{p}/"),
            &host_gw,
        )
        .unwrap();
        assert!(
            body.starts_with(prefix),
            "{network} via host.docker.internal: {body}"
        );
    }
}

#[test]
fn a_network_created_after_lhb_started_is_served_within_a_second() {
    if !docker::required("a_network_created_after_lhb_started...") {
        return;
    }
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let lhb = Lhb::start(&["--expose", &format!("lhbt-d2:{p}")]).unwrap();
    assert!(lhb.log().contains("does not exist (yet)"), "{}", lhb.log());

    let created = Instant::now();
    let net = DockerNet::create("lhbt-d2", "10.230.2.0/24").unwrap();
    let (probe, _veth) = probe_on(&net, "lhbt-d2p", "lhbt-d2pv", "10.230.2.200/24");
    let gw = net.gateway().unwrap();
    let took = served_within(&probe, gw, p, Duration::from_secs(1));
    let total = created.elapsed();
    assert!(took.is_some(), "not served within 1 s:\n{}", lhb.log());
    eprintln!(
        "MEASURED: docker network create -> first served connection: {total:?} (after the probe was plugged: {:?})",
        took.unwrap()
    );
    let body = docker::wget_from("lhbt-d2", &url(gw, p), &[]).unwrap();
    assert!(body.starts_with("peer=10.230.2."), "{body}");
}

#[test]
fn a_network_removed_and_re_created_with_another_subnet_is_served_again() {
    if !docker::required("a_network_removed_and_re_created...") {
        return;
    }
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let net = DockerNet::create("lhbt-d3", "10.230.3.0/24").unwrap();
    let lhb = Lhb::start(&["--expose", &format!("lhbt-d3:{p}")]).unwrap();
    let old_gw = net.gateway().unwrap();
    let body = docker::wget_from("lhbt-d3", &url(old_gw, p), &[]).unwrap();
    assert!(body.starts_with("peer=10.230.3."), "{body}");
    let old_bridge = net.bridge().unwrap();
    drop(net);

    let recreated = Instant::now();
    let net = DockerNet::create("lhbt-d3", "10.230.4.0/24").unwrap();
    assert_ne!(
        net.bridge().unwrap(),
        old_bridge,
        "Docker made a new bridge"
    );
    let (probe, _veth) = probe_on(&net, "lhbt-d3p", "lhbt-d3pv", "10.230.4.200/24");
    let gw = net.gateway().unwrap();
    let took = served_within(&probe, gw, p, Duration::from_secs(1));
    assert!(
        took.is_some(),
        "not served again within 1 s:\n{}",
        lhb.log()
    );
    eprintln!(
        "MEASURED: network re-created -> first served connection: {:?}",
        recreated.elapsed()
    );
    let body = docker::wget_from("lhbt-d3", &url(gw, p), &[]).unwrap();
    assert!(body.starts_with("peer=10.230.4."), "{body}");
    // The old gateway is no longer a host address, so probing it would send traffic off
    // this machine; that no endpoint of it survives is the reconciler's diff tests' job.
}

#[test]
fn a_container_on_a_network_without_a_rule_is_refused() {
    if !docker::required("a_container_on_a_network_without_a_rule_is_refused") {
        return;
    }
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let ruled = DockerNet::create("lhbt-d5", "10.230.5.0/24").unwrap();
    let other = DockerNet::create("lhbt-d6", "10.230.6.0/24").unwrap();
    let _lhb = Lhb::start(&["--expose", &format!("lhbt-d5:{p}")]).unwrap();
    // Served where the rule is, so the refusals below are the scoping at work.
    let gw5 = ruled.gateway().unwrap();
    assert!(docker::wget_from("lhbt-d5", &url(gw5, p), &[]).is_ok());
    let gw6 = other.gateway().unwrap();
    for gw in [gw6, gw5] {
        let err = docker::wget_from("lhbt-d6", &url(gw, p), &[]).unwrap_err();
        assert!(err.to_string().contains("refused"), "{gw}: {err}");
    }
}

#[test]
fn fifty_networks_with_two_ports_each_reconcile() {
    if !docker::required("fifty_networks_with_two_ports_each_reconcile") {
        return;
    }
    let a = PeerEcho::start("127.0.0.1:0").unwrap();
    let b = PeerEcho::start("127.0.0.1:0").unwrap();
    let nets: Vec<DockerNet> = (0..50)
        .map(|i| DockerNet::create(&format!("lhbt-f{i}"), &format!("10.231.{i}.0/24")).unwrap())
        .collect();
    let mut config = String::new();
    for n in &nets {
        for (svc, port) in [("a", a.port()), ("b", b.port())] {
            config.push_str(&format!(
                "[[expose]]\nnetwork = \"{}\"\nservice = \"{svc}\"\nport = {port}\n\n",
                n.name
            ));
        }
    }
    let dir = std::env::temp_dir().join(format!("lhbt-f-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("lhb.toml");
    std::fs::write(&file, config).unwrap();
    let lhb = Lhb::start(&["--config", file.to_str().unwrap()]);
    std::fs::remove_dir_all(&dir).ok();
    let lhb = lhb.unwrap();
    assert!(
        lhb.log().contains("ready: serving 100 of 100 rule(s)"),
        "{}",
        lhb.log()
    );
    // Spot checks with real containers: first, middle and last network, both ports.
    for i in [0usize, 24, 49] {
        let gw = nets[i].gateway().unwrap();
        for port in [a.port(), b.port()] {
            let body = docker::wget_from(&nets[i].name, &url(gw, port), &[]).unwrap();
            assert!(body.starts_with(&format!("peer=10.231.{i}.")), "{body}");
        }
    }
}

/// The troubleshooting table's "bridge re-created" fault on a real Docker network: while
/// it is gone doctor names it and the fix; once Docker re-creates it (new bridge, new
/// subnet) lhb has followed and doctor and verify find nothing wrong.
#[test]
fn doctor_and_verify_follow_a_docker_network_through_re_creation() {
    if !docker::required("doctor_and_verify_follow_a_docker_network...") {
        return;
    }
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let spec = format!("lhbt-d7:{p}");
    let net = DockerNet::create("lhbt-d7", "10.230.7.0/24").unwrap();
    let lhb = Lhb::start(&["--expose", &spec]).unwrap();
    let (ok, out, err) = lhb_check(&["doctor", &spec]).unwrap();
    assert!(ok, "doctor:\n{out}{err}\n{}", lhb.log());
    assert!(out.contains("OK    Docker engine: reachable"), "{out}");
    assert!(
        out.contains(&format!(
            "OK    Docker network lhbt-d7: exists, bridge {}",
            net.bridge().unwrap()
        )),
        "{out}"
    );
    let (ok, out, err) = lhb_check(&["verify", &spec]).unwrap();
    assert!(ok, "verify:\n{out}{err}\n{}", lhb.log());
    assert!(out.contains("PASS  from the bridge: 10.230.7."), "{out}");

    drop(net);
    let (ok, out, _) = lhb_check(&["doctor", &spec]).unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  Docker network lhbt-d7: does not exist"),
        "{out}"
    );
    assert!(
        out.contains("fix: create it (`docker network create lhbt-d7`"),
        "{out}"
    );

    let net = DockerNet::create("lhbt-d7", "10.230.8.0/24").unwrap();
    let mut last = String::new();
    let healthy = wait_until(Duration::from_secs(5), || {
        let (ok, out, _) = lhb_check(&["doctor", &spec]).unwrap();
        last = out;
        ok
    });
    assert!(healthy.is_some(), "{last}\n{}", lhb.log());
    assert!(last.contains("OK    gateway: 10.230.8.1"), "{last}");
    let (ok, out, _) = lhb_check(&["verify", &spec]).unwrap();
    assert!(ok, "verify after re-creation:\n{out}");
    drop(net);
}
