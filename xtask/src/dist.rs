//! `cargo xtask dist`: what a user installs.
//!
//! - `target/dist/lhb_VERSION-1_amd64.deb` (cargo-deb, metadata in lhb-daemon's
//!   Cargo.toml): /usr/sbin/lhb, the unit `lhb unit print` writes for that path, the
//!   conffile /etc/lhb/lhb.toml (no active rule), completions, man pages, docs and
//!   debhelper's maintainer snippets; lintian must report nothing but the overrides
//!   shipped in `lhb-daemon/debian/lintian-overrides`, each with its reason.
//! - with `--musl`: `target/dist/lhb-VERSION-x86_64-linux-musl.tar.gz`, a static binary
//!   for any distribution, with the same completions, man pages and example config.
//!
//! The generated files come from the release binary itself (`lhb unit print`,
//! `lhb completions`, `lhb man`), so the package cannot disagree with `--help`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};

const CARGO_DEB_VERSION: &str = "3.8.0";
/// lintian checks the package; dpkg-dev's dpkg-shlibdeps gives cargo-deb the
/// dependencies (`$auto`).
const PACKAGES: &[&str] = &["lintian", "dpkg-dev"];
const MUSL: &str = "x86_64-unknown-linux-musl";
/// Where the unit, the package and the `ExecStart=` agree the binary lives.
pub const SBIN: &str = "/usr/sbin/lhb";

pub struct Artifacts {
    pub deb: PathBuf,
}

pub fn run(musl: bool) -> anyhow::Result<Artifacts> {
    crate::setup::ensure_packages(PACKAGES)?;
    crate::setup::ensure_cargo_tool("cargo-deb", "deb", CARGO_DEB_VERSION)?;
    crate::build_release()?;
    let target = target_dir()?;
    let out = target.join("dist");
    std::fs::create_dir_all(&out)?;
    // cargo-deb maps the assets' `target/release/` prefix to the real target directory.
    let generated = target.join("release/dist");
    generate(&target.join("release/lhb"), &generated, SBIN)?;
    let deb = package(&out)?;
    lintian(&deb)?;
    println!("dist: {}", deb.display());
    if musl {
        tarball(&out)?;
    }
    Ok(Artifacts { deb })
}

/// The unit, completions and man pages, written by `lhb` itself into `dir`.
fn generate(lhb: &Path, dir: &Path, exe: &str) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("completions"))?;
    let unit = output(Command::new(lhb).args([
        "unit",
        "print",
        "--exe",
        exe,
        "--config",
        "/etc/lhb/lhb.toml",
    ]))?;
    std::fs::write(dir.join("lhb.service"), unit)?;
    for (shell, file) in [("bash", "lhb"), ("zsh", "_lhb"), ("fish", "lhb.fish")] {
        let text = output(Command::new(lhb).args(["completions", shell]))?;
        std::fs::write(dir.join("completions").join(file), text)?;
    }
    let man = dir.join("man");
    output(Command::new(lhb).arg("man").arg(&man))?;
    // Compressed with no timestamp, so the same source gives the same package.
    let s = Command::new("sh")
        .arg("-c")
        .arg("gzip -9n \"$0\"/*.8")
        .arg(&man)
        .status()
        .context("running gzip")?;
    ensure!(s.success(), "gzip of the man pages failed ({s})");
    Ok(())
}

fn package(out: &Path) -> anyhow::Result<PathBuf> {
    let mut c = crate::cargo();
    c.args(["deb", "--package", "lhb-daemon", "--no-build", "--output"])
        .arg(out);
    let printed = output(&mut c)?;
    let deb = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no package: {printed}"))?;
    ensure!(deb.exists(), "{} was not written", deb.display());
    Ok(deb)
}

/// Errors and warnings fail the build; informational tags and the shipped overrides
/// (each explained there) do not.
fn lintian(deb: &Path) -> anyhow::Result<()> {
    let o = Command::new("lintian")
        .args(["--fail-on", "error,warning", "--info"])
        .arg(deb)
        .output()
        .context("running lintian")?;
    let report = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        bail!("lintian found problems in {}:\n{report}", deb.display());
    }
    for l in report
        .lines()
        .filter(|l| l.starts_with("I:") || l.starts_with("P:"))
    {
        println!("dist: lintian: {l}");
    }
    Ok(())
}

/// The static release build (x86_64-unknown-linux-musl), checked to need no interpreter
/// and no shared library: the tarball's binary and the image's.
pub fn musl_binary() -> anyhow::Result<PathBuf> {
    let s = Command::new("rustup")
        .args(["target", "add", MUSL])
        .status()
        .context("running rustup")?;
    ensure!(s.success(), "rustup target add {MUSL} failed ({s})");
    let mut c = crate::cargo();
    c.args([
        "build",
        "--release",
        "--package",
        "lhb-daemon",
        "--target",
        MUSL,
    ]);
    crate::status(c, "cargo build --target x86_64-unknown-linux-musl")?;
    let target = target_dir()?;
    let lhb = target.join(MUSL).join("release/lhb");
    // static-pie: a DYNAMIC segment for its own relocations, but no interpreter and no
    // shared library.
    let elf = output(Command::new("readelf").arg("-ldW").arg(&lhb))?;
    ensure!(
        !elf.contains("INTERP") && !elf.contains("(NEEDED)"),
        "{} is not a static executable:\n{elf}",
        lhb.display()
    );
    Ok(lhb)
}

/// A static build for distributions without the package, measured to run the kernel
/// path like the glibc one (the eBPF object is the same).
fn tarball(out: &Path) -> anyhow::Result<PathBuf> {
    let lhb = musl_binary()?;
    let target = target_dir()?;
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("lhb-{version}");
    let stage = target.join(MUSL).join("release/dist").join(&name);
    generate(&lhb, &stage, "/usr/local/sbin/lhb")?;
    // The tarball installs by hand: `lhb unit install` writes the unit for wherever the
    // binary was put, so no unit file is shipped.
    std::fs::remove_file(stage.join("lhb.service"))?;
    std::fs::copy(&lhb, stage.join("lhb"))?;
    let s = Command::new("strip")
        .arg(stage.join("lhb"))
        .status()
        .context("running strip")?;
    ensure!(s.success(), "strip failed ({s})");
    let root = crate::workspace_root();
    for f in ["README.md", "LICENSE-MIT", "LICENSE-APACHE"] {
        std::fs::copy(root.join(f), stage.join(f))?;
    }
    std::fs::copy(
        root.join("lhb-daemon/debian/lhb.toml"),
        stage.join("lhb.toml.example"),
    )?;
    let tar = out.join(format!("{name}-x86_64-linux-musl.tar.gz"));
    let s = Command::new("tar")
        .arg("-czf")
        .arg(&tar)
        .arg("--owner=0")
        .arg("--group=0")
        .arg("-C")
        .arg(stage.parent().context("stage has a parent")?)
        .arg(&name)
        .status()
        .context("running tar")?;
    ensure!(s.success(), "tar failed ({s})");
    println!("dist: {}", tar.display());
    Ok(tar)
}

fn target_dir() -> anyhow::Result<PathBuf> {
    let mut c = crate::cargo();
    c.args(["metadata", "--format-version", "1", "--no-deps"]);
    let meta: serde_json::Value = serde_json::from_str(&output(&mut c)?)?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

fn output(c: &mut Command) -> anyhow::Result<String> {
    let o = c.output().with_context(|| format!("running {c:?}"))?;
    if !o.status.success() {
        bail!(
            "{c:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}
