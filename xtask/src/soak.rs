//! `cargo xtask soak [--minutes N] [--seed S]`: lhb under the faults a host throws at it,
//! for N minutes, while clients on several bridges connect continuously over both data
//! paths. Faults come at random (seeded, so a run can be replayed) intervals:
//!
//! - a bridge deleted and re-created (new ifindex), as Docker and libvirt do;
//! - a Docker network removed and created again, on an engine of the soak's own;
//! - a firewall reload that drops lhb's accepts, in a namespace that plays the host (the
//!   machine's own firewall is never touched);
//! - the service stopped and started again on the same port;
//! - SIGHUP with the same config, and with a broken one (then fixed);
//! - lhb killed with -9 and started again.
//!
//! A connection may fail only while the fault's own outage lasts (the bridge or network
//! is gone, the service is down, lhb is restarting for the proxy path) plus the time lhb
//! is allowed to heal; every other failure counts. At the end: faults per kind,
//! connections tried and failed per client, and what was left behind. Any failure or
//! leak is an error.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lhb_tests::{HostLab, Lab, Lhb, Netns, PeerEcho, Poller, docker::Engine};

/// How long after a fault's own outage lhb may still be healing.
const HEAL: Duration = Duration::from_secs(2);
/// The longest a client's attempt can take (connect, then read): one that started this
/// long before a fault was still in flight when it hit.
const ATTEMPT: Duration = Duration::from_secs(1);
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Deterministic xorshift, so a seed replays the same fault sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    BridgeRecreated,
    NetworkRecreated,
    FirewallReload,
    ServiceRestart,
    SighupGood,
    SighupBad,
    Kill9Restart,
}

const FAULTS: [Fault; 7] = [
    Fault::BridgeRecreated,
    Fault::NetworkRecreated,
    Fault::FirewallReload,
    Fault::ServiceRestart,
    Fault::SighupGood,
    Fault::SighupBad,
    Fault::Kill9Restart,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::BridgeRecreated => "bridge deleted and re-created",
            Fault::NetworkRecreated => "Docker network removed and created",
            Fault::FirewallReload => "firewall reload without lhb's accepts",
            Fault::ServiceRestart => "service stopped and started",
            Fault::SighupGood => "SIGHUP, same config",
            Fault::SighupBad => "SIGHUP, broken config (then fixed)",
            Fault::Kill9Restart => "lhb killed -9 and restarted",
        }
    }
}

/// Which clients a fault's outage may fail, and until when.
struct Window {
    clients: Vec<&'static str>,
    from: Instant,
    until: Instant,
}

/// Everything the soak runs on; dropped (cleaned up) at the end, also on error.
struct Rig {
    dir: std::path::PathBuf,
    lab: Lab,
    host: HostLab,
    engine: Engine,
    net_container: Netns,
    _net_veth: lhb_tests::HostLink,
    service: Option<PeerEcho>,
    port: u16,
    host_service: PeerEcho,
    lhb: Lhb,
    host_lhb: Lhb,
    args: Vec<String>,
    /// The logs of the daemons killed so far, for the report.
    logs: Vec<String>,
}

const NETWORK: &str = "lhbt-soak";
const SUBNET: &str = "10.229.1.0/24";

