//! Firewall integration: where the host's input filtering would drop the traffic lhb
//! serves (UFW, an INPUT drop policy, a drop rule, an nftables base chain that drops),
//! lhb adds an accept rule matching only the bridge interface, the gateway address, the
//! transport (TCP or UDP: an [`Opening`] each) and the port, tagged as lhb's, ahead of the
//! drop; it removes exactly that rule when the rule goes and on exit. Nothing else in the
//! ruleset is touched.
//!
//! One backend per firewall tool: `iptables` (the iptables binaries, nf_tables or legacy
//! variant: what UFW and Docker use), `nft` (native nftables base chains, one JSON batch
//! per opening) and `firewalld` (a runtime rich rule over D-Bus). An accept in one
//! nftables base chain does not stop another base chain from dropping, so every input
//! chain that would drop gets its own accept.

mod changes;
mod firewalld;
mod iptables;
mod nft;

pub use changes::subscribe as subscribe_changes;

use std::{collections::BTreeSet, fmt, net::IpAddr, process::Command};

use anyhow::Context as _;
use tracing::{info, warn};

pub use crate::model::config::FirewallMode;
pub use crate::model::rule::Transport;

/// Traffic lhb must let in: TCP or UDP to `gateway:port` arriving on `iface`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Opening {
    pub iface: String,
    pub gateway: IpAddr,
    pub port: u16,
    pub transport: Transport,
}

/// The traffic the firewall must let in for what is applied: every served gateway port,
/// on its bridge.
pub fn openings(plan: &crate::reconcile::Plan) -> BTreeSet<Opening> {
    let kernel = plan.endpoints.keys().filter_map(|k| {
        Some(Opening {
            iface: plan.attach.get(&k.ifindex)?.clone(),
            gateway: k.gateway,
            port: k.port,
            transport: Transport::Tcp,
        })
    });
    let proxied = plan.proxies.keys().map(|k| Opening {
        iface: k.bridge.clone(),
        gateway: k.gateway,
        port: k.port,
        transport: Transport::Tcp,
    });
    let forwarded = plan.udp.keys().map(|k| Opening {
        iface: k.bridge.clone(),
        gateway: k.gateway,
        port: k.port,
        transport: Transport::Udp,
    });
    kernel.chain(proxied).chain(forwarded).collect()
}

impl Opening {
    /// The tag every rule of lhb carries; it names the opening, so a rule can be found
    /// and removed (also by the next start, if this one crashed) without guessing.
    pub fn tag(&self) -> String {
        // TCP's tag is what it was before UDP existed: rules an earlier version left
        // behind are still recognised and removed.
        match self.transport {
            Transport::Tcp => format!("lhb {} {} {}", self.iface, self.gateway, self.port),
            Transport::Udp => format!("lhb {} {} {} udp", self.iface, self.gateway, self.port),
        }
    }

    /// The opening a tag names, if it is one of lhb's.
    pub fn from_tag(tag: &str) -> Option<Opening> {
        let mut w = tag.trim_matches('"').split_whitespace();
        if w.next()? != "lhb" {
            return None;
        }
        let mut o = Opening {
            iface: w.next()?.to_string(),
            gateway: w.next()?.parse().ok()?,
            port: w.next()?.parse().ok()?,
            transport: Transport::Tcp,
        };
        match w.next() {
            None => {}
            Some("udp") => o.transport = Transport::Udp,
            Some(_) => return None,
        }
        w.next().is_none().then_some(o)
    }
}

impl fmt::Display for Opening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} to {}:{} in on {}",
            self.transport.as_str(),
            self.gateway,
            self.port,
            self.iface
        )
    }
}

/// Refuses an opening whose interface name could read as a wildcard or as syntax in a
/// rule. Names from the command line are checked when parsed; this catches a bridge
/// found under a rule (a Docker network's bridge), whose name lhb did not choose.
fn check_iface(o: &Opening) -> anyhow::Result<()> {
    anyhow::ensure!(
        crate::model::rule::valid_ifname(&o.iface),
        "bridge name {:?} has characters lhb will not put into a firewall rule (only letters, digits, `_`, `.` and `-`)",
        o.iface
    );
    Ok(())
}

