//! [`QueueSet`]: the queues under one directory, each opened once. A
//! local concept — durable subscriptions and a broker's stats use it as
//! much as the remote host does — so it lives outside `remote`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{Queue, QueueError, QueueOptions};

/// The queues under one directory, each opened once and shared by whoever
/// uses it (the queue protocol, durable subscriptions, a broker's stats).
/// Cheap to clone.
#[derive(Clone)]
pub struct QueueSet {
    inner: Arc<QueueSetInner>,
}

struct QueueSetInner {
    dir: PathBuf,
    options: QueueOptions,
    queues: tokio::sync::Mutex<HashMap<String, Queue>>,
}

impl std::fmt::Debug for QueueSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSet")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl QueueSet {
    /// The queues under `dir`, opened on first use with `options`.
    pub fn new(dir: impl Into<PathBuf>, options: QueueOptions) -> QueueSet {
        QueueSet {
            inner: Arc::new(QueueSetInner {
                dir: dir.into(),
                options,
                queues: tokio::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Serves `queue` under its name, as if opened here (for tests that
    /// watch what a queue writes).
    #[cfg(all(test, feature = "remote"))]
    pub(crate) async fn adopt(&self, queue: Queue) {
        let name = queue.name().to_string();
        self.inner.queues.lock().await.insert(name, queue);
    }

    /// Where the queues live.
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }

    /// The queue `name`, opened (and recovered, or created) on first use.
    ///
    /// `<queue>.dlq` is the dead-letter queue that `<queue>` owns (opening
    /// `<queue>` if needed): the same one, shared, since a queue's log can
    /// be open only once.
    pub async fn open(&self, name: &str) -> Result<Queue, QueueError> {
        self.get(name, true).await
    }

    /// The queue `name` if it is open or stored under the directory;
    /// [`QueueError::NotFound`] otherwise, creating nothing.
    pub async fn open_existing(&self, name: &str) -> Result<Queue, QueueError> {
        self.get(name, false).await
    }

    /// The queue `name` with the options a client declares for it (see
    /// [`Queue::open_declared`]): created with them if it is new, checked
    /// against its own if it exists or is open
    /// ([`QueueError::OptionsConflict`] if they differ). Options not
    /// declared are this set's.
    pub async fn declare(
        &self,
        name: &str,
        declared: crate::QueueDeclaration,
    ) -> Result<Queue, QueueError> {
        declared.validate()?;
        let mut queues = self.inner.queues.lock().await;
        if let Some(queue) = queues.get(name) {
            queue.check_declared(declared)?;
            return Ok(queue.clone());
        }
        if Queue::dead_letter_parent(name).is_some() {
            // Refused by `open_declared`, but its queue may be open here.
            return Err(QueueError::InvalidOption {
                option: "queue",
                reason: format!("{name} is a dead-letter queue, which takes its queue's options"),
            });
        }
        let queue =
            Queue::open_declared(&self.inner.dir, name, self.inner.options.clone(), declared)
                .await?;
        queues.insert(name.to_string(), queue.clone());
        Ok(queue)
    }

    async fn get(&self, name: &str, create: bool) -> Result<Queue, QueueError> {
        let parent = Queue::dead_letter_parent(name);
        let owner = parent.unwrap_or(name);
        if Queue::dead_letter_parent(owner).is_some() {
            // A dead-letter queue has no dead-letter queue of its own.
            return Err(QueueError::NotFound(name.to_string()));
        }
        let mut queues = self.inner.queues.lock().await;
        let queue = match queues.get(owner) {
            Some(queue) => queue.clone(),
            None => {
                if !create {
                    // Checked before touching the disk: the name becomes a
                    // path below.
                    if !Queue::valid_name(name) {
                        return Err(QueueError::InvalidName(name.to_string()));
                    }
                    let stored = |n: &str| self.inner.dir.join(n).is_dir();
                    if !stored(owner) && !stored(name) {
                        return Err(QueueError::NotFound(name.to_string()));
                    }
                }
                let queue = Queue::open(&self.inner.dir, owner, self.inner.options.clone()).await?;
                queues.insert(owner.to_string(), queue.clone());
                queue
            }
        };
        match parent {
            None => Ok(queue),
            Some(_) => queue
                .dead_letters()
                .ok_or_else(|| QueueError::NotFound(name.to_string())),
        }
    }

    /// The queues open now, by name (dead-letter queues through their
    /// queue's [`Queue::dead_letters`]).
    pub async fn opened(&self) -> Vec<Queue> {
        let mut queues: Vec<Queue> = self.inner.queues.lock().await.values().cloned().collect();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        queues
    }

    /// Forgets every open queue. Each closes (its log flushed and fsynced)
    /// when the last handle to it goes, here if nobody else holds one.
    pub async fn close_all(&self) {
        let queues: Vec<Queue> = self
            .inner
            .queues
            .lock()
            .await
            .drain()
            .map(|(_, q)| q)
            .collect();
        drop(queues);
    }

    /// Opens every queue found in the directory (not their `.dlq`s, which
    /// open with them), so that a restarted host serves them at once.
    pub async fn open_all(&self) -> Result<Vec<Queue>, QueueError> {
        let mut names = Vec::new();
        match std::fs::read_dir(&self.inner.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    // Hidden directories are never queues (a queue name
                    // cannot start with a dot): the cluster's Raft state
                    // lives in `.cluster` beside the queues.
                    if entry.path().is_dir() && !name.ends_with(".dlq") && !name.starts_with('.') {
                        names.push(name);
                    }
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(QueueError::Open(crate::log::OpenError::Io {
                    path: self.inner.dir.clone(),
                    source,
                }))
            }
        }
        names.sort();
        for name in names {
            self.open(&name).await?;
        }
        Ok(self.opened().await)
    }
}
