//! What a hostile container (or a machine outside the bridge) can send, with frames made
//! by hand (scapy, tests/hostile/probe.py) and floods (hping3): for each, what must
//! happen, and that lhb keeps serving everyone else. Run on both data paths.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use lhb_tests::{Lab, Lhb, Netns, Outcome, PeerEcho, http_get};

const T: Duration = Duration::from_secs(5);

/// `lhb run --mode MODE ARGS`; "ticket" is the kernel path in the variant for kernels
/// before 5.17 (SYN tickets), forced.
fn start(mode: &str, args: &[&str]) -> anyhow::Result<Lhb> {
    let (mode, env): (&str, &[(&str, &str)]) = match mode {
        "ticket" => ("kernel", &[("LHB_KERNEL_VARIANT", "ticket")]),
        m => (m, &[]),
    };
    let mut all = vec!["--mode", mode];
    all.extend_from_slice(args);
    Lhb::start_env(&all, env)
}

fn get_from(ns: &Netns, ip: IpAddr, port: u16) -> Outcome {
    let addr = SocketAddr::new(ip, port);
    ns.run(move || http_get(addr, T)).expect("thread in netns")
}

fn served(ns: &Netns, ip: IpAddr, port: u16) -> bool {
    matches!(get_from(ns, ip, port), Outcome::Served(_))
}

/// A TCP connection to `ip:port` from `ns` completes (the counting services speak no
/// protocol).
fn connects(ns: &Netns, ip: IpAddr, port: u16) -> bool {
    let to = SocketAddr::new(ip, port);
    ns.run(move || std::net::TcpStream::connect_timeout(&to, T).is_ok())
        .expect("thread in netns")
}

/// A loopback service that counts the connections it accepts.
struct Counting {
    port: u16,
    accepted: Arc<AtomicU64>,
}

