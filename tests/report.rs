//! Reports: table layouts and values from a known fixture, LaTeX escaping, charts and montages
//! written, the flat metrics, the regression gate's verdicts, and the report stage end to end
//! (run by the runner with fixture stages, computed alone from cached inputs, published).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ril_pipe::exec::kind::{StageContext, StageError, StageKind};
use ril_pipe::exec::{run, Cache, Registry, RunOptions};
use ril_pipe::pipeline::params::StageParams;
use ril_pipe::pipeline::schema::{InputSpec, KindSchema};
use ril_pipe::pipeline::{load_resolved, Override, ResolvedPipeline};
use ril_pipe::report::check::{compare, judge, merged_metrics, Baseline, BaselineMetric, Direction, Verdict};
use ril_pipe::report::frames::Frames;
use ril_pipe::exec::publish::{cached_of_kind, ensure_of_kind, publish_objects, CachedObject, PublishError};
use ril_pipe::report::charts::file_stem;
use ril_pipe::report::render::{csv, latex, latex_escape, markdown};
use ril_pipe::report::tables::{build_all, BuiltTables, Table};
use ril_pipe::report::{write_report, Evaluation, ForgettingRun, ReportOptions, StudyInputs, Training};
use ril_pipe::records::forgetting;
use ril_pipe::records::{EvaluationRecord, Metric, Task, TrainLogLine, TrainSummary};
use serde_json::json;

// ---------------------------------------------------------------- fixture

/// Columns: aesthetic, hps, png, jpeg, clip, fid.
const BASE: [f64; 6] = [5.0, 0.25, 400.0, 50.0, 25.0, 70.0];
/// Baseline along A, H, C (the forgetting unit test's sequence).
const BASELINE_AHC: [[f64; 6]; 3] = [
    [6.0, 0.24, 410.0, 52.0, 24.0, 80.0],
    [5.6, 0.30, 420.0, 53.0, 23.0, 90.0],
    [5.5, 0.27, 300.0, 40.0, 24.5, 75.0],
];
const RID_AHC: [[f64; 6]; 3] = [
    [5.8, 0.255, 405.0, 51.0, 25.2, 72.0],
    [5.7, 0.28, 402.0, 50.5, 25.0, 74.0],
    [5.65, 0.275, 350.0, 42.0, 24.8, 73.0],
];
/// H, C, A.
const BASELINE_HCA: [[f64; 6]; 3] = [
    [4.8, 0.31, 420.0, 51.0, 23.0, 85.0],
    [4.6, 0.29, 280.0, 38.0, 22.0, 95.0],
    [6.1, 0.26, 380.0, 47.0, 22.0, 100.0],
];
const RID_HCA: [[f64; 6]; 3] = [
    [5.0, 0.29, 401.0, 50.0, 24.9, 71.0],
    [5.0, 0.285, 330.0, 41.0, 24.7, 72.0],
    [5.75, 0.28, 345.0, 41.5, 24.6, 74.0],
];
const SOUP: [f64; 6] = [5.5, 0.27, 390.0, 48.0, 24.0, 78.0];
const JOINT: [f64; 6] = [5.4, 0.265, 380.0, 49.0, 21.0, 83.0];

fn record(tasks: &[Task], values: [f64; 6], origin: &str) -> EvaluationRecord {
    EvaluationRecord {
        tasks: tasks.to_vec(),
        origin: origin.into(),
        metrics: Metric::ALL.into_iter().zip(values).collect(),
        prompts: 4,
        images_per_prompt: 1,
        seed: 0,
        rewards: Default::default(),
    }
}

fn tasks_of(order: &str) -> Vec<Task> {
    order.chars().map(|c| Task::parse(&c.to_string()).unwrap()).collect()
}

fn evaluation(stage_id: &str, method: Option<&str>, order: Option<&str>, record: EvaluationRecord) -> Evaluation {
    Evaluation {
        stage_id: stage_id.into(),
        method: method.map(Into::into),
        order: order.map(Into::into),
        step: record.tasks.len(),
        record,
        grid: None,
    }
}

fn training(stage_id: &str, key: &str, method: &str, task: Task, seconds_per_epoch: f64, rid: bool) -> Training {
    let log = (1..=20)
        .map(|step| TrainLogLine {
            step,
            epoch: (step - 1) / 10 + 1,
            reward: 5.0 + (step as f64).ln() * 0.3,
            distill_loss: rid.then_some(0.02 + 0.001 * step as f64),
            loss: -5.0,
            grad_norm: 1.0,
            lr: 1e-3,
            seconds: 0.5,
        })
        .collect();
    Training {
        stage_id: stage_id.into(),
        key: key.into(),
        method: method.into(),
        task: Some(task.clone()),
        summary: TrainSummary {
            method: method.into(),
            tasks: vec![task],
            epochs: 2,
            steps: 20,
            batch_size: 4,
            seconds: seconds_per_epoch * 2.0,
            seconds_per_epoch,
            reward_first_epoch: 5.2,
            reward_last_epoch: 5.8,
        },
        log,
    }
}

