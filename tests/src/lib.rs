//! A testbed of real network namespaces, bridges and veths, and the pieces the
//! end-to-end tests, `cargo xtask demo` and `cargo xtask bench` build on.
//!
//! Everything created here carries a name that starts with [`PREFIX`] and is removed by a
//! guard's `Drop`, so a failing test still leaves the machine clean and any leftover is
//! easy to find (`ip netns list | grep lhbt`).

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

mod daemon;
pub mod docker;
pub mod firewalld;
mod lab;
pub mod podman;
mod probes;
pub mod redis;

pub use daemon::*;
pub use lab::*;
pub use probes::*;

/// Every namespace, bridge and veth made here starts with this.
pub const PREFIX: &str = "lhbt";

/// Runs a command to completion; a failure is an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args).map(|_| ())
}

/// Best-effort removal for guards: the object may already be gone.
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A directory of a test's own (`/tmp/lhbt-NAME-PID`), removed on drop, also when the
/// test fails.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> anyhow::Result<TempDir> {
        let d = std::env::temp_dir().join(format!("{PREFIX}-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        Ok(TempDir(d))
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The verdict when what test `test` needs (`missing`, in words) is not here: false
/// (skip, saying `untested` was NOT tested) if `LHB_ALLOW_SKIP` lists `name`, else a
/// panic that says how to skip it explicitly.
pub fn skip_or_fail(name: &str, test: &str, missing: &str, untested: &str) -> bool {
    let allowed = std::env::var("LHB_ALLOW_SKIP")
        .map(|v| v.split(',').any(|s| s.trim() == name))
        .unwrap_or(false);
    if allowed {
        eprintln!("SKIPPED {test}: {missing}; {untested} NOT tested");
        return false;
    }
    panic!("{test} needs {missing}; set LHB_ALLOW_SKIP={name} to skip it explicitly");
}

/// A child process killed (and reaped) on drop, also when the test fails: every helper
/// process of the tests, the demo and the benchmarks.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A dnsmasq answering one name (and its subdomains) with 10.1.2.3, nothing else (no
/// upstream, no hosts file), killed on drop. [`Dnsmasq::start`] returns once it answers.
pub struct Dnsmasq {
    _child: KillOnDrop,
    _dir: TempDir,
}

/// How to start a [`Dnsmasq`]: [`Dnsmasq::on`], then the builder's methods.
pub struct DnsmasqBuilder<'a> {
    addr: std::net::SocketAddr,
    name: &'a str,
    netns: Option<&'a Netns>,
    log: Option<&'a std::path::Path>,
}

impl Dnsmasq {
    /// On `addr` (a loopback address and port of the test's own), answering x.example.
    pub fn start(addr: std::net::SocketAddr) -> anyhow::Result<Dnsmasq> {
        Dnsmasq::on(addr).start()
    }

    pub fn on(addr: std::net::SocketAddr) -> DnsmasqBuilder<'static> {
        DnsmasqBuilder {
            addr,
            name: "x.example",
            netns: None,
            log: None,
        }
    }
}

impl<'a> DnsmasqBuilder<'a> {
    /// The name it answers (default x.example).
    pub fn answering(self, name: &'a str) -> Self {
        DnsmasqBuilder { name, ..self }
    }

    /// Run in `ns` (a namespace playing the host) instead of this one.
    pub fn in_netns(self, ns: &'a Netns) -> Self {
        DnsmasqBuilder {
            netns: Some(ns),
            ..self
        }
    }

    /// Log every query, with the client's address, to `log`.
    pub fn log_queries(self, log: &'a std::path::Path) -> Self {
        DnsmasqBuilder {
            log: Some(log),
            ..self
        }
    }

    /// Started, and answering `ready.NAME` on its address (within 5 s).
    pub fn start(self) -> anyhow::Result<Dnsmasq> {
        let addr = self.addr;
        let dir = TempDir::new(&format!("dnsmasq-{}", addr.port()))?;
        let netns = self.netns;
        let command = |program: &str| match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, program]);
                c
            }
            None => Command::new(program),
        };
        let mut c = command("dnsmasq");
        c.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
        ])
        .arg(format!("--address=/{}/10.1.2.3", self.name))
        .arg(format!("--listen-address={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg(format!("--pid-file={}", dir.join("pid").display()));
        if let Some(log) = self.log {
            c.arg("--log-queries")
                .arg(format!("--log-facility={}", log.display()));
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("dnsmasq (Debian package dnsmasq-base; `cargo xtask setup` installs it)")?;
        let d = Dnsmasq {
            _child: KillOnDrop(child),
            _dir: dir,
        };
        // Ready when it answers (a name of its own, so a test reading the query log can
        // tell this query from the ones it makes).
        let ready = format!("ready.{}", self.name);
        let answered = wait_until(std::time::Duration::from_secs(5), || {
            command("dig")
                .args([
                    &format!("@{}", addr.ip()),
                    "-p",
                    &addr.port().to_string(),
                    &ready,
                    "+short",
                    "+time=1",
                    "+tries=1",
                ])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("10.1.2.3"))
        });
        if answered.is_none() {
            bail!("dnsmasq did not answer on {addr} within 5 s");
        }
        Ok(d)
    }
}
