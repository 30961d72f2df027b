//! The kernel data path driver: loads the programs once, attaches the socket-lookup
//! program to this network namespace and the TC program to each bridge, writes the
//! endpoint map and reads the per-rule counters. lhb-ebpf's header says how the two
//! programs share the work.
//!
//! Attachment uses TCX on kernels that have it (6.6+) and a clsact qdisc with a netlink
//! filter elsewhere; a clsact qdisc lhb had to create is removed again when its bridge is
//! detached.
//!
//! Surviving the daemon: the socket-lookup and TCX links are pinned in bpffs (the pin
//! directory, one per lhb), and netlink filters outlive processes anyway, so after a
//! crash (or an exit with --keep-on-exit) the programs keep serving with the maps they
//! had. The next start attaches its own programs first and then releases the earlier
//! ones: no moment without a program. A clean exit removes everything.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        ProgramError, SchedClassifier, SkLookup, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLinkId, TcError},
    },
    util::KernelVersion,
};
use lhb_common::{
    ALLOW_MAP, AllowAddr, CLIENTS_MAP, COUNTERS_MAP, ClientKey, ClientSeen, Counters,
    ENDPOINTS_MAP, EndpointKey, INGRESS_PROGRAM, INGRESS_TICKET_PROGRAM, MAX_RULES,
    SK_LOOKUP_PROGRAM, SK_LOOKUP_TICKET_PROGRAM, Steer,
};
use thiserror::Error;

use crate::reconcile::{Endpoint, Steering};
use tracing::{debug, info, warn};

#[derive(Debug, Error)]
pub enum KernelPathError {
    #[error(
        "the kernel refused to load lhb's eBPF program ({0}); lhb needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (run as root or grant them)"
    )]
    Permission(io::Error),
    #[error("the kernel's verifier rejected lhb's eBPF program: {error}\n{log}")]
    Verifier { error: io::Error, log: String },
    #[error("loading lhb's eBPF program failed: {0}")]
    Load(String),
    #[error("attaching to bridge {iface} failed: {reason}")]
    Attach { iface: String, reason: String },
    #[error(
        "attaching the socket-lookup program to this network namespace failed: {0} (needs Linux 5.9 or later)"
    )]
    SkLookup(String),
    #[error(
        "this kernel has no socket-lookup programs (BPF_PROG_TYPE_SK_LOOKUP, Linux 5.9 or later), which the kernel path needs: {0}"
    )]
    NoSkLookup(String),
}

/// Which pair of programs serves: how the socket lookup knows a SYN came in through
/// the rule's bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The lookup reads the interface from its context (`ingress_ifindex`, 5.17+).
    Ifindex,
    /// The TC program gives each admitted SYN a per-CPU ticket that the lookup checks
    /// (5.9 to 5.16, where the context has no `ingress_ifindex`).
    Ticket,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Ifindex => "ingress-ifindex",
            Variant::Ticket => "syn-ticket",
        }
    }

    /// Why this variant, in words for the log, status, plan and doctor.
    pub fn why(self, forced: bool) -> &'static str {
        match (self, forced) {
            (Variant::Ticket, true) => "forced by LHB_KERNEL_VARIANT=ticket",
            (Variant::Ticket, false) => {
                "the verifier refused the socket lookup's ingress_ifindex (a kernel before 5.17): each SYN the bridge's TC program admits gets a ticket the lookup checks"
            }
            (Variant::Ifindex, _) => "the socket lookup reads the interface a SYN came in by",
        }
    }

    fn programs(self) -> (&'static str, &'static str) {
        match self {
            Variant::Ifindex => (INGRESS_PROGRAM, SK_LOOKUP_PROGRAM),
            Variant::Ticket => (INGRESS_TICKET_PROGRAM, SK_LOOKUP_TICKET_PROGRAM),
        }
    }
}