fn study() -> StudyInputs {
    let base = evaluation("eval/base", None, None, record(&[], BASE, "base"));
    let mut evals = Vec::new();
    let mut runs = Vec::new();
    for (method, order, values) in [
        ("baseline", "AHC", BASELINE_AHC),
        ("rid", "AHC", RID_AHC),
        ("baseline", "HCA", BASELINE_HCA),
        ("rid", "HCA", RID_HCA),
    ] {
        let tasks = tasks_of(order);
        let mut sequence = vec![base.record.clone()];
        for (i, v) in values.iter().enumerate() {
            let r = record(&tasks[..=i], *v, "finetune");
            sequence.push(r.clone());
            evals.push(evaluation(&format!("eval/{method}/{order}/{}", i + 1), Some(method), Some(order), r));
        }
        runs.push(ForgettingRun {
            stage_id: format!("forgetting/{method}/{order}"),
            method: method.into(),
            order: order.into(),
            record: forgetting(&sequence).unwrap(),
        });
    }
    StudyInputs {
        base,
        evals,
        forgetting: runs,
        soup: Some(evaluation("eval/soup", None, None, record(&Task::ALL, SOUP, "soup"))),
        joint: Some(evaluation("eval/joint", None, None, record(&Task::ALL, JOINT, "joint"))),
        trainings: vec![
            training("ft/baseline/AHC/1", "k1", "baseline", Task::Aesthetic, 10.0, false),
            // The same object as AHC/1 (identical stages merge): counted once.
            training("ft/baseline/ACH/1", "k1", "baseline", Task::Aesthetic, 10.0, false),
            training("ft/baseline/HCA/3", "k2", "baseline", Task::Aesthetic, 12.0, false),
            training("ft/rid/AHC/1", "k3", "rid", Task::Aesthetic, 11.0, true),
            training("ft/baseline/AHC/2", "k4", "baseline", Task::Hps, 20.0, false),
            training("ft/rid/AHC/2", "k5", "rid", Task::Hps, 20.5, true),
        ],
    }
}

fn tables(inputs: &StudyInputs, options: &ReportOptions) -> BuiltTables {
    build_all(inputs, &Frames::build(inputs).unwrap(), options).unwrap()
}

fn table<'a>(built: &'a BuiltTables, name: &str) -> &'a Table {
    built.tables.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name}"))
}

fn headers(t: &Table) -> Vec<String> {
    t.display.get_column_names().iter().map(|n| n.to_string()).collect()
}

fn row(t: &Table, i: usize) -> Vec<String> {
    t.display.columns().iter().map(|c| c.str().unwrap().get(i).unwrap().to_string()).collect()
}

fn column_f64(t: &Table, name: &str) -> Vec<Option<f64>> {
    t.data.column(name).unwrap().f64().unwrap().iter().collect()
}

const METRIC_HEADERS: [&str; 6] = ["Aesthetic ↑", "HPS ↑", "PNG (kB) ↓", "JPEG (kB) ↓", "CLIP ↑", "FID ↓"];

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

// ---------------------------------------------------------------- tables

#[test]
fn table2_shows_each_step_of_one_order_with_forgetting_so_far() {
    let built = tables(&study(), &ReportOptions::default());
    let t = table(&built, "table2");
    let mut expected = vec!["Method".to_string(), "After task".to_string()];
    expected.extend(METRIC_HEADERS.map(String::from));
    assert_eq!(headers(t), expected);
    assert_eq!(t.display.height(), 7, "base + 3 steps x 2 methods");
    assert_eq!(row(t, 0), ["Base model", "", "5.00", "0.250", "400.00", "50.00", "25.00", "70.00"]);
    // After A only: no later task yet, so A's own metric is "-"; CLIP 25 -> 24, FID 70 -> 80.
    assert_eq!(row(t, 1), ["Baseline", "1. Aesthetic", "6.00 (-)", "0.240 (-)", "410.00 (-)", "52.00 (-)", "24.00 (1.00)", "80.00 (10.00)"]);
    // After H: aesthetic is reported now (max(5, 6, 5.6) - 5.6 = 0.4).
    assert_eq!(row(t, 2), ["", "2. HPS", "5.60 (0.40)", "0.300 (-)", "420.00 (-)", "53.00 (-)", "23.00 (2.00)", "90.00 (20.00)"]);
    assert_eq!(row(t, 3), ["", "3. Compress", "5.50 (0.50)", "0.270 (0.030)", "300.00 (-)", "40.00 (-)", "24.50 (0.50)", "75.00 (5.00)"]);
    assert_eq!(row(t, 4)[..2], ["RID", "1. Aesthetic"]);
    assert_eq!(row(t, 6), ["", "3. Compress", "5.65 (0.15)", "0.275 (0.005)", "350.00 (-)", "42.00 (-)", "24.80 (0.40)", "73.00 (3.00)"]);
    assert_eq!(t.rules_before, vec![1, 4]);
    // The CSV frame repeats labels and keeps forgetting in its own columns, null for "-".
    let methods: Vec<Option<&str>> = t.data.column("method").unwrap().str().unwrap().iter().collect();
    assert_eq!(methods[2], Some("Baseline"));
    assert_eq!(column_f64(t, "png_kb_forgetting")[3], None);
    assert!(close(column_f64(t, "aesthetic_forgetting")[3].unwrap(), 0.5));
    assert_eq!(column_f64(t, "aesthetic_forgetting")[0], None, "the base model has no forgetting");

    let other = tables(&study(), &ReportOptions { table2_order: "HCA".into(), ..ReportOptions::default() });
    assert_eq!(row(table(&other, "table2"), 1)[1], "1. HPS");
}

