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

/// What `cargo xtask bench` runs without --paths: the limit, lhb's two paths and the
/// recipe lhb replaces.
const DEFAULT_PATHS: [Path; 4] = [Path::Direct, Path::Kernel, Path::Proxy, Path::Socat];

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

/// Where one path is reached (a port on the gateway each), per server.
struct Ports {
    conn: SocketAddr,
    iperf: SocketAddr,
    redis: SocketAddr,
    pg: SocketAddr,
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
    lower_is_better: bool,
}

/// Every workload, in table order: (name, unit, lower is better, chart group).
const WORKLOADS: &[(&str, &str, bool, &str)] = &[
    ("conn/s serial", "conn/s", false, "connection-rate"),
    ("conn/s 8 concurrent", "conn/s", false, "connection-rate"),
    ("conn/s 64 concurrent", "conn/s", false, "connection-rate"),
    ("iperf3 1 stream", "Gbit/s", false, "throughput"),
    ("iperf3 4 streams", "Gbit/s", false, "throughput"),
    ("redis GET p50 -c 1", "ms", true, "redis-latency"),
    ("redis GET p99 -c 1", "ms", true, "redis-latency"),
    ("redis GET p50 -c 50", "ms", true, "redis-latency"),
    ("redis GET p99 -c 50", "ms", true, "redis-latency"),
    ("pgbench select-only -c 8", "tps", false, "pgbench"),
    ("daemon RSS idle", "MiB", true, "memory"),
    ("daemon RSS under load", "MiB", true, "memory"),
    ("daemon CPU under load", "% of a core", true, "cpu"),
    ("bridge re-created -> served", "ms", true, "recreate"),
];

