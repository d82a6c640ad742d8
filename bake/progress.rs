//! Progress of long steps on stderr: bars on a terminal; elsewhere (CI, a pipe, `--output json`)
//! one plain line per step every few seconds, never an escape code; nothing when quiet. Library
//! code opens a [`Task`] for each long step wherever it runs; the CLI chooses the [`Mode`] once
//! per run (like the logger), so no progress handle has to be threaded through every call.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};

use crate::diagnostic::Report;
use crate::settings::{OutputFormat, Settings, Verbosity};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bars on stderr, which is a terminal.
    Bars,
    /// A plain line per step on stderr, at most every `every` (and when it ends).
    Lines { every: Duration },
    /// Nothing (quiet, and libraries used outside the CLI).
    Off,
}

/// How often a step's plain line is repeated when nothing says otherwise.
pub const DEFAULT_LINE_INTERVAL: Duration = Duration::from_secs(5);

static MODE: OnceLock<Mode> = OnceLock::new();
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Chooses how this process shows progress; the first call wins.
pub fn init(mode: Mode) {
    let _ = MODE.set(mode);
}

/// The mode [`init`] chose ([`Mode::Off`] before it).
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Off)
}

/// Writes a log line on stderr above the bars being drawn (as is, when none are), so that a
/// build's log and its bars do not overwrite each other.
pub fn log_line(text: &str) {
    match BARS.get() {
        Some(bars) if mode() == Mode::Bars => bars.suspend(|| eprintln!("{text}")),
        _ => eprintln!("{text}"),
    }
}

/// How long steps show progress: bars on a terminal (human output), else a plain line every
/// `BAKE_PROGRESS_INTERVAL` (default 5s), nothing when quiet.
pub fn mode_for(settings: &Settings) -> Result<Mode, Report> {
    if settings.verbosity == Verbosity::Quiet {
        return Ok(Mode::Off);
    }
    if settings.progress && settings.output == OutputFormat::Human {
        return Ok(Mode::Bars);
    }
    let every = match std::env::var("BAKE_PROGRESS_INTERVAL") {
        Ok(text) if !text.is_empty() => humantime::parse_duration(&text).map_err(|e| {
            Report::new(format!(
                "BAKE_PROGRESS_INTERVAL=`{text}` is not a duration: {e}"
            ))
            .with_hint(Some("for example `5s` or `500ms`".into()))
        })?,
        _ => DEFAULT_LINE_INTERVAL,
    };
    Ok(Mode::Lines { every })
}

/// What a step counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes (shown as MiB, GiB; rates per second).
    Bytes,
    /// Things, named: `Count("blocks")`.
    Count(&'static str),
}

/// One long step's progress. Dropping it ends it.
pub struct Task {
    inner: Option<Arc<Shared>>,
    bar: Option<ProgressBar>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    name: String,
    unit: Unit,
    total: AtomicU64,
    done: AtomicU64,
    message: Mutex<String>,
    started: Instant,
    every: Duration,
    last_line: Mutex<Instant>,
    ended: AtomicBool,
    /// Whether a line was printed: a step that ends before its first line is not a long one,
    /// and says nothing.
    printed: AtomicBool,
}

impl Task {
    /// A step named `name` (`EBS upload snap-…`, `boot test`) of `total` units (`None`: no
    /// known end; elapsed time and the message show instead).
    pub fn new(name: impl Into<String>, total: Option<u64>, unit: Unit) -> Task {
        let name = name.into();
        match mode() {
            Mode::Off => Task {
                inner: None,
                bar: None,
                ticker: None,
            },
            Mode::Bars => {
                let multi = BARS.get_or_init(MultiProgress::new);
                let bar = multi.add(match total {
                    Some(total) => ProgressBar::new(total),
                    None => ProgressBar::new_spinner(),
                });
                bar.set_style(style(total.is_some(), unit));
                bar.set_prefix(name);
                bar.enable_steady_tick(Duration::from_millis(200));
                Task {
                    inner: None,
                    bar: Some(bar),
                    ticker: None,
                }
            }
            Mode::Lines { every } => {
                let shared = Arc::new(Shared {
                    name,
                    unit,
                    total: AtomicU64::new(total.unwrap_or(0)),
                    done: AtomicU64::new(0),
                    message: Mutex::new(String::new()),
                    started: Instant::now(),
                    every,
                    last_line: Mutex::new(Instant::now()),
                    ended: AtomicBool::new(false),
                    printed: AtomicBool::new(false),
                });
                // A step that is waiting (a boot, an instance, a copy) still says so every
                // `every`, even when nothing moves.
                let ticking = Arc::clone(&shared);
                let ticker = std::thread::Builder::new()
                    .name("bake-progress".into())
                    .spawn(move || {
                        let tick = every.clamp(Duration::from_millis(50), Duration::from_secs(1));
                        while !ticking.ended.load(Ordering::Acquire) {
                            std::thread::park_timeout(tick);
                            if !ticking.ended.load(Ordering::Acquire) {
                                ticking.line_if_due();
                            }
                        }
                    })
                    .ok();
                Task {
                    inner: Some(shared),
                    bar: None,
                    ticker,
                }
            }
        }
    }