#[test]
fn table3_has_every_order_the_averages_base_and_soup_in_paper_order() {
    let built = tables(&study(), &ReportOptions::default());
    let t = table(&built, "table3");
    let labels: Vec<(String, String)> = (0..t.display.height()).map(|i| (row(t, i)[0].clone(), row(t, i)[1].clone())).collect();
    let expected = [
        ("Base model", ""),
        ("Baseline", "AHC"),
        ("", "HCA"),
        ("", "Average"),
        ("RID", "AHC"),
        ("", "HCA"),
        ("", "Average"),
        ("Model soup", ""),
    ];
    assert_eq!(labels, expected.map(|(a, b)| (a.to_string(), b.to_string())));
    // Final values with F over the whole sequence; compress finished last in AHC: "-".
    assert_eq!(row(t, 1)[2..], ["5.50 (0.50)", "0.270 (0.030)", "300.00 (-)", "40.00 (-)", "24.50 (0.50)", "75.00 (5.00)"]);
    // HCA: aesthetic last ("-"); hps max(.25,.31,.29,.26) - .26 = 0.05; png 380 - 280 = 100.
    assert_eq!(row(t, 2)[2..], ["6.10 (-)", "0.260 (0.050)", "380.00 (100.00)", "47.00 (9.00)", "22.00 (3.00)", "100.00 (30.00)"]);
    // Averages: values over both orders, F over the orders that report it.
    assert_eq!(row(t, 3)[2], "5.80 (0.50)", "(5.5 + 6.1) / 2; F only from AHC");
    assert_eq!(row(t, 3)[4], "340.00 (100.00)");
    assert_eq!(row(t, 3)[7], "87.50 (17.50)");
    assert_eq!(row(t, 7)[2..], ["5.50", "0.270", "390.00", "48.00", "24.00", "78.00"]);
    assert_eq!(built.averages[&("rid".to_string(), Metric::Aesthetic)].orders, 2);
    assert!(close(built.averages[&("rid".to_string(), Metric::Aesthetic)].value.unwrap(), 5.7));

    // Paper scale: the paper's numbers below ours.
    let paper = tables(&study(), &ReportOptions { paper_numbers: true, ..ReportOptions::default() });
    let t = table(&paper, "table3");
    assert_eq!(t.display.height(), 12);
    assert_eq!(row(t, 1), ["SD v1.5 (paper)", "", "5.23", "0.259", "425.13", "50.40", "25.77", "71.54"]);
    assert_eq!(row(t, 5)[1], "Average (paper)");
    assert_eq!(row(t, 5)[2], "5.62");
    assert_eq!(row(t, 9)[2..], ["5.55", "0.277", "354.96", "41.45", "24.42", "85.95"]);
    assert_eq!(row(t, 11)[0], "Model soup (paper)");
    let sources: Vec<Option<&str>> = t.data.column("source").unwrap().str().unwrap().iter().collect();
    assert_eq!(sources[1], Some("paper"));
    assert_eq!(sources[0], Some("ours"));
}

#[test]
fn table6_and_table4() {
    let built = tables(&study(), &ReportOptions { paper_numbers: true, ..ReportOptions::default() });
    let t6 = table(&built, "table6");
    assert_eq!(headers(t6)[0], "Model");
    assert_eq!(row(t6, 0), ["Joint tuning", "5.40", "0.265", "380.00", "49.00", "21.00", "83.00"]);
    assert_eq!(row(t6, 1)[0], "Joint tuning (paper)");
    assert_eq!(row(t6, 2)[..2], ["RID, average", "5.70"]);
    assert_eq!(row(t6, 3)[..2], ["RID, average (paper)", "5.55"]);

    let t4 = table(&built, "table4");
    assert_eq!(headers(t4), ["Method", "Aesthetic (s/epoch) ↓", "HPS (s/epoch) ↓"]);
    // Baseline aesthetic: objects k1 (once, though two stages) and k2: (10 + 12) / 2.
    assert_eq!(row(t4, 0), ["Baseline", "11.00", "20.00"]);
    assert_eq!(row(t4, 1)[0], "Baseline (paper)");
    assert_eq!(row(t4, 1)[1], "603.00", "10.05 minutes");
    assert_eq!(row(t4, 2), ["RID", "11.00", "20.50"]);
    assert_eq!(row(t4, 4), ["RID overhead", "+0.0 %", "+2.5 %"]);
    assert_eq!(row(t4, 5)[1], "+0.5 %", "paper: 10.10 / 10.05");
    assert_eq!(built.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["table2", "table3", "table4", "table6"]);
}

