//! Charts with plotters, each written as PNG and SVG. Text is laid out (and, in PNGs, drawn)
//! with the DejaVu Sans font compiled into the binary, so no system font is needed.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use plotters::chart::MeshStyle;
use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue, SegmentedCoord, ValueFormatter};
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::coord::Shift;
use plotters::prelude::*;
use polars::prelude::*;

use crate::records::Metric;

use super::frames::{self, Frames};
use super::inputs::{method_title, parse_order, task_title, StudyInputs, Training};
use super::{write_file, ReportError};

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// The family name every text style of the charts uses.
pub const FONT: &str = "sans-serif";

/// Registers the embedded font with plotters (once per process).
pub fn ensure_font() -> Result<(), ReportError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok());
    if ok {
        Ok(())
    } else {
        Err(ReportError::Chart {
            path: "assets/fonts/DejaVuSans.ttf".into(),
            reason: "the embedded font cannot be read".into(),
        })
    }
}

/// Line and bar colours per method (baseline red, RID blue, joint green, others purple).
pub fn method_color(method: &str) -> RGBColor {
    match method {
        "baseline" => RGBColor(214, 39, 40),
        "rid" => RGBColor(31, 119, 180),
        "joint" => RGBColor(44, 160, 44),
        _ => RGBColor(148, 103, 189),
    }
}

/// Colours of the other methods of one figure (an ablation's variants), in their order there.
const VARIANT_COLORS: [RGBColor; 8] = [
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(127, 127, 127),
    RGBColor(31, 119, 180),
];

/// [`method_color`] for a figure that shows `methods`: methods without a colour of their own get
/// distinct ones by their position among such methods, so that every variant of a sweep differs.
pub fn method_color_among(method: &str, methods: &[String]) -> RGBColor {
    if matches!(method, "baseline" | "rid" | "joint") {
        return method_color(method);
    }
    let others = methods.iter().filter(|m| !matches!(m.as_str(), "baseline" | "rid" | "joint"));
    let position = others.take_while(|m| m.as_str() != method).count();
    VARIANT_COLORS[position % VARIANT_COLORS.len()]
}

/// Something drawn the same way on any plotters backend.
pub trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

pub(super) fn fail<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// Writes an RGB8 buffer as PNG.
pub fn write_png(path: &Path, rgb: &[u8], (w, h): (u32, u32)) -> Result<(), ReportError> {
    let chart_err = |reason: String| ReportError::Chart {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| chart_err(e.to_string()))?;
        writer.write_image_data(rgb).map_err(|e| chart_err(e.to_string()))?;
        writer.finish().map_err(|e| chart_err(e.to_string()))?;
    }
    write_file(path, &bytes)
}

/// Draws `figure` into `<dir>/<stem>.png` and `<dir>/<stem>.svg`; returns the two file names
/// relative to `dir`.
pub fn save(figure: &impl Figure, dir: &Path, stem: &str) -> Result<[String; 2], ReportError> {
    ensure_font()?;
    let (w, h) = figure.size();
    let png_path = dir.join(format!("{stem}.png"));
    if let Some(parent) = png_path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ReportError::io(format!("cannot create {}", parent.display()), e))?;
    }
    let chart_err = |path: &Path, reason: String| ReportError::Chart {
        path: path.to_path_buf(),
        reason,
    };
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        figure.draw(&root).map_err(|r| chart_err(&png_path, r))?;
        root.present().map_err(|e| chart_err(&png_path, e.to_string()))?;
    }
    write_png(&png_path, &rgb, (w, h))?;
    let svg_path = dir.join(format!("{stem}.svg"));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        figure.draw(&root).map_err(|r| chart_err(&svg_path, r))?;
        root.present().map_err(|e| chart_err(&svg_path, e.to_string()))?;
    }
    write_file(&svg_path, svg.as_bytes())?;
    Ok([format!("{stem}.png"), format!("{stem}.svg")])
}

/// Padded y range over `values` (never empty, never zero-width).
fn y_range(values: impl IntoIterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.into_iter().filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = if hi > lo { (hi - lo) * 0.08 } else { lo.abs().max(1.0) * 0.05 };
    (lo - pad)..(hi + pad)
}

fn direction_text(higher_is_better: bool) -> &'static str {
    if higher_is_better {
        "↑ higher is better"
    } else {
        "↓ lower is better"
    }
}

