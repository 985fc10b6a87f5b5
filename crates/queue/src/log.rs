//! The durable log: append-only segment files of CRC-checked records,
//! written by one thread that commits many producers' appends with one
//! fsync.
//!
//! # On disk
//!
//! A log is a directory of segments named by the sequence number of their
//! first record (`00000000000000000042.log`). Each record:
//!
//! ```text
//! +------------+------------+------+----------+-----------------+
//! | length u32 | crc32c u32 | kind | seq u64  | payload         |
//! |   (LE)     |   (LE)     |  u8  |  (LE)    | length - 9 bytes|
//! +------------+------------+------+----------+-----------------+
//! ```
//!
//! `length` counts the bytes after the CRC; the CRC covers exactly those.
//! Sequence numbers run on without gaps across segments.
//!
//! # Recovery
//!
//! [`Log::open`] replays every segment in order. At the end of the last
//! segment, an incomplete record or one whose CRC fails (a write torn by a
//! crash) is cut off and reported in [`Recovery::truncated_bytes`]. A bad
//! record with readable data after it is corruption, not a torn write: it
//! is reported with its segment and byte position in
//! [`Recovery::corruption`], nothing from it or after it in that segment is
//! replayed, the file is left as it is for inspection, and new appends go
//! to a fresh segment. Nothing corrupt is ever handed to the caller.
//!
//! # Durability: what a crash can lose
//!
//! | [`FsyncPolicy`] | an append returns once | a crash of the process loses | a crash of the machine loses |
//! |---|---|---|---|
//! | `Always` | its batch is written and fsynced | nothing that returned | nothing that returned |
//! | `Interval(d)` | its batch is written | nothing that returned | what returned in the last `d` |
//! | `Never` | its batch is written | nothing that returned | whatever the OS had not written back |
//!
//! Appends that arrive together share one write and, under `Always`, one
//! fsync (group commit), so throughput grows with the number of producers
//! while each still waits only for its own batch.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

/// A record's position in the log.
pub type Seq = u64;

const HEADER: usize = 8;
/// kind (1) + seq (8)
const BODY_PREFIX: usize = 9;

/// When appends are fsynced. See the [module docs](self) for what each can lose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fsync every batch before its appends return.
    Always,
    /// fsync at most this long after a write; appends return once written.
    /// The deadline runs from the first write not yet fsynced, so a steady
    /// stream of appends cannot put the fsync off.
    Interval(Duration),
    /// Never fsync (the OS writes back when it likes).
    Never,
}

/// Settings of a log.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LogOptions {
    /// When to fsync. Default `Always`.
    pub fsync: FsyncPolicy,
    /// A segment is closed and a new one started once it exceeds this. Default 64 MiB.
    pub segment_size: u64,
    /// Largest payload accepted. Default 4 MiB.
    pub max_record_size: usize,
    /// Appends waiting for the writer before `append` itself waits. Default 4096.
    pub queue_depth: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            fsync: FsyncPolicy::Always,
            segment_size: 64 * 1024 * 1024,
            max_record_size: 4 * 1024 * 1024,
            queue_depth: 4096,
        }
    }
}

impl LogOptions {
    /// The same options with another fsync policy.
    pub fn with_fsync(mut self, fsync: FsyncPolicy) -> LogOptions {
        self.fsync = fsync;
        self
    }

    /// The same options with another segment size.
    pub fn with_segment_size(mut self, bytes: u64) -> LogOptions {
        self.segment_size = bytes;
        self
    }
}

/// One record, as replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its position.
    pub seq: Seq,
    /// What the layer above says it is.
    pub kind: u8,
    /// Its bytes.
    pub payload: Bytes,
}

/// A record that could not be read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte position of the bad record in it.
    pub position: u64,
    /// Bytes from there to the end of the segment that were not replayed.
    pub unreadable_bytes: u64,
    /// What was wrong.
    pub reason: String,
}

/// What [`Log::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Bytes of a torn last record cut off the end of the log.
    pub truncated_bytes: u64,
    /// Corrupt records found before the end, each with its location.
    pub corruption: Vec<Corruption>,
}

/// Why a log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A file or the directory could not be read or written.
    #[error("cannot open the log at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// Another log (in this process or another) has the directory open.
    #[error("the log at {path} is in use by another process or queue")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
}

/// Why an append did not become durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The payload exceeds [`LogOptions::max_record_size`]. Not retryable.
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Writing or syncing failed (disk full, I/O error). The append did not
    /// happen; the log is still readable and takes later appends.
    /// Retryable once the cause is fixed.
    #[error("log write failed: {0}")]
    Io(String),
    /// The log was closed. Not retryable.
    #[error("the log is closed")]
    Closed,
}