#[test]
fn missing_inputs_leave_tables_out_with_a_note_and_bad_labels_are_errors() {
    let mut inputs = study();
    inputs.joint = None;
    inputs.trainings.clear();
    let built = tables(&inputs, &ReportOptions::default());
    assert_eq!(built.tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["table2", "table3"]);
    assert!(built.notes.iter().any(|n| n.contains("Table 6")));
    assert!(built.notes.iter().any(|n| n.contains("Table 4")));

    let err = build_all(&inputs, &Frames::build(&inputs).unwrap(), &ReportOptions { table2_order: "CAH".into(), ..ReportOptions::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("CAH") && err.contains("AHC, HCA"), "{err}");

    let mut wrong = study();
    wrong.evals[1].order = Some("HCA".into());
    let err = wrong.check().unwrap_err().to_string();
    assert!(err.contains("eval/baseline/AHC/2") && err.contains("labelled order HCA"), "{err}");
    let mut unlabelled = study();
    unlabelled.evals[0].method = None;
    assert!(unlabelled.check().unwrap_err().to_string().contains("`method` and `order` labels"));
    let mut gap = study();
    gap.evals.remove(1);
    assert!(Frames::build(&gap).err().unwrap().to_string().contains("without the step before it"));
}

// ---------------------------------------------------------------- rendering

#[test]
fn latex_escapes_specials_and_uses_booktabs() {
    assert_eq!(latex_escape(r"a_b & 50% $x$ #1 {y} ~ ^ \"), r"a\_b \& 50\% \$x\$ \#1 \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{}");
    assert_eq!(latex_escape("FID ↓"), r"FID $\downarrow$");
    let built = tables(&study(), &ReportOptions::default());
    let tex = latex(table(&built, "table2"));
    assert!(tex.contains("\\begin{tabular}{llrrrrrr}"), "{tex}");
    assert!(tex.contains("\\toprule") && tex.contains("\\bottomrule"));
    assert!(tex.contains("Aesthetic $\\uparrow$ & HPS $\\uparrow$ & PNG (kB) $\\downarrow$"));
    assert!(tex.contains("Baseline & 1. Aesthetic & 6.00 (-) &"));
    // A rule before each method's group (plus the one under the header).
    assert_eq!(tex.matches("\\midrule").count(), 3);
    let t4 = latex(table(&built, "table4"));
    assert!(t4.contains("+2.5 \\%"), "{t4}");
}

#[test]
fn markdown_and_csv_layouts() {
    let built = tables(&study(), &ReportOptions::default());
    let t = table(&built, "table3");
    let md = markdown(t);
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines[0], "| Method | Order | Aesthetic ↑ | HPS ↑ | PNG (kB) ↓ | JPEG (kB) ↓ | CLIP ↑ | FID ↓ |");
    assert_eq!(lines[1], "|:---|:---|---:|---:|---:|---:|---:|---:|");
    assert_eq!(lines[3], "| Baseline | AHC | 5.50 (0.50) | 0.270 (0.030) | 300.00 (-) | 40.00 (-) | 24.50 (0.50) | 75.00 (5.00) |");
    assert_eq!(lines.len(), 2 + 8);
    let text = csv(&t.data);
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(
        rows[0],
        "method,order,source,aesthetic,aesthetic_forgetting,hps,hps_forgetting,png_kb,png_kb_forgetting,jpeg_kb,jpeg_kb_forgetting,clip_score,clip_score_forgetting,fid,fid_forgetting"
    );
    assert_eq!(rows[2], "Baseline,AHC,ours,5.5,0.5,0.27,0.02999999999999997,300,,40,,24.5,0.5,75,5");
    assert_eq!(rows[1], "Base model,,ours,5,,0.25,,400,,50,,25,,70,");
}

// ---------------------------------------------------------------- whole report

fn write_grid(path: &Path, shade: u8) {
    // 4 prompts of 8x8, one row.
    let (w, h) = (32u32, 8u32);
    let mut rgb = Vec::new();
    for y in 0..h {
        for x in 0..w {
            rgb.extend([shade, (x * 8) as u8, (y * 30) as u8]);
        }
    }
    ril_pipe::report::charts::write_png(path, &rgb, (w, h)).unwrap();
}

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.len() > 1000 && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
}

#[test]
fn a_whole_report_writes_tables_charts_montages_metrics_and_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let grids = dir.path().join("grids");
    std::fs::create_dir_all(&grids).unwrap();
    let mut inputs = study();
    for (i, e) in std::iter::once(&mut inputs.base).chain(inputs.evals.iter_mut()).chain(inputs.soup.iter_mut()).enumerate() {
        let path = grids.join(format!("{i}.png"));
        write_grid(&path, (i * 20) as u8);
        e.grid = Some(path);
    }
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let files = write_report(&inputs, &ReportOptions::default(), &out).unwrap();
    for t in ["table2", "table3", "table4", "table6"] {
        for ext in ["md", "csv", "tex"] {
            let name = format!("tables/{t}.{ext}");
            assert!(files.tables.contains(&name), "{name}");
            assert!(std::fs::metadata(out.join(&name)).unwrap().len() > 100);
        }
    }
    for stem in ["trajectory_aesthetic", "trajectory_fid", "forgetting", "train/ft_rid_AHC_1"] {
        assert!(is_png(&out.join(format!("charts/{stem}.png"))), "{stem}.png");
        let svg = std::fs::read_to_string(out.join(format!("charts/{stem}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text"), "{stem}.svg has no text");
    }
    let svg = std::fs::read_to_string(out.join("charts/trajectory_aesthetic.svg")).unwrap();
    assert!(svg.contains("order AHC") && svg.contains("Baseline") && svg.contains("RID"));
    assert!(!out.join("charts/train/ft_baseline_ACH_1.png").exists(), "one curve per cached object");
    for m in ["samples_baseline_AHC.png", "samples_rid_AHC.png", "samples_final.png"] {
        assert!(is_png(&out.join("charts").join(m)), "{m}");
    }
    // The montage of one method along AHC: base + 3 steps, upscaled 8x8 samples.
    let montage = ril_pipe::report::montage::read_png(&out.join("charts/samples_baseline_AHC.png")).unwrap();
    assert!(montage.height > 4 * 8 * 8, "{}", montage.height);
    assert!(files.notes.iter().any(|n| n.contains("eval/joint")), "{:?}", files.notes);

    let metrics: BTreeMap<String, f64> = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["eval/baseline/AHC/3/aesthetic"], 5.5);
    assert_eq!(metrics["eval/base/fid"], 70.0);
    assert!(close(metrics["forgetting/baseline/AHC/aesthetic"], 0.5));
    assert!(!metrics.contains_key("forgetting/baseline/AHC/png_kb"), "\"-\" has no value");
    assert!(close(metrics["average/rid/aesthetic"], 5.7));
    assert!(close(metrics["average/baseline/forgetting/png_kb"], 100.0));
    assert_eq!(metrics["ft/rid/AHC/1/seconds_per_epoch"], 11.0);

    let index = std::fs::read_to_string(out.join("index.md")).unwrap();
    assert!(index.contains("| Baseline | AHC | 5.50 (0.50) |"));
    assert!(index.contains("![Aesthetic after each task](charts/trajectory_aesthetic.png)"));
    assert!(index.contains("(charts/forgetting.png)") && index.contains("(charts/samples_final.png)"));
    assert!(index.contains("[CSV](tables/table3.csv)") && index.contains("(charts/train/ft_rid_AHC_1.png)"));
    // Everything the index links exists.
    for link in index.split("](").skip(1).map(|s| &s[..s.find(')').unwrap()]) {
        assert!(out.join(link).exists(), "index links a missing {link}");
    }
}

