//! `model inspect`, `model run`: checking checkpoints, and running one component, before a
//! GPU run. The work is in `models::inspect` and `models::component`; this prints.
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use ril_pipe::models::component::{self, LoadedComponent, Operation};
use ril_pipe::models::inspect::{self, ComponentReport, InspectReport, TensorCheck};
use ril_pipe::models::lora::LoraGroup;
use ril_pipe::stages::device::{gpus_for, tch_device};
use serde_json::Value;

#[derive(Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Recognise what a diffusers pipeline folder, a component folder or a weights file holds,
    /// build each model from its config and check the checkpoint against it. Exit 0 when
    /// everything loads cleanly, 1 otherwise.
    Inspect(InspectArgs),
    /// Run one component on the tensors of a safetensors file and write its outputs as
    /// safetensors (to compare with a PyTorch run).
    #[command(after_help = run_help())]
    Run(RunArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// A diffusers pipeline folder (with model_index.json), a component folder, or a weights
    /// file (.safetensors, .pt, .pth, .bin, .ckpt, *.index.json).
    path: PathBuf,
    /// The component's config JSON when none lies beside the weights (an open_clip model
    /// config such as ViT-H-14.json, a config.json, an aesthetic head's {"dims": [...]}).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RunArgs {
    /// The component to run.
    #[arg(value_parser = PossibleValuesParser::new(Operation::ALL.map(Operation::name)))]
    component: String,
    /// Its weights: a file or a component folder.
    #[arg(long)]
    weights: PathBuf,
    /// Its config JSON (default: config.json / open_clip_config.json beside the weights).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The inputs, a safetensors file (tensor names below).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the outputs (safetensors, f32).
    #[arg(long)]
    output: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// LoRA adapters for the unet: a folder written by `ril-pipe lora export` (every adapter of
    /// its adapters.json, with its weight) or one diffusers LoRA file (weight 1).
    #[arg(long, value_name = "PATH")]
    lora: Option<PathBuf>,
}

fn run_help() -> String {
    let mut help = String::from("Components, their inputs and outputs (tensor names in the safetensors files):\n");
    for op in Operation::ALL {
        let (inputs, outputs) = op.signature();
        let _ = writeln!(help, "  {}", op.name());
        for (i, (name, what)) in inputs.iter().enumerate() {
            let _ = writeln!(help, "    {:<5}{name:<23}{what}", if i == 0 { "in:" } else { "" });
        }
        let _ = writeln!(help, "    out: {}", outputs.join(", "));
    }
    help
}

pub fn main(args: ModelArgs) -> anyhow::Result<i32> {
    match args.command {
        ModelCommand::Inspect(a) => inspect_cmd(a),
        ModelCommand::Run(a) => run_cmd(a),
    }
}

fn inspect_cmd(args: InspectArgs) -> anyhow::Result<i32> {
    let report = inspect::inspect(&args.path, args.config.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.ok { 0 } else { 1 })
}

fn run_cmd(args: RunArgs) -> anyhow::Result<i32> {
    let op: Operation = args.component.parse().map_err(anyhow::Error::msg)?;
    let device = if args.device == "cpu" {
        tch::Device::Cpu
    } else {
        gpus_for(&args.device)?.first().map(|g| tch_device(g)).unwrap_or(tch::Device::Cpu)
    };
    let config = component::config_for(op, &args.weights, args.config.as_deref())?;
    let lora = args.lora.as_deref().map(LoraGroup::from_peft_path).transpose()?;
    let loaded = LoadedComponent::load(config, &args.weights, device, lora.as_ref())?;
    let inputs = component::read_inputs(&args.input)?;
    let outputs = component::run(op, &loaded, &inputs)?;
    component::write_outputs(&args.output, &outputs)?;
    let adapters = match (&lora, &args.lora) {
        (Some(group), Some(path)) => format!(" with {} LoRA adapter{} of {}", group.num_adapters(), if group.num_adapters() == 1 { "" } else { "s" }, path.display()),
        _ => String::new(),
    };
    println!("{} ({}){adapters} on {device:?}: wrote {}", op.name(), loaded.config.kind().describe(), args.output.display());
    for (name, t) in &outputs {
        println!("  {name} {:?}", t.size());
    }
    Ok(0)
}

/// Entries of each list shown before "... and N more".
const SHOWN: usize = 5;

