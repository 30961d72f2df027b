//! `lhb run`: the long-running daemon.
//!
//! Flow: rules (command line + config file: desired state) + netlink and Docker
//! (observed state) -> [`reconcile::plan`] -> the difference to what is applied goes to
//! the kernel data path. Every link or address event, every Docker network change and
//! every SIGHUP (config reload) makes a new plan, so bridges that come, go, or come back
//! with a new ifindex or address are followed without polling. SIGINT/SIGTERM detach
//! everything before exit.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use thiserror::Error;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    caps, config, control,
    docker::{self, DockerView},
    firewall::{Firewall, FirewallMode, FirewallTask, Opening},
    kernel::KernelPath,
    netlink::Netlink,
    notify::Notifier,
    persist,
    proxy::{self, FD_RESERVE, FDS_PER_CONNECTION, Proxy, ProxyKey},
    reconcile::{self, Mode, Observed, Paths, Plan, RuleState},
    rule::{self, Rule, Source},
    status::{self, Status},
};

/// Events arriving in a burst (a bridge and its address, a veth and its port) are
/// coalesced: one snapshot after this quiet time covers all of them.
const SETTLE: Duration = Duration::from_millis(15);
/// An attachment that failed is retried this often until it succeeds or its bridge goes.
const RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two retries of something that keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long the start waits for the Docker engine's first answer before going on.
pub(crate) const DOCKER_FIRST_ANSWER: Duration = Duration::from_secs(3);

pub struct RunOptions {
    /// Rules from --expose and --expose-iface.
    pub cli_rules: Vec<Rule>,
    pub config: PathBuf,
    pub no_docker: bool,
    /// --mode, if given (it wins over the file's `mode`).
    pub mode: Option<Mode>,
    /// --firewall, if given (it wins over the file's `firewall`).
    pub firewall: Option<FirewallMode>,
    /// --max-connections, if given; else derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// The control socket (`lhb status`, `lhb expose`, `lhb unexpose`).
    pub control: PathBuf,
    /// Where the kernel path's links are pinned (bpffs).
    pub pin_dir: PathBuf,
    /// Leave the kernel path and the firewall rules serving on a clean exit.
    pub keep_on_exit: bool,
}

/// Listen backlog of proxy sockets: connection bursts wait in the kernel, not refused.
const PROXY_BACKLOG: i32 = 4096;

#[derive(Debug, Error)]
pub enum StartError {
    #[error(
        "no rule to serve: give --expose NETWORK:PORT[=TARGET] or --expose-iface IFACE:PORT[=TARGET] (e.g. `lhb run --expose bridge:11434`), or [[expose]] entries in {config}"
    )]
    NoRules { config: String },
    #[error(
        "missing capability {caps}: the kernel data path needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (run lhb as root, or grant them, e.g. AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_PERFMON in its unit; `lhb unit print` has them)",
        caps = .0.join(" and ")
    )]
    MissingCapabilities(Vec<&'static str>),
    #[error(
        "rule {rule}: interface {iface} is not a bridge; lhb serves containers on Linux bridges (docker0, br-*, virbr0, podman0, ...)"
    )]
    NotABridge { rule: String, iface: String },
    #[error(
        "rule {rule}: bridge {iface} has no IP address, so containers have no gateway to connect to (add one with `ip addr add ADDR/LEN dev {iface}`)"
    )]
    NoAddress { rule: String, iface: String },
    #[error("rule {rule}: {reason}")]
    Unservable { rule: String, reason: String },
}

/// Command-line rules first, then the file's; the same source and port only once.
pub(crate) fn combine(cli: &[Rule], file: Vec<Rule>) -> Result<Vec<Rule>, rule::RuleError> {
    let mut all = cli.to_vec();
    all.extend(file);
    rule::check_unique(&all)?;
    Ok(all)
}

/// Counter slots: a rule keeps its slot (and counters) across reloads.
#[derive(Default)]
pub(crate) struct Slots {
    by_rule: HashMap<(Source, u16), u32>,
    free: Vec<u32>,
    next: u32,
}

