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
//!
//! # Suffix truncation
//!
//! [`Log::truncate_after`] removes every record after a sequence number (a
//! Raft log drops its conflicting suffix this way). It takes several file
//! operations (delete the later segments, cut the one holding the first
//! removed record), so it first writes its intent durably to a `TRUNCATE`
//! file (`CTRN`, the first removed sequence number as u64 LE, a crc32c of
//! it; written to a temporary file, fsynced, renamed, the directory
//! fsynced). [`Log::open`] finishes a truncation it finds pending before it
//! replays anything, so a crash at any point of one leaves a log that opens
//! with nothing after the kept record. The intent file is removed (and the
//! directory fsynced) before the truncation returns: a stale one would cut
//! later appends off on the next open.

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
    /// The sequence number the next append gets.
    pub next_seq: Seq,
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
    /// Another log (in this process or another) has the directory open,
    /// still after half a second of trying (see `LOCK_PATIENCE`).
    #[error("the log at {path} is in use by another process or queue")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A truncation was pending (its `TRUNCATE` file is there) and could not
    /// be finished, or the file is unreadable. Nothing was replayed: the log
    /// cannot tell which of its records were meant to be gone.
    #[error("cannot finish the truncation recorded in {path}: {reason}")]
    Truncation {
        /// The intent file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// Why [`Log::truncate_after`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TruncateError {
    /// Records just after the one to keep were already removed by
    /// [`Log::remove_before`]; the log cannot go on from there. Not retryable.
    #[error("cannot keep the log up to {seq}: it starts at {first} now")]
    Removed {
        /// The record asked to be kept last.
        seq: Seq,
        /// The first sequence number still on disk.
        first: Seq,
    },
    /// The record after the one to keep could not be found in its segment
    /// (the segment is corrupt there). Nothing was changed.
    #[error("record {seq} cannot be found in {segment}")]
    NotFound {
        /// The first record to remove.
        seq: Seq,
        /// The segment that should hold it.
        segment: PathBuf,
    },
    /// A file operation failed. If it failed after the intent was recorded,
    /// the log refuses appends until reopened, and opening finishes the
    /// truncation.
    #[error("log truncation failed: {0}")]
    Io(String),
    /// The log was closed. Not retryable.
    #[error("the log is closed")]
    Closed,
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
    /// What kind of failure this is: a record over the limit is
    /// [`ErrorKind::LimitExceeded`](crate::ErrorKind::LimitExceeded),
    /// a failed write (disk full, I/O error)
    /// [`ErrorKind::Busy`](crate::ErrorKind::Busy) (retryable
    /// once the cause is fixed), a closed log
    /// [`ErrorKind::Internal`](crate::ErrorKind::Internal).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            AppendError::TooLarge { .. } => ErrorKind::LimitExceeded,
            AppendError::Io(_) => ErrorKind::Busy,
            AppendError::Closed => ErrorKind::Internal,
        }
    }

    /// Whether appending again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl OpenError {
    /// What kind of failure this is: a log another process or queue holds
    /// is [`ErrorKind::Conflict`](crate::ErrorKind::Conflict),
    /// the rest (unreadable files, an unfinished truncation)
    /// [`ErrorKind::Internal`](crate::ErrorKind::Internal).
    pub fn kind(&self) -> crate::ErrorKind {
        use crate::ErrorKind;
        match self {
            OpenError::Io { .. } | OpenError::Truncation { .. } => ErrorKind::Internal,
            OpenError::Locked { .. } => ErrorKind::Conflict,
        }
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
    /// Bytes known fsynced (see [`DurableImage`]).
    synced: u64,
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

/// How long [`lock_dir`] keeps trying a lock held by someone else.
///
/// A lock released a moment ago can still be held for a few milliseconds:
/// a process forking a child (any thread's `Command::spawn`) duplicates
/// every descriptor, the lock file's too, and the child holds the lock
/// until its `exec` closes them. A log closed and opened again at once
/// would see `Locked` in that window (CI saw it: one test reopening a log
/// while another ran `umount`).
const LOCK_PATIENCE: Duration = Duration::from_millis(500);

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
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if started.elapsed() < LOCK_PATIENCE => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(fs::TryLockError::WouldBlock) => return Err(OpenError::Locked { path }),
            Err(fs::TryLockError::Error(err)) => return Err(io_err(&path)(err)),
        }
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
            synced: 0,
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
    TruncateAfter {
        seq: Seq,
        done: oneshot::Sender<Result<(), TruncateError>>,
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
    dir: PathBuf,
    /// Each segment with its length known fsynced, kept by the writer.
    durable: Arc<std::sync::Mutex<Vec<(PathBuf, u64)>>>,
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
        finish_pending_truncation(&dir, &mut segments, options.max_record_size)?;
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
        recovery.next_seq = next;
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
                    synced: 0,
                };
                let file = create_segment(&dir, &tail.path)?;
                segments.push_back(tail.clone());
                (file, tail)
            }
        };
        let counters = Arc::new(Counters::default());
        let mut on_disk = 0;
        for segment in segments.iter_mut() {
            let len = fs::metadata(&segment.path)
                .map_err(io_err(&segment.path))?
                .len();
            on_disk += len;
            // What a previous run left is counted as durable: this run
            // cannot know better (see `DurableImage`).
            segment.synced = len;
        }
        counters.bytes_on_disk.store(on_disk, Ordering::Relaxed);
        counters
            .segments
            .store(segments.len() as u64, Ordering::Relaxed);
        let tail_len = file.metadata().map_err(io_err(&tail.path))?.len();
        let (commands, inbox) = mpsc::channel(options.queue_depth.max(1));
        let durable = Arc::new(std::sync::Mutex::new(durable_of(&segments)));
        let writer = Writer {
            durable: durable.clone(),
            truncation_pending: false,
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
                dir,
                durable,
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

    /// Removes every record after `seq`, durably: the next append gets
    /// `seq + 1`. Later segments are deleted (newest first) and the one
    /// holding `seq + 1` is cut there; a crash part way leaves the intent
    /// recorded, and [`Log::open`] finishes it (see the [module docs](self)).
    /// Nothing to remove (`seq` at or past the end) is a no-op.
    ///
    /// `seq + 1` must still be on disk, or be exactly where the log begins
    /// after [`Log::remove_before`] (then every record goes); otherwise it
    /// is [`TruncateError::Removed`]. To remove every record of a log that
    /// begins at 0, keep a first record that is never truncated.
    pub async fn truncate_after(&self, seq: Seq) -> Result<(), TruncateError> {
        let (done, outcome) = oneshot::channel();
        self.commands
            .send(Command::TruncateAfter { seq, done })
            .await
            .map_err(|_| TruncateError::Closed)?;
        outcome.await.map_err(|_| TruncateError::Closed)?
    }

    /// FOR TESTS (power-loss simulation): each segment file with the
    /// number of its bytes known to be fsynced now. Under
    /// [`FsyncPolicy::Always`] every append that has returned is in it;
    /// under the other policies, what the last fsync covered. What the log
    /// found on disk when it was opened counts as synced.
    /// [`DurableImage::apply`] then throws away everything else.
    #[doc(hidden)]
    pub fn durable_image(&self) -> DurableImage {
        self.durable_probe().image()
    }

    /// FOR TESTS: a handle that takes [`Log::durable_image`] later, from
    /// wherever the log itself has gone (into a Raft store, say).
    #[doc(hidden)]
    pub fn durable_probe(&self) -> DurableProbe {
        DurableProbe {
            dir: self.dir.clone(),
            durable: self.durable.clone(),
        }
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

/// An append waiting for the writer: its records and whom to answer.
type PendingAppend = (Vec<(u8, Bytes)>, oneshot::Sender<Result<Seq, AppendError>>);

struct Writer {
    /// Shared with [`Log::durable_image`].
    durable: Arc<std::sync::Mutex<Vec<(PathBuf, u64)>>>,
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
    /// A truncation's intent is on disk but the truncation did not finish.
    truncation_pending: bool,
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
                Command::TruncateAfter { seq, done } => {
                    // Appends queued before the truncation must be written
                    // before it, or they would survive it.
                    self.commit(std::mem::take(&mut appends));
                    let _ = done.send(self.truncate_after(seq));
                }
            }
        }
        self.commit(appends);
    }

    /// Writes a batch of appends: one write (per segment), at most one fsync.
    fn commit(&mut self, appends: Vec<PendingAppend>) {
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
        self.tail_synced();
        Ok(())
    }

    /// Records that the tail is fsynced up to its current length.
    fn tail_synced(&mut self) {
        if let Some(tail) = self.segments.back_mut() {
            tail.synced = self.tail_len;
            let mut durable = self.durable.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(last) = durable.last_mut() {
                last.1 = self.tail_len;
            }
        }
    }

    /// Publishes the whole list of segments after it changed.
    fn publish_durable(&mut self) {
        *self.durable.lock().unwrap_or_else(|p| p.into_inner()) = durable_of(&self.segments);
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
        self.tail_synced();
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
            synced: 0,
        });
        self.tail_len = 0;
        self.counters.segments.fetch_add(1, Ordering::Relaxed);
        self.publish_durable();
        Ok(())
    }

    fn remove_before(&mut self, seq: Seq) -> Result<usize, AppendError> {
        if self.truncation_pending {
            // The pending truncation was checked against the segments as
            // they are; reopening finishes it.
            return Err(AppendError::Io(
                "a truncation is unfinished; reopen the log".to_string(),
            ));
        }
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
        if removed > 0 {
            self.publish_durable();
        }
        Ok(removed)
    }

    fn truncate_after(&mut self, seq: Seq) -> Result<(), TruncateError> {
        let cut = seq.saturating_add(1);
        if cut >= self.next {
            return Ok(());
        }
        if let Some(reason) = &self.broken {
            return Err(TruncateError::Io(reason.clone()));
        }
        let first = self.segments.front().map_or(self.next, |s| s.first);
        if cut < first {
            return Err(TruncateError::Removed { seq, first });
        }
        // Check before recording the intent that the cut can be found, so
        // that a NotFound leaves nothing behind.
        let Some(index) = self.segments.iter().rposition(|s| s.first <= cut) else {
            return Err(TruncateError::Removed { seq, first });
        };
        find_position(&self.segments[index], cut, self.options.max_record_size)?;
        // Everything written so far must be on disk before the files are
        // cut and reopened.
        if self.dirty {
            self.fsync().map_err(|e| TruncateError::Io(e.to_string()))?;
        }
        // From the intent's write on, a failure may leave it on disk: then
        // refuse appends (and segment removal) until a reopen finishes it,
        // since a reopen would cut whatever was appended after it.
        let fail = |writer: &mut Writer, err: String| {
            tracing::error!(%err, "log truncation failed; refusing appends until reopened");
            writer.truncation_pending = true;
            writer.broken = Some(format!(
                "a truncation failed ({err}); the log refuses appends until reopened"
            ));
            TruncateError::Io(err)
        };
        if let Err(err) = write_marker(&self.dir, cut) {
            // Nothing was cut yet: if the intent can be taken back, the
            // log carries on as it was.
            let _ = fs::remove_file(self.dir.join(format!("{TRUNCATE_MARKER}.tmp")));
            let taken_back = match fs::remove_file(self.dir.join(TRUNCATE_MARKER)) {
                Ok(()) => File::open(&self.dir).and_then(|d| d.sync_all()).is_ok(),
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            if taken_back {
                return Err(TruncateError::Io(err.to_string()));
            }
            return Err(fail(self, err.to_string()));
        }
        if let Err(err) = cut_segments(
            &self.dir,
            &mut self.segments,
            cut,
            self.options.max_record_size,
        ) {
            return Err(fail(self, err.to_string()));
        }
        let Some(tail) = self.segments.back() else {
            return Err(fail(self, "no segment left".to_string()));
        };
        let file = match OpenOptions::new().append(true).open(&tail.path) {
            Ok(file) => file,
            Err(err) => return Err(fail(self, err.to_string())),
        };
        let tail_len = match file.metadata() {
            Ok(meta) => meta.len(),
            Err(err) => return Err(fail(self, err.to_string())),
        };
        self.file = file;
        self.tail_len = tail_len;
        self.next = cut;
        self.dirty = false;
        self.dirty_since = None;
        if let Err(err) = remove_marker(&self.dir) {
            return Err(fail(self, err.to_string()));
        }
        self.truncation_pending = false;
        let on_disk: u64 = self
            .segments
            .iter()
            .map(|s| fs::metadata(&s.path).map_or(0, |m| m.len()))
            .sum();
        self.counters
            .bytes_on_disk
            .store(on_disk, Ordering::Relaxed);
        self.counters
            .segments
            .store(self.segments.len() as u64, Ordering::Relaxed);
        self.publish_durable();
        Ok(())
    }
}

