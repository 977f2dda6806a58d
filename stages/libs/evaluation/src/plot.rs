//! The precision/recall chart: one DeepPCB curve per class, drawn by plotters into an RGB
//! buffer and written as PNG by the `image` crate.
//!
//! Text (title, axis labels, legend with each class's AP) uses DejaVu Sans embedded through
//! the `dejavu` crate and registered with plotters' ab_glyph renderer, so the chart renders
//! the same on a machine without any system font.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::backend::RGBPixel;
use plotters::prelude::*;
use plotters::style::register_font;

use crate::{MetricsError, Report};

/// Width of the chart in pixels.
pub const PLOT_WIDTH: u32 = 800;
/// Height of the chart in pixels.
pub const PLOT_HEIGHT: u32 = 600;

/// The family name plotters' built-in `FontFamily::SansSerif` resolves to, so registering
/// our font under it serves every default text style too.
const FONT: &str = "sans-serif";

/// Registers the embedded font once per process; plotters keeps a global font table.
fn ensure_font() -> Result<(), MetricsError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "ab_glyph rejected the embedded DejaVu Sans".to_string())
        })
        .clone()
        .map_err(|message| MetricsError::Font { message })
}

/// Draws one precision/recall curve per class with ground truth (DeepPCB protocol, recall on
/// x, precision on y, both 0..1) and a legend "name (AP xx.x%)", and writes a
/// [`PLOT_WIDTH`]×[`PLOT_HEIGHT`] PNG to `path`.
pub fn plot_pr_curves(report: &Report, path: &Path) -> Result<(), MetricsError> {
    ensure_font()?;
    let mut buffer = vec![255u8; PLOT_WIDTH as usize * PLOT_HEIGHT as usize * 3];
    draw(report, &mut buffer, path).map_err(|message| MetricsError::Plot {
        path: path.to_path_buf(),
        message,
    })?;
    let img = image::RgbImage::from_raw(PLOT_WIDTH, PLOT_HEIGHT, buffer).ok_or_else(|| {
        MetricsError::Plot {
            path: path.to_path_buf(),
            message: "pixel buffer does not match the chart size".to_string(),
        }
    })?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| MetricsError::WritePng {
            path: PathBuf::from(path),
            source,
        })
}

/// Renders the chart into `buffer` (RGB, row-major); errors are plotters' messages.
fn draw(report: &Report, buffer: &mut [u8], path: &Path) -> Result<(), String> {
    let backend =
        BitMapBackend::<RGBPixel>::with_buffer_and_format(buffer, (PLOT_WIDTH, PLOT_HEIGHT))
            .map_err(|e| e.to_string())?;
    let root = backend.into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    root.fill(&WHITE).map_err(err)?;

    let mut chart = ChartBuilder::on(&root)
        .caption("Precision/recall, DeepPCB (IoU > 0.33)", (FONT, 24))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("recall")
        .y_desc("precision")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(err)?;

    let mut drawn = 0usize;
    for (i, class) in report.classes.iter().enumerate() {
        let curve = &class.pr_curve;
        if curve.recall.is_empty() {
            continue;
        }
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = curve
            .recall
            .iter()
            .copied()
            .zip(curve.precision.iter().copied())
            .collect();
        let label = match class.ap_deeppcb {
            Some(ap) => format!("{} (AP {:.1}%)", class.name, ap * 100.0),
            None => class.name.clone(),
        };
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        // A one-point curve is an invisible line, so it gets a dot.
        if points.len() == 1 {
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(err)?;
        }
        drawn += 1;
    }
    if drawn > 0 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()
            .map_err(err)?;
    }
    root.present()
        .map_err(|e| format!("{} ({})", e, path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{evaluate, Detection, GtBox, ImageResult};

    fn boxed(x: f32, class_id: u16) -> GtBox {
        GtBox {
            x1: x,
            y1: 0.,
            x2: x + 10.,
            y2: 10.,
            class_id,
        }
    }

    fn found(x: f32, class_id: u16, score: f32) -> Detection {
        Detection {
            x1: x,
            y1: 0.,
            x2: x + 10.,
            y2: 10.,
            class_id,
            score,
        }
    }

    #[test]
    fn writes_a_decodable_png_of_the_chart_size() {
        let images = vec![ImageResult {
            image: "a".to_string(),
            ground_truth: vec![boxed(0., 1), boxed(20., 1), boxed(40., 2)],
            detections: vec![
                found(0., 1, 0.9),
                found(100., 1, 0.8),
                found(20., 1, 0.7),
                found(40., 2, 0.6),
            ],
        }];
        let report = evaluate(&images, &["open", "short", "spur"], None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pr.png");
        plot_pr_curves(&report, &path).expect("plots");
        assert!(std::fs::metadata(&path).expect("written").len() > 0);
        let img = image::open(&path).expect("decodes");
        assert_eq!((img.width(), img.height()), (PLOT_WIDTH, PLOT_HEIGHT));
        // Not a blank page: the curves and text left non-white pixels.
        let rgb = img.to_rgb8();
        assert!(rgb.pixels().filter(|p| p.0 != [255, 255, 255]).count() > 1000);
    }

    #[test]
    fn empty_report_still_plots_axes() {
        let report = evaluate(&[], &["open"], None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty.png");
        plot_pr_curves(&report, &path).expect("plots");
        assert!(image::open(&path).is_ok());
    }

    #[test]
    fn unwritable_path_is_a_write_error() {
        let report = evaluate(&[], &["open"], None);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing-dir").join("pr.png");
        let err = plot_pr_curves(&report, &path).expect_err("no such directory");
        assert!(matches!(err, MetricsError::WritePng { .. }), "{err}");
    }
}
