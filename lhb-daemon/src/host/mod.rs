//! The host lhb runs on: netlink (links, addresses, their events, namespace ids), the
//! capabilities it holds, sd_notify, the systemd unit it writes, the tasks it owns, and
//! the socket options socket2 lacks.
//! Imports only [`crate::model`].

pub mod caps;
pub mod netlink;
pub mod notify;
pub mod sockopt;
pub mod tasks;
pub mod unit;