impl AppendError {
    /// Whether appending again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AppendError::Io(_))
    }
}

fn segment_name(first: Seq) -> String {
    format!("{first:020}.log")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A segment on disk: its first sequence number and path.
#[derive(Debug, Clone)]
struct Segment {
    first: Seq,
    path: PathBuf,
}

/// What stopped a scan early.
struct Problem {
    reason: String,
    /// The bad record is the last thing in the file (a torn write).
    at_end: bool,
}

/// What a scan of one segment found.
struct Scanned {
    /// Length of the readable prefix.
    good: u64,
    /// The sequence number after the last good record.
    next: Seq,
    problem: Option<Problem>,
}

/// Reads one segment, handing each good record to `replay`.
fn scan(
    segment: &Segment,
    max_record: usize,
    replay: &mut dyn FnMut(Record),
) -> Result<Scanned, OpenError> {
    let data = Bytes::from(fs::read(&segment.path).map_err(io_err(&segment.path))?);
    let mut position = 0usize;
    let mut next = segment.first;
    let problem = loop {
        let rest = data.len() - position;
        if rest == 0 {
            break None;
        }
        if rest < HEADER {
            break Some(Problem {
                reason: format!("incomplete record header ({rest} bytes)"),
                at_end: true,
            });
        }
        let length =
            u32::from_le_bytes(data[position..position + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(
            data[position + 4..position + 8]
                .try_into()
                .expect("4 bytes"),
        );
        if length < BODY_PREFIX || length > max_record + BODY_PREFIX {
            break Some(Problem {
                reason: format!("impossible record length {length}"),
                at_end: false,
            });
        }
        if rest < HEADER + length {
            break Some(Problem {
                reason: format!("incomplete record: {} of {} bytes", rest, HEADER + length),
                at_end: true,
            });
        }
        let body = data.slice(position + HEADER..position + HEADER + length);
        let at_end = rest == HEADER + length;
        if crc32c::crc32c(&body) != crc {
            break Some(Problem {
                reason: "checksum mismatch".to_string(),
                at_end,
            });
        }
        let seq = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
        if seq != next {
            break Some(Problem {
                reason: format!("sequence number {seq} where {next} was expected"),
                at_end: false,
            });
        }
        replay(Record {
            seq,
            kind: body[0],
            payload: body.slice(BODY_PREFIX..),
        });
        next += 1;
        position += HEADER + length;
    };
    Ok(Scanned {
        good: position as u64,
        next,
        problem,
    })
}

/// Takes the directory's lock file, so that two logs (two processes, or a
/// queue opened twice) never write the same segments.
fn lock_dir(dir: &Path) -> Result<fs::File, OpenError> {
    let path = dir.join("LOCK");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(OpenError::Locked { path }),
        Err(fs::TryLockError::Error(err)) => Err(io_err(&path)(err)),
    }
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, OpenError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let Some(first) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<Seq>().ok())
        else {
            continue;
        };
        segments.push(Segment {
            first,
            path: entry.path(),
        });
    }
    segments.sort_by_key(|s| s.first);
    Ok(segments)
}

enum Command {
    Append {
        records: Vec<(u8, Bytes)>,
        done: oneshot::Sender<Result<Seq, AppendError>>,
    },
    RemoveBefore {
        seq: Seq,
        done: oneshot::Sender<Result<usize, AppendError>>,
    },
    Sync {
        done: oneshot::Sender<Result<(), AppendError>>,
    },
}

/// Counters kept by the writer.
#[derive(Debug, Default)]
struct Counters {
    bytes_on_disk: AtomicU64,
    segments: AtomicU64,
    fsyncs: AtomicU64,
}