fn render(report: &InspectReport) -> String {
    let mut out = String::new();
    match &report.pipeline {
        Some(class) => {
            let _ = writeln!(out, "{}: {class} (model_index.json)", report.path.display());
        }
        None => {
            let _ = writeln!(out, "{}", report.path.display());
        }
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for c in &report.components {
        render_component(&mut out, c);
    }
    if !report.skipped.is_empty() {
        let names: Vec<String> = report.skipped.iter().map(|s| format!("{} ({})", s.name, s.class)).collect();
        let _ = writeln!(out, "skipped, not used by ril-pipe: {}", names.join(", "));
    }
    for p in &report.problems {
        let _ = writeln!(out, "problem: {p}");
    }
    let n = report.components.len();
    let failed = report.components.iter().filter(|c| !c.ok).count();
    if report.ok {
        let _ = writeln!(out, "OK: {n} component{} load{} cleanly", plural(n), if n == 1 { "s" } else { "" });
    } else {
        let mut parts = Vec::new();
        if failed > 0 {
            parts.push(format!("{failed} of {n} component{} with problems", plural(n)));
        }
        match report.problems.len() {
            0 => {}
            k => parts.push(format!("{k} pipeline problem{}", plural(k))),
        }
        if n == 0 && parts.is_empty() {
            parts.push("nothing to inspect".to_string());
        }
        let _ = writeln!(out, "FAILED: {}", parts.join(", "));
    }
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn render_component(out: &mut String, c: &ComponentReport) {
    let title = c.name.clone().unwrap_or_else(|| file_label(&c.path));
    let kind = c.kind.map(|k| k.describe()).unwrap_or("not recognised");
    let _ = writeln!(out, "\n{title}: {kind}{}", if c.ok { "" } else { "  [FAILED]" });
    if !c.recognised_by.is_empty() {
        let _ = writeln!(out, "  recognised by: {}", c.recognised_by.join("; "));
    }
    // Scalars and lists on the config line; nested groups (CLIP towers) on a line each.
    let pairs = |map: &serde_json::Map<String, Value>| -> Vec<String> {
        map.iter().filter(|(_, v)| !v.is_object()).map(|(k, v)| format!("{k} {}", value_text(v))).collect()
    };
    if !c.config.is_empty() {
        wrapped(out, "  config: ", &pairs(&c.config));
    }
    for (group, value) in c.config.iter() {
        if let Value::Object(map) = value {
            wrapped(out, &format!("    {group}: "), &pairs(map));
        }
    }
    if let Some(w) = &c.weights {
        let dtypes: Vec<String> = w.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
        let _ = writeln!(
            out,
            "  weights: {}: {} tensors ({}), {} parameters",
            w.file.strip_prefix(&c.path).ok().filter(|p| !p.as_os_str().is_empty()).unwrap_or(&w.file).display(),
            w.tensors,
            dtypes.join(", "),
            count_text(w.parameters)
        );
    }
    if let Some(check) = &c.check {
        render_check(out, check);
    }
    for note in &c.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    for p in &c.problems {
        let _ = writeln!(out, "  problem: {p}");
    }
}

fn file_label(path: &std::path::Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// `items` joined by ", " after `lead`, in lines of about 100 columns.
fn wrapped(out: &mut String, lead: &str, items: &[String]) {
    let indent = " ".repeat(lead.len());
    let mut line = lead.to_string();
    for (i, item) in items.iter().enumerate() {
        let piece = if i + 1 < items.len() { format!("{item}, ") } else { item.clone() };
        if line.len() > lead.len() && line.len() + piece.len() > 100 {
            let _ = writeln!(out, "{}", line.trim_end());
            line = indent.clone();
        }
        line.push_str(&piece);
    }
    let _ = writeln!(out, "{line}");
}

fn render_check(out: &mut String, check: &TensorCheck) {
    let aside = match check.set_aside.len() {
        0 => String::new(),
        k => format!("; {k} non-weight tensor{} skipped", plural(k)),
    };
    if check.is_clean() {
        let _ = writeln!(out, "  check: ok, all {} tensors of the model found with their shapes{aside}", check.expected);
        return;
    }
    let _ = writeln!(
        out,
        "  check: {} of {} tensors match: {} missing, {} unexpected{}, {} with the wrong shape, {} with the wrong dtype{aside}",
        check.matched,
        check.expected,
        check.missing.len(),
        check.unexpected.len(),
        if check.unexpected_ignored { " (ignored by the loader)" } else { "" },
        check.wrong_shape.len(),
        check.wrong_dtype.len()
    );
    let missing: Vec<String> = check.missing.iter().map(|t| format!("`{}` {:?}", t.name, t.shape)).collect();
    list(out, "missing", &missing);
    if !check.unexpected_ignored {
        let unexpected: Vec<String> = check.unexpected.iter().map(|t| format!("`{}` {:?}", t.name, t.shape)).collect();
        list(out, "unexpected", &unexpected);
    }
    let shapes: Vec<String> = check
        .wrong_shape
        .iter()
        .map(|t| format!("`{}`: {:?} in the file, the model expects {:?}", t.name, t.found, t.expected))
        .collect();
    list(out, "wrong shape", &shapes);
    let dtypes: Vec<String> =
        check.wrong_dtype.iter().map(|t| format!("`{}`: {} in the file, the model needs floats", t.name, t.dtype)).collect();
    list(out, "wrong dtype", &dtypes);
}

fn list(out: &mut String, label: &str, items: &[String]) {
    for item in items.iter().take(SHOWN) {
        let _ = writeln!(out, "    {label}: {item}");
    }
    if items.len() > SHOWN {
        let _ = writeln!(out, "    ... and {} more {label}", items.len() - SHOWN);
    }
}

/// Config values as plain text: strings without quotes, lists as `[a, b]`.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => format!("[{}]", items.iter().map(value_text).collect::<Vec<_>>().join(", ")),
        other => other.to_string(),
    }
}

/// 1234 -> "1,234"; 1_234_567 -> "1.23 M".
fn count_text(n: i64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}