/// What loading one socket-lookup program told.
#[derive(Debug)]
pub enum LoadOutcome {
    Loaded,
    /// The verifier refused it (EACCES/EINVAL with a log): a context field this kernel
    /// does not have.
    Refused(String),
    /// The kernel does not know the program type at all (before 5.9), or another
    /// failure that no variant can get around.
    Failed(KernelPathError),
}

/// The variant from the verifier's answers: the modern program first; the ticket one
/// only where the modern one was refused. A forced ticket variant skips the first.
pub fn choose_variant(
    modern: Option<LoadOutcome>,
    ticket: impl FnOnce() -> LoadOutcome,
) -> Result<Variant, KernelPathError> {
    let why = match modern {
        Some(LoadOutcome::Loaded) => return Ok(Variant::Ifindex),
        Some(LoadOutcome::Failed(e)) => return Err(e),
        Some(LoadOutcome::Refused(why)) => Some(why),
        None => None,
    };
    match ticket() {
        LoadOutcome::Loaded => Ok(Variant::Ticket),
        LoadOutcome::Failed(e) => Err(e),
        LoadOutcome::Refused(also) => Err(KernelPathError::Load(match why {
            Some(why) => {
                format!("the verifier refused both socket-lookup programs: {why}\n{also}")
            }
            None => format!("the verifier refused the socket-lookup program: {also}"),
        })),
    }
}

/// `LHB_KERNEL_VARIANT=ticket`: the ticket variant on a kernel that has the other, so
/// the tests exercise both on one kernel. Not an option: nothing but tests needs it.
pub fn ticket_forced() -> bool {
    std::env::var("LHB_KERNEL_VARIANT").as_deref() == Ok("ticket")
}

/// Loads the socket-lookup program of the variant the kernel accepts, then the TC
/// program of the same variant.
fn load_programs(ebpf: &mut Ebpf) -> Result<Variant, KernelPathError> {
    let mut try_load = |name: &str| -> LoadOutcome {
        let prog: &mut SkLookup = match program(ebpf, name) {
            Ok(p) => p,
            Err(e) => return LoadOutcome::Failed(e),
        };
        match prog.load().map_err(load_error) {
            Ok(()) => LoadOutcome::Loaded,
            Err(KernelPathError::Verifier { error, log }) if log_names_a_context_field(&log) => {
                LoadOutcome::Refused(format!("{error}: {}", last_lines(&log)))
            }
            Err(KernelPathError::Verifier { error, log })
                if matches!(error.raw_os_error(), Some(libc::EINVAL)) && log.is_empty() =>
            {
                // No log at all: the program type itself is unknown.
                LoadOutcome::Failed(KernelPathError::NoSkLookup(error.to_string()))
            }
            Err(e) => LoadOutcome::Failed(e),
        }
    };
    let modern = (!ticket_forced()).then(|| try_load(SK_LOOKUP_PROGRAM));
    let variant = choose_variant(modern, || try_load(SK_LOOKUP_TICKET_PROGRAM))?;
    let tc: &mut SchedClassifier = program(ebpf, variant.programs().0)?;
    tc.load().map_err(load_error)?;
    Ok(variant)
}

/// The verifier's words for a context field it does not know (5.10: "invalid bpf_context
/// access off=... size=...").
fn log_names_a_context_field(log: &str) -> bool {
    log.contains("invalid bpf_context access")
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(2)..].join(" / ")
}

/// How the program is attached to a bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Tcx,
    Clsact,
}

impl AttachMode {
    /// `LHB_ATTACH=clsact` forces the netlink attachment where TCX exists, so that path
    /// can be exercised on new kernels too.
    pub fn for_running_kernel() -> AttachMode {
        if std::env::var("LHB_ATTACH").as_deref() == Ok("clsact") {
            return AttachMode::Clsact;
        }
        // Same cut-over as aya's own attach(): TCX exists from 6.6 on.
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Clsact => "tc clsact",
        }
    }
}

enum AttachLink {
    /// A netlink filter (clsact), owned by the program object.
    Program(SchedClassifierLinkId),
    /// A TCX link pinned in bpffs.
    Pinned(PinnedLink),
}

