//! lhb as a service: the systemd unit (generated, verified by systemd-analyze, and its
//! capability set sufficient), readiness over the notify protocol, the control socket
//! (status JSON, runtime expose/unexpose, --persist), the metrics endpoint, and what a
//! crash or a restart does to connections.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixDatagram,
    thread,
    time::{Duration, Instant},
};

use lhb_tests::{Lab, Lhb, Outcome, PeerEcho, PinDir, free_port, http_get, lhb_check, wait_until};

const T: Duration = Duration::from_secs(2);

fn get(lab: &Lab, port: u16) -> Outcome {
    let gw = SocketAddr::new(lab.gateway(), port);
    lab.container.run(move || http_get(gw, T)).unwrap()
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lhbt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_unit_is_accepted_by_systemd_and_its_capabilities_suffice() {
    let dir = tmpdir("unit");
    let (ok, unit, err) = lhb_check(&["unit", "print", "--config", "/etc/lhb/lhb.toml"]).unwrap();
    assert!(ok, "{err}");
    for line in [
        "Type=notify",
        "Restart=always",
        "After=network-online.target docker.service firewalld.service",
        "CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_NET_RAW",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RuntimeDirectory=lhb",
        " run --config \"/etc/lhb/lhb.toml\"",
        "SystemCallFilter=@system-service bpf perf_event_open",
        "ProtectProc=invisible",
        "UMask=0077",
        "ReadWritePaths=-/sys/fs/bpf\n",
    ] {
        assert!(unit.contains(line), "no `{line}` in:\n{unit}");
    }
    assert!(
        !unit.contains("Requires=docker"),
        "Docker must not be required"
    );
    // A binary the sandbox would hide is refused, with the fix.
    let (ok, _, err) = lhb_check(&[
        "unit",
        "install",
        "--dir",
        dir.to_str().unwrap(),
        "--exe",
        "/root/.cargo/bin/lhb",
    ])
    .unwrap();
    assert!(
        !ok && err.contains("ProtectHome") && err.contains("install -m 0755"),
        "{err}"
    );
    // This checkout may itself be under /tmp or /root: the unit then names a copy of the
    // binary in a directory the sandbox leaves visible (removed at the end).
    let bin = lhb_tests::lhb_bin();
    let visible = ["/home", "/root", "/tmp", "/var/tmp", "/run/user"]
        .iter()
        .all(|d| !bin.starts_with(d));
    let copy_dir = std::path::PathBuf::from(format!("/var/lib/lhbt-unit-{}", std::process::id()));
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _copy = Remove(copy_dir.clone());
    let exe = if visible {
        bin.clone()
    } else {
        std::fs::create_dir_all(&copy_dir).unwrap();
        std::fs::copy(&bin, copy_dir.join("lhb")).unwrap();
        copy_dir.join("lhb")
    };
    let (ok, out, err) = lhb_check(&[
        "unit",
        "install",
        "--dir",
        dir.to_str().unwrap(),
        "--exe",
        exe.to_str().unwrap(),
    ])
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("systemctl daemon-reload"), "{out}");
    let path = dir.join("lhb.service");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap().lines().count(),
        unit.lines().count()
    );
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Only Docker's unit may be missing on a machine without it; nothing about lhb's.
    for l in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(l.contains("docker.service"), "systemd-analyze: {l}");
    }
    // The exposure score systemd computes for the unit: 4.1 before the hardening of
    // the security issue, 2.7 after; it must not creep back up.
    let out = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for lhb.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no score in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 2.7, "exposure {score}");
    std::fs::remove_dir_all(&dir).unwrap();

    // Exactly the unit's capabilities: the kernel path loads and serves.
    let lab = Lab::new(70).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec = format!("{}:{}", lab.bridge_name(), svc.port());
    let caps = "-all,+bpf,+net_admin,+perfmon,+net_raw";
    let lhb = Lhb::start_wrapped(
        &[
            "setpriv",
            "--inh-caps",
            caps,
            "--ambient-caps",
            caps,
            "--bounding-set",
            caps,
            "--",
        ],
        &lhb_tests::lhb_bin(),
        &["--mode", "kernel", "--expose-iface", &spec],
    )
    .unwrap();
    assert!(
        matches!(get(&lab, svc.port()), Outcome::Served(_)),
        "{}",
        lhb.log()
    );
    assert!(!lhb.log().contains("WARN"), "{}", lhb.log());
}

