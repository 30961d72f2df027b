//! `cargo xtask bench`: every way to the service, side by side in one run.
//!
//! - direct: the physical limit, the same server bound to the bridge's gateway itself;
//! - kernel: lhb's kernel path to the server on 127.0.0.1;
//! - proxy: lhb's splice proxy (`--mode proxy`) to the same server;
//! - socat: the usual recipe, `socat TCP-LISTEN:P,bind=GW,fork,reuseaddr TCP:127.0.0.1:P`;
//! - haproxy: the best-known userspace TCP proxy (`mode tcp`, `option splice-auto`,
//!   two threads like lhb's runtime), bound to the gateway like socat: the bar lhb's
//!   proxy is held to;
//! - tokio: a plain tokio `copy_bidirectional` proxy, the baseline the splice proxy
//!   must not fall behind.
//!
//! Runs are interleaved, the order rotating every repetition so a drift of the machine's
//! speed hits every path alike, and results are medians and ratios, because this
//! machine's noise is larger than some of the differences being measured.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lhb_tests::wait_until;

mod bpf;
mod charts;
mod measure;
mod report;
mod rig;
mod scale;
mod servers;
mod udp;
mod workload;

use measure::*;
use report::*;
use rig::Rig;
use servers::*;
use workload::Workload;

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Kernel,
    Proxy,
    Socat,
    Haproxy,
    Tokio,
}

const PATHS: [Path; 6] = [
    Path::Direct,
    Path::Kernel,
    Path::Proxy,
    Path::Socat,
    Path::Haproxy,
    Path::Tokio,
];

/// What `cargo xtask bench` runs without --paths: the limit, lhb's two paths, the
/// recipe lhb replaces and the proxy lhb's own is measured against.
const DEFAULT_PATHS: [Path; 5] = [
    Path::Direct,
    Path::Kernel,
    Path::Proxy,
    Path::Socat,
    Path::Haproxy,
];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Kernel => "kernel",
            Path::Proxy => "proxy",
            Path::Socat => "socat",
            Path::Haproxy => "haproxy",
            Path::Tokio => "tokio",
        }
    }
}

/// Where one path is reached (a port on the gateway each), per server.
struct Ports {
    conn: SocketAddr,
    iperf: SocketAddr,
    redis: SocketAddr,
    pg: SocketAddr,
}

struct Sample {
    path: Path,
    workload: Workload,
    value: f64,
    /// Why this repetition does not count (it ran other than intended).
    invalid: Option<String>,
    /// Which repetition: the paths of one repetition ran one right after another, so
    /// ratios are taken within a repetition (see `report::pair_ratios`).
    rep: usize,
}

struct Knobs {
    reps: usize,
    conn_secs: f64,
    iperf_secs: u32,
    redis_n1: u32,
    redis_n50: u32,
    pg_secs: u32,
    udp_secs: u32,
}