/// An open log. Appends may come from many tasks at once.
#[derive(Debug)]
pub struct Log {
    commands: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    max_record_size: usize,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Log {
    /// Opens (creating if needed) the log in `dir`, replaying every record
    /// into `replay` in order before it returns. See the module docs for
    /// how torn and corrupt records are handled.
    pub fn open(
        dir: impl AsRef<Path>,
        options: LogOptions,
        mut replay: impl FnMut(Record),
    ) -> Result<(Log, Recovery), OpenError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let lock = lock_dir(&dir)?;
        let mut segments: VecDeque<Segment> = list_segments(&dir)?.into();
        let mut recovery = Recovery::default();
        let mut next = segments.front().map_or(0, |s| s.first);
        let mut records = 0u64;
        let mut counting = |record: Record| {
            records += 1;
            replay(record);
        };
        let mut must_roll = false;
        let last_index = segments.len().saturating_sub(1);
        for (index, segment) in segments.iter().enumerate() {
            let Scanned {
                good,
                next: after,
                problem,
            } = scan(segment, options.max_record_size, &mut counting)?;
            next = after;
            recovery.segments += 1;
            let size = fs::metadata(&segment.path)
                .map_err(io_err(&segment.path))?
                .len();
            match problem {
                None => {}
                Some(Problem {
                    reason,
                    at_end: true,
                }) if index == last_index => {
                    // A torn write at the very end: cut it off.
                    tracing::warn!(segment = %segment.path.display(), position = good, %reason, "truncating a torn record");
                    let file = OpenOptions::new()
                        .write(true)
                        .open(&segment.path)
                        .map_err(io_err(&segment.path))?;
                    file.set_len(good).map_err(io_err(&segment.path))?;
                    file.sync_all().map_err(io_err(&segment.path))?;
                    recovery.truncated_bytes += size - good;
                }
                Some(Problem { reason, .. }) => {
                    tracing::error!(segment = %segment.path.display(), position = good, %reason, "corrupt record; the rest of this segment is skipped");
                    recovery.corruption.push(Corruption {
                        segment: segment.path.clone(),
                        position: good,
                        unreadable_bytes: size - good,
                        reason,
                    });
                    if index == last_index {
                        must_roll = true;
                    }
                }
            }
        }
        recovery.records = records;
        let (file, tail) = match segments.back() {
            Some(last) if !must_roll => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&last.path)
                    .map_err(io_err(&last.path))?;
                (file, last.clone())
            }
            _ => {
                let tail = Segment {
                    first: next,
                    path: dir.join(segment_name(next)),
                };
                let file = create_segment(&dir, &tail.path)?;
                segments.push_back(tail.clone());
                (file, tail)
            }
        };
        let counters = Arc::new(Counters::default());
        let mut on_disk = 0;
        for segment in &segments {
            on_disk += fs::metadata(&segment.path)
                .map_err(io_err(&segment.path))?
                .len();
        }
        counters.bytes_on_disk.store(on_disk, Ordering::Relaxed);
        counters
            .segments
            .store(segments.len() as u64, Ordering::Relaxed);
        let tail_len = file.metadata().map_err(io_err(&tail.path))?.len();
        let (commands, inbox) = mpsc::channel(options.queue_depth.max(1));
        let writer = Writer {
            dir: dir.clone(),
            options: options.clone(),
            segments,
            file,
            tail_len,
            next,
            counters: counters.clone(),
            dirty: false,
            dirty_since: None,
            broken: None,
        };
        let thread = std::thread::Builder::new()
            .name("courier-log".into())
            .spawn(move || {
                writer.run(inbox);
                // Only now may another process (or a reopen) write here.
                drop(lock);
            })
            .map_err(io_err(&dir))?;
        Ok((
            Log {
                commands,
                counters,
                max_record_size: options.max_record_size,
                writer: Some(thread),
            },
            recovery,
        ))
    }

    /// Appends one record; returns its sequence number once it is durable
    /// under the log's [`FsyncPolicy`].
    pub async fn append(&self, kind: u8, payload: Bytes) -> Result<Seq, AppendError> {
        self.append_batch(vec![(kind, payload)]).await
    }

    /// Appends records together (consecutive sequence numbers, one write);
    /// returns the first one's sequence number. All or none are appended.
    pub async fn append_batch(&self, records: Vec<(u8, Bytes)>) -> Result<Seq, AppendError> {
        if let Some((_, too_big)) = records.iter().find(|(_, p)| p.len() > self.max_record_size) {
            return Err(AppendError::TooLarge {
                size: too_big.len(),
                limit: self.max_record_size,
            });
        }
        let (done, outcome) = oneshot::channel();
        self.commands
            .send(Command::Append { records, done })
            .await
            .map_err(|_| AppendError::Closed)?;
        outcome.await.map_err(|_| AppendError::Closed)?
    }

    /// Deletes every segment all of whose records come before `seq`, oldest
    /// first; returns how many. Later segments are never deleted before
    /// earlier ones, so replay never sees a record without its history.
    pub async fn remove_before(&self, seq: Seq) -> Result<usize, AppendError> {
        let (done, outcome) = oneshot::channel();
        self.commands
            .send(Command::RemoveBefore { seq, done })
            .await
            .map_err(|_| AppendError::Closed)?;
        outcome.await.map_err(|_| AppendError::Closed)?
    }

    /// fsyncs now, whatever the policy.
    pub async fn sync(&self) -> Result<(), AppendError> {
        let (done, outcome) = oneshot::channel();
        self.commands
            .send(Command::Sync { done })
            .await
            .map_err(|_| AppendError::Closed)?;
        outcome.await.map_err(|_| AppendError::Closed)?
    }

    /// Bytes the log occupies on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        self.counters.bytes_on_disk.load(Ordering::Relaxed)
    }

    /// Segment files on disk.
    pub fn segments(&self) -> u64 {
        self.counters.segments.load(Ordering::Relaxed)
    }

    /// fsyncs performed so far (for observing group commit).
    pub fn fsyncs(&self) -> u64 {
        self.counters.fsyncs.load(Ordering::Relaxed)
    }

    /// Stops the writer after everything queued is written and fsynced
    /// (dropping the log does the same).
    pub fn close(self) {
        drop(self);
    }
}

