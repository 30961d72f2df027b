//! `lhb unit print|install`: the systemd unit lhb runs under. Type=notify (READY=1 once
//! every rule that can be served is served), restarted always, ordered after Docker and
//! the network without requiring either, and with least privilege: root's uid (the
//! Docker socket and the firewall tools expect it) but only the capabilities the daemon
//! was measured to need, and a read-only view of the system.

use std::path::Path;

use anyhow::Context as _;

/// The capabilities `lhb run` needs, measured (tests/tests/service.rs runs the daemon
/// with exactly these): CAP_BPF to load the programs and create the maps, CAP_NET_ADMIN
/// to attach them (TC, socket lookup) and for the firewall tools, CAP_PERFMON for the
/// pointer handling the socket helpers need in the verifier, CAP_NET_RAW for the
/// legacy iptables variant (raw sockets), SO_BINDTODEVICE on older kernels and the UDP
/// forwarder's ICMP port unreachable answers (a raw ICMP socket).
pub const CAPABILITIES: &str = "CAP_BPF CAP_NET_ADMIN CAP_PERFMON CAP_NET_RAW";

/// Directories a unit must never make writable as a whole: the config belongs in a
/// directory of its own (/etc/lhb) for `--persist`.
const SYSTEM_DIRS: &[&str] = &[
    "/",
    "/etc",
    "/usr",
    "/usr/local",
    "/usr/local/etc",
    "/var",
    "/var/lib",
    "/run",
    "/opt",
    "/srv",
    "/home",
    "/root",
    "/tmp",
    "/boot",
    "/sys",
    "/proc",
    "/dev",
];

/// A path as one systemd word: quoted, with `\`, `"`, `%` (specifiers) and `$`
/// (variables) escaped. Control characters cannot be written into a unit at all.
pub fn quote(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    anyhow::ensure!(
        !s.chars().any(char::is_control),
        "{s:?} has control characters; a unit cannot name it"
    );
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '\\' => q.push_str("\\\\"),
            '"' => q.push_str("\\\""),
            '%' => q.push_str("%%"),
            '$' => q.push_str("$$"),
            c => q.push(c),
        }
    }
    q.push('"');
    Ok(q)
}

/// The unit for `exe` running with `config`; with `persist`, the config's directory is
/// writable for `lhb expose --persist` (and must be a directory of lhb's own).
pub fn text(exe: &Path, config: &Path, persist: bool) -> anyhow::Result<String> {
    let config_dir = config
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("/etc/lhb"));
    let writable = if persist {
        anyhow::ensure!(
            !SYSTEM_DIRS.iter().any(|d| Path::new(d) == config_dir),
            "--persist would make {} writable for lhb as a whole; keep the config in a directory of its own, e.g. --config /etc/lhb/lhb.toml",
            config_dir.display()
        );
        format!(
            "# `lhb expose --persist` edits the config: its directory (only) is writable.\nReadWritePaths=-/sys/fs/bpf {}\n",
            quote(&Path::new("-").join(config_dir.strip_prefix("/").unwrap_or(config_dir)))?
        )
    } else {
        "# bpffs for the kernel path; the config stays read-only (`lhb unit install --persist`\n# makes its directory writable for `lhb expose --persist`).\nReadWritePaths=-/sys/fs/bpf\n".to_string()
    };
    let exe = quote(exe)?;
    let config = quote(config)?;
    Ok(format!(
        "\
# Written by `lhb unit print` (`lhb unit install` puts it in /etc/systemd/system, the
# package in /usr/lib/systemd/system). Local changes: `systemctl edit lhb`.
[Unit]
Description=lhb: containers reach 127.0.0.1-only host services through their bridge gateway
# Started after Docker, firewalld and the network when they are there, without
# requiring them: network rules wait for the engine, interface rules do not need it,
# and firewalld's rules go in once it answers (and again after its reloads).
After=network-online.target docker.service firewalld.service
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exe} run --config {config}
# Synchronous: `systemctl reload` fails, with the reason, on a config that does not load.
ExecReload={exe} reload
Restart=always
RestartSec=1
WatchdogSec=30
TimeoutStopSec=20
# SIGTERM to lhb alone: with the default (control-group) an iptables that lhb runs while
# it removes its rules gets the signal too, and the rule stays behind.
KillMode=mixed
RuntimeDirectory=lhb
RuntimeDirectoryMode=0755

# Least privilege: uid 0 (the Docker socket and the firewall tools expect it) with only
# the capabilities lhb needs, and a read-only system.
CapabilityBoundingSet={CAPABILITIES}
AmbientCapabilities={CAPABILITIES}
NoNewPrivileges=yes
ProtectSystem=strict
{writable}ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
# Not ProtectKernelTunables: it mounts /sys read-only, bpffs included, whatever
# ReadWritePaths says, and the kernel path cannot pin its links.
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# Other processes are invisible; /proc/self (with /proc/net) is all lhb reads.
ProtectProc=invisible
ProcSubset=pid
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
# The system-service set plus the two calls the kernel path makes (the BPF syscall and
# perf_event_open for the verifier's pointer checks); anything else fails with EPERM.
SystemCallFilter=@system-service bpf perf_event_open
SystemCallErrorNumber=EPERM
# Sockets and files lhb creates are its own (the control socket is 0600 anyway).
UMask=0077
LimitMEMLOCK=infinity
# The proxy's connection budget is (LimitNOFILE - 384 - 1024 UDP flows) / 6 = 10688.
LimitNOFILE=65536
# A bound for a leak, never reached by design: 10688 connections with both pipes full
# (2 x 64 KiB each) are 1.33 GiB, the daemon itself tens of MiB.
MemoryMax=2G

[Install]
WantedBy=multi-user.target
"
    ))
}

