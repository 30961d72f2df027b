//! `lhb plan`: every change `lhb run` would make on this host with the same config and
//! flags, right now, with nothing changed. It runs `run`'s own start-up steps
//! ([`crate::startup`]: settings, rules and label rules, the engines' first answers, the
//! kernel path's decision, the netlink snapshot, preflight, `reconcile::plan`, the
//! firewall backends' planned inserts) up to the point where `run` would start writing,
//! and reports instead: program attachments, how each gateway is served and why, proxy
//! listeners and UDP sockets, firewall rules (the exact rule per backend and chain), pins
//! taken over, and what waits and why.
//!
//! The kernel path is probed by loading both programs through the verifier and
//! dropping them (nothing attached, nothing pinned).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{
    api::control,
    api::status::{EngineStatus, GatewayStatus, RuleStatus, rule_view},
    datapath::kernel::KernelPath,
    engines::{Engine, docker},
    firewall::{Firewall, FirewallMode},
    host::netlink::Netlink,
    model::rule::Origin,
    reconcile::{self, Mode, Paths},
    startup::{self, ServeOptions, Settings, StartError},
};

/// The plan, as `lhb plan --json` prints it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HostPlan {
    pub config: String,
    pub mode: Mode,
    /// `tcx` or `clsact` where the kernel path would load; null otherwise.
    pub kernel_attach: Option<String>,
    /// Why the kernel path would not be used, if it would not.
    pub kernel_unavailable: Option<String>,
    /// The program variant the kernel would run, and why.
    #[serde(default)]
    pub kernel_variant: Option<crate::api::status::KernelVariant>,
    /// Why `lhb run` would stop at start instead, changing nothing; null if it starts.
    pub fails: Option<String>,
    /// The pid of an lhb already answering on the control socket: a second `run` would
    /// stop there; this plan is what a restart of it would do.
    pub running: Option<u32>,
    /// null with --no-docker.
    pub docker: Option<EngineStatus>,
    /// null unless lhb reads a Podman socket.
    #[serde(default)]
    pub podman: Option<EngineStatus>,
    /// Bridges the ingress program is attached to.
    pub programs: Vec<Attachment>,
    /// The socket-lookup program for lhb's network namespace and where its link is
    /// pinned; null if no rule takes the kernel path.
    pub socket_lookup: Option<String>,
    /// Links an earlier lhb pinned: served by until this run serves, then released.
    pub takeover: Vec<String>,
    /// `GATEWAY:PORT on BRIDGE -> TARGET` for each proxy listener bound.
    pub proxy_listeners: Vec<String>,
    /// The same for each UDP forwarder socket bound.
    #[serde(default)]
    pub udp_sockets: Vec<String>,
    pub firewall: FirewallPlan,
    pub rules: Vec<RulePlan>,
    /// Docker network label entries that would not be served, and why.
    #[serde(default)]
    pub label_refused: Vec<crate::model::labels::Refusal>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub bridge: String,
    pub ifindex: u32,
    /// `tcx ingress` or `tc clsact ingress`.
    pub hook: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FirewallPlan {
    pub backends: Vec<String>,
    /// Accepts to add, each in the tool's own syntax.
    pub add: Vec<FirewallRule>,
    /// Accepts an earlier lhb left that are still wanted: kept as they are.
    pub keep: Vec<String>,
    /// Accepts an earlier lhb left that are no longer wanted: removed.
    pub remove: Vec<String>,
    /// Why the firewall could not be read, if it could not (`run` would retry).
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FirewallRule {
    /// `tcp to GATEWAY:PORT in on BRIDGE`.
    pub opening: String,
    /// `iptables INPUT`, `nft inet filter input`: as `lhb status` names it.
    pub chain: String,
    pub rule: String,
}

/// A rule as `lhb status` would show it once running (same fields, no counters).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RulePlan {
    pub network: Option<String>,
    pub interface: Option<String>,
    pub port: u16,
    pub target: String,
    pub service: String,
    pub origin: Origin,
    pub state: crate::api::status::State,
    pub reason: Option<String>,
    pub bridge: Option<String>,
    pub ifindex: Option<u32>,
    pub gateways: Vec<GatewayStatus>,
}

