//! `lhb run`: the long-running daemon.
//!
//! Flow: rules (command line + config file + runtime + labels:
//! [`crate::startup::RuleSet`]) and what netlink and the engines report ->
//! [`reconcile::plan`] -> the difference to what is applied goes to the drivers
//! ([`apply`]: kernel path, proxy, UDP forwarder, guard, firewall task). Start-up is
//! [`start`], from [`crate::startup`]'s steps; then one loop turns every input (signal,
//! control request, link or address event, engine change, retry timer, watchdog tick,
//! refusal report tick) into an [`Event`] handled by [`Daemon::handle`]. Bridges that come, go, or come back with a new ifindex or
//! address are followed without polling. SIGINT/SIGTERM detach everything before exit.
//!
//! - `start.rs`: from options to a daemon that serves, undone on any early exit;
//! - `apply.rs`: plan -> kernel path, gateway sockets, guard, firewall; shutdown;
//! - `requests.rs`: the control socket's requests;
//! - `view.rs`: `lhb status`, STATUS= and the state log lines.

mod apply;
mod requests;
mod start;
mod view;

use std::{collections::BTreeMap, ops::ControlFlow, path::PathBuf, time::Duration};

use tokio::{signal::unix::Signal, sync::watch};
use tracing::{error, info, warn};

use crate::startup::ServeOptions;

use crate::{
    api::control,
    datapath::kernel::KernelPath,
    datapath::proxy::{GatewayKey, Proxy},
    engines::{EngineState, EngineView},
    firewall::FirewallTask,
    host::netlink::{Events, Netlink},
    host::notify::Notifier,
    model::config,
    reconcile::{self, Mode, Observed, Paths, Plan},
    startup::RuleSet,
};

/// Events arriving in a burst (a bridge and its address, a veth and its port) are
/// coalesced: one snapshot after this quiet time covers all of them.
const SETTLE: Duration = Duration::from_millis(15);
/// An attachment that failed is retried this often until it succeeds or its bridge goes.
const RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two retries of something that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(10);

pub struct RunOptions {
    pub serve: ServeOptions,
    /// --max-connections, if given; else derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// --udp-max-flows, if given; else the default, within the open-file limit.
    pub udp_max_flows: Option<usize>,
    /// --udp-idle-timeout.
    pub udp_idle: std::time::Duration,
    /// Leave the kernel path and the firewall rules serving on a clean exit.
    pub keep_on_exit: bool,
}

/// Listen backlog of proxy sockets: connection bursts wait in the kernel, not refused.
const PROXY_BACKLOG: i32 = 4096;

struct Daemon {
    rules: RuleSet,
    config_path: PathBuf,
    reconcile_events: u64,
    last_error: Option<String>,
    /// `--mode` given on the command line (a `mode =` in a reloaded file does not apply).
    cli_mode: Option<Mode>,
    /// Why the last reload failed, until one succeeds: in STATUS= and `lhb status`.
    reload_error: Option<String>,
    /// The config file's `engine` list at start (a change takes effect at the next).
    file_engines: Vec<String>,
    /// --label-allow.
    label_allow_cli: Vec<crate::model::labels::Entry>,
    /// --label-allow and the config's `label_allow`: what labels may ask for.
    label_allow: Vec<crate::model::labels::Entry>,
    /// Label entries not served now, and why (each logged when it first appears).
    label_refused: Vec<crate::model::labels::Refusal>,
    /// Proxy listeners that could not be bound (another program holds the address),
    /// retried with backoff; the rest of the rules are served meanwhile.
    proxy_errors: BTreeMap<GatewayKey, String>,
    /// UDP forwarder sockets that could not be bound, retried the same way.
    udp_errors: BTreeMap<GatewayKey, String>,
    kernel_unavailable: Option<String>,
    firewall_backends: Vec<String>,
    firewall_chains: crate::firewall::HeldChains,
    notifier: Notifier,
    /// None where the kernel path is not used (--mode proxy, or it could not load).
    kernel: Option<KernelPath>,
    proxy: Proxy,
    udp: crate::datapath::udp::Forwarder,
    /// Who connected through the proxy and the UDP forwarder (the kernel path counts
    /// its own, in its map).
    clients: crate::datapath::clients::Clients,
    /// Each refused client's refusals when they were last logged.
    refusals_logged: std::collections::HashMap<(u32, std::net::IpAddr), u64>,
    /// The nftables bridge table that makes container scopes unforgeable.
    guard: crate::datapath::guard::Guard,
    /// Follows the applied plan on its own (see FirewallTask); None until the first
    /// plan is applied and the firewall matches it.
    firewall: Option<FirewallTask>,
    paths: Paths,
    netlink: Netlink,
    applied: Plan,
    docker: Option<watch::Receiver<EngineState>>,
    podman: Option<crate::engines::podman::PodmanWatch>,
    retry: Retry,
    tasks: crate::host::tasks::Tasks,
}

