//! From `RunOptions` to a daemon that serves: [`crate::startup`]'s settings and rules,
//! the engines' first answers, the control and metrics sockets, the kernel path,
//! preflight, the first plan applied and the firewall synced, READY=1.
//!
//! Every early exit undoes what is in place, in one way each: the sockets are removed by
//! [`Sockets`]'s drop, and once the daemon exists any error goes through
//! `Daemon::shutdown` (kernel path, proxy, firewall). A failed start leaves no link,
//! pin, program, rule or socket behind.

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use super::{Daemon, Inputs, PROXY_BACKLOG, RETRY, Retry, RunOptions, view};
use crate::{
    api::control,
    datapath::kernel::KernelPath,
    datapath::proxy::{FD_RESERVE, FDS_PER_CONNECTION, Proxy},
    engines::{EngineState, docker},
    firewall::{Firewall, FirewallTask},
    host::netlink::Netlink,
    host::notify::Notifier,
    host::tasks::Tasks,
    reconcile::{self, Paths, Plan},
    startup::{self, Settings},
};

/// The control and metrics sockets, removed when this is dropped: at every exit, early
/// or not.
pub(super) struct Sockets {
    control: std::path::PathBuf,
    metrics: control::MetricsAddr,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        control::remove_socket(&self.control);
        if let control::MetricsAddr::Unix(p) = &self.metrics {
            control::remove_socket(p);
        }
    }
}

pub(super) async fn start(
    opts: &RunOptions,
    tasks: &Tasks,
) -> anyhow::Result<(Daemon, Inputs, Sockets)> {
    let settings = Settings::resolve(&opts.serve)?;
    let Settings {
        mode,
        firewall: firewall_mode,
        metrics: metrics_addr,
        file_engines,
        label_allow,
        rules,
        fresh,
        waiting_for_rules,
    } = settings;
    if waiting_for_rules {
        warn!(
            "{} has no [[expose]] entry: nothing is served until one is added (then `lhb reload`) or `lhb expose` adds a rule",
            opts.serve.config.display()
        );
    }

    let sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    let (netlink, links) = Netlink::connect()?;
    let engines = docker::engines(opts.serve.no_docker, &opts.serve.engines, &file_engines).await?;
    let docker = match engines.docker {
        Some(socket) => Some(docker_watch(tasks, socket).await),
        None => None,
    };
    let podman = match engines.podman {
        Some(path) => Some(podman_watch(tasks, path).await),
        None => None,
    };
    // Bound before anything is loaded or attached: a second lhb stops here, touching
    // nothing.
    let (sockets, ctl_rx) = Sockets::bind(opts, metrics_addr, tasks).await?;
    let budget = budget(opts.max_connections, opts.udp_max_flows);
    // Before the kernel path: a thread that cannot start leaves nothing attached.
    let clients = crate::datapath::clients::Clients::default();
    let proxy = Proxy::new(
        budget.connections,
        PROXY_BACKLOG,
        tasks.clone(),
        clients.clone(),
    )
    .context("starting the proxy's thread")?;
    let (kernel, kernel_unavailable) =
        startup::kernel_path(mode, || Ok(KernelPath::load(&opts.serve.pin_dir)?))?;
    if let Some(why) = &kernel_unavailable {
        warn!("kernel path unavailable: {why}; using the proxy for every rule");
    }
    let firewall = Firewall::new(firewall_mode);
    let mut d = Daemon {
        rules,
        config_path: opts.serve.config.clone(),
        reconcile_events: 0,
        last_error: None,
        proxy_errors: Default::default(),
        cli_mode: opts.serve.mode,
        reload_error: None,
        label_allow_cli: opts.serve.label_allow.clone(),
        file_engines,
        label_allow,
        label_refused: Vec::new(),
        kernel_unavailable,
        firewall_backends: firewall.backends(),
        firewall_chains: firewall.chains(),
        notifier: Notifier::from_env(),
        paths: Paths {
            mode,
            kernel: kernel.is_some(),
        },
        kernel,
        proxy,
        udp: crate::datapath::udp::Forwarder::new(
            budget.udp_flows,
            opts.udp_idle,
            tasks.clone(),
            clients.clone(),
        ),
        clients,
        refusals_logged: Default::default(),
        udp_errors: Default::default(),
        guard: crate::datapath::guard::Guard::new(crate::datapath::guard::table_for(
            &opts.serve.control,
        )),
        tasks: tasks.clone(),
        firewall: None,
        netlink,
        applied: Plan::default(),
        docker,
        podman,
        retry: Retry {
            pending: false,
            delay: RETRY,
        },
    };
    d.follow_labels();
    if let Err(e) = d.serve_first(firewall, &fresh).await {
        d.shutdown(false).await;
        return Err(e);
    }
    let watchdog = Notifier::watchdog_interval().map(tokio::time::interval);
    let inputs = Inputs {
        sigterm,
        sigint,
        sighup,
        links,
        control: ctl_rx,
        watchdog,
        ruleset: ruleset_changes(),
        refusals: tokio::time::interval(view::REFUSALS_EVERY),
    };
    info!(
        "ready: serving {} of {} rule(s); control socket {}",
        view::serving(&d.applied),
        d.rules.len(),
        opts.serve.control.display()
    );
    d.notifier.ready(&d.summary());
    Ok((d, inputs, sockets))
}

