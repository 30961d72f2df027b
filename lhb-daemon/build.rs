//! Builds the eBPF programs (lhb-ebpf) with the nightly toolchain and bpf-linker, and
//! leaves the object in OUT_DIR for `include_bytes_aligned!`.
//!
//! `cargo xtask setup` installs bpf-linker under ~/.cache/lhb; putting that directory on
//! PATH here means a plain `cargo build` or `cargo clippy` works once setup has run.

use std::{env, path::PathBuf};

use anyhow::Context as _;

/// `lhb --version` names the commit it was built from (`unknown` outside a git checkout,
/// e.g. from a source tarball). Rebuilt when HEAD moves, not on every edit.
fn git_revision() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&manifest)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rev = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let dir = PathBuf::from(dir);
        let mut watched = vec![dir.join("HEAD"), dir.join("packed-refs")];
        if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(dir.join(r));
        }
        // A path that does not exist would make cargo run this script on every build.
        for f in watched.iter().filter(|f| f.exists()) {
            println!("cargo:rerun-if-changed={}", f.display());
        }
    }
    println!("cargo:rustc-env=LHB_GIT_REVISION={rev}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LHB_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=LHB_CACHE_DIR");
    println!("cargo:rerun-if-env-changed=LHB_NO_EBPF");
    git_revision()?;

    // The fuzz targets (cargo xtask fuzz) use the parsers only: no programs to build
    // under their instrumentation flags. A daemon built so cannot load its kernel path
    // and says so (kernel.rs).
    if env::var_os("LHB_NO_EBPF").is_some() {
        let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
        std::fs::write(out.join("lhb"), b"").context("writing the empty program object")?;
        return Ok(());
    }

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest
        .parent()
        .context("lhb-daemon has no parent directory")?;
    let ebpf_dir = root.join("lhb-ebpf");
    // The programs include lhb-common's types; a layout change there must rebuild them.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("lhb-common").display()
    );

    let cache = env::var_os("LHB_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lhb")));
    if let Some(cache) = cache {
        let linker_dir = cache.join("bpf-linker/bin");
        if linker_dir.join("bpf-linker").exists() {
            let path = env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![linker_dir];
            dirs.extend(env::split_paths(&path));
            let joined = env::join_paths(dirs).context("joining PATH")?;
            // SAFETY: build scripts are single-threaded at this point.
            unsafe { env::set_var("PATH", joined) };
        }
    }

    let toolchain = env::var("LHB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_string());
    let root_dir = ebpf_dir
        .to_str()
        .context("lhb-ebpf path is not UTF-8")?
        .to_string();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lhb-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context("building the eBPF programs failed; run `cargo xtask setup` to install nightly rust-src and bpf-linker")
}
