//! Interest propagation between three nodes' routes under loss, reconnects,
//! delays and restarts of the receiving end, in a simulated network on
//! paused Tokio time.
//!
//! Every ordered pair of nodes (a → b) has a [`SimLink`] that calls b's
//! [`RouteHost`] directly, as node a, over a simulated connection: an epoch
//! that changes whenever the connection is replaced, and faults switched on
//! and off by the test (from its seed) and drawn call by call (from the
//! link's own seeded generator): the link down (every call unreachable), a
//! dying connection (one-way frames lost, or delivered late, after the
//! connection was replaced; replies lost), slow calls, and b restarting
//! its route host (it forgets every session of a). Nodes subscribe,
//! unsubscribe and publish throughout. Once everything heals, each node must know
//! exactly the interest of every other, every route must be up, and a
//! message published anywhere must reach a subscriber on every node once.
//!
//! `COURIER_SEED=N` replays one seed; `COURIER_SIM_SEEDS=N` runs N seeds
//! (default 8 for the interest test, 3 for the delivery test) and
//! `COURIER_SIM_STEPS=N` runs N steps a seed (default 300; the delivery
//! test runs a third of that).
//! Everything follows the seed: the test's steps, each link's draws, and
//! the routes' backoff jitter and session ids (`RouteConfig::jitter_seed`),
//! on a single-threaded runtime with paused time, so a seed replays the
//! same run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use courier_pubsub::route::{
    spawn_route, Link, LinkError, Outbound, RouteConfig, RouteHost, RouteItem, RouteService,
};
use courier_pubsub::{Bus, Event, Interest, SubscribeOptions, Subscription};
use courier_test_support::Rng;

const NODES: [u64; 3] = [1, 2, 3];
const FILTERS: [&str; 4] = ["a.>", "a.*", "b.c", "_inbox.x.*"];
const GROUPS: [&str; 2] = ["g", "h"];
/// Subjects published during the faults (whoever wants them).
const SUBJECTS: [&str; 4] = ["a.x", "a.x.y", "b.c", "_inbox.x.1"];

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn config() -> RouteConfig {
    RouteConfig::default()
        .with_check_every(ms(200))
        .with_backoff(ms(50), ms(1000))
}

/// Longest a slow link holds a call.
const MAX_DELAY: Duration = Duration::from_millis(300);
/// Quiet time after healing: several check periods, the longest backoff
/// and the longest delay, with room to spare.
const SETTLE: Duration = Duration::from_secs(5);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// The seeds to run: `COURIER_SEED` alone if set, else `COURIER_SIM_SEEDS`
/// (or `default`) seeds from `base`.
fn seeds(base: u64, default: u64) -> Vec<u64> {
    match env_u64("COURIER_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("COURIER_SIM_SEEDS").unwrap_or(default))
            .map(|i| base + i)
            .collect(),
    }
}

fn steps(default: usize) -> usize {
    env_u64("COURIER_SIM_STEPS").map_or(default, |s| s as usize)
}

