//! Waiting as a value: how often to poll, how many times, and how many successes in a row
//! count as done. AMIs in particular flap (`available`, then briefly `pending` again while a
//! copy or a tag settles), so the image waiter wants two consecutive successes.

use std::future::Future;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    pub interval: Duration,
    pub max_attempts: u32,
    /// Successes in a row needed before the wait ends.
    pub consecutive: u32,
}

impl WaitPolicy {
    /// Polls `check` until it reports `true` `consecutive` times in a row. A poll error ends
    /// the wait with that error; running out of attempts ends it with a timeout message that
    /// names `what`.
    pub async fn until<F, Fut>(&self, what: &str, mut check: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, String>>,
    {
        let mut streak = 0;
        for attempt in 0..self.max_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.interval).await;
            }
            if check().await? {
                streak += 1;
                if streak >= self.consecutive.max(1) {
                    return Ok(());
                }
            } else {
                streak = 0;
            }
        }
        Err(format!(
            "gave up waiting for {what} after {} polls {}s apart",
            self.max_attempts,
            self.interval.as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(consecutive: u32) -> WaitPolicy {
        WaitPolicy {
            interval: Duration::from_millis(1),
            max_attempts: 6,
            consecutive,
        }
    }

    async fn run(answers: &[bool], consecutive: u32) -> (Result<(), String>, usize) {
        let mut polls = 0;
        let result = policy(consecutive)
            .until("x", || {
                let answer = answers.get(polls).copied().unwrap_or(false);
                polls += 1;
                async move { Ok(answer) }
            })
            .await;
        (result, polls)
    }

    #[tokio::test]
    async fn a_flapping_state_needs_consecutive_successes() {
        let (result, polls) = run(&[true, false, true, true], 2).await;
        assert!(result.is_ok());
        assert_eq!(polls, 4);
        let (result, polls) = run(&[true, false, true, false, true, false], 2).await;
        assert!(
            result
                .unwrap_err()
                .contains("gave up waiting for x after 6 polls")
        );
        assert_eq!(polls, 6);
        let (result, polls) = run(&[false, true], 1).await;
        assert!(result.is_ok());
        assert_eq!(polls, 2);
    }

    #[tokio::test]
    async fn a_poll_error_ends_the_wait() {
        let result = policy(1)
            .until("x", || async { Err::<bool, _>("boom".to_owned()) })
            .await;
        assert_eq!(result.unwrap_err(), "boom");
    }
}
