//! The web example and the broker's dashboard, driven in a headless Chromium.
//!
//! Each test starts a broker in this process (TCP and WebSocket listeners
//! and the metrics endpoint, all on 127.0.0.1 port 0, over a temporary data
//! directory), then the example's worker, two services and gateway as child
//! processes over one temporary SQLite file, then a `chromedriver` on a free
//! local port, which starts Chromium. The tests click and type in the page
//! as a person would and read the result back from the DOM (the ids are the
//! page's contract, see `examples/web/README.md`), and check the database
//! behind it with rusqlite.
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium
//! chromium-driver`; `CHROMIUM` and `CHROMEDRIVER` name other binaries).
//! Without them each test prints that it was skipped and passes, unless
//! `CI_REQUIRE_BROWSER` is set (CI sets it), when it fails instead.
//!
//! What they leave behind, under `target/browser-tests/`: on success the
//! README's screenshots (`web-example.png`, `dashboard.png`); on failure
//! `<test>-failure.png` and `<test>-failure.html` for every open window,
//! and the processes' stderr on the test's own stderr.
//!
//! The tests take turns (one browser at a time), since each one's broker,
//! five processes and Chromium already keep two cores busy.

use std::fmt::Display;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use courier_broker::{Broker, BrokerConfig};
use courier_pubsub::remote::{Address, ClientConfig, RemotePubSub};
use courier_pubsub::SubscribeOptions;
use courier_test_support::TempDir;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// How long any one wait may take: a process's ready line, a page's
/// element, a change reaching a page. Generous, since a loaded CI machine
/// can be slow; a wait that times out fails the test with what it saw.
const WAIT: Duration = Duration::from_secs(20);

/// How long Chromium may take to start a session. Longer than `WAIT`: on
/// a 2-core CI machine, two tests starting Chromium at once once took
/// over 20 s (seen in a clean-clone run).
const BROWSER_START: Duration = Duration::from_secs(90);

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(100);

/// Lines of a process's stderr shown when a test fails.
const STDERR_TAIL_LINES: usize = 40;

/// Stdout lines kept per child until read; past this they are dropped (the
/// tests only look for ready lines, printed first).
const STDOUT_LINES: usize = 64;

/// The example's binary, built by cargo for this test.
const EXAMPLE: &str = env!("CARGO_BIN_EXE_courier-example-web");

/// One browser at a time, across this binary's tests.
static BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

/// The page lists the database's tickets at start, and a search for a word
/// from them shows exactly the tickets that hold it.
#[tokio::test(flavor = "multi_thread")]
async fn page_lists_and_searches_the_database() -> Result<()> {
    let _turn = BROWSER.lock().await;
    let Some(harness) = Harness::start("page_lists_and_searches_the_database").await? else {
        return Ok(());
    };
    let outcome = lists_and_searches(&harness).await;
    harness.finish(outcome).await
}

async fn lists_and_searches(h: &Harness) -> Result<()> {
    let db = h.database()?;
    if db.ids_matching("")?.is_empty() {
        bail!(
            "the services seeded no tickets into {}",
            h.database.display()
        );
    }
    // A row only this test knows, written straight into the file: if the
    // page shows it, its list comes from the database, not from anywhere
    // else.
    db.insert(
        "browser-test-1",
        "Tape drive in the basement rattles",
        "Written into SQLite by the browser test, behind the services' backs.",
    )?;
    let all = db.ids_matching("")?;
    let page = h.browser();
    page.goto(&h.app).await?;
    let shown = wait_listed(page).await?;
    let mut shown_ids = shown.rows.clone();
    shown_ids.sort();
    let mut expected = all.clone();
    expected.sort();
    if shown_ids != expected {
        bail!("the page lists {shown_ids:?}; the database holds {expected:?}");
    }
    if shown.rows.first().map(String::as_str) != Some("browser-test-1") {
        bail!("the newest ticket is not first: {:?}", shown.rows);
    }

    let (word, matching) = db.selective_word()?;
    let state = search(page, &word, &matching).await?;
    if matching.len() >= all.len() {
        bail!("the word {word:?} matches every ticket, so the search proves nothing");
    }
    if state.count != matching.len().to_string() {
        bail!(
            "#result-count says {:?} for {} results of {word:?}",
            state.count,
            matching.len()
        );
    }
    // And back to everything, so the search is not stuck on its first answer.
    search(page, "", &all).await?;
    Ok(())
}

/// Two pages open: a ticket created in one reaches the other's feed and the
/// top of its list without a reload, and is in the database.
#[tokio::test(flavor = "multi_thread")]
async fn a_created_ticket_reaches_every_page_and_the_database() -> Result<()> {
    let _turn = BROWSER.lock().await;
    let Some(harness) =
        Harness::start("a_created_ticket_reaches_every_page_and_the_database").await?
    else {
        return Ok(());
    };
    let outcome = created_ticket_reaches_every_page(&harness).await;
    harness.finish(outcome).await
}

