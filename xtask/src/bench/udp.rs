//! The UDP rows: DNS queries per second with dnsperf (1 and 50 clients) against
//! dnsmasq, and one-way 512-byte datagrams per second counted at the receiver, through
//! three ways to the service:
//! - direct: dnsmasq and the receiver bound to the gateway itself;
//! - proxy: lhb's UDP forwarder (a rule's UDP side is the forwarder in every mode, so
//!   its rows stand under `proxy`; `kernel` has none);
//! - socat: the recipe lhb replaces, `socat UDP-RECVFROM:P,bind=GW,fork UDP:127.0.0.1:Q`
//!   (a process per datagram).
//!
//! HAProxy has no UDP proxying (its community edition), so it has no UDP rows.

use std::{
    net::{SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lhb_tests::{Dnsmasq, KillOnDrop, Lab, Lhb};

use super::{Path, Results, measure::Measured, rig::release, workload::Workload};

/// The name every query asks; dnsmasq answers it from its configuration, so the rows
/// measure the way to the resolver, not an upstream.
const NAME: &str = "bench.example";

/// One way to the two UDP services: the DNS port, the one-way sink's port and the
/// counter of the receiver behind it.
struct Way {
    path: Path,
    dns: SocketAddr,
    sink: SocketAddr,
    received: Arc<Counted>,
}

pub(super) struct UdpRig {
    ways: Vec<Way>,
    _lhb: Option<Lhb>,
    _socats: Vec<KillOnDrop>,
    _dnsmasq: [Dnsmasq; 2],
    _sinks: [Sink; 2],
    queries: std::path::PathBuf,
}

impl Drop for UdpRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.queries);
    }
}

/// A UDP receiver in this process counting datagrams.
struct Sink {
    at: SocketAddr,
    count: Arc<Counted>,
    stop: Arc<AtomicBool>,
}

/// Datagrams received, and a wake-up for a sender waiting for `want` of them: the
/// sender sleeps instead of spinning, so the two CPUs go to the path being measured.
#[derive(Default)]
struct Counted {
    n: AtomicU64,
    want: AtomicU64,
    lock: std::sync::Mutex<()>,
    arrived: std::sync::Condvar,
}

