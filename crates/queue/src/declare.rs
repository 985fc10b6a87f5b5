//! Per-queue options a client sets when it declares a queue, and how they
//! are kept with the queue.
//!
//! A declaration names only what it sets; everything else is the host's
//! default ([`QueueConfig`], from the broker's config). It is stored in a
//! small text file in the queue's directory, written atomically, so a
//! restarted host opens the queue with the same options. Options cannot
//! change under a queue: declaring it again with other options is refused
//! ([`QueueError::OptionsConflict`], [`ErrorKind::Conflict`](crate::ErrorKind::Conflict)),
//! as RabbitMQ refuses a redeclaration with other arguments. A queue that
//! was created without a declaration (by a first enqueue, say) counts as
//! declared with none.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::core::QueueConfig;
use crate::log::OpenError;
use crate::QueueError;

/// The most deliveries a declaration may allow before dead-lettering.
pub const MAX_DELIVERIES_LIMIT: u32 = 1000;
/// The shortest lease a declaration may set.
pub const MIN_LEASE: Duration = Duration::from_millis(10);
/// The longest lease a declaration may set.
pub const MAX_LEASE: Duration = Duration::from_secs(24 * 3600);

/// The file, in a queue's directory, that keeps its declaration.
const FILE: &str = "declared";
/// A declaration file is a few lines; a larger one is damage.
const MAX_FILE_BYTES: u64 = 4096;

/// What a client sets for one queue when declaring it; `None` leaves the
/// host's default. Validated ([`QueueDeclaration::validate`]) before
/// anything is stored.
///
/// ```
/// use std::time::Duration;
/// use courier_queue::QueueDeclaration;
///
/// let poison_averse = QueueDeclaration::new()
///     .with_max_deliveries(2)
///     .with_lease(Duration::from_secs(5));
/// assert!(poison_averse.validate().is_ok());
/// assert!(QueueDeclaration::new().with_max_deliveries(0).validate().is_err());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct QueueDeclaration {
    /// Deliveries after which a returning message is dead-lettered
    /// (1 to [`MAX_DELIVERIES_LIMIT`]).
    pub max_deliveries: Option<u32>,
    /// How long a delivery is leased before it is given to someone else:
    /// the visibility timeout ([`MIN_LEASE`] to [`MAX_LEASE`]).
    pub lease: Option<Duration>,
    /// Whether a message that has used its deliveries goes to the
    /// dead-letter queue (`true`) or keeps coming back (`false`). A
    /// rejected message goes there either way.
    pub dead_lettering: Option<bool>,
}

impl QueueDeclaration {
    /// A declaration that sets nothing.
    pub fn new() -> QueueDeclaration {
        QueueDeclaration::default()
    }

    /// With a delivery limit.
    pub fn with_max_deliveries(mut self, limit: u32) -> QueueDeclaration {
        self.max_deliveries = Some(limit);
        self
    }

    /// With a lease (visibility timeout).
    pub fn with_lease(mut self, lease: Duration) -> QueueDeclaration {
        self.lease = Some(lease);
        self
    }

    /// With dead-lettering on or off.
    pub fn with_dead_lettering(mut self, on: bool) -> QueueDeclaration {
        self.dead_lettering = Some(on);
        self
    }