async fn created_ticket_reaches_every_page(h: &Harness) -> Result<()> {
    let page = h.browser();
    page.goto(&h.app).await?;
    let first = page.window().await?;
    wait_live(page, "the first page").await?;
    let second = page.new_window(false).await?.handle;
    page.switch_to_window(second.clone()).await?;
    page.set_window_size(1280, 900).await?;
    page.goto(&h.app).await?;
    wait_live(page, "the second page").await?;

    let tickets = [
        (
            "Checkout button does nothing on Safari",
            "Clicking Pay on iOS 17 leaves the spinner up; the request never leaves the page.",
        ),
        (
            "Export invoices as CSV",
            "Finance wants last month's invoices in one file, one row per line item.",
        ),
        (
            "Password reset mail arrives twice",
            "Since Tuesday every reset sends two mails a second apart.",
        ),
    ];
    let db = h.database()?;
    for (n, (title, body)) in tickets.iter().enumerate() {
        // Alternate the page that writes, so each one both sends and receives.
        let (from, to) = if n % 2 == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        page.switch_to_window(from.clone()).await?;
        let queued_as = create_ticket(page, title, body).await?;
        let mut id = None;
        for window in [to, from] {
            page.switch_to_window(window.clone()).await?;
            let arrived = wait_for_change(page, title).await?;
            if *id.get_or_insert_with(|| arrived.clone()) != arrived {
                bail!("the pages disagree on {title:?}'s id: {id:?} and {arrived:?}");
            }
            let arrived = &arrived;
            eventually(
                format!("{title:?} ({arrived}) at the top of #results"),
                || async move {
                    let state = PageState::read(page).await?;
                    if state.rows.first() == Some(arrived) {
                        return Ok(Some(()));
                    }
                    Err(anyhow!("the page shows {state}"))
                },
            )
            .await?;
        }
        let id = id.unwrap_or_default();
        if !queued_as.is_empty() && queued_as != id {
            bail!("{title:?} was queued as {queued_as} but announced as {id}");
        }
        let stored = db.ticket(&id)?;
        if stored != Some((title.to_string(), body.to_string())) {
            bail!("ticket {id} in the database is {stored:?}, not the one created");
        }
    }

    // The README's picture: the first page, with the changes in its feed.
    page.switch_to_window(first).await?;
    let state = PageState::read(page).await?;
    if state.feed.len() < tickets.len() {
        bail!("the first page's feed holds {:?}", state.feed);
    }
    h.save_screenshot(page, "web-example.png").await?;
    offline_page_shows_what_it_creates(h).await
}

/// A page with no live feed (its gateway names a WebSocket where nothing
/// listens) still shows a ticket it creates, once the worker stored it.
async fn offline_page_shows_what_it_creates(h: &Harness) -> Result<()> {
    let nowhere = format!("ws://127.0.0.1:{}", free_port()?);
    let mut command = Command::new(EXAMPLE);
    command
        .env("RUST_BACKTRACE", "0")
        .args([
            "gateway",
            "--exit-with-parent",
            "--broker",
            &h.tcp.to_string(),
        ])
        .args(["--ws-url", &nowhere, "--listen", "127.0.0.1:0"]);
    let mut gateway = Process::spawn("gateway-offline", command, &h.logs, false)?;
    let app = gateway.ready_line("gateway listening on").await?;
    let page = h.browser();
    page.goto(&format!("{}/", app.trim_end_matches('/')))
        .await?;
    wait_listed(page).await?;
    let title = "Offline page creates a ticket";
    let queued_as = create_ticket(page, title, "No WebSocket here.").await?;
    let state = PageState::read(page).await?;
    if state.live == "live" {
        bail!("the page without a WebSocket says it is live: {state}");
    }
    let queued_as = &queued_as;
    eventually(
        format!("{title:?} ({queued_as}) at the top of the offline page's list"),
        || async move {
            let state = PageState::read(page).await?;
            if !queued_as.is_empty() && state.rows.first() == Some(queued_as) {
                return Ok(Some(()));
            }
            Err(anyhow!("the page shows {state}"))
        },
    )
    .await?;
    gateway.kill()
}

/// A service killed (SIGKILL) while the page is in use costs nothing: every
/// search after it succeeds, answered by the instance still running.
#[tokio::test(flavor = "multi_thread")]
async fn searches_survive_a_killed_service() -> Result<()> {
    let _turn = BROWSER.lock().await;
    let Some(mut harness) = Harness::start("searches_survive_a_killed_service").await? else {
        return Ok(());
    };
    let outcome = survive_a_killed_service(&mut harness).await;
    harness.finish(outcome).await
}