impl Sink {
    fn start(at: SocketAddr) -> anyhow::Result<Sink> {
        let sock = UdpSocket::bind(at).with_context(|| format!("binding the sink on {at}"))?;
        let at = sock.local_addr()?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let count = Arc::new(Counted::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (count.clone(), stop.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if sock.recv_from(&mut buf).is_ok() {
                    let n = c.n.fetch_add(1, Ordering::AcqRel) + 1;
                    if n >= c.want.load(Ordering::Acquire) {
                        let _g = c.lock.lock().unwrap_or_else(|p| p.into_inner());
                        c.arrived.notify_all();
                    }
                }
            }
        });
        Ok(Sink { at, count, stop })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn free_udp_port(ip: &str) -> anyhow::Result<u16> {
    Ok(UdpSocket::bind((ip, 0))?.local_addr()?.port())
}

impl UdpRig {
    pub(super) fn build(lab: &Lab, selected: &[Path]) -> anyhow::Result<UdpRig> {
        let gw = lab.gateway();
        let lo_dns = free_udp_port("127.0.0.1")?;
        let gw_dns = free_udp_port(&gw.to_string())?;
        // A dnsmasq on each address: the loopback one behind lhb and socat, the
        // gateway one for the direct path.
        let dnsmasq = |addr: SocketAddr| Dnsmasq::on(addr).answering(NAME).start();
        let dnsmasqs = [
            dnsmasq(SocketAddr::from(([127, 0, 0, 1], lo_dns)))?,
            dnsmasq(SocketAddr::new(gw, gw_dns))?,
        ];
        let lo_sink = Sink::start(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let gw_sink = Sink::start(SocketAddr::new(gw, 0))?;
        let mut ways = vec![Way {
            path: Path::Direct,
            dns: SocketAddr::new(gw, gw_dns),
            sink: gw_sink.at,
            received: gw_sink.count.clone(),
        }];
        let mut lhb = None;
        let mut socats = Vec::new();
        let br = lab.bridge_name();
        if selected.contains(&Path::Proxy) {
            let (d, s) = (
                free_udp_port(&gw.to_string())?,
                free_udp_port(&gw.to_string())?,
            );
            let rules = [
                format!("{br}:{d}/udp={lo_dns}"),
                format!("{br}:{s}/udp={}", lo_sink.at.port()),
            ];
            lhb = Some(Lhb::start_bin(
                &release()?,
                &[
                    "--firewall",
                    "none",
                    "--expose-iface",
                    &rules[0],
                    "--expose-iface",
                    &rules[1],
                ],
            )?);
            ways.push(Way {
                path: Path::Proxy,
                dns: SocketAddr::new(gw, d),
                sink: SocketAddr::new(gw, s),
                received: lo_sink.count.clone(),
            });
        }
        if selected.contains(&Path::Socat) {
            let (d, s) = (
                free_udp_port(&gw.to_string())?,
                free_udp_port(&gw.to_string())?,
            );
            for (port, target) in [(d, lo_dns), (s, lo_sink.at.port())] {
                socats.push(KillOnDrop(
                    Command::new("socat")
                        .arg(format!("UDP-RECVFROM:{port},bind={gw},fork"))
                        .arg(format!("UDP:127.0.0.1:{target}"))
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .context("socat")?,
                ));
            }
            ways.push(Way {
                path: Path::Socat,
                dns: SocketAddr::new(gw, d),
                sink: SocketAddr::new(gw, s),
                received: lo_sink.count.clone(),
            });
        }
        let queries =
            std::env::temp_dir().join(format!("lhb-bench-queries-{}", std::process::id()));
        std::fs::write(&queries, format!("{NAME} A\n"))?;
        let rig = UdpRig {
            ways,
            _lhb: lhb,
            _socats: socats,
            _dnsmasq: dnsmasqs,
            _sinks: [lo_sink, gw_sink],
            queries,
        };
        // Every way answers before anything is measured.
        for w in &rig.ways {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !answers(lab, w.dns) {
                if Instant::now() > deadline {
                    bail!("the {} way to dnsmasq does not answer", w.path.name());
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(rig)
    }

    pub(super) fn measure(
        &self,
        lab: &Lab,
        secs: u32,
        rep: usize,
        out: &mut Results,
    ) -> anyhow::Result<()> {
        for w in &self.ways {
            for (workload, clients) in [(Workload::Dns1, 1), (Workload::Dns50, 50)] {
                let m = dnsperf(lab, w.dns, clients, secs, &self.queries)?;
                out.record(w.path, workload, m, rep);
            }
            let m = one_way(lab, w.sink, &w.received, secs)?;
            out.record(w.path, Workload::OneWay512, m, rep);
        }
        Ok(())
    }
}

/// Whether a query to `to` from the container is answered (dig, one try).
fn answers(lab: &Lab, to: SocketAddr) -> bool {
    lab.container
        .command("dig")
        .args([
            &format!("@{}", to.ip()),
            "-p",
            &to.port().to_string(),
            NAME,
            "+short",
            "+time=1",
            "+tries=1",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("10.1.2.3"))
        .unwrap_or(false)
}

/// dnsperf from the container: queries per second. Invalid if a query was lost or
/// dnsperf reports fewer completed than sent.
fn dnsperf(
    lab: &Lab,
    to: SocketAddr,
    clients: u32,
    secs: u32,
    queries: &std::path::Path,
) -> anyhow::Result<Measured> {
    let out = lab
        .container
        .command("dnsperf")
        .args([
            "-s",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-d",
        ])
        .arg(queries)
        .args([
            "-c",
            &clients.to_string(),
            "-l",
            &secs.to_string(),
            "-t",
            "2",
            // dnsperf's default 100 queries in flight, over all clients: with one
            // outstanding query dnsperf sleeps between them (measured: 97 queries/s
            // straight to dnsmasq on loopback), which measures dnsperf. One client is one
            // source port, one flow in lhb; 50 are 50 flows.
            "-q",
            "100",
        ])
        .stdin(Stdio::null())
        .output()
        .context("dnsperf (installed by `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> Option<&str> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(str::trim)
    };
    let qps: f64 = field("Queries per second:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("dnsperf printed no rate:\n{text}"))?;
    let lost: u64 = field("Queries lost:")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(u64::MAX);
    let invalid = (!out.status.success() || lost > 0).then(|| {
        format!(
            "{lost} queries lost (exit {})",
            out.status.code().unwrap_or(-1)
        )
    });
    Ok(Measured::unless(qps, invalid))
}

/// One-way 512-byte datagrams from the container for `secs`, in windows of 64 that must
/// each arrive whole at the receiver before the next is sent: the rate with no loss.
/// Invalid if a window did not arrive whole within a second.
fn one_way(lab: &Lab, to: SocketAddr, count: &Arc<Counted>, secs: u32) -> anyhow::Result<Measured> {
    const WINDOW: u64 = 64;
    let count = count.clone();
    lab.container
        .run(move || -> anyhow::Result<Measured> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            let payload = [b'x'; 512];
            let base = count.n.load(Ordering::Acquire);
            let got = || count.n.load(Ordering::Acquire) - base;
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < Duration::from_secs(secs.into()) {
                // Set before sending, so the receiver cannot pass it unseen.
                count.want.store(base + sent + WINDOW, Ordering::Release);
                for _ in 0..WINDOW {
                    s.send(&payload)?;
                }
                sent += WINDOW;
                let g = count.lock.lock().unwrap_or_else(|p| p.into_inner());
                let (_g, waited) = count
                    .arrived
                    .wait_timeout_while(g, Duration::from_secs(1), |_| got() < sent)
                    .unwrap_or_else(|p| p.into_inner());
                if waited.timed_out() && got() < sent {
                    return Ok(Measured::unless(
                        got() as f64 / start.elapsed().as_secs_f64(),
                        Some(format!("{} of {sent} datagrams lost", sent - got())),
                    ));
                }
            }
            Ok(Measured::ok(got() as f64 / start.elapsed().as_secs_f64()))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?
}
