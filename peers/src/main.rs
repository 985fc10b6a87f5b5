//! `courier-peers`: Courier beside the systems users would pick instead, on
//! the same machine in the same run. Run it with `cargo xtask bench peers`
//! (which builds `courier` first and passes its path).
//!
//! Each row runs its workload against a raw limit (tokio TCP or a Unix
//! socket, or the disk), the best peer (nats-server 2.9 with async-nats
//! 0.51 for brokered workloads, tarpc 0.38 and ZeroMQ 4.3 (REQ/REP) for
//! RPC) and Courier, in each
//! placement: `same` (broker or server and client on CPU 0) and `split`
//! (broker or server on CPU 1, client on CPU 0). Brokers are separate
//! processes pinned with `taskset`; the client is one pinned thread with a
//! current-thread tokio runtime. Receivers count and check every message,
//! so a loss or a reordering is printed instead of a rate. Each figure is
//! the median of `--runs` runs.
//!
//! Why a workspace of its own: async-nats and tarpc bring large dependency
//! trees that the main workspace's builds, lints and tests must not pay for.

use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use courier_benches::Placement;
use courier_transport::Address;
use hdrhistogram::Histogram;

mod procs;
mod pubsub;
mod queue;
mod rpc;

#[derive(Parser, Debug)]
#[command(about = "Courier beside NATS, tarpc and raw sockets, same machine, same run")]
struct Args {
    /// Tiny counts and one run: checks that every row works, judges nothing.
    #[arg(long)]
    smoke: bool,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// The `courier` binary (a release build).
    #[arg(long, default_value = "target/release/courier")]
    courier: PathBuf,
    /// The `nats-server` binary.
    #[arg(long, default_value = "nats-server")]
    nats_server: PathBuf,
    /// Where the TSV and Markdown results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Only rows whose name contains one of these (all if none).
    filters: Vec<String>,
}

/// Counts for one mode.
struct Counts {
    pubsub: u64,
    fan_out: u64,
    /// Messages of the 64 KiB pub/sub row.
    large: u64,
    warmup: u64,
    latency: u64,
    queue: u64,
    rpc: u64,
}

