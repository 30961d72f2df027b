//! The clients that measure, run from the container namespace, and the daemon's
//! resource use.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lhb_tests::{Lab, wait_until};

/// Connections per second: `clients` loops of connect, request, read to EOF, close; and
/// how many attempts failed (counted, not fatal: socat's listen backlog of 5 drops
/// connections under load, and that is part of what is measured).
pub(super) fn conn_rate(
    lab: &Lab,
    addr: SocketAddr,
    clients: usize,
    secs: f64,
) -> anyhow::Result<(f64, u64)> {
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
pub(super) fn iperf(
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

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// redis-benchmark GET from the container: (p50, p99) in ms.
pub(super) fn redis_latency(
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

/// Resident memory (KiB) and CPU time (clock ticks) of `pids` and their children.
pub(super) fn usage(pids: &[u32]) -> (u64, u64) {
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

pub(super) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
