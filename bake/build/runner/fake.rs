//! [`RecordingRunner`]: a [`Runner`] for unit tests of its callers. It records every step it
//! is given and plays back scripted results in order (success by default), printing their
//! lines through the caller's [`StepOutput`] as a real runner would.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use super::{OutputLine, Runner, RunnerError, StepOutcome, StepOutput, StepSpec, Tail};

/// What the fake does for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeResult {
    /// Prints the lines, then exits with the step's expected code.
    Succeed(Vec<OutputLine>),
    /// Prints the lines, then exits with `code`.
    Exit { code: i32, lines: Vec<OutputLine> },
    /// Prints the lines, then times out.
    TimeOut(Vec<OutputLine>),
}

#[derive(Debug, Default)]
pub struct RecordingRunner {
    steps: Mutex<Vec<StepSpec>>,
    results: Mutex<VecDeque<FakeResult>>,
}

impl RecordingRunner {
    pub fn new() -> Self {
        RecordingRunner::default()
    }

    /// Queues the result of the next step not yet scripted.
    pub fn then(self, result: FakeResult) -> Self {
        self.results.lock().expect("not poisoned").push_back(result);
        self
    }

    /// Every step run so far, in order.
    pub fn steps(&self) -> Vec<StepSpec> {
        self.steps.lock().expect("not poisoned").clone()
    }
}

impl Runner for RecordingRunner {
    fn name(&self) -> &str {
        "recording"
    }

    fn run(
        &self,
        step: &StepSpec,
        output: &mut dyn StepOutput,
    ) -> Result<StepOutcome, RunnerError> {
        self.steps.lock().expect("not poisoned").push(step.clone());
        let result = self
            .results
            .lock()
            .expect("not poisoned")
            .pop_front()
            .unwrap_or(FakeResult::Succeed(Vec::new()));
        let (code, lines, timed_out) = match result {
            FakeResult::Succeed(lines) => (step.expected_exit_code, lines, false),
            FakeResult::Exit { code, lines } => (code, lines, false),
            FakeResult::TimeOut(lines) => (-1, lines, true),
        };
        let mut tail = Tail::default();
        for line in &lines {
            tail.push(&line.text);
            output.line(&step.step, line.stream, &line.text);
        }
        if timed_out {
            return Err(RunnerError::TimedOut {
                step: step.step.clone(),
                timeout: step.timeout,
                last_lines: tail.into_lines(),
            });
        }
        if code != step.expected_exit_code {
            return Err(RunnerError::StepFailed {
                step: step.step.clone(),
                code,
                last_lines: tail.into_lines(),
            });
        }
        Ok(StepOutcome {
            exit_code: code,
            duration: Duration::ZERO,
            created: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Stream;
    use super::*;

    #[test]
    fn records_steps_and_plays_back_results_in_order() {
        let runner = RecordingRunner::new().then(FakeResult::Exit {
            code: 2,
            lines: vec![OutputLine {
                stream: Stream::Stderr,
                text: "boom".into(),
            }],
        });
        let first = StepSpec::new("/r", "first", "false", Duration::from_secs(5));
        let second = StepSpec::new("/r", "second", "true", Duration::from_secs(5));
        let mut output: Vec<OutputLine> = Vec::new();
        let error = runner.run(&first, &mut output).unwrap_err();
        assert!(
            matches!(&error, RunnerError::StepFailed { step, code: 2, last_lines } if step == "first" && last_lines == &["boom"])
        );
        assert_eq!(runner.run(&second, &mut output).unwrap().exit_code, 0);
        let names: Vec<String> = runner.steps().into_iter().map(|s| s.step).collect();
        assert_eq!(names, ["first", "second"]);
        assert_eq!(output.len(), 1);
    }

    #[test]
    fn is_usable_as_a_shared_trait_object() {
        let runner: std::sync::Arc<dyn Runner> =
            std::sync::Arc::new(RecordingRunner::new().then(FakeResult::TimeOut(Vec::new())));
        let step = StepSpec::new("/r", "slow", "sleep 99", Duration::from_secs(1));
        let handle = std::thread::spawn(move || runner.run(&step, &mut Vec::new()));
        assert!(matches!(
            handle.join().unwrap(),
            Err(RunnerError::TimedOut { .. })
        ));
    }
}