impl From<RuleStatus> for RulePlan {
    fn from(r: RuleStatus) -> Self {
        RulePlan {
            network: r.network,
            interface: r.interface,
            port: r.port,
            target: r.target,
            service: r.service,
            origin: r.origin,
            state: r.state,
            reason: r.reason,
            bridge: r.bridge,
            ifindex: r.ifindex,
            gateways: r.gateways,
        }
    }
}

pub async fn run(opts: ServeOptions, json: bool) -> anyhow::Result<bool> {
    let plan = compute(opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", plan.text());
    }
    Ok(plan.fails.is_none())
}

/// The same steps as `lhb run` ([`crate::startup`]'s), in the same order, each stopping
/// where `run` would stop.
pub async fn compute(opts: ServeOptions) -> anyhow::Result<HostPlan> {
    let mut plan = HostPlan {
        config: opts.config.display().to_string(),
        running: control::call(&opts.control, &control::Request::Status)
            .ok()
            .and_then(|r| r.status)
            .map(|s| s.pid),
        ..Default::default()
    };
    let settings = match Settings::resolve(&opts) {
        Ok(s) => s,
        Err(e) if matches!(e.downcast_ref(), Some(StartError::NoRules { .. })) => {
            plan.mode = opts.mode.unwrap_or_default();
            plan.fails = Some(e.to_string());
            return Ok(plan);
        }
        Err(e) => return Err(e),
    };
    let Settings {
        mode,
        firewall: firewall_mode,
        file_engines,
        label_allow,
        mut rules,
        ..
    } = settings;
    plan.mode = mode;

    let (netlink, _events) = Netlink::connect()?;
    let engines = docker::engines(opts.no_docker, &opts.engines, &file_engines).await?;
    let view = crate::engines::snapshot(&engines, startup::FIRST_ANSWER).await;
    let engine = |e| view.as_ref()?.engine(e).map(EngineStatus::from);
    plan.docker = engine(Engine::Docker);
    plan.podman = engine(Engine::Podman);
    let taken = rules.follow_labels(view.as_ref(), &label_allow);
    if let Some(fresh) = taken.fresh {
        fresh?;
    }
    plan.label_refused = taken.refused;
    let observed = reconcile::Observed {
        links: netlink.snapshot().await?,
        engines: view,
    };

    match startup::kernel_path(mode, probe_kernel) {
        Err(e) => {
            plan.fails = Some(format!("{e:#}"));
            return Ok(plan);
        }
        Ok((_, Some(why))) => plan.kernel_unavailable = Some(why),
        Ok((Some((attach, variant)), None)) => {
            plan.kernel_attach = Some(attach.into());
            plan.kernel_variant = Some(variant);
        }
        Ok((None, None)) => {}
    }
    let paths = Paths {
        mode,
        kernel: plan.kernel_attach.is_some(),
    };
    let wanted = reconcile::plan(rules.planned(), &observed, paths);
    if let Err(e) = startup::preflight(rules.iter().map(|a| &a.rule), &observed, &wanted) {
        plan.fails = Some(e.to_string());
        return Ok(plan);
    }

    plan.data_path(&wanted, &opts.pin_dir, paths.kernel);
    plan.firewall = firewall_plan(firewall_mode, &wanted);
    plan.rules = rules
        .iter()
        .map(|a| {
            let state = wanted.states.get(&a.rule.key());
            rule_view(&a.rule, a.origin, state, &wanted.proxies).into()
        })
        .collect();
    Ok(plan)
}