/// Legend entries (a coloured swatch and the method's name) across the top of `area`, in as many
/// centred rows as the width needs; returns the area below. One legend per figure keeps the
/// panels free for data.
fn legend_strip<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, methods: &[String], bar: bool) -> Result<DrawingArea<DB, Shift>, String> {
    const ROW: i32 = 26;
    let style = TextStyle::from((FONT, 16).into_font()).color(&BLACK);
    let widths: Vec<i32> = methods
        .iter()
        .map(|m| area.estimate_text_size(&method_title(m), &style).map(|(w, _)| w as i32 + 50))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let room = area.dim_in_pixel().0 as i32 - 20;
    let mut rows: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0;
    for (i, w) in widths.iter().enumerate() {
        let current = rows.last_mut().expect("one row at least");
        if !current.is_empty() && used + w > room {
            rows.push(vec![i]);
            used = *w;
        } else {
            current.push(i);
            used += w;
        }
    }
    let (strip, rest) = area.split_vertically(ROW * rows.len() as i32 + 8);
    for (r, row) in rows.iter().enumerate() {
        let y = ROW * r as i32;
        let mut x = (strip.dim_in_pixel().0 as i32 - row.iter().map(|&i| widths[i]).sum::<i32>()) / 2;
        for &i in row {
            let m = &methods[i];
            let color = method_color_among(m, methods);
            if bar {
                strip.draw(&Rectangle::new([(x, y + 10), (x + 22, y + 24)], color.filled())).map_err(fail)?;
            } else {
                strip.draw(&PathElement::new(vec![(x, y + 17), (x + 24, y + 17)], color.stroke_width(3))).map_err(fail)?;
                strip.draw(&Circle::new((x + 12, y + 17), 4, color.filled())).map_err(fail)?;
            }
            strip.draw(&Text::new(method_title(m), (x + 30, y + 11), style.clone())).map_err(fail)?;
            x += widths[i];
        }
    }
    Ok(rest)
}

/// Points (step, value) of one line; the base model is step 0.
pub type Line = Vec<(f64, f64)>;

/// One order's panel of a trajectory chart.
pub struct TrajectoryPanel {
    pub order: String,
    /// The titles of the order's tasks.
    pub tasks: Vec<String>,
    /// method -> its line.
    pub lines: BTreeMap<String, Line>,
}

/// One metric over the task sequence: a panel per order, a line per method.
pub struct TrajectoryFigure {
    /// The metric's column title.
    pub title: String,
    pub higher_is_better: bool,
    pub panels: Vec<TrajectoryPanel>,
    pub methods: Vec<String>,
}

impl TrajectoryFigure {
    fn grid(&self) -> (usize, usize) {
        let cols = self.panels.len().clamp(1, 3);
        (self.panels.len().div_ceil(cols), cols)
    }
}

impl Figure for TrajectoryFigure {
    fn size(&self) -> (u32, u32) {
        let (rows, cols) = self.grid();
        (420 * cols as u32 + 40, 340 * rows as u32 + 70)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(fail)?;
        let title = format!("{} after each task ({})", self.title, direction_text(self.higher_is_better));
        let area = root.titled(&title, (FONT, 24)).map_err(fail)?;
        let area = legend_strip(&area, &self.methods, false)?;
        let (rows, cols) = self.grid();
        let all = self.panels.iter().flat_map(|p| p.lines.values().flatten().map(|pt| pt.1));
        let y = y_range(all);
        for (panel_area, TrajectoryPanel { order, tasks, lines }) in area.split_evenly((rows, cols)).iter().zip(&self.panels) {
            let labels: Vec<String> = std::iter::once("base".to_string()).chain(tasks.iter().map(|t| format!("+{t}"))).collect();
            let mut chart = trajectory_panel(panel_area, order, &labels, y.clone(), &self.title)?;
            for method in &self.methods {
                let Some(points) = lines.get(method) else { continue };
                let color = method_color_among(method, &self.methods);
                let pts: Vec<(SegmentValue<i32>, f64)> = points.iter().map(|(s, v)| (SegmentValue::CenterOf(*s as i32), *v)).collect();
                chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(fail)?;
                chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(fail)?;
            }
        }
        Ok(())
    }
}

