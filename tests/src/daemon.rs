//! The `lhb` under test: a running daemon with sockets and pins of its own, and
//! one-shot commands.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::*;

/// The `lhb` binary under test: `$LHB_BIN`, else target/debug/lhb of this workspace.
pub fn lhb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LHB_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/lhb");
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// A running `lhb run`, stopped with SIGTERM on drop.
pub struct Lhb {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Set: the log reader stops at the next line and closes its end of the pipe.
    deaf: Arc<std::sync::atomic::AtomicBool>,
    // Dropped after the child is stopped (Drop below runs first).
    private: Private,
}

impl Lhb {
    /// Starts `lhb run ARGS` and waits until it says it is ready.
    pub fn start(args: &[&str]) -> anyhow::Result<Lhb> {
        Self::start_bin(&lhb_bin(), args)
    }

    /// Starts `BIN run ARGS` (e.g. a release build) and waits until it is ready.
    pub fn start_bin(bin: &std::path::Path, args: &[&str]) -> anyhow::Result<Lhb> {
        Self::start_wrapped(&[], bin, args)
    }

    /// Like `start_bin`, run through `wrapper` (e.g. `setpriv ... --`).
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<Lhb> {
        Self::start_full(wrapper, bin, args, &[])
    }

    /// `lhb run ARGS` with extra environment variables (NOTIFY_SOCKET, ...).
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Lhb> {
        Self::start_full(&[], &lhb_bin(), args, env)
    }

    /// Starts the daemon without waiting for it to be ready.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Lhb> {
        Self::spawn_full(&[], &lhb_bin(), args, env).map(|(l, _)| l)
    }

    pub(crate) fn start_full(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Lhb> {
        let (mut lhb, rx) = Self::spawn_full(wrapper, bin, args, env)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(lhb);
            }
            if let Some(status) = lhb.child.try_wait()? {
                thread::sleep(Duration::from_millis(50));
                bail!("lhb exited with {status} before ready:\n{}", lhb.log());
            }
            if Instant::now() > deadline {
                bail!("lhb not ready after 20 s:\n{}", lhb.log());
            }
        }
    }

    fn spawn_full(
        wrapper: &[&str],
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<(Lhb, mpsc::Receiver<()>)> {
        let private = Private::new(args)?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .arg("run")
            .args(no_host_config(args))
            .args(private.args())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let deaf = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (l, d) = (log.clone(), deaf.clone());
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if d.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if line.contains("ready:") {
                    let _ = tx.send(());
                }
                if let Ok(mut v) = l.lock() {
                    v.push(line);
                }
            }
        });
        Ok((
            Lhb {
                child,
                log,
                deaf,
                private,
            },
            rx,
        ))
    }

    /// SIGKILL: a crash, nothing cleaned up by lhb itself.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The control socket this daemon listens on.
    pub fn control(&self) -> String {
        self.private.control.display().to_string()
    }

    /// Its pin directory (bpffs).
    pub fn pin_dir(&self) -> PathBuf {
        self.private.pins.clone()
    }

    /// Its metrics socket (the default: beside the control socket).
    pub fn metrics_socket(&self) -> PathBuf {
        // lhb's rule (control::default_metrics_socket): metrics.sock beside lhb.sock,
        // NAME-metrics.sock beside NAME.sock.
        let c = &self.private.control;
        match c.file_stem().and_then(|s| s.to_str()) {
            Some("lhb") | None => c.with_file_name("metrics.sock"),
            Some(stem) => c.with_file_name(format!("{stem}-metrics.sock")),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|v| v.join("\n")).unwrap_or_default()
    }

    /// From the next log line on, nobody reads the daemon's stderr: its pipe's read end
    /// is closed, as when a log reader goes away.
    pub fn deafen(&self) {
        self.deaf.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `lhb status --json` of this daemon.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (ok, json, err) = lhb_check(&["status", "--json", "--control", &self.control()])?;
        anyhow::ensure!(ok, "lhb status: {err}");
        Ok(serde_json::from_str(&json)?)
    }

    /// Its metrics (the body of `GET /metrics` on its metrics socket).
    pub fn metrics(&self) -> anyhow::Result<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(self.metrics_socket())?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lhb\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }

    /// `rules[rule].clients`' entry for `address` in `lhb status --json`.
    pub fn client(&self, rule: usize, address: &str) -> anyhow::Result<Option<serde_json::Value>> {
        let st = self.status()?;
        Ok(st["rules"][rule]["clients"]
            .as_array()
            .and_then(|cl| cl.iter().find(|c| c["address"] == address).cloned()))
    }

    /// SIGTERM, then the exit status (SIGKILL after 10 s).
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("lhb ignored SIGTERM for 10 s:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lhb {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
    }
}

