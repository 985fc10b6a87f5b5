//! The end-to-end benchmark runner shared by Courier's benchmarks.
//!
//! On these 2-vCPU machines a cross-CPU wake-up costs ~45 µs, so every
//! latency figure is taken in two labelled placements: `same` (both sides
//! pinned to one CPU) and `split` (pinned to different CPUs). Each workload
//! runs a raw-socket baseline in the same run and placement, and the report
//! prints Courier/raw ratios, which are what compare across runs and
//! machines. See `shared/BENCHMARKING.md`.
//!
//! Each side runs on its own thread with its own current-thread tokio
//! runtime, pinned with `core_affinity`.

use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use courier_transport::Address;
use hdrhistogram::Histogram;

pub mod raw;

/// Where the two sides of a workload run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Both sides pinned to CPU 0.
    Same,
    /// Client on CPU 0, server on CPU 1.
    Split,
}

impl Placement {
    /// Both placements, when the machine has two CPUs; only `Same` otherwise.
    pub fn available() -> Vec<Placement> {
        match core_affinity::get_core_ids() {
            Some(ids) if ids.len() >= 2 => vec![Placement::Same, Placement::Split],
            _ => vec![Placement::Same],
        }
    }

    /// `same` or `split`.
    pub fn label(self) -> &'static str {
        match self {
            Placement::Same => "same",
            Placement::Split => "split",
        }
    }

    fn cores(self) -> (usize, usize) {
        match self {
            Placement::Same => (0, 0),
            Placement::Split => (0, 1),
        }
    }
}

/// How much work to do: `Full` under `cargo bench`, `Smoke` under
/// `cargo test --benches` (tiny counts, nothing judged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Real measurement.
    Full,
    /// A quick check that every workload runs.
    Smoke,
}

impl Mode {
    /// `cargo bench` passes `--bench`; `cargo test` does not.
    pub fn from_args() -> Mode {
        if std::env::args().any(|a| a == "--bench") {
            Mode::Full
        } else {
            Mode::Smoke
        }
    }

    /// `full` in full mode, `smoke` otherwise.
    pub fn pick<T>(self, full: T, smoke: T) -> T {
        match self {
            Mode::Full => full,
            Mode::Smoke => smoke,
        }
    }
}

/// Workload filters from the command line: any argument that is not a flag,
/// e.g. `cargo bench --bench transport -- stream_128B`. A workload runs when
/// there are no filters or its name contains one of them.
pub fn filters() -> Vec<String> {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect()
}

/// Whether `name` passes the command-line filters.
pub fn selected(filters: &[String], name: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// Pins the calling thread (and every thread or process it creates later,
/// which inherit its mask) to `core`, if the machine has it.
pub fn pin(core: usize) {
    if let Some(ids) = core_affinity::get_core_ids() {
        if let Some(id) = ids.into_iter().find(|id| id.id == core) {
            core_affinity::set_for_current(id);
        }
    }
}

/// CPU time this process has used so far, user and system, all threads
/// (`getrusage(RUSAGE_SELF)`): for benchmarks whose every party runs in
/// process, what a workload costs however the scheduler placed it.
#[allow(unsafe_code)] // one libc call; std has no getrusage
pub fn process_cpu() -> std::time::Duration {
    // SAFETY: `getrusage` only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return std::time::Duration::ZERO;
        }
        usage
    };
    let time = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A current-thread tokio runtime with I/O and time enabled.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs a server and a client, each on a pinned thread with its own
/// runtime. The server announces its address through the sender it is given
/// and should return when the client hangs up; the client's result is
/// returned.
pub fn run_pair<S, SF, C, CF, T>(placement: Placement, server: S, client: C) -> T
where
    S: FnOnce(std::sync::mpsc::Sender<Address>) -> SF + Send,
    SF: Future<Output = ()>,
    C: FnOnce(Address) -> CF + Send,
    CF: Future<Output = T>,
    T: Send,
{
    let (client_core, server_core) = placement.cores();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let server_thread = scope.spawn(move || {
            pin(server_core);
            runtime().block_on(server(tx));
        });
        let client_thread = scope.spawn(move || {
            pin(client_core);
            let address = rx.recv().expect("server announces its address");
            runtime().block_on(client(address))
        });
        let result = client_thread.join().expect("client thread");
        server_thread.join().expect("server thread");
        result
    })
}

/// A new latency histogram in nanoseconds (1 ns to 10 s, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds")
}

/// Records one duration.
pub fn record(histogram: &mut Histogram<u64>, took: Duration) {
    let nanos = (took.as_nanos() as u64).clamp(1, 10_000_000_000);
    histogram.record(nanos).expect("within bounds");
}

