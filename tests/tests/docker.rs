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

/// The compose flow: a project's network label asks for ports; lhb serves exactly the
/// entries `--label-allow` allows (port and target), refuses the others with the reason
/// in `lhb status`, follows `down`/`up`, and leaves an allowed port unserved on a
/// network without the label.
#[test]
fn a_compose_project_gets_the_ports_its_network_label_asks_for_and_nothing_else() {
    if !docker::required("a_compose_project_gets_the_ports...") {
        return;
    }
    let asked = PeerEcho::start("127.0.0.1:0").unwrap();
    // Allowed only toward another target than the label names.
    let other_target = PeerEcho::start("127.0.0.1:0").unwrap();
    let wrong_target = PeerEcho::start("127.0.0.1:0").unwrap();
    // Not allowed at all.
    let not_allowed = PeerEcho::start("127.0.0.1:0").unwrap();
    let (p, q, r) = (asked.port(), wrong_target.port(), not_allowed.port());
    let yaml = format!(
        r#"version: "3.8"
services:
  app:
    image: {image}
    command: ["sleep", "3600"]
    extra_hosts: ["host.docker.internal:host-gateway"]
  side:
    image: {image}
    command: ["sleep", "3600"]
    networks: [plain]
networks:
  default:
    ipam:
      config: [{{subnet: 10.230.60.0/24}}]
    labels:
      lhb.expose: "{p}, {q}, {r}"
  plain:
    ipam:
      config: [{{subnet: 10.230.61.0/24}}]
"#,
        image = docker::IMAGE
    );
    let compose = docker::Compose::new("lhbt-compose", &yaml).unwrap();
    let lhb = Lhb::start(&[
        "--label-allow",
        &p.to_string(),
        "--label-allow",
        &format!("{q}=127.0.0.1:{}", other_target.port()),
    ])
    .unwrap();
    compose.up().unwrap();
    let net = "lhbt-compose_default";
    let gw = docker::gateway_of(net).unwrap();
    let via_host = format!("http://host.docker.internal:{p}/");
    let served = wait_until(Duration::from_secs(5), || {
        compose.wget("app", &via_host).is_ok()
    });
    assert!(served.is_some(), "label not followed:\n{}", lhb.log());
    let body = compose.wget("app", &via_host).unwrap();
    assert!(body.starts_with("peer=10.230.60."), "{body}");
    let body = compose.wget("app", &url(gw, p)).unwrap();
    assert!(body.starts_with("peer=10.230.60."), "{body}");
    // A listening service each: refused by lhb, not by its absence.
    for port in [q, r] {
        let e = compose.wget("app", &url(gw, port)).unwrap_err();
        assert!(e.to_string().contains("refused"), "{port}: {e}");
    }
    let plain_gw = docker::gateway_of("lhbt-compose_plain").unwrap();
    let e = compose.wget("side", &url(plain_gw, p)).unwrap_err();
    assert!(e.to_string().contains("refused"), "plain network: {e}");

    let st = lhb.status().unwrap();
    let rules = st["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{st:#}");
    assert_eq!(rules[0]["network"], net);
    assert_eq!(rules[0]["origin"], "label");
    assert_eq!(rules[0]["state"], "serving");
    let refused = st["label_refused"].as_array().unwrap();
    let reason = |port: u16| {
        refused
            .iter()
            .find(|f| f["entry"].as_str().and_then(|e| e.parse().ok()) == Some(port))
            .map(|f| f["reason"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{port} not refused: {st:#}"))
    };
    assert!(
        reason(q).contains(&format!("target 127.0.0.1:{q} is not allowed for port {q}")),
        "{st:#}"
    );
    assert!(
        reason(r).contains(&format!("port {r} is not in label_allow")),
        "{st:#}"
    );
    assert_eq!(refused.len(), 2, "{st:#}");
    // Logged once each, not at every event.
    assert_eq!(
        lhb.log().matches(&format!("entry `{r}` refused")).count(),
        1,
        "{}",
        lhb.log()
    );
    let (_, text, _) = lhb_check(&["status", "--control", &lhb.control()]).unwrap();
    assert!(text.contains("label entries NOT served:"), "{text}");
    let metrics = lhb.metrics().unwrap();
    let sample = format!(
        "lhb_rule_serving{{rule=\"{net}:{p}\",service=\"port-{p}\",origin=\"label\",protocol=\"tcp\"}} 1"
    );
    assert!(metrics.contains(&sample), "{sample} not in:\n{metrics}");

    // verify and doctor read the same labels (with the same allowed entries).
    let spec = format!("{net}:{p}");
    let (ok, out, err) = lhb_check(&["verify", &spec, "--label-allow", &p.to_string()]).unwrap();
    assert!(ok, "verify:\n{out}{err}");
    let (ok, out, err) = lhb_check(&[
        "doctor",
        &format!("{net}:{r}"),
        "--label-allow",
        &p.to_string(),
    ])
    .unwrap();
    assert!(!ok, "doctor of a refused entry:\n{out}{err}");
    assert!(
        out.contains(&format!(
            "WARN  network {net} label lhb.expose entry `{r}` refused"
        )),
        "{out}"
    );

    // down: the network and its rule go; up: a new bridge, served again.
    let old_bridge = docker::bridge_of(net).unwrap();
    compose.down().unwrap();
    let gone = wait_until(Duration::from_secs(5), || {
        lhb.status().unwrap()["rules"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    assert!(gone.is_some(), "{}", lhb.log());
    compose.up().unwrap();
    assert_ne!(docker::bridge_of(net).unwrap(), old_bridge);
    let served = wait_until(Duration::from_secs(5), || {
        compose.wget("app", &via_host).is_ok()
    });
    assert!(served.is_some(), "not served after up:\n{}", lhb.log());
}

/// Rootful Podman (netavark), in a namespace that plays the host: a rule by Podman
/// network name is served (its bridge from the libpod API), followed when the network
/// is removed and re-created with another subnet (Podman sends no network events: link
/// events make lhb ask again); a name that is also a Docker network waits with both
/// named, unless written podman:NAME; doctor reads Podman's view.
#[test]
fn podman_networks_are_served_by_name_and_followed() {
    if !docker::required("podman_networks_are_served...")
        || !lhb_tests::podman::required("podman_networks_are_served...")
    {
        return;
    }
    let lab = lhb_tests::HostLab::new(58).unwrap();
    let pod = lhb_tests::podman::Podman::start(&lab.host.name).unwrap();
    let net = "lhbt-pod58";
    // The same name on the machine's Docker engine (its bridge is not in this namespace:
    // the name alone is what makes a rule ambiguous).
    let _docker_net = DockerNet::create(net, "10.230.58.0/24").unwrap();
    pod.network_with_container(net, "10.232.58.0/24", "c58")
        .unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let other = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let (p, q) = (svc.port(), other.port());
    let engine = format!("unix://{}", pod.socket.display());
    let lhb = lab
        .lhb(&[
            "--engine",
            "unix:///var/run/docker.sock",
            "--engine",
            &engine,
            "--expose",
            &format!("podman:{net}:{p}"),
            "--expose",
            &format!("{net}:{q}"),
        ])
        .unwrap();
    let body = pod
        .wget("c58", &url("10.232.58.1".parse().unwrap(), p))
        .unwrap();
    assert!(body.starts_with("peer=10.232.58."), "{body}");
    let st = lhb.status().unwrap();
    assert_eq!(st["podman"]["available"], true, "{st:#}");
    let metrics = lhb.metrics().unwrap();
    for engine in ["docker", "podman"] {
        let sample = format!("\nlhb_{engine}_available 1\n");
        assert!(metrics.contains(&sample), "{sample:?} not in:\n{metrics}");
    }
    let rules = st["rules"].as_array().unwrap();
    assert_eq!(
        rules[0]["bridge"].as_str().unwrap().get(..6),
        Some("podman"),
        "{st:#}"
    );
    let reason = rules[1]["reason"].as_str().unwrap();
    assert!(
        rules[1]["state"] == "waiting"
            && reason.contains("exists on Docker (bridge br-")
            && reason.contains("and on Podman (bridge podman")
            && reason.contains(&format!("write docker:{net} or podman:{net}")),
        "{st:#}"
    );
    assert!(
        pod.wget("c58", &url("10.232.58.1".parse().unwrap(), q))
            .is_err()
    );

    // Removed and re-created with another subnet: no Podman event, a new bridge.
    pod.remove(net, "c58").unwrap();
    let recreated = Instant::now();
    pod.network_with_container(net, "10.232.158.0/24", "c58")
        .unwrap();
    let started = recreated.elapsed();
    let gw = "10.232.158.1".parse().unwrap();
    let took = wait_until(Duration::from_secs(2), || {
        pod.wget("c58", &url(gw, p)).is_ok()
    });
    assert!(
        took.is_some(),
        "not served after re-creation:\n{}",
        lhb.log()
    );
    eprintln!(
        "MEASURED: Podman network re-created and a container started ({started:?}) -> served {took:?} later"
    );
    let body = pod.wget("c58", &url(gw, p)).unwrap();
    assert!(body.starts_with("peer=10.232.158."), "{body}");

    // doctor, with the engines from a config file.
    let dir = std::env::temp_dir().join(format!("lhbt-pod58-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("lhb.toml");
    std::fs::write(
        &cfg,
        format!("engine = [\"unix:///var/run/docker.sock\", \"{engine}\"]\n"),
    )
    .unwrap();
    let doctor = |spec: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.host.name])
            .arg(lhb_tests::lhb_bin())
            .args(["doctor", "--config", cfg.to_str().unwrap(), spec])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = doctor(&format!("podman:{net}:{p}"));
    assert!(ok, "{out}\n{}", lhb.log());
    assert!(out.contains("OK    Podman: reachable"), "{out}");
    // plan says of each engine whether it answers.
    let planned = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.host.name])
        .arg(lhb_tests::lhb_bin())
        .args(["plan", "--config", cfg.to_str().unwrap(), "--expose"])
        .arg(format!("podman:{net}:{p}"))
        .output()
        .unwrap();
    let plan_text = String::from_utf8_lossy(&planned.stdout);
    assert!(
        planned.status.success(),
        "plan:\n{plan_text}{}",
        String::from_utf8_lossy(&planned.stderr)
    );
    assert!(
        plan_text.contains("\n  Docker engine: answers\n")
            && plan_text.contains("\n  Podman: answers\n"),
        "{plan_text}"
    );
    assert!(
        out.contains(&format!(
            "OK    Podman network {net}: exists, bridge podman"
        )),
        "{out}"
    );
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.host.name])
        .arg(lhb_tests::lhb_bin())
        .args([
            "verify",
            "--config",
            cfg.to_str().unwrap(),
            &format!("podman:{net}:{p}"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verify:\n{text}");
    assert!(
        text.contains("PASS  from the bridge: 10.232.158."),
        "{text}"
    );
    let (ok, out) = doctor(&format!("{net}:{q}"));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "fix: say which in the rule: docker:{net} or podman:{net}"
        )),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The host's resolver for containers, the issue's way: a UDP rule on a Docker network
/// to a dnsmasq on loopback (127.0.0.153:15353 here, clear of whatever the machine runs
/// on port 53); busybox nslookup asks the gateway directly, and a container started
/// with `--dns GATEWAY` asks through Docker's embedded DNS (what compose `dns:` does);
/// a re-created network (another subnet) is served again.
#[test]
fn containers_resolve_through_the_hosts_resolver_with_dns_gateway() {
    if !docker::required("containers_resolve_through_the_hosts_resolver...") {
        return;
    }
    let _dnsmasq = lhb_tests::Dnsmasq::start("127.0.0.153:15353".parse().unwrap()).unwrap();
    let net = DockerNet::create("lhbt-d9", "10.230.9.0/24").unwrap();
    let lhb = Lhb::start(&["--expose", "lhbt-d9:53/udp=127.0.0.153:15353"]).unwrap();
    let lookup = |extra: &[&str], server: Option<String>| -> String {
        let mut cmd = vec![
            "busybox".to_string(),
            "nslookup".to_string(),
            "x.example".to_string(),
        ];
        cmd.extend(server);
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = docker::run_in("lhbt-d9", extra, &cmd).unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let gw = net.gateway().unwrap().to_string();
    let direct = lookup(&[], Some(gw.clone()));
    assert!(direct.contains("10.1.2.3"), "{direct}\n{}", lhb.log());
    let embedded = lookup(&["--dns", &gw], None);
    assert!(embedded.contains("10.1.2.3"), "--dns {gw}: {embedded}");
    let v = lhb.status().unwrap();
    assert_eq!(v["rules"][0]["protocol"], "udp", "{v}");
    assert!(
        v["rules"][0]["counters"]["udp_datagrams_out"]
            .as_u64()
            .unwrap()
            >= 2
    );

    drop(net);
    let net = DockerNet::create("lhbt-d9", "10.230.10.0/24").unwrap();
    let gw = net.gateway().unwrap().to_string();
    let served = wait_until(Duration::from_secs(5), || {
        lookup(&[], Some(gw.clone())).contains("10.1.2.3")
    });
    assert!(
        served.is_some(),
        "re-created network not served\n{}",
        lhb.log()
    );
}
