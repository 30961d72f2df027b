//! Medians, ratios, the Markdown table, the JSON and the charts.

use std::fmt::Write as _;

use super::*;

/// results.json: one row per sample.
#[derive(serde::Serialize)]
struct Results {
    results: Vec<Row>,
}

#[derive(serde::Serialize)]
struct Row {
    path: &'static str,
    workload: &'static str,
    value: f64,
    unit: &'static str,
    lower_is_better: bool,
    /// Why the repetition does not count; absent when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid: Option<String>,
}

impl From<&Sample> for Row {
    fn from(s: &Sample) -> Row {
        Row {
            path: s.path.name(),
            workload: s.workload.name(),
            value: s.value,
            unit: s.workload.unit(),
            lower_is_better: s.workload.lower_is_better(),
            invalid: s.invalid.clone(),
        }
    }
}

/// For each repetition where both `a` and `b` have a valid sample of `w`, how many times
/// as good `a` was as `b` in that repetition.
pub(super) fn pair_ratios(samples: &[Sample], w: Workload, a: Path, b: Path) -> Vec<f64> {
    let of = |p: Path, rep: usize| {
        samples
            .iter()
            .find(|s| s.workload == w && s.path == p && s.rep == rep && s.invalid.is_none())
            .map(|s| s.value)
    };
    let mut reps: Vec<usize> = samples.iter().map(|s| s.rep).collect();
    reps.sort_unstable();
    reps.dedup();
    reps.into_iter()
        .filter_map(|rep| match (of(a, rep), of(b, rep)) {
            (Some(x), Some(y)) if x > 0.0 && y > 0.0 => {
                Some(if w.lower_is_better() { y / x } else { x / y })
            }
            _ => None,
        })
        .collect()
}

/// Median, min and max of one path's valid samples for one workload.
pub(super) fn stats(samples: &[Sample], w: Workload, p: Path) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = samples
        .iter()
        .filter(|s| s.workload == w && s.path == p && s.invalid.is_none())
        .map(|s| s.value)
        .collect();
    if v.is_empty() {
        return None;
    }
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    Some((median(&mut v), min, max))
}

