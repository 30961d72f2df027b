//! `lhb plan`, `lhb verify` and `lhb doctor`: the start-up steps of [`crate::daemon`]
//! run read-only, probes from namespaces of their own, and findings printed with what
//! to do. The top layer: it may import any other.

pub mod check;
pub mod doctor;
pub mod findings;
pub mod plan;
pub mod verify;