/// The name of the truncation intent file.
const TRUNCATE_MARKER: &str = "TRUNCATE";
const MARKER_MAGIC: &[u8; 4] = b"CTRN";
const MARKER_LEN: usize = 16;

/// Records durably that every record from `cut` on is to be removed.
fn write_marker(dir: &Path, cut: Seq) -> io::Result<()> {
    let mut bytes = [0u8; MARKER_LEN];
    bytes[..4].copy_from_slice(MARKER_MAGIC);
    bytes[4..12].copy_from_slice(&cut.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..12]);
    bytes[12..].copy_from_slice(&crc.to_le_bytes());
    let temp = dir.join(format!("{TRUNCATE_MARKER}.tmp"));
    let mut file = File::create(&temp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, dir.join(TRUNCATE_MARKER))?;
    File::open(dir)?.sync_all()
}

fn remove_marker(dir: &Path) -> io::Result<()> {
    fs::remove_file(dir.join(TRUNCATE_MARKER))?;
    File::open(dir)?.sync_all()
}

/// The pending truncation's first removed sequence number, if one is
/// recorded. The file is untrusted: anything but the exact 16 bytes with
/// the right checksum is an error, never a guess.
fn read_marker(dir: &Path) -> Result<Option<Seq>, OpenError> {
    let path = dir.join(TRUNCATE_MARKER);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_err(&path)(err)),
    };
    let mut bytes = Vec::with_capacity(MARKER_LEN);
    io::Read::read_to_end(&mut io::Read::take(file, MARKER_LEN as u64 + 1), &mut bytes)
        .map_err(io_err(&path))?;
    let bad = |reason: &str| OpenError::Truncation {
        path: path.clone(),
        reason: reason.to_string(),
    };
    if bytes.len() != MARKER_LEN || &bytes[..4] != MARKER_MAGIC {
        return Err(bad("not a truncation record"));
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if crc32c::crc32c(&bytes[..12]) != crc {
        return Err(bad("checksum mismatch"));
    }
    Ok(Some(u64::from_le_bytes(
        bytes[4..12].try_into().expect("8 bytes"),
    )))
}