async fn survive_a_killed_service(h: &mut Harness) -> Result<()> {
    let db = h.database()?;
    let all = db.ids_matching("")?;
    let (word, matching) = db.selective_word()?;
    let names: Vec<String> = h
        .services
        .iter()
        .map(|s| format!("service-{}", s.pid()))
        .collect();
    let page = h.browser().clone();
    page.goto(&h.app).await?;
    // Reads only: the live feed is not needed here.
    wait_listed(&page).await?;

    // Both instances answer while both run: requests to a service go to its
    // instances in turn, so a few searches reach each.
    let mut seen = Vec::new();
    for n in 0..10 {
        let (query, expected) = if n % 2 == 0 {
            (word.as_str(), &matching)
        } else {
            ("", &all)
        };
        let state = search(&page, query, expected).await?;
        if let Some(name) = names.iter().find(|name| state.answered_by == name.as_str()) {
            if !seen.contains(name) {
                seen.push(name.clone());
            }
        }
        if seen.len() == names.len() {
            break;
        }
    }
    if seen.len() != names.len() {
        bail!("ten searches were answered by {seen:?} only, of {names:?}");
    }

    let victim = h.services[0].pid();
    h.services[0].kill()?;
    let survivor = &names[1];
    for n in 0..6 {
        let (query, expected) = if n % 2 == 0 {
            ("", &all)
        } else {
            (word.as_str(), &matching)
        };
        let state = search(&page, query, expected)
            .await
            .with_context(|| format!("search {} after killing service-{victim}", n + 1))?;
        if state.answered_by != survivor.as_str() {
            bail!(
                "search {} after killing service-{victim} was answered by {:?}, not {survivor}",
                n + 1,
                state.answered_by
            );
        }
    }
    Ok(())
}

/// The dashboard at the broker's metrics address renders, and its numbers
/// move when messages flow.
#[tokio::test(flavor = "multi_thread")]
async fn dashboard_numbers_move_with_traffic() -> Result<()> {
    let _turn = BROWSER.lock().await;
    let Some(harness) = Harness::start("dashboard_numbers_move_with_traffic").await? else {
        return Ok(());
    };
    let outcome = dashboard_moves(&harness).await;
    harness.finish(outcome).await
}

async fn dashboard_moves(h: &Harness) -> Result<()> {
    let page = h.browser();
    // A couple of tickets first, so the queue and the services have been used.
    page.goto(&h.app).await?;
    wait_live(page, "the app page").await?;
    create_ticket(
        page,
        "Dashboard shows queue depth",
        "So on-call sees a backlog.",
    )
    .await?;
    wait_for_change(page, "Dashboard shows queue depth").await?;

    page.goto(&format!("http://{}/", h.metrics)).await?;
    let before = eventually("the dashboard's published counter", || async move {
        metric(page, "published-total").await
    })
    .await?;

    // Traffic: a steady stream to a subject with a subscriber, until the end
    // of the test (the screenshot should show it flowing).
    let delivered_before = eventually("the dashboard's delivered counter", || async move {
        metric(page, "delivered-total").await
    })
    .await?;
    let traffic = Traffic::start(&h.tcp).await?;
    let traffic_began = tokio::time::Instant::now();
    eventually(
        "the dashboard's published-rate to become non-zero",
        || async move {
            Ok(metric(page, "published-rate")
                .await?
                .filter(|rate| *rate > 0.0))
        },
    )
    .await?;
    eventually(
        format!("the published counter to pass {before}"),
        || async move {
            Ok(metric(page, "published-total")
                .await?
                .filter(|now| *now > before))
        },
    )
    .await?;
    // The traffic has a subscriber: deliveries grow too (the example's
    // own processes, idle, would not move this counter).
    eventually(
        format!("the delivered counter to pass {delivered_before}"),
        || async move {
            Ok(metric(page, "delivered-total")
                .await?
                .filter(|now| *now > delivered_before))
        },
    )
    .await?;
    // Traffic for a while, so the charts have a history to draw in the
    // screenshot.
    tokio::time::sleep_until(traffic_began + DASHBOARD_HISTORY).await;
    h.save_screenshot(page, "dashboard.png").await?;
    traffic.stop().await
}

/// How long the dashboard test keeps traffic flowing before its screenshot.
const DASHBOARD_HISTORY: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