impl Counting {
    fn start(bind: &str) -> Counting {
        let l = TcpListener::bind(bind).unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let a = accepted.clone();
        thread::spawn(move || {
            for c in l.incoming() {
                if c.is_ok() {
                    a.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        Counting { port, accepted }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Sends each (name, port, scapy expression) from `ns` out of its eth0; what came back.
fn probe(ns: &Netns, cases: &[(&str, u16, String)]) -> BTreeMap<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/hostile/probe.py");
    let json: Vec<serde_json::Value> = cases
        .iter()
        .map(|(n, p, e)| serde_json::json!({"name": n, "port": p, "pkt": e}))
        .collect();
    let out = ns
        // Debian's python, where python3-scapy is installed (not one earlier in PATH).
        .command("/usr/bin/python3")
        .args([script, "eth0", &serde_json::Value::Array(json).to_string()])
        .output()
        .expect("python3 with scapy (cargo xtask setup installs python3-scapy)");
    assert!(
        out.status.success(),
        "probe.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe.py said {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn mac(dev: &str) -> String {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))
        .unwrap()
        .trim()
        .to_string()
}

/// The rule's bridge gets crafted frames from a container; only a SYN to the exposed
/// gateway port may be answered with a SYN-ACK:
/// - to the neighbour bridge's gateway, where another rule serves a port, and to its own
///   gateway at that port, and to the host's outside address: never a SYN-ACK;
/// - to 127.0.0.1 and ::1 through the gateway's MAC (a container with route_localnet
///   on sends exactly this): nothing answers;
/// - with the source spoofed as loopback, as the neighbour bridge's container, as the
///   host's outside address: the service accepts nothing;
/// - VLAN-tagged: nothing answers;
/// - IPv4 options and IPv6 extension headers before TCP, to a port with a loopback
///   listener but no rule: never answered (a header parsed at the wrong offset would
///   steer it);
/// - fragments of a SYN to the exposed port: served or refused, never elsewhere.
fn crafted_frames_from_a_container(mode: &str, n: u8) {
    let lab = Lab::new(n).unwrap();
    let svc = Counting::start("127.0.0.1:0");
    let svc6 = Counting::start("[::1]:0");
    let unexposed = Counting::start("127.0.0.1:0");
    let unexposed6 = Counting::start("[::1]:0");
    let br = lab.bridge_name();
    // The neighbour bridge has a rule of its own, for a port this bridge does not have.
    let theirs = Counting::start("127.0.0.1:0");
    let _lhb = start(
        mode,
        &[
            "--expose-iface",
            &format!("{br}:{}", svc.port),
            "--expose-iface",
            &format!("{br}:{0}=[::1]:{0}", svc6.port),
            "--expose-iface",
            &format!("lhbt{n}nb:{}", theirs.port),
        ],
    )
    .unwrap();
    // Served normally, so a silence below is the scoping at work.
    assert!(connects(&lab.container, lab.gateway(), svc.port));
    assert!(connects(&lab.container, lab.gateway6(), svc6.port));
    // The proxy connects to the service after it accepted the client: wait for both.
    let both = lhb_tests::wait_until(T, || svc.accepted() == 1 && svc6.accepted() == 1);
    assert!(both.is_some(), "{} {}", svc.accepted(), svc6.accepted());
    let (before, before6) = (svc.accepted(), svc6.accepted());

    let gw_mac = mac(&br);
    let (gw, gw6, me, me6) = (
        lab.gateway(),
        lab.gateway6(),
        lab.container_ip(),
        lab.container_ip6(),
    );
    let (p, p6, q, q6) = (svc.port, svc6.port, unexposed.port, unexposed6.port);
    let e = format!("Ether(dst='{gw_mac}')");
    let syn = |dport: u16| format!("TCP(sport=40000, dport={dport}, flags='S', seq=1)");
    let cases: Vec<(&str, u16, String)> = vec![
        (
            "control",
            p,
            format!("{e}/IP(src='{me}', dst='{gw}')/{}", syn(p)),
        ),
        (
            "to 127.0.0.1",
            p,
            format!("{e}/IP(src='{me}', dst='127.0.0.1')/{}", syn(p)),
        ),
        (
            "to ::1",
            p6,
            format!("{e}/IPv6(src='{me6}', dst='::1')/{}", syn(p6)),
        ),
        (
            "from 127.0.0.1",
            p,
            format!("{e}/IP(src='127.0.0.1', dst='{gw}')/{}", syn(p)),
        ),
        (
            "from ::1",
            p6,
            format!("{e}/IPv6(src='::1', dst='{gw6}')/{}", syn(p6)),
        ),
        (
            "from the neighbour bridge",
            p,
            format!("{e}/IP(src='10.203.{n}.2', dst='{gw}')/{}", syn(p)),
        ),
        (
            "from the host's outside address",
            p,
            format!(
                "{e}/IP(src='{}', dst='{gw}')/{}",
                lab.host_outside_ip(),
                syn(p)
            ),
        ),
        (
            "to the neighbour bridge's gateway and rule",
            theirs.port,
            format!(
                "{e}/IP(src='{me}', dst='{}')/{}",
                lab.neighbour_gateway(),
                syn(theirs.port)
            ),
        ),
        (
            "to its own gateway at the neighbour's port",
            theirs.port,
            format!("{e}/IP(src='{me}', dst='{gw}')/{}", syn(theirs.port)),
        ),
        (
            "to the host's outside address",
            p,
            format!(
                "{e}/IP(src='{me}', dst='{}')/{}",
                lab.host_outside_ip(),
                syn(p)
            ),
        ),
        (
            "vlan-tagged",
            p,
            format!("{e}/Dot1Q(vlan=5)/IP(src='{me}', dst='{gw}')/{}", syn(p)),
        ),
        (
            "ip options to an unexposed port",
            q,
            format!(
                "{e}/IP(src='{me}', dst='{gw}', options=[IPOption_NOP()]*4)/{}",
                syn(q)
            ),
        ),
        (
            "hop-by-hop to an unexposed port",
            q6,
            format!(
                "{e}/IPv6(src='{me6}', dst='{gw6}')/IPv6ExtHdrHopByHop()/{}",
                syn(q6)
            ),
        ),
        (
            "destination options to an unexposed port",
            q6,
            format!(
                "{e}/IPv6(src='{me6}', dst='{gw6}')/IPv6ExtHdrDestOpt()/{}",
                syn(q6)
            ),
        ),
        (
            "fragments",
            p,
            format!(
                "[{e}/f for f in fragment(IP(src='{me}', dst='{gw}')/{}/('x'*64), fragsize=16)]",
                syn(p)
            ),
        ),
    ];
    let got = probe(&lab.container, &cases);
    let is = |name: &str| got.get(name).map(String::as_str).unwrap_or("missing");
    assert_eq!(is("control"), "synack", "the probe itself works: {got:?}");
    for name in [
        "to 127.0.0.1",
        "to ::1",
        "from 127.0.0.1",
        "from ::1",
        "from the neighbour bridge",
        "from the host's outside address",
        "vlan-tagged",
    ] {
        assert_eq!(is(name), "none", "{mode}: {name}: {got:?}");
    }
    for name in [
        "to the neighbour bridge's gateway and rule",
        "to its own gateway at the neighbour's port",
        "to the host's outside address",
        "ip options to an unexposed port",
        "hop-by-hop to an unexposed port",
        "destination options to an unexposed port",
    ] {
        assert_ne!(is(name), "synack", "{mode}: {name}: {got:?}");
    }
    assert!(
        matches!(is("fragments"), "synack" | "rst" | "none"),
        "{got:?}"
    );
    // Half-open at most: none of these became a connection.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        unexposed.accepted() + unexposed6.accepted() + theirs.accepted(),
        0
    );
    assert_eq!((svc.accepted(), svc6.accepted()), (before, before6));
    // And lhb serves as before.
    assert!(connects(&lab.container, lab.gateway(), svc.port));
    assert!(connects(&lab.container, lab.gateway6(), svc6.port));
}

/// From outside the bridge (a routed namespace): a SYN to the gateway port, whole, in
/// fragments or with IP options, is never answered with a SYN-ACK.
fn crafted_frames_from_outside(mode: &str, n: u8) {
    let lab = Lab::new(n).unwrap();
    let svc = Counting::start("127.0.0.1:0");
    let _lhb = start(
        mode,
        &[
            "--expose-iface",
            &format!("{}:{}", lab.bridge_name(), svc.port),
        ],
    )
    .unwrap();
    let host_end = format!("lhbt{n}ov");
    let e = format!("Ether(dst='{}')", mac(&host_end));
    let me = format!("10.202.{n}.2");
    let (gw, p) = (lab.gateway(), svc.port);
    let syn = format!("TCP(sport=40001, dport={p}, flags='S', seq=1)");
    let cases: Vec<(&str, u16, String)> = vec![
        ("whole", p, format!("{e}/IP(src='{me}', dst='{gw}')/{syn}")),
        (
            "fragments",
            p,
            format!(
                "[{e}/f for f in fragment(IP(src='{me}', dst='{gw}')/{syn}/('x'*64), fragsize=16)]"
            ),
        ),
        (
            "ip options",
            p,
            format!("{e}/IP(src='{me}', dst='{gw}', options=[IPOption_NOP()]*4)/{syn}"),
        ),
        (
            "spoofed as the container",
            p,
            format!("{e}/IP(src='{}', dst='{gw}')/{syn}", lab.container_ip()),
        ),
    ];
    let got = probe(&lab.outside, &cases);
    for (name, _, _) in &cases {
        assert_ne!(
            got.get(*name).map(String::as_str),
            Some("synack"),
            "{mode}: {name}: {got:?}"
        );
    }
    assert_eq!(svc.accepted(), 0);
    assert!(connects(&lab.container, lab.gateway(), svc.port));
}

/// A container floods the exposed port with SYNs (hping3 --flood, its own address) for
/// three seconds: a rule on another bridge is served throughout, and the flooded port
/// serves again at once after.
fn a_syn_flood_on_one_rule_does_not_stop_another(mode: &str, n: u8) {
    let lab = Lab::new(n).unwrap();
    let other = Lab::new(n + 1).unwrap();
    let svc = PeerEcho::start("127.0.0.1:0").unwrap();
    let _lhb = start(
        mode,
        &[
            "--expose-iface",
            &format!("{}:{}", lab.bridge_name(), svc.port()),
            "--expose-iface",
            &format!("{}:{}", other.bridge_name(), svc.port()),
        ],
    )
    .unwrap();
    let mut flood = lab
        .container
        .command("hping3")
        .args(["-q", "-S", "--flood", "-p", &svc.port().to_string()])
        .arg(lab.gateway().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("hping3 (cargo xtask setup installs it)");
    thread::sleep(Duration::from_millis(300));
    let mut tries = 0;
    let mut failed = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        tries += 1;
        let o = get_from(&other.container, other.gateway(), svc.port());
        if !matches!(o, Outcome::Served(_)) {
            failed.push(o);
        }
    }
    assert!(flood.try_wait().unwrap().is_none(), "hping3 stopped early");
    let _ = flood.kill();
    let _ = flood.wait();
    assert!(
        tries > 10 && failed.is_empty(),
        "{mode}: {} of {tries} failed: {failed:?}",
        failed.len()
    );
    let back = lhb_tests::wait_until(Duration::from_secs(2), || {
        served(&lab.container, lab.gateway(), svc.port())
    });
    assert!(
        back.is_some(),
        "{mode}: the flooded port does not serve after the flood"
    );
}

#[test]
fn kernel_crafted_frames_from_a_container() {
    crafted_frames_from_a_container("kernel", 90);
}

#[test]
fn proxy_crafted_frames_from_a_container() {
    crafted_frames_from_a_container("proxy", 91);
}

#[test]
fn kernel_crafted_frames_from_outside() {
    crafted_frames_from_outside("kernel", 92);
}

#[test]
fn proxy_crafted_frames_from_outside() {
    crafted_frames_from_outside("proxy", 93);
}

#[test]
fn kernel_a_syn_flood_on_one_rule_does_not_stop_another() {
    a_syn_flood_on_one_rule_does_not_stop_another("kernel", 94);
}

#[test]
fn ticket_crafted_frames_from_a_container() {
    crafted_frames_from_a_container("ticket", 44);
}

#[test]
fn ticket_crafted_frames_from_outside() {
    crafted_frames_from_outside("ticket", 45);
}

/// The ticket variant's tickets are per CPU and its cookie records bounded: a flood on
/// one bridge evicts nothing another bridge's connections need.
#[test]
fn ticket_a_syn_flood_on_one_rule_does_not_stop_another() {
    a_syn_flood_on_one_rule_does_not_stop_another("ticket", 46);
}

#[test]
fn proxy_a_syn_flood_on_one_rule_does_not_stop_another() {
    a_syn_flood_on_one_rule_does_not_stop_another("proxy", 96);
}