/// Finishes a truncation a crash interrupted, before anything is replayed.
fn finish_pending_truncation(
    dir: &Path,
    segments: &mut VecDeque<Segment>,
    max_record: usize,
) -> Result<(), OpenError> {
    let Some(cut) = read_marker(dir)? else {
        return Ok(());
    };
    let path = dir.join(TRUNCATE_MARKER);
    tracing::warn!(cut, "finishing an interrupted truncation");
    cut_segments(dir, segments, cut, max_record).map_err(|err| OpenError::Truncation {
        path: path.clone(),
        reason: err.to_string(),
    })?;
    remove_marker(dir).map_err(io_err(&path))
}

/// Byte position of record `cut` in `segment`, found by reading the
/// segment from its start (the writer keeps no index). The end of the
/// readable records counts when `cut` is the record that would follow them.
fn find_position(segment: &Segment, cut: Seq, max_record: usize) -> Result<u64, TruncateError> {
    let mut position = 0u64;
    let scanned = scan(segment, max_record, &mut |record: Record| {
        if record.seq < cut {
            position += (HEADER + BODY_PREFIX + record.payload.len()) as u64;
        }
    })
    .map_err(|e| TruncateError::Io(e.to_string()))?;
    if scanned.next < cut {
        return Err(TruncateError::NotFound {
            seq: cut,
            segment: segment.path.clone(),
        });
    }
    Ok(position)
}

