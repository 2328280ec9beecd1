//! What a training loop reports to, and asks whether to stop: the tiny world's trainers and the
//! fine-tuning loop share it (a stage implements it over its progress bar, log and Ctrl-C).

/// Training was asked to stop (Ctrl-C): what a [`Monitor`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

pub trait Monitor {
    /// `step` of `total` optimizer steps are done; `Err` stops training.
    fn step(&mut self, step: usize, total: usize) -> Result<(), Cancelled>;
    /// A line for the log.
    fn log(&mut self, line: &str);
}

/// A monitor that never stops and keeps the log lines (tests, benchmarks).
#[derive(Debug, Default)]
pub struct Quiet {
    pub lines: Vec<String>,
}

impl Monitor for Quiet {
    fn step(&mut self, _step: usize, _total: usize) -> Result<(), Cancelled> {
        Ok(())
    }

    fn log(&mut self, line: &str) {
        self.lines.push(line.to_string());
    }
}
