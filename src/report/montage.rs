//! Montages of the evaluations' sample grids, like the paper's Figures 1, 5 and 6: one row per
//! model (the same prompts and seeds), one column per prompt, a label at the left of each row.
//! Raster compositions, so PNG only.
use std::io::BufReader;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::charts::{ensure_font, write_png, FONT};
use super::inputs::{method_title, parse_order, task_title, Evaluation, StudyInputs};
use super::{ReportError, ReportOptions};

/// An RGB8 image.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Reads a PNG of any 8- or 16-bit colour type as RGB8 (alpha composited onto white).
pub fn read_png(path: &Path) -> Result<Rgb, ReportError> {
    let bad = |reason: String| ReportError::Input(format!("{} is not a readable PNG: {reason}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| ReportError::io(format!("cannot open {}", path.display()), e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| bad(e.to_string()))?;
    let size = reader.output_buffer_size().ok_or_else(|| bad("the image is too large".into()))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(|e| bad(e.to_string()))?;
    let (w, h) = (info.width as usize, info.height as usize);
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => return Err(bad("palette not expanded".into())),
    };
    let mut pixels = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let row = &buf[y * info.line_size..y * info.line_size + w * channels];
        for px in row.chunks_exact(channels) {
            let (rgb, alpha) = match channels {
                1 => ([px[0]; 3], 255),
                2 => ([px[0]; 3], px[1]),
                3 => ([px[0], px[1], px[2]], 255),
                _ => ([px[0], px[1], px[2]], px[3]),
            };
            for c in rgb {
                let a = alpha as u32;
                pixels.push(((c as u32 * a + 255 * (255 - a)) / 255) as u8);
            }
        }
    }
    Ok(Rgb {
        width: info.width,
        height: info.height,
        pixels,
    })
}

/// What the montages wrote (file names relative to the charts folder).
#[derive(Debug, Clone, Default)]
pub struct Montages {
    pub files: Vec<String>,
    /// (caption, file)
    pub captioned: Vec<(String, String)>,
    pub notes: Vec<String>,
}

/// Characters of one label line: 17 px DejaVu Sans averages under 9.5 px a character, and the
/// label column is 230 px wide.
const LABEL_CHARS: usize = 24;
/// Height of a label line in pixels.
const LINE_H: u32 = 20;