/// Something failed to apply (an attachment, a proxy bind): tried again after `delay`,
/// which doubles up to [`RETRY_MAX`] while it keeps failing.
struct Retry {
    pending: bool,
    delay: Duration,
}

impl Retry {
    fn after(&mut self, failed: bool) {
        self.pending = failed;
        if !failed {
            self.delay = RETRY;
        }
    }
}

/// One input of the loop.
enum Event {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// SIGHUP.
    Reload,
    Control(control::Call),
    /// Link or address events, coalesced.
    Links,
    /// The rtnetlink event socket closed.
    LinksClosed,
    /// The Docker view changed; `false`: its task ended.
    Docker(bool),
    /// Podman's view changed; `false`: its task ended.
    Podman(bool),
    Retry,
    Watchdog,
    /// The nftables ruleset changed.
    Ruleset,
    /// Time to log the clients refused since the last time.
    Refusals,
}

/// Where the loop's inputs come from.
struct Inputs {
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
    links: Events,
    control: tokio::sync::mpsc::Receiver<control::Call>,
    watchdog: Option<tokio::time::Interval>,
    /// nf_tables ruleset changes (any table's): the guard's table may have gone.
    ruleset: Option<tokio::sync::mpsc::Receiver<()>>,
    refusals: tokio::time::Interval,
}