impl HostPlan {
    /// Program attachments, the socket-lookup link and pins taken over, proxy
    /// listeners: what `apply` would do with `wanted`.
    fn data_path(&mut self, wanted: &reconcile::Plan, pin_dir: &std::path::Path, kernel: bool) {
        let hook = match self.kernel_attach.as_deref() {
            Some("tcx") => "tcx ingress",
            _ => "tc clsact ingress",
        };
        self.programs = wanted
            .attach
            .iter()
            .map(|(&ifindex, bridge)| Attachment {
                bridge: bridge.clone(),
                ifindex,
                hook: hook.into(),
            })
            .collect();
        if kernel {
            self.socket_lookup = Some(format!(
                "one socket-lookup program for lhb's network namespace, its link pinned in {}",
                pin_dir.display()
            ));
            self.takeover = std::fs::read_dir(pin_dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path().display().to_string())
                        .collect()
                })
                .unwrap_or_default();
            self.takeover.sort();
        }
        self.proxy_listeners = wanted
            .proxies
            .iter()
            .map(|(k, t)| {
                let gw = std::net::SocketAddr::new(k.gateway, k.port);
                format!("{gw} on {} -> {}", k.bridge, t.target)
            })
            .collect();
        self.udp_sockets = wanted
            .udp
            .iter()
            .map(|(k, t)| {
                let gw = std::net::SocketAddr::new(k.gateway, k.port);
                format!("{gw}/udp on {} -> {}", k.bridge, t.target)
            })
            .collect();
    }
}

/// What the first firewall sync would do for `wanted`'s openings, read only.
fn firewall_plan(mode: FirewallMode, wanted: &reconcile::Plan) -> FirewallPlan {
    let mut fw = Firewall::detect(mode);
    let mut out = FirewallPlan {
        backends: fw.backends(),
        ..Default::default()
    };
    match fw.plan(&crate::firewall::openings(wanted)) {
        Ok(p) => {
            out.add = p
                .inserts
                .into_iter()
                .filter(|(_, i)| !i.present)
                .map(|(o, i)| FirewallRule {
                    opening: o.to_string(),
                    chain: i.chain,
                    rule: i.rule,
                })
                .collect();
            out.keep = strings(&p.kept);
            out.remove = strings(&p.removed);
        }
        Err(e) => out.error = Some(format!("{e:#}")),
    }
    out
}

fn strings(set: &BTreeSet<crate::firewall::Opening>) -> Vec<String> {
    set.iter().map(ToString::to_string).collect()
}

/// The kernel path's programs through the verifier, nothing attached (what
/// [`startup::kernel_path`] loads for `run`, after the same capability check).
fn probe_kernel() -> anyhow::Result<(&'static str, crate::api::status::KernelVariant)> {
    let (attach, variant) = KernelPath::probe()?;
    Ok((
        attach.as_str(),
        crate::api::status::KernelVariant {
            name: variant.as_str().into(),
            why: variant.why(crate::datapath::kernel::ticket_forced()).into(),
        },
    ))
}

