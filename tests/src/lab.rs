//! The testbed: namespaces, bridges, veths, the standard `Lab`, the `HostLab` that plays
//! the host for firewall tests, and pin directories. Each is removed by its guard.

use std::{fs::File, net::IpAddr, os::fd::AsRawFd as _, process::Command, thread};

use anyhow::{Context as _, bail};

use crate::*;

/// A network namespace, deleted on drop (with the veth ends inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        ip_quiet(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A name for process `pid`'s network namespace (`ip netns attach`); dropping it
    /// removes the name, not the namespace.
    pub fn attach(name: &str, pid: u32) -> anyhow::Result<Netns> {
        ip_quiet(&["netns", "del", name]);
        ip(&["netns", "attach", name, &pid.to_string()])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(Netns {
            name: name.to_string(),
        })
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let handle = thread::spawn(move || -> anyhow::Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only; the fd is valid for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns({path}): {}", std::io::Error::last_os_error());
            }
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// A command run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip_quiet(&["netns", "del", &self.name]);
    }
}

/// A link in the host namespace (bridge or veth), deleted on drop.
pub struct HostLink {
    pub name: String,
}

impl HostLink {
    pub fn ifindex(&self) -> anyhow::Result<u32> {
        let s = std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.name))
            .with_context(|| format!("ifindex of {}", self.name))?;
        Ok(s.trim().parse()?)
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        ip_quiet(&["link", "del", &self.name]);
    }
}

/// Creates bridge `name` with the given addresses (CIDR), up.
pub fn bridge(name: &str, addrs: &[&str]) -> anyhow::Result<HostLink> {
    ip_quiet(&["link", "del", name]);
    // A fixed address, as Docker and libvirt give their bridges: otherwise the bridge
    // takes the lowest address of its ports, and plugging a port in or out changes the
    // gateway's MAC under the containers' neighbour caches.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mac = format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h as u8,
        (h >> 8) as u8,
        (h >> 16) as u8,
        (h >> 24) as u8,
        (h >> 32) as u8
    );
    ip(&["link", "add", name, "address", &mac, "type", "bridge"])?;
    let link = HostLink {
        name: name.to_string(),
    };
    for a in addrs {
        add_addr(name, a)?;
    }
    ip(&["link", "set", name, "up"])?;
    Ok(link)
}

/// Adds an address without duplicate address detection, so IPv6 is usable at once.
pub fn add_addr(dev: &str, cidr: &str) -> anyhow::Result<()> {
    if cidr.contains(':') {
        ip(&["addr", "add", cidr, "dev", dev, "nodad"])
    } else {
        ip(&["addr", "add", cidr, "dev", dev])
    }
}