impl Sockets {
    /// The control socket, then the metrics endpoint (`addr`, else a socket named after
    /// the control socket, beside it); requests from both arrive on the receiver.
    async fn bind(
        opts: &RunOptions,
        addr: Option<control::MetricsAddr>,
        tasks: &Tasks,
    ) -> anyhow::Result<(Sockets, tokio::sync::mpsc::Receiver<control::Call>)> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        control::serve(&opts.serve.control, tx.clone(), tasks)?;
        let metrics = addr.unwrap_or_else(|| {
            control::MetricsAddr::Unix(control::default_metrics_socket(&opts.serve.control))
        });
        let mut sockets = Sockets {
            control: opts.serve.control.clone(),
            // Not ours until bound: another lhb's socket is never removed.
            metrics: control::MetricsAddr::Off,
        };
        control::serve_metrics(&metrics, tx, tasks).await?;
        sockets.metrics = metrics;
        Ok((sockets, rx))
    }
}

/// Podman's view, followed from now on; said once if it does not answer.
async fn podman_watch(
    tasks: &Tasks,
    path: std::path::PathBuf,
) -> crate::engines::podman::PodmanWatch {
    let mut w = crate::engines::podman::watch(tasks, path);
    let view = startup::first_engine_view(&mut w.rx).await;
    if let Some(why) = view.down() {
        warn!(
            "Podman not reachable at {} ({why}): its network rules wait for it",
            view.socket
        );
    }
    w
}

/// The Docker engine's view, followed from now on; said once if it does not answer.
async fn docker_watch(
    tasks: &Tasks,
    socket: Option<String>,
) -> tokio::sync::watch::Receiver<EngineState> {
    let mut rx = docker::watch(tasks, socket);
    let view = startup::first_engine_view(&mut rx).await;
    if let Some(why) = view.down() {
        warn!(
            "Docker engine not reachable ({why}): network rules wait for it, interface rules work (--no-docker silences this)"
        );
    }
    rx
}

