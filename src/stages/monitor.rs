//! A stage's progress bar, log and Ctrl-C as the [`Monitor`] of a training loop (the
//! fine-tunes' and the tiny world's trainers).
use crate::exec::StageContext;
use crate::method::monitor::{Cancelled, Monitor};

pub struct StageMonitor<'a> {
    ctx: &'a StageContext,
    reported: usize,
}

impl<'a> StageMonitor<'a> {
    /// A monitor of `total` optimizer steps (the length of the stage's progress bar).
    pub fn new(ctx: &'a StageContext, total: usize) -> Self {
        ctx.progress.set_length(total as u64);
        StageMonitor { ctx, reported: 0 }
    }
}

impl Monitor for StageMonitor<'_> {
    fn step(&mut self, step: usize, _total: usize) -> Result<(), Cancelled> {
        self.ctx.progress.inc(step.saturating_sub(self.reported) as u64);
        self.reported = step;
        self.ctx.check_cancelled().map_err(|_| Cancelled)
    }

    fn log(&mut self, line: &str) {
        self.ctx.log(line);
    }
}