/// Removes every record from `cut` on: deletes the segments after the one
/// holding `cut` (newest first), then cuts that one at `cut`, fsyncing the
/// file and the directory. Idempotent, so a reopen can run it again after
/// a crash part way through.
fn cut_segments(
    dir: &Path,
    segments: &mut VecDeque<Segment>,
    cut: Seq,
    max_record: usize,
) -> Result<(), TruncateError> {
    let io = |e: io::Error| TruncateError::Io(e.to_string());
    let Some(index) = segments.iter().rposition(|s| s.first <= cut) else {
        return Err(TruncateError::Removed {
            seq: cut.saturating_sub(1),
            first: segments.front().map_or(cut, |s| s.first),
        });
    };
    let mut deleted = false;
    while segments.len() > index + 1 {
        let segment = segments.pop_back().expect("a later segment");
        match fs::remove_file(&segment.path) {
            Ok(()) => deleted = true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                segments.push_back(segment);
                return Err(io(err));
            }
        }
    }
    if deleted {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    let segment = &mut segments[index];
    let position = find_position(segment, cut, max_record)?;
    let file = OpenOptions::new()
        .write(true)
        .open(&segment.path)
        .map_err(io)?;
    file.set_len(position).map_err(io)?;
    file.sync_all().map_err(io)?;
    segment.synced = position;
    Ok(())
}

