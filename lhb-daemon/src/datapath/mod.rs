//! What carries the traffic: the kernel path (eBPF socket lookup and the bridge's TC
//! program), the gateway sockets of the user-space paths, the splice proxy, the UDP
//! forwarder, the guard that makes container scopes unforgeable, and the clients each of
//! them saw. Imports [`crate::model`], [`crate::host`] and the plan's types from
//! [`crate::reconcile`].

pub mod clients;
pub mod gateway;
pub mod guard;
pub mod kernel;
pub mod proxy;
pub mod udp;