pub(super) fn report(
    samples: &[Sample],
    paths: &[Path],
    reps: usize,
    quick: bool,
) -> anyhow::Result<()> {
    let mut md = String::new();
    let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
    let pairs: Vec<(Path, Path)> = [
        (Path::Kernel, Path::Direct),
        (Path::Proxy, Path::Direct),
        (Path::Kernel, Path::Socat),
        (Path::Proxy, Path::Socat),
        (Path::Proxy, Path::Haproxy),
    ]
    .into_iter()
    .filter(|(a, b)| paths.contains(a) && paths.contains(b))
    .collect();
    let pair_names: Vec<String> = pairs
        .iter()
        .map(|(a, b)| format!("{} vs {}", a.name(), b.name()))
        .collect();
    writeln!(
        md,
        "| workload | {} | {} |",
        names.join(" | "),
        pair_names.join(" | ")
    )?;
    writeln!(
        md,
        "|---|{}{}",
        "---|".repeat(paths.len()),
        "---|".repeat(pairs.len())
    )?;
    for &w in Workload::ALL {
        if !samples.iter().any(|s| s.workload == w) {
            continue;
        }
        let (unit, lower) = (w.unit(), w.lower_is_better());
        let f = |x: f64| format!("{x:.*}", w.decimals());
        let cells: Vec<String> = paths
            .iter()
            .map(|&p| {
                let mut cell = match stats(samples, w, p) {
                    Some((m, lo, hi)) => format!("{} ({}-{})", f(m), f(lo), f(hi)),
                    None => "n/a".into(),
                };
                let invalid = samples
                    .iter()
                    .filter(|s| s.workload == w && s.path == p && s.invalid.is_some())
                    .count();
                if invalid > 0 {
                    cell.push_str(&format!(" [{invalid} invalid]"));
                }
                if p != Path::Direct && beats_direct(samples, w, p) {
                    cell.push_str(" [suspect: beats direct]");
                }
                cell
            })
            .collect();
        // Ratios read "how many times as good": above 1.00x is better, for every unit.
        // Each is the median of the ratios within one repetition (min-max of those):
        // a slow moment of the machine hits both paths of a pair alike.
        let ratios: Vec<String> = pairs
            .iter()
            .map(|&(a, b)| {
                let mut r = pair_ratios(samples, w, a, b);
                if r.is_empty() {
                    return "-".into();
                }
                let (lo, hi) = (
                    r.iter().copied().fold(f64::MAX, f64::min),
                    r.iter().copied().fold(f64::MIN, f64::max),
                );
                if r.len() == 1 {
                    format!("{lo:.2}x")
                } else {
                    format!("{:.2}x ({lo:.2}-{hi:.2})", median(&mut r))
                }
            })
            .collect();
        writeln!(
            md,
            "| {} ({unit}, {}) | {} | {} |",
            w.name(),
            if lower {
                "lower is better"
            } else {
                "higher is better"
            },
            cells.join(" | "),
            ratios.join(" | ")
        )?;
    }
    writeln!(
        md,
        "\nMedian (min-max) of {reps} interleaved repetitions{}. Ratios are \"times as good\": \
         above 1.00x the first path is better, whichever way the unit goes; each is the median \
         (min-max) of the ratios within a repetition, whose paths ran one right after another. n/a: the path has \
         no daemon (direct) or does not follow a bridge (direct, socat).",
        if quick { " (--quick: short runs)" } else { "" }
    )?;
    let invalid: Vec<&Sample> = samples.iter().filter(|s| s.invalid.is_some()).collect();
    if !invalid.is_empty() {
        writeln!(
            md,
            "\nInvalid repetitions (not counted: they ran other than intended):"
        )?;
        for s in invalid {
            writeln!(
                md,
                "- {} {}: {}",
                s.path.name(),
                s.workload.name(),
                s.invalid.as_deref().unwrap_or_default()
            )?;
        }
    }
    if Workload::ALL.iter().any(|&w| {
        paths
            .iter()
            .any(|&p| p != Path::Direct && beats_direct(samples, w, p))
    }) {
        writeln!(
            md,
            "\nsuspect: the path's median beats direct's by more than direct's own spread (max - min) in this run; a path cannot beat the physical limit, so the measurement is in doubt."
        )?;
    }
    println!("\n{md}");
    let dir = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.md"), &md)?;
    let results = Results {
        results: samples.iter().map(Row::from).collect(),
    };
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let charts = super::charts::draw(&dir, samples_for_charts(samples, paths), paths_names(paths))?;
    println!(
        "written to {}: results.md, results.json, {}",
        dir.display(),
        charts.join(", ")
    );
    Ok(())
}

/// Whether `p`'s median beats direct's by more than direct's own spread: a path cannot
/// beat the physical limit, so something in that measurement is off.
fn beats_direct(samples: &[Sample], w: Workload, p: Path) -> bool {
    let (Some((m, ..)), Some((d, dlo, dhi))) =
        (stats(samples, w, p), stats(samples, w, Path::Direct))
    else {
        return false;
    };
    let spread = dhi - dlo;
    if w.lower_is_better() {
        m < d - spread
    } else {
        m > d + spread
    }
}

pub(super) fn paths_names(paths: &[Path]) -> Vec<&'static str> {
    paths.iter().map(|p| p.name()).collect()
}

/// Per chart group: its workloads with (path, median, min, max).
pub(super) fn samples_for_charts(samples: &[Sample], paths: &[Path]) -> Vec<super::charts::Group> {
    let mut groups: Vec<super::charts::Group> = Vec::new();
    for &w in Workload::ALL {
        let (unit, lower, group) = (w.unit(), w.lower_is_better(), w.chart());
        let bars: Vec<super::charts::Bar> = paths
            .iter()
            .filter_map(|&p| stats(samples, w, p).map(|(m, lo, hi)| (p.name(), m, lo, hi)))
            .collect();
        if bars.is_empty() {
            continue;
        }
        let g = match groups.iter_mut().find(|g| g.name == group) {
            Some(g) => g,
            None => {
                groups.push(super::charts::Group {
                    name: group,
                    unit,
                    lower_is_better: lower,
                    workloads: Vec::new(),
                });
                groups.last_mut().expect("just pushed")
            }
        };
        g.workloads.push((w.name(), bars));
    }
    groups
}
