//! The guard: what makes a rule scoped to containers a boundary rather than a
//! suggestion. Docker gives containers CAP_NET_RAW, so any container can send frames
//! with another's IP and MAC onto the bridge; the address a data path sees says nothing
//! by itself. The bridge port a frame entered by does: a container cannot choose it. So
//! for every admitted container's address, lhb holds an nftables bridge-family table
//! whose input hook (frames the bridge delivers to the host itself, before IP, the
//! socket lookup, the proxy and the UDP forwarder see them) drops any frame from that
//! address that did not enter by that container's own veth. The data paths then check
//! the address ([`crate::model::scope`]) knowing it cannot have been forged.
//!
//! Only addresses of admitted containers are claimed: every other frame passes
//! untouched, and a container that is not admitted reaches the data path with its own
//! address and is refused there at once (RST / ICMP), not left to time out.
//!
//! Written as one nft transaction that replaces the whole table (nothing half-applied,
//! nothing of anyone else's touched), in nft's own language: the bridge table's sets
//! of concatenations are a few lines of it and many more of the JSON schema the
//! firewall backends use.
//!
//! One table per daemon, named after its control socket ([`table_for`]): two lhb on
//! one host (a test beside a service, one per tenant) must not replace each other's
//! guard, and a daemon started again with the same socket finds, replaces or removes
//! the table its crashed predecessor left.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr, path::Path};

use anyhow::Context as _;

