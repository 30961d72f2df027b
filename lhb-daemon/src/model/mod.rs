//! What a user writes and lhb reasons with: rules and their specs, the config file and
//! the settings it shares with the command line, the label entries, the `allow` scopes,
//! the runtime rules kept across restarts. Pure: nothing here imports another layer.

pub mod config;
pub mod labels;
pub mod persist;
pub mod rule;
pub mod scope;
