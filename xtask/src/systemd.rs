//! `cargo xtask test-systemd`: lhb's generated unit under a real systemd as PID 1.
//!
//! PID 1 of this machine kind is not systemd, so a Debian 12 root filesystem (built once
//! with mmdebstrap, cached in ~/.cache/lhb/systemd) boots systemd 252 in a container
//! started with runc directly (../shared/docs/SYSTEMD.md has the measured recipe; Docker
//! 20.10 cannot grant CAP_BPF). Bridges, namespaces and firewall rules live in the
//! container's own network namespace: nothing touches the host's.
//!
//! lhb is installed the way the README says: the package from `cargo xtask dist`
//! (`apt install ./lhb_*.deb`), the config edited, `lhb plan`, `systemctl enable --now
//! lhb`, `lhb status`, `lhb verify`. Checked: the package enabled but not started, its
//! unit exactly what `lhb unit print` writes for /usr/sbin/lhb, the conffile, the
//! completions and man pages, the shipped config starting a daemon that waits for
//! rules; readiness and STATUS=, both data paths serving, the `systemd-analyze
//! security` exposure, a firewall drop healed with the unit's syscall filter on the
//! firewall tools, `--persist` refused read-only without `unit install --persist` and
//! working with it (mode kept), a bad reload failing `systemctl reload` and shown by
//! `systemctl status`, kill -9 restarted by systemd with no connection lost, 50 stops
//! leaving no rule and no pin behind, the watchdog restarting a daemon that stopped
//! answering, a rule for a bridge that appears 10 s after start waiting, then served;
//! `apt remove` leaving nothing behind and `apt purge` removing the config.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

const PACKAGES: &[&str] = &["runc", "mmdebstrap"];
/// Bump when INCLUDE changes: the cached root filesystem is rebuilt.
const ROOTFS_VERSION: u32 = 1;
const INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2,procps,nftables,iptables,python3";
const NAME: &str = "lhbt-systemd";
/// The exposure `systemd-analyze security` gives the unit (2.6 measured with systemd 252).
const MAX_EXPOSURE: f64 = 2.6;