/// The table of the daemon whose control socket is `control` (bridge family): `lhb` for
/// the default socket, else `lhb_` and a hash of the socket's path. A hash, not the path
/// itself: nft names are short identifiers, and a path has characters they cannot hold.
pub fn table_for(control: &Path) -> String {
    if control == Path::new(crate::model::config::DEFAULT_CONTROL) {
        return "lhb".into();
    }
    // FNV-1a, written out: the name must stay the same across lhb versions (a new
    // binary cleans the old one's table), which std's hasher does not promise, and
    // eight lines do not call for a crate.
    // Absolute first: `--control run/x.sock` from / and `/run/x.sock` are one socket.
    let path = std::path::absolute(control).unwrap_or_else(|_| control.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("lhb_{h:016x}")
}

/// The bindings in force: (bridge port ifindex, address).
pub type Bindings = BTreeSet<(u32, IpAddr)>;

#[derive(Debug)]
pub struct Guard {
    table: String,
    /// What the table holds (empty: no table).
    held: Bindings,
    /// False until the first write: a table of this name may be a crashed daemon's,
    /// holding anything, so the first `set` writes even an empty `want`.
    known: bool,
}

impl Guard {
    pub fn new(table: String) -> Guard {
        Guard {
            table,
            held: Bindings::new(),
            known: false,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn held(&self) -> &Bindings {
        &self.held
    }

    /// Makes the table hold exactly `want` (none: the table goes).
    pub async fn set(&mut self, want: &Bindings) -> anyhow::Result<()> {
        if self.known && *want == self.held {
            return Ok(());
        }
        if !self.known && want.is_empty() {
            // Removing what a crashed predecessor may have left. Where that fails (no
            // nft, no nf_tables in the kernel) no table can have been left either, and
            // a daemon without scoped rules must not need nft.
            if let Err(e) = nft(&script(&self.table, want)).await {
                tracing::debug!("guard: no table bridge {} to remove: {e:#}", self.table);
            }
            self.known = true;
            return Ok(());
        }
        nft(&script(&self.table, want)).await?;
        self.held = want.clone();
        self.known = true;
        Ok(())
    }

    /// Writes the table again if it no longer holds what it should (a ruleset flushed by
    /// a firewall reload, the table or a set element deleted by hand). True if it had
    /// to.
    pub async fn heal(&mut self) -> anyhow::Result<bool> {
        if self.held.is_empty() || self.intact().await? {
            return Ok(false);
        }
        if let Err(e) = nft(&script(&self.table, &self.held)).await {
            // Not held: the next `set` writes it whole, and until then the daemon
            // closes what it guards.
            self.held.clear();
            return Err(e);
        }
        Ok(true)
    }

    /// Removes the table (on exit; a table lhb no longer holds is left alone).
    pub async fn remove(&mut self) {
        if self.held.is_empty() {
            return;
        }
        if let Err(e) = nft(&script(&self.table, &Bindings::new())).await {
            tracing::warn!("guard: removing table bridge {}: {e:#}", self.table);
        }
        self.held.clear();
    }

    async fn intact(&self) -> anyhow::Result<bool> {
        let out = tokio::process::Command::new("nft")
            .args(["-j", "list", "table", "bridge", &self.table])
            .output()
            .await
            .context("running nft")?;
        if !out.status.success() {
            return Ok(false);
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("reading `nft -j list table`")?;
        let items = v["nftables"].as_array().cloned().unwrap_or_default();
        let count = |name: &str| {
            items
                .iter()
                .find(|i| i["set"]["name"] == name)
                .map(|i| i["set"]["elem"].as_array().map_or(0, |e| e.len()))
        };
        let claimed = |v4: bool| {
            self.held
                .iter()
                .map(|(_, ip)| *ip)
                .filter(|ip| ip.is_ipv4() == v4)
                .collect::<BTreeSet<_>>()
                .len()
        };
        let bound = |v4: bool| {
            self.held
                .iter()
                .filter(|(_, ip)| ip.is_ipv4() == v4)
                .count()
        };
        let rules = items
            .iter()
            .filter(|i| i["rule"]["chain"] == "forged")
            .count();
        Ok(count("claimed4") == Some(claimed(true))
            && count("claimed6") == Some(claimed(false))
            && count("bound4") == Some(bound(true))
            && count("bound6") == Some(bound(false))
            && rules == 2)
    }
}

/// The transaction that replaces bridge table `table` with one holding `b`; with `b`
/// empty, one that removes it. `table` first: deleting a table that does not exist
/// would fail the whole transaction.
pub fn script(table: &str, b: &Bindings) -> String {
    let mut s = format!("table bridge {table}\ndelete table bridge {table}\n");
    if b.is_empty() {
        return s;
    }
    let claimed = |v4: bool| -> Vec<String> {
        let set: BTreeSet<IpAddr> = b
            .iter()
            .map(|(_, ip)| *ip)
            .filter(|ip| ip.is_ipv4() == v4)
            .collect();
        set.iter().map(IpAddr::to_string).collect()
    };
    let bound = |v4: bool| -> Vec<String> {
        b.iter()
            .filter(|(_, ip)| ip.is_ipv4() == v4)
            .map(|(port, ip)| format!("{port} . {ip}"))
            .collect()
    };
    let elements = |e: Vec<String>| {
        if e.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", e.join(", "))
        }
    };
    let _ = writeln!(s, "table bridge {table} {{");
    for (v, ty) in [("4", "ipv4_addr"), ("6", "ipv6_addr")] {
        let v4 = v == "4";
        let _ = writeln!(
            s,
            "  set claimed{v} {{ type {ty};{} }}",
            elements(claimed(v4))
        );
        let _ = writeln!(
            s,
            "  set bound{v} {{ type iface_index . {ty};{} }}",
            elements(bound(v4))
        );
    }
    // Before everything else on the bridge's input (-300: ahead of any filter chain a
    // firewall puts there), and only frames from claimed addresses are looked at twice.
    let _ = writeln!(
        s,
        "  chain forged {{\n    type filter hook input priority -300; policy accept;\n    ip saddr @claimed4 meta iif . ip saddr != @bound4 counter drop comment \"lhb: an admitted container's address from another port\"\n    ip6 saddr @claimed6 meta iif . ip6 saddr != @bound6 counter drop comment \"lhb: an admitted container's address from another port\"\n  }}\n}}"
    );
    s
}

async fn nft(script: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running nft (the guard of container-scoped rules needs it: install nftables)")?;
    let mut stdin = child.stdin.take().context("nft's stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "nft refused the guard's table: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_claims_each_address_once_and_binds_it_to_its_ports() {
        let b: Bindings = [
            (12, "10.0.0.2".parse().unwrap()),
            (12, "fd00::2".parse().unwrap()),
            (14, "10.0.0.3".parse().unwrap()),
        ]
        .into();
        let s = script("lhb", &b);
        assert!(
            s.starts_with("table bridge lhb\ndelete table bridge lhb\n"),
            "{s}"
        );
        assert!(
            s.contains("set claimed4 { type ipv4_addr; elements = { 10.0.0.2, 10.0.0.3 }; }"),
            "{s}"
        );
        assert!(
            s.contains("elements = { 12 . 10.0.0.2, 14 . 10.0.0.3 }"),
            "{s}"
        );
        assert!(
            s.contains("set bound6 { type iface_index . ipv6_addr; elements = { 12 . fd00::2 }; }"),
            "{s}"
        );
        assert_eq!(
            script("lhb_0a", &Bindings::new()),
            "table bridge lhb_0a\ndelete table bridge lhb_0a\n"
        );
    }

    #[test]
    fn each_control_socket_has_its_own_table() {
        assert_eq!(table_for(Path::new("/run/lhb/lhb.sock")), "lhb");
        let a = table_for(Path::new("/tmp/a/lhb.sock"));
        let b = table_for(Path::new("/tmp/b/lhb.sock"));
        assert_ne!(a, b);
        assert_eq!(a, table_for(Path::new("/tmp/a/lhb.sock")));
        // Fixed across versions (FNV-1a-64 of the path, checked by hand): a new binary
        // finds the table an old one left.
        assert_eq!(a, "lhb_b3b864360944f54c");
        assert!(a.len() <= 32 && a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'));
    }
}