/// A directory of one test daemon's own (control and metrics sockets), so parallel
/// daemons never meet; removed with it.
pub struct Private {
    dir: PathBuf,
    control: PathBuf,
    given: bool,
    /// bpffs directory for the daemon's pinned links (--pin-dir).
    pins: PathBuf,
    pins_given: bool,
}

impl Private {
    fn new(args: &[&str]) -> anyhow::Result<Private> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let given = args.iter().position(|a| *a == "--control");
        let control = match given {
            Some(i) => PathBuf::from(args.get(i + 1).copied().unwrap_or_default()),
            None => dir.join("lhb.sock"),
        };
        let pins_at = args.iter().position(|a| *a == "--pin-dir");
        let pins = match pins_at {
            Some(i) => PathBuf::from(args.get(i + 1).copied().unwrap_or_default()),
            None => PathBuf::from(format!("/sys/fs/bpf/{PREFIX}-{}-{n}", std::process::id())),
        };
        Ok(Private {
            dir,
            control,
            given: given.is_some(),
            pins,
            pins_given: pins_at.is_some(),
        })
    }

    fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if !self.given {
            a.extend(["--control".into(), self.control.display().to_string()]);
        }
        if !self.pins_given {
            a.extend(["--pin-dir".into(), self.pins.display().to_string()]);
        }
        a
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        // Pins a crashed or --keep-on-exit daemon left: removing them detaches.
        if !self.pins_given {
            let _ = std::fs::remove_dir_all(&self.pins);
        }
    }
}

/// `--config /dev/null` unless the test gives a config: the host's /etc/lhb/lhb.toml
/// must not leak into a test.
fn no_host_config(args: &[&str]) -> Vec<&'static str> {
    if args.contains(&"--config") {
        vec![]
    } else {
        vec!["--config", "/dev/null"]
    }
}

/// Runs `lhb ARGS` to completion: (exit status, stderr).
pub fn lhb_once(args: &[&str], wrapper: &[&str]) -> anyhow::Result<(ExitStatus, String)> {
    let mut cmd = if wrapper.is_empty() {
        Command::new(lhb_bin())
    } else {
        let mut c = Command::new(wrapper[0]);
        c.args(&wrapper[1..]).arg(lhb_bin());
        c
    };
    let private = Private::new(args)?;
    if args.first() == Some(&"run") {
        cmd.arg("run")
            .args(no_host_config(args))
            .args(private.args())
            .args(&args[1..]);
    } else {
        cmd.args(args);
    }
    // A run that was meant to fail but started serves until killed: end it after 30 s
    // so the test fails on its assertion instead of hanging the suite.
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = child.stderr.take().context("no stderr")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait()?;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap_or_default();
    Ok((status, stderr))
}

/// Runs a one-shot command (`lhb verify ...`, `lhb status ...`): (success, stdout,
/// stderr). A check's rules never come from the host's config file.
pub fn lhb_check(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let checks = matches!(args.first(), Some(&"verify") | Some(&"doctor"));
    let out = Command::new(lhb_bin())
        .args(args)
        .args(if checks { no_host_config(args) } else { vec![] })
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
