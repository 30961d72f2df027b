//! PNG charts of a benchmark run (plotters, bitmap backend): one per workload group,
//! a bar per path and workload at the median, with a min-max whisker.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

/// One bar: path, median, min, max.
pub type Bar = (&'static str, f64, f64, f64);

/// One chart: workloads of the same unit, each with its bars.
pub struct Group {
    pub name: &'static str,
    pub unit: &'static str,
    pub lower_is_better: bool,
    pub workloads: Vec<(&'static str, Vec<Bar>)>,
}

/// The fixed colour of each path, the same in every chart.
fn colour(path: &str) -> RGBColor {
    match path {
        "direct" => RGBColor(90, 90, 90),
        "kernel" => RGBColor(31, 119, 180),
        "proxy" => RGBColor(44, 160, 44),
        "socat" => RGBColor(214, 39, 40),
        _ => RGBColor(148, 103, 189),
    }
}

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("{FONT} (the fonts-dejavu-core package, installed by `cargo xtask setup`)")
    })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))
}

/// Draws every group into `dir`; the file names written.
pub fn draw(
    dir: &Path,
    groups: Vec<Group>,
    paths: Vec<&'static str>,
) -> anyhow::Result<Vec<String>> {
    register_font()?;
    let mut written = Vec::new();
    for g in groups {
        let file = format!("{}.png", g.name);
        draw_group(&dir.join(&file), &g, &paths)
            .map_err(|e| anyhow::anyhow!("drawing {file}: {e}"))?;
        written.push(file);
    }
    Ok(written)
}

fn draw_group(
    file: &Path,
    g: &Group,
    paths: &[&'static str],
) -> Result<(), Box<dyn std::error::Error>> {
    let n_w = g.workloads.len();
    let width = (220 * n_w as u32).max(520) + 120;
    let root = BitMapBackend::new(file, (width, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = g
        .workloads
        .iter()
        .flat_map(|(_, bars)| bars.iter().map(|b| b.3))
        .fold(0.0f64, f64::max)
        * 1.15;
    let top = if top > 0.0 { top } else { 1.0 };
    let title = format!(
        "{} ({}, {})",
        g.name.replace('-', " "),
        g.unit,
        if g.lower_is_better {
            "lower is better"
        } else {
            "higher is better"
        }
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n_w as f64, 0f64..top)?;
    let names: Vec<&str> = g.workloads.iter().map(|(w, _)| *w).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_w * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (*x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if top >= 100.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.2}")
            }
        })
        .y_desc(g.unit)
        .label_style(("sans-serif", 13))
        .draw()?;
    let slot = 0.8 / paths.len() as f64;
    for (i, (_, bars)) in g.workloads.iter().enumerate() {
        for (j, path) in paths.iter().enumerate() {
            let Some(&(_, median, lo, hi)) = bars.iter().find(|b| b.0 == *path) else {
                continue;
            };
            let x0 = i as f64 + 0.1 + j as f64 * slot;
            let x1 = x0 + slot * 0.9;
            let c = colour(path);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x1, median)],
                c.filled(),
            )))?;
            let xm = (x0 + x1) / 2.0;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(xm, lo), (xm, hi)],
                BLACK.stroke_width(1),
            )))?;
        }
    }
    // The legend: one swatch per path.
    for path in paths {
        let c = colour(path);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (0.0, 0.0)],
                c.filled(),
            )))?
            .label(*path)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