pub fn run() -> anyhow::Result<()> {
    crate::setup::ensure_packages(PACKAGES)?;
    let deb = crate::dist::run(false)?.deb;
    let rootfs = ensure_rootfs()?;
    let started = Instant::now();
    let c = Container::boot(&rootfs, &deb)?;
    println!(
        "test-systemd: systemd {} is running as PID 1 ({:.1} s)",
        c.sh("systemctl --version | head -1 | cut -d' ' -f2")?
            .trim(),
        started.elapsed().as_secs_f64()
    );
    let name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .context("the package's file name")?;
    scenario(&c, name)?;
    println!(
        "test-systemd: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn scenario(c: &Container, deb: &str) -> anyhow::Result<()> {
    // A bridge with both address families, a container namespace on it, and a service
    // on 127.0.0.1:8080 and 8081.
    c.sh("ip link add br0 address 02:00:00:00:00:01 type bridge \
          && ip addr add 10.99.0.1/24 dev br0 && ip addr add fd00:99::1/64 dev br0 nodad \
          && ip link set br0 up && ip netns add c \
          && ip link add cv type veth peer name eth0 netns c && ip link set cv master br0 up \
          && ip -n c addr add 10.99.0.2/24 dev eth0 && ip -n c addr add fd00:99::2/64 dev eth0 nodad \
          && ip -n c link set eth0 up && ip -n c link set lo up \
          && ip -n c route add default via 10.99.0.1 \
          && mkdir -p /srv/www && echo served > /srv/www/index.html \
          && for p in 8080 8081; do setsid -f python3 -m http.server $p --bind 127.0.0.1 \
             --directory /srv/www >/dev/null 2>&1; done")?;
    install(c, deb)?;

    readme_steps(c)?;
    hardened_and_healing(c)?;
    persist(c)?;
    bad_reload(c)?;
    kills_and_stops(c)?;
    watchdog(c)?;
    late_bridge(c)?;
    remove(c)
}

/// The README's steps after the install: a rule, the plan, enable --now, status, verify.
fn readme_steps(c: &Container) -> anyhow::Result<()> {
    c.sh("printf '[[expose]]\\ninterface = \"br0\"\\nport = 8080\\n' > /etc/lhb/lhb.toml")?;
    let plan = c.sh("lhb plan")?;
    ensure!(
        plan.contains("attach the ingress program to br0")
            && plan.contains("bind a proxy listener to [fd00:99::1]:8080 on br0"),
        "lhb plan: {plan}"
    );
    c.sh("systemctl enable --now lhb")?;
    ensure!(c.active()?, "lhb is not active");
    let status = c.sh("systemctl show lhb -p StatusText --value")?;
    ensure!(
        status.trim() == "serving 1 of 1 rule(s)",
        "STATUS= {status:?}"
    );
    ok("Type=notify: active once serving, STATUS=serving 1 of 1 rule(s)");
    for url in ["http://10.99.0.1:8080/", "http://[fd00:99::1]:8080/"] {
        ensure!(c.get(url)?, "{url} not served:\n{}", c.journal()?);
    }
    ok("served through the IPv4 gateway (kernel path) and the IPv6 one (proxy)");
    let st = c.sh("lhb status")?;
    ensure!(st.contains("br0"), "lhb status: {st}");
    let (verified, out) = c.sh_status("lhb verify 2>&1")?;
    ensure!(verified, "lhb verify failed:\n{out}");
    ok("the README's steps: lhb plan said what run did; lhb status and lhb verify pass");
    Ok(())
}

/// The unit's exposure score, and a firewall drop added while running healed.
fn hardened_and_healing(c: &Container) -> anyhow::Result<()> {
    let sec = c.sh("systemd-analyze security lhb | tail -1")?;
    let exposure: f64 = sec
        .split("lhb.service: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no exposure in {sec:?}"))?;
    ensure!(exposure <= MAX_EXPOSURE, "exposure {exposure}: {sec}");
    ok(&format!("systemd-analyze security: exposure {exposure}"));

    c.sh("iptables -I INPUT -i br0 -j DROP")?;
    let healed = c.wait(Duration::from_secs(3), || c.get("http://10.99.0.1:8080/"))?;
    ensure!(
        healed,
        "not served through an INPUT drop:\n{}",
        c.journal()?
    );
    ok("a firewall drop added while running is healed (iptables under the syscall filter)");
    Ok(())
}

/// `lhb expose --persist`: refused on a read-only config with the fix named, then written.
fn persist(c: &Container) -> anyhow::Result<()> {
    let mode = c.sh("stat -c %a /etc/lhb/lhb.toml")?;
    let refused = c.sh_status("lhb expose --iface br0:8081 --persist 2>&1")?;
    ensure!(
        !refused.0 && refused.1.contains("lhb unit install --persist"),
        "--persist with a read-only config: {}",
        refused.1
    );
    c.sh(
        "lhb unit install --config /etc/lhb/lhb.toml --persist && systemctl daemon-reload \
          && systemctl restart lhb",
    )?;
    c.sh("lhb expose --iface br0:8081 --persist")?;
    let cfg = c.sh("cat /etc/lhb/lhb.toml; stat -c %a /etc/lhb/lhb.toml; ls -a /etc/lhb")?;
    ensure!(
        cfg.contains("port = 8081")
            && cfg.contains(&format!("\n{mode}"))
            && !cfg.contains("lhb-tmp"),
        "after --persist (mode {mode} before): {cfg}"
    );
    ensure!(c.get("http://10.99.0.1:8081/")?, "8081 not served");
    ok(
        "--persist: refused read-only with the fix named; with `unit install --persist` written, mode kept",
    );
    Ok(())
}