/// The grid and labels every chart of the report shares: the report's font, at most one light
/// line between bold ones, pale grey lines.
fn house_mesh<'a, 'b, 'm, X, Y, XT, YT, DB>(mesh: &'m mut MeshStyle<'a, 'b, X, Y, DB>) -> &'m mut MeshStyle<'a, 'b, X, Y, DB>
where
    X: Ranged<ValueType = XT> + ValueFormatter<XT>,
    Y: Ranged<ValueType = YT> + ValueFormatter<YT>,
    DB: DrawingBackend,
{
    mesh.label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .max_light_lines(1)
        .light_line_style(RGBColor(245, 245, 245))
        .bold_line_style(RGBColor(225, 225, 225))
}

/// The axes of one order's trajectory panel: "base" then "+task" along x (`labels`), the metric
/// on y; the panels of the study's report and of the seeds report share them.
pub(super) fn trajectory_panel<'a, DB: DrawingBackend>(
    panel: &'a DrawingArea<DB, Shift>,
    order: &str,
    labels: &[String],
    y: std::ops::Range<f64>,
    y_desc: &str,
) -> Result<ChartContext<'a, DB, Cartesian2d<SegmentedCoord<RangedCoordi32>, RangedCoordf64>>, String> {
    let steps = labels.len().saturating_sub(1);
    let mut chart = ChartBuilder::on(panel)
        .caption(format!("order {order}"), (FONT, 18))
        .margin(12)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d((0..steps as i32).into_segmented(), y)
        .map_err(fail)?;
    house_mesh(&mut chart.configure_mesh())
        .x_labels(steps + 1)
        .x_label_formatter(&|x| match x {
            SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .y_desc(y_desc)
        .draw()
        .map_err(fail)?;
    Ok(chart)
}

/// One group of bars: its label (an order, or "average") and method -> F (absent: "-").
pub type BarGroup = (String, BTreeMap<String, f64>);

/// Forgetting per metric: a panel per metric, grouped bars (orders, then the average) per method.
pub struct ForgettingFigure {
    /// metric title -> its groups, in order, the average last.
    pub panels: Vec<(String, Vec<BarGroup>)>,
    pub methods: Vec<String>,
}

impl Figure for ForgettingFigure {
    fn size(&self) -> (u32, u32) {
        let cols = self.panels.len().clamp(1, 3) as u32;
        let rows = self.panels.len().div_ceil(cols as usize).max(1) as u32;
        (460 * cols + 40, 340 * rows + 70)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(fail)?;
        let area = root.titled("Forgetting F per metric (Eq. 3; lower is better)", (FONT, 24)).map_err(fail)?;
        let area = legend_strip(&area, &self.methods, true)?;
        let cols = self.panels.len().clamp(1, 3);
        let rows = self.panels.len().div_ceil(cols).max(1);
        for (panel_area, (metric, groups)) in area.split_evenly((rows, cols)).iter().zip(&self.panels) {
            let top = groups.iter().flat_map(|g| g.1.values().copied()).fold(0.0f64, f64::max);
            let top = if top > 0.0 { top * 1.18 } else { 1.0 };
            let n = groups.len();
            let labels: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
            let mut chart = ChartBuilder::on(panel_area)
                .caption(metric.as_str(), (FONT, 18))
                .margin(12)
                .x_label_area_size(34)
                .y_label_area_size(64)
                .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)
                .map_err(fail)?;
            house_mesh(&mut chart.configure_mesh())
                .disable_x_mesh()
                .x_labels(n)
                // Groups sit at integer x; ticks anywhere else stay blank.
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 {
                        labels.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc(format!("F ({metric})"))
                .draw()
                .map_err(fail)?;
            let width = 0.76 / self.methods.len().max(1) as f64;
            let centered = TextStyle::from((FONT, 13).into_font()).color(&RGBColor(120, 120, 120)).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
            for (i, (_, values)) in groups.iter().enumerate() {
                if values.is_empty() {
                    // The paper's "-": not reported for this order, which is not the same as zero.
                    chart.draw_series(std::iter::once(Text::new("- (not reported)", (i as f64, top * 0.06), centered.clone()))).map_err(fail)?;
                }
            }
            for (j, method) in self.methods.iter().enumerate() {
                let color = method_color_among(method, &self.methods);
                let bars = groups.iter().enumerate().filter_map(|(i, (_, values))| {
                    let x0 = i as f64 - 0.38 + width * j as f64;
                    values.get(method).map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.92, *v)], color.filled()))
                });
                chart.draw_series(bars).map_err(fail)?;
            }
        }
        Ok(())
    }
}