fn workload(name: &str) -> (&'static str, &'static str, bool, &'static str) {
    *WORKLOADS
        .iter()
        .find(|w| w.0 == name)
        .expect("every workload is listed")
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

/// Connections per second: `clients` loops of connect, request, read to EOF, close; and
/// how many attempts failed (counted, not fatal: socat's listen backlog of 5 drops
/// connections under load, and that is part of what is measured).
fn conn_rate(lab: &Lab, addr: SocketAddr, clients: usize, secs: f64) -> anyhow::Result<(f64, u64)> {
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
    Ok((
        done.load(Ordering::Relaxed) as f64 / elapsed,
        errors.load(Ordering::Relaxed),
    ))
}

/// iperf3 throughput in Gbit/s from the container to a server bound to `bind`.
fn iperf(
    lab: &Lab,
    bind: &str,
    server_port: u16,
    target: SocketAddr,
    secs: u32,
    streams: u32,
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
            "-P",
            &streams.to_string(),
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

/// A redis-server on `bind`:`port`, no persistence.
fn redis_server(bind: &str, port: u16) -> anyhow::Result<Proc> {
    let p = Proc(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                bind,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-server (installed by `cargo xtask setup`)")?,
    );
    let addr: SocketAddr = format!("{bind}:{port}").parse()?;
    wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_ok())
        .with_context(|| format!("redis-server on {addr} did not start"))?;
    Ok(p)
}

/// redis-benchmark GET from the container: (p50, p99) in ms.
fn redis_latency(
    lab: &Lab,
    to: SocketAddr,
    clients: u32,
    requests: u32,
) -> anyhow::Result<(f64, f64)> {
    let out = lab
        .container
        .command("redis-benchmark")
        .args([
            "-h",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-c",
            &clients.to_string(),
            "-n",
            &requests.to_string(),
            "-t",
            "get",
            "--csv",
        ])
        .stdin(Stdio::null())
        .output()
        .context("redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",...
    let row = text
        .lines()
        .find(|l| l.starts_with("\"GET"))
        .with_context(|| {
            format!(
                "redis-benchmark to {to}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<f64> = row
        .split(',')
        .map(|c| c.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    match (f.get(4), f.get(6)) {
        (Some(p50), Some(p99)) if p50.is_finite() && p99.is_finite() => Ok((*p50, *p99)),
        _ => bail!("redis-benchmark row not understood: {row}"),
    }
}

/// A throwaway PostgreSQL cluster on 127.0.0.1 and the gateway, `bench` initialised
/// with pgbench; removed on drop.
struct Postgres {
    proc: Option<Child>,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl Postgres {
    fn start(gw: std::net::IpAddr, port: u16) -> anyhow::Result<Postgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL (the `postgresql` package, installed by `cargo xtask setup`)")?
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("pgbench").exists())
            .context("no /usr/lib/postgresql/*/bin/pgbench")?;
        let dir = std::env::temp_dir().join(format!("lhb-bench-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        lhb_tests::run(
            "chown",
            &["postgres:postgres", dir.to_str().context("path")?],
        )?;
        let data = dir.join("data");
        let as_pg = |prog: &str, args: &[&str]| -> anyhow::Result<String> {
            let mut all = vec!["-u", "postgres", "--"];
            let p = bin.join(prog);
            all.push(p.to_str().unwrap_or_default());
            all.extend_from_slice(args);
            lhb_tests::run("runuser", &all)
        };
        as_pg(
            "initdb",
            &[
                "-D",
                data.to_str().context("path")?,
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        )?;
        // Containers connect from the bridge's subnet; a throwaway cluster trusts them.
        let hba = data.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).context("pg_hba.conf")?;
        rules.push_str("host all all 0.0.0.0/0 trust\n");
        std::fs::write(&hba, rules)?;
        let child = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("postgres"))
            .args([
                "-D",
                data.to_str().context("path")?,
                "-p",
                &port.to_string(),
            ])
            .args(["-c", &format!("listen_addresses=127.0.0.1,{gw}")])
            .args(["-c", &format!("unix_socket_directories={}", dir.display())])
            .args(["-c", "max_connections=300", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting postgres")?;
        let pg = Postgres {
            proc: Some(child),
            dir,
            bin: bin.clone(),
        };
        let lo = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until(Duration::from_secs(20), || {
            lhb_tests::run(
                pg.bin.join("pg_isready").to_str().unwrap_or_default(),
                &["-h", "127.0.0.1", "-p", &port.to_string()],
            )
            .is_ok()
        })
        .with_context(|| format!("postgres on {lo} did not start"))?;
        let p = port.to_string();
        as_pg(
            "createdb",
            &["-h", "127.0.0.1", "-p", &p, "-U", "postgres", "bench"],
        )?;
        as_pg(
            "pgbench",
            &[
                "-i",
                "-q",
                "-s",
                "4",
                "-h",
                "127.0.0.1",
                "-p",
                &p,
                "-U",
                "postgres",
                "bench",
            ],
        )?;
        Ok(pg)
    }

    /// pgbench select-only from the container to `to`: transactions per second.
    fn tps(&self, lab: &Lab, to: SocketAddr, secs: u32) -> anyhow::Result<f64> {
        let out = lab
            .container
            .command(self.bin.join("pgbench").to_str().unwrap_or_default())
            .args([
                "-h",
                &to.ip().to_string(),
                "-p",
                &to.port().to_string(),
                "-U",
                "postgres",
                "-S",
                "-n",
                "-c",
                "8",
                "-j",
                "4",
                "-T",
                &secs.to_string(),
                "bench",
            ])
            .stdin(Stdio::null())
            .output()
            .context("pgbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| {
                format!(
                    "pgbench to {to}: {text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.proc.take() {
            // postgres runs under runuser: signal the server itself (fast shutdown).
            let pidfile = self.dir.join("data/postmaster.pid");
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            {
                // SAFETY: a plain kill(2) of the postmaster we started.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Resident memory (KiB) and CPU time (clock ticks) of `pids` and their children.
fn usage(pids: &[u32]) -> (u64, u64) {
    let mut all: Vec<u32> = pids.to_vec();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if ppid.is_some_and(|pp| pids.contains(&pp)) && !all.contains(&pid) {
                all.push(pid);
            }
        }
    }
    let mut rss = 0;
    let mut ticks = 0;
    for pid in all {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            rss += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            let f: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            // After the comm: state is field 3; utime 14, stime 15, and the CPU time of
            // children already reaped, cutime 16 and cstime 17 (socat forks per connection).
            let t = |i: usize| {
                f.get(i - 3)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            ticks += t(14) + t(15) + t(16) + t(17);
        }
    }
    (rss, ticks)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Served from the container at `to` (an HTTP exchange with the tiny server).
fn served(lab: &Lab, to: SocketAddr) -> bool {
    lab.container
        .run(move || {
            let ok = (|| {
                let mut c = TcpStream::connect_timeout(&to, Duration::from_millis(100))?;
                c.set_read_timeout(Some(Duration::from_millis(200)))?;
                c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                let mut b = Vec::new();
                c.read_to_end(&mut b)?;
                Ok::<_, std::io::Error>(b.ends_with(b"ok"))
            })();
            ok.unwrap_or(false)
        })
        .unwrap_or(false)
}

struct Knobs {
    reps: usize,
    conn_secs: f64,
    iperf_secs: u32,
    redis_n1: u32,
    redis_n50: u32,
    pg_secs: u32,
}

pub fn run(quick: bool, only: &[String]) -> anyhow::Result<()> {
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
        bail!("--paths names none of direct, kernel, proxy, socat, tokio");
    }
    let k = if quick {
        Knobs {
            reps: 3,
            conn_secs: 1.0,
            iperf_secs: 1,
            redis_n1: 2_000,
            redis_n50: 20_000,
            pg_secs: 1,
        }
    } else {
        Knobs {
            reps: 5,
            conn_secs: 3.0,
            iperf_secs: 5,
            redis_n1: 20_000,
            redis_n50: 200_000,
            pg_secs: 5,
        }
    };
    let started = Instant::now();
    eprintln!("bench: setting up (namespaces, servers, lhb, socat, PostgreSQL)");
    let lab = Lab::new(201)?;
    let gw = lab.gateway();
    let port = || free_port("127.0.0.1");
    // The loopback servers every path but direct leads to.
    let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let (lo_conn, lo_iperf, lo_redis, pg_port) = (lo(port()?), lo(port()?), lo(port()?), port()?);
    let lo_pg = lo(pg_port);
    let at_gw = |p: u16| SocketAddr::new(gw, p);
    let mut addrs: Vec<(Path, Ports)> = Vec::new();
    for &p in &PATHS {
        let ports = match p {
            // The servers themselves, bound to the gateway (PostgreSQL listens on both).
            Path::Direct => Ports {
                conn: at_gw(port()?),
                iperf: at_gw(port()?),
                redis: at_gw(port()?),
                pg: at_gw(pg_port),
            },
            _ => Ports {
                conn: at_gw(port()?),
                iperf: at_gw(port()?),
                redis: at_gw(port()?),
                pg: at_gw(port()?),
            },
        };
        addrs.push((p, ports));
    }
    let of = |p: Path| &addrs.iter().find(|(q, _)| *q == p).expect("every path").1;
    let d = of(Path::Direct);
    let _direct_srv = TinyServer::start(d.conn)?;
    let _lo_srv = TinyServer::start(lo_conn)?;
    let _redis_lo = redis_server("127.0.0.1", lo_redis.port())?;
    let _redis_direct = redis_server(&gw.to_string(), d.redis.port())?;
    let pg = Postgres::start(gw, pg_port)?;

    let release = lhb_tests::lhb_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("release/lhb"))
        .context("target dir")?;
    let br = lab.bridge_name();
    let rules = |p: &Ports| -> Vec<String> {
        [
            (p.conn, lo_conn),
            (p.iperf, lo_iperf),
            (p.redis, lo_redis),
            (p.pg, lo_pg),
        ]
        .iter()
        .flat_map(|(at, to)| {
            [
                "--expose-iface".to_string(),
                format!("{br}:{}={}", at.port(), to.port()),
            ]
        })
        .collect()
    };
    let start_lhb = |mode: &str, p: &Ports| -> anyhow::Result<Lhb> {
        let mut args = vec![
            "--mode".to_string(),
            mode.to_string(),
            "--firewall".into(),
            "none".into(),
        ];
        args.extend(rules(p));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Lhb::start_bin(&release, &args)
    };
    let kernel = start_lhb("kernel", of(Path::Kernel))?;
    let proxy = start_lhb("proxy", of(Path::Proxy))?;
    let so = of(Path::Socat);
    let socats = [
        socat(gw, so.conn.port(), lo_conn.port())?,
        socat(gw, so.iperf.port(), lo_iperf.port())?,
        socat(gw, so.redis.port(), lo_redis.port())?,
        socat(gw, so.pg.port(), lo_pg.port())?,
    ];
    let to = of(Path::Tokio);
    tokio_proxy(vec![
        (to.conn, lo_conn),
        (to.iperf, lo_iperf),
        (to.redis, lo_redis),
        (to.pg, lo_pg),
    ])?;
    let daemon_pids = |p: Path| -> Vec<u32> {
        match p {
            Path::Kernel => vec![kernel.pid()],
            Path::Proxy => vec![proxy.pid()],
            Path::Socat => socats.iter().map(|s| s.0.id()).collect(),
            _ => vec![],
        }
    };
    for &p in &selected {
        let a = of(p);
        if p != Path::Direct {
            wait_until(Duration::from_secs(5), || served(&lab, a.conn))
                .with_context(|| format!("{} path does not serve", p.name()))?;
        }
    }

    // Bridge re-creation: a lab of its own, so the other servers keep their bridge.
    let relab = std::cell::RefCell::new(Lab::new(202)?);
    let re_srv_addr = lo(port()?);
    let _re_srv = TinyServer::start(re_srv_addr)?;
    let re_ports: Vec<(Path, u16)> = [Path::Kernel, Path::Proxy]
        .into_iter()
        .filter(|p| selected.contains(p))
        .map(|p| port().map(|q| (p, q)))
        .collect::<anyhow::Result<_>>()?;
    let re_br = relab.borrow().bridge_name();
    let _re_daemons: Vec<Lhb> = re_ports
        .iter()
        .map(|(p, q)| {
            Lhb::start_bin(
                &release,
                &[
                    "--mode",
                    p.name(),
                    "--firewall",
                    "none",
                    "--expose-iface",
                    &format!("{re_br}:{q}={}", re_srv_addr.port()),
                ],
            )
        })
        .collect::<anyhow::Result<_>>()?;
    eprintln!("bench: set up in {:.1}s", started.elapsed().as_secs_f64());

    let mut samples: Vec<Sample> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut record = |path: Path, name: &'static str, value: f64, rep: usize| {
        let (w, unit, lower, _) = workload(name);
        eprintln!(
            "[{rep}/{}] {:<6} {w:<30} {value:>12.3} {unit}",
            k.reps,
            path.name()
        );
        samples.push(Sample {
            path,
            workload: w,
            value,
            unit,
            lower_is_better: lower,
        });
    };
    for rep in 1..=k.reps {
        // The order rotates every repetition: a drift of the machine's speed during the
        // run hits every path alike.
        let mut order = selected.clone();
        let n = order.len();
        order.rotate_left((rep - 1) % n);
        for &path in &order {
            let a = of(path);
            let pids = daemon_pids(path);
            if !pids.is_empty() {
                record(path, "daemon RSS idle", usage(&pids).0 as f64 / 1024.0, rep);
            }
            let rate = |name: &'static str,
                        clients: usize,
                        failures: &mut Vec<String>|
             -> anyhow::Result<f64> {
                let (v, errors) = conn_rate(&lab, a.conn, clients, k.conn_secs)?;
                if errors > 0 {
                    eprintln!(
                        "[{rep}/{}] {:<6} {name}: {errors} connection(s) failed",
                        k.reps,
                        path.name()
                    );
                    failures.push(format!(
                        "{} {name}: {errors} failed connection(s) in repetition {rep}",
                        path.name()
                    ));
                }
                Ok(v)
            };
            let v = rate("conn/s serial", 1, &mut failures)?;
            record(path, "conn/s serial", v, rep);
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
            let v = rate("conn/s 8 concurrent", 8, &mut failures);
            sampling.store(false, Ordering::Relaxed);
            let _ = sampler.join();
            record(path, "conn/s 8 concurrent", v?, rep);
            if !pids.is_empty() {
                let ticks = usage(&pids).1;
                let cpu = (ticks - before.1.min(ticks)) as f64
                    / clock_ticks()
                    / before.0.elapsed().as_secs_f64()
                    * 100.0;
                let rss = peak.load(Ordering::Relaxed) as f64 / 1024.0;
                record(path, "daemon RSS under load", rss, rep);
                record(path, "daemon CPU under load", cpu, rep);
            }
            let v = rate("conn/s 64 concurrent", 64, &mut failures)?;
            record(path, "conn/s 64 concurrent", v, rep);
            let (bind, server_port) = match path {
                Path::Direct => (gw.to_string(), a.iperf.port()),
                _ => ("127.0.0.1".to_string(), lo_iperf.port()),
            };
            for (name, streams) in [("iperf3 1 stream", 1), ("iperf3 4 streams", 4)] {
                let v = iperf(&lab, &bind, server_port, a.iperf, k.iperf_secs, streams)?;
                record(path, name, v, rep);
            }
            let (p50, p99) = redis_latency(&lab, a.redis, 1, k.redis_n1)?;
            record(path, "redis GET p50 -c 1", p50, rep);
            record(path, "redis GET p99 -c 1", p99, rep);
            let (p50, p99) = redis_latency(&lab, a.redis, 50, k.redis_n50)?;
            record(path, "redis GET p50 -c 50", p50, rep);
            record(path, "redis GET p99 -c 50", p99, rep);
            record(
                path,
                "pgbench select-only -c 8",
                pg.tps(&lab, a.pg, k.pg_secs)?,
                rep,
            );
        }
        // Re-created bridge (same name and addresses, new ifindex, as Docker does): the
        // time until each lhb path serves the container again.
        for &(path, q) in &re_ports {
            relab.borrow_mut().recreate_bridge()?;
            let t0 = Instant::now();
            let to = SocketAddr::new(relab.borrow().gateway(), q);
            let lab_ref = relab.borrow();
            wait_until(Duration::from_secs(10), || served(&lab_ref, to)).with_context(|| {
                format!("{} path not served after the bridge came back", path.name())
            })?;
            record(
                path,
                "bridge re-created -> served",
                t0.elapsed().as_secs_f64() * 1000.0,
                rep,
            );
        }
    }
    drop(pg);
    report(&samples, &selected, k.reps, quick, &failures)?;
    eprintln!("bench: done in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Median, min and max of one path's samples for one workload.
fn stats(samples: &[Sample], w: &str, p: Path) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.workload == w && s.path == p)
        .map(|s| s.value)
        .collect();
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    Some((median(&mut v), min, max))
}

fn report(
    samples: &[Sample],
    paths: &[Path],
    reps: usize,
    quick: bool,
    failures: &[String],
) -> anyhow::Result<()> {
    let mut md = String::new();
    let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
    let pairs: Vec<(Path, Path)> = [
        (Path::Kernel, Path::Direct),
        (Path::Proxy, Path::Direct),
        (Path::Kernel, Path::Socat),
        (Path::Proxy, Path::Socat),
    ]
    .into_iter()
    .filter(|(a, b)| paths.contains(a) && paths.contains(b))
    .collect();
    let pair_names: Vec<String> = pairs
        .iter()
        .map(|(a, b)| format!("{} vs {}", a.name(), b.name()))
        .collect();
    writeln!(
        md,
        "| workload | {} | {} |",
        names.join(" | "),
        pair_names.join(" | ")
    )?;
    writeln!(
        md,
        "|---|{}{}",
        "---|".repeat(paths.len()),
        "---|".repeat(pairs.len())
    )?;
    for &(w, unit, lower, _) in WORKLOADS {
        if !samples.iter().any(|s| s.workload == w) {
            continue;
        }
        let f = |x: f64| match unit {
            "Gbit/s" | "ms" | "MiB" | "% of a core" => format!("{x:.2}"),
            _ => format!("{x:.0}"),
        };
        let cells: Vec<String> = paths
            .iter()
            .map(|&p| match stats(samples, w, p) {
                Some((m, lo, hi)) => format!("{} ({}-{})", f(m), f(lo), f(hi)),
                None => "n/a".into(),
            })
            .collect();
        // Ratios read "how many times as good": above 1.00x is better, for every unit.
        let ratios: Vec<String> = pairs
            .iter()
            .map(
                |&(a, b)| match (stats(samples, w, a), stats(samples, w, b)) {
                    (Some((x, ..)), Some((y, ..))) if x > 0.0 && y > 0.0 => {
                        format!("{:.2}x", if lower { y / x } else { x / y })
                    }
                    _ => "-".into(),
                },
            )
            .collect();
        writeln!(
            md,
            "| {w} ({unit}, {}) | {} | {} |",
            if lower {
                "lower is better"
            } else {
                "higher is better"
            },
            cells.join(" | "),
            ratios.join(" | ")
        )?;
    }
    writeln!(
        md,
        "\nMedian (min-max) of {reps} interleaved repetitions{}. Ratios are \"times as good\": \
         above 1.00x the first path is better, whichever way the unit goes. n/a: the path has \
         no daemon (direct) or does not follow a bridge (direct, socat).",
        if quick { " (--quick: short runs)" } else { "" }
    )?;
    if !failures.is_empty() {
        writeln!(md, "\nFailed connections (not counted in the rates):")?;
        for f in failures {
            writeln!(md, "- {f}")?;
        }
    }
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
            "lower_is_better": s.lower_is_better,
        })).collect::<Vec<_>>()
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    let charts = crate::charts::draw(&dir, samples_for_charts(samples, paths), paths_names(paths))?;
    println!(
        "written to {}: results.md, results.json, {}",
        dir.display(),
        charts.join(", ")
    );
    Ok(())
}

fn paths_names(paths: &[Path]) -> Vec<&'static str> {
    paths.iter().map(|p| p.name()).collect()
}

/// Per chart group: its workloads with (path, median, min, max).
fn samples_for_charts(samples: &[Sample], paths: &[Path]) -> Vec<crate::charts::Group> {
    let mut groups: Vec<crate::charts::Group> = Vec::new();
    for &(w, unit, lower, group) in WORKLOADS {
        let bars: Vec<crate::charts::Bar> = paths
            .iter()
            .filter_map(|&p| stats(samples, w, p).map(|(m, lo, hi)| (p.name(), m, lo, hi)))
            .collect();
        if bars.is_empty() {
            continue;
        }
        let g = match groups.iter_mut().find(|g| g.name == group) {
            Some(g) => g,
            None => {
                groups.push(crate::charts::Group {
                    name: group,
                    unit,
                    lower_is_better: lower,
                    workloads: Vec::new(),
                });
                groups.last_mut().expect("just pushed")
            }
        };
        g.workloads.push((w, bars));
    }
    groups
}