struct Attachment {
    iface: String,
    link: AttachLink,
    /// lhb created the clsact qdisc and must remove it.
    own_clsact: bool,
}

/// The suffix of this run's pin names: the pid and the start time, not the pid alone.
/// In a container lhb is PID 1 at every start, and a pid is reused anywhere: a run that
/// took an earlier run's pins for its own never released them (found running the
/// image: after `docker kill` and a new start, `docker stop` left the killed run's
/// links attached). No `.`: bpffs refuses names with one.
fn run_suffix() -> &'static str {
    static SUFFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SUFFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("-{}-{nanos:x}", std::process::id())
    })
}

/// Where this lhb pins its links, and the pins an earlier run left.
struct Pins {
    dir: PathBuf,
    earlier: Vec<PathBuf>,
}

pub struct KernelPath {
    ebpf: Ebpf,
    variant: Variant,
    endpoints: HashMap<MapData, EndpointKey, Steer>,
    counters: PerCpuArray<MapData, Counters>,
    allow: LpmTrie<MapData, AllowAddr, u8>,
    clients: PerCpuHashMap<MapData, ClientKey, ClientSeen>,
    /// What `allow` holds: (slot, prefix).
    allowed: std::collections::BTreeSet<(u32, ipnet::IpNet)>,
    attached: BTreeMap<u32, Attachment>,
    mode: AttachMode,
    pins: Option<Pins>,
    sk_lookup: Option<PinnedLink>,
    /// Bridges whose earlier lhb filters (clsact) were already replaced in this run.
    cleared: std::collections::BTreeSet<String>,
}

/// bpffs's statfs magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn on_bpffs(dir: &Path) -> bool {
    rustix::fs::statfs(dir).is_ok_and(|st| st.f_type == BPF_FS_MAGIC)
}

impl Pins {
    /// The pin directory, if `dir` is (or can be made) a directory on bpffs.
    fn open(dir: &Path) -> Result<Pins, String> {
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !on_bpffs(parent) {
            return Err(format!(
                "{} is not a bpffs mount (mount it: `mount -t bpf bpf {}`; systemd does at boot)",
                parent.display(),
                parent.display()
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let me = run_suffix();
        let earlier = std::fs::read_dir(dir)
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(me))
            })
            .collect();
        Ok(Pins {
            dir: dir.to_path_buf(),
            earlier,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{}", run_suffix()))
    }
}

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lhb"));

impl KernelPath {
    /// Loads the programs and attaches the socket-lookup one; links are pinned under
    /// `pin_dir` where it is on bpffs (else they go with the process, and the log says so).
    pub fn load(pin_dir: &Path) -> Result<KernelPath, KernelPathError> {
        let mut ebpf = load_object()?;
        // The program logs only on rare failures; without log statements the map is
        // absent, which is fine.
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_reader(logger),
            Err(e) => debug!("no eBPF log channel: {e}"),
        }
        let variant = load_programs(&mut ebpf)?;
        // Everything that can fail without side effects comes first: once the
        // socket-lookup link is pinned, it outlives this process.
        let endpoints = take_map(&mut ebpf, ENDPOINTS_MAP)?;
        let endpoints = HashMap::try_from(endpoints)
            .map_err(|e| KernelPathError::Load(format!("{ENDPOINTS_MAP}: {e}")))?;
        let counters = take_map(&mut ebpf, COUNTERS_MAP)?;
        let counters = PerCpuArray::try_from(counters)
            .map_err(|e| KernelPathError::Load(format!("{COUNTERS_MAP}: {e}")))?;
        let allow = take_map(&mut ebpf, ALLOW_MAP)?;
        let allow = LpmTrie::try_from(allow)
            .map_err(|e| KernelPathError::Load(format!("{ALLOW_MAP}: {e}")))?;
        let clients = take_map(&mut ebpf, CLIENTS_MAP)?;
        let clients = PerCpuHashMap::try_from(clients)
            .map_err(|e| KernelPathError::Load(format!("{CLIENTS_MAP}: {e}")))?;
        let lookup: &mut SkLookup = program(&mut ebpf, variant.programs().1)?;
        // The program serves the namespace lhb runs in.
        let netns = std::fs::File::open("/proc/self/ns/net")
            .map_err(|e| KernelPathError::SkLookup(format!("opening /proc/self/ns/net: {e}")))?;
        let id = lookup
            .attach(netns)
            .map_err(|e| KernelPathError::SkLookup(format!("{e:#}")))?;
        let pins = match Pins::open(pin_dir) {
            Ok(p) => Some(p),
            Err(why) => {
                warn!(
                    "not pinning the kernel path ({why}): while lhb is down, new connections are not served"
                );
                None
            }
        };
        let mut sk_lookup = None;
        if let Some(pins) = &pins {
            let link = lookup
                .take_link(id)
                .map_err(|e| KernelPathError::SkLookup(format!("{e:#}")))?;
            let path = pins.path("sk_lookup");
            let fd: FdLink = link.into();
            sk_lookup = Some(fd.pin(&path).map_err(|e| {
                KernelPathError::SkLookup(format!("pinning at {}: {e}", path.display()))
            })?);
        }
        Ok(KernelPath {
            ebpf,
            variant,
            endpoints,
            counters,
            allow,
            clients,
            allowed: Default::default(),
            attached: BTreeMap::new(),
            mode: AttachMode::for_running_kernel(),
            pins,
            sk_lookup,
            cleared: Default::default(),
        })
    }

    /// Whether `load` would work here, and with which variant: the programs through the
    /// verifier, then dropped, with nothing attached or pinned (`lhb plan`). Attaching
    /// the socket-lookup program is the one step not tried.
    pub fn probe() -> Result<(AttachMode, Variant), KernelPathError> {
        let mut ebpf = load_object()?;
        let variant = load_programs(&mut ebpf)?;
        Ok((AttachMode::for_running_kernel(), variant))
    }

    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Why the variant that runs was chosen.
    pub fn variant_why(&self) -> &'static str {
        self.variant.why(ticket_forced())
    }

