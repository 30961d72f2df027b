//! The rig every path is measured on: a lab bridge with a container namespace, the
//! loopback servers (and the same servers bound to the gateway for the direct path),
//! lhb in kernel and in proxy mode, socat, HAProxy, the tokio proxy, and a second lab whose
//! bridge is re-created. Everything is stopped when the rig is dropped.

use std::{cell::RefCell, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use lhb_tests::{KillOnDrop, Lab, Lhb, free_port, wait_until};

use super::{PATHS, Path, Ports, servers::*};
use lhb_tests::redis::Redis;

/// The benchmark's containers are not local clients.
const NO_PROTECTED_MODE: &[&str] = &["--protected-mode", "no"];

// Fields drop in this order: daemons and servers before the labs they use.
pub(super) struct Rig {
    /// lhb per path that follows a bridge, on the lab that is re-created.
    _re_daemons: Vec<Lhb>,
    _re_server: TinyServer,
    pub relab: RefCell<Lab>,
    /// (path, gateway port) served on `relab`.
    pub re_ports: Vec<(Path, u16)>,
    socats: [KillOnDrop; 4],
    haproxy: Haproxy,
    proxy: Lhb,
    kernel: Lhb,
    pub pg: Postgres,
    _servers: (TinyServer, TinyServer, Redis, Redis),
    /// Where each path is reached.
    addrs: Vec<(Path, Ports)>,
    /// The loopback servers every path but direct leads to.
    pub lo: Ports,
    pub lab: Lab,
}

impl Rig {
    pub fn build(selected: &[Path], scoped: bool) -> anyhow::Result<Rig> {
        let lab = Lab::new(201)?;
        let gw = lab.gateway();
        // bind(port 0) can hand out a port it handed out a moment ago, once released:
        // each port is taken once here.
        let taken = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let port = || loop {
            let p = free_port("127.0.0.1")?;
            if taken.borrow_mut().insert(p) {
                return anyhow::Ok(p);
            }
        };
        let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let pg_port = port()?;
        let lo_ports = Ports {
            conn: lo(port()?),
            iperf: lo(port()?),
            redis: lo(port()?),
            pg: lo(pg_port),
        };
        let at_gw = |p: u16| SocketAddr::new(gw, p);
        let mut addrs: Vec<(Path, Ports)> = Vec::new();
        for &p in &PATHS {
            addrs.push((
                p,
                Ports {
                    conn: at_gw(port()?),
                    iperf: at_gw(port()?),
                    redis: at_gw(port()?),
                    // The direct path's PostgreSQL is the same cluster, listening on
                    // the gateway too.
                    pg: at_gw(if p == Path::Direct { pg_port } else { port()? }),
                },
            ));
        }
        let of = |p: Path| &addrs.iter().find(|(q, _)| *q == p).expect("every path").1;
        let d = of(Path::Direct);
        let servers = (
            TinyServer::start(d.conn)?,
            TinyServer::start(lo_ports.conn)?,
            Redis::start(
                lo_ports.redis.ip(),
                lo_ports.redis.port(),
                NO_PROTECTED_MODE,
            )?,
            Redis::start(gw, d.redis.port(), NO_PROTECTED_MODE)?,
        );
        let pg = Postgres::start(gw, pg_port)?;
        let br = lab.bridge_name();
        let allow = scoped.then(|| lab.container_ip());
        let kernel = start_lhb("kernel", &br, of(Path::Kernel), &lo_ports, allow)?;
        let proxy = start_lhb("proxy", &br, of(Path::Proxy), &lo_ports, allow)?;
        let so = of(Path::Socat);
        let socats = [
            socat(gw, so.conn.port(), lo_ports.conn.port())?,
            socat(gw, so.iperf.port(), lo_ports.iperf.port())?,
            socat(gw, so.redis.port(), lo_ports.redis.port())?,
            socat(gw, so.pg.port(), lo_ports.pg.port())?,
        ];
        let ha = of(Path::Haproxy);
        let haproxy = Haproxy::start(&[
            (ha.conn, lo_ports.conn),
            (ha.iperf, lo_ports.iperf),
            (ha.redis, lo_ports.redis),
            (ha.pg, lo_ports.pg),
        ])?;
        let to = of(Path::Tokio);
        tokio_proxy(vec![
            (to.conn, lo_ports.conn),
            (to.iperf, lo_ports.iperf),
            (to.redis, lo_ports.redis),
            (to.pg, lo_ports.pg),
        ])?;
        for &p in selected {
            if p != Path::Direct {
                let a = of(p).conn;
                wait_until(Duration::from_secs(5), || served(&lab, a))
                    .with_context(|| format!("{} path does not serve", p.name()))?;
            }
        }

        // Bridge re-creation: a lab of its own, so the other servers keep their bridge.
        let relab = Lab::new(202)?;
        let re_addr = lo(port()?);
        let re_server = TinyServer::start(re_addr)?;
        let re_ports: Vec<(Path, u16)> = [Path::Kernel, Path::Proxy]
            .into_iter()
            .filter(|p| selected.contains(p))
            .map(|p| port().map(|q| (p, q)))
            .collect::<anyhow::Result<_>>()?;
        let re_br = relab.bridge_name();
        let re_daemons = re_ports
            .iter()
            .map(|(p, q)| {
                let rule = format!("{re_br}:{q}={}", re_addr.port());
                Lhb::start_bin(
                    &release()?,
                    &[
                        "--mode",
                        p.name(),
                        "--firewall",
                        "none",
                        "--expose-iface",
                        &rule,
                    ],
                )
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Rig {
            _re_daemons: re_daemons,
            _re_server: re_server,
            relab: RefCell::new(relab),
            re_ports,
            socats,
            haproxy,
            proxy,
            kernel,
            pg,
            _servers: servers,
            addrs,
            lo: lo_ports,
            lab,
        })
    }

    /// Where `p` is reached.
    pub fn of(&self, p: Path) -> &Ports {
        &self
            .addrs
            .iter()
            .find(|(q, _)| *q == p)
            .expect("every path")
            .1
    }

    /// The processes that carry `p` (none for direct and the in-process tokio proxy).
    pub fn daemon_pids(&self, p: Path) -> Vec<u32> {
        match p {
            Path::Kernel => vec![self.kernel.pid()],
            Path::Proxy => vec![self.proxy.pid()],
            Path::Socat => self.socats.iter().map(|s| s.0.id()).collect(),
            Path::Haproxy => vec![self.haproxy.pid()],
            _ => vec![],
        }
    }
}

/// The release build the bench measures.
pub(super) fn release() -> anyhow::Result<std::path::PathBuf> {
    lhb_tests::lhb_bin()
        .parent()
        .and_then(|p| p.parent())
        .map(|t| t.join("release/lhb"))
        .context("target dir")
}

/// lhb in `mode` serving each of `at`'s ports on `br` to the same server of `lo`.
/// An lhb serving the bench's ports on `br`; with `allow`, every rule admits only that
/// client (`cargo xtask bench --scoped`).
fn start_lhb(
    mode: &str,
    br: &str,
    at: &Ports,
    lo: &Ports,
    allow: Option<std::net::IpAddr>,
) -> anyhow::Result<Lhb> {
    let mut args = vec![
        "--mode".to_string(),
        mode.to_string(),
        "--firewall".into(),
        "none".into(),
    ];
    for (at, to) in [
        (at.conn, lo.conn),
        (at.iperf, lo.iperf),
        (at.redis, lo.redis),
        (at.pg, lo.pg),
    ] {
        args.push("--expose-iface".into());
        let scope = allow.map(|a| format!("@{a}")).unwrap_or_default();
        args.push(format!("{br}:{}={}{scope}", at.port(), to.port()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Lhb::start_bin(&release()?, &args)
}