    /// Whether it sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == QueueDeclaration::default()
    }

    /// Checks every value against its bounds;
    /// [`QueueError::InvalidOption`] names the first out of them.
    pub fn validate(&self) -> Result<(), QueueError> {
        if let Some(limit) = self.max_deliveries {
            if !(1..=MAX_DELIVERIES_LIMIT).contains(&limit) {
                return Err(QueueError::InvalidOption {
                    option: "max_deliveries",
                    reason: format!("{limit} is not within 1 to {MAX_DELIVERIES_LIMIT}"),
                });
            }
        }
        if let Some(lease) = self.lease {
            if !(MIN_LEASE..=MAX_LEASE).contains(&lease) {
                return Err(QueueError::InvalidOption {
                    option: "lease",
                    reason: format!("{lease:?} is not within {MIN_LEASE:?} to {MAX_LEASE:?}"),
                });
            }
            // Stored in milliseconds: a finer lease would come back other
            // than declared after a restart, and then conflict with itself.
            if lease.subsec_nanos() % 1_000_000 != 0 {
                return Err(QueueError::InvalidOption {
                    option: "lease",
                    reason: format!("{lease:?} is not a whole number of milliseconds"),
                });
            }
        }
        Ok(())
    }

    /// `config` with what this sets.
    pub(crate) fn apply(&self, mut config: QueueConfig) -> QueueConfig {
        if let Some(limit) = self.max_deliveries {
            config.max_deliveries = limit;
        }
        if let Some(lease) = self.lease {
            config.visibility_timeout = lease;
        }
        if let Some(on) = self.dead_lettering {
            config.dead_lettering = on;
        }
        config
    }

    fn to_text(&self) -> String {
        let mut text = String::from("# courier-queue: the options this queue was declared with\n");
        if let Some(limit) = self.max_deliveries {
            text.push_str(&format!("max_deliveries={limit}\n"));
        }
        if let Some(lease) = self.lease {
            text.push_str(&format!("lease_ms={}\n", lease.as_millis()));
        }
        if let Some(on) = self.dead_lettering {
            text.push_str(&format!("dead_lettering={on}\n"));
        }
        text
    }

    /// Reads what [`QueueDeclaration::to_text`] wrote. Anything else (an
    /// unknown key, a bad value) is refused: guessing would open the queue
    /// with options nobody declared.
    fn from_text(text: &str) -> Result<QueueDeclaration, String> {
        let mut declared = QueueDeclaration::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("not key=value: {line:?}"))?;
            let bad = || format!("bad value for {key}: {value:?}");
            match key {
                "max_deliveries" => {
                    declared.max_deliveries = Some(value.parse().map_err(|_| bad())?)
                }
                "lease_ms" => {
                    declared.lease = Some(Duration::from_millis(value.parse().map_err(|_| bad())?))
                }
                "dead_lettering" => {
                    declared.dead_lettering = Some(value.parse().map_err(|_| bad())?)
                }
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        declared.validate().map_err(|err| err.to_string())?;
        Ok(declared)
    }
}

/// The declaration stored for the queue whose log is `queue_dir`: `None` if
/// the queue does not exist yet, an empty one if it exists undeclared.
pub(crate) fn load(queue: &str, queue_dir: &Path) -> Result<Option<QueueDeclaration>, QueueError> {
    if !exists(queue_dir) {
        return Ok(None);
    }
    let path = queue_dir.join(FILE);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(QueueDeclaration::default()))
        }
        Err(source) => return Err(QueueError::Open(OpenError::Io { path, source })),
    };
    let mut text = String::new();
    // Bounded: the file is a few lines, and damage must not fill memory.
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
        &mut text,
    )
    .map_err(|source| {
        QueueError::Open(OpenError::Io {
            path: path.clone(),
            source,
        })
    })?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(QueueError::StoredOptions {
            queue: queue.to_string(),
            reason: format!("its file is larger than {MAX_FILE_BYTES} bytes"),
        });
    }
    QueueDeclaration::from_text(&text)
        .map(Some)
        .map_err(|reason| QueueError::StoredOptions {
            queue: queue.to_string(),
            reason,
        })
}

/// Whether the queue whose log is `queue_dir` exists: its directory holds
/// something beyond a declaration that was never put in place. A first
/// declaration that failed (a full disk, a crash before its rename) leaves
/// the directory with at most `declared.tmp`; that queue does not exist
/// yet, so declaring it again is not a conflict with "declared with
/// nothing".
fn exists(queue_dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(queue_dir) else {
        return false;
    };
    let temporary = format!("{FILE}.tmp");
    entries
        .filter_map(Result::ok)
        .any(|entry| entry.file_name() != temporary.as_str())
}