    /// Adds `n` units done.
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
        if let Some(shared) = &self.inner {
            shared.done.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Sets the units done.
    pub fn set(&self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
        }
        if let Some(shared) = &self.inner {
            shared.done.store(done, Ordering::Relaxed);
        }
    }

    /// Sets the total, when it is learnt late.
    pub fn set_total(&self, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
        if let Some(shared) = &self.inner {
            shared.total.store(total, Ordering::Relaxed);
        }
    }

    /// What the step is doing now (an instance's state, the last console line).
    pub fn message(&self, text: impl Into<String>) {
        if self.bar.is_none() && self.inner.is_none() {
            return;
        }
        let text: String = text.into();
        // One line: a console line may carry control characters.
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if let Some(bar) = &self.bar {
            bar.set_message(text);
            return;
        }
        if let Some(shared) = &self.inner {
            *shared.message.lock().unwrap_or_else(|e| e.into_inner()) = text;
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if let Some(shared) = self.inner.take() {
            shared.ended.store(true, Ordering::Release);
            if let Some(ticker) = self.ticker.take() {
                ticker.thread().unpark();
                let _ = ticker.join();
            }
            if shared.printed.load(Ordering::Acquire) {
                shared.line("done");
            }
        }
    }
}

impl Shared {
    fn line_if_due(&self) {
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= self.every {
            *last = Instant::now();
            drop(last);
            self.printed.store(true, Ordering::Release);
            self.line("");
        }
    }

    /// `==> EBS upload snap-…: 1.2 GiB of 2.0 GiB (310 MiB/s, 3s left) [message], 4.1s`
    fn line(&self, end: &str) {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let elapsed = self.started.elapsed();
        let mut text = format!("==> {}:", self.name);
        if done > 0 || total > 0 {
            let _ = write!(text, " {}", amount(done, self.unit));
            if total > 0 {
                let _ = write!(text, " of {}", amount(total, self.unit));
            }
            let seconds = elapsed.as_secs_f64();
            if seconds > 0.5 && done > 0 {
                let rate = done as f64 / seconds;
                let _ = write!(text, " ({}/s", amount(rate as u64, self.unit));
                if total > done && end.is_empty() {
                    let left = (total - done) as f64 / rate;
                    let _ = write!(text, ", {}s left", left.round());
                }
                text.push(')');
            }
        }
        let message = self.message.lock().unwrap_or_else(|e| e.into_inner());
        if !message.is_empty() {
            let _ = write!(text, " {message}");
        }
        let _ = write!(text, ", {:.1}s", elapsed.as_secs_f64());
        if !end.is_empty() {
            let _ = write!(text, " ({end})");
        }
        eprintln!("{text}");
    }
}

/// A reader that counts what passes through it into a [`Task`] (in 1 MiB steps, so that a hot
/// loop of small reads pays nothing for it).
pub struct Reading<R> {
    inner: R,
    task: Task,
    pending: u64,
}

impl<R> Reading<R> {
    pub fn new(inner: R, task: Task) -> Self {
        Reading {
            inner,
            task,
            pending: 0,
        }
    }
}

impl<R: std::io::Read> std::io::Read for Reading<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pending += n as u64;
        if self.pending >= STEP || n == 0 {
            self.task.inc(std::mem::take(&mut self.pending));
        }
        Ok(n)
    }
}

/// Bytes counted before a [`Task`] is told.
pub const STEP: u64 = 1 << 20;

fn amount(n: u64, unit: Unit) -> String {
    match unit {
        Unit::Bytes => HumanBytes(n).to_string(),
        Unit::Count(name) => format!("{n} {name}"),
    }
}

fn style(bounded: bool, unit: Unit) -> ProgressStyle {
    let template = match (bounded, unit) {
        (true, Unit::Bytes) => {
            "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}"
        }
        (true, Unit::Count(_)) => {
            "{prefix:.bold} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta}) {msg}"
        }
        (false, Unit::Bytes) => "{spinner} {prefix:.bold} {bytes} {bytes_per_sec} {elapsed} {msg}",
        (false, Unit::Count(_)) => "{spinner} {prefix:.bold} {elapsed} {msg}",
    };
    ProgressStyle::with_template(template)
        .expect("the templates are valid")
        .progress_chars("=> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_as_people_write_them() {
        assert_eq!(amount(3 * 1024 * 1024, Unit::Bytes), "3.00 MiB");
        assert_eq!(amount(7, Unit::Count("blocks")), "7 blocks");
    }

    #[test]
    fn without_a_mode_a_task_does_nothing() {
        // No init in unit tests: Off.
        let task = Task::new("step", Some(10), Unit::Count("things"));
        task.inc(3);
        task.message("working");
        assert!(task.bar.is_none() && task.inner.is_none());
    }
}
