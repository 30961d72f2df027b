//! `cargo xtask setup`: everything building and testing lhb needs, installed only when
//! missing, so a second run is quiet and takes well under a second.
//!
//! - rust-src for the nightly toolchain (the eBPF crate builds `core` itself);
//! - bpf-linker 0.13, built from crates.io against the nightly's own LLVM shared library
//!   (no prebuilt binary can be downloaded here; its major version must match);
//! - the Debian packages the tests, the demo and the benchmark use;
//! - Redis's own test suite, from Debian's source package of the installed redis-server
//!   (the suite test runs it through every data path);
//! - where a Docker engine answers, the local image the Docker tests run (busybox from
//!   Debian's busybox-static, imported: no registry can be reached).

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";

const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "redis-server",
    "redis-tools",
    "iperf3",
    "socat",
    // The benchmark's peer proxy (its package starts nothing where systemd is not init;
    // where it is, the stock config listens nowhere).
    "haproxy",
    "bpftool",
    "util-linux",
    "busybox-static",
    "ufw",
    // systemd-analyze, for checking the generated unit.
    "systemd",
    // The benchmark's PostgreSQL (pgbench) and its charts' font.
    "postgresql",
    "fonts-dejavu-core",
    // The adversarial suite's hand-made frames (tests/hostile/probe.py) and SYN flood.
    "python3-scapy",
    "hping3",
    // The compose label test's real Compose (1.29 on Debian 12).
    "docker-compose",
    // The Podman test's real rootful Podman (4.3 with netavark on Debian 12; netavark is
    // only a Recommends of podman, and without it Podman falls back to CNI).
    "podman",
    "netavark",
    // UDP: a resolver on 127.0.0.53 (dnsmasq-base is the binary alone: its package
    // starts no service), dig, and the benchmark's dnsperf.
    "dnsmasq-base",
    "dnsutils",
    "dnsperf",
    // Redis's own test suite is Tcl; dpkg-source unpacks its source package.
    "tcl",
    "dpkg-dev",
];

/// Applets linked in the test image: what the tests run inside containers.
const BUSYBOX_APPLETS: &[&str] = &["sh", "wget", "nc", "sleep", "cat", "echo", "ip", "true"];

/// The firewalld test's: firewalld runs there in a namespace of the test's own, on a
/// private bus. Installed only where systemd is not init: there, the package starts
/// nothing; where it is, installing it would start firewalld on the machine itself.
const FIREWALLD_PACKAGES: &[&str] = &["firewalld", "dbus-daemon"];

pub fn run() -> anyhow::Result<()> {
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_cargo_fuzz()?;
    ensure_debian_packages()?;
    ensure_firewalld()?;
    ensure_bpffs()?;
    ensure_redis_suite()?;
    ensure_test_image()
}

/// Redis's test suite for exactly the installed server: `apt-get source` of its
/// version, through a sources list and lists directory of setup's own (the machine's
/// Debian entries, as deb-src), so the machine's apt configuration gains nothing.
fn ensure_redis_suite() -> anyhow::Result<()> {
    let dest = lhb_tests::redis::suite_dir()?;
    if dest.join("runtest").exists() {
        return link_redis_tools(&dest);
    }
    let version = lhb_tests::redis::installed_redis_version()?;
    println!(
        "setup: fetching Redis's test suite (source of redis {version}) into {}",
        dest.display()
    );
    let work = cache_dir().join("redis-suite").join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(work.join("lists/partial"))?;
    let list = work.join("sources.list");
    let entries = debian_sources()?;
    if entries.is_empty() {
        bail!("no Debian entry in /etc/apt/sources.list(.d): cannot fetch redis's source");
    }
    let text: String = entries
        .iter()
        .map(|(uri, suite, components)| format!("deb-src {uri} {suite} {components}\n"))
        .collect();
    fs::write(&list, text)?;
    let opts = [
        format!("-oDir::Etc::sourcelist={}", list.display()),
        "-oDir::Etc::sourceparts=/nonexistent".to_string(),
        format!("-oDir::State::Lists={}", work.join("lists").display()),
        // The cache is root's: apt's sandbox user could not write there.
        "-oAPT::Sandbox::User=root".to_string(),
    ];
    let ok = Command::new("apt-get")
        .args(&opts)
        .args(["-qq", "update"])
        .stdout(Stdio::null())
        .status()
        .context("apt-get update (deb-src)")?
        .success();
    if !ok {
        bail!("apt-get update with {} failed", list.display());
    }
    let ok = Command::new("apt-get")
        .args(&opts)
        .args(["-qq", "source", &format!("redis={version}")])
        .current_dir(&work)
        .stdout(Stdio::null())
        .status()
        .context("apt-get source redis")?
        .success();
    if !ok {
        bail!("apt-get source redis={version} failed");
    }
    let tree = fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.join("runtest").exists())
        .context("apt-get source unpacked no tree with runtest")?;
    fs::create_dir_all(dest.parent().unwrap_or(Path::new("/")))?;
    fs::rename(&tree, &dest).with_context(|| format!("moving the suite to {}", dest.display()))?;
    let _ = fs::remove_dir_all(&work);
    link_redis_tools(&dest)
}

