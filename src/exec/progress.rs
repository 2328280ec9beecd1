//! Progress display: an overall bar and one bar per running stage on a terminal; plain lines
//! (start, milestones, end) when the output is a log file or CI.
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The run's progress display.
pub struct ProgressHub {
    multi: Option<MultiProgress>,
    overall: ProgressBar,
}

impl ProgressHub {
    /// `enabled`: draw bars (only when stderr is a terminal).
    pub fn new(total: u64, enabled: bool) -> Self {
        let draw = enabled && std::io::stderr().is_terminal();
        if draw {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(total));
            overall.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30.cyan/blue}] {pos}/{len} stages  {elapsed_precise}  {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            overall.set_prefix("overall");
            overall.enable_steady_tick(Duration::from_millis(250));
            ProgressHub {
                multi: Some(multi),
                overall,
            }
        } else {
            ProgressHub {
                multi: None,
                overall: ProgressBar::hidden(),
            }
        }
    }

    /// A bar for a stage that starts now.
    pub fn stage(&self, id: &str) -> StageProgress {
        let bar = self.multi.as_ref().map(|multi| stage_bar(multi.add(ProgressBar::new(0)), "stage", id));
        StageProgress::with_bar(id, bar)
    }

    /// A line above the bars (or on stderr without bars).
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// One more stage finished (executed, cached, failed or skipped).
    pub fn advance(&self) {
        self.overall.inc(1);
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

/// The progress of one stage, given to the stage through its context.
#[derive(Clone)]
pub struct StageProgress {
    id: String,
    bar: Option<ProgressBar>,
    length: Arc<AtomicU64>,
    position: Arc<AtomicU64>,
    milestone: Arc<AtomicU64>,
}

/// A stage's bar: prefix, spinner, the id, the bar, counts and the time left.
fn stage_bar(bar: ProgressBar, prefix: &'static str, id: &str) -> ProgressBar {
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} {spinner} {wide_msg} [{bar:20}] {pos}/{len} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix);
    bar.set_message(id.to_string());
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

impl StageProgress {
    fn with_bar(id: &str, bar: Option<ProgressBar>) -> Self {
        StageProgress {
            id: id.to_string(),
            bar,
            length: Arc::new(AtomicU64::new(0)),
            position: Arc::new(AtomicU64::new(0)),
            milestone: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A progress that shows nothing (tests, `exec-stage` under a batch system).
    pub fn hidden(id: &str) -> Self {
        Self::with_bar(id, None)
    }

    /// One bar of its own for a command that is not a run (`sample`): drawn when `enabled` and
    /// stderr is a terminal, else plain lines at every quarter.
    pub fn standalone(id: &str, enabled: bool) -> Self {
        let draw = enabled && std::io::stderr().is_terminal();
        Self::with_bar(id, draw.then(|| stage_bar(ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr()), "", id)))
    }

    /// Total steps of the stage (e.g. optimizer steps).
    pub fn set_length(&self, n: u64) {
        self.length.store(n, Ordering::SeqCst);
        self.position.store(0, Ordering::SeqCst);
        self.milestone.store(0, Ordering::SeqCst);
        if let Some(bar) = &self.bar {
            bar.set_length(n);
            bar.set_position(0);
        }
    }

    pub fn inc(&self, n: u64) {
        let pos = self.position.fetch_add(n, Ordering::SeqCst) + n;
        match &self.bar {
            Some(bar) => bar.set_position(pos),
            None => self.log_milestone(pos),
        }
    }

    /// Without bars, a line at every quarter so that logs show long stages moving.
    fn log_milestone(&self, pos: u64) {
        let len = self.length.load(Ordering::SeqCst);
        if len < 8 {
            return;
        }
        let quarter = pos * 4 / len;
        let previous = self.milestone.fetch_max(quarter, Ordering::SeqCst);
        if quarter > previous && quarter < 4 {
            eprintln!("    {}: {}% ({pos}/{len})", self.id, quarter * 25);
        }
    }

    pub fn message(&self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{}: {}", self.id, text.lines().next().unwrap_or("")));
        }
    }

    /// A line that stays (a result, e.g. a quality gate): above the bars on a terminal, on
    /// stderr otherwise.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("{}: {line}", self.id)),
            None => eprintln!("    {}: {line}", self.id),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// `12.3s`, `4m05s`, `2h07m`.
pub fn format_seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}
