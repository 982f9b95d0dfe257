//! Log output that never makes a daemon thread wait.
//!
//! `tracing`'s formatter writes each event through a [`MakeWriter`]; written
//! straight to stderr or a log file, a full pipe (a supervisor that stopped
//! reading, a terminal on hold) or a slow disk would block whichever thread
//! logged, a runtime worker carrying every read stream included. Here each
//! event is formatted into a buffer of its own ([`Line`]) and handed to a
//! bounded queue; one writer thread (`zonalfs-log`) takes lines off it in
//! order and writes them out. When the queue is full the line is dropped
//! and counted, and the writer says how many were dropped before its next
//! line. [`flush`] waits (bounded) for what is queued to be written: the
//! process calls it before it prints its last line and exits.
//!
//! ```text
//!  event ─▶ Line (buffer) ─ drop ─▶ try_send ─▶ queue (bounded) ─▶ zonalfs-log ─▶ stderr / file
//!                                      └ full: counted as dropped
//! ```

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Lines queued at most before new ones are dropped.
pub const QUEUE_LINES: usize = 8192;

enum Msg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// The [`MakeWriter`](tracing_subscriber::fmt::MakeWriter) to give the
/// formatter.
#[derive(Clone)]
pub struct LogSink {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

/// One event's bytes; queued when dropped.
pub struct Line<'a> {
    sink: &'a LogSink,
    buf: Vec<u8>,
}

impl Write for Line<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.buf);
        if let Err(TrySendError::Full(_)) = self.sink.tx.try_send(Msg::Line(line)) {
            self.sink.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            sink: self,
            buf: Vec::new(),
        }
    }
}

impl LogSink {
    /// Starts the writer thread over `out`, with a queue of `capacity` lines.
    pub fn spawn(out: Box<dyn Write + Send>, capacity: usize) -> std::io::Result<LogSink> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("zonalfs-log".into())
            .spawn(move || write_lines(rx, out, &counter))?;
        Ok(LogSink { tx, dropped })
    }

    /// Waits until every line queued before this call is written, at most
    /// `limit` (an output that does not drain must not hold up an exit).
    /// False if it was not.
    pub fn flush(&self, limit: Duration) -> bool {
        let (ack, done) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + limit;
        let mut msg = Msg::Flush(ack);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        done.recv_timeout(left).is_ok()
    }
}

fn write_lines(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>, dropped: &AtomicU64) {
    for msg in rx {
        match msg {
            Msg::Line(line) => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = writeln!(
                        out,
                        "zonalfs: {lost} log lines dropped (the log output did not keep up)"
                    );
                }
                let _ = out.write_all(&line);
            }
            Msg::Flush(ack) => {
                let _ = out.flush();
                let _ = ack.try_send(());
            }
        }
    }
}

/// The process's sink, once logging is set up (see [`flush`]).
static SINK: OnceLock<LogSink> = OnceLock::new();

/// Makes `sink` the one [`flush`] waits for.
pub fn install(sink: &LogSink) {
    let _ = SINK.set(sink.clone());
}

/// Waits (at most 2 s) until the log lines queued so far are written; a
/// no-op before logging is set up.
pub fn flush() {
    if let Some(s) = SINK.get() {
        s.flush(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tracing_subscriber::fmt::MakeWriter;

    /// An output the test can hold shut, and read.
    #[derive(Clone, Default)]
    struct Held {
        bytes: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Held {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _open = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            self.bytes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(sink: &LogSink, text: &str) {
        let mut w = sink.make_writer();
        w.write_all(text.as_bytes()).expect("buffer");
    }

    #[test]
    fn lines_are_written_in_order_and_flush_waits_for_them() {
        let out = Held::default();
        let sink = LogSink::spawn(Box::new(out.clone()), 64).expect("spawn");
        for i in 0..50 {
            log(&sink, &format!("line {i}\n"));
        }
        assert!(sink.flush(Duration::from_secs(10)));
        let want: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let got = String::from_utf8(out.bytes.lock().expect("bytes").clone()).expect("utf-8");
        assert_eq!(got, want);
    }

    /// An output that does not drain blocks no logger: lines past the queue
    /// are dropped and counted, the flush gives up at its limit, and once
    /// the output drains the writer says how many were lost.
    #[test]
    fn a_stuck_output_drops_lines_instead_of_blocking() {
        let out = Held::default();
        let gate = out.gate.lock().expect("gate");
        let sink = LogSink::spawn(Box::new(out.clone()), 4).expect("spawn");
        // The first line is taken by the writer, which then waits at the
        // gate; four more fill the queue; the rest are dropped.
        for i in 0..20 {
            log(&sink, &format!("line {i}\n"));
        }
        assert!(sink.dropped.load(Ordering::Relaxed) >= 20 - 1 - 4);
        assert!(!sink.flush(Duration::from_millis(50)), "nothing drains");
        drop(gate);
        assert!(sink.flush(Duration::from_secs(10)), "drained");
        log(&sink, "after\n");
        assert!(sink.flush(Duration::from_secs(10)));
        let got = String::from_utf8(out.bytes.lock().expect("bytes").clone()).expect("utf-8");
        assert!(got.contains("log lines dropped"), "{got}");
        assert!(got.ends_with("after\n"), "{got}");
        // What was written came in order, from the first line on.
        let kept: Vec<u32> = got
            .lines()
            .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
            .collect();
        assert_eq!(kept.first(), Some(&0), "{got}");
        assert!(kept.windows(2).all(|w| w[0] < w[1]), "{got}");
        assert!(kept.len() <= 5, "{got}");
    }
}
