//! lhb against real host firewalls: traffic the host would drop gets a scoped accept
//! (container served, outside still refused), and after lhb exits the ruleset is exactly
//! what it was (counters aside).
//!
//! These tests change the host's ruleset, so they run one at a time (LOCK), and every
//! rule a test adds is scoped to its own bridge and removed by a guard.

use std::{net::SocketAddr, process::Command, sync::Mutex, time::Duration};

use lhb_tests::{Lab, Lhb, Outcome, PeerEcho, http_get, lhb_check, run};

static LOCK: Mutex<()> = Mutex::new(());

/// `cmd` undone by `undo` on drop.
struct Undo(Vec<String>);

impl Drop for Undo {
    fn drop(&mut self) {
        let _ = Command::new(&self.0[0]).args(&self.0[1..]).status();
    }
}

/// An iptables DROP of everything entering on `br`, removed on drop.
fn drop_on(br: &str) -> Undo {
    sh(&["iptables", "-w", "-I", "INPUT", "-i", br, "-j", "DROP"]);
    Undo(
        ["iptables", "-w", "-D", "INPUT", "-i", br, "-j", "DROP"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
}

fn sh(args: &[&str]) {
    run(args[0], &args[1..]).unwrap();
}

/// The ruleset as text, without counters (they move with any traffic).
fn snapshot() -> String {
    let strip = |s: String| -> String {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let mut out = String::new();
                let mut words = l.split(' ').peekable();
                while let Some(w) = words.next() {
                    if w == "packets" || w == "bytes" {
                        words.next();
                        continue;
                    }
                    if w.starts_with('[') && w.ends_with(']') && w.contains(':') {
                        continue;
                    }
                    out.push_str(w);
                    out.push(' ');
                }
                out
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let ipt = run("iptables-save", &[]).unwrap_or_default();
    let legacy = run("iptables-legacy-save", &[]).unwrap_or_default();
    let nft = run("nft", &["list", "ruleset"]).unwrap_or_default();
    format!("{}\n{}\n{}", strip(ipt), strip(legacy), strip(nft))
}

fn get(ns: &lhb_tests::Netns, addr: SocketAddr) -> Outcome {
    ns.run(move || http_get(addr, Duration::from_secs(1)))
        .unwrap()
}

/// With the host dropping the bridge's traffic: served through lhb, outside refused,
/// ruleset restored after exit.
fn served_through_a_dropping_firewall(lab: &Lab, mode: &str, firewall: &str) {
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let gw = SocketAddr::new(lab.gateway(), svc.port());
    assert_eq!(
        get(&lab.container, gw),
        Outcome::TimedOut,
        "the firewall under test does not drop"
    );
    let before = snapshot();
    let spec = format!("{}:{}", lab.bridge_name(), svc.port());
    let mut lhb = Lhb::start(&[
        "--mode",
        mode,
        "--firewall",
        firewall,
        "--expose-iface",
        &spec,
    ])
    .unwrap();
    assert!(
        lhb.log().contains("firewall: opened"),
        "no rule added: {}",
        lhb.log()
    );
    assert!(
        matches!(get(&lab.container, gw), Outcome::Served(_)),
        "{mode}: not served through the firewall: {}",
        lhb.log()
    );
    assert!(!matches!(get(&lab.outside, gw), Outcome::Served(_)));
    assert!(lhb.stop().unwrap().success());
    assert_eq!(snapshot(), before, "the ruleset changed");
}

#[test]
fn an_iptables_drop_on_the_bridge_gets_a_scoped_accept_and_is_restored() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for (n, mode) in [(50, "kernel"), (150, "proxy")] {
        let lab = Lab::new(n).unwrap();
        let br = lab.bridge_name();
        let _undo = drop_on(&br);
        served_through_a_dropping_firewall(&lab, mode, "auto");
    }
}

#[test]
fn a_separate_nftables_base_chain_that_drops_gets_its_own_accept() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    for (n, mode) in [(51, "kernel"), (151, "proxy")] {
        let lab = Lab::new(n).unwrap();
        let table = format!("lhbt{n}fw");
        sh(&["nft", "add", "table", "inet", &table]);
        let _undo = Undo(
            ["nft", "delete", "table", "inet", &table]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        );
        sh(&[
            "nft",
            &format!(
                "add chain inet {table} input {{ type filter hook input priority 10; policy accept; }}"
            ),
        ]);
        sh(&[
            "nft",
            &format!(
                "add rule inet {table} input iifname \"{}\" drop",
                lab.bridge_name()
            ),
        ]);
        served_through_a_dropping_firewall(&lab, mode, "auto");
    }
}

/// UFW with `default deny incoming`, enabled inside a namespace that plays the host (so
/// the machine running the tests keeps its own firewall): a bridge, a container and an
/// outside namespace routed to it, and lhb running in there.
#[test]
fn ufw_with_default_deny_incoming_serves_the_container_only() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let conf = std::fs::read_to_string("/etc/ufw/ufw.conf").expect("ufw (cargo xtask setup)");
    struct RestoreConf(String);
    impl Drop for RestoreConf {
        fn drop(&mut self) {
            let _ = std::fs::write("/etc/ufw/ufw.conf", &self.0);
        }
    }
    let _conf = RestoreConf(conf);

    for (n, mode) in [(52u8, "kernel"), (152, "proxy")] {
        let lab = lhb_tests::HostLab::new(n).unwrap();
        let (host, container, outside) = (&lab.host, &lab.container, &lab.outside);
        let (gw, host_out) = (lab.gateway().to_string(), lab.host_outside_ip().to_string());
        let in_host = |args: &[&str]| lab.sh(args).unwrap();
        in_host(&["ufw", "default", "deny", "incoming"]);
        in_host(&["ufw", "--force", "enable"]);
        let svc = host
            .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
            .unwrap();
        let target = SocketAddr::new(gw.parse().unwrap(), svc.port());
        assert_eq!(
            get(container, target),
            Outcome::TimedOut,
            "UFW does not drop"
        );
        let before = in_host(&["iptables-save"]);
        let spec = format!("br0:{}", svc.port());
        let mut lhb = lab
            .lhb(&[
                "--no-docker",
                "--mode",
                mode,
                "--firewall",
                "auto",
                "--expose-iface",
                &spec,
            ])
            .unwrap();
        assert!(
            matches!(get(container, target), Outcome::Served(_)),
            "{mode}: not served through UFW: {}",
            lhb.log()
        );
        // `ufw reload` rewrites the ruleset; lhb's accept is back within 2 s.
        in_host(&["ufw", "reload"]);
        let healed = lhb_tests::wait_until(Duration::from_secs(2), || {
            matches!(get(container, target), Outcome::Served(_))
        });
        assert!(
            healed.is_some(),
            "{mode}: not served after `ufw reload`: {}",
            lhb.log()
        );
        for addr in [
            target,
            SocketAddr::new(host_out.parse().unwrap(), svc.port()),
        ] {
            assert!(
                !matches!(get(outside, addr), Outcome::Served(_)),
                "outside -> {addr}"
            );
        }
        assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
        let strip = |s: String| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split(" [").next().unwrap_or(l).to_string())
                .collect()
        };
        assert_eq!(
            strip(in_host(&["iptables-save"])),
            strip(before),
            "{mode}: UFW's ruleset changed"
        );
        in_host(&["ufw", "--force", "disable"]);
    }
}