/// What the page shows, read in one script so it is one moment's state.
#[derive(Debug, Clone)]
struct PageState {
    live: String,
    /// `data-id`s of `#results .ticket-row`, top first.
    rows: Vec<String>,
    /// `(data-id, text)` of `#feed .change`.
    feed: Vec<(String, String)>,
    answered_by: String,
    count: String,
    create_status: String,
    /// The id the gateway gave the last created ticket (`#create-status`'s
    /// `data-id`, if the page sets it).
    created_id: String,
    /// What the page says went wrong, if it says (`#list-error`, not part of
    /// the contract: only shown in failure messages).
    list_error: String,
}

impl PageState {
    async fn read(page: &Client) -> Result<PageState> {
        let value = page
            .execute(
                r##"
                const text = (s) => (document.querySelector(s)?.textContent ?? "").trim();
                return {
                    live: text("#live-status"),
                    rows: [...document.querySelectorAll("#results .ticket-row")]
                        .map((e) => e.dataset.id ?? ""),
                    feed: [...document.querySelectorAll("#feed .change")]
                        .map((e) => [e.dataset.id ?? "", e.textContent.trim()]),
                    answered_by: text("#answered-by"),
                    count: text("#result-count"),
                    create_status: text("#create-status"),
                    created_id: document.querySelector("#create-status")?.dataset.id ?? "",
                    list_error: document.querySelector("#list-error:not([hidden])")
                        ?.textContent.trim() ?? "",
                };
                "##,
                vec![],
            )
            .await?;
        let text = |key: &str| value[key].as_str().unwrap_or_default().to_string();
        let list = |key: &str| value[key].as_array().cloned().unwrap_or_default();
        Ok(PageState {
            live: text("live"),
            rows: list("rows")
                .iter()
                .map(|id| id.as_str().unwrap_or_default().to_string())
                .collect(),
            feed: list("feed")
                .iter()
                .map(|pair| {
                    let part = |i: usize| pair[i].as_str().unwrap_or_default().to_string();
                    (part(0), part(1))
                })
                .collect(),
            answered_by: text("answered_by"),
            count: text("count"),
            create_status: text("create_status"),
            created_id: text("created_id"),
            list_error: text("list_error"),
        })
    }
}

impl Display for PageState {
    /// The parts a failure message needs, short.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "live-status {:?}, {} rows {:?}, result-count {:?}, answered-by {:?}, \
             feed {:?}, create-status {:?}",
            self.live,
            self.rows.len(),
            self.rows,
            self.count,
            self.answered_by,
            self.feed.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            self.create_status,
        )?;
        if !self.list_error.is_empty() {
            write!(f, ", error {:?}", self.list_error)?;
        }
        Ok(())
    }
}

/// Waits for the list the page loads at start.
async fn wait_listed(page: &Client) -> Result<PageState> {
    eventually("the page to list tickets at start", || async move {
        let state = PageState::read(page).await?;
        if !state.rows.is_empty() && state.answered_by.contains("service-") {
            return Ok(Some(state));
        }
        Err(anyhow!("the page shows {state}"))
    })
    .await
}

async fn wait_live(page: &Client, which: &str) -> Result<()> {
    eventually(
        format!("{which}'s #live-status to say live, and its list"),
        || async move {
            let state = PageState::read(page).await?;
            if state.live == "live" && !state.rows.is_empty() {
                return Ok(Some(()));
            }
            Err(anyhow!("the page shows {state}"))
        },
    )
    .await
}

/// Types `query` into the search box, clicks Search, and waits until the
/// page shows exactly `expected` (in any order), answered by a service.
async fn search(page: &Client, query: &str, expected: &[String]) -> Result<PageState> {
    // Cleared first, so the answer to this search is told from the last one.
    page.execute(
        r##"const e = document.querySelector("#answered-by"); if (e) e.textContent = "";"##,
        vec![],
    )
    .await?;
    let input = page.find(Locator::Css("#search")).await?;
    input.clear().await?;
    if !query.is_empty() {
        input.send_keys(query).await?;
    }
    page.find(Locator::Css("#search-button"))
        .await?
        .click()
        .await?;
    let mut want = expected.to_vec();
    want.sort();
    let want = &want;
    eventually(
        format!("the results of searching {query:?} ({want:?})"),
        || async move {
            let state = PageState::read(page).await?;
            let mut rows = state.rows.clone();
            rows.sort();
            if rows == *want && state.answered_by.contains("service-") {
                return Ok(Some(state));
            }
            Err(anyhow!("the page shows {state}"))
        },
    )
    .await
}