    /// Releases what an earlier lhb left pinned (after a crash or --keep-on-exit): called
    /// once this run serves, so there is no moment without a program.
    pub fn release_earlier(&mut self) {
        let Some(pins) = self.pins.as_mut() else {
            return;
        };
        let earlier = std::mem::take(&mut pins.earlier);
        if !earlier.is_empty() {
            info!(
                "took over from an earlier lhb: released its {} pinned link(s)",
                earlier.len()
            );
        }
        // Unpinned links detach asynchronously (after an RCU grace period, from a work
        // queue), in no set order. That is safe because this run's programs already run
        // beside the earlier ones: lhb_ingress passes the packet on to the next program
        // (TCX_NEXT), so both fill their listener maps, and either socket-lookup program
        // can serve.
        for p in earlier {
            // The pin is the link's last reference: unlinking it detaches the program.
            if let Err(e) = std::fs::remove_file(&p) {
                warn!("releasing {}: {e}", p.display());
            }
        }
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    fn program(&mut self) -> &mut SchedClassifier {
        // Checked in load(); the program cannot disappear from a loaded object.
        let name = self.variant.programs().0;
        match self.ebpf.program_mut(name) {
            Some(aya::programs::Program::SchedClassifier(p)) => p,
            _ => unreachable!("{name} was checked at load"),
        }
    }

    /// Attaches the program to the ingress of bridge `iface` (ifindex `ifindex`).
    pub fn attach(&mut self, ifindex: u32, iface: &str) -> Result<(), KernelPathError> {
        if self.attached.contains_key(&ifindex) {
            return Ok(());
        }
        let attach_err = |reason: String| KernelPathError::Attach {
            iface: iface.to_string(),
            reason,
        };
        let mut own_clsact = false;
        if self.mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => own_clsact = true,
                Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(attach_err(format!("adding clsact qdisc: {e}"))),
            }
        }
        if self.mode == AttachMode::Clsact && self.cleared.insert(iface.to_string()) {
            // Filters of an earlier lhb (crash, --keep-on-exit) outlive it; they are
            // replaced here, a moment before this run's own filter goes in.
            // Either variant's: the earlier run may have had the other one.
            for name in [INGRESS_PROGRAM, INGRESS_TICKET_PROGRAM] {
                if tc::qdisc_detach_program(iface, TcAttachType::Ingress, name).is_ok() {
                    info!(bridge = iface, "replaced the filter an earlier lhb left");
                }
            }
        }
        // Explicit: aya's attach() picks TCX by kernel version alone, which would ignore
        // a clsact choice (LHB_ATTACH) on a TCX kernel. First in TCX's order: a program
        // before lhb's that ended the pipeline (TCX_PASS) would hide every SYN from it,
        // and lhb's own verdict is always "next", so going first changes nothing for
        // the others. With clsact, a filter without a priority gets one below every
        // existing filter's, which also runs it first, and it never replaces one.
        let options = match self.mode {
            AttachMode::Tcx => tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::first()),
            AttachMode::Clsact => tc::TcAttachOptions::Netlink(tc::NlOptions::default()),
        };
        let id = self
            .program()
            .attach_with_options(iface, TcAttachType::Ingress, options)
            .map_err(|e| attach_err(format!("{e:#}")))?;
        let link = match (&self.pins, self.mode) {
            (Some(pins), AttachMode::Tcx) => {
                let path = pins.path(&format!("tc-{ifindex}"));
                let link = self
                    .program()
                    .take_link(id)
                    .map_err(|e| attach_err(format!("{e:#}")))?;
                let fd = FdLink::try_from(link).map_err(|e| attach_err(format!("{e:#}")))?;
                AttachLink::Pinned(
                    fd.pin(&path)
                        .map_err(|e| attach_err(format!("pinning at {}: {e}", path.display())))?,
                )
            }
            _ => AttachLink::Program(id),
        };
        self.attached.insert(
            ifindex,
            Attachment {
                iface: iface.to_string(),
                link,
                own_clsact,
            },
        );
        Ok(())
    }

    /// Detaches from `ifindex`. A bridge that was deleted took its attachment with it,
    /// so failures here are expected and only logged at debug level.
    pub async fn detach(&mut self, ifindex: u32, netlink: &crate::host::netlink::Netlink) {
        let Some(a) = self.attached.remove(&ifindex) else {
            return;
        };
        match a.link {
            AttachLink::Program(id) => {
                if let Err(e) = self.program().detach(id) {
                    debug!(iface = %a.iface, "detach: {e}");
                }
            }
            AttachLink::Pinned(p) => match p.unpin() {
                // Dropping the last reference detaches.
                Ok(fd) => drop(fd),
                Err(e) => debug!(iface = %a.iface, "unpinning: {e}"),
            },
        }
        if !a.own_clsact {
            return;
        }
        // Removing the qdisc would take every filter on it along: one another tool added
        // after lhb created it stays, and so does the qdisc.
        match netlink.clsact_has_filters(ifindex).await {
            Ok(false) => {
                if let Err(e) = netlink.remove_clsact(ifindex).await {
                    debug!(iface = %a.iface, "removing clsact qdisc: {e:#}");
                }
            }
            Ok(true) => info!(
                bridge = %a.iface,
                "left the clsact qdisc lhb added: it holds another tool's filters now"
            ),
            Err(e) => debug!(iface = %a.iface, "listing tc filters: {e:#}"),
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = u32> + '_ {
        self.attached.keys().copied()
    }

    pub fn upsert_endpoint(&mut self, ep: Endpoint, to: Steering) -> anyhow::Result<()> {
        let key = EndpointKey::new(ep.ifindex, ep.gateway, ep.port);
        self.endpoints
            .insert(key, Steer::new(to.target, to.slot, to.scoped), 0)?;
        Ok(())
    }

    /// Makes the allow trie hold exactly `scopes`' prefixes. Removals first: while it
    /// changes, a scoped rule admits at most its old and new sets' common part, never
    /// a client that neither admits. Called before the endpoints that use it are
    /// written, so an endpoint is never scoped before its set is in place.
    pub fn set_scopes(
        &mut self,
        scopes: &BTreeMap<u32, crate::model::scope::AllowSet>,
    ) -> anyhow::Result<()> {
        let wanted: std::collections::BTreeSet<(u32, ipnet::IpNet)> = scopes
            .iter()
            .flat_map(|(&slot, set)| set.nets().iter().map(move |&n| (slot, n)))
            .collect();
        let key = |&(slot, net): &(u32, ipnet::IpNet)| {
            let (bits, data) = AllowAddr::prefix(slot, net.addr(), net.prefix_len());
            aya::maps::lpm_trie::Key::new(bits, data)
        };
        let gone: Vec<_> = self.allowed.difference(&wanted).copied().collect();
        for e in gone {
            match self.allow.remove(&key(&e)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                    self.allowed.remove(&e);
                }
                Err(err) => {
                    anyhow::bail!("removing {} of slot {} from {ALLOW_MAP}: {err}", e.1, e.0)
                }
            }
        }
        let new: Vec<_> = wanted.difference(&self.allowed).copied().collect();
        for e in new {
            self.allow.insert(&key(&e), 1, 0).map_err(|err| {
                anyhow::anyhow!(
                    "writing {} of slot {} to {ALLOW_MAP} ({} prefixes at most over all scoped rules): {err}",
                    e.1,
                    e.0,
                    lhb_common::MAX_ALLOWED
                )
            })?;
            self.allowed.insert(e);
        }
        Ok(())
    }

    pub fn remove_endpoint(&mut self, ep: &Endpoint) {
        let key = EndpointKey::new(ep.ifindex, ep.gateway, ep.port);
        if let Err(e) = self.endpoints.remove(&key) {
            warn!("removing endpoint from {ENDPOINTS_MAP}: {e}");
        }
    }

    /// The counters of `slot`, summed over CPUs.
    pub fn counters(&self, slot: u32) -> anyhow::Result<Counters> {
        let per_cpu = self.counters.get(&slot, 0)?;
        let mut sum = Counters::default();
        for c in per_cpu.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    /// Zeroes a slot, and forgets its clients, before a new rule uses it.
    pub fn reset_counters(&mut self, slot: u32) -> anyhow::Result<()> {
        if slot >= MAX_RULES {
            anyhow::bail!("counter slot {slot} out of range (at most {MAX_RULES} rules)");
        }
        let n = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); n])?;
        self.counters.set(slot, zero, 0)?;
        let old: Vec<ClientKey> = self
            .clients
            .keys()
            .flatten()
            .filter(|k| k.slot == slot)
            .collect();
        for k in old {
            match self.clients.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => anyhow::bail!("forgetting slot {slot}'s clients in {CLIENTS_MAP}: {e}"),
            }
        }
        Ok(())
    }

    /// Who connected through each rule (the programs count every SYN they decide),
    /// summed over CPUs: (slot, client address, what it did, last seen as
    /// CLOCK_MONOTONIC nanoseconds).
    pub fn clients(&self) -> Vec<(u32, std::net::IpAddr, ClientSeen)> {
        self.clients
            .iter()
            .flatten()
            .map(|(k, per_cpu)| {
                let mut sum = ClientSeen::default();
                for c in per_cpu.iter() {
                    sum.add(c);
                }
                (k.slot, k.ip(), sum)
            })
            .collect()
    }

    /// Detaches from every bridge (and removes the clsact qdiscs lhb created).
    /// Detaches everything; with `keep`, leaves it all serving instead (pinned links and
    /// filters stay for the next start to take over).
    pub async fn shutdown(&mut self, netlink: &crate::host::netlink::Netlink, keep: bool) {
        if keep {
            if self.pins.is_none() {
                warn!(
                    "--keep-on-exit: nothing is pinned (see above), so the kernel path goes with lhb"
                );
                return;
            }
            for (_, a) in std::mem::take(&mut self.attached) {
                if let AttachLink::Program(id) = a.link {
                    match self.program().take_link(id) {
                        // A filter detaches when its link object drops: keep it attached.
                        Ok(link) => std::mem::forget(link),
                        Err(e) => warn!(bridge = %a.iface, "--keep-on-exit: {e}"),
                    }
                }
            }
            // Pinned links stay attached through their pins when these drop.
            return;
        }
        let all: Vec<u32> = self.attached().collect();
        for ifindex in all {
            self.detach(ifindex, netlink).await;
        }
        if let Some(p) = self.sk_lookup.take() {
            let _ = p.unpin();
        }
        if let Some(pins) = &self.pins {
            // Only this run's pins were in it (earlier ones are released at start).
            let _ = std::fs::remove_dir(&pins.dir);
        }
    }
}

