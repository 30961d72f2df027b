//! `cargo xtask image`: lhb as an OCI image, built and loaded into the local Docker
//! engine (no registry), tagged `lhb:VERSION` and `lhb:latest`, `lhb` its entrypoint.
//!
//! What is in it, and nothing else: the static lhb (musl, as in the tarball), and from
//! Debian 12's own packages what lhb runs: `nft`, iptables in both variants
//! (`xtables-nft-multi`, `xtables-legacy-multi`, their extensions, the names Debian's
//! alternatives give them, nft first as Debian's default), and iproute2's `ip`, `ss` and
//! `tc` (verify's and doctor's probes; the kernel path's clsact listing on kernels
//! without TCX), each with the shared libraries it needs (as `ldd` finds them in that
//! Debian root), and netbase's /etc/protocols, /etc/services and /etc/ethertypes. The
//! Debian root is built once with mmdebstrap (the `essential` variant plus those
//! packages, cached), and only those files are copied out of it: no shell, no package
//! manager, no dpkg database in the image.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

/// Bump when PACKAGES changes: the cached Debian root is rebuilt.
const ROOT_VERSION: u32 = 1;
const PACKAGES: &str = "iptables,nftables,iproute2,netbase";
const LIB: &str = "usr/lib/x86_64-linux-gnu";

/// The binaries the image holds (besides lhb), by their path in the Debian root.
const BINARIES: &[&str] = &[
    "usr/sbin/xtables-nft-multi",
    "usr/sbin/xtables-legacy-multi",
    "usr/sbin/nft",
    "usr/bin/ip",
    "usr/bin/ss",
    "usr/sbin/tc",
];

/// The tag the tests and the README's compose file use.
pub fn tag() -> String {
    format!("lhb:{}", env!("CARGO_PKG_VERSION"))
}

pub fn run() -> anyhow::Result<()> {
    crate::setup::ensure_packages(&["mmdebstrap"])?;
    let lhb = crate::dist::musl_binary()?;
    let root = debian_root()?;
    let out = crate::workspace_root().join("target/image");
    let stage = out.join("rootfs");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&stage)?;
    fill(&stage, &root, &lhb)?;
    let tar = out.join("rootfs.tar");
    sh(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&stage)
        .arg("."))?;
    std::fs::copy(
        crate::workspace_root().join("lhb-daemon/image/Dockerfile"),
        out.join("Dockerfile"),
    )?;
    let version = env!("CARGO_PKG_VERSION");
    sh(Command::new("docker")
        .args(["build", "--quiet", "--build-arg"])
        .arg(format!("VERSION={version}"))
        .args(["-t", &tag(), "-t", "lhb:latest"])
        .arg(&out))?;
    let size =
        output(Command::new("docker").args(["image", "inspect", "--format", "{{.Size}}", &tag()]))?;
    let mb = size.trim().parse::<f64>().unwrap_or(0.0) / 1e6;
    println!("image: {} and lhb:latest, {mb:.1} MB", tag());
    Ok(())
}

/// Debian 12 with the packages, as a directory, built once.
fn debian_root() -> anyhow::Result<PathBuf> {
    let dir = crate::setup::cache_dir().join("image");
    let root = dir.join(format!("debian-root-v{ROOT_VERSION}"));
    if root.join("usr/sbin/nft").exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(&dir)?;
    let partial = dir.join("partial-root");
    let _ = std::fs::remove_dir_all(&partial);
    let mirror = crate::systemd::apt_mirror();
    println!("image: building a Debian 12 root from {mirror} (once)");
    sh(Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=essential",
            &format!("--include={PACKAGES}"),
            "bookworm",
        ])
        .arg(&partial)
        .arg(format!("deb {mirror} bookworm main")))?;
    std::fs::rename(&partial, &root)?;
    Ok(root)
}

/// The image's files in `stage`: lhb, the binaries and what they load, from `root`.
fn fill(stage: &Path, root: &Path, lhb: &Path) -> anyhow::Result<()> {
    // Debian 12's merged /usr: the interpreter path in every binary is /lib64/...
    for d in [
        "usr/bin",
        "usr/sbin",
        LIB,
        "usr/lib64",
        "etc",
        "run/lhb",
        "tmp",
    ] {
        std::fs::create_dir_all(stage.join(d))?;
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(to, stage.join(link))?;
    }
    sh(Command::new("chmod").arg("1777").arg(stage.join("tmp")))?;
    let mut files: BTreeSet<String> = BINARIES.iter().map(|s| s.to_string()).collect();
    let xtables = format!("{LIB}/xtables");
    for e in std::fs::read_dir(root.join(&xtables)).context("the xtables extensions")? {
        files.insert(format!("{xtables}/{}", e?.file_name().to_string_lossy()));
    }
    // Everything each of them links, as the Debian root's loader resolves it.
    let mut libs = BTreeSet::new();
    for f in &files {
        libs.extend(needed(root, f)?);
    }
    for f in files.iter().chain(&libs) {
        let to = stage.join(f);
        std::fs::create_dir_all(to.parent().context("a parent")?)?;
        // The file a soname link leads to, under the soname: no links to keep right.
        std::fs::copy(root.join(f), &to).with_context(|| format!("copying {f}"))?;
    }
    for f in ["etc/protocols", "etc/services", "etc/ethertypes"] {
        std::fs::copy(root.join(f), stage.join(f)).with_context(|| format!("copying {f}"))?;
    }
    // The names lhb and users call, as Debian's alternatives set them by default.
    for v in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            for (name, to) in [
                (format!("{v}{suffix}"), "xtables-nft-multi"),
                (format!("{v}-nft{suffix}"), "xtables-nft-multi"),
                (format!("{v}-legacy{suffix}"), "xtables-legacy-multi"),
            ] {
                std::os::unix::fs::symlink(to, stage.join("usr/sbin").join(name))?;
            }
        }
    }
    std::fs::copy(lhb, stage.join("usr/sbin/lhb"))?;
    sh(Command::new("strip").arg(stage.join("usr/sbin/lhb")))?;
    Ok(())
}

/// The shared libraries (and the loader) `file` needs, as paths in `root`.
fn needed(root: &Path, file: &str) -> anyhow::Result<Vec<String>> {
    let out = output(
        Command::new("chroot")
            .arg(root)
            .args(["/usr/bin/ldd", &format!("/{file}")]),
    )?;
    let mut libs = Vec::new();
    for l in out.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match l.split_once("=>") {
            Some((_, p)) => p.split_whitespace().next(),
            None => l.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        let Some(path) = path else { continue };
        if path == "not" {
            bail!("{file}: a library is missing in the Debian root: {l}");
        }
        // The real path under /usr (merged /usr: /lib is usr/lib, /lib64 usr/lib64).
        let p = path.trim_start_matches('/');
        let p = if p.starts_with("usr/") {
            p.to_string()
        } else {
            format!("usr/{p}")
        };
        libs.push(p);
    }
    ensure!(!libs.is_empty(), "{file}: ldd found nothing:\n{out}");
    Ok(libs)
}

fn sh(c: &mut Command) -> anyhow::Result<()> {
    let s = c.status().with_context(|| format!("running {c:?}"))?;
    ensure!(s.success(), "{c:?} failed ({s})");
    Ok(())
}

fn output(c: &mut Command) -> anyhow::Result<String> {
    let o = c.output().with_context(|| format!("running {c:?}"))?;
    ensure!(
        o.status.success(),
        "{c:?} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}