/// Joins `ns` to the host through a veth pair: host end `host_end` (enslaved to `master`
/// if given), namespace end `eth0` with `addrs` and default routes via `gateways`.
pub fn plug(
    ns: &Netns,
    host_end: &str,
    master: Option<&str>,
    addrs: &[&str],
    gateways: &[&str],
) -> anyhow::Result<HostLink> {
    ip_quiet(&["link", "del", host_end]);
    ip(&[
        "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    let link = HostLink {
        name: host_end.to_string(),
    };
    if let Some(m) = master {
        ip(&["link", "set", host_end, "master", m])?;
    }
    ip(&["link", "set", host_end, "up"])?;
    for a in addrs {
        let mut args = vec!["-n", &ns.name, "addr", "add", a, "dev", "eth0"];
        if a.contains(':') {
            args.push("nodad");
        }
        ip(&args)?;
    }
    ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
    for gw in gateways {
        let fam = if gw.contains(':') { "-6" } else { "-4" };
        ip(&["-n", &ns.name, fam, "route", "add", "default", "via", gw])?;
    }
    Ok(link)
}

/// The standard topology of TESTBED.md, numbered so parallel tests never collide:
/// - bridge `lhbt<n>br` with gateway 10.201.<n>.1 and fd00:201:<n>::1, one "container"
///   namespace on it (10.201.<n>.2);
/// - an "outside" namespace routed to the host through its own veth (10.202.<n>.2, host
///   side 10.202.<n>.1), not on the bridge;
/// - a "neighbour" bridge `lhbt<n>nb` (10.203.<n>.1) with a namespace of its own, for
///   which no rule exists.
pub struct Lab {
    pub n: u8,
    pub container: Netns,
    pub outside: Netns,
    pub neighbour: Netns,
    // Dropped after the namespaces (field order), taking what is left with them.
    pub links: Vec<HostLink>,
}

impl Lab {
    pub fn new(n: u8) -> anyhow::Result<Lab> {
        let p = format!("{PREFIX}{n}");
        let container = Netns::new(&format!("{p}c"))?;
        let outside = Netns::new(&format!("{p}o"))?;
        let neighbour = Netns::new(&format!("{p}n"))?;
        let mut lab = Lab {
            n,
            container,
            outside,
            neighbour,
            links: Vec::new(),
        };
        let br = lab.bridge_name();
        lab.links.push(bridge(
            &br,
            &[&format!("10.201.{n}.1/24"), &format!("fd00:201:{n}::1/64")],
        )?);
        let c_addrs = [format!("10.201.{n}.2/24"), format!("fd00:201:{n}::2/64")];
        let c_gws = [format!("10.201.{n}.1"), format!("fd00:201:{n}::1")];
        lab.links.push(plug(
            &lab.container,
            &format!("{p}cv"),
            Some(&br),
            &[&c_addrs[0], &c_addrs[1]],
            &[&c_gws[0], &c_gws[1]],
        )?);
        let ov = plug(
            &lab.outside,
            &format!("{p}ov"),
            None,
            &[&format!("10.202.{n}.2/24")],
            &[&format!("10.202.{n}.1")],
        )?;
        add_addr(&ov.name, &format!("10.202.{n}.1/24"))?;
        lab.links.push(ov);
        let nb = format!("{p}nb");
        lab.links.push(bridge(&nb, &[&format!("10.203.{n}.1/24")])?);
        lab.links.push(plug(
            &lab.neighbour,
            &format!("{p}nv"),
            Some(&nb),
            &[&format!("10.203.{n}.2/24")],
            &[&format!("10.203.{n}.1")],
        )?);
        Ok(lab)
    }

    pub fn bridge_name(&self) -> String {
        format!("{PREFIX}{}br", self.n)
    }
    /// The bridge's current ifindex (a re-created bridge has a new one).
    pub fn bridge_ifindex(&self) -> anyhow::Result<u32> {
        let br = self.bridge_name();
        self.links
            .iter()
            .find(|l| l.name == br)
            .context("bridge guard missing")?
            .ifindex()
    }
    pub fn container_veth(&self) -> String {
        format!("{PREFIX}{}cv", self.n)
    }
    pub fn gateway(&self) -> IpAddr {
        format!("10.201.{}.1", self.n)
            .parse()
            .expect("valid literal")
    }
    pub fn gateway6(&self) -> IpAddr {
        format!("fd00:201:{}::1", self.n)
            .parse()
            .expect("valid literal")
    }
    pub fn container_ip(&self) -> IpAddr {
        format!("10.201.{}.2", self.n)
            .parse()
            .expect("valid literal")
    }
    pub fn container_ip6(&self) -> IpAddr {
        format!("fd00:201:{}::2", self.n)
            .parse()
            .expect("valid literal")
    }
    /// The host's address on the outside link.
    pub fn host_outside_ip(&self) -> IpAddr {
        format!("10.202.{}.1", self.n)
            .parse()
            .expect("valid literal")
    }
    /// The host's address on the neighbour bridge.
    pub fn neighbour_gateway(&self) -> IpAddr {
        format!("10.203.{}.1", self.n)
            .parse()
            .expect("valid literal")
    }

    /// Deletes and re-creates the bridge with the same name and addresses (new ifindex),
    /// and puts the container's veth back on it, as Docker does when it re-creates a
    /// network. Returns when the bridge is fully set up again.
    pub fn recreate_bridge(&mut self) -> anyhow::Result<()> {
        let br = self.bridge_name();
        let pos = self
            .links
            .iter()
            .position(|l| l.name == br)
            .context("bridge guard missing")?;
        drop(self.links.remove(pos));
        let n = self.n;
        self.links.push(bridge(
            &br,
            &[&format!("10.201.{n}.1/24"), &format!("fd00:201:{n}::1/64")],
        )?);
        ip(&["link", "set", &self.container_veth(), "master", &br])?;
        Ok(())
    }
}

/// A namespace that plays the host, for tests that change the host's firewall: the
/// machine running the tests keeps its own. Inside it a bridge `br0` (10.204.N.1/24);
/// a container namespace on that bridge, and an outside namespace routed to the host
/// (10.205.N.1).
pub struct HostLab {
    pub host: Netns,
    pub container: Netns,
    pub outside: Netns,
    pub n: u8,
}

impl HostLab {
    pub fn new(n: u8) -> anyhow::Result<HostLab> {
        Self::around(n, Netns::new(&format!("{PREFIX}{n}h"))?)
    }

    /// The lab around `host` as the namespace that plays the host (e.g. a Docker
    /// container's, given a name with [`Netns::attach`], so that another container can
    /// join it with `--network container:...`).
    pub fn around(n: u8, host: Netns) -> anyhow::Result<HostLab> {
        let container = Netns::new(&format!("{PREFIX}{n}c"))?;
        let outside = Netns::new(&format!("{PREFIX}{n}o"))?;
        let lab = HostLab {
            host,
            container,
            outside,
            n,
        };
        let (gw, host_out) = (lab.gateway().to_string(), lab.host_outside_ip().to_string());
        lab.ip(&["link", "add", "br0", "type", "bridge"])?;
        lab.ip(&["addr", "add", &format!("{gw}/24"), "dev", "br0"])?;
        lab.ip(&["link", "set", "br0", "up"])?;
        for (ns, veth, addr, route_via, master) in [
            (&lab.container, "cv", format!("10.204.{n}.2/24"), &gw, true),
            (
                &lab.outside,
                "ov",
                format!("10.205.{n}.2/24"),
                &host_out,
                false,
            ),
        ] {
            lab.ip(&[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            if master {
                lab.ip(&["link", "set", veth, "master", "br0"])?;
            } else {
                lab.ip(&["addr", "add", &format!("{host_out}/24"), "dev", veth])?;
            }
            lab.ip(&["link", "set", veth, "up"])?;
            run("ip", &["-n", &ns.name, "addr", "add", &addr, "dev", "eth0"])?;
            run("ip", &["-n", &ns.name, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &["-n", &ns.name, "route", "add", "default", "via", route_via],
            )?;
        }
        Ok(lab)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.host.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all).map(|_| ())
    }

    pub fn gateway(&self) -> IpAddr {
        IpAddr::from([10, 204, self.n, 1])
    }

    pub fn host_outside_ip(&self) -> IpAddr {
        IpAddr::from([10, 205, self.n, 1])
    }

    /// Runs a command in the host namespace; its stdout.
    pub fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["netns", "exec", self.host.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a shell pipeline in the host namespace.
    pub fn shell(&self, script: &str) -> anyhow::Result<String> {
        self.sh(&["sh", "-c", script])
    }

    /// `lhb run ARGS` inside the host namespace, ready.
    pub fn lhb(&self, args: &[&str]) -> anyhow::Result<Lhb> {
        Lhb::start_wrapped(&["ip", "netns", "exec", &self.host.name], &lhb_bin(), args)
    }

    /// `lhb run ARGS` inside the host namespace with extra environment variables.
    pub fn lhb_env(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Lhb> {
        Lhb::start_full(
            &["ip", "netns", "exec", &self.host.name],
            &lhb_bin(),
            args,
            env,
        )
    }
}

/// Removes a pin directory a test chose itself (whatever a daemon left in it).
pub struct PinDir(pub String);

impl PinDir {
    pub fn new(name: &str) -> PinDir {
        let d = format!("/sys/fs/bpf/lhbt-{name}-{}", std::process::id());
        let _ = std::fs::remove_dir_all(&d);
        PinDir(d)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
