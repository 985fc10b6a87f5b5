//! `courier kv ...` and `courier cluster ...`: the cluster's key-value store
//! and its membership, from the shell.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use courier_cluster::client::{KvClient, KvClientError};
use courier_cluster::node::Status;
use courier_cluster::types::{Event, EventKind, KeyValue};
use courier_transport::Address;

use crate::Failure;

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Set KEY to VALUE; prints the store's revision after the write.
    #[command(
        after_help = "Examples:\n  courier kv put config/color blue\n  courier --url tcp://a:7878,tcp://b:7878 kv put config/color blue"
    )]
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Print KEY's value alone on a line (exit code 4 if there is none).
    #[command(
        after_help = "Examples:\n  courier kv get config/color\n  courier kv get config/color --stale   # from any node, maybe behind\n  courier kv get config/color --json    # with its revisions"
    )]
    Get {
        /// The key.
        key: String,
        /// Read this node's copy as it is, without asking the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Delete KEY.
    #[command(
        name = "del",
        after_help = "Examples:\n  courier kv del config/color\n  courier --url tcp://a:7878,tcp://b:7878 kv del config/color"
    )]
    Delete {
        /// The key.
        key: String,
    },
    /// Print the keys under PREFIX with their values, one per line.
    #[command(
        after_help = "Examples:\n  courier kv list config/\n  courier kv list '' --limit 100"
    )]
    List {
        /// The prefix ('' for every key).
        prefix: String,
        /// At most this many.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Read this node's copy as it is.
        #[arg(long)]
        stale: bool,
    },
    /// Set KEY to VALUE only if its modification revision is R (0: only if
    /// KEY does not exist); otherwise exit 1 with the current revision.
    #[command(
        after_help = "Examples:\n  courier kv get config/color --json       # note mod_revision\n  courier kv cas config/color --revision 7 green"
    )]
    Cas {
        /// The key.
        key: String,
        /// The modification revision the key must have (0: absent).
        #[arg(long)]
        revision: u64,
        /// The new value.
        value: String,
    },
    /// Print every change under PREFIX as it happens (from revision R with
    /// --from, so nothing since R is missed).
    #[command(
        after_help = "Examples:\n  courier kv watch config/\n  courier kv watch config/ --from 42 --count 10"
    )]
    Watch {
        /// The prefix ('' for every key).
        prefix: String,
        /// The first revision to show (default: changes from now on).
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Members, leader, term and each member's replication lag.
    #[command(
        after_help = "Examples:\n  courier cluster status\n  courier cluster status --json | jq .leader"
    )]
    Status,
    /// Add node ID at ADDR as a voting member (it catches up first).
    #[command(
        name = "add-node",
        after_help = "Examples:\n  # on the new machine first, waiting to be added:\n  courier serve --listen tcp://10.0.0.4:7878 --node 4 --join\n  # then from anywhere:\n  courier cluster add-node 4 tcp://10.0.0.4:7878"
    )]
    AddNode {
        /// The new node's id.
        id: u64,
        /// Its address.
        address: String,
    },
    /// Remove node ID from the cluster. Its replicas of replicated queues
    /// are handed to other members (or dropped, if every member already
    /// holds one), each new one catching up before it votes.
    #[command(
        name = "remove-node",
        after_help = "Examples:\n  courier cluster remove-node 4\n  courier --url tcp://10.0.0.1:7878 cluster remove-node 4   # ask node 1"
    )]
    RemoveNode {
        /// The node's id.
        id: u64,
    },
}

/// The cluster behind `--url` (a comma-separated list).
fn kv_client(url: &str) -> anyhow::Result<KvClient> {
    let addresses =
        Address::parse_list(url).map_err(|err| Failure::usage(format!("--url {url:?}: {err}")))?;
    KvClient::new(&addresses, crate::client::client_config()).map_err(|e| Failure::usage(e).into())
}

