//! Waiting is a value: how often to poll, how many times, and how many successes in a row
//! count as done (EC2 is eventually consistent: one `available` can be followed by a
//! `pending` from another replica).

use std::future::Future;
use std::time::Duration;

/// How to poll for a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    pub interval: Duration,
    pub max_attempts: u32,
    /// Successes in a row before the state counts as reached.
    pub consecutive_successes: u32,
}

impl WaitPolicy {
    /// Snapshots: EBS takes seconds to minutes to seal a snapshot after CompleteSnapshot.
    pub const SNAPSHOT: WaitPolicy = WaitPolicy {
        interval: Duration::from_secs(5),
        // 60 minutes: large sparse snapshots can take long to seal.
        max_attempts: 720,
        consecutive_successes: 1,
    };

    /// Images: registration and copies (a cross-region copy of an 8 GiB image takes 5 to 30
    /// minutes; AWS's own waiter gives up after 40).
    pub const IMAGE: WaitPolicy = WaitPolicy {
        interval: Duration::from_secs(15),
        // 90 minutes, then give up: a copy stuck that long needs a person.
        max_attempts: 360,
        consecutive_successes: 3,
    };

    /// For emulators and tests: poll fast.
    pub const fn fast() -> WaitPolicy {
        WaitPolicy {
            interval: Duration::from_millis(20),
            max_attempts: 200,
            consecutive_successes: 1,
        }
    }
}

/// One poll's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    Ready,
    Pending(String),
    /// The resource reached a state it will not leave (e.g. `failed`, `error`).
    Failed(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WaitError {
    #[error("{what} is {state}")]
    Failed { what: String, state: String },
    #[error("gave up waiting for {what} after {attempts} polls (last state: {state})")]
    TimedOut {
        what: String,
        attempts: u32,
        state: String,
    },
    #[error("failed to poll {what}: {message}")]
    Poll { what: String, message: String },
}

/// Polls `check` until it reports ready `policy.consecutive_successes` times in a row.
pub async fn wait_for<F, Fut>(policy: WaitPolicy, what: &str, mut check: F) -> Result<(), WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Poll, String>>,
{
    let mut successes = 0;
    let mut state = String::from("unknown");
    for attempt in 1..=policy.max_attempts {
        match check().await {
            Ok(Poll::Ready) => {
                successes += 1;
                if successes >= policy.consecutive_successes {
                    return Ok(());
                }
                state = "ready".into();
            }
            Ok(Poll::Pending(s)) => {
                successes = 0;
                state = s;
            }
            Ok(Poll::Failed(s)) => {
                return Err(WaitError::Failed {
                    what: what.to_owned(),
                    state: s,
                });
            }
            Err(message) => {
                return Err(WaitError::Poll {
                    what: what.to_owned(),
                    message,
                });
            }
        }
        if attempt < policy.max_attempts {
            tokio::time::sleep(policy.interval).await;
        }
    }
    Err(WaitError::TimedOut {
        what: what.to_owned(),
        attempts: policy.max_attempts,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn policy(successes: u32, attempts: u32) -> WaitPolicy {
        WaitPolicy {
            interval: Duration::from_millis(1),
            max_attempts: attempts,
            consecutive_successes: successes,
        }
    }

    #[tokio::test]
    async fn needs_consecutive_successes() {
        // ready, pending, ready, ready: with 2 in a row needed, done at the 4th poll.
        let answers = Mutex::new(vec![
            Poll::Ready,
            Poll::Ready,
            Poll::Pending("p".into()),
            Poll::Ready,
        ]);
        let polls = Mutex::new(0);
        wait_for(policy(2, 10), "x", || {
            *polls.lock().unwrap() += 1;
            let next = answers.lock().unwrap().pop().unwrap_or(Poll::Ready);
            async move { Ok(next) }
        })
        .await
        .unwrap();
        assert_eq!(*polls.lock().unwrap(), 4);
    }

    #[tokio::test]
    async fn fails_and_times_out() {
        let failed = wait_for(policy(1, 5), "ami-1", || async {
            Ok(Poll::Failed("failed".into()))
        })
        .await;
        assert!(matches!(failed, Err(WaitError::Failed { .. })));
        let timed_out = wait_for(policy(1, 3), "ami-1", || async {
            Ok(Poll::Pending("pending".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(
            timed_out.to_string(),
            "gave up waiting for ami-1 after 3 polls (last state: pending)"
        );
    }
}