/// The median of some numbers, and their spread (max - min) relative to it.
pub fn median_and_spread(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    let median = values[values.len() / 2];
    let spread = (values[values.len() - 1] - values[0]) / median;
    (median, spread)
}

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Figure {
    /// e.g. `pingpong_64B`.
    pub workload: String,
    /// e.g. `tcp`, or `raw-tcp` for a baseline.
    pub subject: String,
    /// `same` or `split`.
    pub placement: String,
    /// e.g. `p50_us`, `msgs_per_s`.
    pub metric: String,
    /// The value.
    pub value: f64,
}

/// Collected figures, printed as a table and written as TSV and SVG.
#[derive(Default, Debug)]
pub struct Report {
    figures: Vec<Figure>,
    /// (workload, subject, placement, ratio, target, higher_is_better)
    ratios: Vec<(String, String, String, f64, f64, bool)>,
}

impl Report {
    /// Adds a figure.
    pub fn add(
        &mut self,
        workload: &str,
        subject: &str,
        placement: Placement,
        metric: &str,
        value: f64,
    ) {
        self.figures.push(Figure {
            workload: workload.into(),
            subject: subject.into(),
            placement: placement.label().into(),
            metric: metric.into(),
            value,
        });
    }

    /// Adds a Courier/raw ratio with its target (`f64::NAN` for none).
    pub fn ratio(
        &mut self,
        workload: &str,
        subject: &str,
        placement: Placement,
        ratio: f64,
        target: f64,
        higher_is_better: bool,
    ) {
        self.add(workload, subject, placement, "ratio_to_raw", ratio);
        self.ratios.push((
            workload.into(),
            subject.into(),
            placement.label().into(),
            ratio,
            target,
            higher_is_better,
        ));
    }

    /// The ratios table, as text.
    pub fn ratio_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<6} {:>10} {:>8}  verdict",
            "workload", "subject", "place", "vs raw", "target"
        );
        for (workload, subject, placement, ratio, target, higher) in &self.ratios {
            if target.is_nan() {
                let _ = writeln!(
                    out,
                    "{workload:<16} {subject:<8} {placement:<6} {ratio:>9.2}x {:>8}  no target set",
                    "-"
                );
                continue;
            }
            let met = if *higher {
                ratio >= target
            } else {
                ratio <= target
            };
            let sign = if *higher { ">=" } else { "<=" };
            let _ = writeln!(
                out,
                "{workload:<16} {subject:<8} {placement:<6} {ratio:>9.2}x {sign}{target:>5.2}x  {}",
                if met { "meets target" } else { "misses target" }
            );
        }
        out
    }

    /// Writes `NAME.tsv` (one figure per line) and `NAME.svg` (ratios
    /// plotted) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let mut tsv = String::from("workload\tsubject\tplacement\tmetric\tvalue\n");
        for f in &self.figures {
            let _ = writeln!(
                tsv,
                "{}\t{}\t{}\t{}\t{}",
                f.workload, f.subject, f.placement, f.metric, f.value
            );
        }
        let tsv_path = dir.join(format!("{name}.tsv"));
        std::fs::write(&tsv_path, tsv)?;
        let svg_path = dir.join(format!("{name}.svg"));
        std::fs::write(&svg_path, self.svg(name))?;
        Ok((tsv_path, svg_path))
    }

    /// A horizontal bar chart of every ratio, with 1.0x and each target marked.
    fn svg(&self, title: &str) -> String {
        let row_height = 22.0;
        let left = 260.0;
        let width = 760.0;
        let plot = width - left - 40.0;
        let max = self
            .ratios
            .iter()
            .map(|r| r.3.max(if r.4.is_nan() { 0.0 } else { r.4 }))
            .fold(1.5_f64, f64::max)
            * 1.1;
        let height = 60.0 + row_height * self.ratios.len() as f64 + 30.0;
        let x = |v: f64| left + plot * v / max;
        let mut svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"22\" font-size=\"15\">{title}: Courier / raw socket baseline (same run, same placement)</text>\n"
        );
        for (i, (workload, subject, placement, ratio, target, higher)) in
            self.ratios.iter().enumerate()
        {
            let y = 45.0 + row_height * i as f64;
            let met = target.is_nan()
                || if *higher {
                    ratio >= target
                } else {
                    ratio <= target
                };
            let target = if target.is_nan() { ratio } else { target };
            let colour = if met { "#4a90d9" } else { "#d9534f" };
            let _ = writeln!(
                svg,
                "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">{workload} {subject} ({placement})</text>\
                 <rect x=\"{left}\" y=\"{:.0}\" width=\"{:.1}\" height=\"{:.0}\" fill=\"{colour}\"/>\
                 <line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.0}\" y2=\"{:.0}\" stroke=\"black\" stroke-dasharray=\"3,2\"/>\
                 <text x=\"{:.1}\" y=\"{:.0}\">{ratio:.2}x</text>",
                left - 8.0,
                y + 14.0,
                y + 2.0,
                (x(*ratio) - left).max(1.0),
                row_height - 6.0,
                x(*target),
                x(*target),
                y,
                y + row_height - 2.0,
                x(*ratio) + 4.0,
                y + 14.0
            );
        }
        let base = 45.0 + row_height * self.ratios.len() as f64;
        let _ = writeln!(
            svg,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"40\" y2=\"{1:.0}\" stroke=\"#333\"/>\
             <text x=\"{0:.1}\" y=\"{2:.0}\" text-anchor=\"middle\">1.0x</text>\
             <text x=\"10\" y=\"{3:.0}\" fill=\"#555\">dashed: target; red: target missed</text>\n</svg>",
            x(1.0),
            base,
            base + 14.0,
            base + 30.0
        );
        svg
    }
}

