//! Which chunk each source fetches next: the pull's scheduler, sans I/O.
//!
//! Every source has a fixed number of slots (streams). A slot takes the
//! lowest missing chunk nobody is fetching; when its chunk is written *and*
//! the progress file that records it is on disk, the slot takes the next
//! one. A fast source frees its slots sooner and so serves more chunks:
//! the work moves to where it goes fastest without measuring anything.
//! Holding a slot until the chunk is recorded bounds what a crash can cost:
//! at most one chunk per slot is written but not recorded.
//!
//! Sources that are pulling the version themselves (swarming) hold only
//! some chunks: a source is given only chunks it has
//! ([`ChunkSchedule::set_available`]). Chunks are taken in order from a
//! start that differs between pullers ([`ChunkSchedule::with_start`]), so
//! pullers that start together fetch different chunks first and have
//! something to give each other; and a complete holder is given first the
//! chunks no partial source has, so the first holder's upload goes to what
//! only it can give.
//!
//! A chunk that fails (bad bytes, or the source did not answer) goes back
//! to the missing ones and is given to another source first; the source
//! that failed it only takes it again when no other live source could. A
//! source is dropped for the rest of the pull after
//! [`ScheduleLimits::max_bad_chunks`] bad chunks, or after
//! [`ScheduleLimits::max_errors_in_a_row`] failed requests in a row.

use std::collections::{BTreeMap, BTreeSet};

use super::progress::ChunkBitmap;

/// What made a chunk fail at a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The source answered with bytes no honest holder sends: a chunk that
    /// fails verification, the wrong chunk, undecodable data.
    Bad,
    /// The source did not answer (refused, unreachable, too slow).
    Unavailable,
}

/// When a source is given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleLimits {
    /// Slots (requests in flight) per source.
    pub streams_per_source: u32,
    /// Bad chunks after which a source is dropped.
    pub max_bad_chunks: u32,
    /// Failed requests in a row after which a source is dropped.
    pub max_errors_in_a_row: u32,
}

/// What one source did in this pull.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceTally {
    /// Slots taken: chunks being fetched, or written and not yet recorded.
    pub busy_slots: u32,
    /// Chunks it delivered (verified and written).
    pub chunks: u64,
    pub bad_chunks: u32,
    pub errors: u32,
    pub errors_in_a_row: u32,
    pub dropped: bool,
}

/// The chunks still to fetch and who fetches what.
#[derive(Debug, Clone)]
pub struct ChunkSchedule {
    limits: ScheduleLimits,
    /// Missing and not being fetched, lowest first.
    waiting: BTreeSet<u64>,
    /// Being fetched, by which source.
    fetching: BTreeMap<u64, usize>,
    /// Sources that failed a chunk: it goes to others first.
    failed_at: BTreeMap<u64, BTreeSet<usize>>,
    sources: Vec<SourceTally>,
    /// Per source, the chunks it has; `None`: every chunk.
    available: Vec<Option<ChunkBitmap>>,
    /// Chunks are taken in order from here, wrapping round.
    start: u64,
    n_delivered: u64,
}

impl ChunkSchedule {
    /// A schedule for the `missing` chunks from `n_sources` sources.
    pub fn new(
        missing: impl IntoIterator<Item = u64>,
        n_sources: usize,
        limits: ScheduleLimits,
    ) -> Self {
        Self {
            limits: ScheduleLimits {
                streams_per_source: limits.streams_per_source.max(1),
                max_bad_chunks: limits.max_bad_chunks.max(1),
                max_errors_in_a_row: limits.max_errors_in_a_row.max(1),
            },
            waiting: missing.into_iter().collect(),
            fetching: BTreeMap::new(),
            failed_at: BTreeMap::new(),
            sources: vec![SourceTally::default(); n_sources],
            available: vec![None; n_sources],
            start: 0,
            n_delivered: 0,
        }
    }

    /// Chunks are taken in order from `start` on, wrapping round.
    #[must_use]
    pub fn with_start(mut self, start: u64) -> Self {
        self.start = start;
        self
    }

    /// A source joins the pull, holding the chunks in `available` (`None`:
    /// every chunk); returns its index.
    pub fn add_source(&mut self, available: Option<ChunkBitmap>) -> usize {
        self.sources.push(SourceTally::default());
        self.available.push(available);
        self.sources.len() - 1
    }