/// The first row of every troubleshooting table: the host firewall drops the bridge's
/// traffic. With lhb told not to manage it, doctor names the chain and the fix; with
/// lhb managing it, doctor and verify find nothing wrong.
#[test]
fn doctor_names_a_dropping_firewall_and_its_fix() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let lab = Lab::new(53).unwrap();
    let br = lab.bridge_name();
    let _undo = drop_on(&br);
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let spec = format!("{br}:{}", svc.port());
    let gw = SocketAddr::new(lab.gateway(), svc.port());

    let mut lhb = Lhb::start(&["--firewall", "none", "--expose-iface", &spec]).unwrap();
    let (ok, out, _) = lhb_check(&["doctor", "--iface", &spec]).unwrap();
    assert!(!ok, "{out}");
    for line in [
        "FAIL  firewall: drops the traffic: iptables INPUT".to_string(),
        // lhb runs (with `--firewall none`): the fix says why it did not heal it.
        "fix: lhb runs (pid".to_string(),
        "either it runs with `--firewall none`".to_string(),
        format!(
            "iptables -I INPUT -i {br} -d {} -p tcp --dport {} -j ACCEPT",
            gw.ip(),
            gw.port()
        ),
        format!("-> {gw}: no answer (dropped)"),
        "fix: the firewall drops it".to_string(),
    ] {
        assert!(out.contains(&line), "no `{line}` in:\n{out}");
    }
    let (ok, out, _) = lhb_check(&["verify", "--iface", &spec]).unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL  from the bridge: 10.201.53.")
                && l.ends_with(&format!(" on {br} -> {gw}: no answer (dropped)"))),
        "{out}"
    );
    assert!(lhb.stop().unwrap().success());

    let mut lhb = Lhb::start(&["--firewall", "auto", "--expose-iface", &spec]).unwrap();
    let (ok, out, err) = lhb_check(&["doctor", "--iface", &spec]).unwrap();
    assert!(ok, "{out}{err}\n{}", lhb.log());
    assert!(out.contains("OK    firewall:"), "{out}");
    let (ok, out, _) = lhb_check(&["verify", "--iface", &spec]).unwrap();
    assert!(ok, "{out}");
    assert!(lhb.stop().unwrap().success());
}