// ---------------------------------------------------------------- check

fn bm(value: f64, direction: Direction, abs_tol: f64, rel_tol: f64) -> BaselineMetric {
    BaselineMetric {
        key: "m".into(),
        value,
        direction,
        abs_tol,
        rel_tol,
    }
}

#[test]
fn check_verdicts_at_and_around_the_tolerance() {
    use Direction::*;
    let higher = bm(1.0, Higher, 0.3, 0.0);
    assert_eq!(judge(&higher, 1.0), Verdict::Ok);
    assert_eq!(judge(&higher, 0.7), Verdict::Ok, "exactly at the tolerance (1.0 - 0.7 rounds to 0.30000000000000004)");
    assert_eq!(judge(&higher, 0.6999), Verdict::Regression);
    assert_eq!(judge(&higher, 1.3), Verdict::Ok);
    assert_eq!(judge(&higher, 1.3001), Verdict::Improved);
    assert_eq!(judge(&higher, 1e9), Verdict::Improved, "improvements never fail");
    assert!(!Verdict::Improved.fails());

    let lower = bm(200.0, Lower, 0.0, 0.05); // tolerance 10
    assert_eq!(judge(&lower, 210.0), Verdict::Ok);
    assert_eq!(judge(&lower, 210.001), Verdict::Regression);
    assert_eq!(judge(&lower, 190.0), Verdict::Ok);
    assert_eq!(judge(&lower, 189.999), Verdict::Improved);
    let exact = bm(0.1, Lower, 0.0, 0.0);
    assert_eq!(judge(&exact, 0.1), Verdict::Ok);
    assert_eq!(judge(&exact, 0.1000001), Verdict::Regression);

    let b = Baseline::parse(
        r#"{"defaults": {"abs_tol": 0.1}, "metrics": {
            "a": {"value": 5.0, "direction": "higher"},
            "b": {"value": 5.0, "direction": "lower"},
            "gone": {"value": 1.0, "direction": "lower"}}}"#,
        "baseline.json",
    )
    .unwrap();
    let run = BTreeMap::from([("a".to_string(), 5.5), ("b".to_string(), 5.1), ("extra".to_string(), 1.0)]);
    let verdicts: Vec<Verdict> = compare(&b, &run).iter().map(|c| c.verdict).collect();
    assert_eq!(verdicts, [Verdict::Improved, Verdict::Ok, Verdict::Missing]);
    assert!(Verdict::Missing.fails());
    let table = ril_pipe::report::check::render(&compare(&b, &run));
    assert!(table.lines().next().unwrap().starts_with("metric"), "{table}");
    assert!(table.contains("improved") && table.contains("missing") && table.contains("±0.1"), "{table}");

    let example = Baseline::read(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/baselines/example.json"))).unwrap();
    let fid = example.metrics.iter().find(|m| m.key == "average/rid/fid").unwrap();
    assert_eq!((fid.direction, fid.rel_tol), (Lower, 0.05), "defaults apply");
}