/// A bad file: `systemctl reload` fails and `systemctl status` says why; a good one
/// clears it.
fn bad_reload(c: &Container) -> anyhow::Result<()> {
    c.sh("cp /etc/lhb/lhb.toml /tmp/good.toml && echo 'port = 1' >> /etc/lhb/lhb.toml")?;
    let (reloaded, out) = c.sh_status("systemctl reload lhb 2>&1")?;
    ensure!(
        !reloaded,
        "systemctl reload succeeded on a bad config: {out}"
    );
    let st = c.sh("systemctl status lhb --no-pager -l || true")?;
    ensure!(
        st.contains("config reload FAILED"),
        "systemctl status: {st}"
    );
    ensure!(
        c.get("http://10.99.0.1:8081/")?,
        "the running rules were not kept"
    );
    c.sh("cp /tmp/good.toml /etc/lhb/lhb.toml && systemctl reload lhb")?;
    let status = c.sh("systemctl show lhb -p StatusText --value")?;
    ensure!(
        status.trim() == "serving 2 of 2 rule(s)",
        "STATUS= {status:?}"
    );
    ok(
        "a bad config makes `systemctl reload` fail and shows in `systemctl status`; a good one clears it",
    );
    Ok(())
}

/// kill -9 (systemd restarts lhb, the pinned links serve throughout), then 50 stops
/// that must leave nothing behind.
fn kills_and_stops(c: &Container) -> anyhow::Result<()> {
    let pid = c.sh("systemctl show lhb -p MainPID --value")?;
    let poll = "for i in $(seq 1 40); do \
                ip netns exec c python3 -c \"import urllib.request as u; u.urlopen('http://10.99.0.1:8080/', timeout=2)\" \
                || echo FAIL; sleep 0.05; done";
    let (_, out) = c.sh_status(&format!("({poll}) & kill -9 {}; wait", pid.trim()))?;
    ensure!(
        !out.contains("FAIL"),
        "connections failed across kill -9: {out}"
    );
    let back = c.wait(Duration::from_secs(10), || {
        Ok(c.sh("systemctl show lhb -p MainPID --value")?.trim() != pid.trim() && c.active()?)
    })?;
    ensure!(back, "not restarted after kill -9:\n{}", c.journal()?);
    ok("kill -9: restarted by systemd, no connection failed meanwhile");

    for i in 0..50 {
        c.sh("systemctl stop lhb")?;
        let left = c.sh(
            "iptables -S INPUT | grep -c 'lhb ' || true; ls /sys/fs/bpf/lhb 2>/dev/null | wc -l",
        )?;
        ensure!(
            left.split_whitespace().all(|n| n == "0"),
            "stop {i}: left behind (rules, pins): {left}"
        );
        // 50 starts in a few seconds are far over systemd's start rate limit (5 in 10 s,
        // which a crash loop should hit): the counter is reset, as an administrator
        // would after a burst of manual restarts.
        c.sh("systemctl reset-failed lhb && systemctl start lhb")?;
    }
    ok("50 stops: no firewall rule and no pin left after any of them");
    Ok(())
}

/// The watchdog: a daemon that stops answering (SIGSTOP) is killed and restarted.
fn watchdog(c: &Container) -> anyhow::Result<()> {
    // A drop-in shortens WatchdogSec so the check takes seconds, not 30.
    c.sh("mkdir -p /etc/systemd/system/lhb.service.d \
          && printf '[Service]\nWatchdogSec=2\n' > /etc/systemd/system/lhb.service.d/watchdog.conf \
          && systemctl daemon-reload && systemctl restart lhb")?;
    let pid = c.sh("systemctl show lhb -p MainPID --value")?;
    c.sh(&format!("kill -STOP {}", pid.trim()))?;
    let restarted = c.wait(Duration::from_secs(10), || {
        Ok(c.sh("systemctl show lhb -p MainPID --value")?.trim() != pid.trim() && c.active()?)
    })?;
    ensure!(
        restarted,
        "a stopped daemon was not restarted by the watchdog:\n{}",
        c.journal()?
    );
    let log = c.sh("journalctl -u lhb --no-pager | grep -i watchdog || true")?;
    ensure!(
        log.contains("atchdog timeout"),
        "no watchdog timeout in the journal: {log}"
    );
    c.sh("rm -r /etc/systemd/system/lhb.service.d && systemctl daemon-reload && systemctl restart lhb")?;
    ensure!(
        c.get("http://10.99.0.1:8080/")?,
        "not served after the watchdog restart"
    );
    ok("the watchdog: a daemon stopped with SIGSTOP is killed and restarted by systemd");
    Ok(())
}