/// Reward and distillation loss per optimizer step of one fine-tune.
pub struct TrainingFigure {
    pub title: String,
    pub method: String,
    /// (step, reward, distillation loss)
    pub points: Vec<(f64, f64, Option<f64>)>,
}

impl Figure for TrainingFigure {
    fn size(&self) -> (u32, u32) {
        (900, 640)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(fail)?;
        let area = root.titled(&self.title, (FONT, 22)).map_err(fail)?;
        let (top, bottom) = area.split_vertically(area.dim_in_pixel().1 / 2);
        let last = self.points.last().map(|p| p.0).unwrap_or(1.0).max(1.0);
        let first = self.points.first().map(|p| p.0).unwrap_or(0.0).min(last - 1.0);
        let color = method_color(&self.method);
        let panels: [(&DrawingArea<DB, Shift>, &str, Line); 2] = [
            (&top, "reward (batch mean)", self.points.iter().map(|p| (p.0, p.1)).collect()),
            (&bottom, "distillation loss", self.points.iter().filter_map(|p| p.2.map(|d| (p.0, d))).collect()),
        ];
        for (panel, desc, series) in panels {
            if series.is_empty() {
                let note = if self.method == "baseline" { "no distillation term (baseline)" } else { "no distillation values logged" };
                let style = TextStyle::from((FONT, 16).into_font()).color(&RGBColor(110, 110, 110));
                let (w, h) = panel.dim_in_pixel();
                let tw = panel.estimate_text_size(note, &style).map_err(fail)?.0 as i32;
                panel.draw(&Text::new(note, ((w as i32 - tw) / 2, h as i32 / 2), style)).map_err(fail)?;
                continue;
            }
            let mut chart = ChartBuilder::on(panel)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(72)
                .build_cartesian_2d(first..last, y_range(series.iter().map(|p| p.1)))
                .map_err(fail)?;
            house_mesh(&mut chart.configure_mesh())
                .x_desc("optimizer step")
                .x_label_formatter(&|x| if x.fract().abs() < 1e-9 { format!("{x:.0}") } else { String::new() })
                .y_desc(desc)
                .draw()
                .map_err(fail)?;
            chart.draw_series(LineSeries::new(series, color.stroke_width(2))).map_err(fail)?;
        }
        Ok(())
    }
}

