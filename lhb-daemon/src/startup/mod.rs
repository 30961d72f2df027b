//! What `lhb run` and `lhb plan` both start from, in the order `run` takes it: the
//! settings (command line over config file), the rule set with its label rules, the
//! engines' first answers, the kernel path's decision, preflight. `daemon` starts from
//! these and serves; `diagnose::plan` goes through the same steps and only reports, so
//! the two cannot drift apart. Imports every layer above [`crate::api`] in `lib.rs`'s
//! list, never `daemon` or `diagnose`.

pub mod rules;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use thiserror::Error;

use crate::{
    engines::{EngineState, EngineView},
    firewall::FirewallMode,
    host::caps,
    model::{
        config::{self, MetricsAddr},
        labels::{self, Entry, Refusal},
        rule::{Rule, Source},
    },
    reconcile::{self, BridgeProblem, Mode, Observed, Plan, RuleState},
};

pub use rules::RuleSet;

/// How long the start (and plan, verify, doctor) wait for an engine's first answer before
/// going on.
pub const FIRST_ANSWER: Duration = Duration::from_secs(3);

/// What `lhb run` and `lhb plan` both start from.
pub struct ServeOptions {
    /// Rules from --expose and --expose-iface.
    pub cli_rules: Vec<Rule>,
    /// --label-allow entries (added to the config's `label_allow`).
    pub label_allow: Vec<crate::model::labels::Entry>,
    pub config: PathBuf,
    pub no_docker: bool,
    /// --engine sockets (added to the config's `engine`).
    pub engines: Vec<String>,
    /// --mode, if given (it wins over the file's `mode`).
    pub mode: Option<Mode>,
    /// --firewall, if given (it wins over the file's `firewall`).
    pub firewall: Option<FirewallMode>,
    /// The control socket (`lhb status`, `lhb expose`, `lhb unexpose`).
    pub control: PathBuf,
    /// Where the kernel path's links are pinned (bpffs).
    pub pin_dir: PathBuf,
}

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

/// The settings a start runs with: the command line over the config file.
pub struct Settings {
    pub mode: Mode,
    pub firewall: FirewallMode,
    pub metrics: Option<MetricsAddr>,
    /// The config file's `engine` sockets (the command line's are in the options).
    pub file_engines: Vec<String>,
    /// --label-allow and the file's `label_allow`, merged.
    pub label_allow: Vec<Entry>,
    /// The command line's and the file's rules, checked to combine; label rules are
    /// added once the engines answered ([`RuleSet::follow_labels`]).
    pub rules: RuleSet,
    /// The slots of `rules` (all new).
    pub fresh: Vec<u32>,
    /// A config file with no rule and no `label_allow`: a daemon waiting for rules.
    pub waiting_for_rules: bool,
}

impl Settings {
    /// Reads the config file and merges it under `opts`. No rule at all and no config
    /// file is an error ([`StartError::NoRules`]): with no file and no flag there is
    /// nothing to wait for, a mistake said at once. A config file of the administrator's
    /// with no entry yet (the package's, for one) is a daemon waiting for rules: it must
    /// not fail at every boot.
    pub fn resolve(opts: &ServeOptions) -> anyhow::Result<Settings> {
        let cfg = config::load(&opts.config)?;
        let (rules, fresh) = RuleSet::new(opts.cli_rules.clone(), cfg.rules)?;
        let label_allow = labels::merge_allowed(&opts.label_allow, &cfg.label_allow);
        let waiting_for_rules = rules.is_empty() && label_allow.is_empty();
        if waiting_for_rules && !std::fs::metadata(&opts.config).is_ok_and(|m| m.is_file()) {
            return Err(StartError::NoRules {
                config: opts.config.display().to_string(),
            }
            .into());
        }
        Ok(Settings {
            mode: opts.mode.or(cfg.mode).unwrap_or_default(),
            firewall: opts.firewall.or(cfg.firewall).unwrap_or_default(),
            metrics: cfg.metrics,
            file_engines: cfg.engine,
            label_allow,
            rules,
            fresh,
            waiting_for_rules,
        })
    }
}

/// What an engine says within [`FIRST_ANSWER`] of the start; whether it answered or
/// not, the state says what is known (silence as its problem).
pub async fn first_engine_view(rx: &mut tokio::sync::watch::Receiver<EngineState>) -> EngineState {
    let _ = tokio::time::timeout(
        FIRST_ANSWER,
        rx.wait_for(|v| v.available || v.problem.is_some()),
    )
    .await;
    let mut v = rx.borrow().clone();
    if v.down().is_some() && v.problem.is_none() {
        v.problem = Some(format!("no answer within {}s", FIRST_ANSWER.as_secs()));
    }
    v
}

/// The rules the engines' network labels ask for and `allow` allows, and the label
/// entries refused (`view` None: no engine is read).
pub fn asked_by_labels(view: Option<&EngineView>, allow: &[Entry]) -> (Vec<Rule>, Vec<Refusal>) {
    match view {
        Some(v) => reconcile::labels::rules(v, allow),
        None => Default::default(),
    }
}

/// The kernel path `mode` asks for, from `load` (attach, or only probe): `--mode
/// kernel` fails without it, `auto` goes on with the proxy and says why.
pub fn kernel_path<T>(
    mode: Mode,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(Option<T>, Option<String>)> {
    let load = || {
        let eff = caps::effective().context("reading this process's capabilities")?;
        let missing = caps::missing_for_kernel_path(eff);
        if !missing.is_empty() {
            return Err(StartError::MissingCapabilities(missing).into());
        }
        load()
    };
    Ok(match mode {
        Mode::Proxy => (None, None),
        Mode::Kernel => (Some(load()?), None),
        Mode::Auto => match load() {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        },
    })
}

/// Refuses, before anything is attached, interface rules that cannot work at all (not a
/// bridge, no address) under `plan` (made from `observed`). A bridge that does not
/// exist yet is waited for, as a Docker network is.
pub fn preflight<'a>(
    rules: impl IntoIterator<Item = &'a Rule>,
    observed: &Observed,
    plan: &Plan,
) -> Result<(), StartError> {
    for rule in rules {
        let Source::Interface(iface) = &rule.source else {
            continue;
        };
        let state = plan.states.get(&rule.key());
        let r = rule.to_string();
        match reconcile::bridge_of(rule, observed) {
            // Waits, like a network rule: a bridge may come up after lhb (libvirt's
            // virbr0 after boot). A typo shows at once as a warning, in `lhb status`
            // and in `lhb doctor`. An uplink may be removed: the rule waits too, and the
            // reason is logged and in `lhb status`.
            Err(BridgeProblem::NoSuchInterface { .. } | BridgeProblem::Uplinks { .. }) => {
                continue;
            }
            Err(BridgeProblem::NotABridge { .. }) => {
                return Err(StartError::NotABridge {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Err(BridgeProblem::NoAddress { .. }) => {
                return Err(StartError::NoAddress {
                    rule: r,
                    iface: iface.clone(),
                });
            }
            Err(_) | Ok(_) => {}
        }
        if let Some(RuleState::Waiting(reason)) = state {
            return Err(StartError::Unservable {
                rule: r,
                reason: reason.clone(),
            });
        }
    }
    Ok(())
}
