//! Progress while the suite runs: a bar on a terminal, one line per step otherwise (a
//! log file or CI keeps every step).

use std::{
    io::IsTerminal as _,
    sync::atomic::{AtomicU64, Ordering},
};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: AtomicU64,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:32}] {pos}/{len} (eta {eta}) {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Self {
            bar,
            total,
            done: AtomicU64::new(0),
        }
    }

    /// Starts the next step, described by `what`.
    pub fn step(&self, what: &str) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        match &self.bar {
            Some(bar) => {
                bar.set_message(what.to_owned());
                bar.set_position(done - 1);
            }
            None => eprintln!("[{done}/{}] {what}", self.total),
        }
    }

    /// A line above the bar (or on its own).
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
