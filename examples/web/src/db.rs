//! The tickets database: SQLite through rusqlite, the one backend built
//! in. The service reads it, the worker writes it; both may run several
//! times over one file at once (WAL mode, a busy timeout, idempotent
//! schema, seed and inserts).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::model::{Ticket, MAX_RESULTS};

/// How long a statement waits for another process's write lock before
/// failing with "database is locked".
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening a database keeps retrying `PRAGMA journal_mode = WAL`
/// while another process holds the file: switching to WAL upgrades a read
/// transaction to a write, for which SQLite never calls the busy handler,
/// so [`BUSY_TIMEOUT`] does not cover it.
pub const WAL_SWITCH_DEADLINE: Duration = Duration::from_secs(10);

/// The pause between two tries of the WAL switch.
const WAL_SWITCH_PAUSE: Duration = Duration::from_millis(10);

/// Where the database is, from `--database` / `DATABASE_URL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A private in-memory SQLite database (`sqlite::memory:`), for tests.
    SqliteMemory,
}

/// Why a database URL or the database itself failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL's scheme is not one this build supports.
    #[error("unsupported database URL {url:?}: only sqlite: is built in (e.g. sqlite:///var/lib/tickets.db or sqlite:tickets.db)")]
    UnsupportedScheme {
        /// The URL given.
        url: String,
    },
    /// The URL has the sqlite scheme but no usable path.
    #[error("database URL {url:?} names no file: write sqlite:///absolute/path.db or sqlite:relative.db")]
    NoPath {
        /// The URL given.
        url: String,
    },
    /// The URL has a `%` escape, which is not decoded.
    #[error("database URL {url:?} has a %-escape: write the path's characters as they are")]
    PercentEscape {
        /// The URL given.
        url: String,
    },
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

impl DbError {
    /// Whether the error may pass by itself (another process holds the
    /// lock, the disk is full or failing for now): worth trying again
    /// later rather than giving the work up.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode::*;
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(err, _)) => matches!(
                err.code,
                DatabaseBusy | DatabaseLocked | SystemIoFailure | DiskFull | CannotOpen
            ),
            _ => false,
        }
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = DbError;

    /// `sqlite:///abs/path.db` (an absolute path), `sqlite://rel.db` or
    /// `sqlite:rel.db` (relative to the working directory),
    /// `sqlite::memory:`. The scheme is case-insensitive (`SQLITE:` too);
    /// a `%` escape is refused rather than taken literally or guessed at.
    fn from_str(url: &str) -> Result<DatabaseUrl, DbError> {
        let rest = match url.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("sqlite:") => &url[7..],
            _ => return Err(DbError::UnsupportedScheme { url: url.into() }),
        };
        if rest.contains('%') {
            return Err(DbError::PercentEscape { url: url.into() });
        }
        if rest == ":memory:" || rest == "//:memory:" {
            return Ok(DatabaseUrl::SqliteMemory);
        }
        // `sqlite:///abs` keeps the third slash as the path's root.
        let path = rest.strip_prefix("//").unwrap_or(rest);
        // A query string (`?mode=rwc`) is not interpreted: refusing it is
        // clearer than ignoring it.
        if path.is_empty() || path.ends_with('/') || path.contains('?') {
            return Err(DbError::NoPath { url: url.into() });
        }
        Ok(DatabaseUrl::Sqlite(PathBuf::from(path)))
    }
}

