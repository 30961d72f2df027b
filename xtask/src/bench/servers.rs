//! The servers and the other ways to them: the tiny HTTP server (redis-server is
//! `lhb_tests::redis::Redis`), PostgreSQL, socat and a plain tokio proxy. Each is stopped on drop.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lhb_tests::{KillOnDrop, Lab, wait_until};

use super::*;

pub(super) fn socat(gw: std::net::IpAddr, port: u16, target: u16) -> anyhow::Result<KillOnDrop> {
    Ok(KillOnDrop(
        Command::new("socat")
            .arg(format!("TCP-LISTEN:{port},bind={gw},fork,reuseaddr"))
            .arg(format!("TCP:127.0.0.1:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("socat (installed by `cargo xtask setup`)")?,
    ))
}

/// HAProxy in `mode tcp` with `option splice-auto`, one `listen` section per
/// (gateway port, loopback target), run in the foreground from a config of its own;
/// stopped and its config removed on drop.
pub(super) struct Haproxy {
    proc: KillOnDrop,
    dir: std::path::PathBuf,
}

impl Haproxy {
    pub(super) fn start(listen: &[(SocketAddr, SocketAddr)]) -> anyhow::Result<Haproxy> {
        let dir = std::env::temp_dir().join(format!("lhb-bench-haproxy-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        // Two threads: the same cores lhb's proxy runtime has. maxconn well above what
        // any workload opens, so no connection waits in HAProxy's own queue, and below
        // what the fd limit allows (HAProxy refuses to start otherwise).
        let mut cfg = String::from(
            "global\n  nbthread 2\n  maxconn 4096\n\n\
             defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\n",
        );
        for (i, (from, to)) in listen.iter().enumerate() {
            cfg.push_str(&format!(
                "\nlisten l{i}\n  bind {from}\n  server s{i} {to}\n"
            ));
        }
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, cfg)?;
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .context("haproxy (installed by `cargo xtask setup`)")?;
        if !check.status.success() {
            bail!(
                "haproxy rejects the bench's config: {}",
                String::from_utf8_lossy(&check.stderr).trim()
            );
        }
        let log = dir.join("haproxy.log");
        // -db: foreground, no fork, so killing the child stops it.
        let mut proc = KillOnDrop(
            Command::new("haproxy")
                .arg("-db")
                .arg("-f")
                .arg(&file)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .context("haproxy (installed by `cargo xtask setup`)")?,
        );
        let first = listen.first().map(|l| l.0);
        let up = wait_until(Duration::from_secs(5), || {
            matches!(proc.0.try_wait(), Ok(None))
                && first.is_none_or(|a| TcpStream::connect(a).is_ok())
        });
        if up.is_none() {
            bail!(
                "haproxy did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        Ok(Haproxy { proc, dir })
    }

    pub(super) fn pid(&self) -> u32 {
        self.proc.0.id()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The plain tokio proxy: accept, connect, `copy_bidirectional`.
pub(super) fn tokio_proxy(listen: Vec<(SocketAddr, SocketAddr)>) -> anyhow::Result<()> {
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

/// Accept-read-answer-close on a few threads: a short request/response exchange.
pub(super) struct TinyServer {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl TinyServer {
    pub(super) fn start(bind: SocketAddr) -> anyhow::Result<TinyServer> {
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

/// A throwaway PostgreSQL cluster on 127.0.0.1 and the gateway, `bench` initialised
/// with pgbench; removed on drop.
pub(super) struct Postgres {
    proc: Option<Child>,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
}

impl Postgres {
    pub(super) fn start(gw: std::net::IpAddr, port: u16) -> anyhow::Result<Postgres> {
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
    /// Select-only transactions per second with 8 clients; invalid if a transaction
    /// failed or fewer clients ran.
    pub(super) fn tps(&self, lab: &Lab, to: SocketAddr, secs: u32) -> anyhow::Result<Measured> {
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
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let tps = field("tps = ").with_context(|| {
            format!(
                "pgbench to {to}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let clients = field("number of clients: ");
        let failed = field("number of failed transactions: ").unwrap_or(0.0);
        let invalid = if clients != Some(8.0) {
            Some(format!("{clients:?} of 8 clients ran"))
        } else if failed > 0.0 || !out.status.success() {
            Some(format!(
                "{failed} failed transaction(s): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        } else {
            None
        };
        Ok(Measured::unless(tps, invalid))
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

/// Served from the container at `to` (an HTTP exchange with the tiny server).
pub(super) fn served(lab: &Lab, to: SocketAddr) -> bool {
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