/// Fills in the form and clicks Create; waits until the page says the
/// ticket was queued.
/// Returns the id the page says the ticket got (empty if it does not say).
async fn create_ticket(page: &Client, title: &str, body: &str) -> Result<String> {
    page.execute(
        r##"const e = document.querySelector("#create-status"); if (e) e.textContent = "";"##,
        vec![],
    )
    .await?;
    let field = page.find(Locator::Css("#new-title")).await?;
    field.clear().await?;
    field.send_keys(title).await?;
    let field = page.find(Locator::Css("#new-body")).await?;
    field.clear().await?;
    field.send_keys(body).await?;
    page.find(Locator::Css("#create-button"))
        .await?
        .click()
        .await?;
    eventually(
        format!("#create-status to say {title:?} was queued"),
        || async move {
            let state = PageState::read(page).await?;
            let status = state.create_status.to_lowercase();
            if status.contains("queued") && !status.contains("not queued") {
                return Ok(Some(state.created_id));
            }
            Err(anyhow!("the page shows {state}"))
        },
    )
    .await
}

/// Waits for a `#feed .change` holding `title`; returns its `data-id`.
async fn wait_for_change(page: &Client, title: &str) -> Result<String> {
    eventually(format!("a change for {title:?} in #feed"), || async move {
        let state = PageState::read(page).await?;
        if let Some((id, _)) = state
            .feed
            .iter()
            .find(|(id, text)| !id.is_empty() && text.contains(title))
        {
            return Ok(Some(id.clone()));
        }
        Err(anyhow!("the page shows {state}"))
    })
    .await
}

/// A number on the dashboard (`[data-metric="name"]`), if it shows one:
/// its `data-value` (the raw number, which the dashboard sets beside the
/// text), else its text in the forms a person reads: `1,234`, `12.5`,
/// `3.2k`, `1.1M`, `42/s`.
async fn metric(page: &Client, name: &str) -> Result<Option<f64>> {
    let text = page
        .execute(
            r##"const e = document.querySelector(`[data-metric="${arguments[0]}"]`);
            return e ? (e.dataset.value ?? e.textContent) : null;"##,
            vec![json!(name)],
        )
        .await?;
    Ok(text.as_str().and_then(parse_number))
}

fn parse_number(text: &str) -> Option<f64> {
    let text = text.trim();
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))
        .unwrap_or(rest.len());
    let number: f64 = rest[..end].replace(',', "").parse().ok()?;
    let scale = match rest[end..].trim_start().chars().next() {
        Some('k' | 'K') => 1e3,
        Some('M') => 1e6,
        Some('G') => 1e9,
        _ => 1.0,
    };
    Some(number * scale)
}

// ---------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------