/// A rule for a bridge that comes up later (libvirt's virbr0 after boot): the unit
/// starts, the rule waits, and it is served when the bridge appears.
fn late_bridge(c: &Container) -> anyhow::Result<()> {
    c.sh("systemctl stop lhb && printf '[[expose]]\ninterface = \"br1\"\nport = 8080\n' >> /etc/lhb/lhb.toml \
          && systemctl start lhb")?;
    ensure!(c.active()?, "lhb did not start");
    let status = c.sh("systemctl show lhb -p StatusText --value")?;
    ensure!(
        status.trim() == "serving 2 of 3 rule(s)",
        "STATUS= {status:?}"
    );
    std::thread::sleep(Duration::from_secs(10));
    c.sh(
        "ip link add br1 address 02:00:00:00:00:02 type bridge && ip addr add 10.98.0.1/24 dev br1 \
          && ip link set br1 up && ip netns add c1 \
          && ip link add c1v type veth peer name eth0 netns c1 && ip link set c1v master br1 up \
          && ip -n c1 addr add 10.98.0.2/24 dev eth0 && ip -n c1 link set eth0 up",
    )?;
    let get1 = "ip netns exec c1 python3 -c \"import urllib.request as u; print(u.urlopen('http://10.98.0.1:8080/', timeout=2).read().decode())\"";
    let served = c.wait(Duration::from_secs(3), || {
        Ok(c.sh_status(get1)?.1.contains("served"))
    })?;
    ensure!(
        served,
        "br1 not served after it appeared:\n{}",
        c.journal()?
    );
    let status = c.sh("systemctl show lhb -p StatusText --value")?;
    ensure!(
        status.trim() == "serving 3 of 3 rule(s)",
        "STATUS= {status:?}"
    );
    ok("a rule for a bridge that appears 10 s after start waits, then serves");
    Ok(())
}

/// `apt install ./lhb_*.deb` as the README says, and what the package must hold and do:
/// enabled but not started, the unit `lhb unit print` writes for /usr/sbin/lhb, the
/// config a conffile with no rule (a start with it waits for rules, it does not fail),
/// completions and man pages.
fn install(c: &Container, deb: &str) -> anyhow::Result<()> {
    c.sh(&format!(
        "cd /root && apt install -y ./{deb} >/dev/null 2>&1 || apt install -y ./{deb}"
    ))?;
    let state = c.sh("systemctl is-enabled lhb; systemctl is-active lhb || true")?;
    ensure!(
        state.split_whitespace().collect::<Vec<_>>() == ["enabled", "inactive"],
        "after install: {state}"
    );
    let shipped = c.sh("cat /lib/systemd/system/lhb.service")?;
    let printed = c.sh("lhb unit print --exe /usr/sbin/lhb --config /etc/lhb/lhb.toml")?;
    ensure!(
        shipped == printed,
        "the packaged unit is not what `lhb unit print` writes:\n{shipped}\n---\n{printed}"
    );
    let files = c.sh(
        "dpkg-query -W -f='${Conffiles}\\n' lhb; \
         for f in /usr/share/bash-completion/completions/lhb /usr/share/zsh/vendor-completions/_lhb \
           /usr/share/fish/vendor_completions.d/lhb.fish /usr/share/man/man8/lhb.8.gz \
           /usr/share/man/man8/lhb-run.8.gz /usr/share/man/man8/lhb-plan.8.gz \
           /usr/share/doc/lhb/copyright; do test -s $f || echo MISSING $f; done; \
         zcat /usr/share/man/man8/lhb-plan.8.gz | grep -m1 TH",
    )?;
    ensure!(
        files.contains("/etc/lhb/lhb.toml") && !files.contains("MISSING") && files.contains(".TH"),
        "package contents: {files}"
    );
    c.sh("systemctl start lhb")?;
    ensure!(
        c.active()?,
        "lhb with the shipped config did not start:\n{}",
        c.journal()?
    );
    let status = c.sh("systemctl show lhb -p StatusText --value")?;
    ensure!(status.starts_with("no rule yet"), "STATUS= {status:?}");
    c.sh("systemctl stop lhb")?;
    ok(
        "apt install ./lhb_*.deb: enabled, not started; the unit is `lhb unit print`'s; the shipped config starts a daemon that waits for rules",
    );
    Ok(())
}