impl HostPlan {
    /// The plan in words: what would change, then each rule.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "lhb plan: what `lhb run --config {}` would change on this host now (nothing was changed)",
            self.config
        );
        if let Some(pid) = self.running {
            let _ = writeln!(
                s,
                "note: lhb (pid {pid}) runs on this control socket; a second `lhb run` would stop there. This is what restarting it would do."
            );
        }
        if let Some(f) = &self.fails {
            let _ = writeln!(
                s,
                "\n`lhb run` would exit at start and change nothing:\n  {f}"
            );
            return s;
        }
        let _ = writeln!(s, "\ndata path: mode {}", self.mode);
        match (&self.kernel_attach, &self.kernel_unavailable) {
            (Some(a), _) => {
                let _ = writeln!(s, "  kernel path: loads here (attaches with {a})");
                if let Some(v) = &self.kernel_variant {
                    let _ = writeln!(s, "  kernel path variant: {} ({})", v.name, v.why);
                }
            }
            (None, Some(why)) => {
                let _ = writeln!(s, "  kernel path: unavailable ({why}); the proxy serves");
            }
            (None, None) => {
                let _ = writeln!(s, "  kernel path: not used (--mode proxy)");
            }
        }
        for (name, e) in [("Docker engine", &self.docker), ("Podman", &self.podman)] {
            let _ = match e {
                None => Ok(()),
                Some(e) if e.available => writeln!(s, "  {name}: answers"),
                Some(e) => writeln!(
                    s,
                    "  {name}: not reachable ({}); its network rules wait for it",
                    e.problem.as_deref().unwrap_or("no answer")
                ),
            };
        }
        self.changes(&mut s);
        self.rules_text(&mut s);
        if !self.label_refused.is_empty() {
            let _ = writeln!(s, "\nlabel entries NOT served:");
            for f in &self.label_refused {
                let _ = writeln!(s, "  {f}");
            }
        }
        s
    }

    fn changes(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(s, "\nchanges:");
        let mut changes = 0;
        for a in &self.programs {
            changes += 1;
            let _ = writeln!(
                s,
                "  attach the ingress program to {} (ifindex {}, {})",
                a.bridge, a.ifindex, a.hook
            );
        }
        if let Some(l) = &self.socket_lookup {
            changes += 1;
            let _ = writeln!(s, "  attach {l}");
        }
        for p in &self.takeover {
            changes += 1;
            let _ = writeln!(
                s,
                "  take over {p} (an earlier lhb's; released once serving)"
            );
        }
        for l in &self.proxy_listeners {
            changes += 1;
            let _ = writeln!(s, "  bind a proxy listener to {l}");
        }
        for l in &self.udp_sockets {
            changes += 1;
            let _ = writeln!(s, "  bind a UDP forwarder socket to {l}");
        }
        for f in &self.firewall.add {
            changes += 1;
            let _ = writeln!(
                s,
                "  firewall: {} in {}:\n    {}",
                f.opening, f.chain, f.rule
            );
        }
        for k in &self.firewall.keep {
            let _ = writeln!(s, "  firewall: keep {k} (an earlier lhb's accept)");
        }
        for r in &self.firewall.remove {
            changes += 1;
            let _ = writeln!(
                s,
                "  firewall: remove {r} (an earlier lhb's, no longer wanted)"
            );
        }
        if let Some(e) = &self.firewall.error {
            let _ = writeln!(s, "  firewall: cannot read it ({e}); `lhb run` would retry");
        }
        if self.firewall.backends.is_empty() {
            let _ = writeln!(s, "  firewall: none managed");
        } else if self.firewall.add.is_empty() && self.firewall.error.is_none() {
            let _ = writeln!(
                s,
                "  firewall: no accept needed ({} would not drop this traffic)",
                self.firewall.backends.join(", ")
            );
        }
        if changes == 0 {
            let _ = writeln!(s, "  none");
        }
    }

    fn rules_text(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(s, "\nrules:");
        if self.rules.is_empty() {
            let _ = writeln!(
                s,
                "  none: add [[expose]] entries to {} (see the examples in it)",
                self.config
            );
        }
        for r in &self.rules {
            let source = match (&r.network, &r.interface) {
                (Some(n), _) => format!("network {n}"),
                (_, Some(i)) => format!("interface {i}"),
                _ => "?".into(),
            };
            let _ = writeln!(
                s,
                "  {} ({source}, port {} -> {}, {}): {}",
                r.service, r.port, r.target, r.origin, r.state
            );
            if let Some(why) = &r.reason {
                let _ = writeln!(s, "    waits: {why}");
            }
            for g in &r.gateways {
                let why = g
                    .why
                    .as_deref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default();
                let _ = writeln!(s, "    {} -> {}{why}", g.address, g.path);
            }
        }
    }
}