/// Runs `probe` until it gives `Some`, at most [`WAIT`]; a probe's error
/// (say, an element not there yet) counts as "not yet", and the last one is
/// part of the timeout's message.
async fn eventually<T, F, Fut>(what: impl Display, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + WAIT;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() >= deadline {
            let why = last_error
                .map(|err| format!(" (last error: {err:#})"))
                .unwrap_or_default();
            bail!("timed out after {WAIT:?} waiting for {what}{why}");
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// The database behind the page
// ---------------------------------------------------------------------------

struct Database(rusqlite::Connection);

impl Database {
    fn open(path: &Path) -> Result<Database> {
        let connection = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )
        .with_context(|| format!("opening {}", path.display()))?;
        connection.busy_timeout(Duration::from_secs(5))?;
        Ok(Database(connection))
    }

    /// Ids of the tickets whose title or body holds `word`, as the
    /// service's search reads it (case-insensitive for ASCII).
    fn ids_matching(&self, word: &str) -> Result<Vec<String>> {
        let pattern = format!("%{word}%");
        let mut statement = self
            .0
            .prepare("SELECT id FROM tickets WHERE title LIKE ?1 OR body LIKE ?1")?;
        let ids = statement
            .query_map([pattern], |row| row.get::<_, rusqlite::types::Value>(0))?
            .map(|id| id.map(|id| sql_text(&id)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }

    /// A word from the tickets' titles that some hold and others do not,
    /// with the ids of those that hold it: the search test's query, found
    /// in whatever the services seeded.
    fn selective_word(&self) -> Result<(String, Vec<String>)> {
        let total = self.ids_matching("")?.len();
        let mut statement = self.0.prepare("SELECT title FROM tickets ORDER BY id")?;
        let titles = statement
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let mut words: Vec<String> = titles
            .iter()
            .flat_map(|title| title.split(|c: char| !c.is_ascii_alphabetic()))
            .filter(|word| word.len() >= 5)
            .map(str::to_lowercase)
            .collect();
        words.sort();
        words.dedup();
        // The word with the most matches short of half of all: a search that
        // narrows, with more than one row to compare.
        let mut best: Option<(String, Vec<String>)> = None;
        for word in words {
            let ids = self.ids_matching(&word)?;
            if ids.is_empty() || ids.len() * 2 > total {
                continue;
            }
            if best.as_ref().is_none_or(|(_, kept)| ids.len() > kept.len()) {
                best = Some((word, ids));
            }
        }
        best.ok_or_else(|| anyhow!("no title word of the {total} tickets narrows a search"))
    }

    /// Adds a ticket newer than every other (the schema is the example's,
    /// `examples/web/src/db.rs`).
    fn insert(&self, id: &str, title: &str, body: &str) -> Result<()> {
        self.0.execute(
            "INSERT INTO tickets (id, title, body, created_at)
             VALUES (?1, ?2, ?3, (SELECT COALESCE(MAX(created_at), 0) + 1 FROM tickets))",
            [id, title, body],
        )?;
        Ok(())
    }

    /// A ticket's title and body.
    fn ticket(&self, id: &str) -> Result<Option<(String, String)>> {
        let mut statement = self
            .0
            .prepare("SELECT title, body FROM tickets WHERE id = ?1")?;
        let mut rows = statement.query_map([id], |row| Ok((row.get(0)?, row.get(1)?)))?;
        Ok(rows.next().transpose()?)
    }
}

/// An id as the page shows it in `data-id`, whatever its SQL type.
fn sql_text(value: &rusqlite::types::Value) -> String {
    use rusqlite::types::Value as V;
    match value {
        V::Integer(n) => n.to_string(),
        V::Text(text) => text.clone(),
        V::Real(x) => x.to_string(),
        V::Null => String::new(),
        V::Blob(bytes) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// Traffic for the dashboard
// ---------------------------------------------------------------------------

/// A publisher sending a steady stream to `demo.orders` (with a subscriber,
/// so messages are delivered as well as published) until stopped.
struct Traffic {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Traffic {
    async fn start(broker: &Address) -> Result<Traffic> {
        let bus = RemotePubSub::connect(broker, ClientConfig::default()).await?;
        let mut subscription = bus.subscribe("demo.>", SubscribeOptions::default()).await?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tick.tick() => {
                        let batch = (0..20).map(|i| {
                            ("demo.orders", format!("{{\"order\":{}}}", sent + i).into_bytes())
                        });
                        bus.publish_batch(batch).await?;
                        sent += 20;
                    }
                    event = subscription.recv() => {
                        if event.is_none() {
                            bail!("the traffic's subscription ended");
                        }
                    }
                }
            }
            Ok(())
        });
        Ok(Traffic { stop, task })
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .context("the traffic did not stop")?
            .context("the traffic task")?
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A child process, killed (and reaped) when dropped. Its stdout is read by
/// a thread into a bounded channel; its stderr goes to a file, shown when a
/// test fails.
struct Process {
    name: String,
    child: Child,
    lines: tokio::sync::mpsc::Receiver<String>,
    stderr: PathBuf,
    /// Started as the leader of its own process group, all killed together
    /// (chromedriver, and the Chromium processes it starts).
    group: bool,
    /// Killed and reaped already: its pid may belong to another process now.
    reaped: bool,
}

impl Process {
    fn spawn(name: &str, mut command: Command, logs: &Path, group: bool) -> Result<Process> {
        let stderr = logs.join(format!("{name}.stderr"));
        let file = std::fs::File::create(&stderr)?;
        // Stdin is a pipe whose writing end stays in `child` (in this
        // process): the example's processes, run with
        // `--exit-with-parent`, shut down when it closes, so they do not
        // outlive a test run that is killed before its Drop runs.
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file);
        if group {
            command.process_group(0);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        let (sender, lines) = tokio::sync::mpsc::channel(STDOUT_LINES);
        std::thread::spawn(move || {
            // Read to the end whatever happens, so the child never blocks on
            // a full pipe; lines nobody waits for are dropped.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = sender.try_send(line);
            }
        });
        Ok(Process {
            name: name.to_string(),
            child,
            lines,
            stderr,
            group,
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line starting with `prefix`; returns the rest.
    async fn ready_line(&mut self, prefix: &str) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_string());
                    }
                }
                Ok(None) => {
                    // Stdout closed: the process is ending. Give it a moment
                    // so the error below can say how it ended.
                    let status = self.exit_status(Duration::from_secs(2))?;
                    bail!(
                        "{} closed its stdout ({status}) before printing {prefix:?}; its stderr:\n{}",
                        self.name,
                        self.stderr_tail()
                    );
                }
                Err(_) => bail!(
                    "{} printed no {prefix:?} line within {WAIT:?}; its stderr:\n{}",
                    self.name,
                    self.stderr_tail()
                ),
            }
        }
    }

    fn exit_status(&mut self, within: Duration) -> Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.to_string());
            }
            if Instant::now() >= deadline {
                return Ok("still running".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then reaps it.
    fn kill(&mut self) -> Result<()> {
        if self.reaped {
            return Ok(());
        }
        if self.group {
            // The negative pid names the group: chromedriver and every
            // Chromium process it started.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.pid())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        self.reaped = true;
        Ok(())
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(STDERR_TAIL_LINES);
        lines[start..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Finds a program: the path in `variable` if set, else `default` if it
/// exists, else `name` on `PATH`.
fn find_program(variable: &str, default: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let default = PathBuf::from(default);
    if default.is_file() {
        return Some(default);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Where screenshots go: `target/browser-tests/`, found from the test
/// binary's path (`target/debug/deps/browser-…`: the first ancestor cargo
/// marked with `CACHEDIR.TAG`), else `CARGO_TARGET_DIR`.
fn artifacts_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .or_else(|| exe.ancestors().nth(3).map(Path::to_path_buf))
        .context("no target directory")?;
    let dir = target.join("browser-tests");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

/// Everything one test runs against. Fields drop in order: the browser's
/// processes and the example's first, the broker, then the directory they
/// all used.
struct Harness {
    name: &'static str,
    /// When everything was up: the test's own time is measured from here.
    started: Instant,
    browser: Option<Client>,
    chromedriver: Process,
    gateway: Process,
    worker: Process,
    services: Vec<Process>,
    broker: Option<Broker>,
    /// The broker's TCP address, for the example's processes and the tests.
    tcp: Address,
    /// The broker's dashboard (and metrics) endpoint.
    metrics: SocketAddr,
    /// The gateway's page, `http://127.0.0.1:PORT/`.
    app: String,
    database: PathBuf,
    /// Where each process's stderr goes (in the temporary directory).
    logs: PathBuf,
    _dir: TempDir,
}

impl Harness {
    /// Starts it all, or says why the test is skipped (`None`).
    async fn start(name: &'static str) -> Result<Option<Harness>> {
        let chromium = find_program("CHROMIUM", "/usr/bin/chromium", "chromium");
        let chromedriver = find_program("CHROMEDRIVER", "/usr/bin/chromedriver", "chromedriver");
        let (Some(chromium), Some(chromedriver)) = (chromium, chromedriver) else {
            if std::env::var_os("CI_REQUIRE_BROWSER").is_some() {
                bail!(
                    "CI_REQUIRE_BROWSER is set: install chromium and chromium-driver \
                     (Debian: apt-get install chromium chromium-driver)"
                );
            }
            eprintln!("{name}: skipped: chromium/chromedriver not found");
            return Ok(None);
        };

        let started = Instant::now();
        let dir = TempDir::new("browser");
        let logs = dir.path().to_path_buf();
        let mut config = BrokerConfig::default();
        config.listen = vec!["tcp://127.0.0.1:0".into(), "ws://127.0.0.1:0".into()];
        config.metrics = "127.0.0.1:0".into();
        config.data_dir = dir.path().join("broker");
        let broker = Broker::start(config).await.context("starting the broker")?;
        let tcp = broker
            .addresses()
            .iter()
            .find(|a| matches!(a, Address::Tcp { .. }))
            .cloned()
            .context("the broker has no TCP address")?;
        let ws = broker
            .web_addresses()
            .first()
            .cloned()
            .context("the broker has no WebSocket address")?;
        let metrics = broker
            .metrics_address()
            .context("the broker has no metrics address")?;

        let database = dir.path().join("tickets.db");
        let database_url = format!("sqlite://{}", database.display());
        let broker_url = tcp.to_string();
        let example = |role: &str, extra: &[&str]| {
            let mut command = Command::new(EXAMPLE);
            // Errors without backtraces, so a failure's stderr tail shows
            // the cause.
            command.env("RUST_BACKTRACE", "0");
            command
                .arg(role)
                .arg("--exit-with-parent")
                .args(["--broker", &broker_url])
                .args(extra);
            command
        };
        // Services first: they create and seed the database, both at once
        // (opening a fresh file together is part of what is tested).
        let mut services = Vec::new();
        for n in 1..=2 {
            services.push(Process::spawn(
                &format!("service-{n}"),
                example("service", &["--database", &database_url]),
                &logs,
                false,
            )?);
        }
        for service in &mut services {
            service.ready_line("service ready").await?;
        }
        let mut worker = Process::spawn(
            "worker",
            example("worker", &["--database", &database_url]),
            &logs,
            false,
        )?;
        let mut gateway = Process::spawn(
            "gateway",
            example("gateway", &["--ws-url", &ws, "--listen", "127.0.0.1:0"]),
            &logs,
            false,
        )?;
        worker.ready_line("worker ready").await?;
        let app = gateway.ready_line("gateway listening on").await?;
        let app = format!("{}/", app.trim_end_matches('/'));

        let port = free_port()?;
        let mut driver_command = Command::new(&chromedriver);
        driver_command.arg(format!("--port={port}"));
        let mut driver = Process::spawn("chromedriver", driver_command, &logs, true)?;
        let driver_address = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&driver_address, POLL).is_err() {
            if !driver.running() {
                bail!("chromedriver exited: {}", driver.stderr_tail());
            }
            if Instant::now() >= deadline {
                bail!("chromedriver did not listen on {driver_address} within {WAIT:?}");
            }
            tokio::time::sleep(POLL).await;
        }

        let profile = dir.path().join("chromium-profile");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                    "--window-size=1280,900",
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let browser = tokio::time::timeout(
            BROWSER_START,
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://{driver_address}")),
        )
        .await
        .map_err(|_| anyhow!("chromedriver started no Chromium session within {BROWSER_START:?}"))?
        .with_context(|| {
            format!(
                "starting Chromium; chromedriver says:\n{}",
                driver.stderr_tail()
            )
        })?;

        // WebDriver's own page-load bound is five minutes: a page that hangs
        // should fail the test within the usual wait instead.
        browser
            .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
                Some(WAIT),
                Some(WAIT),
                Some(Duration::ZERO),
            ))
            .await?;
        eprintln!(
            "{name}: broker, 4 processes and Chromium up in {:.1?}",
            started.elapsed()
        );
        Ok(Some(Harness {
            name,
            started: Instant::now(),
            browser: Some(browser),
            chromedriver: driver,
            gateway,
            worker,
            services,
            broker: Some(broker),
            tcp,
            metrics,
            app,
            database,
            logs,
            _dir: dir,
        }))
    }

    fn browser(&self) -> &Client {
        self.browser
            .as_ref()
            .expect("the browser is there until finish")
    }

    fn database(&self) -> Result<Database> {
        Database::open(&self.database)
    }

    async fn save_screenshot(&self, page: &Client, file: &str) -> Result<()> {
        let path = artifacts_dir()?.join(file);
        std::fs::write(&path, page.screenshot().await?)?;
        eprintln!("{}: saved {}", self.name, path.display());
        Ok(())
    }

    /// On failure saves every window's screenshot and HTML and prints the
    /// processes' stderr; then closes the browser and the broker either way.
    async fn finish(mut self, outcome: Result<()>) -> Result<()> {
        let browser = self.browser.take().expect("finish runs once");
        eprintln!("{}: steps took {:.1?}", self.name, self.started.elapsed());
        if let Err(err) = &outcome {
            eprintln!("{}: FAILED: {err:#}", self.name);
            if let Err(capture) = self.capture(&browser).await {
                eprintln!("{}: could not capture the page: {capture:#}", self.name);
            }
            let mut processes: Vec<&Process> = vec![&self.gateway, &self.worker];
            processes.extend(&self.services);
            processes.push(&self.chromedriver);
            for process in processes {
                eprintln!(
                    "--- {} (pid {}) stderr, last lines:\n{}",
                    process.name,
                    process.pid(),
                    process.stderr_tail()
                );
            }
        }
        // Closing the session quits Chromium; the process group's kill on
        // drop is for when it does not.
        let _ = tokio::time::timeout(Duration::from_secs(10), browser.close()).await;
        // The broker's clients go first, so its shutdown has no calls in
        // flight to give the grace period to.
        for process in [&mut self.chromedriver, &mut self.gateway, &mut self.worker]
            .into_iter()
            .chain(&mut self.services)
        {
            let _ = process.kill();
        }
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
        outcome
    }

    async fn capture(&self, browser: &Client) -> Result<()> {
        let dir = artifacts_dir()?;
        for (n, window) in browser.windows().await?.into_iter().enumerate() {
            let stem = match n {
                0 => format!("{}-failure", self.name),
                n => format!("{}-failure-{}", self.name, n + 1),
            };
            browser.switch_to_window(window).await?;
            std::fs::write(dir.join(format!("{stem}.png")), browser.screenshot().await?)?;
            std::fs::write(dir.join(format!("{stem}.html")), browser.source().await?)?;
            eprintln!(
                "{}: saved {}",
                self.name,
                dir.join(format!("{stem}.png")).display()
            );
        }
        Ok(())
    }
}

#[test]
fn dashboard_numbers_parse_as_people_write_them() {
    let cases = [
        ("1,234", Some(1234.0)),
        ("12.5/s", Some(12.5)),
        ("3.2k", Some(3200.0)),
        ("1.5 M msg/s", Some(1_500_000.0)),
        ("0", Some(0.0)),
        ("—", None),
        ("", None),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_number(text), expected, "{text:?}");
    }
}