impl Slots {
    /// Slots for `rules`, in order, and the ones that are new (to be zeroed).
    pub(crate) fn assign(&mut self, rules: &[Rule]) -> (Vec<u32>, Vec<u32>) {
        let keys: Vec<(Source, u16)> = rules.iter().map(|r| (r.source.clone(), r.port)).collect();
        let gone: Vec<(Source, u16)> = self
            .by_rule
            .keys()
            .filter(|k| !keys.contains(k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(s) = self.by_rule.remove(&k) {
                self.free.push(s);
            }
        }
        let mut fresh = Vec::new();
        let slots = keys
            .into_iter()
            .map(|k| {
                *self.by_rule.entry(k).or_insert_with(|| {
                    let s = self.free.pop().unwrap_or_else(|| {
                        self.next += 1;
                        self.next - 1
                    });
                    fresh.push(s);
                    s
                })
            })
            .collect();
        (slots, fresh)
    }
}

struct Daemon {
    /// What is served: `cli_rules` + `file_rules` + `runtime_rules`, less `removed`.
    rules: Vec<Rule>,
    cli_rules: Vec<Rule>,
    file_rules: Vec<Rule>,
    /// `lhb expose` without --persist: until the next start.
    runtime_rules: Vec<Rule>,
    /// `lhb unexpose` without --persist of a command-line or file rule.
    removed: Vec<(Source, u16)>,
    config_path: PathBuf,
    reconcile_events: u64,
    last_error: Option<String>,
    /// `--mode` given on the command line (a `mode =` in a reloaded file does not apply).
    cli_mode: Option<Mode>,
    /// Why the last reload failed, until one succeeds: in STATUS= and `lhb status`.
    reload_error: Option<String>,
    /// Proxy listeners that could not be bound (another program holds the address),
    /// retried with backoff; the rest of the rules are served meanwhile.
    proxy_errors: BTreeMap<ProxyKey, String>,
    kernel_unavailable: Option<String>,
    firewall_backends: Vec<String>,
    firewall_chains: crate::firewall::HeldChains,
    notifier: Notifier,
    slots: Vec<u32>,
    slot_map: Slots,
    /// None where the kernel path is not used (--mode proxy, or it could not load).
    kernel: Option<KernelPath>,
    proxy: Proxy,
    /// Follows the applied plan on its own (see FirewallTask); None until the first
    /// plan is applied and the firewall matches it.
    firewall: Option<FirewallTask>,
    paths: Paths,
    netlink: Netlink,
    applied: Plan,
    docker: Option<watch::Receiver<DockerView>>,
}

impl Daemon {
    async fn observe(&self) -> anyhow::Result<Observed> {
        let mut observed = self.netlink.snapshot().await?;
        observed.docker = self.docker.as_ref().map(|d| d.borrow().clone());
        Ok(observed)
    }

    /// A new plan from what is observed now, applied; logs what changed.
    async fn reconcile(&mut self) -> bool {
        let observed = match self.observe().await {
            Ok(o) => o,
            Err(e) => {
                warn!("reading links and addresses: {e:#}");
                return true;
            }
        };
        let wanted = reconcile::plan(&self.rules, &self.slots, &observed, self.paths);
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
        } || !self.proxy_errors.is_empty();
        if log_states(&self.rules, &before, &self.applied.states) {
            self.notifier.status(&self.summary());
        }
        failed
    }

    fn summary(&self) -> String {
        let mut s = if self.rules.is_empty() {
            format!(
                "no rule yet: add [[expose]] entries to {}, then `lhb reload`",
                self.config_path.display()
            )
        } else {
            format!(
                "serving {} of {} rule(s)",
                serving(&self.applied),
                self.rules.len()
            )
        };
        if let Some(e) = &self.reload_error {
            s += &format!("; config reload FAILED, running rules kept: {e}");
        }
        s
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
            let old = std::mem::replace(&mut self.file_rules, f.rules);
            let rules = match self.combine_all() {
                Ok(r) => r,
                Err(e) => {
                    self.file_rules = old;
                    return Err(e);
                }
            };
            let n = rules.len();
            if let Err(e) = self.set_rules(rules) {
                self.file_rules = old;
                return Err(e);
            }
            Ok(n)
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

    /// The rule set from its parts; an error (duplicate) leaves it as it was.
    fn combine_all(&self) -> anyhow::Result<Vec<Rule>> {
        let all: Vec<Rule> = self
            .cli_rules
            .iter()
            .chain(&self.file_rules)
            .chain(&self.runtime_rules)
            .filter(|r| !self.removed.contains(&(r.source.clone(), r.port)))
            .cloned()
            .collect();
        rule::check_unique(&all)?;
        Ok(all)
    }

    fn origin(&self, r: &Rule) -> &'static str {
        let same = |o: &Rule| o.source == r.source && o.port == r.port;
        if self.runtime_rules.iter().any(same) {
            "runtime"
        } else if self.cli_rules.iter().any(same) {
            "command-line"
        } else {
            "config"
        }
    }

    /// Replaces the rule set (SIGHUP); counters of rules that stay are kept.
    fn set_rules(&mut self, rules: Vec<Rule>) -> anyhow::Result<()> {
        let (slots, fresh) = self.slot_map.assign(&rules);
        if let Some(k) = self.kernel.as_mut() {
            for s in fresh {
                k.reset_counters(s)?;
            }
        }
        // Rule order may change: states are per position, so start the log afresh.
        self.applied.states.clear();
        self.rules = rules;
        self.slots = slots;
        Ok(())
    }
}

pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let cfg = config::load(&opts.config)?;
    let mode = opts.mode.or(cfg.mode).unwrap_or_default();
    let firewall_mode = opts.firewall.or(cfg.firewall).unwrap_or_default();
    let file_rules = cfg.rules.clone();
    let rules = combine(&opts.cli_rules, cfg.rules)?;
    if rules.is_empty() {
        // A config file of the administrator's with no entry yet (the package's, for
        // one) is a daemon waiting for rules: it must not fail at every boot. With no
        // file and no flag there is nothing to wait for: a mistake, said at once.
        if !std::fs::metadata(&opts.config).is_ok_and(|m| m.is_file()) {
            return Err(StartError::NoRules {
                config: opts.config.display().to_string(),
            }
            .into());
        }
        warn!(
            "{} has no [[expose]] entry: nothing is served until one is added (then `lhb reload`) or `lhb expose` adds a rule",
            opts.config.display()
        );
    }

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;

    let (netlink, mut events) = Netlink::connect()?;
    let mut docker = (!opts.no_docker).then(docker::watch);
    if let Some(rx) = docker.as_mut() {
        let view = first_docker_view(rx).await;
        if !view.available {
            let why = view
                .problem
                .unwrap_or_else(|| format!("no answer within {}s", DOCKER_FIRST_ANSWER.as_secs()));
            warn!(
                "Docker engine not reachable ({why}): network rules wait for it, interface rules work (--no-docker silences this)"
            );
        }
    }

    let mut slot_map = Slots::default();
    let (slots, _) = slot_map.assign(&rules);
    let mut observed = netlink.snapshot().await?;
    observed.docker = docker.as_ref().map(|d| d.borrow().clone());

    // Bound before anything is loaded or attached: a second lhb stops here, touching
    // nothing.
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel(16);
    control::serve(&opts.control, ctl_tx.clone())?;
    let metrics = cfg
        .metrics
        .clone()
        .unwrap_or_else(|| control::MetricsAddr::Unix(opts.control.with_file_name("metrics.sock")));
    if let Err(e) = control::serve_metrics(&metrics, ctl_tx).await {
        control::remove_socket(&opts.control);
        return Err(e);
    }

    let mut kernel_unavailable = None;
    let kernel = match mode {
        Mode::Proxy => None,
        Mode::Kernel => match load_kernel_path(&opts.pin_dir) {
            Ok(k) => Some(k),
            Err(e) => {
                cleanup_sockets(&opts.control, &metrics);
                return Err(e);
            }
        },
        Mode::Auto => match load_kernel_path(&opts.pin_dir) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!("kernel path unavailable: {e:#}; using the proxy for every rule");
                kernel_unavailable = Some(format!("{e:#}"));
                None
            }
        },
    };
    let paths = Paths {
        mode,
        kernel: kernel.is_some(),
    };
    // From here on every early exit undoes what is in place: a failed start leaves no
    // link, pin, program or socket behind.
    if let Err(e) = preflight(&rules, &slots, &observed, paths) {
        if let Some(mut k) = kernel {
            k.shutdown(&netlink, false).await;
        }
        cleanup_sockets(&opts.control, &metrics);
        return Err(e.into());
    }

    let firewall = Firewall::new(firewall_mode);
    let mut d = Daemon {
        rules,
        cli_rules: opts.cli_rules.clone(),
        file_rules,
        runtime_rules: Vec::new(),
        removed: Vec::new(),
        config_path: opts.config.clone(),
        reconcile_events: 0,
        last_error: None,
        proxy_errors: BTreeMap::new(),
        cli_mode: opts.mode,
        reload_error: None,
        kernel_unavailable,
        firewall_backends: firewall.backends(),
        firewall_chains: firewall.chains(),
        notifier: Notifier::from_env(),
        slots,
        slot_map,
        kernel,
        proxy: Proxy::new(proxy_budget(opts.max_connections), PROXY_BACKLOG),
        firewall: None,
        paths,
        netlink,
        applied: Plan::default(),
        docker,
    };
    let mut firewall = firewall;
    let backends = firewall.backends();
    if backends.is_empty() {
        info!("firewall: none managed ({firewall_mode:?})");
    } else {
        info!("firewall: managing {}", backends.join(", "));
    }
    if let Some(k) = d.kernel.as_mut() {
        for &slot in &d.slots {
            if let Err(e) = k.reset_counters(slot) {
                d.shutdown(false).await;
                cleanup_sockets(&opts.control, &metrics);
                return Err(e.context("zeroing the kernel counters"));
            }
        }
        info!(
            attach = k.mode().as_str(),
            "kernel data path loaded ({} rule(s))",
            d.rules.len()
        );
    }

    // At start every interface rule's bridge exists (preflight), so a failure to attach
    // is fatal, and nothing stays behind. A proxy address held by another program is
    // not: that rule's gateway is retried while the others serve.
    let wanted = reconcile::plan(&d.rules, &d.slots, &observed, d.paths);
    if let Err(e) = d.apply(&wanted).await {
        d.shutdown(false).await;
        cleanup_sockets(&opts.control, &metrics);
        return Err(e);
    }
    // "Ready" means served, also through the host's firewall: the first sync is done here.
    let opened = openings(&d.applied);
    if let Err(e) = firewall.sync(&opened) {
        firewall.shutdown();
        d.shutdown(false).await;
        cleanup_sockets(&opts.control, &metrics);
        return Err(e.context("firewall"));
    }
    d.firewall = Some(FirewallTask::spawn(firewall, opened));
    if let Some(k) = d.kernel.as_mut() {
        k.release_earlier();
    }
    log_states(&d.rules, &[], &d.applied.states);
    info!(
        "ready: serving {} of {} rule(s); control socket {}",
        serving(&d.applied),
        d.rules.len(),
        opts.control.display()
    );
    d.notifier.ready(&d.summary());
    let watchdog = Notifier::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));

    let mut retry_pending = !d.proxy_errors.is_empty();
    let mut retry_delay = RETRY;
    loop {
        let docker_changed = async {
            match d.docker.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            _ = sighup.recv() => {
                d.reconcile_events += 1;
                if d.reload().is_err() {
                    continue;
                }
            }
            call = ctl_rx.recv() => {
                let Some((req, reply)) = call else { continue };
                let (resp, failed) = d.handle(req).await;
                let _ = reply.send(resp);
                if let Some(f) = failed {
                    retry_pending = f;
                }
                continue;
            }
            ev = events.next() => {
                if ev.is_none() {
                    d.shutdown(false).await;
                    bail!("the rtnetlink event socket closed; cannot follow bridges any more");
                }
                tokio::time::sleep(SETTLE).await;
                events.drain();
                d.reconcile_events += 1;
            }
            ok = docker_changed => {
                if !ok {
                    d.docker = None;
                }
                d.reconcile_events += 1;
            }
            _ = tokio::time::sleep(retry_delay), if retry_pending => {
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
                retry_pending = d.reconcile().await;
                if !retry_pending {
                    retry_delay = RETRY;
                }
                continue;
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                // Sent from the loop itself: a stuck loop stops the pings.
                d.notifier.send("WATCHDOG=1");
                continue;
            }
        }
        retry_pending = d.reconcile().await;
        if !retry_pending {
            retry_delay = RETRY;
        }
    }

    for (rule, slot) in d.rules.iter().zip(&d.slots) {
        if let Some(Ok(c)) = d.kernel.as_ref().map(|k| k.counters(*slot)) {
            debug!(rule = %rule, connections = c.connections, no_listener = c.no_listener,
                   errors = c.errors, "final kernel counters");
        }
        let p = d.proxy.counters(*slot);
        debug!(rule = %rule, connections = ?p.connections, bytes = ?p.bytes,
               target_errors = ?p.target_errors, over_limit = ?p.over_limit, "final proxy counters");
    }
    d.notifier.stopping();
    d.shutdown(opts.keep_on_exit).await;
    cleanup_sockets(&opts.control, &metrics);
    if opts.keep_on_exit {
        info!(
            "--keep-on-exit: the kernel path and the firewall rules stay for the next start; proxy listeners closed; bye"
        );
    } else {
        info!("detached from every bridge and closed every listener; bye");
    }
    Ok(())
}