/// Where the unit's sandbox would hide `exe`: the directive and the directory. Such a
/// unit fails with status=203/EXEC (e.g. a `cargo install` binary under /root).
pub fn hidden_by_sandbox(exe: &Path) -> Option<(&'static str, &'static str)> {
    [
        ("ProtectHome=yes", "/home"),
        ("ProtectHome=yes", "/root"),
        ("ProtectHome=yes", "/run/user"),
        ("PrivateTmp=yes", "/tmp"),
        ("PrivateTmp=yes", "/var/tmp"),
    ]
    .into_iter()
    .find(|(_, dir)| exe.starts_with(dir))
}

/// Writes the unit to `dir`/lhb.service; the path written.
pub fn install(
    dir: &Path,
    exe: &Path,
    config: &Path,
    persist: bool,
) -> anyhow::Result<std::path::PathBuf> {
    if let Some((directive, hidden)) = hidden_by_sandbox(exe) {
        anyhow::bail!(
            "{} is under {hidden}, which the unit's {directive} hides from the service: it could not start (status=203/EXEC). Install the binary first: `sudo install -m 0755 {} /usr/local/sbin/lhb`, then `sudo /usr/local/sbin/lhb unit install` (or give --exe PATH)",
            exe.display(),
            exe.display()
        );
    }
    let path = dir.join("lhb.service");
    std::fs::write(&path, text(exe, config, persist)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_and_escaped_for_systemd() {
        assert_eq!(
            quote(Path::new("/etc/lhb/my lhb.toml")).unwrap(),
            "\"/etc/lhb/my lhb.toml\""
        );
        assert_eq!(
            quote(Path::new("/x/a\"b\\c%d$e")).unwrap(),
            "\"/x/a\\\"b\\\\c%%d$$e\""
        );
        assert!(quote(Path::new("/x/a\nb")).is_err());
    }

    #[test]
    fn binaries_the_sandbox_hides_are_named() {
        for exe in [
            "/root/.cargo/bin/lhb",
            "/home/me/lhb",
            "/tmp/x/lhb",
            "/var/tmp/lhb",
        ] {
            assert!(hidden_by_sandbox(Path::new(exe)).is_some(), "{exe}");
        }
        for exe in [
            "/usr/sbin/lhb",
            "/usr/local/bin/lhb",
            "/opt/lhb/lhb",
            "/rooted/lhb",
        ] {
            assert!(hidden_by_sandbox(Path::new(exe)).is_none(), "{exe}");
        }
    }

    #[test]
    fn only_a_directory_of_its_own_is_made_writable() {
        let exe = Path::new("/usr/bin/lhb");
        let unit = text(exe, Path::new("/etc/lhb/lhb.toml"), false).unwrap();
        assert!(unit.contains("ReadWritePaths=-/sys/fs/bpf\n"), "{unit}");
        let unit = text(exe, Path::new("/etc/lhb/lhb.toml"), true).unwrap();
        assert!(
            unit.contains("ReadWritePaths=-/sys/fs/bpf \"-/etc/lhb\"\n"),
            "{unit}"
        );
        let err = text(exe, Path::new("/etc/lhb.toml"), true).unwrap_err();
        assert!(err.to_string().contains("directory of its own"), "{err}");
    }
}