impl Drop for Log {
    /// Waits for the writer to finish what was queued and release the
    /// directory, so the log can be opened again as soon as this returns.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn create_segment(dir: &Path, path: &Path) -> Result<File, OpenError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))?;
    // The new file's name must survive a crash too.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(file)
}

struct Writer {
    dir: PathBuf,
    options: LogOptions,
    segments: VecDeque<Segment>,
    file: File,
    tail_len: u64,
    next: Seq,
    counters: Arc<Counters>,
    /// Written since the last fsync.
    dirty: bool,
    /// When the first write since the last fsync happened: under
    /// `Interval(d)` the fsync is due `d` after it.
    dirty_since: Option<std::time::Instant>,
    /// Set when a failed batch could not be cut off the file: the segment
    /// may end in a torn record, so nothing appended after it could be
    /// replayed. Every later append is refused with this reason (reopening
    /// the log cuts the torn tail, as after a crash).
    broken: Option<String>,
}

/// When an `Interval(every)` fsync is due: `every` after the first write
/// not yet fsynced (`None`: nothing to sync). Not `every` after the latest
/// command, which under continuous load would never come.
fn interval_deadline(
    policy: FsyncPolicy,
    dirty_since: Option<std::time::Instant>,
) -> Option<std::time::Instant> {
    match policy {
        FsyncPolicy::Interval(every) => dirty_since.map(|since| since + every),
        _ => None,
    }
}

