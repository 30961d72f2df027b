//! A real firewalld for tests, in a namespace that plays the host (so the machine's own
//! firewall is never touched), on a private D-Bus system bus of the test's own: a
//! `dbus-daemon` listening on a socket in a temporary directory, which lhb and
//! `firewall-cmd` reach through `DBUS_SYSTEM_BUS_ADDRESS`; firewalld runs with a copy
//! of /etc/firewalld as its configuration, so nothing of the machine's is changed
//! either. Everything is stopped and removed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{HostLab, PREFIX};

/// Whether the firewalld tests can run: firewalld and dbus-daemon are installed. If
/// not, this panics, unless `LHB_ALLOW_SKIP` lists `firewalld`: then it prints what is
/// not tested and returns false.
pub fn required(test: &str) -> bool {
    let have = |p: &str| std::path::Path::new(p).exists();
    if have("/usr/sbin/firewalld") && have("/usr/bin/dbus-daemon") {
        return true;
    }
    crate::skip_or_fail(
        "firewalld",
        test,
        "firewalld and dbus-daemon (`cargo xtask setup` installs them where systemd is not init)",
        "the firewalld backend was",
    )
}

pub struct Firewalld {
    dir: PathBuf,
    bus: Option<Child>,
    daemon: Option<Child>,
    host_ns: String,
    /// For `DBUS_SYSTEM_BUS_ADDRESS`.
    pub bus_address: String,
}

impl Firewalld {
    /// A bus, and firewalld running in `lab`'s host namespace, answering.
    pub fn start(lab: &HostLab) -> anyhow::Result<Firewalld> {
        let dir = std::env::temp_dir().join(format!(
            "{PREFIX}-firewalld-{}-{}",
            lab.n,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("bus");
        std::fs::write(
            dir.join("bus.conf"),
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )?;
        let bus = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", dir.join("bus.conf").display()))
            .arg("--nofork")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dbus.log"))?)
            .spawn()
            .context("starting dbus-daemon")?;
        let mut f = Firewalld {
            bus_address: format!("unix:path={}", socket.display()),
            dir,
            bus: Some(bus),
            daemon: None,
            host_ns: lab.host.name.clone(),
        };
        crate::wait_until(Duration::from_secs(5), || socket.exists())
            .context("dbus-daemon made no socket")?;
        crate::run("cp", &["-a", "/etc/firewalld", &f.conf()])?;
        f.spawn()?;
        Ok(f)
    }

    fn conf(&self) -> String {
        self.dir.join("etc").display().to_string()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("firewalld.log"))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.host_ns,
                "firewalld",
                "--nofork",
                "--nopid",
            ])
            .args(["--system-config", &self.conf()])
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting firewalld")?;
        self.daemon = Some(child);
        let up = crate::wait_until(Duration::from_secs(30), || {
            self.cmd(&["--state"]).is_ok_and(|s| s.trim() == "running")
        });
        if up.is_none() {
            bail!(
                "firewalld did not answer within 30 s:\n{}",
                std::fs::read_to_string(self.dir.join("firewalld.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `firewall-cmd ARGS` on this firewalld; its stdout.
    pub fn cmd(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("firewall-cmd")
            .args(args)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .stdin(Stdio::null())
            .output()
            .context("running firewall-cmd")?;
        if !out.status.success() {
            bail!(
                "firewall-cmd {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// firewalld stopped (SIGTERM: it removes its ruleset) and started again: its
    /// runtime configuration is lost, as on a host's `systemctl restart firewalld`.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            // SAFETY: signalling our own child (ip netns exec execs firewalld in place).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let stopped = crate::wait_until(Duration::from_secs(10), || {
                c.try_wait().ok().flatten().is_some()
            });
            if stopped.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// firewalld's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("firewalld.log")).unwrap_or_default()
    }
}

impl Drop for Firewalld {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut b) = self.bus.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