/// Each segment's path and synced length, oldest first.
fn durable_of(segments: &VecDeque<Segment>) -> Vec<(PathBuf, u64)> {
    segments
        .iter()
        .map(|s| (s.path.clone(), s.synced))
        .collect()
}

/// FOR TESTS: what of a log's segment files was known fsynced at one
/// moment (from [`Log::durable_image`]). [`DurableImage::apply`] makes the
/// directory look as it would after a power loss at that moment, as far
/// as the log's fsyncs go: every byte an fsync had not covered is gone.
#[doc(hidden)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableImage {
    dir: PathBuf,
    segments: Vec<(PathBuf, u64)>,
}

/// FOR TESTS: takes a log's [`DurableImage`] at any moment (see
/// [`Log::durable_probe`]).
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct DurableProbe {
    dir: PathBuf,
    durable: Arc<std::sync::Mutex<Vec<(PathBuf, u64)>>>,
}

impl DurableProbe {
    /// What the log's fsyncs cover now.
    pub fn image(&self) -> DurableImage {
        DurableImage {
            dir: self.dir.clone(),
            segments: self
                .durable
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }
}

impl DurableImage {
    /// Each segment file with its synced length, oldest first.
    pub fn segments(&self) -> &[(PathBuf, u64)] {
        &self.segments
    }

    /// FOR TESTS: with the log closed (it takes the log's lock, so it fails
    /// with [`OpenError::Locked`] while the log is open), cuts every segment
    /// file back to its synced length and deletes the segment files the
    /// image does not know (created after it). Files removed since the
    /// image stay removed.
    pub fn apply(&self) -> Result<(), OpenError> {
        let _lock = lock_dir(&self.dir)?;
        for segment in list_segments(&self.dir)? {
            match self.segments.iter().find(|(path, _)| *path == segment.path) {
                Some((path, synced)) => {
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io_err(path))?;
                    let len = file.metadata().map_err(io_err(path))?.len();
                    if len > *synced {
                        file.set_len(*synced).map_err(io_err(path))?;
                        file.sync_all().map_err(io_err(path))?;
                    }
                }
                None => fs::remove_file(&segment.path).map_err(io_err(&segment.path))?,
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_test_support::TempDir;

    fn options(segment_size: u64, fsync: FsyncPolicy) -> LogOptions {
        LogOptions::default()
            .with_segment_size(segment_size)
            .with_fsync(fsync)
    }

    fn payload(n: u64) -> Bytes {
        Bytes::from(format!("record {n} {}", "y".repeat((n % 7) as usize)))
    }

    fn open(dir: &Path, options: &LogOptions) -> (Log, Recovery, Vec<Record>) {
        let mut records = Vec::new();
        let (log, recovery) = Log::open(dir, options.clone(), |r| records.push(r)).unwrap();
        (log, recovery, records)
    }

    async fn fill(log: &Log, range: std::ops::Range<u64>) {
        for n in range {
            assert_eq!(log.append(1, payload(n)).await.unwrap(), n);
        }
    }

    /// The replayed records are exactly `0..end` with their payloads,
    /// except those in `replaced`, which carry the given payloads.
    fn assert_replayed(records: &[Record], end: u64, replaced: &[(u64, Bytes)]) {
        let seqs: Vec<Seq> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (0..end).collect::<Vec<_>>());
        for record in records {
            let expected = replaced
                .iter()
                .find(|(seq, _)| *seq == record.seq)
                .map_or_else(|| payload(record.seq), |(_, p)| p.clone());
            assert_eq!(record.payload, expected, "record {}", record.seq);
        }
    }

    fn segment_count(dir: &Path) -> usize {
        list_segments(dir).unwrap().len()
    }

    #[tokio::test]
    async fn truncating_within_a_segment_drops_the_suffix_and_appends_go_on_from_it() {
        let dir = TempDir::new("log-truncate-within");
        let opts = options(1 << 20, FsyncPolicy::Always);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..10).await;
        let before = log.bytes_on_disk();
        log.truncate_after(4).await.unwrap();
        assert!(log.bytes_on_disk() < before);
        assert_eq!(log.append(2, Bytes::from_static(b"new")).await.unwrap(), 5);
        drop(log);
        let (_log, recovery, records) = open(dir.path(), &opts);
        assert_eq!(recovery.next_seq, 6);
        assert_eq!(recovery.truncated_bytes, 0);
        assert_replayed(&records, 6, &[(5, Bytes::from_static(b"new"))]);
        assert!(!dir.path().join(TRUNCATE_MARKER).exists());
    }

