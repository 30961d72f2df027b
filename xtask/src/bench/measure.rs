//! The clients that measure, run from the container namespace, and the daemon's
//! resource use.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lhb_tests::{Lab, wait_until};

/// One measurement, and why it does not count if it ran other than intended (a
/// failed connection, fewer clients than asked, an error the tool reported).
#[derive(Clone, Debug)]
pub(super) struct Measured {
    pub value: f64,
    pub invalid: Option<String>,
}

impl Measured {
    pub fn ok(value: f64) -> Measured {
        Measured {
            value,
            invalid: None,
        }
    }

    pub fn unless(value: f64, invalid: Option<String>) -> Measured {
        Measured { value, invalid }
    }
}

/// Connections per second: `clients` loops of connect, request, read to EOF, close; and
/// invalid if any attempt failed (socat's listen backlog of 5 drops connections under
/// load: a rate of the connections that got through is not the rate asked about).
pub(super) fn conn_rate(
    lab: &Lab,
    addr: SocketAddr,
    clients: usize,
    secs: f64,
) -> anyhow::Result<Measured> {
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
    let (done, errors) = (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    Ok(Measured::unless(
        done as f64 / elapsed,
        (errors > 0 || done == 0)
            .then(|| format!("{errors} of {} connections failed", done + errors)),
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
    write_len: Option<u32>,
) -> anyhow::Result<Measured> {
    let port = server_port.to_string();
    let _server = lhb_tests::KillOnDrop(
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
        .args(write_len.map(|l| format!("-l{l}")))
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    let gbits = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 failed: {}", v["error"]))?;
    let connected = v["start"]["connected"].as_array().map_or(0, Vec::len);
    let streams_done = v["end"]["streams"].as_array().map_or(0, Vec::len);
    let sent = v["end"]["sum_sent"]["bytes"].as_f64().unwrap_or(0.0);
    let received = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    let invalid = if connected != streams as usize || streams_done != streams as usize {
        Some(format!(
            "{connected} of {streams} streams connected, {streams_done} reported"
        ))
    } else if received <= 0.0 || received > sent {
        Some(format!("received {received} bytes of {sent} sent"))
    } else {
        v.get("error").map(|e| format!("iperf3: {e}"))
    };
    Ok(Measured::unless(gbits, invalid))
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

/// redis-benchmark GET from the container: (p50, p99) in ms. Invalid if the tool
/// reported an error, or if far fewer clients than asked were busy on average (Little's
/// law: requests per second times mean latency): a client that could not connect at
/// first (socat's backlog of 5) leaves the others a less loaded server. The client's
/// own time between a reply and its next request counts as idle, so even with every
/// client connected this is below the count: measured 0.57-0.65 of 50 on the direct and
/// kernel paths, 0.13 through socat.
pub(super) fn redis_latency(
    lab: &Lab,
    to: SocketAddr,
    clients: u32,
    requests: u32,
) -> anyhow::Result<(Measured, Measured)> {
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
    let (Some(&rps), Some(&avg), Some(&p50), Some(&p99)) = (f.get(1), f.get(2), f.get(4), f.get(6))
    else {
        bail!("redis-benchmark row not understood: {row}");
    };
    if ![rps, avg, p50, p99].iter().all(|v| v.is_finite()) {
        bail!("redis-benchmark row not understood: {row}");
    }
    let busy = rps * avg / 1000.0;
    let errors = String::from_utf8_lossy(&out.stderr);
    let invalid = if !errors.trim().is_empty() {
        Some(format!("redis-benchmark: {}", errors.trim()))
    } else if busy < 0.3 * f64::from(clients) {
        Some(format!(
            "{busy:.1} of {clients} clients busy on average ({rps:.0} requests/s x {avg:.3} ms)"
        ))
    } else {
        None
    };
    Ok((
        Measured::unless(p50, invalid.clone()),
        Measured::unless(p99, invalid),
    ))
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