    /// What `source` holds now (`None`: every chunk).
    pub fn set_available(&mut self, source: usize, available: Option<ChunkBitmap>) {
        if let Some(slot) = self.available.get_mut(source) {
            *slot = available;
        }
    }

    /// Whether `source` holds only some chunks (it is pulling too).
    pub fn is_partial(&self, source: usize) -> bool {
        self.available.get(source).is_some_and(Option::is_some)
    }

    fn has(&self, source: usize, chunk: u64) -> bool {
        match self.available.get(source) {
            Some(None) => true,
            Some(Some(bitmap)) => bitmap.get(chunk),
            None => false,
        }
    }

    fn live(&self, source: usize) -> bool {
        self.sources.get(source).is_some_and(|tally| !tally.dropped)
    }

    /// The waiting chunks in the order they are taken.
    fn in_order(&self) -> impl Iterator<Item = u64> + '_ {
        self.waiting
            .range(self.start..)
            .chain(self.waiting.range(..self.start))
            .copied()
    }

    /// Some chunk is waiting that a live partial source may come to hold:
    /// worth waiting for when nothing else is in flight.
    pub fn partial_sources_live(&self) -> bool {
        (0..self.sources.len()).any(|source| self.live(source) && self.is_partial(source))
    }

    /// The chunk `source` should fetch now, if it has a free slot and there
    /// is one for it; the chunk counts as being fetched from then on.
    pub fn next_for(&mut self, source: usize) -> Option<u64> {
        let tally = self.sources.get(source)?;
        if tally.dropped || tally.busy_slots >= self.limits.streams_per_source {
            return None;
        }
        let can = |index: &u64| {
            self.has(source, *index)
                && self
                    .failed_at
                    .get(index)
                    .is_none_or(|failed| !failed.contains(&source))
        };
        // A complete holder first takes what no live partial source has.
        let partials: Vec<usize> = (0..self.sources.len())
            .filter(|other| *other != source && self.live(*other) && self.is_partial(*other))
            .collect();
        let rare = (!self.is_partial(source) && !partials.is_empty())
            .then(|| {
                self.in_order().find(|index| {
                    can(index) && !partials.iter().any(|other| self.has(*other, *index))
                })
            })
            .flatten();
        let untried = rare.or_else(|| self.in_order().find(can));
        // A chunk this source failed, when every other live source that
        // holds it failed it too: retrying here is the only way left.
        let chunk = untried.or_else(|| {
            self.in_order().find(|index| {
                let failed = self.failed_at.get(index);
                self.has(source, *index)
                    && self.sources.iter().enumerate().all(|(other, tally)| {
                        other == source
                            || tally.dropped
                            || !self.has(other, *index)
                            || failed.is_some_and(|failed| failed.contains(&other))
                    })
            })
        })?;
        self.waiting.remove(&chunk);
        self.fetching.insert(chunk, source);
        self.sources[source].busy_slots += 1;
        Some(chunk)
    }

    /// `chunk` from `source` was verified and written. Its slot stays taken
    /// until [`Self::recorded`].
    pub fn delivered(&mut self, source: usize, chunk: u64) {
        if self.fetching.remove(&chunk).is_none() {
            return;
        }
        self.failed_at.remove(&chunk);
        self.n_delivered += 1;
        if let Some(tally) = self.sources.get_mut(source) {
            tally.chunks += 1;
            tally.errors_in_a_row = 0;
        }
    }

    /// A chunk `source` delivered is recorded on disk: its slot is free.
    pub fn recorded(&mut self, source: usize) {
        if let Some(tally) = self.sources.get_mut(source) {
            tally.busy_slots = tally.busy_slots.saturating_sub(1);
        }
    }

    /// `chunk` failed at `source`: it waits for another source. Returns
    /// true when this failure dropped the source.
    pub fn failed(&mut self, source: usize, chunk: u64, fault: Fault) -> bool {
        if self.fetching.remove(&chunk).is_some() {
            self.waiting.insert(chunk);
            self.failed_at.entry(chunk).or_default().insert(source);
        }
        let limits = self.limits;
        let Some(tally) = self.sources.get_mut(source) else {
            return false;
        };
        tally.busy_slots = tally.busy_slots.saturating_sub(1);
        match fault {
            Fault::Bad => tally.bad_chunks += 1,
            Fault::Unavailable => {
                tally.errors += 1;
                tally.errors_in_a_row += 1;
            }
        }
        let drop = !tally.dropped
            && (tally.bad_chunks >= limits.max_bad_chunks
                || tally.errors_in_a_row >= limits.max_errors_in_a_row);
        if drop {
            tally.dropped = true;
        }
        drop
    }

    /// Every chunk delivered.
    pub fn is_complete(&self) -> bool {
        self.waiting.is_empty() && self.fetching.is_empty()
    }

    /// Chunks are missing and no source is left to fetch them.
    pub fn is_stuck(&self) -> bool {
        !self.waiting.is_empty() && self.sources.iter().all(|tally| tally.dropped)
    }

    /// Chunks not delivered yet (waiting or being fetched).
    pub fn n_missing(&self) -> u64 {
        (self.waiting.len() + self.fetching.len()) as u64
    }

    pub fn n_delivered(&self) -> u64 {
        self.n_delivered
    }

    pub fn tally(&self, source: usize) -> Option<&SourceTally> {
        self.sources.get(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ScheduleLimits = ScheduleLimits {
        streams_per_source: 2,
        max_bad_chunks: 2,
        max_errors_in_a_row: 3,
    };

    #[test]
    fn slots_take_the_lowest_missing_chunks_and_free_up_when_recorded() {
        let mut schedule = ChunkSchedule::new([3, 5, 8, 9, 12], 2, LIMITS);
        assert_eq!(schedule.next_for(0), Some(3));
        assert_eq!(schedule.next_for(0), Some(5));
        assert_eq!(schedule.next_for(0), None, "two slots per source");
        assert_eq!(schedule.next_for(1), Some(8));
        schedule.delivered(0, 3);
        assert_eq!(schedule.next_for(0), None, "delivered, not yet recorded");
        schedule.recorded(0);
        assert_eq!(schedule.next_for(0), Some(9));
        assert_eq!(schedule.next_for(7), None, "no such source");
        assert_eq!(schedule.n_missing(), 4);
        assert!(!schedule.is_complete());
    }

    fn bitmap(len: u64, set: &[u64]) -> ChunkBitmap {
        let mut bitmap = ChunkBitmap::new(len);
        for index in set {
            bitmap.set(*index);
        }
        bitmap
    }

    #[test]
    fn a_partial_source_gets_only_what_it_has_and_the_complete_one_what_nobody_else_has() {
        // Source 0 holds everything; source 1 is pulling and has 0, 1, 2.
        let limits = ScheduleLimits {
            streams_per_source: 8,
            ..LIMITS
        };
        let mut schedule = ChunkSchedule::new(0..6, 2, limits);
        schedule.set_available(1, Some(bitmap(6, &[0, 1, 2])));
        assert!(schedule.is_partial(1) && !schedule.is_partial(0));
        assert!(schedule.partial_sources_live());
        // The complete holder takes first what only it has: 3, 4, 5.
        assert_eq!(schedule.next_for(0), Some(3));
        assert_eq!(schedule.next_for(1), Some(0));
        assert_eq!(schedule.next_for(0), Some(4));
        assert_eq!(schedule.next_for(0), Some(5));
        // Then what the partial one has too, in order (work stealing).
        assert_eq!(schedule.next_for(0), Some(1));
        assert_eq!(schedule.next_for(1), Some(2));
        assert_eq!(schedule.next_for(1), None, "it has nothing else");
        assert_eq!(schedule.next_for(0), None, "all taken");

        // A source that has not said what it has gets nothing.
        let mut schedule = ChunkSchedule::new(0..4, 1, limits);
        schedule.set_available(0, Some(ChunkBitmap::new(4)));
        assert_eq!(schedule.next_for(0), None);
        schedule.set_available(0, None);
        assert_eq!(schedule.next_for(0), Some(0));
    }

    #[test]
    fn pullers_start_at_their_own_chunk_and_wrap_round() {
        let limits = ScheduleLimits {
            streams_per_source: 8,
            ..LIMITS
        };
        let mut schedule = ChunkSchedule::new(0..5, 1, limits).with_start(3);
        let order: Vec<u64> = std::iter::from_fn(|| schedule.next_for(0)).collect();
        assert_eq!(order, vec![3, 4, 0, 1, 2]);
    }

    #[test]
    fn a_source_added_during_the_pull_takes_work() {
        let mut schedule = ChunkSchedule::new(0..4, 1, LIMITS);
        assert_eq!(schedule.next_for(0), Some(0));
        assert_eq!(schedule.next_for(0), Some(1));
        let added = schedule.add_source(Some(bitmap(4, &[3])));
        assert_eq!(added, 1);
        assert_eq!(schedule.next_for(1), Some(3));
        assert_eq!(schedule.next_for(1), None);
        // A chunk failed at the only source that has it is retried there.
        assert!(!schedule.failed(1, 3, Fault::Unavailable));
        schedule.set_available(0, Some(bitmap(4, &[0, 1])));
        assert_eq!(schedule.next_for(1), Some(3), "nobody else holds it");
    }

    #[test]
    fn the_faster_source_serves_more() {
        // Source 0 finishes a chunk every tick, source 1 every third tick.
        let mut schedule = ChunkSchedule::new(0..60, 2, LIMITS);
        let mut in_flight: Vec<(usize, u64, u32)> = Vec::new();
        let mut tick = 0u32;
        while !schedule.is_complete() {
            for source in 0..2 {
                while let Some(chunk) = schedule.next_for(source) {
                    let takes = if source == 0 { 1 } else { 3 };
                    in_flight.push((source, chunk, tick + takes));
                }
            }
            tick += 1;
            let (done, rest): (Vec<_>, Vec<_>) =
                in_flight.into_iter().partition(|(_, _, at)| *at <= tick);
            in_flight = rest;
            for (source, chunk, _) in done {
                schedule.delivered(source, chunk);
                schedule.recorded(source);
            }
        }
        let (fast, slow) = (schedule.tally(0).unwrap(), schedule.tally(1).unwrap());
        assert_eq!(fast.chunks + slow.chunks, 60);
        assert!(fast.chunks >= 2 * slow.chunks, "{fast:?} {slow:?}");
        assert!(slow.chunks > 0);
    }

    #[test]
    fn a_failed_chunk_goes_to_another_source_first() {
        let mut schedule = ChunkSchedule::new([1, 2], 2, LIMITS);
        assert_eq!(schedule.next_for(0), Some(1));
        assert!(!schedule.failed(0, 1, Fault::Bad));
        // Source 0 moves on to chunk 2; chunk 1 waits for source 1.
        assert_eq!(schedule.next_for(0), Some(2));
        assert_eq!(schedule.next_for(0), None);
        assert_eq!(schedule.next_for(1), Some(1));
        schedule.delivered(1, 1);
        schedule.delivered(0, 2);
        assert!(schedule.is_complete());
        assert_eq!(schedule.tally(0).unwrap().bad_chunks, 1);
        assert_eq!(schedule.n_delivered(), 2);
    }

    #[test]
    fn the_only_source_left_retries_what_it_failed() {
        let mut schedule = ChunkSchedule::new([4], 2, LIMITS);
        assert_eq!(schedule.next_for(1), Some(4));
        assert!(!schedule.failed(1, 4, Fault::Unavailable));
        assert_eq!(schedule.next_for(1), None, "source 0 may still take it");
        assert_eq!(schedule.next_for(0), Some(4));
        assert!(!schedule.failed(0, 4, Fault::Unavailable));
        // Both failed it: either may try again.
        assert_eq!(schedule.next_for(1), Some(4));
    }

    #[test]
    fn sources_are_dropped_after_bad_chunks_or_errors_in_a_row() {
        let mut schedule = ChunkSchedule::new(0..10, 2, LIMITS);
        let chunk = schedule.next_for(0).unwrap();
        assert!(!schedule.failed(0, chunk, Fault::Bad));
        let chunk = schedule.next_for(0).unwrap();
        assert!(schedule.failed(0, chunk, Fault::Bad), "second bad chunk");
        assert!(schedule.tally(0).unwrap().dropped);
        assert_eq!(schedule.next_for(0), None);
        assert!(!schedule.is_stuck(), "source 1 is left");

        // Errors count in a row: a delivery resets the run.
        for _ in 0..2 {
            let chunk = schedule.next_for(1).unwrap();
            assert!(!schedule.failed(1, chunk, Fault::Unavailable));
        }
        let chunk = schedule.next_for(1).unwrap();
        schedule.delivered(1, chunk);
        schedule.recorded(1);
        for attempt in 1..=3 {
            let chunk = schedule.next_for(1).unwrap();
            assert_eq!(schedule.failed(1, chunk, Fault::Unavailable), attempt == 3);
        }
        assert!(schedule.is_stuck());
        assert_eq!(schedule.n_missing(), 9);
        assert_eq!(schedule.tally(1).unwrap().errors, 5);
    }
}
