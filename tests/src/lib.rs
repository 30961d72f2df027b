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

/// A dnsmasq on loopback answering `x.example` with 10.1.2.3 (nothing else: no
/// upstream, no hosts file), killed on drop, also when the test fails.
pub struct Dnsmasq {
    child: std::process::Child,
    _dir: TempDir,
}

impl Dnsmasq {
    /// Listening on `addr` (a loopback address and port of the test's own).
    pub fn start(addr: std::net::SocketAddr) -> anyhow::Result<Dnsmasq> {
        let dir = TempDir::new(&format!("dnsmasq-{}", addr.port()))?;
        let child = std::process::Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--address=/x.example/10.1.2.3",
                "--user=root",
            ])
            .arg(format!("--listen-address={}", addr.ip()))
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("dnsmasq (Debian package dnsmasq-base; `cargo xtask setup` installs it)")?;
        Ok(Dnsmasq { child, _dir: dir })
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
