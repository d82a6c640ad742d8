//! Building a fleet: each recipe after the one it is built on, independent recipes at once (at
//! most `jobs`), and a failure stopping only the recipes built on the failed one.
//!
//! The scheduler decides order and concurrency only; what "build member `i`" means is the
//! caller's closure (the CLI runs `bake build` for it), so the policy is tested on its own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What happened to one member.
#[derive(Debug)]
pub enum Outcome<T, E> {
    /// Built by this run.
    Built { result: T, took: Duration },
    /// Already built: nothing ran.
    Cached { result: T },
    /// Its build failed (or it could not be planned).
    Failed { error: E, took: Duration },
    /// Not built, because the member it is built on (directly or further up) failed.
    Skipped { failed: usize },
    /// Not started, because the run was interrupted.
    NotStarted,
}

impl<T, E> Outcome<T, E> {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Built { .. } | Outcome::Cached { .. })
    }
}

/// Runs `build` for every member whose outcome is not decided yet (`decided[i]` is `None`),
/// after its parent succeeded, at most `jobs` at once. Members whose parent failed are
/// skipped; once `cancel` is set nothing new starts (running builds are the closure's to
/// stop). `parents[i]` is member `i`'s parent; one outcome per member comes back.
pub fn run<T, E, F>(
    parents: &[Option<usize>],
    mut decided: Vec<Option<Outcome<T, E>>>,
    jobs: usize,
    cancel: &AtomicBool,
    build: F,
) -> Vec<Outcome<T, E>>
where
    T: Send,
    E: Send,
    F: Fn(usize) -> Result<T, E> + Sync,
{
    assert_eq!(parents.len(), decided.len(), "one decision slot per member");
    let jobs = jobs.max(1);
    let mut started = vec![false; parents.len()];
    let build = &build;
    std::thread::scope(|scope| {
        let (sender, finished) = mpsc::channel();
        let mut running = 0usize;
        loop {
            skip_below_failures(parents, &mut decided);
            if !cancel.load(Ordering::SeqCst) {
                for i in 0..parents.len() {
                    if running == jobs {
                        break;
                    }
                    let parent_ok = parents[i]
                        .is_none_or(|p| decided[p].as_ref().is_some_and(Outcome::is_success));
                    if decided[i].is_none() && !started[i] && parent_ok {
                        started[i] = true;
                        running += 1;
                        let sender = sender.clone();
                        scope.spawn(move || {
                            let clock = Instant::now();
                            let result = build(i);
                            // The receiver outlives every builder.
                            let _ = sender.send((i, result, clock.elapsed()));
                        });
                    }
                }
            }
            if running == 0 {
                break;
            }
            let (i, result, took) = finished.recv().expect("a builder is running");
            running -= 1;
            decided[i] = Some(match result {
                Ok(result) => Outcome::Built { result, took },
                Err(error) => Outcome::Failed { error, took },
            });
        }
    });
    decided
        .into_iter()
        .map(|d| d.unwrap_or(Outcome::NotStarted))
        .collect()
}

/// Marks every undecided member below a failed (or skipped) one as skipped, naming the member
/// that failed.
fn skip_below_failures<T, E>(parents: &[Option<usize>], decided: &mut [Option<Outcome<T, E>>]) {
    let mut changed = true;
    while changed {
        changed = false;
        for i in 0..parents.len() {
            let Some(p) = parents[i] else { continue };
            if decided[i].is_some() {
                continue;
            }
            let failed = match &decided[p] {
                Some(Outcome::Failed { .. }) => p,
                Some(Outcome::Skipped { failed }) => *failed,
                _ => continue,
            };
            decided[i] = Some(Outcome::Skipped { failed });
            changed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn names<T, E>(outcomes: &[Outcome<T, E>]) -> Vec<&'static str> {
        outcomes
            .iter()
            .map(|o| match o {
                Outcome::Built { .. } => "built",
                Outcome::Cached { .. } => "cached",
                Outcome::Failed { .. } => "failed",
                Outcome::Skipped { .. } => "skipped",
                Outcome::NotStarted => "not started",
            })
            .collect()
    }

    #[test]
    fn parents_build_before_children_and_cached_members_do_not_run() {
        // 0 ← 1 ← 2, 0 ← 3; 1 is already built.
        let parents = [None, Some(0), Some(1), Some(0)];
        let decided = vec![None, Some(Outcome::Cached { result: 1 }), None, None];
        let order = Mutex::new(Vec::new());
        let outcomes = run(&parents, decided, 1, &AtomicBool::new(false), |i| {
            order.lock().unwrap().push(i);
            Ok::<usize, ()>(i)
        });
        assert_eq!(names(&outcomes), ["built", "cached", "built", "built"]);
        let order = order.into_inner().unwrap();
        assert_eq!(order[0], 0, "the root first: {order:?}");
        assert!(!order.contains(&1), "a cached member ran: {order:?}");
    }

    #[test]
    fn a_failure_stops_its_descendants_and_not_its_siblings() {
        // 0 ← 1 ← 2, 0 ← 3, and 4 on its own; 1 fails.
        let parents = [None, Some(0), Some(1), Some(0), None];
        let decided = (0..5).map(|_| None).collect();
        let outcomes = run(&parents, decided, 2, &AtomicBool::new(false), |i| {
            if i == 1 { Err("boom") } else { Ok(i) }
        });
        assert_eq!(
            names(&outcomes),
            ["built", "failed", "skipped", "built", "built"]
        );
        assert!(matches!(outcomes[2], Outcome::Skipped { failed: 1 }));
    }

    #[test]
    fn independent_members_run_at_the_same_time() {
        // Two siblings that each wait for the other: one at a time, this never ends.
        let parents = [None, Some(0), Some(0)];
        let decided = (0..3).map(|_| None).collect();
        let arrived = Mutex::new([false; 3]);
        let outcomes = run(&parents, decided, 2, &AtomicBool::new(false), |i| {
            arrived.lock().unwrap()[i] = true;
            if i == 0 {
                return Ok(());
            }
            let other = 3 - i;
            let clock = Instant::now();
            while !arrived.lock().unwrap()[other] {
                if clock.elapsed() > Duration::from_secs(10) {
                    return Err("the sibling never started");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        assert_eq!(names(&outcomes), ["built", "built", "built"]);
    }

    #[test]
    fn no_more_than_jobs_run_at_once() {
        let parents = [None; 6];
        let decided = (0..6).map(|_| None).collect();
        let now = Mutex::new((0usize, 0usize)); // (running, most seen)
        run(&parents, decided, 3, &AtomicBool::new(false), |_| {
            {
                let mut n = now.lock().unwrap();
                n.0 += 1;
                n.1 = n.1.max(n.0);
            }
            std::thread::sleep(Duration::from_millis(30));
            now.lock().unwrap().0 -= 1;
            Ok::<(), ()>(())
        });
        assert_eq!(now.into_inner().unwrap().1, 3);
    }

    #[test]
    fn after_cancel_nothing_new_starts() {
        let parents = [None, Some(0), None];
        let decided = (0..3).map(|_| None).collect();
        let cancel = AtomicBool::new(false);
        let outcomes = run(&parents, decided, 1, &cancel, |i| {
            cancel.store(true, Ordering::SeqCst);
            Ok::<usize, ()>(i)
        });
        assert_eq!(names(&outcomes), ["built", "not started", "not started"]);
    }
}