/// Exit codes for the store's errors, by their kind ([`crate::code_for`]):
/// refusals (another identity's lease too) are 5, bad input or a missing
/// lease 2, an unreachable cluster 3.
fn failure(err: KvClientError) -> anyhow::Error {
    let code = crate::code_for(err.kind());
    anyhow::Error::new(Failure::with_code(code, err.to_string()))
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    serde_json::json!({
        "key": kv.key,
        "value": String::from_utf8_lossy(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

fn event_line(json: bool, event: &Event) -> String {
    let kind = match event.kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
    };
    if json {
        let mut value = kv_json(&event.kv);
        value["event"] = kind.into();
        value["revision"] = event.kv.mod_revision.into();
        return value.to_string();
    }
    match event.kind {
        EventKind::Put => format!(
            "{} put {} {}",
            event.kv.mod_revision,
            event.kv.key,
            String::from_utf8_lossy(&event.kv.value)
        ),
        EventKind::Delete => format!("{} delete {}", event.kv.mod_revision, event.kv.key),
    }
}

pub async fn kv(url: &str, json: bool, command: KvCommand) -> anyhow::Result<()> {
    let client = kv_client(url)?;
    let mut out = std::io::stdout().lock();
    match command {
        KvCommand::Put { key, value } => {
            let revision = client.put(&key, value).await.map_err(failure)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "key": key, "revision": revision })
                )?;
            } else {
                writeln!(out, "revision {revision}")?;
            }
        }
        KvCommand::Get { key, stale } => {
            let client = if stale {
                client.with_read(courier_cluster::node::Read::Stale)
            } else {
                client
            };
            let Some(kv) = client.get(&key).await.map_err(failure)? else {
                return Err(Failure::nothing(format!("no key {key:?}")).into());
            };
            if json {
                writeln!(out, "{}", kv_json(&kv))?;
            } else {
                out.write_all(&kv.value)?;
                out.write_all(b"\n")?;
            }
        }
        KvCommand::Delete { key } => {
            let prev = client.delete(&key).await.map_err(failure)?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "key": key, "deleted": prev.is_some() })
                )?;
            } else if prev.is_some() {
                writeln!(out, "deleted {key}")?;
            } else {
                writeln!(out, "no key {key}")?;
            }
        }
        KvCommand::List {
            prefix,
            limit,
            stale,
        } => {
            let client = if stale {
                client.with_read(courier_cluster::node::Read::Stale)
            } else {
                client
            };
            // Page by page (each fits one message) up to --limit keys.
            let mut printed = 0u32;
            let mut after: Option<String> = None;
            loop {
                let page = client
                    .list_after(&prefix, after.as_deref(), limit - printed)
                    .await
                    .map_err(failure)?;
                for kv in &page.kvs {
                    if json {
                        writeln!(out, "{}", kv_json(kv))?;
                    } else {
                        writeln!(out, "{} {}", kv.key, String::from_utf8_lossy(&kv.value))?;
                    }
                }
                printed += page.kvs.len() as u32;
                after = page.kvs.last().map(|kv| kv.key.clone());
                if !page.more || after.is_none() {
                    break;
                }
                if printed >= limit {
                    eprintln!("(more than {limit} keys; raise --limit)");
                    break;
                }
            }
        }
        KvCommand::Cas {
            key,
            revision,
            value,
        } => {
            let written = if revision == 0 {
                client.create(&key, value).await
            } else {
                client.cas(&key, revision, value).await
            };
            match written {
                Ok(now) => {
                    if json {
                        writeln!(
                            out,
                            "{}",
                            serde_json::json!({ "key": key, "revision": now })
                        )?;
                    } else {
                        writeln!(out, "revision {now}")?;
                    }
                }
                Err(err) => {
                    if let Some((current, _)) = err.condition_failed() {
                        let at = current.map_or(0, |kv| kv.mod_revision);
                        if json {
                            writeln!(
                                out,
                                "{}",
                                serde_json::json!({ "key": key, "swapped": false, "mod_revision": at })
                            )?;
                        }
                        return Err(Failure::with_code(
                            1,
                            format!("{key:?} is at revision {at}, not {revision}"),
                        )
                        .into());
                    }
                    return Err(failure(err));
                }
            }
        }
        KvCommand::Watch {
            prefix,
            from,
            count,
        } => {
            drop(out);
            let mut watch = client.watch(&prefix, from);
            let mut seen = 0u64;
            while count.is_none_or(|c| seen < c) {
                let event = watch.next().await.map_err(failure)?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", event_line(json, &event))?;
                out.flush()?;
                seen += 1;
            }
        }
    }
    Ok(())
}

fn print_status(json: bool, status: &Status) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let value = serde_json::to_value(status).context("status as JSON")?;
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let leader = status
        .leader
        .map_or("none".to_string(), |id| format!("node {id}"));
    writeln!(
        out,
        "leader {leader}, term {}, answered by node {} ({}), revision {}",
        status.term, status.node, status.role, status.revision
    )?;
    writeln!(out, "{:>5}  {:<8} {:>6}  address", "node", "role", "lag")?;
    for member in &status.members {
        let role = if Some(member.id) == status.leader {
            "leader"
        } else if member.voter {
            "voter"
        } else {
            "learner"
        };
        let lag = member.lag.map_or("-".to_string(), |l| l.to_string());
        writeln!(
            out,
            "{:>5}  {:<8} {:>6}  {}",
            member.id, role, lag, member.address
        )?;
    }
    if !status.routes.is_empty() {
        writeln!(out, "routes of node {}:", status.node)?;
        writeln!(
            out,
            "{:>5}  {:<10} {:>10} {:>10} {:>8} {:>6} {:>9}",
            "peer", "state", "msgs out", "msgs in", "dropped", "reconn", "interest"
        )?;
        for route in &status.routes {
            writeln!(
                out,
                "{:>5}  {:<10} {:>10} {:>10} {:>8} {:>6} {:>9}",
                route.node,
                route.state,
                route.messages_out,
                route.messages_in,
                route.dropped,
                route.reconnects,
                route.interest
            )?;
        }
    }
    Ok(())
}

pub async fn cluster(url: &str, json: bool, command: ClusterCommand) -> anyhow::Result<()> {
    let client = kv_client(url)?;
    match command {
        ClusterCommand::Status => {
            // The leader's view has the lags; fall back to whoever answers.
            let status = match client.leader_status().await {
                Ok(status) => status,
                Err(_) => client.status().await.map_err(failure)?,
            };
            print_status(json, &status)
        }
        ClusterCommand::AddNode { id, address } => {
            address
                .parse::<Address>()
                .map_err(|err| Failure::usage(format!("{address:?}: {err}")))?;
            client.add_member(id, &address).await.map_err(failure)?;
            eprintln!("node {id} added at {address}");
            Ok(())
        }
        ClusterCommand::RemoveNode { id } => {
            client.remove_member(id).await.map_err(failure)?;
            eprintln!("node {id} removed");
            Ok(())
        }
    }
}
