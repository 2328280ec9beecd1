//! Pipeline errors: every problem names the file, the line and column, and the offending key.
use std::fmt;
use std::path::PathBuf;

use super::locate::{locate, Position, YamlPath};

/// One problem found in a pipeline file.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// Where in the document (the key path); positions are looked up from it.
    pub path: YamlPath,
    pub message: String,
    /// Filled in by [`PipelineError::invalid`] from the source text.
    pub position: Option<Position>,
}

impl Diagnostic {
    pub fn new(path: YamlPath, message: impl Into<String>) -> Self {
        Diagnostic {
            path,
            message: message.into(),
            position: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{file}: cannot read the pipeline: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}:{line}:{column}: YAML syntax error: {message}")]
    Syntax {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", render(file, diagnostics))]
    Invalid {
        file: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
    #[error("--set {arg}: {message}")]
    Override { arg: String, message: String },
}

impl PipelineError {
    /// Errors found after parsing, with their positions looked up in `source`.
    pub fn invalid(file: PathBuf, source: &str, mut diagnostics: Vec<Diagnostic>) -> Self {
        for d in &mut diagnostics {
            d.position = locate(source, &d.path);
        }
        PipelineError::Invalid { file, diagnostics }
    }

    /// The diagnostics of an [`PipelineError::Invalid`], empty for other variants.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PipelineError::Invalid { diagnostics, .. } => diagnostics,
            _ => &[],
        }
    }
}

fn render(file: &std::path::Path, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for (i, d) in diagnostics.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&DiagnosticLine { file, d }.to_string());
    }
    if diagnostics.len() > 1 {
        out.push_str(&format!("\n{} problems in {}; nothing was run", diagnostics.len(), file.display()));
    }
    out
}

struct DiagnosticLine<'a> {
    file: &'a std::path::Path,
    d: &'a Diagnostic,
}

impl fmt::Display for DiagnosticLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.d;
        match d.position {
            Some(p) => write!(f, "{}:{}:{}: ", self.file.display(), p.line, p.column)?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        if d.path.is_root() {
            write!(f, "{}", d.message)
        } else {
            write!(f, "`{}`: {}", d.path, d.message)
        }
    }
}