impl Writer {
    fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a timer-only runtime");
        runtime.block_on(async {
            loop {
                let deadline = interval_deadline(self.options.fsync, self.dirty_since);
                let first = match deadline {
                    Some(at) => {
                        let at = tokio::time::Instant::from_std(at);
                        match tokio::time::timeout_at(at, inbox.recv()).await {
                            Ok(command) => command,
                            Err(_) => {
                                self.interval_fsync();
                                continue;
                            }
                        }
                    }
                    None => inbox.recv().await,
                };
                let Some(first) = first else { break };
                let mut batch = vec![first];
                while batch.len() < 1024 {
                    match inbox.try_recv() {
                        Ok(command) => batch.push(command),
                        Err(_) => break,
                    }
                }
                self.handle(batch);
                // Due while the batch was handled (or commands kept coming).
                if interval_deadline(self.options.fsync, self.dirty_since)
                    .is_some_and(|at| at <= std::time::Instant::now())
                {
                    self.interval_fsync();
                }
            }
        });
        // Closing: whatever was written becomes durable.
        if self.dirty {
            let _ = self.fsync();
        }
    }

    fn handle(&mut self, batch: Vec<Command>) {
        let mut appends = Vec::new();
        for command in batch {
            match command {
                Command::Append { records, done } => appends.push((records, done)),
                Command::RemoveBefore { seq, done } => {
                    let _ = done.send(self.remove_before(seq));
                }
                Command::Sync { done } => {
                    let _ = done.send(self.fsync().map_err(|e| AppendError::Io(e.to_string())));
                }
            }
        }
        if appends.is_empty() {
            return;
        }
        if let Some(reason) = &self.broken {
            for (_, done) in appends {
                let _ = done.send(Err(AppendError::Io(reason.clone())));
            }
            return;
        }
        // One write (per segment) and at most one fsync for the whole batch.
        // On failure the segment written to is cut back to here: its length
        // and the sequence number it goes on from, from before the batch or
        // from the batch's last roll (what came before that is complete and
        // fsynced by the roll).
        let mut undo_len = self.tail_len;
        let mut undo_next = self.next;
        let mut firsts = Vec::with_capacity(appends.len());
        let mut buf = BytesMut::new();
        let mut outcome: Result<(), io::Error> = Ok(());
        'appends: for (records, _) in &appends {
            firsts.push(self.next);
            for (kind, payload) in records {
                let length = BODY_PREFIX + payload.len();
                let at = buf.len();
                buf.put_u32_le(length as u32);
                buf.put_u32_le(0);
                buf.put_u8(*kind);
                buf.put_u64_le(self.next);
                buf.put_slice(payload);
                let crc = crc32c::crc32c(&buf[at + HEADER..]);
                buf[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
                self.next += 1;
                // Segments roll between records, whatever the batch size,
                // so that consumed segments can be deleted.
                if self.tail_len + buf.len() as u64 >= self.options.segment_size {
                    if let Err(err) = self.write(&buf).and_then(|()| self.roll()) {
                        outcome = Err(err);
                        break 'appends;
                    }
                    buf.clear();
                    (undo_len, undo_next) = (0, self.next);
                }
            }
        }
        if outcome.is_ok() && !buf.is_empty() {
            outcome = self.write(&buf);
        }
        if outcome.is_ok() && self.options.fsync == FsyncPolicy::Always {
            outcome = self.fsync();
        }
        match outcome {
            Ok(()) => {
                for ((_, done), first) in appends.into_iter().zip(firsts) {
                    let _ = done.send(Ok(first));
                }
            }
            Err(err) => {
                tracing::error!(%err, "log append failed; the batch is undone");
                // Undo the partial write so the file holds only whole
                // records and later appends line up (with a torn record or
                // a gap in sequence numbers left in the middle of a segment,
                // replay would stop there and lose every later append). A
                // batch that crossed a segment boundary keeps its earlier,
                // complete part; its appends are still reported as failed,
                // and replay shows them, which at-least-once callers
                // tolerate.
                if let Err(undo) = self.file.set_len(undo_len) {
                    tracing::error!(%undo, "could not cut a failed write off the log; refusing appends until it is reopened");
                    self.broken = Some(format!(
                        "the log could not undo a failed write ({undo}) and refuses appends until reopened"
                    ));
                }
                // Bytes written whole since then (the fsync failed) go too.
                self.counters
                    .bytes_on_disk
                    .fetch_sub(self.tail_len.saturating_sub(undo_len), Ordering::Relaxed);
                self.tail_len = undo_len;
                self.next = undo_next;
                let message = err.to_string();
                for (_, done) in appends {
                    let _ = done.send(Err(AppendError::Io(message.clone())));
                }
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.tail_len += bytes.len() as u64;
        self.dirty = true;
        self.dirty_since.get_or_insert_with(std::time::Instant::now);
        self.counters
            .bytes_on_disk
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn fsync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.dirty = false;
        self.dirty_since = None;
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The `Interval` policy's fsync. A failure is logged and the deadline
    /// starts over, so a failing disk is retried, not spun on.
    fn interval_fsync(&mut self) {
        if let Err(err) = self.fsync() {
            tracing::error!(%err, "interval fsync failed; retrying after the interval");
            self.dirty_since = Some(std::time::Instant::now());
        }
    }

    /// Closes the current segment (durably) and starts the next. On
    /// failure the current segment stays the one written to, and the new
    /// file is removed again: an empty segment left on disk would claim
    /// that the records written after it in the old one come after it.
    fn roll(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        let path = self.dir.join(segment_name(self.next));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if let Err(err) = File::open(&self.dir).and_then(|d| d.sync_all()) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(err);
        }
        self.file = file;
        self.segments.push_back(Segment {
            first: self.next,
            path,
        });
        self.tail_len = 0;
        self.counters.segments.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn remove_before(&mut self, seq: Seq) -> Result<usize, AppendError> {
        let mut removed = 0;
        // A segment's records end where the next segment begins; the tail
        // segment is never removed.
        while self.segments.len() > 1 && self.segments[1].first <= seq {
            let segment = self.segments.pop_front().expect("more than one segment");
            let size = fs::metadata(&segment.path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&segment.path).map_err(|e| AppendError::Io(e.to_string()))?;
            self.counters
                .bytes_on_disk
                .fetch_sub(size, Ordering::Relaxed);
            self.counters.segments.fetch_sub(1, Ordering::Relaxed);
            removed += 1;
        }
        Ok(removed)
    }
}