/// The suite runs the tools it would have built (redis-cli, redis-benchmark...) from
/// its `src/`: the installed ones, of the same version, in their place.
fn link_redis_tools(tree: &Path) -> anyhow::Result<()> {
    for tool in [
        "redis-cli",
        "redis-benchmark",
        "redis-server",
        "redis-check-aof",
        "redis-check-rdb",
    ] {
        let installed = Path::new("/usr/bin").join(tool);
        let link = tree.join("src").join(tool);
        if installed.exists() && fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(&installed, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    Ok(())
}

/// The machine's Debian package sources for its own release (URI, suite, components),
/// from both the one-line and the deb822 formats; other vendors' entries are left out.
pub fn debian_sources() -> anyhow::Result<Vec<(String, String, String)>> {
    let os = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .context("/etc/os-release has no VERSION_CODENAME")?;
    let ours = |suite: &str| suite == codename || suite.starts_with(&format!("{codename}-"));
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        if f.extension().is_some_and(|e| e == "sources") {
            for block in text.split("\n\n") {
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}:")))
                        .map(|v| v.trim().to_string())
                        .unwrap_or_default()
                };
                if !field("Types").split_whitespace().any(|t| t == "deb") {
                    continue;
                }
                let components = field("Components");
                for uri in field("URIs").split_whitespace() {
                    for suite in field("Suites").split_whitespace().filter(|s| ours(s)) {
                        out.push((uri.to_string(), suite.to_string(), components.clone()));
                    }
                }
            }
        } else {
            for line in text.lines() {
                let mut words = line.split_whitespace().peekable();
                if words.next() != Some("deb") {
                    continue;
                }
                // Options in brackets ([signed-by=...]) come before the URI.
                while words.peek().is_some_and(|w| w.starts_with('[')) {
                    let w = words.next().unwrap_or_default();
                    if !w.ends_with(']') {
                        for w in words.by_ref() {
                            if w.ends_with(']') {
                                break;
                            }
                        }
                    }
                }
                let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
                    continue;
                };
                if ours(suite) {
                    out.push((
                        uri.to_string(),
                        suite.to_string(),
                        words.collect::<Vec<_>>().join(" "),
                    ));
                }
            }
        }
    }
    Ok(out)
}

fn ensure_firewalld() -> anyhow::Result<()> {
    if Path::new("/run/systemd/system").exists() {
        if !Path::new("/usr/sbin/firewalld").exists() {
            println!(
                "setup: NOT installing firewalld: systemd is init here, so the package would start it and it would take over this machine's firewall. Install it yourself and stop it (`systemctl disable --now firewalld`) to run the firewalld tests (they start their own), or set LHB_ALLOW_SKIP=firewalld."
            );
        }
        return Ok(());
    }
    ensure_packages(FIREWALLD_PACKAGES)
}

/// bpffs at /sys/fs/bpf, where lhb pins its links (systemd mounts it at boot; a
/// machine without systemd as init may not have it).
fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    println!("setup: mounting bpffs at /sys/fs/bpf");
    let ok = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount")?
        .success();
    if !ok {
        bail!("mounting bpffs at /sys/fs/bpf failed");
    }
    Ok(())
}