/// Runs `sim` for each seed on a fresh current-thread runtime with paused
/// time, so one seed's tasks and timers never meet another's.
fn run_seeds<F>(base: u64, default_seeds: u64, sim: impl Fn(u64) -> F)
where
    F: std::future::Future<Output = ()>,
{
    for seed in seeds(base, default_seeds) {
        eprintln!("seed {seed} (replay with COURIER_SEED={seed})");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(sim(seed));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// A frame of a dying connection still on its way.
#[derive(Debug)]
struct Late {
    epoch: u64,
    session: u64,
    seq: u64,
    items: Vec<RouteItem>,
}

/// One link's connection and faults.
#[derive(Debug)]
struct Conn {
    rng: Rng,
    /// The connection now; a new one gets the next number.
    epoch: u64,
    /// Every call fails.
    down: bool,
    /// The connection is dying: frames may be lost or arrive late, replies
    /// may be lost. Switching it off replaces the connection.
    lossy: bool,
    /// Calls may be held up.
    slow: bool,
    /// The receiving end; replaced when it restarts.
    host: RouteHost,
    late: Vec<Late>,
    /// What happened, for the failure message.
    lost_frames: u64,
    late_frames: u64,
    lost_replies: u64,
    delays: u64,
    restarts: u64,
}

/// The route from node `from` to the node whose host `conn` holds.
#[derive(Debug, Clone)]
struct SimLink {
    from: u64,
    conn: Arc<Mutex<Conn>>,
}

impl SimLink {
    fn unreachable(&self) -> LinkError {
        LinkError::Unreachable(format!("link from {} is down", self.from))
    }

    /// What every call does first: fail if the link is down, deliver (or
    /// lose) frames of a replaced connection that were still on their way,
    /// wait if the link is slow. Returns the host to call.
    async fn begin(&self) -> Result<RouteHost, LinkError> {
        let (host, late, delay) = {
            let mut conn = lock(&self.conn);
            if conn.down {
                return Err(self.unreachable());
            }
            let epoch = conn.epoch;
            let mut late = Vec::new();
            if conn.late.iter().any(|l| l.epoch < epoch) {
                match conn.rng.below(10) {
                    0..=3 => {
                        let (old, current) = std::mem::take(&mut conn.late)
                            .into_iter()
                            .partition(|l| l.epoch < epoch);
                        late = old;
                        conn.late = current;
                        conn.late_frames += late.len() as u64;
                    }
                    4 => {
                        let before = conn.late.len();
                        conn.late.retain(|l| l.epoch == epoch);
                        conn.lost_frames += (before - conn.late.len()) as u64;
                    }
                    _ => {}
                }
            }
            let delay = if conn.slow && conn.rng.chance(0.3) {
                conn.delays += 1;
                Some(conn.rng.between(ms(1), MAX_DELAY))
            } else {
                None
            };
            (conn.host.clone(), late, delay)
        };
        for frame in late {
            host.items(self.from, frame.session, frame.seq, frame.items)
                .await;
        }
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
            let conn = lock(&self.conn);
            if conn.down {
                return Err(self.unreachable());
            }
            // The host may have restarted meanwhile.
            return Ok(conn.host.clone());
        }
        Ok(host)
    }

    /// For a call with a reply on a dying connection: whether the request
    /// is lost (`Some(false)`), or it gets there but the reply is lost
    /// (`Some(true)`).
    fn lose_reply(&self) -> Option<bool> {
        let mut conn = lock(&self.conn);
        if !conn.lossy {
            return None;
        }
        match conn.rng.below(10) {
            0 => {
                conn.lost_replies += 1;
                Some(false)
            }
            1 => {
                conn.lost_replies += 1;
                Some(true)
            }
            _ => None,
        }
    }

    fn epoch(&self) -> u64 {
        lock(&self.conn).epoch
    }
}

impl Link for SimLink {
    async fn open(&self, session: u64) -> Result<u64, LinkError> {
        let host = self.begin().await?;
        let lose = self.lose_reply();
        if lose == Some(false) {
            return Err(self.unreachable());
        }
        host.open(self.from, session)
            .await
            .map_err(LinkError::Refused)?;
        if lose == Some(true) {
            return Err(self.unreachable());
        }
        Ok(self.epoch())
    }

    async fn send(&self, session: u64, seq: u64, items: &[RouteItem]) -> Result<u64, LinkError> {
        let host = self.begin().await?;
        let epoch = {
            let mut conn = lock(&self.conn);
            let epoch = conn.epoch;
            if conn.lossy {
                match conn.rng.below(10) {
                    0..=2 => {
                        conn.lost_frames += 1;
                        return Ok(epoch);
                    }
                    3..=4 => {
                        conn.late.push(Late {
                            epoch,
                            session,
                            seq,
                            items: items.to_vec(),
                        });
                        return Ok(epoch);
                    }
                    _ => {}
                }
            }
            epoch
        };
        host.items(self.from, session, seq, items.to_vec()).await;
        Ok(epoch)
    }

    async fn check(&self, session: u64) -> Result<(u64, u64), LinkError> {
        let host = self.begin().await?;
        let lose = self.lose_reply();
        if lose == Some(false) {
            return Err(self.unreachable());
        }
        let applied = host
            .check(self.from, session)
            .await
            .map_err(LinkError::Refused)?;
        if lose == Some(true) {
            return Err(self.unreachable());
        }
        Ok((applied, self.epoch()))
    }
}

/// One route: its link's state and its sending half.
struct Route {
    from: u64,
    to: u64,
    conn: Arc<Mutex<Conn>>,
    outbound: Arc<Outbound>,
    task: tokio::task::JoinHandle<()>,
}

/// Three nodes, each routed to the other two.
struct Sim {
    seed: u64,
    buses: BTreeMap<u64, Bus>,
    routes: Vec<Route>,
    /// Subscriptions held, by node.
    held: BTreeMap<u64, Vec<(Interest, Subscription)>>,
    /// The last steps, for the failure message.
    log: Vec<String>,
}

impl Sim {
    fn start(seed: u64) -> Sim {
        let buses: BTreeMap<u64, Bus> = NODES.iter().map(|&n| (n, Bus::new())).collect();
        let hosts: BTreeMap<u64, RouteHost> = buses
            .iter()
            .map(|(&n, bus)| (n, RouteHost::new(bus.clone(), config())))
            .collect();
        let mut routes = Vec::new();
        for &from in &NODES {
            for &to in &NODES {
                if from == to {
                    continue;
                }
                let conn = Arc::new(Mutex::new(Conn {
                    rng: Rng(seed ^ (from * 0x1000 + to).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    epoch: 1,
                    down: false,
                    lossy: false,
                    slow: false,
                    host: hosts[&to].clone(),
                    late: Vec::new(),
                    lost_frames: 0,
                    late_frames: 0,
                    lost_replies: 0,
                    delays: 0,
                    restarts: 0,
                }));
                let link = SimLink {
                    from,
                    conn: conn.clone(),
                };
                let mut route_config = config();
                route_config.jitter_seed = Some(seed ^ (from << 32 | to));
                let (task, outbound) = spawn_route(&buses[&from], to, route_config, link);
                routes.push(Route {
                    from,
                    to,
                    conn,
                    outbound,
                    task,
                });
            }
        }
        Sim {
            seed,
            buses,
            routes,
            held: NODES.iter().map(|&n| (n, Vec::new())).collect(),
            log: Vec::new(),
        }
    }

    fn note(&mut self, what: String) {
        if self.log.len() == 40 {
            self.log.remove(0);
        }
        self.log.push(what);
    }

    fn subscribe(&mut self, rng: &mut Rng) {
        let node = NODES[rng.index(NODES.len())];
        let filter = FILTERS[rng.index(FILTERS.len())];
        let (interest, options) = if rng.chance(0.3) {
            let group = GROUPS[rng.index(GROUPS.len())];
            (
                Interest::group(filter, group),
                SubscribeOptions::default().group(group),
            )
        } else {
            (Interest::plain(filter), SubscribeOptions::default())
        };
        let sub = self.buses[&node]
            .blocking_subscribe(filter, options)
            .expect("a valid filter");
        self.note(format!("node {node} subscribes {interest:?}"));
        self.held.get_mut(&node).unwrap().push((interest, sub));
    }

    fn unsubscribe(&mut self, rng: &mut Rng) {
        let node = NODES[rng.index(NODES.len())];
        let held = self.held.get_mut(&node).unwrap();
        if held.is_empty() {
            return;
        }
        let (interest, sub) = held.swap_remove(rng.index(held.len()));
        drop(sub);
        self.note(format!("node {node} unsubscribes {interest:?}"));
    }

    async fn publish(&mut self, rng: &mut Rng) {
        let node = NODES[rng.index(NODES.len())];
        let subject = SUBJECTS[rng.index(SUBJECTS.len())];
        self.buses[&node]
            .publisher()
            .publish(subject, "during")
            .await
            .expect("a valid subject");
    }

    fn fault(&mut self, rng: &mut Rng) {
        let route = &self.routes[rng.index(self.routes.len())];
        let (from, to) = (route.from, route.to);
        let what = {
            let mut conn = lock(&route.conn);
            match rng.below(5) {
                0 => {
                    // Going down loses the connection; coming back is a new one.
                    conn.down = !conn.down;
                    conn.epoch += 1;
                    format!("down {}", conn.down)
                }
                1 => {
                    conn.lossy = !conn.lossy;
                    if !conn.lossy {
                        conn.epoch += 1;
                    }
                    format!("lossy {}", conn.lossy)
                }
                2 => {
                    conn.slow = !conn.slow;
                    format!("slow {}", conn.slow)
                }
                3 => {
                    conn.host = RouteHost::new(self.buses[&to].clone(), config());
                    conn.restarts += 1;
                    // A restart usually takes the connection with it; when
                    // it does not, the unknown session must be noticed.
                    let replaced = rng.chance(0.5);
                    if replaced {
                        conn.epoch += 1;
                    }
                    format!("host restarts (new connection: {replaced})")
                }
                _ => {
                    conn.epoch += 1;
                    "reconnects".to_string()
                }
            }
        };
        self.note(format!("link {from}->{to}: {what}"));
    }

    /// A few hundred random steps with time passing in between.
    async fn churn(&mut self, rng: &mut Rng, steps: usize) {
        for _ in 0..steps {
            match rng.below(100) {
                0..=29 => self.subscribe(rng),
                30..=49 => self.unsubscribe(rng),
                50..=59 => self.publish(rng).await,
                60..=84 => self.fault(rng),
                _ => {}
            }
            tokio::time::sleep(rng.between(Duration::ZERO, ms(300))).await;
        }
    }

    /// Every fault off (a dying connection is replaced).
    fn heal(&mut self) {
        for route in &self.routes {
            let mut conn = lock(&route.conn);
            conn.down = false;
            conn.slow = false;
            if conn.lossy {
                conn.lossy = false;
                conn.epoch += 1;
            }
        }
        self.note("heal".to_string());
    }

    /// What is wrong with every node's view of the others, if anything.
    fn wrong_views(&self) -> Vec<String> {
        let mut wrong = Vec::new();
        for route in &self.routes {
            let (a, b) = (route.from, route.to);
            let local = self.buses[&a].local_interest();
            let seen = self.buses[&b].remote_interest(a);
            if seen != local {
                wrong.push(format!(
                    "node {b} sees node {a}'s interest as {seen:?}, but it is {local:?}"
                ));
            }
            if !route.outbound.is_up() {
                wrong.push(format!("route {a}->{b} is not up"));
            }
        }
        wrong
    }

    fn sessions(&self) -> Vec<u64> {
        self.routes.iter().map(|r| r.outbound.sessions()).collect()
    }

    /// One line a route: what its link did to it.
    fn links(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|r| {
                let c = lock(&r.conn);
                format!(
                    "{}->{}: epoch {}, {} sessions, up {}, {} interests known, lost frames {}, \
                     late frames {}, lost replies {}, delays {}, restarts {}",
                    r.from,
                    r.to,
                    c.epoch,
                    r.outbound.sessions(),
                    r.outbound.is_up(),
                    self.buses[&r.to].remote_interest(r.from).len(),
                    c.lost_frames,
                    c.late_frames,
                    c.lost_replies,
                    c.delays,
                    c.restarts
                )
            })
            .collect()
    }

    /// The failure message: the seed, what is wrong, the links and the
    /// last steps.
    fn report(&self, wrong: &[String]) -> String {
        format!(
            "seed {seed} (replay with COURIER_SEED={seed}):\n  {}\nlinks:\n  {}\nlast steps:\n  {}",
            wrong.join("\n  "),
            self.links().join("\n  "),
            self.log.join("\n  "),
            seed = self.seed
        )
    }

    fn assert_views(&self, when: &str) {
        let wrong = self.wrong_views();
        assert!(wrong.is_empty(), "{when}: {}", self.report(&wrong));
    }

    fn stop(self) {
        eprintln!("seed {}: {}", self.seed, self.links().join("; "));
        for route in &self.routes {
            route.task.abort();
        }
    }
}

/// Faults and interest changes, then healing: every node's view of every
/// other's interest is exact, every route is up, a healthy network starts
/// no new sessions, and changes after healing still get through.
#[test]
fn interest_converges_after_loss_reconnects_and_restarts() {
    let steps = steps(300);
    run_seeds(0x5EED_0000, 8, |seed| async move {
        let mut rng = Rng(seed);
        let mut sim = Sim::start(seed);
        sim.churn(&mut rng, steps).await;
        sim.heal();
        tokio::time::sleep(SETTLE).await;
        sim.assert_views("after healing");

        let sessions = sim.sessions();
        for _ in 0..10 {
            if rng.chance(0.5) {
                sim.subscribe(&mut rng);
            } else {
                sim.unsubscribe(&mut rng);
            }
            tokio::time::sleep(rng.between(Duration::ZERO, ms(100))).await;
        }
        tokio::time::sleep(SETTLE).await;
        sim.assert_views("after changes on a healed network");
        assert_eq!(
            sim.sessions(),
            sessions,
            "a healthy network started new sessions: {}",
            sim.report(&[])
        );
        sim.stop();
    });
}

/// After healing, a message published on any node reaches one plain
/// subscriber on every node exactly once.
#[test]
fn after_healing_every_node_gets_every_message_once() {
    let steps = steps(300) / 3;
    run_seeds(0xD0_0000, 3, |seed| async move {
        let mut rng = Rng(seed);
        let mut sim = Sim::start(seed);
        sim.churn(&mut rng, steps).await;
        sim.heal();
        tokio::time::sleep(SETTLE).await;
        sim.assert_views("after healing");

        let mut subscribers: BTreeMap<u64, Subscription> = sim
            .buses
            .iter()
            .map(|(&n, bus)| {
                let sub = bus
                    .blocking_subscribe("a.>", SubscribeOptions::default())
                    .expect("a valid filter");
                (n, sub)
            })
            .collect();
        tokio::time::sleep(SETTLE).await;
        sim.assert_views("after subscribing");

        for (&node, bus) in &sim.buses {
            bus.publisher()
                .publish(&format!("a.from.{node}"), node.to_string())
                .await
                .expect("a valid subject");
        }
        // received[receiver][sender] = copies.
        let mut received: BTreeMap<u64, BTreeMap<u64, u32>> = BTreeMap::new();
        let mut other: Vec<String> = Vec::new();
        let mut drain = |subscribers: &mut BTreeMap<u64, Subscription>| {
            for (&node, sub) in subscribers.iter_mut() {
                while let Some(event) = sub.try_recv() {
                    match event {
                        Event::Message(message) => {
                            let sender: u64 = std::str::from_utf8(&message.payload)
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0);
                            *received.entry(node).or_default().entry(sender).or_default() += 1;
                        }
                        event => other.push(format!("node {node}: {event:?}")),
                    }
                }
            }
            received.clone()
        };
        let everyone: BTreeMap<u64, u32> = NODES.iter().map(|&n| (n, 1)).collect();
        let expected: BTreeMap<u64, BTreeMap<u64, u32>> =
            NODES.iter().map(|&n| (n, everyone.clone())).collect();
        for _ in 0..200 {
            if drain(&mut subscribers) == expected {
                break;
            }
            tokio::time::sleep(ms(10)).await;
        }
        // Time for duplicates to show up.
        tokio::time::sleep(SETTLE).await;
        let got = drain(&mut subscribers);
        assert_eq!(
            got,
            expected,
            "copies of each message by receiver and sender; other events {other:?}; {}",
            sim.report(&[])
        );
        drop(subscribers);
        sim.stop();
    });
}