/// The nftables backend removes only what it inserted, where it inserted it: a rule in
/// a forward or output chain that carries the very tag lhb uses (someone's copy, a
/// hand-made rule) survives lhb's start, its clean-up and its exit. In a namespace that
/// plays the host.
#[test]
fn nft_clean_up_touches_only_lhbs_rules_in_its_input_chains() {
    let lab = lhb_tests::HostLab::new(54).unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let port = svc.port();
    let tag = format!("lhb br0 {} {port}", lab.gateway());
    let script = format!(
        "nft add table inet hostfw && \
         nft add chain inet hostfw input '{{ type filter hook input priority 0; policy drop; }}' && \
         nft add rule inet hostfw input iifname lo accept && \
         nft add chain inet hostfw forwarding '{{ type filter hook forward priority 0; policy accept; }}' && \
         nft add rule inet hostfw forwarding iifname br0 tcp dport {port} accept comment '\"{tag}\"' && \
         nft add chain inet hostfw outgoing '{{ type filter hook output priority 0; policy accept; }}' && \
         nft add rule inet hostfw outgoing tcp dport {port} accept comment '\"{tag}\"'"
    );
    lab.shell(&script).unwrap();
    let theirs = || -> usize {
        let rules = lab.sh(&["nft", "list", "ruleset"]).unwrap();
        let mut chain = String::new();
        let mut n = 0;
        for l in rules.lines() {
            if let Some(c) = l.trim().strip_prefix("chain ") {
                chain = c.trim_end_matches(" {").to_string();
            }
            if l.contains(&tag) && chain != "input" {
                n += 1;
            }
        }
        n
    };
    assert_eq!(theirs(), 2);
    let to = SocketAddr::new(lab.gateway(), port);
    let spec = format!("br0:{port}");
    let mut lhb = lab
        .lhb(&[
            "--no-docker",
            "--mode",
            "kernel",
            "--firewall",
            "nftables",
            "--expose-iface",
            &spec,
        ])
        .unwrap();
    assert!(
        matches!(get(&lab.container, to), Outcome::Served(_)),
        "{}",
        lhb.log()
    );
    let input = lab
        .sh(&["nft", "list", "chain", "inet", "hostfw", "input"])
        .unwrap();
    assert!(
        input.contains(&tag),
        "no accept in the input chain: {input}"
    );
    assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
    let input = lab
        .sh(&["nft", "list", "chain", "inet", "hostfw", "input"])
        .unwrap();
    assert!(!input.contains(&tag), "lhb's accept left: {input}");
    assert_eq!(theirs(), 2, "lhb removed rules it did not insert");
}