impl Counts {
    fn new(smoke: bool) -> Counts {
        if smoke {
            Counts {
                pubsub: 2_000,
                fan_out: 1_000,
                large: 200,
                warmup: 50,
                latency: 200,
                queue: 1_000,
                rpc: 2_000,
            }
        } else {
            Counts {
                pubsub: 1_000_000,
                fan_out: 250_000,
                large: 50_000,
                warmup: 2_000,
                latency: 20_000,
                queue: 100_000,
                rpc: 200_000,
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Messages (or calls) per second: higher is better.
    Rate,
    /// p50 in microseconds: lower is better.
    P50,
}

/// How the error of a cell whose peer is not installed begins.
const SKIPPED: &str = "skipped: ";

/// One measured cell: the median of the runs, or why it has none.
type Cell = Result<f64, String>;

struct Row {
    workload: String,
    placement: Placement,
    unit: Unit,
    raw: Option<(&'static str, Cell)>,
    peer: Option<(&'static str, Cell)>,
    courier: Cell,
    target: &'static str,
}

/// Runs `measure` `runs` times and takes the median; the first error wins.
fn median(runs: usize, mut measure: impl FnMut() -> anyhow::Result<f64>) -> Cell {
    let mut values = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        values.push(measure().map_err(|err| format!("{err:#}"))?);
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Ok(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// Runs a client future on one thread pinned to CPU 0, with a
/// current-thread runtime.
fn on_client_cpu<F, Fut, T>(work: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = anyhow::Result<T>>,
    T: Send,
{
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(id) = core_affinity::get_core_ids()
                    .and_then(|ids| ids.into_iter().find(|id| id.id == 0))
                {
                    core_affinity::set_for_current(id);
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(work())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
    })
}

fn broker_cpu(placement: Placement) -> usize {
    match placement {
        Placement::Same => 0,
        Placement::Split => 1,
    }
}

fn p50_us(histogram: &Histogram<u64>) -> f64 {
    histogram.value_at_quantile(0.5) as f64 / 1000.0
}

fn rate(count: u64, took: std::time::Duration) -> f64 {
    count as f64 / took.as_secs_f64()
}

struct Bench {
    args: Args,
    counts: Counts,
    nats: Result<String, String>,
    rows: Vec<Row>,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.args.filters.is_empty() || self.args.filters.iter().any(|f| name.contains(f.as_str()))
    }

    fn courier_broker(
        &self,
        placement: Placement,
        fsync: &str,
    ) -> anyhow::Result<procs::BrokerProcess> {
        procs::courier(&self.args.courier, broker_cpu(placement), fsync)
    }

    fn nats_broker(&self, placement: Placement) -> anyhow::Result<procs::BrokerProcess> {
        match &self.nats {
            Ok(_) => procs::nats(&self.args.nats_server, broker_cpu(placement)),
            Err(why) => anyhow::bail!("{SKIPPED}{why}"),
        }
    }

    fn pubsub_rows(&mut self, placement: Placement) {
        let runs = self.args.runs;
        // The 64 KiB row is where copies of the payload, not per-message
        // overheads, set the rate.
        for (fan_out, count, size, name) in [
            (1usize, self.counts.pubsub, 128, "pubsub 1->1 128B"),
            (4, self.counts.fan_out, 128, "fan-out 1->4 128B"),
            (1, self.counts.large, 64 * 1024, "pubsub 1->1 64KiB"),
        ] {
            if !self.wanted(name) {
                continue;
            }
            eprintln!("{name} ({}) ...", placement.label());
            let raw = (fan_out == 1).then(|| {
                (
                    "tcp stream",
                    median(runs, || {
                        Ok(rate(
                            count,
                            courier_benches::raw::stream(placement, size, count),
                        ))
                    }),
                )
            });
            let nats = median(runs, || {
                let broker = self.nats_broker(placement)?;
                on_client_cpu(|| pubsub::nats(broker.addr, count, size, fan_out))
            });
            for publishing in [pubsub::Publishing::Plain, pubsub::Publishing::Batched] {
                let courier = median(runs, || {
                    let broker = self.courier_broker(placement, "never")?;
                    on_client_cpu(|| pubsub::courier(broker.addr, count, size, fan_out, publishing))
                });
                let (how, target) = match publishing {
                    pubsub::Publishing::Plain => ("publish", ">= 4x NATS (floor 2x)"),
                    pubsub::Publishing::Batched => ("publish_batch 256", "no slower than plain"),
                };
                self.rows.push(Row {
                    workload: format!("{name}, {how}"),
                    placement,
                    unit: Unit::Rate,
                    raw: raw.clone(),
                    peer: Some(("NATS", nats.clone())),
                    courier,
                    target,
                });
            }
        }
    }

    fn request_rows(&mut self, placement: Placement) {
        let name = "request-reply 64B";
        if !self.wanted(name) {
            return;
        }
        eprintln!("{name} ({}) ...", placement.label());
        let (runs, warmup, count) = (self.args.runs, self.counts.warmup, self.counts.latency);
        let raw = median(runs, || {
            Ok(p50_us(&courier_benches::raw::pingpong(
                placement,
                64,
                warmup as usize,
                count as usize,
            )))
        });
        let nats = median(runs, || {
            let broker = self.nats_broker(placement)?;
            on_client_cpu(|| pubsub::nats_request(broker.addr, warmup, count, 64))
                .map(|h| p50_us(&h))
        });
        let courier = median(runs, || {
            let broker = self.courier_broker(placement, "never")?;
            on_client_cpu(|| pubsub::courier_request(broker.addr, warmup, count, 64))
                .map(|h| p50_us(&h))
        });
        self.rows.push(Row {
            workload: format!("{name} through the broker, p50 µs"),
            placement,
            unit: Unit::P50,
            raw: Some(("tcp ping-pong", raw)),
            peer: Some(("NATS", nats)),
            courier,
            target: "<= NATS",
        });
    }

    fn queue_rows(&mut self, placement: Placement) {
        let name = "queue 256B";
        if !self.wanted(name) {
            return;
        }
        eprintln!("{name} ({}) ...", placement.label());
        let (runs, count, window) = (self.args.runs, self.counts.queue, 256);
        let disk = median(runs, || {
            let dir = procs::scratch_dir("disk")?;
            queue::disk(&dir.0, count, 256, window)
        });
        // Each run measures enqueue and consume together; the rows take
        // each rate's median separately.
        let mut js = Vec::new();
        let mut always = Vec::new();
        let mut never = Vec::new();
        for _ in 0..runs.max(1) {
            js.push(self.nats_broker(placement).and_then(|broker| {
                on_client_cpu(|| queue::jetstream(broker.addr, count, 256, window))
            }));
            always.push(self.courier_broker(placement, "always").and_then(|broker| {
                on_client_cpu(|| queue::courier(broker.addr, count, 256, window))
            }));
            never.push(self.courier_broker(placement, "never").and_then(|broker| {
                on_client_cpu(|| queue::courier(broker.addr, count, 256, window))
            }));
        }
        let pick = |results: &[anyhow::Result<queue::QueueRates>],
                    f: fn(&queue::QueueRates) -> f64| {
            let mut values = Vec::new();
            for result in results {
                match result {
                    Ok(rates) => values.push(f(rates)),
                    Err(err) => return Err(format!("{err:#}")),
                }
            }
            let mut iter = values.into_iter();
            median(iter.len(), || iter.next().context("a run"))
        };
        self.rows.push(Row {
            workload: format!("{name} enqueue, {window} outstanding, fsync always"),
            placement,
            unit: Unit::Rate,
            raw: Some(("disk, 1 fdatasync/256", disk)),
            peer: Some(("JetStream (unsynced)", pick(&js, |r| r.enqueue))),
            courier: pick(&always, |r| r.enqueue),
            target: ">= JetStream",
        });
        self.rows.push(Row {
            workload: format!("{name} consume + ack, fsync always"),
            placement,
            unit: Unit::Rate,
            raw: None,
            peer: Some(("JetStream", pick(&js, |r| r.consume))),
            courier: pick(&always, |r| r.consume),
            target: ">= JetStream",
        });
        self.rows.push(Row {
            workload: format!("{name} enqueue, {window} outstanding, fsync never"),
            placement,
            unit: Unit::Rate,
            raw: None,
            peer: Some(("JetStream (unsynced)", pick(&js, |r| r.enqueue))),
            courier: pick(&never, |r| r.enqueue),
            target: "-",
        });
    }

    fn rpc_rows(&mut self, placement: Placement) {
        let (runs, warmup, count, calls) = (
            self.args.runs,
            self.counts.warmup,
            self.counts.latency,
            self.counts.rpc,
        );
        let tcp = || Address::tcp(([127, 0, 0, 1], 0).into());
        let sequential = rpc::Shape::Sequential { warmup, count };
        let as_p50 = |m: anyhow::Result<rpc::Measured>| match m? {
            rpc::Measured::Latency(h) => Ok(p50_us(&h)),
            rpc::Measured::Rate(_) => anyhow::bail!("a rate where a latency was due"),
        };
        let as_rate = |m: anyhow::Result<rpc::Measured>| match m? {
            rpc::Measured::Rate(r) => Ok(r),
            rpc::Measured::Latency(_) => anyhow::bail!("a latency where a rate was due"),
        };
        let name = "rpc echo 64B, 32 in flight";
        if self.wanted(name) {
            eprintln!("{name} ({}) ...", placement.label());
            let windowed = rpc::Shape::Windowed {
                window: 32,
                count: calls,
            };
            self.rows.push(Row {
                workload: name.into(),
                placement,
                unit: Unit::Rate,
                raw: Some((
                    "tcp pipelined",
                    median(runs, || {
                        Ok(rate(
                            calls,
                            courier_benches::raw::pipelined(placement, 64, 32, calls),
                        ))
                    }),
                )),
                peer: Some((
                    "tarpc",
                    median(runs, || as_rate(rpc::tarpc(placement, windowed))),
                )),
                courier: median(runs, || as_rate(rpc::courier(placement, tcp(), windowed))),
                target: ">= 3x tarpc",
            });
        }
        let name = "rpc echo 64B sequential";
        if self.wanted(name) {
            eprintln!("{name} ({}) ...", placement.label());
            let courier = median(runs, || as_p50(rpc::courier(placement, tcp(), sequential)));
            self.rows.push(Row {
                workload: format!("{name}, p50 µs"),
                placement,
                unit: Unit::P50,
                raw: Some((
                    "tcp ping-pong",
                    median(runs, || {
                        Ok(p50_us(&courier_benches::raw::pingpong(
                            placement,
                            rpc::SIZE,
                            warmup as usize,
                            count as usize,
                        )))
                    }),
                )),
                peer: Some((
                    "tarpc",
                    median(runs, || as_p50(rpc::tarpc(placement, sequential))),
                )),
                courier: courier.clone(),
                target: "<= 1.3x raw",
            });
            self.rows.push(Row {
                workload: format!("{name} vs ZeroMQ REQ/REP, p50 µs"),
                placement,
                unit: Unit::P50,
                raw: None,
                peer: Some((
                    "ZeroMQ",
                    median(runs, || Ok(p50_us(&rpc::zeromq(placement, warmup, count)?))),
                )),
                courier,
                target: "-",
            });
        }
        let name = "shm rpc echo 64B sequential";
        if self.wanted(name) {
            eprintln!("{name} ({}) ...", placement.label());
            let mut n = 0;
            self.rows.push(Row {
                workload: format!("{name}, p50 µs"),
                placement,
                unit: Unit::P50,
                raw: Some((
                    "unix ping-pong",
                    median(runs, || {
                        Ok(p50_us(&rpc::unix_pingpong(placement, warmup, count)?))
                    }),
                )),
                peer: None,
                courier: median(runs, || {
                    n += 1;
                    let name = format!("courier-peers-{}-{n}", std::process::id());
                    as_p50(rpc::courier(placement, Address::Shm(name), sequential))
                }),
                target: "same: <= 1/3 unix; split: <= 2 µs",
            });
        }
    }
}

fn show(value: &Cell, unit: Unit) -> String {
    match (value, unit) {
        (Ok(v), Unit::Rate) if *v >= 1e6 => format!("{:.2} M/s", v / 1e6),
        (Ok(v), Unit::Rate) => format!("{:.0} k/s", v / 1e3),
        (Ok(v), Unit::P50) => format!("{v:.1} µs"),
        (Err(_), _) => "failed".into(),
    }
}

/// Courier / other, as "1.23x"; for latencies a value below 1 is better.
fn ratio(courier: &Cell, other: &Cell) -> String {
    match (courier, other) {
        (Ok(c), Ok(o)) if *o > 0.0 => format!("{:.2}x", c / o),
        _ => "-".into(),
    }
}

fn table(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| workload | place | raw limit | best peer | Courier | Courier / peer | Courier / raw | target |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let raw = row
            .raw
            .as_ref()
            .map(|(name, v)| format!("{name} {}", show(v, row.unit)))
            .unwrap_or_else(|| "-".into());
        let peer = row
            .peer
            .as_ref()
            .map(|(name, v)| format!("{name} {}", show(v, row.unit)))
            .unwrap_or_else(|| "-".into());
        let vs_peer = row.peer.as_ref().map(|(_, v)| ratio(&row.courier, v));
        let vs_raw = row.raw.as_ref().map(|(_, v)| ratio(&row.courier, v));
        let _ = writeln!(
            out,
            "| {} | {} | {raw} | {peer} | {} | {} | {} | {} |",
            row.workload,
            row.placement.label(),
            show(&row.courier, row.unit),
            vs_peer.unwrap_or_else(|| "-".into()),
            vs_raw.unwrap_or_else(|| "-".into()),
            row.target
        );
    }
    let mut failures = String::new();
    for row in rows {
        let cells = [
            ("Courier", Some(&row.courier)),
            (
                row.raw.as_ref().map_or("raw", |r| r.0),
                row.raw.as_ref().map(|r| &r.1),
            ),
            (
                row.peer.as_ref().map_or("peer", |r| r.0),
                row.peer.as_ref().map(|r| &r.1),
            ),
        ];
        for (who, cell) in cells {
            if let Some(Err(why)) = cell {
                let _ = writeln!(
                    failures,
                    "- {} ({}), {who}: {why}",
                    row.workload,
                    row.placement.label()
                );
            }
        }
    }
    if !failures.is_empty() {
        let _ = write!(out, "\nFailed cells:\n{failures}");
    }
    out
}

fn tsv(rows: &[Row]) -> String {
    let mut out = String::from("workload\tplacement\tsubject\tunit\tvalue\n");
    for row in rows {
        let unit = match row.unit {
            Unit::Rate => "per_s",
            Unit::P50 => "p50_us",
        };
        let mut cells = vec![("courier", &row.courier)];
        if let Some((name, v)) = &row.raw {
            cells.push((name, v));
        }
        if let Some((name, v)) = &row.peer {
            cells.push((name, v));
        }
        for (subject, value) in cells {
            if let Ok(value) = value {
                let _ = writeln!(
                    out,
                    "{}\t{}\t{subject}\t{unit}\t{value}",
                    row.workload,
                    row.placement.label()
                );
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.runs = 1;
    }
    anyhow::ensure!(
        args.courier.exists(),
        "{} not found: build it with `cargo build --release -p courier-cli` (cargo xtask bench peers does)",
        args.courier.display()
    );
    let nats = procs::nats_version(&args.nats_server);
    match &nats {
        Ok(version) => eprintln!("peers: {version}, async-nats 0.51.0; tarpc 0.38.0; libzmq 4.3.4"),
        Err(why) => eprintln!("NATS rows will fail: {why}"),
    }
    let counts = Counts::new(args.smoke);
    let placements = if args.smoke {
        vec![Placement::Same]
    } else {
        Placement::available()
    };
    let mut bench = Bench {
        args,
        counts,
        nats,
        rows: Vec::new(),
    };
    for &placement in &placements {
        bench.pubsub_rows(placement);
        bench.request_rows(placement);
        bench.queue_rows(placement);
        bench.rpc_rows(placement);
    }
    let table = table(&bench.rows);
    println!("{table}");
    std::fs::create_dir_all(&bench.args.out)?;
    let md = bench.args.out.join("peers.md");
    std::fs::write(&md, &table)?;
    let tsv_path = bench.args.out.join("peers.tsv");
    std::fs::write(&tsv_path, tsv(&bench.rows))?;
    eprintln!("results: {} and {}", md.display(), tsv_path.display());
    // A peer that is not installed leaves its cells empty without failing
    // the smoke run; anything else that failed does fail it.
    let failed_cell = |cell: &Cell| cell.as_ref().is_err_and(|why| !why.starts_with(SKIPPED));
    let failed = bench.rows.iter().any(|row| {
        failed_cell(&row.courier)
            || row.raw.as_ref().is_some_and(|r| failed_cell(&r.1))
            || row.peer.as_ref().is_some_and(|r| failed_cell(&r.1))
    });
    if failed && bench.args.smoke {
        anyhow::bail!("some cells failed (see above)");
    }
    Ok(())
}
