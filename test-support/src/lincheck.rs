//! A linearizability checker for histories of registers (std only).
//!
//! Concurrent clients record every operation they run against a store:
//! what they called, on which key, when they called it (`invoke`), when
//! the answer came back (`complete`) and what it was. [`check`] decides
//! whether some order of the operations, each taking effect at one
//! instant between its invoke and its completion, explains every answer
//! with a plain sequential register per key, empty at the start.
//!
//! # Model
//!
//! - Each key is its own register. Linearizability is local (Herlihy &
//!   Wing): a history is linearizable iff each key's sub-history is, so
//!   keys are checked one at a time, which keeps each search small.
//! - Every value is written at most once per key (by a put or a
//!   compare-and-set); a history breaking this is [`Violation::Malformed`].
//!   Clients make values unique by embedding their id and a counter.
//! - Times are ticks of one monotonic counter. Operation `a` precedes `b`
//!   iff `a.complete < b.invoke`; equal ticks count as concurrent.
//! - [`Outcome::Unknown`]: the call timed out or its connection died. It
//!   may or may not have taken effect, at any time after its invoke, so it
//!   is treated as never completing (its `complete` is ignored). An
//!   unknown get tells nothing and is dropped. An unknown put or
//!   compare-and-set that never took effect is indistinguishable from one
//!   that took effect after everything else, which the search may choose.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's memoization, as in Knossos and
//! Porcupine: the operations not yet placed are a list of calls and
//! completions in time order; the candidates to take effect next are the
//! calls before the first completion (everything that must come before
//! them is placed). Place a candidate whose answer the register's state
//! explains, recurse, and backtrack when no candidate works. A cache of
//! (set of operations placed, register state) skips every configuration
//! already explored (the set kept as a 128-bit fingerprint, so memory per
//! entry does not grow with the history). The search is bounded by a number of steps per key;
//! past it the answer is [`Violation::Undecided`] rather than a long wait.
//!
//! What keeps it fast on real histories (each step below leaves the set of
//! orders that explain the history unchanged, so the verdict is the same;
//! a test checks the verdicts against brute force):
//!
//! - Candidates are tried earliest deadline first, unknown ones last: the
//!   operation that must be placed soonest usually should be.
//! - A get or failed compare-and-set that the state explains is placed
//!   without trying alternatives: it changes nothing, and nothing that
//!   must precede it is unplaced, so if any order works, one with it
//!   placed now does.
//! - An unknown write whose value a completed operation saw did take
//!   effect (only it wrote that value), before that sighting's completion:
//!   it is given that completion (a compare-and-set: and success).
//! - Values that no get returned and no compare-and-set expected are all
//!   one value to the search: nothing can tell them apart, so more states
//!   are equal in the cache, and unknown puts of such values, all open
//!   forever, are interchangeable: trying one tries them all.
//! - An unknown put nobody saw is dropped when the key has no
//!   compare-and-set that failed or whose outcome is unknown: nothing
//!   could observe it, and it can always be placed last.
//!
//! Histories of a few hundred operations per key from a handful of
//! concurrent clients take thousands of steps. Many mutually concurrent
//! writes, or many unknown outcomes next to failed compare-and-sets, can
//! still take exponentially many: that is what the step bound is for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::Hash;

/// The steps [`check`] allows per key before answering
/// [`Violation::Undecided`]. Each step adds at most one entry (about 50
/// bytes) to the search's cache, so this bounds memory too.
pub const DEFAULT_MAX_STEPS: u64 = 1_000_000;

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op<V = String> {
    /// Who ran it (for the report only).
    pub client: usize,
    /// The register.
    pub key: String,
    /// What was asked.
    pub call: Call<V>,
    /// What came back.
    pub outcome: Outcome<V>,
    /// When it was called.
    pub invoke: u64,
    /// When the answer came back (ignored for [`Outcome::Unknown`]).
    pub complete: u64,
}

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call<V = String> {
    /// Write a value.
    Put(V),
    /// Read the value.
    Get,
    /// Write `new` if the register holds `expected` (`None`: only if it
    /// holds nothing).
    Cas {
        /// What the register must hold.
        expected: Option<V>,
        /// What to write.
        new: V,
    },
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<V = String> {
    /// A put or get completed: `None` for a put; for a get the value read
    /// (`None`: there was none).
    Ok(Option<V>),
    /// A compare-and-set completed: whether it wrote.
    Cas(bool),
    /// No answer (timeout, lost connection): it may or may not have taken
    /// effect.
    Unknown,
}

impl<V> Op<V> {
    /// A completed put.
    pub fn put(client: usize, key: &str, value: V, invoke: u64, complete: u64) -> Op<V> {
        Op {
            client,
            key: key.into(),
            call: Call::Put(value),
            outcome: Outcome::Ok(None),
            invoke,
            complete,
        }
    }

    /// A completed get that read `read`.
    pub fn get(client: usize, key: &str, read: Option<V>, invoke: u64, complete: u64) -> Op<V> {
        Op {
            client,
            key: key.into(),
            call: Call::Get,
            outcome: Outcome::Ok(read),
            invoke,
            complete,
        }
    }

    /// A completed compare-and-set.
    pub fn cas(
        client: usize,
        key: &str,
        expected: Option<V>,
        new: V,
        succeeded: bool,
        invoke: u64,
        complete: u64,
    ) -> Op<V> {
        Op {
            client,
            key: key.into(),
            call: Call::Cas { expected, new },
            outcome: Outcome::Cas(succeeded),
            invoke,
            complete,
        }
    }

    /// The same call with its outcome unknown.
    pub fn unknown(self) -> Op<V> {
        Op {
            outcome: Outcome::Unknown,
            ..self
        }
    }
}

/// Why a history is not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// No order of the key's operations explains the answers.
    NotLinearizable {
        /// The key.
        key: String,
        /// The operations involved (indexes into the history): the last
        /// ones placed by the longest partial order found, and those that
        /// could have come next when it got stuck.
        ops: Vec<usize>,
        /// What went wrong, with those operations spelled out.
        description: String,
    },
    /// The search gave up after `steps` steps on this key.
    Undecided {
        /// The key.
        key: String,
        /// Steps taken.
        steps: u64,
    },
    /// The history itself is wrong (an answer of the wrong kind, a
    /// completion before the invoke, a value written twice).
    Malformed {
        /// The key.
        key: String,
        /// The offending operation (index into the history).
        op: usize,
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotLinearizable { description, .. } => f.write_str(description),
            Violation::Undecided { key, steps } => write!(
                f,
                "key {key:?}: undecided, the search gave up after {steps} steps"
            ),
            Violation::Malformed { key, op, reason } => {
                write!(
                    f,
                    "key {key:?}: malformed history at operation #{op}: {reason}"
                )
            }
        }
    }
}