/// `lhb plan` says what `lhb run` then does, and changes nothing itself: on a host
/// (namespace) whose iptables and native nftables input chains both drop, with a
/// dual-stack bridge (kernel path for IPv4, proxy for IPv6) and a rule whose bridge
/// does not exist. Compared: each rule's state, reason and gateways (path, why, client
/// seen as), the program attachments, the proxy listeners and every firewall accept
/// (opening and chain, and the rule's tag in the ruleset).
#[test]
fn lhb_plan_says_what_run_then_does_and_changes_nothing() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let lab = lhb_tests::HostLab::new(55).unwrap();
    lab.shell(
        "ip addr add fd00:55::1/64 dev br0 nodad && iptables -w -P INPUT DROP \
         && nft add table inet hostfw \
         && nft add chain inet hostfw input '{ type filter hook input priority 0; policy drop; }'",
    )
    .unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let pins = lhb_tests::PinDir::new("plan");
    let dir = lhb_tests::TempDir::new("plan").unwrap();
    let control = format!("{}/lhb.sock", dir.display());
    let (spec, waiting) = (format!("br0:{}", svc.port()), "br9:9".to_string());
    let args = [
        "--no-docker",
        "--config",
        "/dev/null",
        "--expose-iface",
        spec.as_str(),
        "--expose-iface",
        waiting.as_str(),
        "--control",
        control.as_str(),
        "--pin-dir",
        pins.0.as_str(),
    ];
    let ruleset = || {
        lab.shell("iptables-save | grep -v '^#'; ip6tables-save | grep -v '^#'; nft list ruleset")
            .unwrap()
    };
    let before = ruleset();
    let mut plan_cmd = vec!["netns", "exec", lab.host.name.as_str()];
    let bin = lhb_tests::lhb_bin().display().to_string();
    plan_cmd.extend([bin.as_str(), "plan", "--json"]);
    plan_cmd.extend(args);
    let plan: serde_json::Value = serde_json::from_str(&run("ip", &plan_cmd).unwrap()).unwrap();

    // Nothing changed: ruleset, pins, programs, listeners.
    assert_eq!(ruleset(), before, "lhb plan changed the ruleset");
    assert!(
        std::fs::read_dir(&pins.0).map(|d| d.count()).unwrap_or(0) == 0,
        "lhb plan pinned something"
    );
    let progs = || {
        lab.host
            .run(|| lhb_tests::ingress_programs("br0").unwrap())
            .unwrap()
    };
    assert!(progs().is_empty(), "{:?}", progs());
    let port = svc.port().to_string();
    let listening = || lab.sh(&["ss", "-ltnH"]).unwrap();
    // ss names the device a socket is bound to: `[fd00:55::1]%br0:PORT`.
    let bound = format!("[fd00:55::1]%br0:{port} ");
    assert!(!listening().contains(&bound), "{}", listening());

    // What it says: the IPv4 gateway in-kernel, the IPv6 one proxied, br9 waiting, and
    // accepts in iptables INPUT (IPv4) and the native chain (both).
    assert_eq!(plan["fails"], serde_json::Value::Null, "{plan:#}");
    assert_eq!(plan["programs"][0]["bridge"], "br0", "{plan:#}");
    let listeners = plan["proxy_listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{plan:#}");
    assert!(
        listeners[0]
            .as_str()
            .unwrap()
            .starts_with(&format!("[fd00:55::1]:{port} on br0"))
    );
    let planned: std::collections::BTreeSet<String> = plan["firewall"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{} in {}",
                a["opening"].as_str().unwrap(),
                a["chain"].as_str().unwrap()
            )
        })
        .collect();
    let chains: std::collections::BTreeSet<&str> = plan["firewall"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["chain"].as_str().unwrap())
        .collect();
    assert_eq!(
        chains,
        ["iptables INPUT", "nft inet hostfw input"].into(),
        "{plan:#}"
    );
    assert_eq!(planned.len(), 3, "{plan:#}");
    assert_eq!(plan["rules"][1]["state"], "waiting", "{plan:#}");

    // What run does.
    let mut lhb = lab.lhb(&args).unwrap();
    let status = lhb.status().unwrap();
    for (p, s) in plan["rules"]
        .as_array()
        .unwrap()
        .iter()
        .zip(status["rules"].as_array().unwrap())
    {
        for field in ["state", "reason", "bridge", "ifindex", "origin", "target"] {
            assert_eq!(p[field], s[field], "{field}: plan {p:#} status {s:#}");
        }
        let gateways = |v: &serde_json::Value| -> Vec<(String, String, String, String)> {
            v["gateways"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| {
                    let f = |k: &str| g[k].as_str().unwrap_or("-").to_string();
                    (f("address"), f("path"), f("why"), f("client_seen_as"))
                })
                .collect()
        };
        assert_eq!(gateways(p), gateways(s));
    }
    assert_eq!(plan["kernel_attach"], status["kernel_attach"]);
    let held: std::collections::BTreeSet<String> = status["firewall"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(planned, held, "plan {plan:#}\nlog: {}", lhb.log());
    let now = ruleset();
    for a in plan["firewall"]["add"].as_array().unwrap() {
        let rule = a["rule"].as_str().unwrap();
        let tag = rule.split("comment ").nth(1).unwrap().trim_matches('"');
        assert!(now.contains(tag), "{rule} not in:\n{now}");
    }
    assert_eq!(progs().len(), 1, "{:?}", progs());
    assert!(listening().contains(&bound), "{}", listening());
    assert!(lhb.stop().unwrap().success());
    assert_eq!(ruleset(), before, "the ruleset was not restored");
}