/// Stores `declared` for the queue whose log is `queue_dir` (creating the
/// directory): written to a temporary file, synced, renamed over the old,
/// and the directory synced, so a crash leaves the old file or the new.
pub(crate) fn store(queue_dir: &Path, declared: &QueueDeclaration) -> Result<(), QueueError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QueueError::Open(OpenError::Io { path, source })
    };
    std::fs::create_dir_all(queue_dir).map_err(io(queue_dir))?;
    let temporary = queue_dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::File::create(&temporary).map_err(io(&temporary))?;
    file.write_all(declared.to_text().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&temporary))?;
    let path = queue_dir.join(FILE);
    std::fs::rename(&temporary, &path).map_err(io(&path))?;
    std::fs::File::open(queue_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io(queue_dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_damage_is_refused() {
        for declared in [
            QueueDeclaration::new(),
            QueueDeclaration::new().with_max_deliveries(3),
            QueueDeclaration::new()
                .with_lease(Duration::from_millis(1500))
                .with_dead_lettering(false)
                .with_max_deliveries(1000),
        ] {
            assert_eq!(
                QueueDeclaration::from_text(&declared.to_text()),
                Ok(declared)
            );
        }
        for damaged in [
            "max_deliveries=zero",
            "max_deliveries=0",
            "lease_ms=1",
            "dead_lettering=maybe",
            "colour=blue",
            "no equals sign",
        ] {
            assert!(QueueDeclaration::from_text(damaged).is_err(), "{damaged}");
        }
    }

    #[test]
    fn bounds_are_checked_and_named() {
        let cases = [
            (
                QueueDeclaration::new().with_max_deliveries(0),
                "max_deliveries",
            ),
            (
                QueueDeclaration::new().with_max_deliveries(MAX_DELIVERIES_LIMIT + 1),
                "max_deliveries",
            ),
            (QueueDeclaration::new().with_lease(Duration::ZERO), "lease"),
            (
                QueueDeclaration::new().with_lease(MAX_LEASE + Duration::from_millis(1)),
                "lease",
            ),
            // Stored in milliseconds: a finer lease would change on restart.
            (
                QueueDeclaration::new().with_lease(Duration::from_micros(1_500_500)),
                "lease",
            ),
        ];
        for (declared, named) in cases {
            match declared.validate() {
                Err(QueueError::InvalidOption { option, .. }) => assert_eq!(option, named),
                other => panic!("{declared:?}: {other:?}"),
            }
        }
        assert!(QueueDeclaration::new()
            .with_max_deliveries(1)
            .with_lease(MIN_LEASE)
            .validate()
            .is_ok());
    }

    /// A first declaration that never got its file into place leaves a
    /// directory with at most `declared.tmp`: the queue does not exist, so
    /// the retry is a first declaration, not a conflict.
    #[test]
    fn a_failed_first_declaration_leaves_no_queue() {
        let dir = std::env::temp_dir().join(format!(
            "courier-declare-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let queue_dir = dir.join("jobs");
        std::fs::create_dir_all(&queue_dir).unwrap();
        assert_eq!(
            load("jobs", &queue_dir).unwrap(),
            None,
            "an empty directory"
        );
        std::fs::write(queue_dir.join(format!("{FILE}.tmp")), "max_deliveries=2\n").unwrap();
        assert_eq!(
            load("jobs", &queue_dir).unwrap(),
            None,
            "only the temporary file"
        );
        let declared = QueueDeclaration::new().with_max_deliveries(2);
        store(&queue_dir, &declared).unwrap();
        assert_eq!(load("jobs", &queue_dir).unwrap(), Some(declared));
        // A queue that exists without a declaration (its log is there).
        std::fs::remove_file(queue_dir.join(FILE)).unwrap();
        std::fs::write(queue_dir.join("00000000000000000000.log"), b"").unwrap();
        assert_eq!(
            load("jobs", &queue_dir).unwrap(),
            Some(QueueDeclaration::default())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