impl std::error::Error for Violation {}

/// Checks `history` with [`DEFAULT_MAX_STEPS`] per key.
pub fn check<V: Eq + Hash + fmt::Debug>(history: &[Op<V>]) -> Result<(), Violation> {
    check_with_steps(history, DEFAULT_MAX_STEPS)
}

/// Checks `history`, allowing `max_steps` search steps per key. Keys are
/// checked in key order; the first violation found is returned.
pub fn check_with_steps<V: Eq + Hash + fmt::Debug>(
    history: &[Op<V>],
    max_steps: u64,
) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, op) in history.iter().enumerate() {
        by_key.entry(op.key.as_str()).or_default().push(index);
    }
    for (key, indexes) in by_key {
        KeyHistory::new(history, key, &indexes)?.search(max_steps)?;
    }
    Ok(())
}

/// A value, interned: its index among the key's distinct values.
type Value = u32;

/// Every value that nothing reads or expects (see [`KeyHistory::new`]).
const ANONYMOUS: Value = Value::MAX;

/// An operation as the search sees it.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A put, known or unknown: it writes whenever it is placed.
    Put(Value),
    /// A completed get.
    Get(Option<Value>),
    /// A compare-and-set; `succeeded` is `None` when unknown.
    Cas {
        expected: Option<Value>,
        new: Value,
        succeeded: Option<bool>,
    },
}

impl Step {
    /// The register's state after this step from `state`, or `None` if
    /// the step's answer contradicts `state`.
    fn apply(self, state: Option<Value>) -> Option<Option<Value>> {
        match self {
            Step::Put(value) => Some(Some(value)),
            Step::Get(read) => (read == state).then_some(state),
            Step::Cas {
                expected,
                new,
                succeeded,
            } => {
                let hit = state == expected;
                if succeeded.is_some_and(|s| s != hit) {
                    None
                } else if hit {
                    Some(Some(new))
                } else {
                    Some(state)
                }
            }
        }
    }
}

/// One key's operations, ready to search.
struct KeyHistory<'h, V> {
    history: &'h [Op<V>],
    key: &'h str,
    /// Per search operation: its index in `history`, its step, its invoke
    /// and its completion (`u64::MAX` when unknown).
    index: Vec<usize>,
    steps: Vec<Step>,
    invoke: Vec<u64>,
    complete: Vec<u64>,
    /// Interned values, for the report.
    values: Vec<&'h V>,
}

/// The end of the list in [`List`].
const NIL: usize = usize::MAX;

impl<'h, V: Eq + Hash + fmt::Debug> KeyHistory<'h, V> {
    fn new(history: &'h [Op<V>], key: &'h str, indexes: &[usize]) -> Result<Self, Violation> {
        let malformed = |op: usize, reason: String| Violation::Malformed {
            key: key.to_string(),
            op,
            reason,
        };
        let mut ids: HashMap<&'h V, Value> = HashMap::new();
        let mut values: Vec<&'h V> = Vec::new();
        let mut intern = |value: &'h V| -> Value {
            *ids.entry(value).or_insert_with(|| {
                values.push(value);
                (values.len() - 1) as Value
            })
        };
        // Which operation wrote each value, to refuse a second writer.
        let mut writer: HashMap<Value, usize> = HashMap::new();
        let mut ops = Vec::new();
        for &i in indexes {
            let op = &history[i];
            let known = op.outcome != Outcome::Unknown;
            if known && op.complete < op.invoke {
                return Err(malformed(
                    i,
                    format!(
                        "completes at {} before its invoke at {}",
                        op.complete, op.invoke
                    ),
                ));
            }
            let step = match (&op.call, &op.outcome) {
                (Call::Get, Outcome::Unknown) => continue,
                (Call::Get, Outcome::Ok(read)) => Step::Get(read.as_ref().map(&mut intern)),
                (Call::Put(value), Outcome::Ok(None) | Outcome::Unknown) => {
                    Step::Put(intern(value))
                }
                (Call::Cas { expected, new }, Outcome::Cas(_) | Outcome::Unknown) => Step::Cas {
                    expected: expected.as_ref().map(&mut intern),
                    new: intern(new),
                    succeeded: match op.outcome {
                        Outcome::Cas(succeeded) => Some(succeeded),
                        _ => None,
                    },
                },
                (call, outcome) => {
                    return Err(malformed(i, format!("{call:?} cannot answer {outcome:?}")))
                }
            };
            if let Step::Put(value) | Step::Cas { new: value, .. } = step {
                if let Some(first) = writer.insert(value, i) {
                    return Err(malformed(
                        i,
                        format!(
                            "writes {:?}, already written by operation #{first}: values must be unique per key",
                            values[value as usize]
                        ),
                    ));
                }
            }
            ops.push((i, step, known));
        }

