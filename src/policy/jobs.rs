//! The job table: which of this server's plan steps run, wait or back off.
//! Sans-IO: the plan, this server's record and the time go in; the actions
//! to start now and the job records to publish come out. The loop in
//! `worker.rs` does the I/O.
//!
//! A job is a plan step this server carries out, known by its
//! [`Action::key`]. Its life:
//!
//! ```text
//!   wanted by a plan ──> Waiting (image not complete here, or no free job slot)
//!          │                  │
//!          └──────────────────┴──> Running ──ok──> gone
//!                                    │
//!                                    └──error──> Failed (retry after a back-off)
//!                                                  │
//!                            retry time passed ────┘──> Running or Waiting
//! ```
//!
//! A job the latest plan no longer wants is dropped, unless it is running:
//! a running job is never stopped half-way nor started a second time, and it
//! leaves the table when it ends (a failure stays until the next plan says
//! whether it is still wanted, so its back-off is not lost).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{
    ImageHolding, JobRecord, JobState, ServerRecord, MAX_JOBS_PER_SERVER, MAX_JOB_TEXT_LEN,
};
use crate::placement::{Action, Reason, Step};

/// Exponential back-off between attempts of a failing job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after the `attempts`-th failed attempt: `first`, doubled for
    /// each attempt before it, at most `max`.
    pub fn delay(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(31);
        self.first
            .checked_mul(1 << doublings)
            .map_or(self.max, |delay| delay.min(self.max))
    }
}

/// Why a wanted job is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// A `CreateVms` whose image is not complete on this server yet.
    Image,
    /// Every job slot is taken.
    Slot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Waiting(Wait),
    /// Failed; tried again at `retry_at` (time since the loop started).
    Failed {
        retry_at: Duration,
    },
}

#[derive(Debug, Clone)]
struct Job {
    /// The latest plan's version of the step (a running job keeps the
    /// version it started with in its task).
    action: Action,
    reason: Reason,
    phase: Phase,
    attempts: u32,
    last_error: Option<String>,
    /// Wall-clock Unix ms of the last change of phase or error.
    updated_at_ms: u64,
}

/// The jobs of this server, by key.
#[derive(Debug)]
pub(crate) struct JobTable {
    jobs: BTreeMap<String, Job>,
    backoff: Backoff,
    max_running: usize,
}

impl JobTable {
    pub fn new(backoff: Backoff, max_running: usize) -> Self {
        Self {
            jobs: BTreeMap::new(),
            backoff,
            max_running: max_running.max(1),
        }
    }

    /// Takes the latest plan's steps for this server (`steps`, all with this
    /// server as target) and this server's record as the plan saw it; returns
    /// the actions to start now, each marked running.
    ///
    /// `now` is the time since the loop started (back-off), `now_ms` the wall
    /// clock (what the records show).
    pub fn reconcile(
        &mut self,
        steps: &[Step],
        own: Option<&ServerRecord>,
        now: Duration,
        now_ms: u64,
    ) -> Vec<Action> {
        // Two steps with one key cannot both be carried out; the first wins.
        let mut wanted: BTreeMap<String, &Step> = BTreeMap::new();
        for step in steps {
            wanted.entry(step.action.key()).or_insert(step);
        }
        self.jobs
            .retain(|key, job| wanted.contains_key(key) || job.phase == Phase::Running);
        let mut n_running = self.n_running();
        let mut starts = Vec::new();
        for (key, step) in wanted {
            let job = self.jobs.entry(key).or_insert_with(|| Job {
                action: step.action.clone(),
                reason: step.reason.clone(),
                phase: Phase::Waiting(Wait::Slot),
                attempts: 0,
                last_error: None,
                updated_at_ms: now_ms,
            });
            if job.phase == Phase::Running {
                continue;
            }
            job.action = step.action.clone();
            job.reason = step.reason.clone();
            if matches!(job.phase, Phase::Failed { retry_at } if retry_at > now) {
                continue;
            }
            let next = if !image_ready_for(&job.action, own) {
                Phase::Waiting(Wait::Image)
            } else if n_running >= self.max_running {
                Phase::Waiting(Wait::Slot)
            } else {
                n_running += 1;
                job.attempts = job.attempts.saturating_add(1);
                starts.push(job.action.clone());
                Phase::Running
            };
            if next != job.phase {
                job.phase = next;
                job.updated_at_ms = now_ms;
            }
        }
        starts
    }