/// What the engine says within [`DOCKER_FIRST_ANSWER`] of the start; whether it
/// answered or not, the view says what is known.
pub(crate) async fn first_docker_view(
    rx: &mut tokio::sync::watch::Receiver<docker::DockerView>,
) -> docker::DockerView {
    let _ = tokio::time::timeout(
        DOCKER_FIRST_ANSWER,
        rx.wait_for(|v| v.available || v.problem.is_some()),
    )
    .await;
    rx.borrow().clone()
}

/// How many connections the proxy may carry: each holds [`FDS_PER_CONNECTION`] fds,
/// and [`FD_RESERVE`] stay free so the control and metrics sockets always answer.
fn proxy_budget(asked: Option<usize>) -> usize {
    let nofile = raise_nofile_limit();
    let budget = (nofile.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION).max(1) as usize;
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
    info!("proxy: at most {max} connection(s) at once (open-file limit {nofile})");
    max
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (systemd's default soft limit, 1024,
/// is meant for select(2) users; lhb uses epoll); the soft limit in force after.
fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

fn cleanup_sockets(control: &std::path::Path, metrics: &control::MetricsAddr) {
    control::remove_socket(control);
    if let control::MetricsAddr::Unix(p) = metrics {
        control::remove_socket(p);
    }
}

/// The kernel path, or why it cannot be used here.
pub(crate) fn load_kernel_path(pin_dir: &std::path::Path) -> anyhow::Result<KernelPath> {
    let eff = caps::effective().context("reading this process's capabilities")?;
    let missing = caps::missing_for_kernel_path(eff);
    if !missing.is_empty() {
        return Err(StartError::MissingCapabilities(missing).into());
    }
    Ok(KernelPath::load(pin_dir)?)
}

impl Daemon {
    /// Detaches and removes everything, or with `keep` leaves the kernel path and the
    /// firewall rules serving for the next start to take over (the proxy cannot stay).
    async fn shutdown(&mut self, keep: bool) {
        if let Some(fw) = self.firewall.take() {
            fw.shutdown(keep).await;
        }
        self.proxy.shutdown();
        if let Some(k) = self.kernel.as_mut() {
            k.shutdown(&self.netlink, keep).await;
        }
    }

    /// Brings both data paths from what is applied to `wanted`. A failed attachment or
    /// bind is left out of `applied`, so the next call tries again. Returns the kernel
    /// path's error; proxy binds that failed are in `proxy_errors`.
    async fn apply(&mut self, wanted: &Plan) -> anyhow::Result<()> {
        let mut first_err: Option<anyhow::Error> = None;
        if let Some(kernel) = self.kernel.as_mut()
            && let Err(e) = apply_kernel(kernel, &self.netlink, &mut self.applied, wanted).await
        {
            first_err = Some(e.into());
        }
        let gone: Vec<_> = self
            .applied
            .proxies
            .iter()
            .filter(|(k, t)| wanted.proxies.get(*k) != Some(*t))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.proxy.close(&key);
            self.applied.proxies.remove(&key);
            info!(bridge = %key.bridge, "proxy stopped listening on {}:{}", key.gateway, key.port);
        }
        self.proxy_errors
            .retain(|k, _| wanted.proxies.contains_key(k));
        for (key, target) in &wanted.proxies {
            if self.applied.proxies.contains_key(key) {
                continue;
            }
            match self.proxy.listen(key, *target) {
                Ok(()) => {
                    self.applied.proxies.insert(key.clone(), *target);
                    self.proxy_errors.remove(key);
                    info!(bridge = %key.bridge, "proxy listening on {}:{} (bound to {}) -> {}; the service sees clients as {}",
                          key.gateway, key.port, key.bridge, target.target, proxy::seen_as(key.ifindex, target));
                }
                Err(e) => {
                    // Never fatal: a local user who bound the port first must not be
                    // able to stop lhb serving every other rule. Retried with backoff.
                    let e = format!(
                        "proxy for {}:{} on {}: {e} (`lhb doctor` names the process; retrying)",
                        key.gateway, key.port, key.bridge
                    );
                    if self.proxy_errors.get(key) != Some(&e) {
                        error!("{e}");
                    }
                    self.proxy_errors.insert(key.clone(), e);
                }
            }
        }
        self.share_proxy();
        if let Some(fw) = &self.firewall {
            fw.want(openings(&self.applied));
        }
        self.applied.states = wanted.states.clone();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Daemon {
    /// Each proxied rule's share of the proxy's connections: its `max_connections`, or
    /// an equal part of the total.
    fn share_proxy(&self) {
        let proxied: std::collections::BTreeSet<u32> =
            self.applied.proxies.values().map(|t| t.slot).collect();
        let share = (self.proxy.max_connections() / proxied.len().max(1)).max(1);
        let limits = self
            .rules
            .iter()
            .zip(&self.slots)
            .filter(|(_, s)| proxied.contains(s))
            .map(|(r, &s)| (s, r.max_connections.unwrap_or(share)))
            .collect();
        self.proxy.set_limits(&limits);
    }
}

/// The traffic the firewall must let in for what is applied: every served gateway port,
/// on its bridge.
pub(crate) fn openings(plan: &Plan) -> std::collections::BTreeSet<Opening> {
    let kernel = plan.endpoints.keys().filter_map(|k| {
        let iface = plan.attach.get(&k.ifindex)?.clone();
        let gateway = if k.family == lhb_common::FAMILY_V4 {
            std::net::IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
        } else {
            std::net::IpAddr::from(k.addr)
        };
        Some(Opening {
            iface,
            gateway,
            port: k.port,
        })
    });
    let proxied = plan.proxies.keys().map(|k| Opening {
        iface: k.bridge.clone(),
        gateway: k.gateway,
        port: k.port,
    });
    kernel.chain(proxied).collect()
}

/// A rule as `lhb status` shows it, from where it stands; counters, firewall rules
/// and errors are the running daemon's to add. `lhb plan` shows the same view.
pub(crate) fn rule_view(
    rule: &Rule,
    origin: &str,
    state: Option<&RuleState>,
    proxies: &BTreeMap<ProxyKey, proxy::ProxyTarget>,
) -> status::RuleStatus {
    let mut r = status::RuleStatus {
        port: rule.port,
        target: rule.target.to_string(),
        service: rule.service.clone(),
        origin: origin.to_string(),
        ..Default::default()
    };
    match &rule.source {
        Source::Network(n) => r.network = Some(n.clone()),
        Source::Interface(n) => r.interface = Some(n.clone()),
    }
    match state {
        Some(RuleState::Serving {
            bridge,
            ifindex,
            gateways,
            proxied,
            skipped,
        }) => {
            r.state = "serving".into();
            r.bridge = Some(bridge.clone());
            r.ifindex = Some(*ifindex);
            let gw = |a: &std::net::IpAddr, path: &str, why: Option<&str>| status::GatewayStatus {
                address: a.to_string(),
                path: path.into(),
                why: why.map(String::from),
                ..Default::default()
            };
            r.gateways.extend(gateways.iter().map(|a| {
                let mut g = gw(a, "kernel", None);
                g.client_seen_as = Some("the container's own address".into());
                g
            }));
            r.gateways.extend(proxied.iter().map(|(a, why)| {
                let mut g = gw(a, "proxy", Some(why));
                let key = ProxyKey {
                    bridge: bridge.clone(),
                    ifindex: *ifindex,
                    gateway: *a,
                    port: rule.port,
                };
                if let Some(t) = proxies.get(&key) {
                    g.client_seen_as = Some(proxy::seen_as(*ifindex, t));
                }
                g
            }));
            r.gateways
                .extend(skipped.iter().map(|(a, why)| gw(a, "none", Some(why))));
        }
        Some(RuleState::Waiting(why)) => {
            r.state = "waiting".into();
            r.reason = Some(why.clone());
        }
        None => {
            r.state = "waiting".into();
            r.reason = Some("not applied yet".into());
        }
    }
    r
}

fn serving(plan: &Plan) -> usize {
    plan.states
        .iter()
        .filter(|s| matches!(s, RuleState::Serving { .. }))
        .count()
}

/// Refuses, before anything is attached, interface rules that cannot work at all (not a
/// bridge, no address). A bridge that does not exist yet is waited for, as a Docker
/// network is.
pub(crate) fn preflight(
    rules: &[Rule],
    slots: &[u32],
    observed: &Observed,
    paths: Paths,
) -> Result<(), StartError> {
    let plan = reconcile::plan(rules, slots, observed, paths);
    for (rule, state) in rules.iter().zip(&plan.states) {
        let Source::Interface(iface) = &rule.source else {
            continue;
        };
        let r = rule.to_string();
        match observed.links.get(iface) {
            // Waits, like a network rule: a bridge may come up after lhb (libvirt's
            // virbr0 after boot). A typo shows at once as a warning, in `lhb status`
            // and in `lhb doctor`.
            None => continue,
            Some(l) if !l.is_bridge => {
                return Err(StartError::NotABridge {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Some(l) if l.addrs.is_empty() => {
                return Err(StartError::NoAddress {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            // Waits, like a rule whose bridge has not appeared: the uplink may be
            // removed, and the reason is logged and in `lhb status`.
            Some(l) if !l.uplinks.is_empty() && !rule.allow_uplinks => continue,
            Some(_) => {}
        }
        if let RuleState::Waiting(reason) = state {
            return Err(StartError::Unservable {
                rule: r,
                reason: reason.clone(),
            });
        }
    }
    Ok(())
}

/// Brings the kernel path from `applied` to `wanted`. On an attach failure the bridge's
/// endpoints are left out of `applied`, so the next call tries again.
async fn apply_kernel(
    kernel: &mut KernelPath,
    netlink: &Netlink,
    applied: &mut Plan,
    wanted: &Plan,
) -> Result<(), crate::kernel::KernelPathError> {
    let d = reconcile::diff(applied, wanted);
    if d.is_empty() {
        return Ok(());
    }
    for key in &d.remove_endpoints {
        kernel.remove_endpoint(key);
        applied.endpoints.remove(key);
    }
    for (ifindex, name) in &d.detach {
        kernel.detach(*ifindex, netlink).await;
        applied.attach.remove(ifindex);
        info!(bridge = %name, ifindex, "detached");
    }
    let mut first_err = None;
    for (ifindex, name) in &d.attach {
        match kernel.attach(*ifindex, name) {
            Ok(()) => {
                applied.attach.insert(*ifindex, name.clone());
                info!(bridge = %name, ifindex, mode = kernel.mode().as_str(), "attached");
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    for (key, steer) in &d.upsert_endpoints {
        if !applied.attach.contains_key(&key.ifindex) {
            continue;
        }
        match kernel.upsert_endpoint(*key, *steer) {
            Ok(()) => {
                applied.endpoints.insert(*key, *steer);
            }
            Err(e) => {
                first_err.get_or_insert(crate::kernel::KernelPathError::Load(format!(
                    "writing an endpoint to the map: {e:#}"
                )));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// One log line per rule whose state changed.
fn log_states(rules: &[Rule], before: &[RuleState], after: &[RuleState]) -> bool {
    let mut changed = before.len() != after.len();
    for (i, (rule, state)) in rules.iter().zip(after).enumerate() {
        if before.get(i) == Some(state) {
            continue;
        }
        changed = true;
        match state {
            RuleState::Serving {
                bridge,
                ifindex,
                gateways,
                proxied,
                skipped,
            } => {
                for gw in gateways {
                    info!(
                        service = %rule.service,
                        "serving {rule}: containers on {bridge} (ifindex {ifindex}) connect to {}; data path: kernel",
                        std::net::SocketAddr::new(*gw, rule.port)
                    );
                }
                for (gw, why) in proxied {
                    info!(
                        service = %rule.service,
                        "serving {rule}: containers on {bridge} (ifindex {ifindex}) connect to {}; data path: proxy ({why})",
                        std::net::SocketAddr::new(*gw, rule.port)
                    );
                }
                for (gw, why) in skipped {
                    info!(service = %rule.service, "{rule}: not serving gateway {gw}: {why}");
                }
            }
            RuleState::Waiting(why) => {
                warn!(service = %rule.service, "not serving {rule}: {why}");
            }
        }
    }
    changed
}

/// The answer to an expose/unexpose, and whether the reconciliation after it failed.
fn changed(r: anyhow::Result<(String, bool)>) -> (control::Response, Option<bool>) {
    match r {
        Ok((msg, failed)) => (
            control::Response {
                ok: true,
                message: Some(msg),
                ..Default::default()
            },
            Some(failed),
        ),
        Err(e) => (control::Response::error(format!("{e:#}")), None),
    }
}

/// The control socket's requests.
impl Daemon {
    /// The answer, and for changes whether the reconciliation that followed failed.
    async fn handle(&mut self, req: control::Request) -> (control::Response, Option<bool>) {
        use control::{Request, Response};
        match req {
            Request::Status => (
                Response {
                    ok: true,
                    status: Some(self.status()),
                    ..Default::default()
                },
                None,
            ),
            Request::Expose {
                spec,
                iface,
                service,
                persist,
            } => changed(self.expose(&spec, iface, service, persist).await),
            Request::Unexpose {
                spec,
                iface,
                persist,
            } => changed(self.unexpose(&spec, iface, persist).await),
            Request::Reload => {
                self.reconcile_events += 1;
                let r = match self.reload() {
                    Ok(n) => {
                        let failed = self.reconcile().await;
                        // STATUS= loses the reload error even when nothing else changed.
                        self.notifier.status(&self.summary());
                        Ok((
                            format!(
                                "config reloaded from {}: {n} rule(s); {}",
                                self.config_path.display(),
                                self.summary()
                            ),
                            failed,
                        ))
                    }
                    Err(e) => Err(e.context(format!(
                        "config reload from {} failed; the {} running rule(s) are kept",
                        self.config_path.display(),
                        self.rules.len()
                    ))),
                };
                changed(r)
            }
        }
    }

    async fn expose(
        &mut self,
        spec: &str,
        iface: bool,
        service: Option<String>,
        persist: bool,
    ) -> anyhow::Result<(String, bool)> {
        let mut rule = rule::parse_spec_for(spec, iface)?;
        rule.given = format!("lhb expose {spec}");
        if let Some(s) = service {
            rule.service = s;
        }
        let key = (rule.source.clone(), rule.port);
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.source == key.0 && r.port == key.1)
        {
            bail!(
                "{}:{} is already exposed ({}, from the {}); `lhb unexpose` it first to change it",
                key.0,
                key.1,
                r,
                self.origin(r)
            );
        }
        let saved = (
            self.file_rules.clone(),
            self.runtime_rules.clone(),
            self.removed.clone(),
        );
        if persist {
            persist::add(&self.config_path, &rule)?;
            self.file_rules = config::load(&self.config_path)?.rules;
        } else {
            self.runtime_rules.push(rule.clone());
        }
        self.removed.retain(|k| *k != key);
        let rules = match self.combine_all() {
            Ok(r) => r,
            Err(e) => {
                (self.file_rules, self.runtime_rules, self.removed) = saved;
                return Err(e);
            }
        };
        self.set_rules(rules)?;
        let failed = self.reconcile().await;
        let where_ = if persist {
            format!("added to {}", self.config_path.display())
        } else {
            "until lhb restarts; --persist keeps it".to_string()
        };
        Ok((
            format!("exposed {rule} ({where_}): {}", self.state_of(&key)),
            failed,
        ))
    }

    async fn unexpose(
        &mut self,
        spec: &str,
        iface: bool,
        persist: bool,
    ) -> anyhow::Result<(String, bool)> {
        let parsed = rule::parse_spec_for(spec, iface)?;
        let key = (parsed.source.clone(), parsed.port);
        let same = |r: &Rule| r.source == key.0 && r.port == key.1;
        let Some(rule) = self.rules.iter().find(|r| same(r)).cloned() else {
            bail!(
                "no rule {}:{} is exposed (`lhb status` lists them{})",
                key.0,
                key.1,
                if iface {
                    ""
                } else {
                    "; a bridge interface needs --iface"
                }
            );
        };
        let origin = self.origin(&rule);
        let saved = (self.file_rules.clone(), self.removed.clone());
        if persist {
            if !self.file_rules.iter().any(same) {
                bail!(
                    "{}:{} is not in {} (it comes from the {origin}); without --persist it is removed until lhb restarts",
                    key.0,
                    key.1,
                    self.config_path.display()
                );
            }
            persist::remove(&self.config_path, &key.0, key.1)?;
            self.file_rules = config::load(&self.config_path)?.rules;
        }
        self.runtime_rules.retain(|r| !same(r));
        if (self.cli_rules.iter().any(same) || self.file_rules.iter().any(same))
            && !self.removed.contains(&key)
        {
            self.removed.push(key.clone());
        }
        let rules = match self.combine_all() {
            Ok(r) => r,
            Err(e) => {
                (self.file_rules, self.removed) = saved;
                return Err(e);
            }
        };
        self.set_rules(rules)?;
        let failed = self.reconcile().await;
        let note = match (persist, origin) {
            (true, _) => format!("; removed from {}", self.config_path.display()),
            (false, "runtime") => String::new(),
            (false, o) => format!(
                " until lhb restarts (it comes from the {o}; --persist removes it from the config file)"
            ),
        };
        Ok((format!("unexposed {rule}{note}"), failed))
    }

    /// Where one rule stands, in words.
    fn state_of(&self, key: &(Source, u16)) -> String {
        let Some(i) = self
            .rules
            .iter()
            .position(|r| r.source == key.0 && r.port == key.1)
        else {
            return "gone".into();
        };
        match self.applied.states.get(i) {
            Some(RuleState::Serving {
                bridge,
                gateways,
                proxied,
                ..
            }) => {
                let mut at: Vec<String> = gateways
                    .iter()
                    .map(|g| format!("{} (kernel)", std::net::SocketAddr::new(*g, key.1)))
                    .collect();
                at.extend(
                    proxied
                        .iter()
                        .map(|(g, _)| format!("{} (proxy)", std::net::SocketAddr::new(*g, key.1))),
                );
                format!("serving on {bridge} at {}", at.join(", "))
            }
            Some(RuleState::Waiting(why)) => format!("waiting: {why}"),
            None => "not applied yet".into(),
        }
    }

    fn status(&self) -> Status {
        let fw = self
            .firewall_chains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let chains = &fw.chains;
        let mut rules = Vec::new();
        for (i, (rule, &slot)) in self.rules.iter().zip(&self.slots).enumerate() {
            let mut r = rule_view(
                rule,
                self.origin(rule),
                self.applied.states.get(i),
                &self.applied.proxies,
            );
            if let Some(RuleState::Serving { bridge, .. }) = self.applied.states.get(i) {
                for g in r.gateways.iter_mut().filter(|g| g.path == "proxy") {
                    let key = g.address.parse().ok().map(|gateway| ProxyKey {
                        bridge: bridge.clone(),
                        ifindex: r.ifindex.unwrap_or_default(),
                        gateway,
                        port: rule.port,
                    });
                    g.error = key.and_then(|k| self.proxy_errors.get(&k).cloned());
                }
                for (o, c) in chains {
                    if &o.iface == bridge && o.port == rule.port && !c.is_empty() {
                        r.firewall.push(format!("{o}: {}", c.join(", ")));
                    }
                }
                if let Some(e) = &self.last_error
                    && e.contains(bridge.as_str())
                {
                    r.last_error = Some(e.clone());
                }
            }
            if let Some(Ok(c)) = self.kernel.as_ref().map(|k| k.counters(slot)) {
                r.counters.kernel_connections = c.connections;
                r.counters.kernel_no_listener = c.no_listener;
                r.counters.kernel_errors = c.errors;
            }
            let p = self.proxy.counters(slot);
            let get =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            r.counters.proxy_connections = get(&p.connections);
            r.counters.proxy_active = get(&p.active);
            r.counters.proxy_bytes = get(&p.bytes);
            r.counters.proxy_target_errors = get(&p.target_errors);
            r.counters.proxy_over_limit = get(&p.over_limit);
            r.counters.proxy_max_connections = get(&p.limit);
            r.counters.proxy_accept_errors = get(&p.accept_errors);
            rules.push(r);
        }
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            mode: match self.paths.mode {
                Mode::Auto => "auto",
                Mode::Kernel => "kernel",
                Mode::Proxy => "proxy",
            }
            .into(),
            kernel_attach: self.kernel.as_ref().map(|k| k.mode().as_str().to_string()),
            kernel_unavailable: self.kernel_unavailable.clone(),
            docker: self.docker.as_ref().map(|d| {
                let v = d.borrow();
                status::DockerStatus {
                    available: v.available,
                    problem: v.problem.clone(),
                }
            }),
            firewall: status::FirewallStatus {
                backends: self.firewall_backends.clone(),
                rules: chains
                    .iter()
                    .flat_map(|(o, c)| c.iter().map(move |c| format!("{o} in {c}")))
                    .collect(),
                heals: fw.heals,
                last_heal: fw.last_heal.as_ref().map(|h| status::HealStatus {
                    unix_time: status::unix_time(h.at),
                    restored: h.restored.clone(),
                }),
            },
            config: self.config_path.display().to_string(),
            reconcile_events: self.reconcile_events,
            reload_error: self.reload_error.clone(),
            requests: status::RequestCounters {
                bad: control::BAD_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
                busy: control::BUSY_REQUESTS.load(std::sync::atomic::Ordering::Relaxed),
            },
            rules,
        }
    }
}