/// What a running lhb (any instance) has in the kernel for one endpoint, read from the
/// loaded maps and attachments; for `lhb doctor`, which runs beside the daemon.
pub struct Inspection {
    /// An endpoints map of some lhb holds the key.
    pub endpoint: bool,
    /// How `lhb_ingress` is attached to the bridge ("tcx" / "clsact"), if it is.
    pub attached: Option<&'static str>,
    /// The variant of the program attached there.
    pub variant: Option<Variant>,
}

pub fn inspect(iface: &str, ep: &Endpoint) -> anyhow::Result<Inspection> {
    let key = &EndpointKey::new(ep.ifindex, ep.gateway, ep.port);
    let mut endpoint = false;
    for info in aya::maps::loaded_maps() {
        let info = info.map_err(|e| anyhow::anyhow!("listing BPF maps: {e}"))?;
        if info.name_as_str() != Some(ENDPOINTS_MAP) {
            continue;
        }
        // The map may be gone by now (its lhb exited): skip it.
        let Ok(data) = MapData::from_id(info.id()) else {
            continue;
        };
        let map: HashMap<MapData, EndpointKey, Steer> =
            HashMap::try_from(aya::maps::Map::HashMap(data))
                .map_err(|e| anyhow::anyhow!("{ENDPOINTS_MAP}: {e}"))?;
        if map.get(key, 0).is_ok() {
            endpoint = true;
            break;
        }
    }
    let (mut attached, mut variant) = (None, None);
    // Before 6.6 there is no TCX (an error here); the clsact listing below covers those.
    if let Ok((_, progs)) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
        && let Some(v) = progs.iter().find_map(|p| ingress_variant(p.name_as_str()))
    {
        (attached, variant) = (Some("tcx"), Some(v));
    }
    if attached.is_none() {
        let out = std::process::Command::new("tc")
            .args(["filter", "show", "dev", iface, "ingress"])
            .stderr(std::process::Stdio::null())
            .output();
        if let Ok(out) = out
            && let Some(v) = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .find_map(|w| ingress_variant(Some(w)))
        {
            (attached, variant) = (Some("clsact"), Some(v));
        }
    }
    Ok(Inspection {
        endpoint,
        attached,
        variant,
    })
}