/// Where results go: `$COURIER_BENCH_OUT` (set by `cargo xtask bench`), else
/// `target/bench` in the workspace; smoke runs write to a temporary folder.
pub fn output_dir(mode: Mode) -> PathBuf {
    match (mode, std::env::var_os("COURIER_BENCH_OUT")) {
        (Mode::Smoke, _) => {
            std::env::temp_dir().join(format!("courier-bench-smoke-{}", std::process::id()))
        }
        (Mode::Full, Some(dir)) => PathBuf::from(dir),
        (Mode::Full, None) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
    }
}

/// TLS settings for benchmarks: a development CA and a certificate for
/// 127.0.0.1, generated once per process under the system's temporary
/// directory.
pub fn dev_tls() -> (courier_transport::TlsServer, courier_transport::TlsClient) {
    static TLS: std::sync::OnceLock<(courier_transport::TlsServer, courier_transport::TlsClient)> =
        std::sync::OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("courier-bench-certs-{}", std::process::id()));
        let certs = courier_transport::tls::generate_dev_certs(
            &dir,
            &["127.0.0.1".into()],
            &[],
            courier_transport::tls::Validity::default(),
        )
        .expect("development certificates");
        let server =
            courier_transport::TlsServer::from_pem_files(&certs.server_cert, &certs.server_key)
                .expect("server certificate");
        let client = courier_transport::TlsClient::trusting(&certs.ca_cert).expect("CA");
        let _ = std::fs::remove_dir_all(&dir);
        (server, client)
    })
    .clone()
}

/// A loopback listener on `tcp://`, or `tls://` with [`dev_tls`].
pub async fn loopback_listener(tls: bool) -> courier_transport::Listener {
    let (address, config) = if tls {
        (
            "tls://127.0.0.1:0",
            courier_transport::TransportConfig::default().with_tls_server(dev_tls().0),
        )
    } else {
        ("tcp://127.0.0.1:0", Default::default())
    };
    courier_transport::bind(&address.parse().expect("valid"), &config)
        .await
        .expect("a loopback listener")
}

/// Client transport settings for [`loopback_listener`].
pub fn client_transport(tls: bool) -> courier_transport::TransportConfig {
    let config = courier_transport::TransportConfig::default();
    if tls {
        config.with_tls_client(dev_tls().1)
    } else {
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_writes_every_figure_and_plots_every_ratio() {
        let mut report = Report::default();
        report.add("pingpong_64B", "raw-tcp", Placement::Same, "p50_us", 5.0);
        report.ratio("pingpong_64B", "tcp", Placement::Same, 1.05, 1.1, false);
        report.ratio("stream_128B", "tcp", Placement::Split, 0.5, 0.8, true);
        let dir = std::env::temp_dir().join(format!("courier-report-test-{}", std::process::id()));
        let (tsv, svg) = report.write(&dir, "t").unwrap();
        let tsv = std::fs::read_to_string(tsv).unwrap();
        assert_eq!(tsv.lines().count(), 4);
        assert!(tsv.contains("stream_128B\ttcp\tsplit\tratio_to_raw\t0.5"));
        let svg = std::fs::read_to_string(svg).unwrap();
        assert_eq!(svg.matches("<rect x=").count(), 2);
        assert!(svg.contains("#d9534f"), "the missed target is red");
        let table = report.ratio_table();
        assert!(table.contains("meets target") && table.contains("misses target"));
        report.ratio("oneway", "x", Placement::Same, 0.2, f64::NAN, true);
        assert!(report.ratio_table().contains("no target set"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn median_of_repeats() {
        let (median, spread) = median_and_spread(&mut [3.0, 1.0, 2.0]);
        assert_eq!(median, 2.0);
        assert_eq!(spread, 1.0);
    }
}