/// The sample tickets every fresh database starts with: fixed ids and
/// times, so two processes seeding at once insert the same rows.
const SEED: &[(&str, &str)] = &[
    (
        "Printer on floor 2 jams on every job",
        "Paper tray B. Started after the toner change on Monday.",
    ),
    (
        "VPN drops every 30 minutes",
        "Reconnects by itself, but calls are cut. macOS and Windows both.",
    ),
    (
        "Onboarding laptop for the new designer",
        "Starts on the 14th. Needs the design suite and a second monitor.",
    ),
    (
        "Wi-Fi slow in meeting room Aurora",
        "Speed tests show 2 Mbit/s near the window.",
    ),
    (
        "Password reset emails arrive late",
        "Up to 20 minutes. Users give up and call the desk.",
    ),
    (
        "Coffee machine shows error E42",
        "Descaling did not help. The vendor's hotline is closed on weekends.",
    ),
    (
        "Expense report export is missing VAT",
        "CSV export drops the VAT column for foreign receipts.",
    ),
    (
        "Calendar invites show the wrong time zone",
        "Only for people who travelled last month.",
    ),
    (
        "Badge reader at the back door rejects valid badges",
        "Works on the second or third try.",
    ),
    (
        "Request: standing desk for the support team",
        "Three desks, ideally before the next quarter.",
    ),
    (
        "Shared drive almost full",
        "92% used. The video archive is most of it.",
    ),
    (
        "Build server runs out of disk nightly",
        "Old artifacts are never cleaned up.",
    ),
    (
        "Phishing email reported by finance",
        "Subject: 'Invoice overdue'. Link goes to a lookalike domain.",
    ),
    (
        "Projector in room Borealis flickers",
        "HDMI cable replaced already; the flicker stays.",
    ),
    (
        "Accounts for the summer interns",
        "Five interns, read-only access to the wiki and the tracker.",
    ),
    (
        "Chat app notifications stopped on Android",
        "Since the last app update. Battery optimisation is off.",
    ),
    (
        "Monitor arm broke at desk 4.12",
        "The clamp cracked. Someone taped it; please replace.",
    ),
    (
        "Timesheet tool logs people out every minute",
        "Looks like a cookie problem in one browser only.",
    ),
    (
        "Second screen not detected after docking",
        "Lenovo dock, firmware up to date.",
    ),
    (
        "Plant in the lobby needs a new home",
        "Not IT, but nobody else answers tickets this fast.",
    ),
];

/// 2025-11-01T00:00:00Z in milliseconds: the first seed's time, one hour
/// apart each after it.
const SEED_EPOCH_MS: i64 = 1_761_955_200_000;

