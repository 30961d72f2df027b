//! `cargo xtask fuzz [--runs N]`: the cargo-fuzz targets in fuzz/ (config parser, rule
//! spec parser, network labels, control and metrics requests), each for N iterations, starting from the
//! committed corpus in fuzz/corpus/TARGET. New inputs go to a scratch directory, so the
//! committed corpus changes only by hand; a crash leaves its input in
//! fuzz/artifacts/TARGET and fails the run (turn it into a unit test, then fix it).

use std::process::Command;

use anyhow::{Context as _, bail};

pub const TARGETS: &[&str] = &["config", "spec", "control", "labels"];

/// The nightly toolchain cargo-fuzz builds with (the one the eBPF build uses).
const TOOLCHAIN: &str = "+nightly";

pub fn run(runs: u64) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let fuzz = root.join("fuzz");
    for target in TARGETS {
        let scratch =
            std::env::temp_dir().join(format!("lhb-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)?;
        let corpus = fuzz.join("corpus").join(target);
        eprintln!("fuzz: {target}: {runs} runs from {}", corpus.display());
        let s = Command::new("cargo")
            .current_dir(&root)
            .args([TOOLCHAIN, "fuzz", "run", "--sanitizer", "none", target])
            .arg(&scratch)
            .arg(&corpus)
            .args([
                "--",
                &format!("-runs={runs}"),
                "-max_len=4096",
                // One line per new input is thousands of lines in CI's log.
                "-verbosity=0",
                "-print_final_stats=1",
            ])
            // The parsers only: no eBPF programs to build under the fuzzer's flags.
            .env("LHB_NO_EBPF", "1")
            .status()
            .context("running cargo fuzz (cargo xtask setup installs cargo-fuzz)")?;
        let _ = std::fs::remove_dir_all(&scratch);
        if !s.success() {
            bail!(
                "fuzz target {target} failed ({s}): its input is in {}",
                fuzz.join("artifacts").join(target).display()
            );
        }
    }
    Ok(())
}