/// Which charts were written (file names relative to the charts folder).
#[derive(Debug, Clone, Default)]
pub struct ChartSet {
    pub files: Vec<String>,
    /// (metric, stem) of the trajectory charts.
    pub trajectories: Vec<(Metric, String)>,
    pub forgetting: Option<String>,
    /// (label, stem) of the training curves.
    pub trainings: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// A stage id as a file name (`ft/rid/AHC/1` -> `ft_rid_AHC_1`).
pub fn file_stem(stage_id: &str) -> String {
    stage_id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+' | '=') { c } else { '_' }).collect()
}

pub fn write_all(inputs: &StudyInputs, frames: &Frames, dir: &Path) -> Result<ChartSet, ReportError> {
    let mut set = ChartSet::default();
    let methods = inputs.methods();
    let orders = inputs.orders();
    let declared = inputs.rewards();

    // Trajectories, from the evaluations frame (base at step 0).
    let base = frames::cells(&frames::evaluations_of(frames, frames::ROLE_BASE, None)?, &[])?;
    let steps = frames::evaluations_of(frames, frames::ROLE_STEP, None)?;
    for metric in declared.metrics() {
        let rows = steps.clone().lazy().filter(col("metric").eq(lit(metric.key()))).collect()?;
        if rows.height() == 0 {
            continue;
        }
        let (m_of, o_of, s_of, v_of) = (frames::strings(&rows, "method")?, frames::strings(&rows, "order")?, frames::ints(&rows, "step")?, frames::floats(&rows, "value")?);
        let base_value = base.get(&(vec![], metric.clone())).and_then(|c| c.0);
        let mut panels = Vec::new();
        for order in &orders {
            let mut lines: BTreeMap<String, Line> = BTreeMap::new();
            for i in 0..rows.height() {
                if o_of[i].as_deref() != Some(order) {
                    continue;
                }
                if let (Some(m), Some(s), Some(v)) = (&m_of[i], s_of[i], v_of[i]) {
                    lines.entry(m.clone()).or_default().push((s as f64, v));
                }
            }
            if lines.is_empty() {
                continue;
            }
            for points in lines.values_mut() {
                if let Some(b) = base_value {
                    points.push((0.0, b));
                }
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            panels.push(TrajectoryPanel {
                order: order.clone(),
                tasks: parse_order(order, &declared)?.iter().map(|t| task_title(t, &declared)).collect(),
                lines,
            });
        }
        if panels.is_empty() {
            continue;
        }
        let stem = format!("trajectory_{}", metric.key());
        let fig = TrajectoryFigure {
            title: metric.title(&declared),
            higher_is_better: metric.higher_is_better(&declared),
            panels,
            methods: methods.clone(),
        };
        set.files.extend(save(&fig, dir, &stem)?);
        set.trajectories.push((metric, stem));
    }
    if set.trajectories.is_empty() {
        set.notes.push("Trajectory charts: no evaluations after tasks (input `evals`).".into());
    }

    // Forgetting bars, from the finals frame; the paper's "-" values are simply not drawn.
    let finals = frames::cells(&frames.finals, &["method", "order"])?;
    let mut panels = Vec::new();
    for metric in declared.metrics() {
        let mut groups: Vec<BarGroup> = Vec::new();
        for order in &orders {
            let values: BTreeMap<String, f64> = methods
                .iter()
                .filter_map(|m| finals.get(&(vec![m.clone(), order.clone()], metric.clone())).and_then(|c| c.1).map(|f| (m.clone(), f)))
                .collect();
            groups.push((order.clone(), values));
        }
        let average: BTreeMap<String, f64> = methods
            .iter()
            .filter_map(|m| {
                let reported: Vec<f64> = groups.iter().filter_map(|g| g.1.get(m).copied()).collect();
                (!reported.is_empty()).then(|| (m.clone(), reported.iter().sum::<f64>() / reported.len() as f64))
            })
            .collect();
        if average.is_empty() {
            continue;
        }
        groups.push(("average".into(), average));
        panels.push((metric.title(&declared), groups));
    }
    if panels.is_empty() {
        set.notes.push("Forgetting chart: no forgetting values reported (input `forgetting`).".into());
    } else {
        let stem = "forgetting".to_string();
        set.files.extend(save(&ForgettingFigure { panels, methods: methods.clone() }, dir, &stem)?);
        set.forgetting = Some(stem);
    }

    // Training curves, one per cached training object.
    let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut unique: Vec<&Training> = Vec::new();
    for t in &inputs.trainings {
        let ids = seen.entry(t.key.as_str()).or_default();
        if ids.is_empty() {
            unique.push(t);
        }
        ids.push(&t.stage_id);
    }
    for t in unique {
        if t.log.is_empty() {
            set.notes.push(format!("Training curve of `{}`: its log is empty.", t.stage_id));
            continue;
        }
        let also = &seen[t.key.as_str()][1..];
        let task = t.task.as_ref().map_or_else(|| "reward mixture".to_string(), |task| task_title(task, &declared));
        let mut label = format!("{} ({}, {task})", t.stage_id, method_title(&t.method));
        if !also.is_empty() {
            label.push_str(&format!(", same stage as {}", also.join(", ")));
        }
        let fig = TrainingFigure {
            title: format!("{} ({}, {task})", t.stage_id, method_title(&t.method)),
            method: t.method.clone(),
            points: t.log.iter().map(|l| (l.step as f64, l.reward, l.distill_loss)).collect(),
        };
        let stem = format!("train/{}", file_stem(&t.stage_id));
        set.files.extend(save(&fig, dir, &stem)?);
        set.trainings.push((label, stem));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_of_a_sweep_get_distinct_colours_and_the_methods_keep_theirs() {
        let methods: Vec<String> = ["baseline", "lambda_0", "lambda_0p1", "rid", "lambda_1"].map(String::from).to_vec();
        let colors: Vec<RGBColor> = methods.iter().map(|m| method_color_among(m, &methods)).collect();
        for (i, a) in colors.iter().enumerate() {
            for b in &colors[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(colors[0], method_color("baseline"));
        assert_eq!(colors[3], method_color("rid"));
    }
}