/// Which variant's TC program `name` is (tc prints `lhb_ingress:[ID]`, TCX the name).
fn ingress_variant(name: Option<&str>) -> Option<Variant> {
    let n = name?;
    match n.split(':').next().unwrap_or(n) {
        INGRESS_PROGRAM => Some(Variant::Ifindex),
        INGRESS_TICKET_PROGRAM => Some(Variant::Ticket),
        _ => None,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, KernelPathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| KernelPathError::Load(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(|e: ProgramError| KernelPathError::Load(format!("{name}: {e}")))
}

fn load_error(e: ProgramError) -> KernelPathError {
    match e {
        // EPERM is a missing capability; EACCES comes from the verifier and has a log.
        ProgramError::LoadError { io_error, .. }
            if io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            KernelPathError::Permission(io_error)
        }
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => KernelPathError::Verifier {
            error: io_error,
            log: verifier_log.to_string(),
        },
        other => KernelPathError::Load(other.to_string()),
    }
}

/// The object with its maps created (no map is pinned), programs not loaded yet.
///
/// Without the kernel's BTF: `Ebpf::load` parses all of /sys/kernel/btf/vmlinux (several
/// MiB, for CO-RE relocations) and the allocator keeps that memory after it is freed,
/// which was most of an idle daemon's RSS. lhb's programs have no CO-RE relocations:
/// they read only UAPI structures (`__sk_buff`, `bpf_sock`, `bpf_sk_lookup`), whose
/// layout the kernel keeps stable.
fn load_object() -> Result<Ebpf, KernelPathError> {
    bump_memlock_rlimit();
    aya::EbpfLoader::new()
        .btf(None)
        .load(PROGRAM)
        .map_err(|e| match e {
            aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EPERM) =>
            {
                KernelPathError::Permission(io_error)
            }
            other => KernelPathError::Load(format!("{other:#}")),
        })
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, KernelPathError> {
    ebpf.take_map(name)
        .ok_or_else(|| KernelPathError::Load(format!("map {name} missing from the object")))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
fn bump_memlock_rlimit() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(e) = setrlimit(Resource::Memlock, unlimited) {
        debug!("raising RLIMIT_MEMLOCK failed: {e}");
    }
}

fn spawn_log_reader(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and moves into the AsyncFd, which
    // deregisters it before dropping it.
    let Ok(mut fd) = (unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }) else {
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> LoadOutcome {
        // What 5.10's verifier says of the modern program's ingress_ifindex load.
        let log = "; let ifindex = ...\n12: (61) r1 = *(u32 *)(r6 +64)\ninvalid bpf_context access off=64 size=4\nprocessed 12 insns";
        assert!(log_names_a_context_field(log));
        LoadOutcome::Refused(last_lines(log))
    }

    #[test]
    fn the_modern_variant_where_the_verifier_takes_it() {
        let v = choose_variant(Some(LoadOutcome::Loaded), || {
            panic!("the ticket variant is not tried")
        });
        assert_eq!(v.unwrap(), Variant::Ifindex);
    }

    #[test]
    fn the_ticket_variant_where_ingress_ifindex_is_refused() {
        let v = choose_variant(Some(refused()), || LoadOutcome::Loaded);
        assert_eq!(v.unwrap(), Variant::Ticket);
    }

    #[test]
    fn forced_tickets_skip_the_modern_program() {
        assert_eq!(
            choose_variant(None, || LoadOutcome::Loaded).unwrap(),
            Variant::Ticket
        );
    }

    /// Below 5.9 the program type itself is unknown: no variant can serve, and the
    /// error says which kernel is needed (auto mode then proxies; --mode kernel stops).
    #[test]
    fn no_socket_lookup_at_all_is_an_error_naming_the_kernel_needed() {
        let e = choose_variant(
            Some(LoadOutcome::Failed(KernelPathError::NoSkLookup(
                "Invalid argument (os error 22)".into(),
            ))),
            || panic!("the ticket variant is not tried"),
        )
        .unwrap_err();
        assert!(matches!(e, KernelPathError::NoSkLookup(_)));
        assert!(e.to_string().contains("Linux 5.9 or later"), "{e}");
    }

    #[test]
    fn both_refused_is_an_error_with_both_reasons() {
        let e = choose_variant(Some(refused()), || LoadOutcome::Refused("other".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid bpf_context access") && e.contains("other"),
            "{e}"
        );
    }

    #[test]
    fn a_permission_error_is_not_taken_for_an_old_kernel() {
        let e = choose_variant(
            Some(LoadOutcome::Failed(KernelPathError::Permission(
                io::Error::from_raw_os_error(libc::EPERM),
            ))),
            || panic!("the ticket variant is not tried"),
        )
        .unwrap_err();
        assert!(matches!(e, KernelPathError::Permission(_)));
    }
}