/// `apt remove` stops the daemon, which leaves nothing behind; `apt purge` removes the
/// config.
fn remove(c: &Container) -> anyhow::Result<()> {
    c.sh("apt remove -y lhb >/dev/null 2>&1")?;
    let left = c.sh(
        "systemctl is-active lhb || true; iptables -S INPUT | grep -c 'lhb ' || true; \
         ls /sys/fs/bpf/lhb 2>/dev/null | wc -l; test -e /usr/sbin/lhb && echo BINARY || true",
    )?;
    ensure!(
        left.split_whitespace().collect::<Vec<_>>() == ["inactive", "0", "0"],
        "after apt remove (active?, rules, pins, binary): {left}"
    );
    c.sh("apt purge -y lhb >/dev/null 2>&1")?;
    let cfg = c.sh("test -e /etc/lhb/lhb.toml && echo CONFIG || true")?;
    ensure!(cfg.trim().is_empty(), "after apt purge: {cfg}");
    ok("apt remove stops lhb and leaves no rule, pin or binary; apt purge removes the config");
    Ok(())
}

fn ok(what: &str) {
    println!("test-systemd: OK  {what}");
}

/// The Debian 12 root filesystem, built once.
fn ensure_rootfs() -> anyhow::Result<PathBuf> {
    let dir = crate::setup::cache_dir().join("systemd");
    let tar = dir.join(format!("rootfs-v{ROOTFS_VERSION}.tar"));
    if tar.exists() {
        return Ok(tar);
    }
    std::fs::create_dir_all(&dir)?;
    let mirror = apt_mirror();
    println!(
        "test-systemd: building a Debian 12 root filesystem from {mirror} (about a minute, once)"
    );
    // The name ends in .tar: mmdebstrap picks its output format from it.
    let partial = dir.join("partial-rootfs.tar");
    let s = Command::new("mmdebstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}")])
        .arg(
            "--customize-hook=chroot \"$1\" systemctl mask getty@tty1.service \
             console-getty.service systemd-udevd.service systemd-udevd-control.socket \
             systemd-udevd-kernel.socket",
        )
        .args(["bookworm"])
        .arg(&partial)
        .arg(format!("deb {mirror} bookworm main"))
        .stdout(Stdio::null())
        .status()
        .context("running mmdebstrap")?;
    if !s.success() {
        bail!("mmdebstrap failed ({s})");
    }
    std::fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// The Debian mirror this machine's apt uses (deb822 or one-line sources).
