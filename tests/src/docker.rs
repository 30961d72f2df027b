//! The real Docker engine for tests: networks made and removed by guards, and
//! throwaway containers from the local image `cargo xtask setup` imports.

use std::{
    net::IpAddr,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{PREFIX, run};

/// Made by `cargo xtask setup` from Debian's busybox-static (no registry needed).
/// The tag changes whenever what setup puts in the image changes.
pub const IMAGE: &str = "lhb-test-busybox:2";

/// `docker ARGS` succeeds (its output is not needed).
fn docker_ok(args: &[&str]) -> bool {
    Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A Docker engine answers.
pub fn engine_answers() -> bool {
    docker_ok(&["info", "--format", "{{.ServerVersion}}"])
}

/// The test image is present.
pub fn image_present() -> bool {
    docker_ok(&["image", "inspect", IMAGE])
}

/// Whether the Docker tests can run. If the engine does not answer, this panics, unless
/// `LHB_ALLOW_SKIP` lists `docker`: then it prints what is not tested and returns false.
pub fn required(test: &str) -> bool {
    if engine_answers() {
        assert!(
            image_present(),
            "image {IMAGE} missing: run `cargo xtask setup`"
        );
        return true;
    }
    crate::skip_or_fail(
        "docker",
        test,
        "a Docker engine, and none answers (`docker info` fails)",
        "Docker networks were",
    )
}

/// A Docker network, removed on drop.
pub struct DockerNet {
    pub name: String,
}

impl DockerNet {
    /// `name` must start with the test prefix so leftovers are found.
    pub fn create(name: &str, subnet: &str) -> anyhow::Result<DockerNet> {
        assert!(name.starts_with(PREFIX));
        docker_ok(&["network", "rm", name]);
        run("docker", &["network", "create", "--subnet", subnet, name])?;
        Ok(DockerNet {
            name: name.to_string(),
        })
    }

    pub fn bridge(&self) -> anyhow::Result<String> {
        bridge_of(&self.name)
    }

    pub fn gateway(&self) -> anyhow::Result<IpAddr> {
        gateway_of(&self.name)
    }
}

impl Drop for DockerNet {
    fn drop(&mut self) {
        docker_ok(&["network", "rm", &self.name]);
    }
}

/// The Linux bridge of a Docker network, named as Docker names it.
pub fn bridge_of(network: &str) -> anyhow::Result<String> {
    let out = run(
        "docker",
        &[
            "network",
            "inspect",
            "--format",
            "{{.Id}} {{index .Options \"com.docker.network.bridge.name\"}}",
            network,
        ],
    )?;
    let mut parts = out.split_whitespace();
    let id = parts.next().context("no network id")?;
    Ok(match parts.next() {
        Some(name) if !name.is_empty() && name != "<no" => name.to_string(),
        _ => format!("br-{}", &id[..12]),
    })
}

/// The IPv4 gateway of a Docker network.
pub fn gateway_of(network: &str) -> anyhow::Result<IpAddr> {
    let out = run(
        "docker",
        &[
            "network",
            "inspect",
            "--format",
            "{{range .IPAM.Config}}{{.Gateway}} {{end}}",
            network,
        ],
    )?;
    if let Some(gw) = out
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .find(IpAddr::is_ipv4)
    {
        return Ok(gw);
    }
    // Older engines leave a gateway Docker chose out of IPAM: read it off the bridge.
    let bridge = bridge_of(network)?;
    let addrs = run("ip", &["-4", "-o", "addr", "show", "dev", &bridge])?;
    addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("network {network} (bridge {bridge}) has no IPv4 gateway"))
}

/// `docker run --rm --network NETWORK [EXTRA...] IMAGE CMD...`, to completion.
pub fn run_in(network: &str, extra: &[&str], cmd: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", network])
        .args(extra)
        .arg(IMAGE)
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .context("docker run")?;
    Ok(out)
}

/// An HTTP GET from a fresh container on `network`: the body, or why it failed.
pub fn wget_from(network: &str, url: &str, extra: &[&str]) -> anyhow::Result<String> {
    // No -T: this busybox build crashes with it; refusals return at once anyway.
    let out = run_in(network, extra, &["wget", "-q", "-O", "-", url])?;
    if !out.status.success() {
        bail!(
            "wget {url} from a container on {network} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A throwaway Docker engine of the test's own: its own socket, data root, exec root
/// and pid file, `--iptables=false --ip6tables=false`, an empty config file, and a
/// default bridge of its own (`--bridge=lhbt-eN`, 10.231.N.1/24), so it never touches the
/// machine's engine, firewall or docker0: `--bridge=none` would make it delete the
/// machine's docker0 at start, as dockerd removes the default bridge it is told not to
/// use. It can be killed with -9 and started again on the same state, as a host's engine
/// restarts.
pub struct Engine {
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// Its default bridge, made by the test.
    default_bridge: crate::HostLink,
    /// `unix://...`, for DOCKER_HOST.
    pub host: String,
    /// Bridges its networks made, removed on drop if the engine left them.
    bridges: std::sync::Mutex<Vec<String>>,
}

impl Engine {
    /// An engine numbered `n` (its default bridge is `lhbt-eN`, 10.231.N.1/24).
    pub fn start(name: &str, n: u8) -> anyhow::Result<Engine> {
        let dir =
            std::env::temp_dir().join(format!("{PREFIX}-engine-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("daemon.json"), "{}")?;
        let default_bridge =
            crate::bridge(&format!("{PREFIX}-e{n}"), &[&format!("10.231.{n}.1/24")])?;
        let mut e = Engine {
            host: format!("unix://{}", dir.join("docker.sock").display()),
            dir,
            child: None,
            default_bridge,
            bridges: Default::default(),
        };
        e.spawn()?;
        Ok(e)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let child = Command::new("dockerd")
            .args(["--config-file", &d("daemon.json")])
            .args(["--host", &self.host])
            .args(["--data-root", &d("root"), "--exec-root", &d("exec")])
            .args(["--pidfile", &d("dockerd.pid")])
            .args(["--iptables=false", "--ip6tables=false"])
            .args(["--bridge", &self.default_bridge.name])
            .args(["--storage-driver", "vfs"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        self.child = Some(child);
        let up = crate::wait_until(std::time::Duration::from_secs(30), || {
            self.docker(&["version", "--format", "{{.Server.Version}}"])
                .is_ok()
        });
        if up.is_none() {
            let _ = std::fs::copy(
                self.dir.join("dockerd.log"),
                std::env::temp_dir().join("lhbt-engine-failed.log"),
            );
            bail!(
                "the test's dockerd did not answer within 30 s:\n{}",
                std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `docker ARGS` against this engine; its stdout.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let out: Output = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .output()
            .context("running docker")?;
        if !out.status.success() {
            bail!(
                "docker {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates a bridge network; its bridge's name.
    pub fn network(&self, name: &str, subnet: &str) -> anyhow::Result<String> {
        let id = self.docker(&["network", "create", "--subnet", subnet, name])?;
        let br = format!("br-{}", &id[..12]);
        self.bridges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(br.clone());
        Ok(br)
    }

    /// A crash: SIGKILL, nothing cleaned up by the engine. The containerd it started
    /// goes too (a restarted dockerd waits in vain for a stale one's socket).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_containerd();
    }

    fn kill_containerd(&self) {
        let pattern = format!("{}/exec/containerd", self.dir.display());
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
        // dockerd finds its containerd by this pid file; a killed one may linger as a
        // zombie that still answers kill(pid, 0), so the file goes too.
        let _ = std::fs::remove_file(self.dir.join("exec/containerd/containerd.pid"));
        // Gone before the next start looks for it.
        let _ = crate::wait_until(std::time::Duration::from_secs(5), || {
            !Command::new("pgrep")
                .args(["-f", &pattern])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
    }

    /// The engine's own mounts (it bind-mounts its data root), innermost first.
    fn unmount_all(&self) {
        let dir = self.dir.display().to_string();
        let mut points: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).map(String::from))
            .filter(|p| p.starts_with(&dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").args(["-l", &p]).status();
        }
    }

    /// Starts the engine again on the same state.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Ok(ids) = self.docker(&["network", "ls", "-q", "--filter", "driver=bridge"]) {
                for id in ids.lines() {
                    let _ = self.docker(&["network", "rm", id]);
                }
            }
            if let Some(c) = &self.child {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
            if let Some(mut c) = self.child.take() {
                let _ = c.wait();
            }
        }
        self.kill_containerd();
        for br in self
            .bridges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = Command::new("ip")
                .args(["link", "del", br])
                .stderr(Stdio::null())
                .status();
        }
        self.unmount_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A docker-compose project of the test's own (the real `docker-compose` on the
/// machine), in a directory of its own; `down` on drop.
pub struct Compose {
    dir: std::path::PathBuf,
    pub project: String,
}

impl Compose {
    /// Writes `yaml` as the project's compose file; `project` must start with the test
    /// prefix (its networks are `PROJECT_NAME`).
    pub fn new(project: &str, yaml: &str) -> anyhow::Result<Compose> {
        Command::new("docker-compose")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()
            .filter(|s| s.success())
            .context("docker-compose is not installed (`cargo xtask setup` installs it)")?;
        assert!(project.starts_with(PREFIX));
        let dir = std::env::temp_dir().join(format!("{project}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("docker-compose.yml"), yaml)?;
        let c = Compose {
            dir,
            project: project.to_string(),
        };
        // Left over from an earlier run that was killed.
        let _ = c.run(&["down", "--remove-orphans", "-t", "0"]);
        Ok(c)
    }

    /// `docker-compose -p PROJECT -f FILE ARGS`, to run as the caller likes.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("docker-compose");
        c.args(["-p", &self.project, "-f"])
            .arg(self.dir.join("docker-compose.yml"))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// `docker-compose ARGS` in the project; its stdout.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(args)
            .output()
            .context("running docker-compose (is it installed? `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "docker-compose {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn up(&self) -> anyhow::Result<()> {
        self.run(&["up", "-d"]).map(drop)
    }

    pub fn down(&self) -> anyhow::Result<()> {
        self.run(&["down", "-t", "0"]).map(drop)
    }

    /// An HTTP GET from the running service `service`: the body, or why it failed.
    pub fn wget(&self, service: &str, url: &str) -> anyhow::Result<String> {
        self.run(&["exec", "-T", service, "wget", "-q", "-O", "-", url])
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self.run(&["down", "--remove-orphans", "-t", "0"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A container of the test image (`sleep`ing), removed when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `docker run -d --name NAME --network NETWORK EXTRA... IMAGE sleep 3600`.
    pub fn run(name: &str, network: &str, extra: &[&str]) -> anyhow::Result<Container> {
        assert!(name.starts_with(PREFIX));
        docker_ok(&["rm", "-f", name]);
        let mut args = vec!["run", "-d", "--name", name, "--network", network];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, "sleep", "3600"]);
        run("docker", &args)?;
        Ok(Container {
            name: name.to_string(),
        })
    }

    pub fn exec(&self, cmd: &[&str]) -> anyhow::Result<Output> {
        Command::new("docker")
            .args(["exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .context("docker exec")
    }

    /// The body, or the error wget gave (`refused`, `reset`; nothing after 4 s). Bounded
    /// by busybox's `timeout`: busybox-static's `wget -T` crashes (SIGSEGV).
    pub fn wget(&self, url: &str) -> anyhow::Result<String> {
        let out = self.exec(&["busybox", "timeout", "4", "wget", "-q", "-O", "-", url])?;
        if !out.status.success() {
            bail!(
                "wget {url} from {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `docker inspect --format FORMAT`.
    pub fn inspect(&self, format: &str) -> anyhow::Result<String> {
        Ok(run("docker", &["inspect", "--format", format, &self.name])?
            .trim()
            .to_string())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        docker_ok(&["rm", "-f", &self.name]);
    }
}