    /// A job's task ended. A success removes the job; a failure waits for
    /// its back-off, then the next plan decides whether it runs again.
    pub fn finished(&mut self, key: &str, outcome: Result<(), String>, now: Duration, now_ms: u64) {
        match outcome {
            Ok(()) => {
                self.jobs.remove(key);
            }
            Err(error) => {
                if let Some(job) = self.jobs.get_mut(key) {
                    job.phase = Phase::Failed {
                        retry_at: now + self.backoff.delay(job.attempts),
                    };
                    job.last_error = Some(truncate(&error, MAX_JOB_TEXT_LEN));
                    job.updated_at_ms = now_ms;
                }
            }
        }
    }

    /// The earliest time a failed job may run again.
    pub fn next_retry(&self) -> Option<Duration> {
        self.jobs
            .values()
            .filter_map(|job| match job.phase {
                Phase::Failed { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()
    }

    pub fn n_running(&self) -> usize {
        self.jobs
            .values()
            .filter(|job| job.phase == Phase::Running)
            .count()
    }

    /// The jobs as this server's record shows them: failures first (what an
    /// admin must see), then running, then waiting; at most
    /// [`MAX_JOBS_PER_SERVER`], texts cut to what the record accepts.
    pub fn records(&self) -> Vec<JobRecord> {
        let mut records: Vec<(u8, JobRecord)> = self
            .jobs
            .iter()
            .map(|(key, job)| {
                let (rank, state, note) = match job.phase {
                    Phase::Failed { .. } => (0, JobState::Failed, None),
                    Phase::Running => (1, JobState::Running, None),
                    Phase::Waiting(Wait::Image) => (
                        2,
                        JobState::Waiting,
                        Some("waits until the image is complete here"),
                    ),
                    Phase::Waiting(Wait::Slot) => {
                        (2, JobState::Waiting, Some("waits for a free job slot"))
                    }
                };
                let mut summary = format!("{} ({})", job.action, job.reason);
                if let Some(note) = note {
                    summary.push_str("; ");
                    summary.push_str(note);
                }
                let record = JobRecord {
                    key: truncate(key, MAX_JOB_TEXT_LEN),
                    summary: truncate(&summary, MAX_JOB_TEXT_LEN),
                    state,
                    attempts: job.attempts,
                    last_error: job.last_error.clone(),
                    updated_at_ms: job.updated_at_ms,
                };
                (rank, record)
            })
            .collect();
        // Stable: within a rank, keys stay in the table's (sorted) order.
        records.sort_by_key(|(rank, _)| *rank);
        records
            .into_iter()
            .take(MAX_JOBS_PER_SERVER)
            .map(|(_, record)| record)
            .collect()
    }
}

/// Whether `action` may start as far as images go: a `CreateVms` needs its
/// image complete on this server; everything else needs nothing.
fn image_ready_for(action: &Action, own: Option<&ServerRecord>) -> bool {
    match action {
        Action::CreateVms { image, .. } => own
            .and_then(|record| record.images.get(image))
            .is_some_and(|holding| *holding == ImageHolding::Complete),
        Action::RefreshVm { vm, .. } => own
            .and_then(|record| {
                let image = &record.vms.get(vm)?.image;
                record.images.get(image)
            })
            .is_none_or(|holding| *holding == ImageHolding::Complete),
        Action::PullImage { .. } | Action::DropImage { .. } | Action::RemoveVm { .. } => true,
    }
}

/// `text` cut to at most `max_bytes`, on a character boundary, with `…`
/// marking the cut.
pub(crate) fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    const MARK: &str = "…";
    let mut end = max_bytes.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}

#[cfg(test)]
mod tests {
    // A test that unwraps fails with the value it met: exactly what a test should do.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::model::{ImageVersionId, ServerId, SiteLabel, TemplateName, VmId};

    const SECOND: Duration = Duration::from_secs(1);

    fn backoff() -> Backoff {
        Backoff {
            first: 5 * SECOND,
            max: 60 * SECOND,
        }
    }

    fn own_server() -> ServerId {
        ServerId::from_bytes([1; 16])
    }

    fn image() -> ImageVersionId {
        ImageVersionId::new("base-1").unwrap()
    }

    fn pull() -> Step {
        Step {
            target: own_server(),
            action: Action::PullImage { image: image() },
            reason: Reason::BelowMinReplicas {
                holders: 1,
                need: 2,
            },
        }
    }

    fn create(count: u32) -> Step {
        Step {
            target: own_server(),
            action: Action::CreateVms {
                template: TemplateName::new("office").unwrap(),
                image: image(),
                count,
            },
            reason: Reason::Deficit {
                desired: 5,
                allocated: 5 - count,
            },
        }
    }

    fn remove(n: u8) -> Step {
        Step {
            target: own_server(),
            action: Action::RemoveVm {
                vm: VmId::from_bytes([n; 16]),
                template: TemplateName::new("office").unwrap(),
            },
            reason: Reason::Surplus {
                desired: 0,
                allocated: 9,
            },
        }
    }

    fn record(holding: Option<ImageHolding>) -> ServerRecord {
        let mut record = ServerRecord::new("a".to_owned(), Vec::new(), SiteLabel::default(), 0);
        if let Some(holding) = holding {
            record.images.insert(image(), holding);
        }
        record
    }

    fn states(table: &JobTable) -> Vec<(String, JobState, u32)> {
        table
            .records()
            .into_iter()
            .map(|record| (record.key, record.state, record.attempts))
            .collect()
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let delays: Vec<u64> = (1..=6)
            .map(|attempt| backoff().delay(attempt).as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff().delay(u32::MAX), 60 * SECOND);
        assert_eq!(backoff().delay(0), 5 * SECOND);
    }

    #[test]
    fn a_wanted_step_starts_once_and_is_never_started_twice() {
        let mut table = JobTable::new(backoff(), 8);
        let own = record(None);
        assert_eq!(
            table.reconcile(&[pull()], Some(&own), Duration::ZERO, 10),
            [pull().action]
        );
        for round in 1..5 {
            assert_eq!(
                table.reconcile(&[pull()], Some(&own), round * SECOND, 10),
                [],
                "a running job is not started again"
            );
        }
        // The plan may stop asking while it runs (a pulling server is a
        // holder already): it keeps running, and is shown.
        assert_eq!(table.reconcile(&[], Some(&own), 6 * SECOND, 10), []);
        assert_eq!(
            states(&table),
            [("pull-image:base-1".to_owned(), JobState::Running, 1)]
        );
        table.finished("pull-image:base-1", Ok(()), 7 * SECOND, 11);
        assert_eq!(states(&table), []);
    }

    #[test]
    fn a_failure_backs_off_then_runs_again_while_wanted() {
        let mut table = JobTable::new(backoff(), 8);
        let own = record(None);
        assert_eq!(
            table
                .reconcile(&[pull()], Some(&own), Duration::ZERO, 0)
                .len(),
            1
        );
        table.finished(
            "pull-image:base-1",
            Err("no source".to_owned()),
            SECOND,
            1_000,
        );
        assert_eq!(table.next_retry(), Some(6 * SECOND));
        let shown = table.records();
        assert_eq!(shown[0].state, JobState::Failed);
        assert_eq!(shown[0].attempts, 1);
        assert_eq!(shown[0].last_error.as_deref(), Some("no source"));
        assert_eq!(shown[0].updated_at_ms, 1_000);

        assert_eq!(table.reconcile(&[pull()], Some(&own), 5 * SECOND, 0), []);
        assert_eq!(
            table.reconcile(&[pull()], Some(&own), 6 * SECOND, 0).len(),
            1
        );
        table.finished(
            "pull-image:base-1",
            Err("no source".to_owned()),
            7 * SECOND,
            0,
        );
        assert_eq!(
            table.next_retry(),
            Some(17 * SECOND),
            "the second failure waits twice as long"
        );
        assert_eq!(table.records()[0].attempts, 2);
        assert_eq!(
            table.records()[0].last_error.as_deref(),
            Some("no source"),
            "the error stays shown until the job succeeds"
        );
    }

    #[test]
    fn a_job_the_plan_drops_goes_unless_it_runs() {
        let mut table = JobTable::new(backoff(), 8);
        let own = record(None);
        table.reconcile(&[pull(), remove(1)], Some(&own), Duration::ZERO, 0);
        table.finished(&remove(1).action.key(), Err("busy".to_owned()), SECOND, 0);
        table.reconcile(&[], Some(&own), 2 * SECOND, 0);
        assert_eq!(
            states(&table),
            [("pull-image:base-1".to_owned(), JobState::Running, 1)],
            "the failed job left with the plan; the running one stays"
        );
        // A failure after the plan dropped it stays until the next plan says.
        table.finished("pull-image:base-1", Err("cut".to_owned()), 3 * SECOND, 0);
        assert_eq!(states(&table)[0].1, JobState::Failed);
        table.reconcile(&[], Some(&own), 4 * SECOND, 0);
        assert_eq!(states(&table), []);
        assert_eq!(table.next_retry(), None);
    }

    #[test]
    fn create_vms_waits_until_the_image_is_complete_here() {
        let mut table = JobTable::new(backoff(), 8);
        for holding in [
            None,
            Some(ImageHolding::Partial {
                bytes_done: 1,
                bytes_total: 2,
            }),
        ] {
            let own = record(holding);
            assert_eq!(
                table.reconcile(&[create(3)], Some(&own), Duration::ZERO, 0),
                []
            );
            let shown = table.records();
            assert_eq!(shown[0].state, JobState::Waiting);
            assert!(shown[0]
                .summary
                .contains("waits until the image is complete here"));
            assert_eq!(shown[0].attempts, 0);
        }
        assert_eq!(table.reconcile(&[create(3)], None, Duration::ZERO, 0), []);
        let own = record(Some(ImageHolding::Complete));
        assert_eq!(
            table.reconcile(&[create(2)], Some(&own), SECOND, 0),
            [create(2).action],
            "the latest plan's count is what starts"
        );
    }

    #[test]
    fn running_jobs_are_capped_and_the_rest_wait_for_a_slot() {
        let mut table = JobTable::new(backoff(), 2);
        let own = record(None);
        let steps: Vec<Step> = (1..=4).map(remove).collect();
        assert_eq!(
            table.reconcile(&steps, Some(&own), Duration::ZERO, 0).len(),
            2
        );
        assert_eq!(table.n_running(), 2);
        let waiting: Vec<_> = table
            .records()
            .into_iter()
            .filter(|record| record.state == JobState::Waiting)
            .collect();
        assert_eq!(waiting.len(), 2);
        assert!(waiting[0].summary.ends_with("waits for a free job slot"));
        let first = remove(1).action.key();
        table.finished(&first, Ok(()), SECOND, 0);
        assert_eq!(table.reconcile(&steps[1..], Some(&own), SECOND, 0).len(), 1);
        assert_eq!(table.n_running(), 2);
    }

    #[test]
    fn records_put_failures_first_and_respect_the_limits() {
        let mut table = JobTable::new(backoff(), usize::MAX);
        let own = record(None);
        let steps: Vec<Step> = (0..=255u8).map(remove).chain([pull(), create(1)]).collect();
        table.reconcile(&steps, Some(&own), Duration::ZERO, 0);
        table.finished("pull-image:base-1", Err("x".repeat(5_000)), SECOND, 0);
        let shown = table.records();
        assert_eq!(shown.len(), MAX_JOBS_PER_SERVER);
        assert_eq!(shown[0].key, "pull-image:base-1");
        assert_eq!(shown[0].state, JobState::Failed);
        let error = shown[0].last_error.as_deref().unwrap();
        assert!(error.len() <= MAX_JOB_TEXT_LEN && error.ends_with('…'));
        assert!(shown[1..].iter().all(|job| job.state != JobState::Failed));
    }

    #[test]
    fn records_pass_the_models_validation() {
        let mut table = JobTable::new(backoff(), 8);
        let mut own = record(None);
        table.reconcile(&[pull()], Some(&own), Duration::ZERO, 0);
        table.finished("pull-image:base-1", Err("é".repeat(2_000)), SECOND, 0);
        own.jobs = table.records();
        assert_eq!(own.validate(), Ok(()));
        // One byte more than the limit is refused: the two limits agree.
        own.jobs[0].last_error = Some("x".repeat(MAX_JOB_TEXT_LEN + 1));
        assert!(own.validate().is_err());
    }

    #[test]
    fn truncate_cuts_on_a_character_boundary() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("abcdefghij", 10), "abcdefghij");
        assert_eq!(truncate("abcdefghijk", 10), "abcdefg…");
        let cut = truncate(&"é".repeat(10), 10);
        assert!(cut.len() <= 10, "{cut}");
        assert_eq!(cut, "ééé…");
    }
}
