//! lhb's image with the real engine, run as the README's compose service ("Run it as a
//! container": the snippet is read from the README, so it cannot drift), with an
//! override file that keeps the test to what it owns: its own control directory, pin
//! directory and config (a rule for a Docker network the test creates, no firewall
//! managed, so the machine's firewall is never touched). It serves on the kernel path,
//! answers `lhb status` from the host and inside, turns healthy, follows the network
//! being re-created, keeps an established connection across `docker restart`, serves
//! through its pins while killed and is taken over by the next start, and `docker stop`
//! leaves no pin and nothing on the bridge.
//!
//! The tests need the image (`cargo xtask test-image` builds it and runs them, with
//! LHB_IMAGE naming it): ignored by a plain `cargo test`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lhb_tests::{
    PeerEcho, TempDir,
    docker::{Container, DockerNet},
    ingress_programs, run, wait_until,
};

const PROJECT: &str = "lhbt-img";

/// The README's compose snippet: the first ```yaml block after "## Run it as a container".
fn readme_compose() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split_once("## Run it as a container")
        .expect("README has no \"Run it as a container\" section")
        .1;
    let block = section
        .split_once("```yaml\n")
        .expect("no yaml block in \"Run it as a container\"")
        .1;
    block
        .split_once("```")
        .expect("an unterminated yaml block")
        .0
        .to_string()
}

struct Service {
    dir: TempDir,
}

impl Service {
    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("docker-compose")
            .args(["-p", PROJECT, "-f"])
            .arg(self.dir.join("docker-compose.yml"))
            .arg("-f")
            .arg(self.dir.join("test-override.yml"))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "docker-compose {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The service's container, as compose names it (v1 and v2 spell it differently).
    fn container(&self) -> String {
        self.compose(&["ps", "-q", "lhb"])
            .map(|id| id.trim().to_string())
            .unwrap_or_default()
    }

    fn control(&self) -> String {
        self.dir.join("run/lhb.sock").display().to_string()
    }