impl Inputs {
    async fn next(
        &mut self,
        docker: Option<&mut watch::Receiver<EngineState>>,
        podman: Option<&mut watch::Receiver<EngineState>>,
        retry: &Retry,
    ) -> Event {
        let docker_changed = async {
            match docker {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let podman_changed = async {
            match podman {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        let ruleset = async {
            match self.ruleset.as_mut() {
                Some(rx) => match rx.recv().await {
                    Some(()) => {
                        // A reload is a burst of changes: one check after it.
                        tokio::time::sleep(SETTLE).await;
                        while rx.try_recv().is_ok() {}
                    }
                    None => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        let watchdog = async {
            match self.watchdog.as_mut() {
                Some(t) => t.tick().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.sigterm.recv() => Event::Stop("SIGTERM"),
            _ = self.sigint.recv() => Event::Stop("SIGINT"),
            _ = self.sighup.recv() => Event::Reload,
            call = self.control.recv() => match call {
                Some(c) => Event::Control(c),
                // The control server never ends while the daemon runs.
                None => std::future::pending().await,
            },
            ev = self.links.next() => {
                if ev.is_none() {
                    return Event::LinksClosed;
                }
                tokio::time::sleep(SETTLE).await;
                self.links.drain();
                Event::Links
            }
            alive = docker_changed => Event::Docker(alive),
            alive = podman_changed => Event::Podman(alive),
            _ = tokio::time::sleep(retry.delay), if retry.pending => Event::Retry,
            _ = watchdog => Event::Watchdog,
            () = ruleset => Event::Ruleset,
            _ = self.refusals.tick() => Event::Refusals,
        }
    }
}

/// How long the daemon's tasks get to end once cancelled.
const TASKS_GRACE: Duration = Duration::from_secs(2);

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    // Every exit, a failed start included, ends the tasks the same way.
    let tasks = crate::host::tasks::Tasks::new();
    let result = serve(&opts, &tasks).await;
    tasks.stop(TASKS_GRACE).await;
    result
}

async fn serve(opts: &RunOptions, tasks: &crate::host::tasks::Tasks) -> anyhow::Result<()> {
    let (mut d, mut inputs, _sockets) = start::start(opts, tasks).await?;
    let result = loop {
        let ev = inputs
            .next(
                d.docker.as_mut(),
                d.podman.as_mut().map(|p| &mut p.rx),
                &d.retry,
            )
            .await;
        match d.handle(ev).await {
            Ok(ControlFlow::Continue(())) => {}
            Ok(ControlFlow::Break(())) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    d.log_final_counters();
    d.notifier.stopping();
    // An error exit removes everything: what it leaves could not be followed.
    let keep = opts.keep_on_exit && result.is_ok();
    d.shutdown(keep).await;
    match (&result, keep) {
        (Err(_), _) => {}
        (Ok(()), true) => info!(
            "--keep-on-exit: the kernel path and the firewall rules stay for the next start; proxy listeners and UDP sockets closed; bye"
        ),
        (Ok(()), false) => info!("detached from every bridge and closed every listener; bye"),
    }
    result
}

impl Daemon {
    async fn handle(&mut self, ev: Event) -> anyhow::Result<ControlFlow<()>> {
        match ev {
            Event::Stop(signal) => {
                info!("{signal}: shutting down");
                return Ok(ControlFlow::Break(()));
            }
            Event::Reload => {
                self.reconcile_events += 1;
                if self.reload().is_err() {
                    return Ok(ControlFlow::Continue(()));
                }
            }
            Event::Control((req, reply)) => {
                let (resp, failed) = self.request(req).await;
                let _ = reply.send(resp);
                if let Some(f) = failed {
                    self.retry.pending = f;
                }
                return Ok(ControlFlow::Continue(()));
            }
            Event::LinksClosed => {
                anyhow::bail!("the rtnetlink event socket closed; cannot follow bridges any more")
            }
            Event::Links => {
                self.reconcile_events += 1;
                // Podman announces no network changes; its bridges come and go with
                // containers, so a link event is the cue to ask it again.
                if let Some(p) = &self.podman {
                    p.relist();
                }
            }
            Event::Podman(alive) => {
                if !alive {
                    self.podman = None;
                }
                self.reconcile_events += 1;
                self.follow_labels();
            }
            Event::Docker(alive) => {
                if !alive {
                    self.docker = None;
                }
                self.reconcile_events += 1;
                self.follow_labels();
            }
            Event::Retry => {
                self.retry.delay = (self.retry.delay * 2).min(RETRY_MAX);
            }
            Event::Watchdog => {
                // Sent from the loop itself: a stuck loop stops the pings.
                self.notifier.send("WATCHDOG=1");
                return Ok(ControlFlow::Continue(()));
            }
            Event::Refusals => {
                self.log_refusals();
                return Ok(ControlFlow::Continue(()));
            }
            Event::Ruleset => {
                match self.guard.heal().await {
                    Ok(false) => {}
                    Ok(true) => {
                        warn!(
                            "the guard's table (bridge {}) was changed or removed by someone else; written again",
                            self.guard.table()
                        );
                    }
                    Err(e) => {
                        // Applied again below: without the table, the rules scoped to
                        // containers are closed until it can be written.
                        error!("the guard's table (bridge {}): {e:#}", self.guard.table());
                        let failed = self.reconcile().await;
                        self.retry.after(failed);
                    }
                }
                return Ok(ControlFlow::Continue(()));
            }
        }
        let failed = self.reconcile().await;
        self.retry.after(failed);
        Ok(ControlFlow::Continue(()))
    }

    async fn observe(&self) -> anyhow::Result<Observed> {
        Ok(reconcile::Observed {
            links: self.netlink.snapshot().await?,
            engines: self.engine_view(),
        })
    }

    /// What the engines said last, as one view; None when lhb reads no engine.
    fn engine_view(&self) -> Option<EngineView> {
        crate::engines::view(
            self.docker.as_ref().map(|d| d.borrow().clone()),
            self.podman.as_ref().map(|p| p.rx.borrow().clone()),
        )
    }

    /// A new plan from what is observed now, applied; logs what changed. Whether
    /// something failed and is to be retried.
    async fn reconcile(&mut self) -> bool {
        let observed = match self.observe().await {
            Ok(o) => o,
            Err(e) => {
                warn!("reading links and addresses: {e:#}");
                return true;
            }
        };
        let wanted = reconcile::plan(self.rules.planned(), &observed, self.paths);
        let before = std::mem::take(&mut self.applied.states);
        let failed = match self.apply(&wanted).await {
            Ok(()) => {
                self.last_error = None;
                false
            }
            Err(e) => {
                let e = format!("{e:#}");
                // Said once per distinct error: a retry every few seconds is no news.
                if self.last_error.as_ref() != Some(&e) {
                    error!("{e} (retrying)");
                }
                self.last_error = Some(e);
                true
            }
        } || !self.proxy_errors.is_empty()
            || !self.udp_errors.is_empty();
        if view::log_states(&self.rules, &before, &self.applied.states) {
            self.notifier.status(&self.summary());
        }
        failed
    }

    /// Reads the config file again and takes its rules (SIGHUP, `lhb reload`). A file
    /// that does not load, or rules that do not combine, change nothing: the error is
    /// logged, kept for STATUS= and `lhb status` until a reload succeeds, and returned.
    /// The caller reconciles after a success.
    fn reload(&mut self) -> anyhow::Result<usize> {
        let result = (|| -> anyhow::Result<usize> {
            let f = config::load(&self.config_path)?;
            if f.mode
                .is_some_and(|m| self.cli_mode.is_none() && m != self.paths.mode)
            {
                warn!("config reload: a new `mode` takes effect at the next start");
            }
            if f.engine != self.file_engines {
                warn!("config reload: a new `engine` list takes effect at the next start");
            }
            let saved = self.rules.save();
            self.rules.set_file(f.rules);
            if let Err(e) = self.recombine() {
                self.rules.restore(saved);
                return Err(e);
            }
            self.label_allow =
                crate::model::labels::merge_allowed(&self.label_allow_cli, &f.label_allow);
            self.follow_labels();
            Ok(self.rules.len())
        })();
        match &result {
            Ok(n) => {
                info!(
                    "config reloaded from {}: {n} rule(s)",
                    self.config_path.display()
                );
                self.reload_error = None;
            }
            Err(e) => {
                error!(
                    "config reload failed: {e:#}; keeping the {} running rule(s)",
                    self.rules.len()
                );
                self.reload_error = Some(format!("{e:#}"));
                self.notifier.status(&self.summary());
            }
        }
        result
    }

    /// Takes the rules Docker networks' labels ask for now (and `label_allow` allows);
    /// logs each refused entry once, when it first appears.
    fn follow_labels(&mut self) {
        let view = self.engine_view();
        let taken = self.rules.follow_labels(view.as_ref(), &self.label_allow);
        if let Some(fresh) = taken.fresh
            && let Err(e) = fresh.and_then(|f| self.took(f))
        {
            error!("taking the rules of network labels: {e:#}");
        }
        for r in taken
            .refused
            .iter()
            .filter(|r| !self.label_refused.contains(r))
        {
            warn!("{r}");
        }
        self.label_refused = taken.refused;
    }

    /// The active rules from the rule set's parts: new rules' counters start at zero,
    /// and every rule's state is logged afresh at the next reconciliation. An error (a
    /// duplicate, too many rules) changes nothing.
    fn recombine(&mut self) -> anyhow::Result<()> {
        let fresh = self.rules.recombine()?;
        self.took(fresh)
    }

    /// After a recombination: the `fresh` slots' counters start at zero, and every
    /// rule's state is logged afresh.
    fn took(&mut self, fresh: Vec<u32>) -> anyhow::Result<()> {
        for &s in &fresh {
            self.clients.forget(s);
        }
        if let Some(k) = self.kernel.as_mut() {
            for s in fresh {
                k.reset_counters(s)?;
            }
        }
        self.applied.states.clear();
        Ok(())
    }
}