/// firewalld (RHEL, Fedora, openSUSE hosts) in a namespace that plays the host, on a
/// bus of the test's own: its default zone rejects the container until lhb asks
/// firewalld (D-Bus) for a runtime rich rule; outside stays refused; after
/// `firewall-cmd --reload` (which forgets runtime rules) and after firewalld restarts,
/// lhb puts the rule back within 2 s; on exit firewalld's ruleset is what it was.
#[test]
fn firewalld_rejects_until_lhb_asks_it_and_lhb_follows_its_reloads() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !lhb_tests::firewalld::required("firewalld_rejects_until_lhb_asks_it...") {
        return;
    }
    for (n, mode) in [(56u8, "kernel"), (156, "proxy")] {
        let lab = lhb_tests::HostLab::new(n).unwrap();
        let mut fwd = lhb_tests::firewalld::Firewalld::start(&lab).unwrap();
        let (host, container, outside) = (&lab.host, &lab.container, &lab.outside);
        let (gw, host_out) = (lab.gateway().to_string(), lab.host_outside_ip().to_string());
        let svc = host
            .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
            .unwrap();
        let target = SocketAddr::new(gw.parse().unwrap(), svc.port());
        let rejected = get(container, target);
        assert!(
            !matches!(rejected, Outcome::Served(_)),
            "firewalld's default zone lets the container in: {rejected:?}"
        );
        let ruleset = || lab.sh(&["nft", "list", "ruleset"]).unwrap();
        let before = ruleset();
        let spec = format!("br0:{}", svc.port());
        let bus = fwd.bus_address.clone();
        let mut lhb = lab
            .lhb_env(
                &["--no-docker", "--mode", mode, "--expose-iface", &spec],
                &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)],
            )
            .unwrap();
        assert!(
            matches!(get(container, target), Outcome::Served(_)),
            "{mode}: not served through firewalld:\n{}",
            lhb.log()
        );
        let rich = fwd.cmd(&["--zone=public", "--list-rich-rules"]).unwrap();
        assert_eq!(
            rich.trim(),
            format!(
                "rule priority=\"-32000\" family=\"ipv4\" destination address=\"{gw}\" port port=\"{}\" protocol=\"tcp\" accept",
                svc.port()
            ),
            "{mode}"
        );
        assert!(
            fwd.cmd(&["--permanent", "--zone=public", "--list-rich-rules"])
                .unwrap()
                .trim()
                .is_empty(),
            "{mode}: lhb wrote firewalld's permanent configuration"
        );
        let st = lhb.status().unwrap();
        assert!(
            st["firewall"]["backends"]
                .as_array()
                .unwrap()
                .contains(&"firewalld".into()),
            "{st:#}"
        );
        assert!(
            st["firewall"]["rules"][0]
                .as_str()
                .unwrap()
                .ends_with("in firewalld zone public"),
            "{st:#}"
        );
        for addr in [
            target,
            SocketAddr::new(host_out.parse().unwrap(), svc.port()),
        ] {
            assert!(
                !matches!(get(outside, addr), Outcome::Served(_)),
                "{mode}: outside -> {addr}"
            );
        }

        // A reload forgets runtime rules; lhb follows the Reloaded signal.
        fwd.cmd(&["--reload"]).unwrap();
        let healed = lhb_tests::wait_until(Duration::from_secs(2), || {
            matches!(get(container, target), Outcome::Served(_))
        });
        assert!(
            healed.is_some(),
            "{mode}: not served after `firewall-cmd --reload`:\n{}",
            lhb.log()
        );
        eprintln!(
            "MEASURED: {mode}: served again {healed:?} after `firewall-cmd --reload` returned"
        );
        // So does a restart of firewalld (its name gets a new owner).
        fwd.restart().unwrap();
        let healed = lhb_tests::wait_until(Duration::from_secs(2), || {
            matches!(get(container, target), Outcome::Served(_))
        });
        assert!(
            healed.is_some(),
            "{mode}: not served after firewalld restarted:\n{}\n{}",
            lhb.log(),
            fwd.log()
        );
        assert!(lhb.log().contains("firewalld reloaded"), "{}", lhb.log());
        assert!(
            lhb.log().contains("lhb's accept was gone") && lhb.log().contains("restored"),
            "{}",
            lhb.log()
        );
        assert!(lhb.log().contains("firewalld started"), "{}", lhb.log());

        assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
        assert!(
            fwd.cmd(&["--zone=public", "--list-rich-rules"])
                .unwrap()
                .trim()
                .is_empty(),
            "{mode}: lhb's rich rule stayed"
        );
        assert_eq!(ruleset(), before, "{mode}: firewalld's ruleset changed");
        assert!(
            !matches!(get(container, target), Outcome::Served(_)),
            "{mode}: still served after lhb exited"
        );
    }
}

