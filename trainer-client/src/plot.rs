//! PNG line charts of training and mismatch curves.
//!
//! plotters draws text with ab_glyph from fonts registered at run time (no system font lookup),
//! so the first chart registers a TrueType font found in the usual system places. Without one,
//! charting fails with an error that says so; the numbers are in the caller's CSV either way.

use anyhow::{anyhow, Context};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Chart size in pixels.
const SIZE: (u32, u32) = (900, 500);

/// Fonts tried first, in order, before any other TTF under `/usr/share/fonts`.
const FONT_CANDIDATES: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Where other TrueType fonts are searched (recursively).
const FONT_DIR: &str = "/usr/share/fonts";

/// Line colours, distinct on white and for the common colour-vision deficiencies (Okabe–Ito).
const COLORS: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

/// Draws `series` (name, points) as lines on one chart with a legend and writes it as a PNG.
///
/// Non-finite points are skipped. Fails if no usable font is installed or the file cannot be
/// written.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, &[(f64, f64)])],
) -> anyhow::Result<()> {
    ensure_font()?;
    let (xr, yr) = ranges(series);
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let draw_err = |e: String| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| draw_err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xr, yr)
        .map_err(|e| draw_err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .label_style(("sans-serif", 14))
        .x_label_formatter(&|v| format_tick(*v))
        .y_label_formatter(&|v| format_tick(*v))
        .draw()
        .map_err(|e| draw_err(e.to_string()))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let finite = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite());
        chart
            .draw_series(LineSeries::new(finite, color.stroke_width(2)))
            .map_err(|e| draw_err(e.to_string()))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| draw_err(e.to_string()))?;
    }
    root.present().map_err(|e| draw_err(e.to_string()))?;
    Ok(())
}

/// Axis ranges covering every finite point, padded so lines do not sit on the frame; a
/// degenerate range (one point, a constant) is widened.
fn ranges(series: &[(&str, &[(f64, f64)])]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let mut x = (f64::INFINITY, f64::NEG_INFINITY);
    let mut y = (f64::INFINITY, f64::NEG_INFINITY);
    for (_, points) in series {
        for &(px, py) in points.iter() {
            if px.is_finite() && py.is_finite() {
                x = (x.0.min(px), x.1.max(px));
                y = (y.0.min(py), y.1.max(py));
            }
        }
    }
    let widen = |(lo, hi): (f64, f64), pad: f64| {
        if lo > hi {
            return 0.0..1.0;
        }
        let span = hi - lo;
        if span == 0.0 {
            let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
            return lo - d..hi + d;
        }
        lo - span * pad..hi + span * pad
    };
    (widen(x, 0.0), widen(y, 0.05))
}

/// Tick labels short enough for the axis: plain for ordinary magnitudes, exponent otherwise.
fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-2..1e5).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        format!("{v:.2e}")
    }
}

/// Registers a system TrueType font as "sans-serif" once per process; later calls return the
/// first outcome.
fn ensure_font() -> anyhow::Result<()> {
    // plotters keeps its font table process-wide, so registration is process-wide as well.
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    REGISTERED
        .get_or_init(register_system_font)
        .as_ref()
        .map(|_| ())
        .map_err(|e| anyhow!("{e}"))
}

fn register_system_font() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = FONT_CANDIDATES.iter().map(PathBuf::from).collect();
    let mut found = Vec::new();
    find_ttf(Path::new(FONT_DIR), 0, &mut found);
    // Prefer regular sans faces; a bold, italic or symbol font still beats no text at all.
    found.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let styled = ["bold", "italic", "oblique", "light", "math", "mono"]
            .iter()
            .any(|s| name.contains(s));
        (!name.contains("sans"), styled, p.clone())
    });
    candidates.extend(found);
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        if !looks_like_truetype(&bytes) {
            continue;
        }
        // plotters needs 'static font bytes; this runs once per process, so one font leaks.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
            return Ok(path);
        }
    }
    Err(format!(
        "no TrueType font found for chart text (looked for {} and any *.ttf under {FONT_DIR}); \
         install one, e.g. the fonts-dejavu-core package",
        FONT_CANDIDATES.join(", ")
    ))
}

/// Collects `*.ttf` files under `dir`, a few levels deep.
fn find_ttf(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 6 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            find_ttf(&path, depth + 1, out);
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("ttf"))
        {
            out.push(path);
        }
    }
}

/// Whether `bytes` start like a TrueType/OpenType font (checked before the bytes are leaked).
fn looks_like_truetype(bytes: &[u8]) -> bool {
    matches!(
        bytes.get(..4),
        Some([0, 1, 0, 0]) | Some(b"true") | Some(b"OTTO")
    )
}

/// Writes a chart to `path` unless no font is available, in which case it logs why and goes on:
/// for callers whose CSV already holds the numbers.
pub fn line_chart_or_warn(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(&str, &[(f64, f64)])],
) -> bool {
    match line_chart(path, title, x_label, series).with_context(|| format!("chart {title}")) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("{e:#}");
            false
        }
    }
}

/// Fails with a message naming the missing font if charts cannot be drawn on this machine.
pub fn check_fonts() -> anyhow::Result<()> {
    ensure_font()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_with_two_series() {
        if check_fonts().is_err() {
            // A machine without fonts cannot draw text; that is the documented error.
            eprintln!("skipping: no TrueType font installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("halfstep-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.png");
        let fp16: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 1e-3 / (1.0 + i as f64)))
            .collect();
        let bf16: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 8e-3 / (1.0 + i as f64)))
            .chain([(50.0, f64::NAN)])
            .collect();
        line_chart(
            &path,
            "mismatch max_abs",
            "step",
            &[("float16", &fp16), ("bfloat16", &bf16)],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "only {} bytes", bytes.len());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unwritable_path_is_an_error_not_a_panic() {
        if check_fonts().is_err() {
            return;
        }
        let path = Path::new("/nonexistent-dir-halfstep/x.png");
        assert!(line_chart(path, "t", "x", &[("a", &[(0.0, 1.0), (1.0, 2.0)])]).is_err());
        assert!(!line_chart_or_warn(path, "t", "x", &[]));
    }

    #[test]
    fn ranges_cover_the_points_and_survive_degenerate_input() {
        let pts = [(1.0, 5.0), (3.0, 7.0), (f64::NAN, 100.0)];
        let (x, y) = ranges(&[("a", &pts)]);
        assert_eq!(x, 1.0..3.0);
        assert!(y.start < 5.0 && y.end > 7.0 && y.end < 8.0);
        let (x, y) = ranges(&[("a", &[(2.0, 0.0)])]);
        assert!(x.start < 2.0 && x.end > 2.0 && y.start < 0.0 && y.end > 0.0);
        assert_eq!(ranges(&[]), (0.0..1.0, 0.0..1.0));
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(0.25), "0.25");
        assert_eq!(format_tick(3.0), "3");
        assert_eq!(format_tick(1.5e-4), "1.50e-4");
    }

    #[test]
    fn font_sniffing_accepts_truetype_and_rejects_other_files() {
        assert!(looks_like_truetype(&[0, 1, 0, 0, 9]));
        assert!(looks_like_truetype(b"OTTO...."));
        assert!(!looks_like_truetype(b"\x89PNG"));
        assert!(!looks_like_truetype(b""));
    }
}
