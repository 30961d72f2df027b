//! lhb's daemon and tools as a library: the `lhb` binary (main.rs) is its command line,
//! and the fuzz targets (fuzz/) call the parsers directly.
//!
//! The folders are layers, lowest first; a module imports from its own layer and the
//! ones above it in this list, never from one below:
//!
//! - [`model`]: rules, the config file, settings, labels, scopes: what a user writes.
//! - [`host`]: the host's interfaces: netlink, capabilities, sd_notify, the unit, tasks.
//! - [`engines`]: what Docker and Podman say (networks, containers).
//! - [`reconcile`]: desired rules x observed host -> a plan; no I/O.
//! - [`firewall`]: the accepts lhb holds in the host's firewall.
//! - [`datapath`]: what carries traffic: the kernel path, the proxy, the UDP forwarder,
//!   the guard of container scopes, the clients seen.
//! - [`api`]: the control socket and the status it answers with.
//! - [`startup`]: what `lhb run` and `lhb plan` both start from: settings, the rule
//!   set and its label rules, the engines' first answers, the kernel path's decision,
//!   preflight.
//! - [`daemon`]: `lhb run`: start-up, the event loop, applying plans.
//! - [`diagnose`]: `lhb plan`, `verify`, `doctor`: the start-up steps of [`startup`],
//!   read only, and probes.

pub mod api;
pub mod daemon;
pub mod datapath;
pub mod diagnose;
pub mod engines;
pub mod firewall;
pub mod host;
pub mod model;
pub mod reconcile;
pub mod startup;