    #[tokio::test]
    async fn truncating_across_segments_deletes_the_later_ones() {
        let dir = TempDir::new("log-truncate-across");
        let opts = options(256, FsyncPolicy::Never);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..200).await;
        let segments = log.segments();
        assert!(segments > 5, "rolled into several segments");
        log.truncate_after(50).await.unwrap();
        assert!(log.segments() < segments);
        assert_eq!(log.segments() as usize, segment_count(dir.path()));
        assert_eq!(log.append(1, payload(51)).await.unwrap(), 51);
        fill(&log, 52..60).await;
        drop(log);
        let (_log, recovery, records) = open(dir.path(), &opts);
        assert_eq!(recovery.next_seq, 60);
        assert_replayed(&records, 60, &[]);
    }

    #[tokio::test]
    async fn truncating_at_a_segment_boundary_leaves_that_segment_empty() {
        let dir = TempDir::new("log-truncate-boundary");
        let opts = options(256, FsyncPolicy::Never);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..100).await;
        drop(log);
        let firsts: Vec<Seq> = list_segments(dir.path())
            .unwrap()
            .iter()
            .map(|s| s.first)
            .collect();
        let boundary = firsts[2];
        let (log, _, _) = open(dir.path(), &opts);
        log.truncate_after(boundary - 1).await.unwrap();
        assert_eq!(segment_count(dir.path()), 3);
        assert_eq!(log.append(1, payload(boundary)).await.unwrap(), boundary);
        drop(log);
        let (_log, _, records) = open(dir.path(), &opts);
        assert_replayed(&records, boundary + 1, &[]);
    }

    #[tokio::test]
    async fn truncating_at_or_past_the_end_changes_nothing() {
        let dir = TempDir::new("log-truncate-end");
        let opts = options(1 << 20, FsyncPolicy::Always);
        let (log, _, _) = open(dir.path(), &opts);
        // An empty log: nothing to remove.
        log.truncate_after(0).await.unwrap();
        fill(&log, 0..5).await;
        let bytes = log.bytes_on_disk();
        log.truncate_after(4).await.unwrap();
        log.truncate_after(1000).await.unwrap();
        assert_eq!(log.bytes_on_disk(), bytes);
        assert_eq!(log.append(1, payload(5)).await.unwrap(), 5);
        drop(log);
        let (_log, _, records) = open(dir.path(), &opts);
        assert_replayed(&records, 6, &[]);
    }

    #[tokio::test]
    async fn after_remove_before_truncation_may_empty_the_log_but_not_reach_behind_it() {
        let dir = TempDir::new("log-truncate-removed");
        let opts = options(256, FsyncPolicy::Never);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..100).await;
        assert!(log.remove_before(60).await.unwrap() > 0);
        let first = list_segments(dir.path()).unwrap()[0].first;
        assert!(first > 0 && first <= 60);
        assert_eq!(
            log.truncate_after(first - 2).await,
            Err(TruncateError::Removed {
                seq: first - 2,
                first
            })
        );
        // Keeping everything before the first record on disk: none is left.
        log.truncate_after(first - 1).await.unwrap();
        assert_eq!(segment_count(dir.path()), 1);
        assert_eq!(log.append(1, payload(first)).await.unwrap(), first);
        drop(log);
        let (_log, recovery, records) = open(dir.path(), &opts);
        assert_eq!(recovery.next_seq, first + 1);
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![first]
        );
    }

    #[tokio::test]
    async fn appends_queued_before_a_truncation_are_cut_by_it() {
        let dir = TempDir::new("log-truncate-order");
        let opts = options(1 << 20, FsyncPolicy::Never);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..3).await;
        // Both queued before the writer looks: the append comes first.
        let (appended, truncated) = tokio::join!(log.append(1, payload(3)), log.truncate_after(2));
        assert_eq!(appended.unwrap(), 3);
        truncated.unwrap();
        assert_eq!(log.append(1, payload(3)).await.unwrap(), 3);
    }

    /// A crash part way through a truncation: the intent is on disk and
    /// only some of the later segments are gone. Opening finishes it.
    #[tokio::test]
    async fn an_interrupted_truncation_is_finished_on_open() {
        let dir = TempDir::new("log-truncate-crash");
        let opts = options(256, FsyncPolicy::Never);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..150).await;
        drop(log);
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() > 4);
        // Every crash point: intent written, then 0, 1, .. of the later
        // segments deleted (newest first), the cut not made yet.
        for deleted in 0..3 {
            let copy = TempDir::new("log-truncate-crash-copy");
            for segment in &segments {
                fs::copy(
                    &segment.path,
                    copy.path().join(segment.path.file_name().unwrap()),
                )
                .unwrap();
            }
            let keep = segments[1].first + 1;
            write_marker(copy.path(), keep + 1).unwrap();
            let mut left = list_segments(copy.path()).unwrap();
            for _ in 0..deleted {
                fs::remove_file(left.pop().unwrap().path).unwrap();
            }
            let (log, recovery, records) = open(copy.path(), &opts);
            assert_eq!(recovery.next_seq, keep + 1);
            assert_replayed(&records, keep + 1, &[]);
            assert!(!copy.path().join(TRUNCATE_MARKER).exists());
            assert_eq!(log.append(1, payload(keep + 1)).await.unwrap(), keep + 1);
        }
    }

    #[tokio::test]
    async fn an_unreadable_truncation_intent_is_an_error_not_a_guess() {
        for bytes in [&b""[..], b"CTRN", &[0xff; 16], &[b'C'; 4096]] {
            let dir = TempDir::new("log-truncate-garbage");
            fs::write(dir.path().join(TRUNCATE_MARKER), bytes).unwrap();
            let outcome = Log::open(dir.path(), LogOptions::default(), |_| {});
            assert!(
                matches!(outcome, Err(OpenError::Truncation { .. })),
                "{outcome:?}"
            );
        }
        // A checksum that does not match.
        let dir = TempDir::new("log-truncate-crc");
        write_marker(dir.path(), 5).unwrap();
        let path = dir.path().join(TRUNCATE_MARKER);
        let mut bytes = fs::read(&path).unwrap();
        bytes[5] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            Log::open(dir.path(), LogOptions::default(), |_| {}),
            Err(OpenError::Truncation { .. })
        ));
    }

    #[tokio::test]
    async fn under_always_every_returned_append_is_in_the_durable_image() {
        let dir = TempDir::new("log-image-always");
        let opts = options(256, FsyncPolicy::Always);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..40).await;
        let image = log.durable_image();
        let synced: u64 = image.segments().iter().map(|(_, len)| len).sum();
        assert_eq!(synced, log.bytes_on_disk());
        assert_eq!(image.segments().len() as u64, log.segments());
        // While the log is open the image cannot be applied.
        assert!(matches!(image.apply(), Err(OpenError::Locked { .. })));
        fill(&log, 40..80).await;
        drop(log);
        image.apply().unwrap();
        let (_log, recovery, records) = open(dir.path(), &opts);
        assert_eq!(recovery.truncated_bytes, 0);
        assert_replayed(&records, 40, &[]);
    }

    #[tokio::test]
    async fn applying_the_image_throws_away_what_no_fsync_covered() {
        let dir = TempDir::new("log-image-never");
        let opts = options(256, FsyncPolicy::Never);
        let (log, _, _) = open(dir.path(), &opts);
        fill(&log, 0..30).await;
        log.sync().await.unwrap();
        fill(&log, 30..100).await;
        // Rolled (each roll fsyncs the segment it closes) after the sync.
        let image = log.durable_image();
        let synced: u64 = image.segments().iter().map(|(_, len)| len).sum();
        assert!(synced < log.bytes_on_disk(), "the tail is not synced");
        fill(&log, 100..200).await;
        drop(log);
        image.apply().unwrap();
        let (_log, _, records) = open(dir.path(), &opts);
        let end = records.len() as u64;
        assert!((30..100).contains(&end), "{end} records survived");
        assert_replayed(&records, end, &[]);
    }
}
