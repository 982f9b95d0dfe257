//! Prefetch across files: the order in which a directory's files are opened.
//!
//! A data loader reads a directory's files in the order it lists them (the
//! bucket's name order), one after another or spread over a few worker
//! processes. When a directory is listed, [`DirOrder`] keeps its files in
//! listing order; every open of one of them is reported to
//! [`DirOrder::opened`], which answers with the files to fetch ahead now.
//!
//! Opens are matched to *runs* (up to [`MAX_RUNS`] per directory, so that
//! workers each reading their own contiguous part of the listing are
//! followed separately). An open continues a run when it lands at most
//! [`FORWARD_SLACK`] files past the furthest file of that run, and no more
//! than the window behind it (workers sharing the listing open files slightly
//! out of order); only opens past the furthest file step the run forward. An
//! open that continues no run starts a new one (replacing the least recently
//! used). After [`START_RUN`] steps in a run, the next
//! `window` files past its furthest one are fetched ahead, each once; a run
//! that nothing continues fetches nothing more. Random file order
//! therefore fetches nothing extra (a chance run of four in-order opens is
//! rare: random opens over a directory of 100 files fetch about 1% ahead, a
//! shuffled pass over it about 8%, files it then reads anyway), and the files
//! fetched ahead stay within `window` of the reader.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::gcs::ObjectId;
use crate::sync::lock;

/// Opens that step a run forward (its first included) before the files ahead
/// are fetched.
pub const START_RUN: u32 = 4;
/// How far past the furthest file opened an open may land and still be in order.
pub const FORWARD_SLACK: usize = 2;
/// Runs followed at once in one directory.
pub const MAX_RUNS: usize = 8;
/// Opens of the directory after which a run's next step no longer counts as
/// continuing it.
pub const STALE: u64 = 2 * MAX_RUNS as u64;

/// A file of a listed directory: inode, object version, size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedFile {
    pub ino: u64,
    pub object: ObjectId,
    pub size: u64,
    pub finalized: bool,
}

#[derive(Debug)]
struct Run {
    /// The furthest file (index in listing order) opened in this run.
    furthest: usize,
    /// Opens that stepped this run forward.
    opens: u32,
    /// Files before this index were already fetched ahead (or passed).
    ahead_to: usize,
    /// When this run was last continued (an open counter).
    used: u64,
}

#[derive(Debug, Default)]
struct State {
    runs: Vec<Run>,
    clock: u64,
}

/// One directory's files in listing order and how they are being opened.
#[derive(Debug)]
pub struct DirOrder {
    files: Vec<ListedFile>,
    index: HashMap<u64, usize>,
    state: Mutex<State>,
}

impl DirOrder {
    pub fn new(files: Vec<ListedFile>) -> DirOrder {
        let index = files.iter().enumerate().map(|(i, f)| (f.ino, i)).collect();
        DirOrder {
            files,
            index,
            state: Mutex::new(State::default()),
        }
    }