/// doctor reads firewalld's view: the zone that handles the bridge rejects, and the
/// fix is the `firewall-cmd` rich rule (runtime), which then makes doctor happy.
#[test]
fn doctor_names_firewalld_zone_and_the_firewall_cmd_fix() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !lhb_tests::firewalld::required("doctor_names_firewalld_zone...") {
        return;
    }
    let lab = lhb_tests::HostLab::new(57).unwrap();
    let fwd = lhb_tests::firewalld::Firewalld::start(&lab).unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let spec = format!("br0:{}", svc.port());
    let bus = fwd.bus_address.clone();
    // lhb serves with `--firewall none`: the data path is there, firewalld rejects.
    let _lhb = lab
        .lhb_env(
            &["--no-docker", "--firewall", "none", "--expose-iface", &spec],
            &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)],
        )
        .unwrap();
    let doctor = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.host.name])
            .arg(lhb_tests::lhb_bin())
            .args([
                "doctor",
                "--config",
                "/dev/null",
                "--no-docker",
                "--iface",
                &spec,
            ])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &bus)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = doctor();
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL  firewall: drops the traffic: firewalld zone public (the default zone: br0 is bound to none; target default"),
        "{out}"
    );
    let fix = format!(
        "firewall-cmd --zone=public --add-rich-rule='rule priority=\"-32000\" family=\"ipv4\" destination address=\"{}\" port port=\"{}\" protocol=\"tcp\" accept'",
        lab.gateway(),
        svc.port()
    );
    assert!(out.contains(&fix), "{out}");
    assert!(
        out.contains("fix: the firewall rejects it (see above)"),
        "{out}"
    );
    // The fix, as doctor wrote it, through a shell.
    let cmd = fix.replacen("firewall-cmd", "", 1);
    let args: Vec<String> = vec![
        "--zone=public".into(),
        cmd.split_once("--add-rich-rule=")
            .map(|(_, r)| format!("--add-rich-rule={}", r.trim_matches('\'')))
            .unwrap(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fwd.cmd(&args).unwrap();
    let (ok, out) = doctor();
    assert!(ok, "after the fix:\n{out}");
}

/// The zone that handles the bridge decides where lhb's rule goes, also when it
/// changes under lhb: br0 bound to `internal` gets the rule there; moved to `work`
/// while lhb runs, served again within 2 s (the move rewrites firewalld's ruleset, and
/// lhb heals); moved to `trusted` (target ACCEPT), nothing more is needed; on exit no
/// zone keeps a rule of lhb's.
#[test]
fn firewalld_rule_follows_the_zone_of_the_bridge() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !lhb_tests::firewalld::required("firewalld_rule_follows_the_zone...") {
        return;
    }
    let lab = lhb_tests::HostLab::new(59).unwrap();
    let fwd = lhb_tests::firewalld::Firewalld::start(&lab).unwrap();
    let svc = lab
        .host
        .run(|| PeerEcho::start("127.0.0.1:0").unwrap())
        .unwrap();
    let target = SocketAddr::new(lab.gateway(), svc.port());
    fwd.cmd(&["--zone=internal", "--change-interface=br0"])
        .unwrap();
    let bus = fwd.bus_address.clone();
    let spec = format!("br0:{}", svc.port());
    let mut lhb = lab
        .lhb_env(
            &["--no-docker", "--expose-iface", &spec],
            &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)],
        )
        .unwrap();
    assert!(
        matches!(get(&lab.container, target), Outcome::Served(_)),
        "{}",
        lhb.log()
    );
    let rules_in = |zone: &str| {
        fwd.cmd(&[&format!("--zone={zone}"), "--list-rich-rules"])
            .unwrap()
            .trim()
            .to_string()
    };
    assert!(
        rules_in("internal").contains("priority=\"-32000\""),
        "{}",
        lhb.log()
    );
    assert!(rules_in("public").is_empty());

    fwd.cmd(&["--zone=work", "--change-interface=br0"]).unwrap();
    let healed = lhb_tests::wait_until(Duration::from_secs(2), || {
        matches!(get(&lab.container, target), Outcome::Served(_))
    });
    assert!(
        healed.is_some(),
        "not served after the zone changed:\n{}",
        lhb.log()
    );
    assert!(
        rules_in("work").contains("priority=\"-32000\""),
        "{}",
        lhb.log()
    );

    fwd.cmd(&["--zone=trusted", "--change-interface=br0"])
        .unwrap();
    assert!(matches!(get(&lab.container, target), Outcome::Served(_)));
    assert!(
        rules_in("trusted").is_empty(),
        "a rule in a zone that accepts all"
    );

    assert!(lhb.stop().unwrap().success(), "{}", lhb.log());
    for zone in ["public", "internal", "work", "trusted"] {
        assert!(rules_in(zone).is_empty(), "{zone} kept lhb's rule");
    }
}