fn ril_pipe_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ril-pipe"))
}

#[test]
fn check_command_exit_codes_and_update() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.json");
    std::fs::write(&metrics, r#"{"average/rid/aesthetic": 5.5, "average/rid/fid": 90.0}"#).unwrap();
    let baseline = dir.path().join("baseline.json");
    let write_baseline = |fid: f64| {
        let doc = json!({
            "description": "kept as is",
            "defaults": {"rel_tol": 0.02},
            "metrics": {
                "average/rid/aesthetic": {"value": 5.6, "direction": "higher", "abs_tol": 0.1},
                "average/rid/fid": {"value": fid, "direction": "lower"}
            }
        });
        std::fs::write(&baseline, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    };
    let check = |extra: &[&str]| {
        let out = ril_pipe_bin().arg("check").arg("--baseline").arg(&baseline).arg("--metrics").arg(&metrics).args(extra).output().unwrap();
        (out.status.code().unwrap(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    // fid 90 vs 85: beyond 2 % (1.7): a regression. Aesthetic 5.5 vs 5.6 within 0.1: ok.
    write_baseline(85.0);
    let (code, text) = check(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("REGRESSION") && text.contains("average/rid/aesthetic ↑"), "{text}");
    // fid 90 vs 95: an improvement beyond tolerance passes.
    write_baseline(95.0);
    let (code, text) = check(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("improved"), "{text}");
    // --update takes the run's values and keeps the rest.
    write_baseline(85.0);
    let (code, text) = check(&["--update"]);
    assert_eq!(code, 0, "{text}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&baseline).unwrap()).unwrap();
    assert_eq!(doc["metrics"]["average/rid/fid"]["value"], 90.0);
    assert_eq!(doc["metrics"]["average/rid/aesthetic"]["abs_tol"], 0.1);
    assert_eq!(doc["description"], "kept as is");
    assert_eq!(check(&[]).0, 0, "after the update the run matches");
    // A metric the run lacks fails.
    std::fs::write(&metrics, r#"{"average/rid/aesthetic": 5.6}"#).unwrap();
    let (code, text) = check(&[]);
    assert_eq!(code, 1);
    assert!(text.contains("missing"), "{text}");
    // A malformed baseline is a clear error.
    std::fs::write(&baseline, r#"{"metrics": {"x": {"value": 1}}}"#).unwrap();
    let (code, text) = check(&[]);
    assert_ne!(code, 0);
    assert!(text.contains("no `direction`"), "{text}");
}

// ---------------------------------------------------------------- the stage, end to end

/// Writes an evaluation record from its parameters (and a sample grid when asked); appends a
/// line to `count_file` whenever it really runs.
struct FakeEval;

ril_pipe::stage_params! {
    struct FakeEvalParams {
        tasks: String = param(String::new()).doc("task letters"),
        values: Vec<f64> = required().doc("six metrics"),
        count_file: String = param(String::new()),
    }
}

impl StageKind for FakeEval {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "fake_eval",
            version: 1,
            doc: "test kind",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: FakeEvalParams::specs(),
            inputs: vec![],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: FakeEvalParams = ctx.typed_params()?;
        count(&p.count_file)?;
        let tasks: Vec<Task> = p.tasks.chars().filter_map(|c| Task::parse(&c.to_string())).collect();
        let values = p.values;
        let r = EvaluationRecord {
            tasks,
            origin: "finetune".into(),
            metrics: Metric::ALL.into_iter().zip(values).collect(),
            prompts: 4,
            images_per_prompt: 1,
            seed: 0,
            rewards: Default::default(),
        };
        r.write(&ctx.out_dir().join("metrics.json"))?;
        write_grid(&ctx.out_dir().join("grid.png"), 120);
        Ok(())
    }
}

/// Writes a training log and summary.
struct FakeTrain;

ril_pipe::stage_params! {
    struct FakeTrainParams {
        method: String = required(),
        seconds_per_epoch: f64 = required(),
        count_file: String = param(String::new()),
    }
}

impl StageKind for FakeTrain {
    fn schema(&self) -> KindSchema {
        KindSchema {
            kind: "fake_train",
            version: 1,
            doc: "test kind",
            uses_input_labels: false,
            reads_declared_rewards: false,
            params: FakeTrainParams::specs(),
            inputs: vec![],
        }
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let p: FakeTrainParams = ctx.typed_params()?;
        count(&p.count_file)?;
        let method = p.method;
        let t = training(&ctx.stage.id, "", &method, Task::Aesthetic, p.seconds_per_epoch, method == "rid");
        let log: String = t.log.iter().map(|l| serde_json::to_string(l).unwrap() + "\n").collect();
        std::fs::write(ctx.out_dir().join("train_log.jsonl"), log)?;
        std::fs::write(ctx.out_dir().join("train_summary.json"), serde_json::to_vec(&t.summary).unwrap())?;
        Ok(())
    }
}

fn count(file: &str) -> Result<(), StageError> {
    use std::io::Write as _;
    if !file.is_empty() {
        writeln!(std::fs::OpenOptions::new().create(true).append(true).open(file)?, "x")?;
    }
    Ok(())
}

fn registry() -> Registry {
    let mut r = ril_pipe::stages::registry();
    r.register(FakeEval);
    r.register(FakeTrain);
    r
}

const STUDY: &str = r#"
name: study
vars:
  count: ""
  base: [5.0, 0.25, 400.0, 50.0, 25.0, 70.0]
  s1: {baseline: [6.0, 0.24, 410.0, 52.0, 24.0, 80.0], rid: [5.8, 0.255, 405.0, 51.0, 25.2, 72.0]}
  s2: {baseline: [5.6, 0.30, 420.0, 53.0, 23.0, 90.0], rid: [5.7, 0.28, 402.0, 50.5, 25.0, 74.0]}
  s3: {baseline: [5.5, 0.27, 300.0, 40.0, 24.5, 75.0], rid: [5.65, 0.275, 350.0, 42.0, 24.8, 73.0]}
  spe: {baseline: 10.0, rid: 10.1}
stages:
  - id: eval/base
    kind: fake_eval
    params: {values: "${base}", count_file: "${count}"}
  - id: eval/${method}/${order}/${step}
    kind: fake_eval
    matrix: {method: [baseline, rid], order: [AHC], step: [1]}
    params: {tasks: A, count_file: "${count}", values: "${s1.${method}}"}
  - id: eval/${method}/${order}/${step}
    kind: fake_eval
    matrix: {method: [baseline, rid], order: [AHC], step: [2]}
    params: {tasks: AH, count_file: "${count}", values: "${s2.${method}}"}
  - id: eval/${method}/${order}/${step}
    kind: fake_eval
    matrix: {method: [baseline, rid], order: [AHC], step: [3]}
    params: {tasks: AHC, count_file: "${count}", values: "${s3.${method}}"}
  - id: ft/${method}/${order}/${task}
    kind: fake_train
    matrix: {method: [baseline, rid], order: [AHC], task: [A]}
    params: {method: "${method}", seconds_per_epoch: "${spe.${method}}", count_file: "${count}"}
  - id: forgetting/${method}/${order}
    kind: forgetting
    matrix: {method: [baseline, rid], order: [AHC]}
    inputs: {evals: [eval/base, "eval/${method}/${order}/*"]}
  - id: report
    kind: report
    params: {title: "Fixture study"}
    inputs:
      base: eval/base
      evals: ["eval/*/*/*"]
      forgetting: ["forgetting/**"]
      trainings: ["ft/**"]
"#;

fn resolve(file: &Path, sets: &[String]) -> ril_pipe::pipeline::ResolvedPipeline {
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    load_resolved(file, &registry().schemas(), &overrides).unwrap()
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn the_report_stage_runs_from_the_cache_and_publishes_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let file = crate::support::write_pipeline(dir.path(), "study.yaml", STUDY);
    let counter = dir.path().join("count.txt");
    let sets = vec![format!("vars.count={}", counter.display())];
    let pipeline = resolve(&file, &sets);
    let cache = Cache::new(dir.path().join("cache"));

    // Nothing cached: the report lists what it lacks and runs nothing.
    match ensure_reports(&pipeline, &cache) {
        Err(PublishError::MissingInputs { kind, list }) => {
            assert!(list.iter().any(|l| l.starts_with("eval/base (fake_eval, not computed")), "{list:?}");
            assert!(list.iter().any(|l| l.starts_with("forgetting/rid/AHC (forgetting")), "{list:?}");
            let text = PublishError::MissingInputs { kind, list }.to_string();
            assert!(text.contains("ril-pipe run"), "{text}");
        }
        other => panic!("expected missing inputs, got {other:?}"),
    }
    assert_eq!(lines(&counter), 0);

    let summary = run(&pipeline, &registry(), &cache, &RunOptions::default()).unwrap();
    assert!(summary.ok(), "{:?}", summary.outcomes);
    let ran = lines(&counter);
    assert_eq!(ran, 7 + 2, "7 evaluations, 2 trainings");

    let reports = ensure_reports(&pipeline, &cache).unwrap();
    assert_eq!(reports.len(), 1);
    let root = dir.path().join("reports");
    let dest = publish(&reports, &root, &pipeline.name).unwrap();
    assert_eq!(dest, root.join("study"));
    let index = std::fs::read_to_string(dest.join("index.md")).unwrap();
    assert!(index.starts_with("# Fixture study"));
    assert!(index.contains("|  | 3. Compress | 5.50 (0.50) | 0.270 (0.030) | 300.00 (-) |"), "{index}");
    assert!(index.contains("RID overhead"));
    assert!(is_png(&dest.join("charts/samples_rid_AHC.png")));
    assert!(dest.join("tables/table3.tex").exists() && dest.join("metrics.json").exists());
    assert!(!dest.join("log.txt").exists() && !dest.join("MANIFEST.json").exists());

    // A changed report parameter: only the report stage runs again, from the cached inputs.
    let mut changed = sets.clone();
    changed.push("report.title=Second look".into());
    let pipeline2 = resolve(&file, &changed);
    std::fs::write(dest.join("stale.txt"), "from an older report").unwrap();
    let reports = ensure_reports(&pipeline2, &cache).unwrap();
    assert_eq!(lines(&counter), ran, "no input stage ran again");
    let dest = publish(&reports, &root, &pipeline2.name).unwrap();
    assert!(std::fs::read_to_string(dest.join("index.md")).unwrap().starts_with("# Second look"));
    assert!(!dest.join("stale.txt").exists(), "the old report is replaced as a whole");
    // Nothing but the report folder under reports/, no temporary folders left.
    let left: Vec<String> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["study"]);
    assert!(files_under(&dest).iter().all(|p| p.starts_with(&dest)));
    // The journal knows the new report object, so gc keeps it.
    let journal = std::fs::read_to_string(dir.path().join("cache/runs/study.json")).unwrap();
    assert!(journal.contains(&reports[0].dir.file_name().unwrap().to_string_lossy().to_string()));

    assert!(matches!(publish(&reports, &root, "../escape"), Err(PublishError::BadName(_))));

    // `check PIPELINE` reads the cached report's metrics; an uncomputed report is an error.
    let metrics = merged_metrics(cached_reports(&pipeline2, &cache).unwrap().iter().map(|r| r.dir.as_path())).unwrap();
    assert!(close(metrics["average/rid/aesthetic"], 5.65));
    assert!(close(metrics["forgetting/baseline/AHC/hps"], 0.03));
    let mut third = sets.clone();
    third.push("report.title=Never made".into());
    assert!(matches!(cached_reports(&resolve(&file, &third), &cache), Err(PublishError::NotCached(id)) if id == "report"));
}

/// The pipeline's report stages, run from cached inputs if needed (as `ril-pipe report` does).
fn ensure_reports(pipeline: &ResolvedPipeline, cache: &Cache) -> Result<Vec<CachedObject>, PublishError> {
    ensure_of_kind(pipeline, &registry(), cache, "report")
}

fn cached_reports(pipeline: &ResolvedPipeline, cache: &Cache) -> Result<Vec<CachedObject>, PublishError> {
    cached_of_kind(pipeline, &registry(), cache, "report")
}

/// Copies the reports to `<root>/<name>/` (as `ril-pipe report` does).
fn publish(reports: &[CachedObject], root: &Path, name: &str) -> Result<PathBuf, PublishError> {
    publish_objects(reports, root, name, file_stem)
}

#[test]
fn the_report_kind_is_registered_with_its_inputs() {
    let schemas = ril_pipe::stages::registry().schemas();
    let report = &schemas["report"];
    assert!(report.uses_input_labels);
    let inputs: Vec<(&str, bool, bool)> = report.inputs.iter().map(|i: &InputSpec| (i.name, i.required, i.many)).collect();
    assert_eq!(
        inputs,
        [("base", true, false), ("evals", false, true), ("forgetting", false, true), ("soup", false, false), ("joint", false, false), ("trainings", false, true)]
    );
    let params: Vec<&str> = report.params.iter().map(|p| p.name).collect();
    assert_eq!(params, ["title", "table2_order", "paper_numbers"]);
}