        // An unknown write whose value was seen did take effect (values
        // are unique: nothing else wrote it), and before the first
        // completion that saw it: close it there, a compare-and-set as
        // succeeded. It is then as constrained as a completed write. A
        // sighting is a completed get reading the value, or a
        // compare-and-set known (or so closed) to have succeeded expecting
        // it; closing one can close the writer it expected, so repeat
        // until nothing changes (each pass that changes something lowers
        // some deadline towards a sighting, so n + 1 passes suffice).
        let mut complete: Vec<u64> = ops
            .iter()
            .map(|&(i, _, known)| if known { history[i].complete } else { u64::MAX })
            .collect();
        for _ in 0..=ops.len() {
            let mut first_seen: HashMap<Value, u64> = HashMap::new();
            for (&(_, step, _), &done) in ops.iter().zip(&complete) {
                let seen = match step {
                    Step::Get(Some(value)) => Some(value),
                    Step::Cas {
                        expected: Some(value),
                        succeeded: Some(true),
                        ..
                    } => Some(value),
                    _ => None,
                };
                if let (Some(value), true) = (seen, done != u64::MAX) {
                    let at = first_seen.entry(value).or_insert(u64::MAX);
                    *at = (*at).min(done);
                }
            }
            let mut changed = false;
            for ((i, step, known), done) in ops.iter_mut().zip(&mut complete) {
                let (Step::Put(value) | Step::Cas { new: value, .. }) = *step else {
                    continue;
                };
                if *known {
                    continue;
                }
                let Some(&at) = first_seen.get(&value) else {
                    continue;
                };
                // A sighting before the invoke cannot be explained; the
                // search finds that (the sighting's completion comes
                // before the write's call).
                let at = at.max(history[*i].invoke);
                if at < *done {
                    *done = at;
                    if let Step::Cas { succeeded, .. } = step {
                        *succeeded = Some(true);
                    }
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // A value no get returned and no compare-and-set expected is
        // anonymous: no operation can tell it from another such value, so
        // the search writes them all as one, `ANONYMOUS`, and the cache
        // sees equal states as equal.
        let mut compared: HashSet<Value> = HashSet::new();
        for &(_, step, _) in &ops {
            match step {
                Step::Get(Some(value))
                | Step::Cas {
                    expected: Some(value),
                    ..
                } => {
                    compared.insert(value);
                }
                _ => {}
            }
        }
        for (_, step, _) in &mut ops {
            if let Step::Put(value) | Step::Cas { new: value, .. } = step {
                if !compared.contains(value) {
                    *value = ANONYMOUS;
                }
            }
        }
        // Drop the unknown puts nobody saw when nothing can tell whether
        // they happened (see the module docs): no compare-and-set failed
        // or has an unknown outcome.
        let uncertain_cas = ops.iter().any(
            |&(_, step, _)| matches!(step, Step::Cas { succeeded, .. } if succeeded != Some(true)),
        );
        let kept: Vec<(usize, Step, u64)> = ops
            .iter()
            .zip(&complete)
            .filter(|&(&(_, step, _), &done)| {
                uncertain_cas || done != u64::MAX || !matches!(step, Step::Put(_))
            })
            .map(|(&(i, step, _), &done)| (i, step, done))
            .collect();

        let mut this = KeyHistory {
            history,
            key,
            index: Vec::with_capacity(ops.len()),
            steps: Vec::with_capacity(ops.len()),
            invoke: Vec::with_capacity(ops.len()),
            complete: Vec::with_capacity(ops.len()),
            values,
        };
        for (i, step, done) in kept {
            this.index.push(i);
            this.steps.push(step);
            this.invoke.push(history[i].invoke);
            this.complete.push(done);
        }
        this.never_written()?;
        Ok(this)
    }

    /// A read of a value nobody wrote can never be placed: say so plainly
    /// rather than through a search report.
    fn never_written(&self) -> Result<(), Violation> {
        let written: HashSet<Value> = self
            .steps
            .iter()
            .filter_map(|step| match *step {
                Step::Put(value) | Step::Cas { new: value, .. } => Some(value),
                Step::Get(_) => None,
            })
            .collect();
        for (n, step) in self.steps.iter().enumerate() {
            let needed = match *step {
                Step::Get(Some(value)) => Some(value),
                Step::Cas {
                    expected: Some(value),
                    succeeded: Some(true),
                    ..
                } => Some(value),
                _ => None,
            };
            if let Some(value) = needed.filter(|v| !written.contains(v)) {
                return Err(Violation::NotLinearizable {
                    key: self.key.to_string(),
                    ops: vec![self.index[n]],
                    description: format!(
                        "key {:?}: {} saw {:?}, which no operation wrote",
                        self.key,
                        self.describe(n),
                        self.values[value as usize]
                    ),
                });
            }
        }
        Ok(())
    }

    fn describe(&self, n: usize) -> String {
        let op = &self.history[self.index[n]];
        let times = match op.outcome {
            Outcome::Unknown => format!("[{}..?]", op.invoke),
            _ => format!("[{}..{}]", op.invoke, op.complete),
        };
        let what = match (&op.call, &op.outcome) {
            (Call::Put(value), Outcome::Unknown) => format!("put {value:?} (outcome unknown)"),
            (Call::Put(value), _) => format!("put {value:?}"),
            (Call::Get, Outcome::Ok(read)) => format!("get -> {read:?}"),
            (Call::Get, _) => "get".to_string(),
            (Call::Cas { expected, new }, Outcome::Cas(succeeded)) => {
                format!(
                    "cas {expected:?} -> {new:?}: {}",
                    if *succeeded { "succeeded" } else { "failed" }
                )
            }
            (Call::Cas { expected, new }, _) => {
                format!("cas {expected:?} -> {new:?} (outcome unknown)")
            }
        };
        format!("#{} (client {}) {what} {times}", self.index[n], op.client)
    }

    fn state_text(&self, state: Option<Value>) -> String {
        match state {
            Some(ANONYMOUS) => "a value nothing read".to_string(),
            Some(value) => format!("{:?}", self.values[value as usize]),
            None => "nothing".to_string(),
        }
    }

    /// Wing & Gong's search with Lowe's cache, as a depth-first search
    /// whose frames each hold the candidates of one configuration.
    fn search(&self, max_steps: u64) -> Result<(), Violation> {
        let n = self.steps.len();
        if n == 0 {
            return Ok(());
        }
        // Entries: 2k is operation k's call, 2k + 1 its completion; `head`
        // is the list's sentinel. Time order; at equal ticks calls come
        // first, so touching operations count as concurrent.
        let head = 2 * n;
        let mut order: Vec<usize> = (0..2 * n).collect();
        order.sort_by_key(|&e| {
            let k = e / 2;
            let time = if e % 2 == 0 {
                self.invoke[k]
            } else {
                self.complete[k]
            };
            (time, e % 2, k)
        });
        let mut list = List {
            next: vec![NIL; 2 * n + 1],
            prev: vec![NIL; 2 * n + 1],
        };
        let mut last = head;
        for &e in &order {
            list.next[last] = e;
            list.prev[e] = last;
            last = e;
        }

        // The set of placed operations is remembered by a 128-bit Zobrist
        // fingerprint (the XOR of a random key per placed operation),
        // updated in O(1) and stored in 16 bytes, so the cache costs the
        // same however long the history. Two sets sharing a fingerprint
        // would make the search skip one (and could only ever refuse a
        // linearizable history); among a million configurations that has
        // a chance below 10^-26.
        let mut rng = crate::Rng(0x6c69_6e63_6865_636b ^ n as u64);
        let zobrist: Vec<u128> = (0..n)
            .map(|_| (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
            .collect();
        let mut placed: u128 = 0;
        let mut cache: HashSet<(u128, Option<Value>)> = HashSet::new();
        let mut state: Option<Value> = None;
        let mut frames = vec![self.frame(&list, head, state, None, None)];
        let mut deepest: Option<Stuck> = None;
        let mut steps = 0u64;
        while list.next[head] != NIL {
            steps += 1;
            if steps > max_steps {
                return Err(Violation::Undecided {
                    key: self.key.to_string(),
                    steps: max_steps,
                });
            }
            let Some(frame) = frames.last_mut() else {
                break;
            };
            if let Some(&k) = frame.candidates.get(frame.tried) {
                frame.tried += 1;
                if let Some(after) = self.steps[k].apply(state) {
                    placed ^= zobrist[k];
                    if cache.insert((placed, after)) {
                        list.lift(2 * k);
                        let frame = self.frame(&list, head, after, Some(k), Some(state));
                        frames.push(frame);
                        state = after;
                        continue;
                    }
                    placed ^= zobrist[k];
                }
                continue;
            }
            // Every candidate tried: this configuration leads nowhere.
            let depth = frames.len() - 1;
            if deepest.as_ref().is_none_or(|d| depth > d.prefix.len()) {
                let frame = &frames[depth];
                deepest = Some(Stuck {
                    prefix: frames.iter().filter_map(|f| f.placed).collect(),
                    state,
                    waiting: frame.waiting,
                    candidates: frame.candidates.clone(),
                });
            }
            let Some(Frame {
                placed: Some(k),
                before: Some(before),
                ..
            }) = frames.pop()
            else {
                return Err(self.report(deepest));
            };
            list.unlift(2 * k);
            placed ^= zobrist[k];
            state = before;
        }
        Ok(())
    }

    /// The configuration reached by placing `placed` (from `before`): the
    /// operations that may come next, in the order worth trying.
    ///
    /// The candidates are the calls before the first completion still in
    /// the list. A get or a failed compare-and-set that `state` explains
    /// goes alone: it changes nothing, and every operation that must
    /// precede it is placed, so if any order works from here, one placing
    /// it now does. Otherwise the earliest deadline first (that operation
    /// must be placed soonest), unknown operations last.
    fn frame(
        &self,
        list: &List,
        head: usize,
        state: Option<Value>,
        placed: Option<usize>,
        before: Option<Option<Value>>,
    ) -> Frame {
        let mut candidates = Vec::new();
        let mut waiting = None;
        let mut e = list.next[head];
        while e != NIL {
            if e % 2 == 1 {
                waiting = Some(e / 2);
                break;
            }
            candidates.push(e / 2);
            e = list.next[e];
        }
        let harmless = candidates.iter().copied().find(|&k| match self.steps[k] {
            Step::Get(_)
            | Step::Cas {
                succeeded: Some(false),
                ..
            } => self.steps[k].apply(state).is_some(),
            _ => false,
        });
        if let Some(k) = harmless {
            candidates = vec![k];
        } else {
            // Unknown puts of anonymous values are interchangeable from
            // here on (all called, none ever due, none told apart by what
            // they write): trying one of them is trying them all.
            let mut anonymous = false;
            candidates.retain(|&k| {
                let interchangeable =
                    self.complete[k] == u64::MAX && matches!(self.steps[k], Step::Put(ANONYMOUS));
                !(interchangeable && std::mem::replace(&mut anonymous, true))
            });
            candidates.sort_by_key(|&k| (self.complete[k], self.invoke[k], k));
        }
        Frame {
            candidates,
            tried: 0,
            waiting,
            placed,
            before,
        }
    }

    fn report(&self, stuck: Option<Stuck>) -> Violation {
        let Some(stuck) = stuck else {
            return Violation::NotLinearizable {
                key: self.key.to_string(),
                ops: Vec::new(),
                description: format!("key {:?}: not linearizable", self.key),
            };
        };
        let recent: Vec<usize> = stuck.prefix.iter().rev().take(3).rev().copied().collect();
        let list = |ops: &[usize]| -> String {
            ops.iter()
                .map(|&k| self.describe(k))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let mut description = format!(
            "key {:?}: not linearizable. The longest order found places {} of {} operations",
            self.key,
            stuck.prefix.len(),
            self.steps.len()
        );
        if !recent.is_empty() {
            description += &format!(", ending {}", list(&recent));
        }
        description += &format!("; the register then holds {}", self.state_text(stuck.state));
        if let Some(waiting) = stuck.waiting {
            description += &format!(
                ". {} must take effect before it completes, but neither it nor any operation that may come first can: {}",
                self.describe(waiting),
                list(&stuck.candidates)
            );
        }
        let mut ops: Vec<usize> = recent
            .iter()
            .chain(&stuck.candidates)
            .map(|&k| self.index[k])
            .collect();
        ops.sort_unstable();
        ops.dedup();
        Violation::NotLinearizable {
            key: self.key.to_string(),
            ops,
            description,
        }
    }
}

/// The operations not yet placed, as a doubly linked list of call and
/// completion entries (Knuth's dancing links: lifting an operation out and
/// putting it back, in reverse order, are O(1)).
struct List {
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl List {
    /// Takes a call entry and its completion out.
    fn lift(&mut self, call: usize) {
        for x in [call, call + 1] {
            let (p, q) = (self.prev[x], self.next[x]);
            self.next[p] = q;
            if q != NIL {
                self.prev[q] = p;
            }
        }
    }

    /// Undoes the matching [`List::lift`] (the last one not yet undone).
    fn unlift(&mut self, call: usize) {
        for x in [call + 1, call] {
            let (p, q) = (self.prev[x], self.next[x]);
            self.next[p] = x;
            if q != NIL {
                self.prev[q] = x;
            }
        }
    }
}

/// One configuration of the search.
struct Frame {
    /// What may be placed next, in the order to try.
    candidates: Vec<usize>,
    /// How many of them have been tried.
    tried: usize,
    /// The unplaced operation completing first (it bounds the candidates).
    waiting: Option<usize>,
    /// The operation placed to get here (`None` at the root) and the
    /// register's state before it.
    placed: Option<usize>,
    before: Option<Option<Value>>,
}

/// Where the deepest partial order got stuck, for the report.
struct Stuck {
    prefix: Vec<usize>,
    state: Option<Value>,
    waiting: Option<usize>,
    candidates: Vec<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    type H = Vec<Op<u64>>;

    fn put(client: usize, value: u64, invoke: u64, complete: u64) -> Op<u64> {
        Op::put(client, "k", value, invoke, complete)
    }

    fn get(client: usize, read: Option<u64>, invoke: u64, complete: u64) -> Op<u64> {
        Op::get(client, "k", read, invoke, complete)
    }

    fn cas(
        client: usize,
        expected: Option<u64>,
        new: u64,
        succeeded: bool,
        invoke: u64,
        complete: u64,
    ) -> Op<u64> {
        Op::cas(client, "k", expected, new, succeeded, invoke, complete)
    }

    fn rejected(history: &H) -> Violation {
        match check(history) {
            Err(violation @ Violation::NotLinearizable { .. }) => violation,
            other => panic!("expected a violation, got {other:?} for {history:?}"),
        }
    }

    #[test]
    fn sequential_histories_are_accepted() {
        let history = vec![
            get(0, None, 0, 1),
            put(0, 1, 2, 3),
            get(1, Some(1), 4, 5),
            cas(1, Some(1), 2, true, 6, 7),
            cas(0, Some(1), 3, false, 8, 9),
            cas(0, None, 4, false, 10, 11),
            get(0, Some(2), 12, 13),
            put(1, 5, 14, 15),
            get(1, Some(5), 16, 17),
        ];
        assert_eq!(check(&history), Ok(()));
        assert_eq!(check::<u64>(&[]), Ok(()));
        assert_eq!(check(&[cas(0, None, 1, true, 0, 1)]), Ok(()));
    }

    #[test]
    fn an_order_other_than_the_invoke_order_is_found() {
        // Only B, C, A, D, E explains it: A is called first but must take
        // effect third.
        let history = vec![
            put(0, 1, 0, 100),                 // A
            cas(1, None, 2, true, 5, 15),      // B: before A
            get(2, Some(2), 20, 25),           // C: after B, before A
            cas(3, Some(2), 3, false, 30, 90), // D: after A
            get(4, Some(1), 95, 110),          // E
        ];
        assert_eq!(check(&history), Ok(()));
        // Without C, "B then A" is still needed by E; with E reading 2
        // instead, A would have to take effect after 110: impossible.
        let mut broken = history.clone();
        broken[4] = get(4, Some(2), 105, 110);
        rejected(&broken);
    }

    #[test]
    fn a_stale_read_after_a_completed_put_is_rejected() {
        let history = vec![put(0, 1, 0, 1), put(0, 2, 2, 3), get(1, Some(1), 4, 5)];
        let violation = rejected(&history);
        let text = violation.to_string();
        assert!(text.contains("key \"k\""), "{text}");
        assert!(text.contains("get -> Some(1)"), "{text}");
        let Violation::NotLinearizable { ops, .. } = violation else {
            unreachable!()
        };
        assert!(ops.contains(&2), "{ops:?}");
        // Overlapping the second put, the same read is fine.
        let history = vec![put(0, 1, 0, 1), put(0, 2, 2, 6), get(1, Some(1), 4, 5)];
        assert_eq!(check(&history), Ok(()));
    }

    #[test]
    fn a_lost_acknowledged_write_is_rejected() {
        rejected(&vec![put(0, 1, 0, 1), get(1, None, 2, 3)]);
        rejected(&vec![
            put(0, 1, 0, 1),
            put(1, 2, 2, 3),
            get(2, Some(2), 4, 5),
            get(2, Some(1), 6, 7),
        ]);
    }

    #[test]
    fn a_cas_against_a_value_never_current_is_rejected() {
        // Never written at all.
        let text = rejected(&vec![put(0, 1, 0, 1), cas(1, Some(7), 2, true, 2, 3)]).to_string();
        assert!(text.contains("no operation wrote"), "{text}");
        // Written, but overwritten before the cas began.
        rejected(&vec![
            put(0, 1, 0, 1),
            put(0, 2, 2, 3),
            cas(1, Some(1), 3, true, 4, 5),
        ]);
        // Create-if-absent after the key exists.
        rejected(&vec![put(0, 1, 0, 1), cas(1, None, 2, true, 2, 3)]);
        // And a cas that failed although its expected value was current.
        rejected(&vec![put(0, 1, 0, 1), cas(1, Some(1), 2, false, 2, 3)]);
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_taken_effect() {
        let took = vec![
            put(0, 1, 0, 1),
            put(1, 2, 2, 3).unknown(),
            get(2, Some(2), 50, 51),
        ];
        let did_not = vec![
            put(0, 1, 0, 1),
            put(1, 2, 2, 3).unknown(),
            get(2, Some(1), 50, 51),
        ];
        assert_eq!(check(&took), Ok(()));
        assert_eq!(check(&did_not), Ok(()));
        // Long after its "completion" (which is ignored), it may still land.
        let late = vec![
            put(1, 2, 2, 3).unknown(),
            put(0, 1, 10, 11),
            get(2, Some(1), 20, 21),
            get(2, Some(2), 30, 31),
        ];
        assert_eq!(check(&late), Ok(()));
        // But never before it was called, and only once.
        rejected(&vec![get(2, Some(2), 0, 1), put(1, 2, 2, 3).unknown()]);
        rejected(&vec![
            put(1, 2, 0, 1).unknown(),
            get(2, Some(2), 10, 11),
            put(0, 1, 12, 13),
            get(2, Some(2), 14, 15),
        ]);
        // An unknown cas, both ways; an unknown get tells nothing.
        let cas_took = vec![
            put(0, 1, 0, 1),
            cas(1, Some(1), 2, false, 2, 3).unknown(),
            get(2, Some(2), 10, 11),
            get(2, None, 12, 13).unknown(),
        ];
        assert_eq!(check(&cas_took), Ok(()));
        let mut cas_not = cas_took.clone();
        cas_not[2] = get(2, Some(1), 10, 11);
        assert_eq!(check(&cas_not), Ok(()));
    }

    #[test]
    fn keys_are_independent_registers() {
        let history = vec![
            Op::put(0, "a", 1u64, 0, 1),
            Op::put(0, "b", 2, 2, 3),
            Op::get(1, "a", Some(1), 4, 5),
            Op::get(1, "b", Some(2), 4, 5),
            Op::get(1, "c", None, 4, 5),
        ];
        assert_eq!(check(&history), Ok(()));
        let mut broken = history.clone();
        broken[3] = Op::get(1, "b", Some(1), 4, 5);
        let Err(Violation::NotLinearizable { key, .. }) = check(&broken) else {
            panic!("accepted a read of another key's value");
        };
        assert_eq!(key, "b");
    }

    #[test]
    fn malformed_histories_are_named_as_such() {
        let malformed = |history: H| {
            assert!(
                matches!(check(&history), Err(Violation::Malformed { .. })),
                "{history:?}"
            );
        };
        malformed(vec![put(0, 1, 0, 1), put(1, 1, 2, 3)]);
        malformed(vec![put(0, 1, 0, 1), cas(1, Some(1), 1, true, 2, 3)]);
        malformed(vec![put(0, 1, 5, 4)]);
        let mut wrong_kind = get(0, None, 0, 1);
        wrong_kind.outcome = Outcome::Cas(true);
        malformed(vec![wrong_kind]);
        let mut wrong_kind = put(0, 1, 0, 1);
        wrong_kind.outcome = Outcome::Ok(Some(1));
        malformed(vec![wrong_kind]);
        // Strings work as values too (the default).
        let strings = vec![
            Op::put(0, "k", "a".to_string(), 0, 1),
            Op::get(0, "k", Some("a".to_string()), 2, 3),
        ];
        assert_eq!(check(&strings), Ok(()));
    }

    #[test]
    fn the_search_is_bounded() {
        // Twelve concurrent puts, the one read needing a particular one
        // last: the search tries many orders first.
        let mut history = Vec::new();
        for i in 0..12 {
            history.push(put(i as usize, i, 0, 1000));
        }
        history.push(get(99, Some(7), 2000, 2001));
        assert!(matches!(
            check_with_steps(&history, 5),
            Err(Violation::Undecided { steps: 5, .. })
        ));
        assert_eq!(check(&history), Ok(()));
    }

    /// A history from a real sequential register: operation `i` takes
    /// effect at tick `10 * i + 5`, inside an interval drawn around it, so
    /// intervals overlap at random. `unknown` is the chance a write's
    /// outcome is lost (half of those never took effect). After the body,
    /// two reads per key strictly after every write completed.
    fn generate(rng: &mut Rng, ops: usize, spread: u64, unknown: f64) -> H {
        let keys = ["a", "b", "c"];
        let mut registers = [None::<u64>; 3];
        let mut written: Vec<Vec<u64>> = vec![Vec::new(); 3];
        let mut next_value = 1u64;
        let mut history = Vec::new();
        let mut last_complete = 0;
        for i in 0..ops as u64 {
            let at = 10 * i + 5;
            let invoke = at - rng.below(spread.min(at) + 1);
            let complete = at + rng.below(spread + 1);
            last_complete = last_complete.max(complete);
            let k = rng.index(keys.len());
            let register = &mut registers[k];
            let client = rng.index(8);
            let lost = rng.chance(unknown);
            let mut op = match rng.below(3) {
                0 => {
                    let value = next_value;
                    next_value += 1;
                    written[k].push(value);
                    if !(lost && rng.chance(0.5)) {
                        *register = Some(value);
                    }
                    put(client, value, invoke, complete)
                }
                1 => get(client, *register, invoke, complete),
                _ => {
                    let expected = match rng.below(3) {
                        0 => *register,
                        1 if !written[k].is_empty() => {
                            Some(written[k][rng.index(written[k].len())])
                        }
                        _ => None,
                    };
                    let value = next_value;
                    next_value += 1;
                    written[k].push(value);
                    let hit = *register == expected;
                    if hit && !(lost && rng.chance(0.5)) {
                        *register = Some(value);
                    }
                    cas(client, expected, value, hit, invoke, complete)
                }
            };
            op.key = keys[k].to_string();
            if lost {
                op = op.unknown();
            }
            history.push(op);
        }
        for (k, key) in keys.iter().enumerate() {
            for j in 0..2 {
                let invoke = last_complete + 1 + 3 * (2 * k as u64 + j);
                let mut op = get(9, registers[k], invoke, invoke + 1);
                op.key = key.to_string();
                history.push(op);
            }
        }
        history
    }

    #[test]
    fn histories_of_a_real_register_are_always_accepted() {
        let mut rng = Rng(0x11ea_7ab1e);
        for round in 0..300 {
            let ops = 20 + rng.index(150);
            let spread = 5 + rng.below(60);
            let unknown = if round % 3 == 0 { 0.0 } else { 0.08 };
            let history = generate(&mut rng, ops, spread, unknown);
            if let Err(violation) = check(&history) {
                panic!("round {round}: a real register's history was refused: {violation}\n{history:?}");
            }
        }
    }

    #[test]
    fn a_few_hundred_concurrent_operations_on_one_key_check_within_the_bound() {
        let mut rng = Rng(42);
        for _ in 0..5 {
            let mut history = generate(&mut rng, 600, 40, 0.03);
            history.retain(|op| op.key == "a");
            assert!(history.len() > 150);
            assert_eq!(check(&history), Ok(()));
        }
    }

    #[test]
    fn a_flipped_read_after_every_write_is_rejected() {
        let mut rng = Rng(0xf11b);
        for round in 0..300 {
            let ops = 10 + rng.index(120);
            let spread = 5 + rng.below(60);
            let mut history = generate(&mut rng, ops, spread, 0.0);
            // The tail reads: the last six operations, two per key.
            let tail = history.len() - 6 + rng.index(6);
            let Outcome::Ok(read) = history[tail].outcome.clone() else {
                unreachable!()
            };
            let key = history[tail].key.clone();
            let mut others: Vec<Option<u64>> = history
                .iter()
                .filter(|op| op.key == key)
                .filter_map(|op| match &op.call {
                    Call::Put(v) | Call::Cas { new: v, .. } => Some(Some(*v)),
                    Call::Get => None,
                })
                .chain([None, Some(1_000_000)])
                .filter(|v| *v != read)
                .collect();
            others.sort_unstable();
            history[tail].outcome = Outcome::Ok(others[rng.index(others.len())]);
            match check(&history) {
                Err(Violation::NotLinearizable { key: k, .. }) => assert_eq!(k, key),
                other => panic!("round {round}: a flipped read was {other:?}\n{history:?}"),
            }
        }
    }

    #[test]
    fn a_read_of_a_value_never_written_is_rejected_despite_unknown_writes() {
        let mut rng = Rng(0xbeef);
        for round in 0..100 {
            let ops = 10 + rng.index(100);
            let mut history = generate(&mut rng, ops, 30, 0.1);
            let n = history.len();
            let tail = n - 6 + rng.index(6);
            history[tail].outcome = Outcome::Ok(Some(u64::MAX));
            assert!(
                matches!(check(&history), Err(Violation::NotLinearizable { .. })),
                "round {round}"
            );
        }
    }

    /// The definition, by brute force: some subset of the unknown writes
    /// (unknown gets are dropped) in some order that respects real time
    /// explains every completed answer.
    fn brute_force(history: &H) -> bool {
        fn done(op: &Op<u64>) -> u64 {
            if op.outcome == Outcome::Unknown {
                u64::MAX
            } else {
                op.complete
            }
        }
        fn search(ops: &[&Op<u64>], used: &mut [bool], state: Option<u64>) -> bool {
            // Every known operation placed: the unknown rest are taken
            // never to have happened.
            if ops
                .iter()
                .zip(used.iter())
                .all(|(op, &u)| u || op.outcome == Outcome::Unknown)
            {
                return true;
            }
            for k in 0..ops.len() {
                // Everything that completed before k's invoke is placed.
                let ready = !used[k]
                    && (0..ops.len()).all(|j| used[j] || j == k || done(ops[j]) >= ops[k].invoke);
                if !ready {
                    continue;
                }
                let after = match (&ops[k].call, &ops[k].outcome) {
                    (Call::Put(v), _) => Some(Some(*v)),
                    (Call::Get, Outcome::Ok(read)) => (*read == state).then_some(state),
                    (Call::Cas { expected, new }, outcome) => {
                        let hit = state == *expected;
                        match outcome {
                            Outcome::Cas(s) if *s != hit => None,
                            _ => Some(if hit { Some(*new) } else { state }),
                        }
                    }
                    _ => None,
                };
                if let Some(after) = after {
                    used[k] = true;
                    let found = search(ops, used, after);
                    used[k] = false;
                    if found {
                        return true;
                    }
                }
            }
            false
        }
        let ops: Vec<&Op<u64>> = history
            .iter()
            .filter(|op| !(op.call == Call::Get && op.outcome == Outcome::Unknown))
            .collect();
        search(&ops, &mut vec![false; ops.len()], None)
    }

    #[test]
    fn the_checker_agrees_with_brute_force_on_small_histories() {
        let mut rng = Rng(0xb207e);
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..4000 {
            let n = 1 + rng.index(7);
            let mut history: H = Vec::new();
            let mut writes = 0u64;
            // Any value some operation of the history may write, or none.
            let pick = |rng: &mut Rng| -> Option<u64> {
                if rng.chance(0.25) {
                    None
                } else {
                    Some(1 + rng.below(n as u64))
                }
            };
            for _ in 0..n {
                let invoke = rng.below(20);
                let complete = invoke + rng.below(10);
                let client = rng.index(4);
                let mut op = match rng.below(3) {
                    0 => {
                        writes += 1;
                        put(client, writes, invoke, complete)
                    }
                    1 => get(client, pick(&mut rng), invoke, complete),
                    _ => {
                        writes += 1;
                        let expected = pick(&mut rng).filter(|&v| v != writes);
                        cas(client, expected, writes, rng.chance(0.5), invoke, complete)
                    }
                };
                if rng.chance(0.25) {
                    op = op.unknown();
                }
                history.push(op);
            }
            let expected = brute_force(&history);
            match check(&history) {
                Ok(()) => {
                    assert!(
                        expected,
                        "round {round}: accepted, but no order explains it: {history:?}"
                    );
                    accepted += 1;
                }
                Err(Violation::NotLinearizable { .. }) => {
                    assert!(
                        !expected,
                        "round {round}: refused a linearizable history: {history:?}"
                    );
                    refused += 1;
                }
                Err(other) => panic!("round {round}: {other}: {history:?}"),
            }
        }
        // Both verdicts were exercised plenty.
        assert!(
            accepted > 500 && refused > 500,
            "{accepted} accepted, {refused} refused"
        );
    }
}