pub(crate) fn apt_mirror() -> String {
    let files = [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ];
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for l in text.lines() {
            let l = l.trim();
            if let Some(u) = l.strip_prefix("URIs:")
                && let Some(u) = u.split_whitespace().find(|u| !u.contains("security"))
            {
                return u.to_string();
            }
            if let Some(rest) = l.strip_prefix("deb ")
                && let Some(u) = rest.split_whitespace().find(|w| w.starts_with("http"))
                && !u.contains("security")
            {
                return u.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// A runc container booted into systemd; killed and removed on drop.
struct Container {
    bundle: PathBuf,
}

impl Container {
    fn boot(rootfs: &Path, deb: &Path) -> anyhow::Result<Container> {
        let _ = Command::new("runc").args(["delete", "-f", NAME]).output();
        let bundle = std::env::temp_dir().join(format!("{NAME}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&bundle);
        let root = bundle.join("rootfs");
        std::fs::create_dir_all(&root)?;
        // Owned from here: a failure below still removes the bundle.
        let c = Container { bundle };
        let s = Command::new("tar")
            .arg("-xf")
            .arg(rootfs)
            .arg("-C")
            .arg(&root)
            .status()?;
        ensure!(s.success(), "unpacking {}", rootfs.display());
        let name = deb.file_name().context("the package has a file name")?;
        std::fs::copy(deb, root.join("root").join(name))
            .with_context(|| format!("copying {}", deb.display()))?;
        std::fs::write(
            c.bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec()?)?,
        )?;
        let s = Command::new("runc")
            .args(["run", "-d", "--bundle"])
            .arg(&c.bundle)
            .arg(NAME)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running runc")?;
        ensure!(s.success(), "runc run failed ({s})");
        let up = c.wait(Duration::from_secs(30), || {
            Ok(matches!(
                c.sh_status("systemctl is-system-running")?.1.trim(),
                "running" | "degraded"
            ))
        })?;
        ensure!(
            up,
            "systemd did not reach running: {}",
            c.sh_status("systemctl --failed")?.1
        );
        Ok(c)
    }

    /// Runs a shell script inside: (success, stdout and stderr).
    fn sh_status(&self, script: &str) -> anyhow::Result<(bool, String)> {
        let out = Command::new("runc")
            .args(["exec", NAME, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .context("runc exec")?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }

    /// Runs a shell script inside; an error if it fails.
    fn sh(&self, script: &str) -> anyhow::Result<String> {
        let (ok, out) = self.sh_status(script)?;
        ensure!(ok, "in the container: {script}: {out}");
        Ok(out)
    }

    /// `systemctl is-active lhb` says active (it exits non-zero while "activating": not
    /// an error here).
    fn active(&self) -> anyhow::Result<bool> {
        Ok(self.sh_status("systemctl is-active lhb")?.1.trim() == "active")
    }

    /// An HTTP GET from the container namespace `c` succeeds.
    fn get(&self, url: &str) -> anyhow::Result<bool> {
        let py = format!(
            "ip netns exec c python3 -c \"import urllib.request as u; print(u.urlopen('{url}', timeout=3).read().decode())\""
        );
        Ok(self.sh_status(&py)?.1.contains("served"))
    }

    fn wait(
        &self,
        limit: Duration,
        mut f: impl FnMut() -> anyhow::Result<bool>,
    ) -> anyhow::Result<bool> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if f()? {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        f()
    }

    fn journal(&self) -> anyhow::Result<String> {
        Ok(self.sh_status("journalctl -u lhb --no-pager | tail -30")?.1)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGRTMIN+3: systemd's halt; then whatever is left goes with the container.
        let _ = Command::new("runc").args(["kill", NAME, "37"]).output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let state = Command::new("runc").args(["state", NAME]).output();
            if !state.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("running")) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("runc").args(["delete", "-f", NAME]).output();
        let _ = std::fs::remove_dir_all(&self.bundle);
    }
}

/// The OCI runtime spec: systemd as PID 1 with every capability this host has but
/// CAP_SYS_RESOURCE (its root lacks it), sysfs and cgroups writable, bpffs mounted, no
/// seccomp or masked paths (SYSTEMD.md).
fn spec() -> anyhow::Result<serde_json::Value> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .context("CapBnd in /proc/self/status")?;
    const CAPS: &[&str] = &[
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    let caps: Vec<String> = CAPS
        .iter()
        .enumerate()
        .filter(|(i, n)| bnd >> i & 1 == 1 && **n != "SYS_RESOURCE")
        .map(|(_, n)| format!("CAP_{n}"))
        .collect();
    Ok(serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["/sbin/init"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "container=docker"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": NAME,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "rw"]},
            {"destination": "/sys/fs/cgroup", "type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "rw"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
            {"destination": "/run/lock", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "noexec"]},
            {"destination": "/sys/fs/bpf", "type": "bpf", "source": "bpf", "options": ["rw"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": true, "access": "rwm"}]},
            "cgroupsPath": format!("/{NAME}"),
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ]
        }
    }))
}
