//! `lhb expose --persist` / `lhb unexpose --persist`: the config file gains or loses one
//! `[[expose]]` entry. The file is edited as a document (toml_edit), so its comments,
//! order and formatting stay; the result is checked with the same parser `run` uses
//! before it replaces the file, atomically (temporary file in the same directory,
//! fsync, rename).
//!
//! The daemon runs as root and the file is usually /etc/lhb/lhb.toml: a config path
//! that is a symbolic link is refused (it could point lhb's write anywhere), the
//! temporary file has a random name and is created exclusively (no one can have put
//! a file or link there first), and the new file keeps the old one's mode and owner.

use std::{
    io::Write as _,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use crate::{
    model::config,
    model::rule::{Rule, Source},
};

fn read(path: &Path) -> anyhow::Result<DocumentMut> {
    refuse_symlink(path)?;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.parse::<DocumentMut>()
        .with_context(|| format!("{}: not valid TOML", path.display()))
}

fn matches(t: &Table, source: &Source, port: u16) -> bool {
    let (key, name) = match source {
        Source::Network(n) => ("network", n),
        Source::Interface(i) => ("interface", i),
    };
    t.get(key).and_then(Item::as_str) == Some(name.as_str())
        && t.get("port").and_then(Item::as_integer) == Some(i64::from(port))
}

/// Appends `rule` to the file's `[[expose]]` entries (creating the file if needed).
pub fn add(path: &Path, rule: &Rule) -> anyhow::Result<()> {
    let mut doc = read(path)?;
    let exposes = doc
        .entry("expose")
        .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .with_context(|| {
            format!(
                "{}: `expose` is not a list of [[expose]] tables",
                path.display()
            )
        })?;
    if exposes.iter().any(|t| matches(t, &rule.source, rule.port)) {
        bail!(
            "{} already has {}:{}",
            path.display(),
            rule.source,
            rule.port
        );
    }
    let mut t = Table::new();
    match &rule.source {
        Source::Network(n) => t["network"] = value(n.as_str()),
        Source::Interface(i) => t["interface"] = value(i.as_str()),
    }
    if rule.service != format!("port-{}", rule.port) {
        t["service"] = value(rule.service.as_str());
    }
    t["port"] = value(i64::from(rule.port));
    if rule.protocol != crate::model::rule::Protocol::Tcp {
        t["protocol"] = value(rule.protocol.to_string());
    }
    let default_target = std::net::SocketAddr::from(([127, 0, 0, 1], rule.port));
    if rule.target != default_target {
        t["target"] = value(rule.target.to_string());
    }
    if !rule.allow.is_empty() {
        let mut allow = toml_edit::Array::new();
        for c in &rule.allow {
            allow.push(c.to_string());
        }
        t["allow"] = value(allow);
    }
    exposes.push(t);
    write(path, &doc.to_string())
}

/// Removes the `[[expose]]` entry for `source:port`; an error if the file has none.
pub fn remove(path: &Path, source: &Source, port: u16) -> anyhow::Result<()> {
    let mut doc = read(path)?;
    let Some(exposes) = doc.get_mut("expose").and_then(Item::as_array_of_tables_mut) else {
        bail!(
            "{} has no [[expose]] entry for {source}:{port}",
            path.display()
        );
    };
    let before = exposes.len();
    exposes.retain(|t| !matches(t, source, port));
    if exposes.len() == before {
        bail!(
            "{} has no [[expose]] entry for {source}:{port}",
            path.display()
        );
    }
    write(path, &doc.to_string())
}

fn refuse_symlink(path: &Path) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!(
            "{} is a symbolic link: --persist edits only a regular file (give the link's target as --config)",
            path.display()
        );
    }
    Ok(())
}

/// Checks `text` as a config, then replaces `path` with it atomically, keeping the
/// file's mode and owner.
fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    refuse_symlink(path)?;
    config::parse(&path.display().to_string(), text)
        .context("the edited config would not load; the file is unchanged")?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lhb.toml".into());
    let old = std::fs::symlink_metadata(path).ok();
    let result = (|| -> anyhow::Result<()> {
        // O_EXCL, a random name, mode 0600 until the final mode is set; removed if
        // anything below fails.
        let mut f = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".lhb-tmp")
            .tempfile_in(dir)?;
        f.write_all(text.as_bytes())?;
        match &old {
            Some(m) => {
                std::os::unix::fs::fchown(f.as_file(), Some(m.uid()), Some(m.gid()))?;
                f.as_file()
                    .set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            }
            None => f
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))?,
        }
        f.as_file().sync_all()?;
        f.persist(path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    result.map_err(|e| {
        let read_only = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ReadOnlyFilesystem)
        });
        if read_only {
            e.context(format!(
                "writing {}: read-only here (under the systemd unit, reinstall it with `lhb unit install --persist` to let --persist edit the config)",
                path.display()
            ))
        } else {
            e.context(format!("writing {}", path.display()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_remove_keep_comments_and_other_entries() {
        let dir = std::env::temp_dir().join(format!("lhb-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lhb.toml");
        let original = "# my lhb\nmode = \"auto\" # keep me\n\n[[expose]]\n# ollama\ninterface = \"virbr0\"\nport = 11434\n";
        std::fs::write(&path, original).unwrap();
        let rule = Rule::new(
            Source::Network("app".into()),
            5432,
            Some("[::1]:5432".parse().unwrap()),
            Some("db".into()),
        );
        add(&path, &rule).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(original), "{text}");
        let cfg = config::parse("x", &text).unwrap();
        assert_eq!(cfg.rules.len(), 2);
        assert_eq!(cfg.rules[1], rule);
        assert!(add(&path, &rule).is_err(), "a duplicate is refused");
        // The protocol is written when it is not TCP, and reads back the same.
        let mut dns = Rule::new(Source::Interface("br0".into()), 53, None, None);
        dns.protocol = crate::model::rule::Protocol::Both;
        dns.allow = crate::model::rule::parse_allow("x", "10.0.0.2,fd00::/64", false).unwrap();
        add(&path, &dns).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("protocol = \"both\""), "{text}");
        assert!(
            text.contains("allow = [\"10.0.0.2\", \"fd00::/64\"]"),
            "{text}"
        );
        assert_eq!(config::parse("x", &text).unwrap().rules[2], dns);
        remove(&path, &Source::Interface("br0".into()), 53).unwrap();

        remove(&path, &Source::Network("app".into()), 5432).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
        assert!(remove(&path, &Source::Network("app".into()), 5432).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mode_and_owner_are_kept_and_symlinks_refused() {
        let dir = std::env::temp_dir().join(format!("lhb-persist-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lhb.toml");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&path, Some(4242), Some(4343)).unwrap();
        let rule = Rule::new(Source::Interface("br0".into()), 80, None, None);
        add(&path, &rule).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o640, 4242, 4343));
        // Nothing but the config is left in the directory.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("lhb.toml")]);

        let victim = dir.join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = add(&link, &rule).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
