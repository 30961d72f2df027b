//! A real rootful Podman for tests, in a namespace that plays the host (netavark writes
//! its firewall chains there, never into the machine's): its own storage (vfs) and
//! network configuration in a temporary directory, the test image loaded from the
//! machine's Docker engine (no registry), and its API served on a socket of its own by
//! `podman system service`. Measured workarounds for this machine kind: the default
//! ulimits set in a containers.conf of the test's (no CAP_SYS_RESOURCE here), podman run
//! with `nsenter --net=` (`ip netns exec` remounts /sys and loses the cgroup mounts),
//! networks made with `--disable-dns` (no aardvark-dns left running), and netavark's
//! state under /run/containers and the image cache under /var/lib/containers removed
//! afterwards when the test made them.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::PREFIX;

/// Whether the Podman tests can run: podman is installed. If not, this panics, unless
/// `LHB_ALLOW_SKIP` lists `podman`: then it prints what is not tested and returns false.
pub fn required(test: &str) -> bool {
    if std::path::Path::new("/usr/bin/podman").exists() {
        return true;
    }
    crate::skip_or_fail(
        "podman",
        test,
        "podman (`cargo xtask setup` installs it)",
        "Podman networks were",
    )
}

/// Machine paths Podman writes whatever its --root says; removed on drop if absent
/// before.
const MACHINE_STATE: &[&str] = &["/run/containers/networks", "/var/lib/containers/cache"];

pub struct Podman {
    dir: PathBuf,
    netns: String,
    service: Option<Child>,
    /// Its API socket, for `--engine unix://...`.
    pub socket: PathBuf,
    made: Vec<&'static str>,
}

impl Podman {
    /// Podman in namespace `netns`, its API answering, the test image loaded.
    pub fn start(netns: &str) -> anyhow::Result<Podman> {
        let dir =
            std::env::temp_dir().join(format!("{PREFIX}-podman-{netns}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("containers.conf"),
            // netavark, never CNI: Podman 4.3 falls back to CNI (bridges cni-podmanN)
            // where netavark is not installed, and the tests name Podman's bridges.
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\n[network]\nnetwork_backend = \"netavark\"\n",
        )?;
        let made = MACHINE_STATE
            .iter()
            .copied()
            .filter(|p| !std::path::Path::new(p).exists())
            .collect();
        let mut p = Podman {
            socket: dir.join("podman.sock"),
            dir,
            netns: netns.to_string(),
            service: None,
            made,
        };
        let image = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "docker save {} | {} load",
                crate::docker::IMAGE,
                p.command_line()
            ))
            .output()
            .context("loading the test image into Podman")?;
        if !image.status.success() {
            bail!(
                "loading the test image into Podman: {}",
                String::from_utf8_lossy(&image.stderr)
            );
        }
        let service = p
            .command(&["system", "service", "--time=0"])
            .arg(format!("unix://{}", p.socket.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(p.dir.join("service.log"))?)
            .spawn()
            .context("starting podman system service")?;
        p.service = Some(service);
        let socket = p.socket.clone();
        crate::wait_until(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .context("podman system service did not answer within 20 s")?;
        Ok(p)
    }

    fn args(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).display().to_string();
        vec![
            format!("--net=/run/netns/{}", self.netns),
            "env".into(),
            format!("CONTAINERS_CONF={}", d("containers.conf")),
            "podman".into(),
            "--root".into(),
            d("root"),
            "--runroot".into(),
            d("run"),
            "--storage-driver".into(),
            "vfs".into(),
            "--network-config-dir".into(),
            d("net"),
            "--log-level".into(),
            "error".into(),
        ]
    }

    fn command_line(&self) -> String {
        format!("nsenter {}", self.args().join(" "))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(self.args()).args(args).stdin(Stdio::null());
        c
    }

    /// `podman ARGS`; its stdout.
    pub fn podman(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).output().context("running podman")?;
        if !out.status.success() {
            bail!(
                "podman {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A network with this subnet (no DNS server), and a container `name` on it.
    pub fn network_with_container(
        &self,
        network: &str,
        subnet: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        self.podman(&[
            "network",
            "create",
            "--disable-dns",
            "--subnet",
            subnet,
            network,
        ])?;
        self.podman(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            crate::docker::IMAGE,
            "sleep",
            "3600",
        ])?;
        Ok(())
    }

    /// The container and its network gone.
    pub fn remove(&self, network: &str, name: &str) -> anyhow::Result<()> {
        self.podman(&["rm", "-f", "-t", "0", name])?;
        self.podman(&["network", "rm", "-f", network])?;
        Ok(())
    }

    /// An HTTP GET from container `name`: the body, or why it failed.
    pub fn wget(&self, name: &str, url: &str) -> anyhow::Result<String> {
        self.podman(&["exec", name, "wget", "-q", "-O", "-", url])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.podman(&["network", "prune", "-f"]);
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        for p in &self.made {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
