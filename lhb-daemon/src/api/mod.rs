//! What the running daemon answers: the control socket and the metrics endpoint, and
//! the status they carry (its JSON is a contract: README, "Status"). Imports the layers
//! below it for the types it reports.

pub mod control;
pub mod status;