/// A label in lines of at most [`LABEL_CHARS`] characters, broken between words (a longer word
/// gets a line of its own).
pub fn wrap_label(label: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in label.split_whitespace() {
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + word.chars().count() <= LABEL_CHARS => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// Stacks labelled rows of images into one picture; a label too long for its column is
/// wrapped over several lines (the row grows if they need more height than its images).
pub fn compose(title: &str, rows: &[(String, Rgb)], path: &Path) -> Result<(), ReportError> {
    ensure_font()?;
    const LABEL_W: u32 = 230;
    const PAD: u32 = 8;
    const TITLE_H: u32 = 44;
    let tallest = rows.iter().map(|r| r.1.height).max().unwrap_or(1).max(1);
    // Nearest-neighbour upscaling so that small (tiny-world) samples stay visible.
    let scale = 160u32.div_ceil(tallest).clamp(1, 8);
    // Wide enough for the title too (22 px DejaVu Sans averages under 12 px a character).
    let title_w = title.chars().count() as u32 * 12 + PAD * 2;
    let width = (LABEL_W + PAD * 2 + rows.iter().map(|r| r.1.width * scale).max().unwrap_or(1)).max(title_w);
    let labels: Vec<Vec<String>> = rows.iter().map(|(label, _)| wrap_label(label)).collect();
    let row_h = |img: &Rgb, lines: &[String]| (img.height * scale).max(lines.len() as u32 * LINE_H);
    let height = TITLE_H + rows.iter().zip(&labels).map(|((_, img), lines)| row_h(img, lines) + PAD).sum::<u32>() + PAD;
    let mut canvas = vec![255u8; (width * height * 3) as usize];
    let mut top = TITLE_H;
    let mut label_at = Vec::new();
    for ((_, img), lines) in rows.iter().zip(&labels) {
        for y in 0..img.height * scale {
            for x in 0..img.width * scale {
                let src = (((y / scale) * img.width + x / scale) * 3) as usize;
                let dst = (((top + y) * width + LABEL_W + PAD + x) * 3) as usize;
                canvas[dst..dst + 3].copy_from_slice(&img.pixels[src..src + 3]);
            }
        }
        // The lines centred on the row (one line sits where an unwrapped label always did).
        let first = (top + row_h(img, lines) / 2) as i32 - (lines.len().saturating_sub(1) as u32 * LINE_H / 2) as i32;
        for (i, line) in lines.iter().enumerate() {
            label_at.push((line.clone(), first + (i as u32 * LINE_H) as i32));
        }
        top += row_h(img, lines) + PAD;
    }
    {
        let root = BitMapBackend::with_buffer(&mut canvas, (width, height)).into_drawing_area();
        let err = |e: String| ReportError::Chart {
            path: path.to_path_buf(),
            reason: e,
        };
        let title_style = TextStyle::from((FONT, 22).into_font()).color(&BLACK);
        root.draw(&Text::new(title.to_string(), (PAD as i32, 10), title_style)).map_err(|e| err(e.to_string()))?;
        let style = TextStyle::from((FONT, 17).into_font()).color(&BLACK);
        for (label, y) in label_at {
            root.draw(&Text::new(label, (PAD as i32, y - 9), style.clone())).map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    write_png(path, &canvas, (width, height))
}

fn grid_row(label: String, eval: &Evaluation, missing: &mut Vec<String>) -> Result<Option<(String, Rgb)>, ReportError> {
    match &eval.grid {
        Some(path) => Ok(Some((label, read_png(path)?))),
        None => {
            missing.push(eval.stage_id.clone());
            Ok(None)
        }
    }
}

/// The sample montages: per method, the models along the Table 2 order (Figure 1 and 5
/// analogs), and the final models of every method side by side with the soup and joint
/// tuning (Figure 6 analog).
pub fn write_all(inputs: &StudyInputs, options: &ReportOptions, dir: &Path) -> Result<Montages, ReportError> {
    let mut out = Montages::default();
    if inputs.all_evaluations().all(|e| e.grid.is_none()) {
        out.notes.push("Sample montages: no evaluation wrote a sample grid (grid.png).".into());
        return Ok(out);
    }
    let order = &options.table2_order;
    let declared = inputs.rewards();
    let tasks = parse_order(order, &declared)?;
    let mut missing = Vec::new();
    let sequence = |method: &str| -> Vec<&Evaluation> {
        let mut list: Vec<&Evaluation> = inputs
            .evals
            .iter()
            .filter(|e| e.method.as_deref() == Some(method) && e.order.as_deref() == Some(order.as_str()))
            .collect();
        list.sort_by_key(|e| e.step);
        list
    };
    let write = |caption: String, file: String, rows: Vec<(String, Rgb)>, out: &mut Montages| -> Result<(), ReportError> {
        if rows.len() < 2 {
            return Ok(());
        }
        let path: PathBuf = dir.join(&file);
        compose(&caption, &rows, &path)?;
        out.files.push(file.clone());
        out.captioned.push((caption, file));
        Ok(())
    };
    let mut finals = Vec::new();
    if let Some(r) = grid_row("Base model".into(), &inputs.base, &mut missing)? {
        finals.push(r);
    }
    for method in inputs.methods() {
        let list = sequence(&method);
        let mut rows = Vec::new();
        if let Some(r) = grid_row("Base model".into(), &inputs.base, &mut Vec::new())? {
            rows.push(r);
        }
        for e in &list {
            let task = tasks.get(e.step - 1).map_or_else(|| "?".to_string(), |t| task_title(t, &declared));
            if let Some(r) = grid_row(format!("after {}. {task}", e.step), e, &mut missing)? {
                rows.push(r);
            }
        }
        if let Some(last) = list.last().filter(|e| e.step == tasks.len()) {
            if let Some(r) = grid_row(format!("{}, {order}", method_title(&method)), last, &mut Vec::new())? {
                finals.push(r);
            }
        }
        write(
            format!("{} along the order {order}", method_title(&method)),
            format!("samples_{}_{order}.png", super::charts::file_stem(&method)),
            rows,
            &mut out,
        )?;
    }
    for (label, eval) in [("Model soup", &inputs.soup), ("Joint tuning", &inputs.joint)] {
        if let Some(e) = eval {
            if let Some(r) = grid_row(label.into(), e, &mut missing)? {
                finals.push(r);
            }
        }
    }
    write(format!("Final models (order {order} for the sequential methods)"), "samples_final.png".into(), finals, &mut out)?;
    missing.sort();
    missing.dedup();
    if !missing.is_empty() {
        out.notes.push(format!("Sample montages: no grid.png in {}.", missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", ")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_wrap_between_words_within_the_column() {
        assert_eq!(wrap_label("Base model"), vec!["Base model"]);
        let prompt = "a small red circle above a blue square on a white background";
        let lines = wrap_label(prompt);
        assert_eq!(lines, vec!["a small red circle above", "a blue square on a white", "background"]);
        assert!(lines.iter().all(|l| l.chars().count() <= LABEL_CHARS));
        assert_eq!(lines.join(" "), prompt);
        assert_eq!(wrap_label("supercalifragilisticexpialidocious x"), vec!["supercalifragilisticexpialidocious", "x"]);
        assert!(wrap_label("  ").is_empty());
    }
}