pub fn run(quick: bool, only: &[String], scoped: bool) -> anyhow::Result<()> {
    let selected: Vec<Path> = if only.is_empty() {
        DEFAULT_PATHS.to_vec()
    } else {
        PATHS
            .iter()
            .copied()
            .filter(|p| only.iter().any(|o| o == p.name()))
            .collect()
    };
    if selected.is_empty() {
        bail!("--paths names none of direct, kernel, proxy, socat, haproxy, tokio");
    }
    let k = if quick {
        Knobs {
            reps: 3,
            conn_secs: 1.0,
            iperf_secs: 1,
            redis_n1: 2_000,
            redis_n50: 20_000,
            pg_secs: 1,
            udp_secs: 1,
        }
    } else {
        Knobs {
            reps: 5,
            conn_secs: 3.0,
            iperf_secs: 5,
            redis_n1: 20_000,
            redis_n50: 200_000,
            pg_secs: 5,
            udp_secs: 3,
        }
    };
    let started = Instant::now();
    eprintln!("bench: setting up (namespaces, servers, lhb, socat, HAProxy, PostgreSQL)");
    let rig = Rig::build(&selected, scoped)?;
    let udp = udp::UdpRig::build(&rig.lab, &selected)?;
    eprintln!("bench: set up in {:.1}s", started.elapsed().as_secs_f64());
    let mut out = Results {
        reps: k.reps,
        samples: Vec::new(),
    };
    for rep in 1..=k.reps {
        // The order rotates every repetition: a drift of the machine's speed during the
        // run hits every path alike.
        let mut order = selected.clone();
        let n = order.len();
        order.rotate_left((rep - 1) % n);
        for &path in &order {
            measure_path(&rig, path, &k, rep, &mut out)?;
        }
        udp.measure(&rig.lab, k.udp_secs, rep, &mut out)?;
        measure_recreate(&rig, rep, &mut out)?;
        if selected.contains(&Path::Kernel) {
            bpf::measure(&rig, &k, rep, &mut out)?;
            scale::measure(rep, &mut out)?;
        }
    }
    drop(udp);
    drop(rig);
    report(&out.samples, &selected, k.reps, quick)?;
    eprintln!("bench: done in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Every sample so far.
struct Results {
    reps: usize,
    samples: Vec<Sample>,
}

impl Results {
    fn record(&mut self, path: Path, workload: Workload, m: Measured, rep: usize) {
        eprintln!(
            "[{rep}/{}] {:<6} {:<30} {:>12.3} {}{}",
            self.reps,
            path.name(),
            workload.name(),
            m.value,
            workload.unit(),
            m.invalid
                .as_deref()
                .map(|r| format!("  INVALID: {r}"))
                .unwrap_or_default()
        );
        self.samples.push(Sample {
            path,
            workload,
            value: m.value,
            invalid: m.invalid,
            rep,
        });
    }

    fn value(&mut self, path: Path, workload: Workload, value: f64, rep: usize) {
        self.record(path, workload, Measured::ok(value), rep);
    }
}

/// One repetition of every workload through `path`.
fn measure_path(
    rig: &Rig,
    path: Path,
    k: &Knobs,
    rep: usize,
    out: &mut Results,
) -> anyhow::Result<()> {
    let a = rig.of(path);
    let lab = &rig.lab;
    let gw = lab.gateway();
    let pids = rig.daemon_pids(path);
    if !pids.is_empty() {
        out.value(path, Workload::RssIdle, usage(&pids).0 as f64 / 1024.0, rep);
    }
    let rate = |clients| conn_rate(lab, a.conn, clients, k.conn_secs);
    out.record(path, Workload::ConnSerial, rate(1)?, rep);
    // Resources under load: CPU over the 8-client run, peak RSS sampled during it.
    let before = (Instant::now(), usage(&pids).1);
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pids) = (peak.clone(), sampling.clone(), pids.clone());
        thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) && !pids.is_empty() {
                peak.fetch_max(usage(&pids).0, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let v = rate(8);
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    out.record(path, Workload::Conn8, v?, rep);
    if !pids.is_empty() {
        let ticks = usage(&pids).1;
        let cpu =
            (ticks - before.1.min(ticks)) as f64 / clock_ticks() / before.0.elapsed().as_secs_f64()
                * 100.0;
        let rss = peak.load(Ordering::Relaxed) as f64 / 1024.0;
        out.value(path, Workload::RssLoad, rss, rep);
        out.value(path, Workload::CpuLoad, cpu, rep);
    }
    out.record(path, Workload::Conn64, rate(64)?, rep);
    let (bind, server_port) = match path {
        Path::Direct => (gw.to_string(), a.iperf.port()),
        _ => ("127.0.0.1".to_string(), rig.lo.iperf.port()),
    };
    for (name, streams) in [(Workload::Iperf1, 1), (Workload::Iperf4, 4)] {
        let v = iperf(
            lab,
            &bind,
            server_port,
            a.iperf,
            k.iperf_secs,
            streams,
            None,
        )?;
        out.record(path, name, v, rep);
    }
    let (p50, p99) = redis_latency(lab, a.redis, 1, k.redis_n1)?;
    out.record(path, Workload::RedisP50C1, p50, rep);
    out.record(path, Workload::RedisP99C1, p99, rep);
    let (p50, p99) = redis_latency(lab, a.redis, 50, k.redis_n50)?;
    out.record(path, Workload::RedisP50C50, p50, rep);
    out.record(path, Workload::RedisP99C50, p99, rep);
    let tps = rig.pg.tps(lab, a.pg, k.pg_secs)?;
    out.record(path, Workload::Pgbench, tps, rep);
    Ok(())
}

/// Re-created bridge (same name and addresses, new ifindex, as Docker does): the time
/// until each lhb path serves the container again.
fn measure_recreate(rig: &Rig, rep: usize, out: &mut Results) -> anyhow::Result<()> {
    for &(path, q) in &rig.re_ports {
        rig.relab.borrow_mut().recreate_bridge()?;
        let t0 = Instant::now();
        let to = SocketAddr::new(rig.relab.borrow().gateway(), q);
        let lab = rig.relab.borrow();
        wait_until(Duration::from_secs(10), || served(&lab, to)).with_context(|| {
            format!("{} path not served after the bridge came back", path.name())
        })?;
        out.value(
            path,
            Workload::Recreate,
            t0.elapsed().as_secs_f64() * 1000.0,
            rep,
        );
    }
    Ok(())
}