    /// Records that file `ino` was opened; returns the files to fetch ahead
    /// now (at most `window` past the furthest file opened, each only once).
    pub fn opened(&self, ino: u64, window: usize) -> Vec<ListedFile> {
        let Some(&idx) = self.index.get(&ino) else {
            return Vec::new();
        };
        let mut st = lock(&self.state);
        st.clock += 1;
        let now = st.clock;
        let found = st
            .runs
            .iter()
            .position(|r| idx <= r.furthest + FORWARD_SLACK && idx + window >= r.furthest);
        let run = match found {
            Some(i) => {
                // Only a step forward counts and keeps the run alive (a file
                // behind the furthest one is a worker catching up), and a
                // step long after the run's last one starts the count again:
                // a real reader steps its run every few opens, a random one
                // only by chance, and rarely several times in a row.
                let r = &mut st.runs[i];
                if idx > r.furthest {
                    r.opens = if now - r.used > STALE { 1 } else { r.opens + 1 };
                    r.furthest = idx;
                    r.used = now;
                }
                r
            }
            None => {
                if st.runs.len() >= MAX_RUNS {
                    if let Some(lru) = (0..st.runs.len()).min_by_key(|&i| st.runs[i].used) {
                        st.runs.swap_remove(lru);
                    }
                }
                st.runs.push(Run {
                    furthest: idx,
                    opens: 1,
                    ahead_to: idx + 1,
                    used: now,
                });
                let last = st.runs.len() - 1;
                &mut st.runs[last]
            }
        };
        if window == 0 || run.opens < START_RUN {
            return Vec::new();
        }
        let from = run.ahead_to.max(run.furthest + 1).min(self.files.len());
        let to = (run.furthest + 1 + window).min(self.files.len());
        if from >= to {
            return Vec::new();
        }
        run.ahead_to = to;
        self.files[from..to].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(n: usize) -> DirOrder {
        DirOrder::new(
            (0..n)
                .map(|i| ListedFile {
                    ino: 100 + i as u64,
                    object: ObjectId {
                        name: format!("d/f{i:03}"),
                        generation: 1,
                    },
                    size: 1000,
                    finalized: true,
                })
                .collect(),
        )
    }

    fn inos(v: &[ListedFile]) -> Vec<u64> {
        v.iter().map(|f| f.ino).collect()
    }

    #[test]
    fn a_reader_in_listing_order_gets_the_next_files_ahead() {
        let d = dir(40);
        for i in 0..3 {
            assert!(d.opened(100 + i, 8).is_empty(), "no run yet at {i}");
        }
        assert_eq!(inos(&d.opened(103, 8)), (104..112).collect::<Vec<_>>());
        // Each next open tops the window up by one file, never twice.
        assert_eq!(inos(&d.opened(104, 8)), vec![112]);
        assert_eq!(inos(&d.opened(105, 8)), vec![113]);
        // The end of the directory bounds it.
        for i in 6..40 {
            for f in d.opened(100 + i, 8) {
                assert!(f.ino < 140 && f.ino > 100 + i);
            }
        }
    }

    #[test]
    fn interleaved_workers_still_count_as_in_order() {
        let d = dir(200);
        // Eight workers taking files k, k+8, ...: opens arrive roughly in order.
        let order = [0, 2, 1, 3, 5, 4, 7, 6, 8, 10, 9, 11];
        let mut fetched = Vec::new();
        for i in order {
            fetched.extend(inos(&d.opened(100 + i, 16)));
        }
        assert!(!fetched.is_empty());
        let mut sorted = fetched.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), fetched.len(), "each file fetched once");
        assert!(fetched.iter().all(|i| *i > 100 + 3 && *i <= 100 + 11 + 16));
    }

    #[test]
    fn workers_on_contiguous_parts_are_followed_separately() {
        let d = dir(100);
        let mut fetched = Vec::new();
        // Two workers: files 0.. and 50.., alternating opens.
        for k in 0..6 {
            fetched.extend(inos(&d.opened(100 + k, 4)));
            fetched.extend(inos(&d.opened(150 + k, 4)));
        }
        assert!(
            fetched.contains(&104) && fetched.contains(&154),
            "{fetched:?}"
        );
        assert!(fetched
            .iter()
            .all(|i| (104..111).contains(i) || (154..161).contains(i)));
    }

    #[test]
    fn random_order_fetches_nothing_and_a_break_stops_the_run() {
        let d = dir(100);
        for i in [57, 3, 88, 21, 64, 9, 45, 72, 30, 95, 14, 66] {
            assert!(d.opened(100 + i, 16).is_empty(), "random open {i}");
        }
        let d = dir(100);
        for i in 0..4 {
            d.opened(100 + i, 4);
        }
        assert!(d.opened(150, 4).is_empty(), "the order broke");
        assert!(
            d.opened(120, 4).is_empty(),
            "and stays broken until a new run"
        );
        assert!(d.opened(101 + 100, 4).is_empty(), "unknown inode");
        assert!(dir(10).opened(100, 0).is_empty(), "window 0: off");
    }

    /// A deterministic pseudo-random number generator (xorshift).
    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Random file order over many opens: what is fetched ahead stays a small
    /// fraction of what is opened.
    #[test]
    fn random_order_fetches_almost_nothing_extra() {
        let d = dir(100);
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let opens = 20_000;
        let ahead: usize = (0..opens)
            .map(|_| d.opened(100 + xorshift(&mut x) % 100, 16).len())
            .sum();
        assert!(
            ahead * 20 <= opens,
            "{ahead} files fetched ahead for {opens} random opens"
        );
    }

    /// One pass over a directory in a random order (each file once, as a
    /// shuffling data loader reads an epoch): few files are fetched ahead
    /// (about 8%; and in a whole pass each of them is read later anyway).
    #[test]
    fn a_shuffled_pass_fetches_few_files_ahead() {
        let mut total = 0;
        for seed in 1..=50u64 {
            let d = dir(100);
            let mut order: Vec<u64> = (100..200).collect();
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for i in (1..order.len()).rev() {
                order.swap(i, (xorshift(&mut x) % (i as u64 + 1)) as usize);
            }
            total += order
                .iter()
                .map(|ino| d.opened(*ino, 16).len())
                .sum::<usize>();
        }
        assert!(
            total * 10 <= 50 * 100,
            "{total} of 5000 files fetched ahead"
        );
    }
}