/// A UDP echo service on 127.0.0.1 in `ns` (a socket made there keeps its namespace).
fn udp_echo_in(ns: &lhb_tests::Netns) -> (u16, UdpStop) {
    udp_echo(
        ns.run(|| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap(),
    )
}

/// Echoes on `sock` until the returned guard drops.
fn udp_echo(sock: std::net::UdpSocket) -> (u16, UdpStop) {
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
    (port, UdpStop(stop))
}

struct UdpStop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for UdpStop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether a datagram from `ns` to `to` is echoed within half a second.
fn echoed(ns: &lhb_tests::Netns, to: SocketAddr) -> bool {
    ns.run(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        if s.send(b"lhb-udp").is_err() {
            return false;
        }
        let mut b = [0u8; 16];
        matches!(s.recv(&mut b), Ok(7))
    })
    .unwrap()
}

/// A UDP rule through each firewall lhb manages: dropped before lhb, echoed with it
/// (a scoped `udp` accept), the outside still gets nothing, the accept restored after a
/// reload, and the ruleset as it was after lhb exits. iptables and nftables in the
/// machine's namespace (scoped to the test's bridge), UFW and firewalld in namespaces
/// that play the host.
#[test]
fn udp_rules_get_a_scoped_udp_accept_on_every_backend() {
    let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // iptables, then a separate nftables base chain.
    for (n, nft) in [(93u8, false), (94, true)] {
        let lab = Lab::new(n).unwrap();
        let br = lab.bridge_name();
        let _undo = if nft {
            let table = format!("lhbt{n}fw");
            sh(&["nft", "add", "table", "inet", &table]);
            sh(&[
                "nft",
                &format!(
                    "add chain inet {table} input {{ type filter hook input priority 10; policy accept; }}"
                ),
            ]);
            sh(&[
                "nft",
                &format!("add rule inet {table} input iifname \"{br}\" drop"),
            ]);
            Undo(
                ["nft", "delete", "table", "inet", &table]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            )
        } else {
            drop_on(&br)
        };
        let (port, _stop) = udp_echo(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let gw = SocketAddr::new(lab.gateway(), port);
        assert!(
            !echoed(&lab.container, gw),
            "the firewall under test does not drop"
        );
        let before = snapshot();
        let spec = format!("{br}:{port}/udp");
        let mut lhb = Lhb::start(&["--firewall", "auto", "--expose-iface", &spec]).unwrap();
        assert!(
            echoed(&lab.container, gw),
            "nft={nft}: not served through the firewall\n{}",
            lhb.log()
        );
        let st = lhb.status().unwrap();
        let rules = st["firewall"]["rules"].as_array().unwrap();
        let ours = format!("udp to {gw} in on {br} in ");
        assert!(
            rules.iter().any(|r| r.as_str().unwrap().starts_with(&ours))
                && rules
                    .iter()
                    .all(|r| r.as_str().unwrap().starts_with("udp to ")),
            "{st:#}"
        );
        assert!(!echoed(&lab.outside, gw));
        assert!(lhb.stop().unwrap().success());
        assert_eq!(snapshot(), before, "nft={nft}: the ruleset changed");
    }

    // UFW with default deny incoming, reloaded.
    let conf = std::fs::read_to_string("/etc/ufw/ufw.conf").expect("ufw (cargo xtask setup)");
    struct RestoreConf(String);
    impl Drop for RestoreConf {
        fn drop(&mut self) {
            let _ = std::fs::write("/etc/ufw/ufw.conf", &self.0);
        }
    }
    let _conf = RestoreConf(conf);
    {
        let lab = lhb_tests::HostLab::new(95).unwrap();
        lab.sh(&["ufw", "default", "deny", "incoming"]).unwrap();
        lab.sh(&["ufw", "--force", "enable"]).unwrap();
        let (port, _stop) = udp_echo_in(&lab.host);
        let gw = SocketAddr::new(lab.gateway(), port);
        assert!(!echoed(&lab.container, gw), "UFW does not drop");
        let before = lab.sh(&["iptables-save"]).unwrap();
        let spec = format!("br0:{port}/udp");
        let mut lhb = lab
            .lhb(&["--no-docker", "--firewall", "auto", "--expose-iface", &spec])
            .unwrap();
        assert!(
            echoed(&lab.container, gw),
            "not served through UFW\n{}",
            lhb.log()
        );
        assert!(!echoed(&lab.outside, gw));
        lab.sh(&["ufw", "reload"]).unwrap();
        let healed = lhb_tests::wait_until(Duration::from_secs(2), || echoed(&lab.container, gw));
        assert!(
            healed.is_some(),
            "not served after `ufw reload`\n{}",
            lhb.log()
        );
        assert!(lhb.stop().unwrap().success());
        let strip = |s: String| {
            s.lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(lab.sh(&["iptables-save"]).unwrap()), strip(before));
    }

    // firewalld: a runtime rich rule with protocol="udp".
    if !lhb_tests::firewalld::required(
        "udp_rules_get_a_scoped_udp_accept_on_every_backend (firewalld)",
    ) {
        return;
    }
    let lab = lhb_tests::HostLab::new(96).unwrap();
    let fwd = lhb_tests::firewalld::Firewalld::start(&lab).unwrap();
    let (port, _stop) = udp_echo_in(&lab.host);
    let gw = SocketAddr::new(lab.gateway(), port);
    assert!(
        !echoed(&lab.container, gw),
        "firewalld lets the container in"
    );
    let spec = format!("br0:{port}/udp");
    let bus = fwd.bus_address.clone();
    let mut lhb = lab
        .lhb_env(
            &["--no-docker", "--expose-iface", &spec],
            &[("DBUS_SYSTEM_BUS_ADDRESS", &bus)],
        )
        .unwrap();
    assert!(
        echoed(&lab.container, gw),
        "not served through firewalld\n{}",
        lhb.log()
    );
    let rich = fwd.cmd(&["--zone=public", "--list-rich-rules"]).unwrap();
    assert_eq!(
        rich.trim(),
        format!(
            "rule priority=\"-32000\" family=\"ipv4\" destination address=\"{}\" port port=\"{port}\" protocol=\"udp\" accept",
            lab.gateway()
        )
    );
    assert!(!echoed(&lab.outside, gw));
    fwd.cmd(&["--reload"]).unwrap();
    let healed = lhb_tests::wait_until(Duration::from_secs(2), || echoed(&lab.container, gw));
    assert!(
        healed.is_some(),
        "not served after `firewall-cmd --reload`\n{}",
        lhb.log()
    );
    assert!(lhb.stop().unwrap().success());
    assert!(
        fwd.cmd(&["--zone=public", "--list-rich-rules"])
            .unwrap()
            .trim()
            .is_empty()
    );
}
