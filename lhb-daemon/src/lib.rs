//! lhb's daemon and tools as a library: the `lhb` binary (main.rs) is its command line,
//! and the fuzz targets (fuzz/) call the parsers directly.

pub mod caps;
pub mod check;
pub mod clients;
pub mod config;
pub mod control;
pub mod daemon;
pub mod docker;
pub mod doctor;
pub mod findings;
pub mod firewall;
pub mod guard;
pub mod kernel;
pub mod labels;
pub mod netlink;
pub mod notify;
pub mod persist;
pub mod plan;
pub mod podman;
pub mod proxy;
pub mod reconcile;
pub mod rule;
pub mod scope;
pub mod status;
pub mod tasks;
pub mod udp;
pub mod unit;
pub mod verify;