/// One connection to the tickets database, schema and seed in place.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens (creating if needed) the database at `url`, in WAL mode with
    /// [`BUSY_TIMEOUT`], then creates the schema and seeds it if empty.
    pub fn open(url: &DatabaseUrl) -> Result<Db, DbError> {
        let conn = match url {
            DatabaseUrl::Sqlite(path) => Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
            DatabaseUrl::SqliteMemory => Connection::open_in_memory()?,
        };
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL: readers never wait for the writer. (In memory it stays
        // "memory"; fine.)
        let mode = switch_to_wal(&conn, WAL_SWITCH_DEADLINE)?;
        if mode != "wal" && !matches!(url, DatabaseUrl::SqliteMemory) {
            tracing::warn!(%mode, "the database is not in WAL mode; readers will wait for writers");
        }
        // FULL, not NORMAL: in WAL, NORMAL may lose the last commits on a
        // power cut, and the worker acknowledges a write right after its
        // commit, so a lost commit would be a lost ticket.
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        let mut db = Db { conn };
        db.migrate_and_seed()?;
        Ok(db)
    }

    /// The file path, for logs (`None` in memory).
    pub fn path(url: &DatabaseUrl) -> Option<&Path> {
        match url {
            DatabaseUrl::Sqlite(path) => Some(path),
            DatabaseUrl::SqliteMemory => None,
        }
    }

    /// Creates the table if missing and, if it is empty, the sample
    /// tickets, in one immediate transaction: two processes starting
    /// together take turns, and the second finds the rows (or inserts
    /// nothing new, the ids being fixed).
    fn migrate_and_seed(&mut self) -> Result<(), DbError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS tickets (
                 id TEXT PRIMARY KEY NOT NULL,
                 title TEXT NOT NULL,
                 body TEXT NOT NULL,
                 created_at INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS tickets_newest ON tickets (created_at DESC, id DESC);",
        )?;
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM tickets", [], |row| row.get(0))?;
        if count == 0 {
            let mut insert = tx.prepare(
                "INSERT OR IGNORE INTO tickets (id, title, body, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (n, (title, body)) in SEED.iter().enumerate() {
                let id = format!("seed-{:02}", n + 1);
                let at = SEED_EPOCH_MS + n as i64 * 3_600_000;
                insert.execute(params![id, title, body, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Tickets whose title or body contains `query` (case-insensitive for
    /// ASCII, as SQLite's LIKE is), newest first, at most `limit` (capped
    /// at [`MAX_RESULTS`]). An empty query lists the newest.
    pub fn search(&self, query: &str, limit: u32) -> Result<Vec<Ticket>, DbError> {
        let limit = limit.clamp(1, MAX_RESULTS);
        let pattern = format!("%{}%", escape_like(query));
        let mut statement = self.conn.prepare_cached(
            "SELECT id, title, body, created_at FROM tickets
             WHERE title LIKE ?1 ESCAPE '\\' OR body LIKE ?1 ESCAPE '\\'
             ORDER BY created_at DESC, id DESC LIMIT ?2",
        )?;
        let rows = statement.query_map(params![pattern, limit], ticket_of_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// The ticket `id`, if there is one.
    pub fn get(&self, id: &str) -> Result<Option<Ticket>, DbError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT id, title, body, created_at FROM tickets WHERE id = ?1")?;
        Ok(statement.query_row(params![id], ticket_of_row).optional()?)
    }

    /// Stores `ticket` unless its id is there already (a redelivered
    /// write): returns whether it was new. Committed when this returns.
    pub fn insert(&self, ticket: &Ticket) -> Result<bool, DbError> {
        let mut statement = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO tickets (id, title, body, created_at) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let changed = statement.execute(params![
            ticket.id,
            ticket.title,
            ticket.body,
            ticket.created_at
        ])?;
        Ok(changed == 1)
    }

    /// How many tickets there are.
    pub fn count(&self) -> Result<u64, DbError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM tickets", [], |row| row.get(0))?;
        Ok(n.max(0) as u64)
    }
}

/// Sets WAL mode, retrying while another connection holds the file (see
/// [`WAL_SWITCH_DEADLINE`]) until `deadline` from now; returns the mode
/// SQLite reports.
fn switch_to_wal(conn: &Connection, deadline: Duration) -> Result<String, DbError> {
    let give_up = std::time::Instant::now() + deadline;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| {
            row.get::<_, String>(0)
        }) {
            Ok(mode) => return Ok(mode.to_ascii_lowercase()),
            Err(rusqlite::Error::SqliteFailure(err, _))
                if matches!(
                    err.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && std::time::Instant::now() < give_up =>
            {
                std::thread::sleep(WAL_SWITCH_PAUSE);
            }
            Err(err) => return Err(err.into()),
        }
    }
}

fn ticket_of_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Ticket> {
    Ok(Ticket {
        id: row.get(0)?,
        title: row.get(1)?,
        body: row.get(2)?,
        created_at: row.get(3)?,
    })
}

/// `text` with LIKE's wildcards taken literally (escaped with `\`).
fn escape_like(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database file in a fresh temporary directory, removed on drop.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(name: &str) -> TempDb {
            let dir = std::env::temp_dir().join(format!(
                "courier-web-db-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDb(dir)
        }
        fn url(&self) -> DatabaseUrl {
            DatabaseUrl::Sqlite(self.0.join("tickets.db"))
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ticket(id: &str, title: &str, at: i64) -> Ticket {
        Ticket {
            id: id.into(),
            title: title.into(),
            body: "body".into(),
            created_at: at,
        }
    }

    #[test]
    fn urls_name_sqlite_files_and_refuse_other_schemes() {
        let parse = |s: &str| s.parse::<DatabaseUrl>();
        assert_eq!(
            parse("sqlite:///var/lib/tickets.db").unwrap(),
            DatabaseUrl::Sqlite("/var/lib/tickets.db".into())
        );
        assert_eq!(
            parse("sqlite:tickets.db").unwrap(),
            DatabaseUrl::Sqlite("tickets.db".into())
        );
        assert_eq!(
            parse("sqlite://data/tickets.db").unwrap(),
            DatabaseUrl::Sqlite("data/tickets.db".into())
        );
        assert_eq!(parse("sqlite::memory:").unwrap(), DatabaseUrl::SqliteMemory);
        let err = parse("postgres://db/tickets").unwrap_err();
        assert!(matches!(err, DbError::UnsupportedScheme { .. }));
        assert!(
            err.to_string().contains("only sqlite: is built in"),
            "{err}"
        );
        assert!(matches!(parse("sqlite://"), Err(DbError::NoPath { .. })));
        assert!(matches!(
            parse("sqlite:///tmp/"),
            Err(DbError::NoPath { .. })
        ));
        assert!(matches!(
            parse("sqlite:x.db?mode=ro"),
            Err(DbError::NoPath { .. })
        ));
        assert_eq!(
            parse("SQLite:///tmp/t.db").unwrap(),
            DatabaseUrl::Sqlite("/tmp/t.db".into())
        );
        assert!(matches!(
            parse("sqlite:///tmp/my%20db.db"),
            Err(DbError::PercentEscape { .. })
        ));
        assert!(matches!(
            parse("sqlit"),
            Err(DbError::UnsupportedScheme { .. })
        ));
    }

    #[test]
    fn a_locked_database_is_a_transient_error() {
        let temp = TempDb::new("locked");
        let db = Db::open(&temp.url()).unwrap();
        let holder = Db::open(&temp.url()).unwrap();
        holder.conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        db.conn.busy_timeout(Duration::from_millis(10)).unwrap();
        let err = db.insert(&ticket("t-9", "x", 1)).unwrap_err();
        assert!(err.is_transient(), "{err}");
        holder.conn.execute_batch("ROLLBACK").unwrap();
        assert!(db.insert(&ticket("t-9", "x", 1)).unwrap());
        let bad = DbError::NoPath { url: "x".into() };
        assert!(!bad.is_transient());
    }

    #[test]
    fn a_fresh_database_is_durable_on_commit() {
        let temp = TempDb::new("sync");
        let db = Db::open(&temp.url()).unwrap();
        // 2 = FULL.
        let sync: i64 = db
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
    }

    #[test]
    fn a_fresh_database_is_seeded_once() {
        let temp = TempDb::new("seed");
        let db = Db::open(&temp.url()).unwrap();
        assert_eq!(db.count().unwrap(), SEED.len() as u64);
        drop(db);
        // Opening again (or a second process) adds nothing.
        let again = Db::open(&temp.url()).unwrap();
        let other = Db::open(&temp.url()).unwrap();
        assert_eq!(again.count().unwrap(), SEED.len() as u64);
        assert_eq!(other.count().unwrap(), SEED.len() as u64);
        let mode: String = again
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn two_processes_seeding_at_once_insert_each_row_once() {
        let temp = TempDb::new("race");
        let url = temp.url();
        // Repeated on fresh files: the WAL switch's lock race is rare.
        for round in 0..10 {
            let _ = std::fs::remove_file(url_path(&url));
            let _ = std::fs::remove_file(url_path(&url).with_extension("db-wal"));
            let _ = std::fs::remove_file(url_path(&url).with_extension("db-shm"));
            open_together(&url, round);
        }
    }

    fn url_path(url: &DatabaseUrl) -> PathBuf {
        Db::path(url).unwrap().to_path_buf()
    }

    fn open_together(url: &DatabaseUrl, round: usize) {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || Db::open(&url).map(|db| db.count().unwrap()))
            })
            .collect();
        for t in threads {
            let count = t.join().unwrap();
            assert_eq!(count.unwrap(), SEED.len() as u64, "round {round}");
        }
    }

    #[test]
    fn search_finds_by_title_or_body_newest_first_and_bounded() {
        let db = Db::open(&DatabaseUrl::SqliteMemory).unwrap();
        let all = db.search("", 1000).unwrap();
        assert_eq!(all.len(), SEED.len().min(MAX_RESULTS as usize));
        assert!(all.windows(2).all(|w| w[0].created_at >= w[1].created_at));
        assert_eq!(all[0].id, format!("seed-{:02}", SEED.len()));

        let printer = db.search("printer", 10).unwrap();
        assert_eq!(printer.len(), 1, "{printer:?}");
        assert_eq!(printer[0].id, "seed-01");
        // In the body only.
        let toner = db.search("TONER", 10).unwrap();
        assert_eq!(toner.len(), 1);
        assert_eq!(db.search("", 3).unwrap().len(), 3);
        assert!(db.search("no such words anywhere", 10).unwrap().is_empty());
    }

    #[test]
    fn like_wildcards_in_a_query_are_literal() {
        let db = Db::open(&DatabaseUrl::SqliteMemory).unwrap();
        // "92%" is in one body; "%" alone must not match everything.
        assert_eq!(db.search("92%", 10).unwrap().len(), 1);
        assert!(db.search("%%", 50).unwrap().is_empty());
        assert!(db.search("_", 50).unwrap().is_empty());
        // Quotes are data, not SQL.
        assert!(db
            .search("'; DROP TABLE tickets; --", 10)
            .unwrap()
            .is_empty());
        assert_eq!(db.count().unwrap(), SEED.len() as u64);
    }

    #[test]
    fn insert_is_idempotent_by_id_and_shows_up_first() {
        let db = Db::open(&DatabaseUrl::SqliteMemory).unwrap();
        let new = ticket("t-1", "Keyboard missing keys", i64::MAX / 2);
        assert!(db.insert(&new).unwrap());
        // A redelivery of the same write changes nothing.
        let mut again = new.clone();
        again.title = "changed".into();
        assert!(!db.insert(&again).unwrap());
        assert_eq!(db.get("t-1").unwrap().unwrap(), new);
        assert_eq!(db.search("", 1).unwrap()[0], new);
        assert_eq!(db.get("nope").unwrap(), None);
        assert_eq!(db.count().unwrap(), SEED.len() as u64 + 1);
    }
}