/// READY=1 arrives only once the rule serves: a connection made the moment it arrives
/// is served. STATUS= says what is served; WATCHDOG=1 comes when asked for.
#[test]
fn readiness_is_notified_once_the_rule_serves() {
    let lab = Lab::new(71).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let dir = tmpdir("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let spec = format!("{}:{}", lab.bridge_name(), svc.port());
    let lhb = Lhb::spawn(
        &["--mode", "kernel", "--expose-iface", &spec],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    let ready = loop {
        let n = sock.recv(&mut buf).expect("no READY=1 within 20 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.lines().any(|l| l == "READY=1") {
            break msg;
        }
        seen.push(msg);
    };
    // The moment READY=1 arrives, a container is served.
    assert!(
        matches!(get(&lab, svc.port()), Outcome::Served(_)),
        "{}",
        lhb.log()
    );
    assert!(seen.iter().all(|m| !m.contains("READY")), "{seen:?}");
    assert!(ready.contains("STATUS=serving 1 of 1 rule(s)"), "{ready}");
    assert!(ready.contains(&format!("MAINPID={}", lhb.pid())), "{ready}");
    let start = Instant::now();
    let watchdog = loop {
        let n = sock.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            break start.elapsed();
        }
    };
    assert!(watchdog < Duration::from_secs(2), "{watchdog:?}");
    drop(lhb);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `lhb status --json`, then runtime expose / unexpose, with and without --persist: the
/// config file keeps its comments, the container is served and then refused.
#[test]
fn status_and_runtime_expose_unexpose_with_persist() {
    let lab = Lab::new(72).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let other = PeerEcho::start("127.0.0.1:0").unwrap();
    let br = lab.bridge_name();
    let dir = tmpdir("persist");
    let cfg = dir.join("lhb.toml");
    let original = format!(
        "# lhb for the tests\nmode = \"auto\" # stays\n\n[[expose]]\n# the first service\ninterface = \"{br}\"\nport = {}\nservice = \"first\"\n",
        svc.port()
    );
    std::fs::write(&cfg, &original).unwrap();
    let lhb = Lhb::start(&["--config", cfg.to_str().unwrap(), "--firewall", "none"]).unwrap();
    let ctl = lhb.control();

    let (ok, out, err) = lhb_check(&["status", "--json", "--control", &ctl]).unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pid"], lhb.pid());
    let r = &v["rules"][0];
    assert_eq!(r["interface"], br.as_str());
    assert_eq!(r["port"], svc.port());
    assert_eq!(r["service"], "first");
    assert_eq!(r["origin"], "config");
    assert_eq!(r["state"], "serving");
    assert_eq!(r["bridge"], br.as_str());
    assert_eq!(r["gateways"][0]["address"], lab.gateway().to_string());
    assert_eq!(r["gateways"][0]["path"], "kernel");
    assert_eq!(r["gateways"][1]["path"], "proxy", "{out}");
    assert!(
        r["gateways"][1]["why"].as_str().unwrap().contains("IPv6"),
        "{out}"
    );
    let (ok, table, _) = lhb_check(&["status", "--control", &ctl]).unwrap();
    assert!(
        ok && table.contains(&format!("{br}:{}", svc.port())),
        "{table}"
    );

    // Runtime only: served now, not written.
    let spec = format!("{br}:{}", other.port());
    assert_eq!(get(&lab, other.port()), Outcome::Refused);
    let (ok, out, err) = lhb_check(&["expose", "--iface", &spec, "--control", &ctl]).unwrap();
    assert!(ok, "{out}{err}");
    assert!(out.contains("serving on"), "{out}");
    assert!(matches!(get(&lab, other.port()), Outcome::Served(_)));
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), original);
    let (_, out, _) = lhb_check(&["status", "--json", "--control", &ctl]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["rules"][1]["origin"], "runtime");
    // A duplicate is refused with the reason.
    let (ok, _, err) = lhb_check(&["expose", "--iface", &spec, "--control", &ctl]).unwrap();
    assert!(!ok && err.contains("already exposed"), "{err}");
    let (ok, _, err) = lhb_check(&["unexpose", "--iface", &spec, "--control", &ctl]).unwrap();
    assert!(ok, "{err}");
    assert_eq!(get(&lab, other.port()), Outcome::Refused);

    // Persisted: written (comments kept), and gone again after unexpose --persist.
    let (ok, out, err) = lhb_check(&[
        "expose",
        "--iface",
        &spec,
        "--service",
        "second",
        "--persist",
        "--control",
        &ctl,
    ])
    .unwrap();
    assert!(ok, "{out}{err}");
    let written = std::fs::read_to_string(&cfg).unwrap();
    assert!(written.starts_with(&original), "{written}");
    assert!(written.contains("service = \"second\""), "{written}");
    assert!(matches!(get(&lab, other.port()), Outcome::Served(_)));
    let (ok, _, err) =
        lhb_check(&["unexpose", "--iface", &spec, "--persist", "--control", &ctl]).unwrap();
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), original);
    assert_eq!(get(&lab, other.port()), Outcome::Refused);
    // Unknown rule: a clear error.
    let (ok, _, err) =
        lhb_check(&["unexpose", "--iface", &format!("{br}:1"), "--control", &ctl]).unwrap();
    assert!(!ok && err.contains("no rule"), "{err}");
    drop(lhb);
    // Without a daemon, the client says so.
    let (ok, _, err) = lhb_check(&["status", "--control", &ctl]).unwrap();
    assert!(!ok && err.contains("no lhb daemon answers"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn scrape_unix(path: &std::path::Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lhb\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn scrape_tcp(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lhb\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn sample(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn metrics_count_connections_per_path_on_unix_and_loopback() {
    let lab = Lab::new(73).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let br = lab.bridge_name();
    let spec = format!("{br}:{}", svc.port());
    // Default: a Unix socket beside the control socket; kernel path.
    let lhb = Lhb::start(&["--mode", "kernel", "--expose-iface", &spec]).unwrap();
    for _ in 0..3 {
        assert!(matches!(get(&lab, svc.port()), Outcome::Served(_)));
    }
    let text = scrape_unix(&lhb.metrics_socket());
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let rule = format!(
        "{{rule=\"{spec}\",service=\"port-{}\",origin=\"command-line\",protocol=\"tcp\"",
        svc.port()
    );
    assert_eq!(
        sample(
            &text,
            &format!("lhb_connections_total{rule},path=\"kernel\"}}")
        ),
        Some(3),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("lhb_rule_serving{rule}}}")),
        Some(1),
        "{text}"
    );
    assert!(
        text.contains("# TYPE lhb_reconcile_events_total counter"),
        "{text}"
    );
    drop(lhb);

    // A loopback address from the config; proxy path: bytes and connections.
    let port = free_port("127.0.0.1").unwrap();
    let dir = tmpdir("metrics");
    let cfg = dir.join("lhb.toml");
    std::fs::write(&cfg, format!("metrics = \"127.0.0.1:{port}\"\n")).unwrap();
    let _lhb = Lhb::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--mode",
        "proxy",
        "--expose-iface",
        &spec,
    ])
    .unwrap();
    for _ in 0..2 {
        assert!(matches!(get(&lab, svc.port()), Outcome::Served(_)));
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = scrape_tcp(addr);
    let ok = wait_until(Duration::from_secs(2), || {
        sample(
            &scrape_tcp(addr),
            &format!("lhb_connections_total{rule},path=\"proxy\"}}"),
        ) == Some(2)
    });
    assert!(ok.is_some(), "{text}");
    assert!(
        sample(&text, &format!("lhb_proxy_bytes_total{rule}}}")).unwrap() > 0,
        "{text}"
    );
    // Non-loopback metrics addresses are refused at load.
    std::fs::write(&cfg, "metrics = \"0.0.0.0:9464\"\n").unwrap();
    let (status, err) = lhb_tests::lhb_once(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--expose-iface",
            &spec,
        ],
        &[],
    )
    .unwrap();
    assert!(!status.success() && err.contains("loopback"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stream echo service: what comes in goes back.
fn echo_service() -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, h)
}

fn programs_on(lab: &Lab) -> usize {
    lhb_tests::ingress_programs(&lab.bridge_name())
        .unwrap()
        .len()
}

fn connects(lab: &Lab, port: u16) -> bool {
    let gw = SocketAddr::new(lab.gateway(), port);
    lab.container
        .run(move || TcpStream::connect_timeout(&gw, Duration::from_millis(300)).is_ok())
        .unwrap()
}

/// With the kernel path the container's connection is native TCP to the service: it
/// keeps flowing across a `kill -9` of the daemon. The links are pinned, so new
/// connections are served while the daemon is down; the next start takes over without a
/// gap and leaves one program on the bridge.
#[test]
fn kill_9_keeps_streams_and_new_connections_and_the_next_start_takes_over() {
    kill_9_and_takeover(74, &[]);
}

/// The same with the kernel path's variant for kernels before 5.17 (SYN tickets): two
/// daemons' programs side by side during the takeover each ticket and serve.
#[test]
fn kill_9_and_takeover_with_syn_tickets() {
    kill_9_and_takeover(77, &[("LHB_KERNEL_VARIANT", "ticket")]);
}

fn kill_9_and_takeover(n: u8, env: &[(&str, &str)]) {
    let lab = Lab::new(n).unwrap();
    let (port, _echo) = echo_service();
    let pins = PinDir::new(&format!("k9-{n}"));
    let spec = format!("{}:{port}", lab.bridge_name());
    let args = [
        "--mode",
        "kernel",
        "--pin-dir",
        pins.0.as_str(),
        "--expose-iface",
        &spec,
    ];
    let mut lhb = Lhb::start_env(&args, env).unwrap();
    let gw = SocketAddr::new(lab.gateway(), port);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Result<usize, String>>();
    // A stream that sends and checks a line every 20 ms until told to stop.
    let _stream = lab
        .container
        .run(move || {
            thread::spawn(move || {
                let r = (|| -> Result<usize, String> {
                    let mut s = TcpStream::connect_timeout(&gw, T).map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(T)).unwrap();
                    let mut rounds = 0;
                    while rx.try_recv().is_err() {
                        let msg = format!("round {rounds}\n");
                        s.write_all(msg.as_bytes())
                            .map_err(|e| format!("write: {e}"))?;
                        let mut back = vec![0u8; msg.len()];
                        s.read_exact(&mut back)
                            .map_err(|e| format!("read after {rounds}: {e}"))?;
                        if back != msg.as_bytes() {
                            return Err("corrupted".into());
                        }
                        rounds += 1;
                        thread::sleep(Duration::from_millis(20));
                    }
                    Ok(rounds)
                })();
                let _ = done_tx.send(r);
            })
        })
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    lhb.kill9();
    // Down: new connections are still served by the pinned programs.
    for _ in 0..5 {
        assert!(
            connects(&lab, port),
            "a new connection failed while lhb was down"
        );
    }
    thread::sleep(Duration::from_millis(300));
    tx.send(()).unwrap();
    let rounds = done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let rounds = rounds.expect("the established stream broke when lhb was killed");
    assert!(rounds > 20, "{rounds} rounds");

    // The next start: served throughout, then one program left.
    let mut lhb = Lhb::spawn(&args, env).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while !lhb.log().contains("ready:") && Instant::now() < until {
        assert!(connects(&lab, port), "a gap while the next lhb took over");
    }
    assert!(
        lhb.log().contains("took over from an earlier lhb"),
        "{}",
        lhb.log()
    );
    assert!(connects(&lab, port));
    // The earlier links were unpinned before "ready"; the kernel detaches an unpinned
    // link after an RCU grace period, from a work queue (kernel.rs, release_earlier),
    // so the earlier program may still be listed for a moment.
    let one = wait_until(Duration::from_secs(2), || programs_on(&lab) == 1);
    assert!(
        one.is_some(),
        "{} programs on the bridge",
        programs_on(&lab)
    );
    assert!(lhb.stop().unwrap().success());
    // A clean exit removes everything: programs, pins, and the service is refused.
    assert_eq!(programs_on(&lab), 0);
    assert!(
        !std::path::Path::new(&pins.0).exists(),
        "pins left in {}",
        pins.0
    );
    assert!(!connects(&lab, port));
}

/// `--keep-on-exit`: a clean exit leaves the kernel path serving; the next start takes
/// it over.
#[test]
fn keep_on_exit_leaves_the_kernel_path_serving_for_the_next_start() {
    let lab = Lab::new(75).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let pins = PinDir::new("keep");
    let spec = format!("{}:{}", lab.bridge_name(), svc.port());
    let args = vec![
        "--mode",
        "kernel",
        "--pin-dir",
        pins.0.as_str(),
        "--expose-iface",
        &spec,
    ];
    let mut lhb = Lhb::start(&[args.as_slice(), &["--keep-on-exit"]].concat()).unwrap();
    assert!(lhb.stop().unwrap().success());
    assert!(lhb.log().contains("--keep-on-exit"), "{}", lhb.log());
    assert!(
        matches!(get(&lab, svc.port()), Outcome::Served(_)),
        "not served after the exit"
    );
    let mut next = Lhb::start(&args).unwrap();
    assert!(
        next.log().contains("took over from an earlier lhb"),
        "{}",
        next.log()
    );
    assert!(matches!(get(&lab, svc.port()), Outcome::Served(_)));
    // The earlier program goes asynchronously once unpinned (see the kill -9 test).
    let one = wait_until(Duration::from_secs(2), || programs_on(&lab) == 1);
    assert!(
        one.is_some(),
        "{} programs on the bridge",
        programs_on(&lab)
    );
    assert!(next.stop().unwrap().success());
    assert_eq!(programs_on(&lab), 0);
    assert_eq!(get(&lab, svc.port()), Outcome::Refused);
}

/// `lhb reload` (the unit's ExecReload) answers whether the file loaded: a bad file
/// fails with the file, line and reason, the running rules stay, and the error shows in
/// `lhb status` and in STATUS= to systemd until a good file is loaded, which takes
/// effect and clears it.
#[test]
fn lhb_reload_answers_whether_the_config_loaded() {
    let lab = Lab::new(76).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let other = PeerEcho::start("127.0.0.1:0").unwrap();
    let dir = tmpdir("reload");
    let cfg = dir.join("lhb.toml");
    let br = lab.bridge_name();
    let rule = |port: u16| format!("[[expose]]\ninterface = \"{br}\"\nport = {port}\n");
    std::fs::write(&cfg, rule(svc.port())).unwrap();
    let notify = dir.join("notify.sock");
    let sd = UnixDatagram::bind(&notify).unwrap();
    sd.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let lhb = Lhb::start_env(
        &["--mode", "kernel", "--config", cfg.to_str().unwrap()],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap())],
    )
    .unwrap();
    let ctl = lhb.control();

    std::fs::write(&cfg, format!("{}port = 80\n", rule(svc.port()))).unwrap();
    let (ok, out, err) = lhb_check(&["reload", "--control", &ctl]).unwrap();
    assert!(!ok, "a bad reload succeeded: {out}");
    assert!(
        err.contains("lhb.toml:4") && err.contains("running rule(s) are kept"),
        "{err}"
    );
    assert!(matches!(get(&lab, svc.port()), Outcome::Served(_)));
    let st = lhb.status().unwrap();
    assert!(
        st["reload_error"].as_str().unwrap().contains("lhb.toml:4"),
        "{st}"
    );
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let failed_status = wait_until(Duration::from_secs(2), || {
        if let Ok(n) = sd.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen.contains("config reload FAILED")
    });
    assert!(failed_status.is_some(), "STATUS= did not say: {seen}");

    std::fs::write(&cfg, format!("{}{}", rule(svc.port()), rule(other.port()))).unwrap();
    let (ok, out, err) = lhb_check(&["reload", "--control", &ctl]).unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("2 rule(s)"), "{out}");
    assert!(matches!(get(&lab, other.port()), Outcome::Served(_)));
    assert!(lhb.status().unwrap()["reload_error"].is_null());
    seen.clear();
    let cleared = wait_until(Duration::from_secs(2), || {
        if let Ok(n) = sd.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen.contains("STATUS=serving 2 of 2 rule(s)\n")
            || seen.ends_with("STATUS=serving 2 of 2 rule(s)")
    });
    assert!(cleared.is_some(), "STATUS= not cleared: {seen}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `lhb --version` names the commit it was built from, and `lhb completions SHELL`
/// prints a script the shell accepts (bash checked with `bash -n`; zsh and fish are not
/// on this machine, so only their output is checked) that knows every subcommand.
#[test]
fn version_names_the_commit_and_completions_cover_every_subcommand() {
    let (ok, out, err) = lhb_check(&["--version"]).unwrap();
    assert!(ok, "{err}");
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(
        out.starts_with("lhb ") && out.contains(&format!("({head})")),
        "{out} (HEAD is {head}: a binary built before the last commit? `cargo xtask build`)"
    );
    for shell in ["bash", "zsh", "fish"] {
        let (ok, script, err) = lhb_check(&["completions", shell]).unwrap();
        assert!(ok, "{shell}: {err}");
        for sub in [
            "run", "status", "expose", "unexpose", "reload", "verify", "doctor", "unit",
        ] {
            assert!(script.contains(sub), "{shell}: no `{sub}`");
        }
        if shell == "bash" {
            let mut check = std::process::Command::new("bash")
                .arg("-n")
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            check
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            assert!(check.wait().unwrap().success(), "bash -n refused it");
        }
    }
}

/// Its log reader gone (stderr a closed pipe: a `| head`, a journald restart): lines
/// are lost, the daemon is not. It keeps serving, takes requests that log, and still
/// cleans up on SIGTERM.
#[test]
fn a_closed_log_pipe_does_not_stop_the_daemon() {
    let lab = Lab::new(148).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let (p, q, r) = (
        svc.port(),
        free_port("127.0.0.1").unwrap(),
        free_port("127.0.0.1").unwrap(),
    );
    let mut lhb = Lhb::start(&["--expose-iface", &format!("{}:{p}", lab.bridge_name())]).unwrap();
    let pins = lhb.pin_dir();
    lhb.deafen();
    // Each logs a line: the first ends the reader, the next ones meet a closed pipe.
    for spec in [
        format!("{}:{q}", lab.bridge_name()),
        format!("{}:{r}", lab.bridge_name()),
    ] {
        let (ok, out, err) =
            lhb_check(&["expose", "--iface", &spec, "--control", &lhb.control()]).unwrap();
        assert!(ok, "{out}{err}");
    }
    let (ok, _, err) = lhb_check(&[
        "unexpose",
        "--iface",
        &format!("{}:{q}", lab.bridge_name()),
        "--control",
        &lhb.control(),
    ])
    .unwrap();
    assert!(ok, "{err}");
    assert!(lhb.alive(), "lhb died writing to a closed pipe");
    assert!(matches!(get(&lab, p), Outcome::Served(_)));
    let st = lhb.status().unwrap();
    assert_eq!(st["rules"].as_array().map(Vec::len), Some(2), "{st}");
    let status = lhb.stop().unwrap();
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
}