    /// `lhb status --json` from the host, through the mounted control directory.
    fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = run(
            lhb_tests::lhb_bin().to_str().unwrap(),
            &["status", "--json", "--control", &self.control()],
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    fn logs(&self) -> String {
        run("docker", &["logs", &self.container()]).unwrap_or_else(|e| e.to_string())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.compose(&["down", "-t", "5"]);
    }
}

/// An echo server on the host's loopback (one line back per line), for a connection
/// that stays open across a restart of lhb.
fn line_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { break };
                    if writeln!(w, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

#[test]
#[ignore = "needs lhb's image: cargo xtask test-image"]
fn the_readme_compose_service_serves_heals_and_cleans_up() {
    let image = std::env::var("LHB_IMAGE").expect("LHB_IMAGE (cargo xtask test-image sets it)");
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let p = svc.port();
    let echo = line_echo();
    let mut net = DockerNet::create("lhbt-img", "10.230.160.0/24").unwrap();
    let client = Container::run("lhbt-img-client", &net.name, &[]).unwrap();
    let dir = TempDir::new("img").unwrap();
    let pins = format!("/sys/fs/bpf/{PROJECT}-{}", std::process::id());
    std::fs::create_dir_all(dir.join("run")).unwrap();
    std::fs::create_dir_all(dir.join("dbus")).unwrap();
    std::fs::write(
        dir.join("lhb.toml"),
        format!(
            "firewall = \"none\"\n\n[[expose]]\nnetwork = \"lhbt-img\"\nport = {p}\n\n[[expose]]\nnetwork = \"lhbt-img\"\nport = {echo}\n"
        ),
    )
    .unwrap();
    let snippet = readme_compose();
    std::fs::write(dir.join("docker-compose.yml"), &snippet).unwrap();
    let version = snippet
        .lines()
        .find(|l| l.starts_with("version:"))
        .unwrap_or("version: \"3.8\"");
    let d = dir.display();
    std::fs::write(
        dir.join("test-override.yml"),
        format!(
            "{version}\nservices:\n  lhb:\n    image: {image}\n    command: [\"run\", \"--config\", \"/etc/lhb/lhb.toml\", \"--pin-dir\", \"{pins}\"]\n    volumes:\n      - {d}/run:/run/lhb\n      - {d}/lhb.toml:/etc/lhb/lhb.toml:ro\n      - {d}/dbus:/run/dbus/system_bus_socket\n"
        ),
    )
    .unwrap();
    let lhb = Service { dir };
    let _ = lhb.compose(&["down", "-t", "0"]);
    let t0 = Instant::now();
    lhb.compose(&["up", "-d"]).unwrap();
    let url = |gw: &str, port: u16| format!("http://{gw}:{port}/");
    let served = wait_until(Duration::from_secs(20), || {
        client.wget(&url("10.230.160.1", p)).is_ok()
    });
    assert!(served.is_some(), "not served:\n{}", lhb.logs());
    eprintln!("MEASURED: compose up -> served in {:?}", t0.elapsed());
    let body = client.wget(&url("10.230.160.1", p)).unwrap();
    assert!(body.starts_with("peer=10.230.160."), "{body}");

    // Status from the host and from inside; the kernel path serves.
    let st = lhb.status().unwrap();
    assert!(st["kernel_attach"].is_string(), "{st:#}");
    assert_eq!(st["rules"][0]["state"], "serving", "{st:#}");
    assert_eq!(st["rules"][0]["gateways"][0]["path"], "kernel", "{st:#}");
    let inside = run(
        "docker",
        &["exec", &lhb.container(), "lhb", "status", "--health"],
    )
    .unwrap();
    assert!(inside.contains("serving 2 rule(s)"), "{inside}");
    let healthy = wait_until(Duration::from_secs(45), || {
        run(
            "docker",
            &[
                "inspect",
                "-f",
                "{{.State.Health.Status}}",
                &lhb.container(),
            ],
        )
        .is_ok_and(|s| s.trim() == "healthy")
    });
    assert!(healthy.is_some(), "never healthy:\n{}", lhb.logs());

    // The network re-created with another subnet: served there.
    drop(client);
    drop(net);
    net = DockerNet::create("lhbt-img", "10.230.161.0/24").unwrap();
    let client = Container::run("lhbt-img-client", &net.name, &[]).unwrap();
    let again = wait_until(Duration::from_secs(10), || {
        client.wget(&url("10.230.161.1", p)).is_ok()
    });
    assert!(
        again.is_some(),
        "not served after re-creation:\n{}",
        lhb.logs()
    );
    eprintln!("MEASURED: network re-created -> served {again:?} after the client started");

    // An established connection outlives `docker restart`: the kernel path handed it
    // to the service's socket, lhb is not in it.
    let mut held = Command::new("docker")
        .args(["exec", "-i", "lhbt-img-client", "busybox", "nc"])
        .args(["10.230.161.1", &echo.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = held.stdin.take().unwrap();
    let mut from = BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    writeln!(to, "before").unwrap();
    from.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "before");
    run("docker", &["restart", "-t", "10", &lhb.container()]).unwrap();
    writeln!(to, "after").unwrap();
    line.clear();
    from.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "after",
        "the held connection across docker restart"
    );
    drop(to);
    let _ = held.wait();
    let back = wait_until(Duration::from_secs(20), || {
        client.wget(&url("10.230.161.1", p)).is_ok()
    });
    assert!(
        back.is_some(),
        "not served after docker restart:\n{}",
        lhb.logs()
    );

    // Killed: the pins keep serving new connections; the next start takes over.
    run("docker", &["kill", &lhb.container()]).unwrap();
    let body = client.wget(&url("10.230.161.1", p));
    assert!(
        body.is_ok(),
        "not served through the pins while lhb was down: {body:?}"
    );
    run("docker", &["start", &lhb.container()]).unwrap();
    let taken = wait_until(Duration::from_secs(20), || {
        lhb.status()
            .is_ok_and(|st| st["rules"][0]["state"] == "serving")
    });
    assert!(taken.is_some(), "the next start:\n{}", lhb.logs());
    assert!(client.wget(&url("10.230.161.1", p)).is_ok());

    // Stopped: nothing on the bridge, no pin, no socket.
    let bridge = net.bridge().unwrap();
    assert!(!ingress_programs(&bridge).unwrap().is_empty());
    run("docker", &["stop", "-t", "10", &lhb.container()]).unwrap();
    let programs = ingress_programs(&bridge).unwrap();
    assert!(
        programs.is_empty(),
        "left on {bridge}: {programs:?}\n{}\n{}",
        run("bpftool", &["link", "show"]).unwrap_or_default(),
        lhb.logs()
    );
    let left: Vec<_> = std::fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left: {left:?}");
    assert!(
        !std::path::Path::new(&lhb.control()).exists(),
        "the control socket left"
    );
    assert!(
        client.wget(&url("10.230.161.1", p)).is_err(),
        "served with lhb stopped"
    );
    let _ = std::fs::remove_dir(&pins);
}

/// A container removed when dropped.
struct Named(String);

impl Drop for Named {
    fn drop(&mut self) {
        let _ = run("docker", &["rm", "-f", &self.0]);
    }
}

fn served(ns: &lhb_tests::Netns, to: std::net::SocketAddr) -> bool {
    ns.run(move || {
        matches!(
            lhb_tests::http_get(to, Duration::from_millis(300)),
            lhb_tests::Outcome::Served(_)
        )
    })
    .unwrap()
}

/// The image's iptables against a host firewall that drops, in a namespace that plays
/// the host (a container's, so the image can join it with `--network container:`): lhb
/// opens its port, heals an `iptables-restore` that drops its accept, and `docker stop`
/// takes the accept away again. With the README's capabilities, not `--privileged`.
#[test]
#[ignore = "needs lhb's image: cargo xtask test-image"]
fn the_image_opens_and_heals_the_firewall_of_a_namespace_playing_the_host() {
    let image = std::env::var("LHB_IMAGE").expect("LHB_IMAGE (cargo xtask test-image sets it)");
    let holder = Named("lhbt-img-host".into());
    let _ = run("docker", &["rm", "-f", &holder.0]);
    run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            &holder.0,
            "--network",
            "none",
            lhb_tests::docker::IMAGE,
            "sleep",
            "3600",
        ],
    )
    .unwrap();
    let pid: u32 = run("docker", &["inspect", "-f", "{{.State.Pid}}", &holder.0])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let host = lhb_tests::Netns::attach("lhbt151h", pid).unwrap();
    let lab = lhb_tests::HostLab::around(151, host).unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let to = std::net::SocketAddr::new(lab.gateway(), svc.port());
    lab.sh(&["iptables", "-w", "-I", "INPUT", "-i", "br0", "-j", "DROP"])
        .unwrap();
    assert!(!served(&lab.container, to), "the host does not drop");
    let dir = TempDir::new("imgfw").unwrap();
    let pins = format!("/sys/fs/bpf/lhbt-imgfw-{}", std::process::id());
    let lhb = Named("lhbt-img-fw".into());
    let _ = run("docker", &["rm", "-f", &lhb.0]);
    let spec = format!("br0:{}", svc.port());
    run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            &lhb.0,
            "--network",
            &format!("container:{}", holder.0),
            "--cap-add",
            "SYS_ADMIN",
            "--cap-add",
            "NET_ADMIN",
            "--cap-add",
            "NET_RAW",
            "-v",
            "/sys/fs/bpf:/sys/fs/bpf",
            "-v",
            &format!("{}:/run/lhb", dir.display()),
            &image,
            "run",
            "--no-docker",
            "--mode",
            "kernel",
            "--firewall",
            "iptables",
            "--pin-dir",
            &pins,
            "--expose-iface",
            &spec,
        ],
    )
    .unwrap();
    let logs = || run("docker", &["logs", &lhb.0]).unwrap_or_else(|e| e.to_string());
    let up = wait_until(Duration::from_secs(20), || served(&lab.container, to));
    assert!(
        up.is_some(),
        "not served through the host's drop:\n{}",
        logs()
    );
    let accepts = || {
        lab.sh(&["iptables", "-w", "-S", "INPUT"])
            .unwrap()
            .lines()
            .filter(|l| l.contains("lhb "))
            .count()
    };
    assert_eq!(accepts(), 1, "{}", logs());
    // What netfilter-persistent and friends do: the saved ruleset, without lhb's rule.
    lab.shell("iptables-save | grep -v 'lhb ' | iptables-restore")
        .unwrap();
    let healed = wait_until(Duration::from_secs(2), || served(&lab.container, to));
    assert!(healed.is_some(), "not healed:\n{}", logs());
    eprintln!("MEASURED: the image's lhb healed an iptables-restore in {healed:?}");
    assert_eq!(accepts(), 1, "{}", logs());
    run("docker", &["stop", "-t", "10", &lhb.0]).unwrap();
    assert_eq!(accepts(), 0, "docker stop left the accept:\n{}", logs());
    assert!(!served(&lab.container, to), "served with lhb stopped");
    let _ = std::fs::remove_dir(&pins);
}