impl Daemon {
    /// Preflight, the first plan applied, the firewall synced to it: an error here is a
    /// failed start (the caller undoes everything).
    async fn serve_first(&mut self, mut firewall: Firewall, fresh: &[u32]) -> anyhow::Result<()> {
        let observed = reconcile::Observed {
            links: self.netlink.snapshot().await?,
            engines: self.engine_view(),
        };
        let wanted = reconcile::plan(self.rules.planned(), &observed, self.paths);
        startup::preflight(self.rules.iter().map(|a| &a.rule), &observed, &wanted)?;
        let backends = firewall.backends();
        if backends.is_empty() {
            info!("firewall: none managed");
        } else {
            info!("firewall: managing {}", backends.join(", "));
        }
        for &slot in fresh {
            self.clients.forget(slot);
        }
        if let Some(k) = self.kernel.as_mut() {
            for &slot in fresh {
                k.reset_counters(slot)
                    .context("zeroing the kernel counters")?;
            }
            info!(
                attach = k.mode().as_str(),
                variant = k.variant().as_str(),
                "kernel data path loaded ({} rule(s)); {} variant: {}",
                self.rules.len(),
                k.variant().as_str(),
                k.variant_why()
            );
        }
        // Every interface rule's bridge that exists passed preflight, so a failure to
        // attach is fatal. A proxy address held by another program is not: that rule's
        // gateway is retried while the others serve.
        self.apply(&wanted).await?;
        // "Ready" means served, also through the host's firewall: the first sync is here.
        let opened = crate::firewall::openings(&self.applied);
        if let Err(e) = firewall.sync(&opened) {
            firewall.shutdown();
            return Err(e.context("firewall"));
        }
        self.firewall = Some(FirewallTask::spawn(firewall, opened, &self.tasks));
        if let Some(k) = self.kernel.as_mut() {
            k.release_earlier();
        }
        view::log_states(&self.rules, &Default::default(), &self.applied.states);
        self.retry.pending = !self.proxy_errors.is_empty();
        Ok(())
    }
}

/// How the open files are shared: UDP flows (one fd each) and proxied connections
/// ([`FDS_PER_CONNECTION`] each); [`FD_RESERVE`] stay free so the control and metrics
/// sockets always answer.
struct Budget {
    connections: usize,
    udp_flows: usize,
}

/// The UDP flows are set aside first, at most a quarter of what the reserve leaves.
fn budget(asked: Option<usize>, asked_flows: Option<usize>) -> Budget {
    let nofile = raise_nofile_limit();
    let free = nofile.saturating_sub(FD_RESERVE);
    let flow_room = (free / 4).max(1) as usize;
    let udp_flows = match asked_flows {
        Some(n) if n > flow_room => {
            warn!(
                "--udp-max-flows {n} is more than a quarter of the open-file limit ({nofile}) allows: using {flow_room} (raise LimitNOFILE to allow more)"
            );
            flow_room
        }
        Some(n) => n,
        None => crate::datapath::udp::DEFAULT_MAX_FLOWS.min(flow_room),
    };
    let left = free.saturating_sub(udp_flows as u64);
    let budget = (left / FDS_PER_CONNECTION).max(1) as usize;
    let max = match asked {
        Some(n) if n > budget => {
            warn!(
                "--max-connections {n} is more than the open-file limit ({nofile}) allows: using {budget} (raise LimitNOFILE to allow more)"
            );
            budget
        }
        Some(n) => n,
        None => budget,
    };
    info!(
        "proxy: at most {max} connection(s) at once; UDP: at most {udp_flows} flow(s) (open-file limit {nofile})"
    );
    Budget {
        connections: max,
        udp_flows,
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit, 1024,
/// is meant for select(2) users; lhb uses epoll); the soft limit in force after.
fn raise_nofile_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        let raised = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return lim.maximum.unwrap_or(u64::MAX);
        }
    }
    // None: unlimited.
    lim.current.unwrap_or(u64::MAX)
}

/// nf_tables' change notifications, for the guard; None (with a warning) where they
/// cannot be had: the guard is then healed only by the next reconcile.
fn ruleset_changes() -> Option<tokio::sync::mpsc::Receiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match crate::firewall::subscribe_changes(tx) {
        Ok(()) => Some(rx),
        Err(e) => {
            warn!(
                "no nftables change notifications ({e}): the guard of container-scoped rules is checked only when lhb reconciles"
            );
            None
        }
    }
}
