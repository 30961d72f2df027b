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
    let allowed = std::env::var("LHB_ALLOW_SKIP")
        .map(|v| v.split(',').any(|s| s.trim() == "docker"))
        .unwrap_or(false);
    if allowed {
        eprintln!("SKIPPED {test}: no Docker engine answers; Docker networks were NOT tested");
        return false;
    }
    panic!(
        "{test} needs a Docker engine and none answers (`docker info` fails); set LHB_ALLOW_SKIP=docker to skip it explicitly"
    );
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