fn ensure_test_image() -> anyhow::Result<()> {
    if !lhb_tests::docker::engine_answers() {
        // The Docker tests say so themselves, loudly; nothing to prepare here.
        return Ok(());
    }
    let image = lhb_tests::docker::IMAGE;
    if lhb_tests::docker::image_present() {
        return Ok(());
    }
    println!("setup: building the local Docker image {image} from busybox-static");
    let root = env::temp_dir().join(format!("lhb-image-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin"))?;
    fs::copy("/bin/busybox", root.join("bin/busybox")).context("copying /bin/busybox")?;
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    fs::create_dir_all(root.join("etc"))?;
    // Static glibc resolves names (even IP literals, in busybox wget) through NSS; without
    // this file it tries to load NSS modules it cannot have and crashes.
    fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    fs::create_dir_all(root.join("tmp"))?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    let status = Command::new("docker")
        .args(["import", "--change", "ENV PATH=/bin", "-", image])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()
        .context("docker import")?;
    let _ = fs::remove_dir_all(&root);
    if !status.success() {
        bail!("docker import of {image} failed ({status})");
    }
    Ok(())
}

pub fn toolchain() -> String {
    env::var("LHB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into())
}

/// Where setup keeps what it builds: outside the source tree, so clones share it.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = env::var_os("LHB_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/lhb")
}

fn linker_root() -> PathBuf {
    cache_dir().join("bpf-linker")
}

/// PATH with the bpf-linker directory in front.
pub fn path_with_linker() -> OsString {
    let mut dirs = vec![linker_root().join("bin")];
    dirs.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(dirs).unwrap_or_default()
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let tc = toolchain();
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        &tc,
    ]))
    .with_context(|| {
        format!("the {tc} toolchain is needed for the eBPF programs and is not installed")
    })?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: adding rust-src to the {tc} toolchain");
    output(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", &tc]))?;
    Ok(())
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let bin = linker_root().join("bin/bpf-linker");
    // The binary finds libLLVM through its RUNPATH (the prefix below); if the nightly
    // was updated the library is gone and the binary fails to start: rebuild then.
    let works = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    let tc = toolchain();
    let sysroot = output(
        Command::new("rustc")
            .arg(format!("+{tc}"))
            .args(["--print", "sysroot"]),
    )?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the {tc} toolchain does not ship LLVM as a shared library",
                libdir.display()
            )
        })?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let prefix = cache_dir().join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    // One link under the generic name for the linker, one under the SONAME for the loader.
    for name in ["libLLVM.so".to_string(), llvm.clone()] {
        let link = prefix_lib.join(&name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(libdir.join(&llvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {llvm} (about a minute, once)"
    );
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(linker_root())
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("building bpf-linker failed ({status}); see the output above");
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (and the short pass of `cargo xtask test`).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    ensure_cargo_tool("cargo-fuzz", "fuzz", CARGO_FUZZ_VERSION)
}

/// Installs cargo subcommand `krate` (`cargo SUB`) at exactly `version` unless that
/// version answers `cargo SUB --version` already.
pub fn ensure_cargo_tool(krate: &str, sub: &str, version: &str) -> anyhow::Result<()> {
    let has = Command::new("cargo")
        .args([sub, "--version"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version))
        .unwrap_or(false);
    if has {
        return Ok(());
    }
    println!("setup: installing {krate} {version} (a minute or two, once)");
    let status = Command::new("cargo")
        .args(["install", krate, "--locked", "--version", version])
        .status()
        .with_context(|| format!("running cargo install {krate}"))?;
    if !status.success() {
        bail!("installing {krate} failed ({status}); see the output above");
    }
    Ok(())
}

fn ensure_debian_packages() -> anyhow::Result<()> {
    ensure_packages(DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` is missing (apt-get, as root); idempotent.
pub fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root",
            missing.join(" ")
        );
    }
    println!("setup: installing {}", missing.join(" "));
    let quiet = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null());
    };
    let mut update = Command::new("apt-get");
    update.args(["-qq", "update"]);
    quiet(&mut update);
    if !update.status().context("apt-get update")?.success() {
        bail!("apt-get update failed");
    }
    let mut install = Command::new("apt-get");
    install.args(["-qq", "install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    quiet(&mut install);
    if !install.status().context("apt-get install")?.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    // redis-server's package starts a system instance; the tests run their own.
    let _ = Command::new("systemctl")
        .args(["disable", "--now", "redis-server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    Ok(())
}