/// One accept rule a backend would add for an opening, or holds already.
#[derive(Clone, Debug)]
pub struct Insert {
    /// Where, as status reports it: `iptables INPUT`, `nft inet filter input`.
    pub chain: String,
    /// The rule in the tool's own syntax, exactly as lhb adds it.
    pub rule: String,
    /// lhb's tagged accept for this opening is in that chain already.
    pub present: bool,
    exec: Exec,
}

#[derive(Clone, Debug)]
enum Exec {
    /// A program and its arguments (iptables variants).
    Run(&'static str, Vec<String>),
    /// An nft rule, inserted at the top of its chain.
    Nft(Box<nftables::schema::Rule<'static>>),
    /// A firewalld runtime rich rule in a zone, over the backend's bus connection.
    Firewalld {
        conn: zbus::blocking::Connection,
        zone: String,
        rule: String,
    },
}

impl Insert {
    fn apply(&self) -> anyhow::Result<()> {
        match &self.exec {
            Exec::Run(bin, args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                run(bin, &args).map(drop)
            }
            Exec::Nft(rule) => nft::insert(rule),
            Exec::Firewalld { conn, zone, rule } => firewalld::add(conn, zone, rule),
        }
    }
}

/// What a first `sync` would do (`Firewall::plan`).
pub struct SyncPlan {
    /// Per wanted opening, the accept in each chain that needs one.
    pub inserts: Vec<(Opening, Insert)>,
    /// Accepts an earlier lhb left that are still wanted.
    pub kept: BTreeSet<Opening>,
    /// Accepts an earlier lhb left that are no longer wanted.
    pub removed: BTreeSet<Opening>,
}

/// One firewall tool.
trait Backend: Send {
    fn name(&self) -> String;
    /// The accept rule for `o` in every chain of this backend that would drop it, and
    /// whether it is there already. Read only: `lhb plan` shows these, `open` adds them.
    fn planned(&mut self, o: &Opening) -> anyhow::Result<Vec<Insert>>;
    /// Adds the accept rule to every chain of this backend that would drop it; the
    /// chains it went into.
    fn open(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
        let mut chains = Vec::new();
        for i in self.planned(o)? {
            if !i.present {
                i.apply()?;
            }
            chains.push(i.chain);
        }
        Ok(chains)
    }
    /// Removes every rule tagged for `o`.
    fn close(&mut self, o: &Opening) -> anyhow::Result<()>;
    /// `open` for each of `os`, with each one's answer; a backend that can writes them
    /// all in one transaction (1,000 rules: one program run instead of 1,000).
    fn open_all(&mut self, os: &[Opening]) -> Vec<anyhow::Result<Vec<String>>> {
        os.iter().map(|o| self.open(o)).collect()
    }
    /// `close` for each of `os`; in one transaction where the backend can.
    fn close_all(&mut self, os: &[Opening]) -> anyhow::Result<()> {
        let mut first_err = None;
        for o in os {
            if let Err(e) = self.close(o) {
                first_err.get_or_insert(e.context(format!("removing {o}")));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
    /// Every opening some earlier run left behind (tagged rules).
    fn leftovers(&mut self) -> anyhow::Result<BTreeSet<Opening>>;
    /// The chains of this backend that may drop `o` and hold no accept of lhb's for it,
    /// each with why it may drop. Read only.
    fn blockers(&mut self, o: &Opening) -> anyhow::Result<Vec<String>>;
    /// Which of `held` lack an accept in a chain that may drop them now (someone
    /// reloaded or rewrote the ruleset, or a dropping chain appeared). One read of the
    /// ruleset for all of them.
    fn missing(&mut self, held: &BTreeSet<Opening>) -> anyhow::Result<BTreeSet<Opening>>;
    /// Whether changes to this backend's rules are announced as nf_tables netlink
    /// notifications (nftables and iptables-nft; not legacy iptables).
    fn notified(&self) -> bool;
    /// While on, the ruleset is read once and that reading serves every question:
    /// for a batch of openings, whose own inserts do not change the answers for the
    /// others (each is asked about its own tag), so a sync of 1,000 openings reads each
    /// ruleset once instead of 1,000 times.
    fn memo(&mut self, _on: bool) {}
    /// How to let `o` in by hand with this tool, where it has its own way (doctor's fix).
    fn fix(&mut self, _o: &Opening) -> Option<String> {
        None
    }
    /// Says "changed" on `changed` whenever this tool may have dropped lhb's rules in a
    /// way nf_tables notifications do not tell (firewalld's reloads, over D-Bus).
    fn watch(&self, _changed: tokio::sync::mpsc::Sender<()>) {}
}

/// What the firewall side holds, for `lhb status` and metrics.
#[derive(Clone, Debug, Default)]
pub struct FirewallState {
    /// The openings held and the chains each went into.
    pub chains: std::collections::BTreeMap<Opening, Vec<String>>,
    /// Times lhb found its accepts gone (or a new dropping chain) and restored them.
    pub heals: u64,
    pub last_heal: Option<Heal>,
}

#[derive(Clone, Debug)]
pub struct Heal {
    pub at: std::time::SystemTime,
    /// `OPENING in CHAIN` for each accept put back.
    pub restored: Vec<String>,
}

/// Where the firewall side publishes what it holds; the daemon reads it for status.
pub type HeldChains = tokio::sync::watch::Receiver<FirewallState>;

pub struct Firewall {
    backends: Vec<Box<dyn Backend>>,
    held: BTreeSet<Opening>,
    state: tokio::sync::watch::Sender<FirewallState>,
}

impl Firewall {
    /// The backends `mode` asks for, among the tools this host has; leftovers of an
    /// earlier run are removed (the rules of this run are added by `sync`).
    /// Rules an earlier lhb left (a crash, --keep-on-exit) are adopted: the first `sync`
    /// keeps those still wanted, so the traffic they let in never stops, and removes
    /// the rest.
    pub fn new(mode: FirewallMode) -> Firewall {
        let mut fw = Firewall::detect(mode);
        fw.adopt_leftovers();
        fw
    }

    /// The backends `mode` asks for, among the tools this host has; nothing is changed.
    pub fn detect(mode: FirewallMode) -> Firewall {
        let mut backends: Vec<Box<dyn Backend>> = Vec::new();
        let firewalld = match mode {
            FirewallMode::Auto | FirewallMode::Firewalld => firewalld::Firewalld::detect(),
            _ => None,
        };
        if firewalld.is_none() && mode == FirewallMode::Firewalld {
            warn!(
                "firewall = firewalld, but firewalld does not run (its name {} has no owner on the system bus): no firewall rule is managed",
                "org.fedoraproject.FirewallD1"
            );
        }
        let has_firewalld = firewalld.is_some();
        if let Some(f) = firewalld {
            backends.push(Box::new(f));
        }
        if matches!(mode, FirewallMode::Auto | FirewallMode::Iptables) {
            backends.extend(iptables::detect());
        }
        if matches!(mode, FirewallMode::Auto | FirewallMode::Nftables)
            && let Some(n) = nft::Nft::detect(mode == FirewallMode::Auto, has_firewalld)
        {
            backends.push(Box::new(n));
        }
        Firewall {
            backends,
            held: BTreeSet::new(),
            state: tokio::sync::watch::Sender::new(FirewallState::default()),
        }
    }

    fn adopt_leftovers(&mut self) {
        let mut adopted = BTreeSet::new();
        for b in &mut self.backends {
            match b.leftovers() {
                Ok(left) => adopted.extend(left),
                Err(e) => warn!("firewall: reading {}: {e:#}", b.name()),
            }
        }
        if !adopted.is_empty() {
            info!(
                "firewall: adopted {} rule(s) an earlier lhb left (kept if still wanted)",
                adopted.len()
            );
        }
        self.held = adopted;
    }

    /// What `sync(wanted)` would do first on a fresh start, changing nothing: for each
    /// wanted opening the inserts (an opening an earlier lhb left is kept as it is),
    /// and the earlier openings it would remove.
    pub fn plan(&mut self, wanted: &BTreeSet<Opening>) -> anyhow::Result<SyncPlan> {
        let mut earlier = BTreeSet::new();
        for b in &mut self.backends {
            earlier.extend(
                b.leftovers()
                    .with_context(|| format!("reading {}", b.name()))?,
            );
        }
        let mut inserts = Vec::new();
        for o in wanted.difference(&earlier) {
            check_iface(o)?;
            for b in &mut self.backends {
                let planned = b
                    .planned(o)
                    .with_context(|| format!("{}: reading for {o}", b.name()))?;
                inserts.extend(planned.into_iter().map(|i| (o.clone(), i)));
            }
        }
        Ok(SyncPlan {
            inserts,
            kept: wanted.intersection(&earlier).cloned().collect(),
            removed: earlier.difference(wanted).cloned().collect(),
        })
    }

    /// Where `o` may be dropped: chains that may drop it and hold no accept for it.
    pub fn blockers(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
        let mut all = Vec::new();
        for b in &mut self.backends {
            all.extend(b.blockers(o)?);
        }
        Ok(all)
    }

    /// How to let `o` in by hand, in the first backend that has its own way.
    pub fn fix(&mut self, o: &Opening) -> Option<String> {
        self.backends.iter_mut().find_map(|b| b.fix(o))
    }

    pub fn chains(&self) -> HeldChains {
        self.state.subscribe()
    }

    pub fn backends(&self) -> Vec<String> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    /// Brings lhb's rules to exactly `wanted`.
    pub fn sync(&mut self, wanted: &BTreeSet<Opening>) -> anyhow::Result<()> {
        let mut first_err = None;
        let gone: Vec<Opening> = self.held.difference(wanted).cloned().collect();
        if !gone.is_empty() {
            for b in &mut self.backends {
                if let Err(e) = b.close_all(&gone) {
                    first_err.get_or_insert(e.context(b.name()));
                }
            }
            for o in gone {
                self.held.remove(&o);
                self.state.send_modify(|s| {
                    s.chains.remove(&o);
                });
                info!("firewall: closed {o}");
            }
        }
        // Once, before any backend writes it; heal() only reopens what passed here.
        let mut new = Vec::new();
        for o in wanted.difference(&self.held) {
            match check_iface(o) {
                Ok(()) => new.push(o.clone()),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if new.is_empty() {
            return first_err.map_or(Ok(()), Err);
        }
        let mut chains: Vec<Vec<String>> = vec![Vec::new(); new.len()];
        let mut failed = vec![false; new.len()];
        self.memo(true);
        for b in &mut self.backends {
            for (i, r) in b.open_all(&new).into_iter().enumerate() {
                match r {
                    Ok(c) => chains[i].extend(c),
                    Err(e) => {
                        failed[i] = true;
                        first_err.get_or_insert(e.context(format!(
                            "{}: adding {}",
                            b.name(),
                            new[i]
                        )));
                    }
                }
            }
        }
        self.memo(false);
        give_back_memory();
        for ((o, chains), failed) in new.into_iter().zip(chains).zip(failed) {
            if !chains.is_empty() {
                info!("firewall: opened {o} in {}", chains.join(", "));
            }
            self.state.send_modify(|s| {
                s.chains.insert(o.clone(), chains);
            });
            // Not held until every backend has it, so the retry opens it again (opening
            // is idempotent: a backend that has it already adds nothing).
            if !failed {
                self.held.insert(o);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn memo(&mut self, on: bool) {
        for b in &mut self.backends {
            b.memo(on);
        }
    }

    /// Puts back every accept of lhb's that is missing from a backend (`all`, or only
    /// the backends whose changes are not announced), reading each ruleset once. What
    /// was restored, as `OPENING in CHAIN`.
    pub fn heal(&mut self, all: bool) -> anyhow::Result<Vec<String>> {
        let mut restored = Vec::new();
        let mut first_err = None;
        for b in &mut self.backends {
            if !all && b.notified() {
                continue;
            }
            b.memo(true);
            let missing = b.missing(&self.held);
            let missing = match missing {
                Ok(m) => m,
                Err(e) => {
                    b.memo(false);
                    first_err.get_or_insert(e.context(format!("{}: reading", b.name())));
                    continue;
                }
            };
            let missing: Vec<Opening> = missing.into_iter().collect();
            for (o, opened) in missing.iter().zip(b.open_all(&missing)) {
                match opened {
                    Ok(chains) => self.state.send_modify(|state| {
                        let held = state.chains.entry(o.clone()).or_default();
                        for c in chains {
                            restored.push(format!("{o} in {c}"));
                            if !held.contains(&c) {
                                held.push(c);
                            }
                        }
                    }),
                    Err(e) => {
                        first_err.get_or_insert(e.context(format!("{}: restoring {o}", b.name())));
                    }
                }
            }
            b.memo(false);
        }
        give_back_memory();
        if !restored.is_empty() {
            warn!(
                "firewall: lhb's accept was gone (the ruleset was reloaded or changed); restored {}",
                restored.join(", ")
            );
            self.state.send_modify(|state| {
                state.heals += 1;
                state.last_heal = Some(Heal {
                    at: std::time::SystemTime::now(),
                    restored: restored.clone(),
                });
            });
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(restored),
        }
    }

    /// Whether some backend's changes come without a notification (legacy iptables):
    /// only a periodic check sees those.
    pub fn has_unnotified(&self) -> bool {
        self.backends.iter().any(|b| !b.notified())
    }

    pub fn holds_any(&self) -> bool {
        !self.held.is_empty()
    }

    /// Removes every rule lhb added.
    pub fn shutdown(&mut self) {
        if let Err(e) = self.sync(&BTreeSet::new()) {
            warn!("firewall: {e:#}");
        }
    }
}

/// The firewall as a task of its own: it follows the wanted openings, so that the data
/// path never waits for firewall tools (each change spawns several of them, which can
/// take seconds on a loaded host). Additions apply at once: a new rule must get through
/// a dropping firewall quickly. Removals wait [`REMOVAL_GRACE`] and are checked against
/// the latest wanted set then, so a bridge that is deleted and re-created with the same
/// name, gateway and port (Docker, libvirt) costs no firewall work at all. A failed sync
/// is retried every second.
pub struct FirewallTask {
    tx: tokio::sync::mpsc::UnboundedSender<Order>,
    task: tokio::task::JoinHandle<()>,
}

/// What the daemon tells the firewall task.
enum Order {
    /// Hold exactly these openings (removals after [`REMOVAL_GRACE`]).
    Want(BTreeSet<Opening>),
    /// Remove every rule lhb added (unless `keep`) and end.
    Stop { keep: bool },
}

pub const REMOVAL_GRACE: std::time::Duration = std::time::Duration::from_millis(1500);
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);
/// A burst of ruleset changes (a reload is many) is checked once, this long after it.
const CHANGES_SETTLE: std::time::Duration = std::time::Duration::from_millis(100);
/// How often tables that announce no changes (legacy iptables) are checked.
const UNNOTIFIED_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// Every this many periodic ticks, all backends are checked, in case a notification
/// was missed.
const FULL_CHECK_TICKS: u32 = 30;

impl FirewallTask {
    /// Takes over `fw`, whose rules already match `current`.
    pub fn spawn(
        mut fw: Firewall,
        current: BTreeSet<Opening>,
        tasks: &crate::host::tasks::Tasks,
    ) -> FirewallTask {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut wanted = current;
        // Subscribed before the task runs, so that from "ready" on no change is missed
        // (and the socket exists by then, not some time after).
        let (changed, rx_changes) = tokio::sync::mpsc::channel(1);
        let nft_notified = match changes::subscribe(changed.clone()) {
            Ok(()) => true,
            Err(e) => {
                warn!(
                    "firewall: no nftables change notifications ({e}); checking every {}s instead",
                    UNNOTIFIED_CHECK.as_secs()
                );
                false
            }
        };
        for b in &fw.backends {
            b.watch(changed.clone());
        }
        drop(changed);
        let mut changes = rx_changes;
        // Owned, not cancelled: only a Stop order ends it, after its rules are removed.
        let task = tasks.spawn_owned(async move {
            // When the next full sync (with removals) is due, if one is.
            let mut due: Option<tokio::time::Instant> = None;
            let mut tick = tokio::time::interval(UNNOTIFIED_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut ticks = 0u32;
            loop {
                let wake = async {
                    match due {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                };
                // None: no source of notifications is left; the periodic check remains.
                let changed = async {
                    match changes.recv().await {
                        Some(()) => Some(()),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    Some(()) = changed => {
                        tokio::time::sleep(CHANGES_SETTLE).await;
                        while changes.try_recv().is_ok() {}
                        if fw.holds_any() && let Err(e) = fw.heal(true) {
                            warn!("firewall: {e:#}");
                        }
                    }
                    _ = tick.tick() => {
                        ticks = ticks.wrapping_add(1);
                        let all = !nft_notified || ticks.is_multiple_of(FULL_CHECK_TICKS);
                        if fw.holds_any()
                            && (all || fw.has_unnotified())
                            && let Err(e) = fw.heal(all)
                        {
                            warn!("firewall: {e:#}");
                        }
                    }
                    cmd = rx.recv() => {
                        // Only the latest of a burst of changes matters.
                        let mut cmd = cmd.unwrap_or(Order::Stop { keep: false });
                        while let Order::Want(_) = cmd {
                            match rx.try_recv() {
                                Ok(next) => cmd = next,
                                Err(_) => break,
                            }
                        }
                        match cmd {
                            Order::Want(w) if w == wanted => continue,
                            Order::Want(w) => wanted = w,
                            Order::Stop { keep } => {
                                if !keep {
                                    fw.shutdown();
                                }
                                break;
                            }
                        }
                        let keep: BTreeSet<Opening> = fw.held.union(&wanted).cloned().collect();
                        if let Err(e) = fw.sync(&keep) {
                            warn!("firewall: {e:#} (retrying in {}s)", RETRY.as_secs());
                            due = Some(tokio::time::Instant::now() + RETRY);
                        } else if keep != wanted && due.is_none() {
                            due = Some(tokio::time::Instant::now() + REMOVAL_GRACE);
                        }
                    }
                    _ = wake => {
                        due = match fw.sync(&wanted) {
                            Ok(()) => None,
                            Err(e) => {
                                warn!("firewall: {e:#} (retrying in {}s)", RETRY.as_secs());
                                Some(tokio::time::Instant::now() + RETRY)
                            }
                        };
                    }
                }
            }
        });
        FirewallTask { tx, task }
    }

    pub fn want(&self, openings: BTreeSet<Opening>) {
        let _ = self.tx.send(Order::Want(openings));
    }

    /// Removes every rule lhb added (unless `keep`) and ends the task.
    pub async fn shutdown(self, keep: bool) {
        let _ = self.tx.send(Order::Stop { keep });
        let _ = self.task.await;
    }
}

/// Rulesets are read whole (nft's JSON listing of 1,000 rules is megabytes), and glibc's
/// allocator keeps freed memory for reuse: after a large read the daemon would stay at
/// that peak for good (measured: 25.6 MiB with 1,000 accepts in place, 13 MiB without).
fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; no pointer is involved. Not in
    // rustix or std: it is glibc's allocator's own function (musl returns memory itself).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs a firewall tool with `input` on its stdin; its stderr is the error.
fn run_with_input(program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    exec(program, args, Some(input)).map(drop)
}

/// Runs a firewall tool; its stderr is the error.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    exec(program, args, None)
}

/// Runs `program` (off the async workers), `input` on its stdin if given; its stdout,
/// or its stderr as the error.
fn exec(program: &str, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    use std::{io::Write as _, process::Stdio};
    let out = tokio::task::block_in_place(|| {
        let mut child = Command::new(program)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(|e| anyhow::anyhow!("running {program}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose chain may drop everything, whose first `open` fails, and which
    /// records the accepts it holds.
    #[derive(Default)]
    struct FailsOnce {
        opens: u32,
        has: std::sync::Arc<std::sync::Mutex<BTreeSet<Opening>>>,
    }

    impl Backend for FailsOnce {
        fn name(&self) -> String {
            "test".into()
        }
        fn planned(&mut self, _: &Opening) -> anyhow::Result<Vec<Insert>> {
            unreachable!("open is overridden")
        }
        fn open(&mut self, o: &Opening) -> anyhow::Result<Vec<String>> {
            self.opens += 1;
            if self.opens == 1 {
                anyhow::bail!("the xtables lock is busy");
            }
            self.has.lock().unwrap().insert(o.clone());
            Ok(vec!["test INPUT".into()])
        }
        fn close(&mut self, o: &Opening) -> anyhow::Result<()> {
            self.has.lock().unwrap().remove(o);
            Ok(())
        }
        fn leftovers(&mut self) -> anyhow::Result<BTreeSet<Opening>> {
            Ok(BTreeSet::new())
        }
        fn blockers(&mut self, _: &Opening) -> anyhow::Result<Vec<String>> {
            Ok(vec![])
        }
        fn missing(&mut self, held: &BTreeSet<Opening>) -> anyhow::Result<BTreeSet<Opening>> {
            let has = self.has.lock().unwrap();
            Ok(held.difference(&has).cloned().collect())
        }
        fn notified(&self) -> bool {
            true
        }
    }

    fn opening() -> Opening {
        Opening {
            iface: "br0".into(),
            gateway: "10.0.0.1".parse().unwrap(),
            port: 80,
            transport: Transport::Tcp,
        }
    }

    /// A firewall of `backend` alone, and what the backend holds.
    fn with(
        backend: FailsOnce,
    ) -> (
        Firewall,
        std::sync::Arc<std::sync::Mutex<BTreeSet<Opening>>>,
    ) {
        let has = backend.has.clone();
        let fw = Firewall {
            backends: vec![Box::new(backend)],
            held: BTreeSet::new(),
            state: tokio::sync::watch::Sender::new(FirewallState::default()),
        };
        (fw, has)
    }

    #[test]
    fn an_opening_that_failed_is_opened_by_the_retry() {
        let (mut fw, has) = with(FailsOnce::default());
        let wanted = BTreeSet::from([opening()]);
        assert!(fw.sync(&wanted).is_err());
        assert!(has.lock().unwrap().is_empty());
        fw.sync(&wanted).unwrap();
        assert_eq!(*has.lock().unwrap(), wanted);
        assert!(fw.holds_any());
    }

    #[test]
    fn an_accept_removed_under_lhb_is_restored_and_counted() {
        let (mut fw, has) = with(FailsOnce {
            opens: 1,
            ..FailsOnce::default()
        });
        let wanted = BTreeSet::from([opening()]);
        fw.sync(&wanted).unwrap();
        assert!(fw.heal(true).unwrap().is_empty(), "nothing to heal yet");
        has.lock().unwrap().clear();
        let restored = fw.heal(true).unwrap();
        assert_eq!(restored, vec![format!("{} in test INPUT", opening())]);
        assert_eq!(*has.lock().unwrap(), wanted);
        let state = fw.chains().borrow().clone();
        assert_eq!(state.heals, 1);
        assert_eq!(state.chains[&opening()], vec!["test INPUT".to_string()]);
    }

    #[test]
    fn tags_name_the_opening_and_nothing_else_parses() {
        let o = Opening {
            iface: "br-0123".into(),
            gateway: "172.18.0.1".parse().unwrap(),
            port: 11434,
            transport: Transport::Tcp,
        };
        assert_eq!(o.tag(), "lhb br-0123 172.18.0.1 11434");
        let u = Opening {
            transport: Transport::Udp,
            ..o.clone()
        };
        assert_eq!(u.tag(), "lhb br-0123 172.18.0.1 11434 udp");
        assert_eq!(Opening::from_tag(&u.tag()), Some(u.clone()));
        assert_eq!(u.to_string(), "udp to 172.18.0.1:11434 in on br-0123");
        assert_eq!(Opening::from_tag("lhb br0 10.0.0.1 53 sctp"), None);
        assert_eq!(Opening::from_tag(&o.tag()), Some(o.clone()));
        assert_eq!(Opening::from_tag(&format!("\"{}\"", o.tag())), Some(o));
        for other in [
            "lhb",
            "ufw rule",
            "lhb br0 x 80",
            "lhb br0 10.0.0.1 80 extra",
            "docker",
        ] {
            assert_eq!(Opening::from_tag(other), None, "{other}");
        }
    }
}
