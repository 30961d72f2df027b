//! `cargo xtask bench`: every way to the service, side by side in one run.
//!
//! - direct: the physical limit, the same server bound to the bridge's gateway itself;
//! - kernel: lhb's kernel path to the server on 127.0.0.1;
//! - proxy: lhb's splice proxy (`--mode proxy`) to the same server;
//! - socat: the usual recipe, `socat TCP-LISTEN:P,bind=GW,fork,reuseaddr TCP:127.0.0.1:P`;
//! - tokio: a plain tokio `copy_bidirectional` proxy, the baseline the splice proxy
//!   must not fall behind.
//!
//! Runs are interleaved, the order rotating every repetition so a drift of the machine's
//! speed hits every path alike, and results are medians and ratios, because this
//! machine's noise is larger than some of the differences being measured.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lhb_tests::{Lab, Lhb, free_port, wait_until};

const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Kernel,
    Proxy,
    Socat,
    Tokio,
}

const PATHS: [Path; 5] = [
    Path::Direct,
    Path::Kernel,
    Path::Proxy,
    Path::Socat,
    Path::Tokio,
];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Kernel => "kernel",
            Path::Proxy => "proxy",
            Path::Socat => "socat",
            Path::Tokio => "tokio",
        }
    }
}

/// Where one path is reached, for the two servers (request/response and iperf3).
struct Ports {
    conn: SocketAddr,
    iperf: SocketAddr,
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn socat(gw: std::net::IpAddr, port: u16, target: u16) -> anyhow::Result<Proc> {
    Ok(Proc(
        Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind={gw},fork,reuseaddr"))
            .arg(format!("TCP:127.0.0.1:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("socat (installed by `cargo xtask setup`)")?,
    ))
}

/// The plain tokio proxy: accept, connect, `copy_bidirectional`.
fn tokio_proxy(listen: Vec<(SocketAddr, SocketAddr)>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut bound = Vec::new();
    for (from, to) in listen {
        let l = rt.block_on(tokio::net::TcpListener::bind(from))?;
        bound.push((l, to));
    }
    thread::spawn(move || {
        rt.block_on(async move {
            for (l, to) in bound {
                tokio::spawn(async move {
                    while let Ok((mut c, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let Ok(mut u) = tokio::net::TcpStream::connect(to).await else {
                                return;
                            };
                            let _ = c.set_nodelay(true);
                            let _ = u.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                        });
                    }
                });
            }
            std::future::pending::<()>().await
        })
    });
    Ok(())
}

struct Sample {
    path: Path,
    workload: &'static str,
    value: f64,
    unit: &'static str,
}

/// Accept-read-answer-close on a few threads: a short request/response exchange.
struct TinyServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl TinyServer {
    fn start(bind: SocketAddr) -> anyhow::Result<TinyServer> {
        let listener = Arc::new(TcpListener::bind(bind).with_context(|| format!("bind {bind}"))?);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|_| {
                let l = listener.clone();
                let stop = stop.clone();
                thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut c, _)) = l.accept() else { break };
                        let _ = c.set_nodelay(true);
                        let mut got = 0;
                        while let Ok(n) = c.read(&mut buf[got..]) {
                            if n == 0 {
                                break;
                            }
                            got += n;
                            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") || got == buf.len() {
                                break;
                            }
                        }
                        let _ = c.write_all(RESPONSE);
                    }
                })
            })
            .collect();
        Ok(TinyServer {
            listener,
            stop,
            threads,
        })
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: shutdown on a valid fd wakes the threads blocked in accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connections per second: `clients` loops of connect, request, read to EOF, close.
fn conn_rate(lab: &Lab, addr: SocketAddr, clients: usize, secs: f64) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..clients {
            let (done, errors) = (done.clone(), errors.clone());
            s.spawn(move || {
                lab.container.run(move || {
                    let deadline = Instant::now() + Duration::from_secs_f64(secs);
                    let mut buf = [0u8; 128];
                    while Instant::now() < deadline {
                        let ok = (|| {
                            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                            c.set_nodelay(true)?;
                            c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                            while c.read(&mut buf)? > 0 {}
                            Ok::<_, std::io::Error>(())
                        })();
                        match ok {
                            Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            });
        }
    });
    let elapsed = start.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} connections to {addr} failed");
    }
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// iperf3 throughput in Gbit/s from the container to a server bound to `bind`.
fn iperf(
    lab: &Lab,
    bind: &str,
    server_port: u16,
    target: SocketAddr,
    secs: u32,
) -> anyhow::Result<f64> {
    struct Server(Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let port = server_port.to_string();
    let _server = Server(
        Command::new("iperf3")
            .args(["-s", "-1", "-B", bind, "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 (installed by `cargo xtask setup`)")?,
    );
    let ip = target.ip().to_string();
    let b: &str = bind;
    wait_until(Duration::from_secs(5), || {
        lhb_tests::run("ss", &["-Hltn", &format!("sport = :{port}")])
            .map(|o| o.contains(b))
            .unwrap_or(false)
    })
    .context("iperf3 server did not start")?;
    let out = lab
        .container
        .command("iperf3")
        .args([
            "-c",
            &ip,
            "-p",
            &target.port().to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 failed: {}", v["error"]))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn run(quick: bool, only: &[String]) -> anyhow::Result<()> {
    let selected: Vec<Path> = PATHS
        .iter()
        .copied()
        .filter(|p| only.is_empty() || only.iter().any(|o| o == p.name()))
        .collect();
    if selected.is_empty() {
        bail!("--paths names none of direct, kernel, proxy, socat, tokio");
    }
    let (reps, conn_secs, iperf_secs) = if quick { (3, 1.0, 2) } else { (5, 3.0, 5) };
    let lab = Lab::new(201)?;
    let gw = lab.gateway();
    let at_gw =
        || -> anyhow::Result<SocketAddr> { Ok(SocketAddr::new(gw, free_port("127.0.0.1")?)) };
    // The loopback servers every non-direct path leads to.
    let lo_conn = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")?));
    let lo_iperf = SocketAddr::from(([127, 0, 0, 1], free_port("127.0.0.1")?));
    let ports = |p: Path| -> anyhow::Result<Ports> {
        Ok(match p {
            Path::Kernel => Ports {
                conn: SocketAddr::new(gw, lo_conn.port()),
                iperf: SocketAddr::new(gw, lo_iperf.port()),
            },
            _ => Ports {
                conn: at_gw()?,
                iperf: at_gw()?,
            },
        })
    };
    let addrs: Vec<(Path, Ports)> = PATHS
        .iter()
        .map(|&p| ports(p).map(|a| (p, a)))
        .collect::<anyhow::Result<_>>()?;
    let of = |p: Path| &addrs.iter().find(|(q, _)| *q == p).expect("every path").1;

    let _direct_srv = TinyServer::start(of(Path::Direct).conn)?;
    let _lo_srv = TinyServer::start(lo_conn)?;
    let release = lhb_tests::lhb_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("release/lhb"))
        .context("target dir")?;
    let br = lab.bridge_name();
    let k = of(Path::Kernel);
    let _kernel = Lhb::start_bin(
        &release,
        &[
            "--mode",
            "kernel",
            "--expose-iface",
            &format!("{br}:{}", k.conn.port()),
            "--expose-iface",
            &format!("{br}:{}", k.iperf.port()),
        ],
    )?;
    let pr = of(Path::Proxy);
    let _proxy = Lhb::start_bin(
        &release,
        &[
            "--mode",
            "proxy",
            "--expose-iface",
            &format!("{br}:{}={}", pr.conn.port(), lo_conn.port()),
            "--expose-iface",
            &format!("{br}:{}={}", pr.iperf.port(), lo_iperf.port()),
        ],
    )?;
    let so = of(Path::Socat);
    let _socat = [
        socat(gw, so.conn.port(), lo_conn.port())?,
        socat(gw, so.iperf.port(), lo_iperf.port())?,
    ];
    let to = of(Path::Tokio);
    tokio_proxy(vec![(to.conn, lo_conn), (to.iperf, lo_iperf)])?;
    for (p, a) in &addrs {
        let up = wait_until(Duration::from_secs(5), || {
            lhb_tests::run("ss", &["-Hltn", &format!("sport = :{}", a.conn.port())])
                .map(|o| !o.trim().is_empty())
                .unwrap_or(false)
        });
        up.with_context(|| format!("{} path not listening", p.name()))?;
    }

    let mut samples = Vec::new();
    for rep in 1..=reps {
        // The order rotates every repetition: a drift of the machine's speed during the
        // run hits every path alike.
        let mut order = selected.clone();
        let n = order.len();
        order.rotate_left((rep - 1) % n);
        for path in order {
            let a = of(path);
            for (workload, clients) in [("conn/s serial", 1), ("conn/s 8 concurrent", 8)] {
                let v = conn_rate(&lab, a.conn, clients, conn_secs)?;
                eprintln!("[{rep}/{reps}] {:<6} {workload:<22} {v:>10.0}", path.name());
                samples.push(Sample {
                    path,
                    workload,
                    value: v,
                    unit: "conn/s",
                });
            }
            let bind = match path {
                Path::Direct => gw.to_string(),
                _ => "127.0.0.1".to_string(),
            };
            let server_port = match path {
                Path::Direct => a.iperf.port(),
                _ => lo_iperf.port(),
            };
            let v = iperf(&lab, &bind, server_port, a.iperf, iperf_secs)?;
            eprintln!(
                "[{rep}/{reps}] {:<6} {:<22} {v:>10.2}",
                path.name(),
                "iperf3 Gbit/s"
            );
            samples.push(Sample {
                path,
                workload: "iperf3 1 stream",
                value: v,
                unit: "Gbit/s",
            });
        }
    }
    report(&samples, &selected, reps, quick)
}

fn report(samples: &[Sample], paths: &[Path], reps: usize, quick: bool) -> anyhow::Result<()> {
    let mut md = String::new();
    let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
    writeln!(
        md,
        "| workload | {} | kernel / direct | proxy / socat | proxy / tokio |",
        names.join(" | ")
    )?;
    writeln!(md, "|---|{}---|---|---|", "---|".repeat(paths.len()))?;
    let mut workloads: Vec<&str> = samples.iter().map(|s| s.workload).collect();
    workloads.sort();
    workloads.dedup();
    for w in workloads {
        let unit = samples
            .iter()
            .find(|s| s.workload == w)
            .map(|s| s.unit)
            .unwrap_or("");
        let f = |x: f64| {
            if unit == "Gbit/s" {
                format!("{x:.2}")
            } else {
                format!("{x:.0}")
            }
        };
        let stats = |p: Path| {
            let mut v: Vec<f64> = samples
                .iter()
                .filter(|s| s.workload == w && s.path == p)
                .map(|s| s.value)
                .collect();
            let min = v.iter().copied().fold(f64::MAX, f64::min);
            let max = v.iter().copied().fold(f64::MIN, f64::max);
            (median(&mut v), min, max)
        };
        let cells: Vec<String> = paths
            .iter()
            .map(|&p| {
                let (m, lo, hi) = stats(p);
                format!("{} ({}-{})", f(m), f(lo), f(hi))
            })
            .collect();
        // A ratio between paths that were not both run is shown as `-`.
        let ratio = |a: Path, b: Path| {
            if paths.contains(&a) && paths.contains(&b) {
                format!("{:.2}x", stats(a).0 / stats(b).0)
            } else {
                "-".to_string()
            }
        };
        writeln!(
            md,
            "| {w} ({unit}) | {} | {} | {} | {} |",
            cells.join(" | "),
            ratio(Path::Kernel, Path::Direct),
            ratio(Path::Proxy, Path::Socat),
            ratio(Path::Proxy, Path::Tokio),
        )?;
    }
    writeln!(
        md,
        "\nMedian (min-max) of {reps} interleaved repetitions{}; higher is better everywhere.",
        if quick { " (--quick)" } else { "" }
    )?;
    println!("\n{md}");
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.md"), &md)?;
    let json = serde_json::json!({
        "results": samples.iter().map(|s| serde_json::json!({
            "path": s.path.name(),
            "workload": s.workload,
            "value": s.value,
            "unit": s.unit,
            "lower_is_better": false,
        })).collect::<Vec<_>>()
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("written to {}", dir.display());
    Ok(())
}