impl Rig {
    fn new() -> anyhow::Result<Rig> {
        let dir = std::env::temp_dir().join(format!("lhbt-soak-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let lab = Lab::new(28)?;
        let host = HostLab::new(29)?;
        let engine = Engine::start("soak", 2)?;
        let bridge = engine.network(NETWORK, SUBNET)?;
        let net_container = Netns::new("lhbt-soakc")?;
        let net_veth = lhb_tests::plug(
            &net_container,
            "lhbt-soakv",
            Some(&bridge),
            &["10.229.1.2/24"],
            &["10.229.1.1"],
        )?;
        let service = PeerEcho::start("127.0.0.1:0")?;
        let port = service.port();
        let config = dir.join("lhb.toml");
        std::fs::write(&config, config_text(&lab, port))?;
        let args: Vec<String> = [
            "--mode",
            "auto",
            "--firewall",
            "none",
            "--pin-dir",
            &format!("/sys/fs/bpf/lhbt-soak-{}", std::process::id()),
            "--config",
            &config.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let lhb = start_lhb(&args, &engine)?;
        let host_service = host.host.run(|| PeerEcho::start("127.0.0.1:0"))??;
        host.sh(&["iptables", "-w", "-I", "INPUT", "-i", "br0", "-j", "DROP"])?;
        let spec = format!("br0:{}", host_service.port());
        let host_lhb = host.lhb(&[
            "--no-docker",
            "--mode",
            "kernel",
            "--firewall",
            "auto",
            "--expose-iface",
            &spec,
        ])?;
        Ok(Rig {
            dir,
            lab,
            host,
            engine,
            net_container,
            _net_veth: net_veth,
            service: Some(service),
            port,
            host_service,
            lhb,
            host_lhb,
            args,
            logs: Vec::new(),
        })
    }

    fn config(&self) -> std::path::PathBuf {
        self.dir.join("lhb.toml")
    }

    /// The clients: (name, namespace, address).
    fn clients(&self) -> Vec<(&'static str, &Netns, SocketAddr)> {
        vec![
            (
                "bridge, kernel path",
                &self.lab.container,
                SocketAddr::new(self.lab.gateway(), self.port),
            ),
            (
                "bridge, proxy path",
                &self.lab.container,
                SocketAddr::new(self.lab.gateway6(), self.port),
            ),
            (
                "Docker network, kernel path",
                &self.net_container,
                SocketAddr::new([10, 229, 1, 1].into(), self.port),
            ),
            (
                "behind a firewall, kernel path",
                &self.host.container,
                SocketAddr::new(self.host.gateway(), self.host_service.port()),
            ),
        ]
    }

    /// Injects one fault; the outage it may cause.
    fn inject(&mut self, f: Fault) -> anyhow::Result<Window> {
        let from = Instant::now();
        let clients: Vec<&'static str> = match f {
            Fault::BridgeRecreated => {
                self.lab.recreate_bridge()?;
                vec!["bridge, kernel path", "bridge, proxy path"]
            }
            Fault::NetworkRecreated => {
                self.engine.docker(&["network", "rm", NETWORK])?;
                let bridge = self.engine.network(NETWORK, SUBNET)?;
                lhb_tests::run("ip", &["link", "set", "lhbt-soakv", "master", &bridge])?;
                // A container on a re-created network is a new container with an empty
                // neighbour cache (this one keeps its veth; Docker gives the new bridge
                // a new MAC address).
                lhb_tests::run("ip", &["-n", "lhbt-soakc", "neigh", "flush", "all"])?;
                vec!["Docker network, kernel path"]
            }
            Fault::FirewallReload => {
                self.host
                    .shell("iptables-save | grep -v 'lhb ' | iptables-restore")?;
                vec!["behind a firewall, kernel path"]
            }
            Fault::ServiceRestart => {
                drop(self.service.take());
                std::thread::sleep(Duration::from_millis(200));
                self.service = Some(PeerEcho::start(&format!("127.0.0.1:{}", self.port))?);
                vec![
                    "bridge, kernel path",
                    "bridge, proxy path",
                    "Docker network, kernel path",
                ]
            }
            Fault::SighupGood => {
                self.hup()?;
                vec![]
            }
            Fault::SighupBad => {
                let good = std::fs::read_to_string(self.config())?;
                std::fs::write(self.config(), "[[expose]]\nport = \"broken\"\n")?;
                self.hup()?;
                std::thread::sleep(Duration::from_millis(300));
                std::fs::write(self.config(), good)?;
                self.hup()?;
                vec![]
            }
            Fault::Kill9Restart => {
                self.lhb.kill9();
                self.logs.push(self.lhb.log());
                std::thread::sleep(Duration::from_millis(300));
                self.lhb = start_lhb(&self.args, &self.engine)?;
                // Proxied connections end with the daemon; the kernel path serves on.
                vec!["bridge, proxy path"]
            }
        };
        Ok(Window {
            clients,
            from,
            until: Instant::now() + HEAL,
        })
    }

    fn hup(&self) -> anyhow::Result<()> {
        // SAFETY: signalling our own child.
        if unsafe { libc::kill(self.lhb.pid() as i32, libc::SIGHUP) } != 0 {
            bail!("SIGHUP: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.lhb.pid()))
            .map(|d| d.count())
            .unwrap_or_default()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config_text(lab: &Lab, port: u16) -> String {
    format!(
        "[[expose]]\ninterface = \"{}\"\nport = {port}\n\n[[expose]]\nnetwork = \"{NETWORK}\"\nport = {port}\n",
        lab.bridge_name()
    )
}

fn start_lhb(args: &[String], engine: &Engine) -> anyhow::Result<Lhb> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lhb = Lhb::start_env(&args, &[("DOCKER_HOST", engine.host.as_str())])?;
    // Ready means served; the Docker network rule may still wait for the first list.
    let served = lhb_tests::wait_until(Duration::from_secs(10), || {
        lhb.log().contains(&format!("serving {NETWORK}:"))
    });
    if served.is_none() {
        bail!("lhb does not serve the Docker network:\n{}", lhb.log());
    }
    Ok(lhb)
}

pub fn run(minutes: f64, seed: Option<u64>) -> anyhow::Result<()> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    }) | 1;
    let mut rng = Rng(seed);
    let length = Duration::from_secs_f64(minutes * 60.0);
    eprintln!("soak: {minutes} minute(s), seed {seed} (`--seed {seed}` replays the faults)");
    let mut rig = Rig::new().context("building the soak rig")?;
    let pins = rig.lhb.pin_dir();
    std::thread::sleep(Duration::from_millis(500));
    let fds_before = rig.fds();
    let pollers: Vec<(&'static str, Poller)> = rig
        .clients()
        .into_iter()
        .map(|(name, ns, to)| Ok((name, Poller::start(ns, to, POLL_EVERY)?)))
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    let mut windows = Vec::new();
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    while start.elapsed() < length {
        std::thread::sleep(Duration::from_millis(1000 + rng.below(3000)));
        let f = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        let at = start.elapsed();
        let w = rig
            .inject(f)
            .with_context(|| format!("injecting: {}", f.name()))?;
        windows.push(w);
        *injected.entry(f).or_default() += 1;
        eprintln!(
            "soak: {:>5.1}s to {:>5.1}s {}",
            at.as_secs_f64(),
            start.elapsed().as_secs_f64(),
            f.name()
        );
    }
    std::thread::sleep(HEAL);
    let fds_after = rig.fds();
    let mut results = Vec::new();
    for (name, p) in pollers {
        let (tries, failures) = p.finish();
        let excused = |at: &Instant| {
            windows
                .iter()
                .any(|w| w.clients.contains(&name) && *at + ATTEMPT >= w.from && *at <= w.until)
        };
        let counted: Vec<&(Instant, String)> =
            failures.iter().filter(|(at, _)| !excused(at)).collect();
        results.push((
            name,
            tries,
            failures.len(),
            counted.len(),
            counted
                .first()
                .map(|(at, e)| format!("{:.1}s: {e}", at.duration_since(start).as_secs_f64())),
        ));
    }
    let leaks = stop_and_find_leaks(&mut rig, &pins, fds_before, fds_after)?;
    rig.logs.push(rig.lhb.log());
    rig.logs.push(format!(
        "--- in the namespace that plays the host\n{}",
        rig.host_lhb.log()
    ));
    let log_path = std::env::temp_dir().join("lhb-soak.log");
    std::fs::write(&log_path, rig.logs.join("\n--- next start\n"))?;
    drop(rig);

    print_report(&injected, &results, &leaks);
    let bad: Vec<String> = results
        .iter()
        .filter(|r| r.3 > 0)
        .map(|r| format!("{}: {} failed, first {:?}", r.0, r.3, r.4))
        .collect();
    if !bad.is_empty() || !leaks.is_empty() {
        bail!(
            "soak failed (seed {seed}): {}{} (the daemons' logs: {})",
            bad.join("; "),
            leaks.join("; "),
            log_path.display()
        );
    }
    println!("soak passed (seed {seed})");
    Ok(())
}

/// Stops both daemons and lists what they left: firewall rules, pins, programs, fds.
fn stop_and_find_leaks(
    rig: &mut Rig,
    pins: &std::path::Path,
    fds_before: usize,
    fds_after: usize,
) -> anyhow::Result<Vec<String>> {
    let main_stopped = rig.lhb.stop()?.success();
    let host_fw = rig.host.sh(&["iptables", "-w", "-S", "INPUT"])?;
    let host_stopped = rig.host_lhb.stop()?.success();
    let host_fw_after = rig.host.sh(&["iptables", "-w", "-S", "INPUT"])?;
    let mut leaks = Vec::new();
    if !main_stopped || !host_stopped {
        leaks.push("a daemon did not exit cleanly on SIGTERM".to_string());
    }
    if host_fw.lines().filter(|l| l.contains("lhb ")).count() != 1 {
        leaks.push(format!("lhb's accepts while serving (want 1):\n{host_fw}"));
    }
    if host_fw_after.contains("lhb ") {
        leaks.push(format!("firewall rules left after exit:\n{host_fw_after}"));
    }
    if pins.exists() {
        leaks.push(format!("pin directory left: {}", pins.display()));
    }
    let progs = lhb_tests::ingress_programs(&rig.lab.bridge_name())?;
    if !progs.is_empty() {
        leaks.push(format!("programs left on the bridge: {progs:?}"));
    }
    if fds_after > fds_before + 4 {
        leaks.push(format!(
            "the daemon held {fds_before} fds at the start and {fds_after} at the end"
        ));
    }
    Ok(leaks)
}

/// One client's tally: name, connections tried, failed, failed outside every fault's
/// outage, and the first of those.
type Tally = (&'static str, u64, usize, usize, Option<String>);

fn print_report(injected: &BTreeMap<Fault, u32>, results: &[Tally], leaks: &[String]) {
    println!("\n| fault | injected |\n|---|---|");
    for f in FAULTS {
        println!(
            "| {} | {} |",
            f.name(),
            injected.get(&f).copied().unwrap_or(0)
        );
    }
    println!(
        "\n| client | connections | failed in a fault's outage | failed otherwise |\n|---|---|---|---|"
    );
    for (name, tries, all, counted, _) in results {
        println!("| {name} | {tries} | {} | {counted} |", all - counted);
    }
    println!(
        "\nleaks after the end (fds, pins, programs, firewall rules): {}",
        if leaks.is_empty() {
            "none".to_string()
        } else {
            leaks.join("; ")
        }
    );
}
