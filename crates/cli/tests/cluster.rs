//! A three-node cluster of real `courier serve` processes: every `kv` and
//! `cluster` command against it on loopback, a leader killed with SIGKILL
//! and restarted, a leader cut off in network namespaces (no split brain),
//! and a wiped node removed, re-added and caught up from a snapshot.
//!
//! Every test kills its processes on drop and removes its directories and
//! namespaces; every wait is bounded in tries and time, and no assertion is
//! about how long something took. `CLUSTER_TEST_ROUNDS=N` kills and
//! restarts the leader N times instead of once (for long runs; not a
//! `COURIER_*` name, which `courier serve` would refuse as an unknown
//! setting).

mod support;
use support::cluster::*;
use support::netns::Bridged;
use support::{stderr, stdout};

#[test]
fn every_kv_and_cluster_command_works_against_a_three_node_cluster() {
    let cluster = Cluster::on_loopback("cluster-commands", "");
    let url = cluster.url();
    cluster.wait_ready(&url);
    let kv = |args: &[&str]| cluster.courier(&url, args);

    // A watch from the start, running while the writes happen; it stops
    // after the 7 changes under k/ (the write to other/ is not one).
    let watch = Background::start(
        &[],
        &url,
        &["kv", "watch", "k/", "--from", "1", "--count", "7"],
        "",
    );

    // put, get; revisions count from 1 in a new cluster.
    assert_eq!(ok(kv(&["kv", "put", "k/a", "1"])), "revision 1\n");
    assert_eq!(ok(kv(&["kv", "get", "k/a"])), "1\n");
    assert_eq!(ok(kv(&["kv", "put", "k/b", "2"])), "revision 2\n");

    // cas: a matching revision swaps; a stale one is refused with exit 1
    // and the current revision in the message.
    assert_eq!(
        ok(kv(&["kv", "cas", "k/a", "--revision", "1", "x"])),
        "revision 3\n"
    );
    let stale = kv(&["kv", "cas", "k/a", "--revision", "1", "y"]);
    assert_eq!(stale.status.code(), Some(1), "{}", show(&stale));
    assert_eq!(stdout(&stale), "");
    assert_eq!(
        stderr(&stale),
        "courier: error: \"k/a\" is at revision 3, not 1\n"
    );
    // --revision 0: create only.
    assert_eq!(
        ok(kv(&["kv", "cas", "k/c", "--revision", "0", "new"])),
        "revision 4\n"
    );
    let exists = kv(&["kv", "cas", "k/c", "--revision", "0", "again"]);
    assert_eq!(exists.status.code(), Some(1), "{}", show(&exists));
    assert!(
        stderr(&exists).contains("\"k/c\" is at revision 4, not 0"),
        "{}",
        show(&exists)
    );
    let json = kv(&["--json", "kv", "cas", "k/a", "--revision", "2", "z"]);
    assert_eq!(json.status.code(), Some(1), "{}", show(&json));
    let refused: serde_json::Value = serde_json::from_str(stdout(&json).trim()).unwrap();
    assert_eq!(
        refused,
        serde_json::json!({"key": "k/a", "swapped": false, "mod_revision": 3})
    );
    assert_eq!(
        ok(kv(&["kv", "get", "k/a"])),
        "x\n",
        "refused swaps change nothing"
    );

    // get --json: the key's revisions and version.
    let got: serde_json::Value =
        serde_json::from_str(ok(kv(&["--json", "kv", "get", "k/a"])).trim()).unwrap();
    assert_eq!(
        (
            &got["value"],
            &got["create_revision"],
            &got["mod_revision"],
            &got["version"]
        ),
        (
            &serde_json::json!("x"),
            &serde_json::json!(1),
            &serde_json::json!(3),
            &serde_json::json!(2)
        ),
        "{got}"
    );

    // list, in key order.
    assert_eq!(ok(kv(&["kv", "list", "k/"])), "k/a x\nk/b 2\nk/c new\n");
    assert_eq!(ok(kv(&["kv", "list", "k/", "--stale"])).lines().count(), 3);

    // del, then an absent key: exit 4 for get, a plain answer for del.
    assert_eq!(ok(kv(&["kv", "del", "k/b"])), "deleted k/b\n");
    assert_eq!(ok(kv(&["kv", "del", "k/b"])), "no key k/b\n");
    let absent = kv(&["kv", "get", "k/b"]);
    assert_eq!(absent.status.code(), Some(4), "{}", show(&absent));
    assert_eq!(stdout(&absent), "");
    assert_eq!(stderr(&absent), "courier: error: no key \"k/b\"\n");
    // Deleting an absent key wrote nothing: the next write is revision 6.
    assert_eq!(ok(kv(&["kv", "put", "other/z", "9"])), "revision 6\n");
    assert_eq!(ok(kv(&["kv", "put", "k/d", "4"])), "revision 7\n");
    assert_eq!(ok(kv(&["kv", "del", "k/d"])), "deleted k/d\n");
    assert_eq!(ok(kv(&["kv", "put", "k/a", "last"])), "revision 9\n");

    // The watch saw every change under k/, in order, and nothing else.
    let watched = ok(watch.finish("kv watch k/"));
    assert_eq!(
        watched,
        "1 put k/a 1\n2 put k/b 2\n3 put k/a x\n4 put k/c new\n5 delete k/b\n\
         7 put k/d 4\n8 delete k/d\n"
    );
    // Run afterwards, from a revision in the past, over every key.
    let all = ok(kv(&["kv", "watch", "", "--from", "5", "--count", "5"]));
    assert_eq!(
        all,
        "5 delete k/b\n6 put other/z 9\n7 put k/d 4\n8 delete k/d\n9 put k/a last\n"
    );
    let json_watch = ok(kv(&[
        "--json", "kv", "watch", "k/", "--from", "9", "--count", "1",
    ]));
    let event: serde_json::Value = serde_json::from_str(json_watch.trim()).unwrap();
    assert_eq!(
        (
            &event["event"],
            &event["key"],
            &event["value"],
            &event["revision"]
        ),
        (
            &serde_json::json!("put"),
            &serde_json::json!("k/a"),
            &serde_json::json!("last"),
            &serde_json::json!(9)
        ),
        "{event}"
    );

    // cluster status --json: a leader among the three, three voters.
    let status: serde_json::Value =
        serde_json::from_str(ok(kv(&["cluster", "status", "--json"])).trim()).unwrap();
    let leader = status["leader"].as_u64().expect("a leader");
    assert!(IDS.contains(&leader), "{status}");
    assert_eq!(Cluster::members(&status), [(1, true), (2, true), (3, true)]);
    for member in status["members"].as_array().unwrap() {
        let id = member["id"].as_u64().unwrap();
        assert_eq!(member["address"], cluster.address(id), "{status}");
    }
    assert!(status["term"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["node"], leader, "answered by the leader: {status}");
    assert_eq!(status["role"], "leader", "{status}");
    assert_eq!(status["revision"], 9, "{status}");

    // The text status: a summary line, a header, one row per member, then
    // the answering node's routes: a title, a header, one row per peer.
    let text = ok(kv(&["cluster", "status"]));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 9, "{text}");
    assert!(
        lines[0].starts_with(&format!("leader node {leader}, term ")),
        "{text}"
    );
    assert!(lines[0].ends_with(", revision 9"), "{text}");
    let header: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(header, ["node", "role", "lag", "address"], "{text}");
    for (row, id) in lines[2..5].iter().zip(IDS) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        let role = if id == leader { "leader" } else { "voter" };
        assert_eq!(cells.len(), 4, "{text}");
        assert_eq!(
            (cells[0], cells[1], cells[3]),
            (id.to_string().as_str(), role, cluster.address(id)),
            "{text}"
        );
    }

    assert_eq!(lines[5], format!("routes of node {leader}:"), "{text}");
    assert_eq!(lines[6].split_whitespace().next(), Some("peer"), "{text}");
    let peers: Vec<u64> = lines[7..]
        .iter()
        .map(|row| row.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    let others: Vec<u64> = IDS.into_iter().filter(|&id| id != leader).collect();
    assert_eq!(peers, others, "{text}");

    // A list whose first address is dead: the client moves on.
    let dead = format!("tcp://127.0.0.1:{}", free_port());
    let with_dead = format!("{dead},{url}");
    let put = cluster.courier(&with_dead, &["kv", "put", "k/e", "5"]);
    assert_eq!(ok(put), "revision 10\n");
    assert_eq!(
        ok(cluster.courier(&with_dead, &["kv", "get", "k/e"])),
        "5\n"
    );
    let status = ok(cluster.courier(&with_dead, &["--json", "cluster", "status"]));
    assert!(status.contains("\"leader\":"), "{status}");
    // Only dead addresses: unreachable, exit 3, one line.
    let unreachable = cluster.courier(&dead, &["kv", "get", "k/e"]);
    assert_eq!(unreachable.status.code(), Some(3), "{}", show(&unreachable));
    assert_eq!(
        stderr(&unreachable).lines().count(),
        1,
        "{}",
        show(&unreachable)
    );

    // Usage errors: exit 2, nothing written.
    for args in [
        vec!["kv", "cas", "k/a", "--revision", "many", "v"],
        vec!["kv", "put", "k/a"],
        vec!["cluster", "add-node", "4", "not an address"],
        vec!["cluster", "add-node", "four", "tcp://127.0.0.1:1"],
    ] {
        let output = kv(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", show(&output));
    }
    let after: serde_json::Value =
        serde_json::from_str(ok(kv(&["--json", "kv", "get", "k/a"])).trim()).unwrap();
    assert_eq!(
        after["mod_revision"], 9,
        "the usage errors wrote nothing: {after}"
    );
}

#[test]
fn killing_the_leader_elects_another_that_serves_writes_and_the_old_one_catches_up() {
    let rounds: usize = std::env::var("CLUSTER_TEST_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut cluster = Cluster::on_loopback("cluster-kill-leader", "");
    let url = cluster.url();
    cluster.wait_ready(&url);
    let mut written = Vec::new();
    for round in 0..rounds {
        for n in 0..10 {
            let (key, value) = (format!("before/{round}/{n}"), format!("v{n}"));
            ok(cluster.courier(&url, &["kv", "put", &key, &value]));
            written.push((key, value));
        }
        let leader = cluster.leader(&url);
        cluster.kill(leader);

        // A write through the whole list succeeds once another leads.
        let key = format!("after/{round}");
        cluster.put_until_done(&url, &key, "written");
        written.push((key, "written".to_string()));
        let status = cluster.leader_status(&url);
        assert_ne!(status["leader"], leader, "{status}");
        assert_eq!(
            Cluster::members(&status).len(),
            3,
            "still a member: {status}"
        );

        // Nothing acknowledged before the kill is lost.
        for (key, value) in &written {
            let read = cluster.courier(&url, &["kv", "get", key]);
            assert_eq!(ok(read), format!("{value}\n"), "{key}");
        }

        // Restarted on its data: it follows, and catches up.
        let latest = format!("latest/{round}");
        cluster.put_until_done(&url, &latest, "final");
        cluster.start_node(leader);
        cluster.wait_caught_up(leader, &latest, "final");
        let own = ok(cluster.courier(
            cluster.address(leader),
            &["kv", "list", "before/", "--stale"],
        ));
        assert_eq!(own.lines().count(), 10 * (round + 1), "{own}");
        written.push((latest, "final".to_string()));
    }
}

#[test]
fn in_network_namespaces_a_cut_off_leader_refuses_writes_and_catches_up_when_healed() {
    let spaces = match Bridged::create() {
        Ok(spaces) => spaces,
        Err(reason) => {
            println!("skipped: cannot create network namespaces ({reason})");
            return;
        }
    };
    let cluster = spaces.cluster("cluster-netns", "");
    let url = cluster.url();
    cluster.wait_ready(&url);
    cluster.put_until_done(&url, "before", "1");
    let old = cluster.leader(&url);
    let majority = cluster.url_without(old);

    // Cut the leader off. A write sent to it alone, from its own namespace,
    // must fail (it cannot reach a majority), however long it waits.
    spaces.link(old, false);
    let refused = spaces.start_at(&cluster, old, &["kv", "put", "split", "brain"]);

    // Meanwhile the other two elect a leader and take writes.
    let revision = cluster.put_until_done(&majority, "majority", "won");
    let status = cluster.leader_status(&majority);
    assert_ne!(status["leader"], old, "{status}");
    assert!(
        status["term"].as_u64().unwrap() >= 2,
        "a new term: {status}"
    );
    // The cut-off node has not seen it.
    let behind = cluster.courier_at(
        old,
        cluster.address(old),
        &["kv", "get", "majority", "--stale"],
    );
    assert_eq!(behind.status.code(), Some(4), "{}", show(&behind));

    let refused = refused.finish("kv put split brain (cut off)");
    assert!(!refused.status.success(), "split brain: {}", show(&refused));
    assert_ne!(refused.status.code(), Some(0));
    assert!(!stdout(&refused).contains("revision"), "{}", show(&refused));

    // Heal: the old leader follows the new one and catches up; the write it
    // took while cut off was never committed, anywhere.
    spaces.link(old, true);
    cluster.wait_caught_up(old, "majority", "won");
    let split = cluster.courier(&url, &["kv", "get", "split"]);
    assert_eq!(split.status.code(), Some(4), "{}", show(&split));
    let split = cluster.courier_at(
        old,
        cluster.address(old),
        &["kv", "get", "split", "--stale"],
    );
    assert_eq!(split.status.code(), Some(4), "{}", show(&split));
    assert_eq!(ok(cluster.courier(&url, &["kv", "get", "before"])), "1\n");
    let status = cluster.leader_status(&url);
    assert_eq!(Cluster::members(&status), [(1, true), (2, true), (3, true)]);
    assert!(status["revision"].as_u64().unwrap() >= revision, "{status}");
    drop(cluster);
    drop(spaces);
}

/// Writes 120 keys with snapshots every 20 entries, kills a follower,
/// wipes its data, removes it, restarts it empty (with `--join` if `join`,
/// else with its `--peer` flags) and adds it back through `add_url` (given
/// the cluster and the follower's id): it catches up from a snapshot, since
/// the others' logs no longer reach back far enough.
fn wipe_remove_and_re_add(label: &str, join: bool, add_url: impl Fn(&Cluster, u64) -> String) {
    const KEYS: usize = 120;
    let mut cluster = Cluster::on_loopback(label, "snapshot_after = 20\n");
    let url = cluster.url();
    cluster.wait_ready(&url);
    for n in 0..KEYS {
        ok(cluster.courier(&url, &["kv", "put", &format!("k/{n:03}"), &format!("v{n}")]));
    }
    let leader = cluster.leader(&url);
    let follower = IDS.into_iter().find(|&id| id != leader).unwrap();
    let others = cluster.url_without(follower);
    cluster.kill(follower);
    std::fs::remove_dir_all(cluster.data(follower)).unwrap();

    let removed = cluster.courier(&others, &["cluster", "remove-node", &follower.to_string()]);
    assert!(removed.status.success(), "{}", show(&removed));
    assert_eq!(stderr(&removed), format!("node {follower} removed\n"));
    let status = cluster.leader_status(&others);
    let left: Vec<u64> = Cluster::members(&status).iter().map(|m| m.0).collect();
    assert!(!left.contains(&follower), "{status}");
    assert_eq!(left.len(), 2, "{status}");
    // The two left are a majority of two: they still take writes.
    cluster.put_until_done(&others, "k/while-out", "yes");

    // Back, empty, on the same id and address, then added.
    if join {
        cluster.start_joining(follower);
    } else {
        cluster.start_node(follower);
    }
    let address = cluster.address(follower).to_string();
    let add_url = add_url(&cluster, follower);
    let added = cluster.courier(
        &add_url,
        &["cluster", "add-node", &follower.to_string(), &address],
    );
    assert!(
        added.status.success(),
        "{}\nnode {follower}'s log:\n{}",
        show(&added),
        cluster.log(follower)
    );
    assert_eq!(
        stderr(&added),
        format!("node {follower} added at {address}\n")
    );
    let last = format!("k/{:03}", KEYS - 1);
    cluster.wait_caught_up(follower, &last, &format!("v{}", KEYS - 1));
    cluster.wait_caught_up(follower, "k/while-out", "yes");
    let listed = ok(cluster.courier(&address, &["kv", "list", "k/", "--stale"]));
    assert_eq!(listed.lines().count(), KEYS + 1, "{listed}");
    assert!(
        cluster
            .data(follower)
            .join(".cluster/raft/snapshot")
            .exists(),
        "node {follower} holds a snapshot"
    );
    let status = cluster.leader_status(&url);
    assert_eq!(Cluster::members(&status), [(1, true), (2, true), (3, true)]);
    // And it takes part: a write through it alone is redirected and done.
    let put = cluster.courier(&address, &["kv", "put", "k/after", "1"]);
    assert!(put.status.success(), "{}", show(&put));
    cluster.wait_caught_up(follower, "k/after", "1");
}

#[test]
fn a_wiped_node_is_removed_re_added_and_catches_up_from_a_snapshot() {
    // Restarted with its --peer flags, so it founds (uncommitted) a
    // cluster of the three again; membership changes go through the two
    // nodes that stayed (the next test sends them through the rejoining
    // one, and the --join test is the documented way).
    wipe_remove_and_re_add("cluster-rejoin", false, |cluster, follower| {
        cluster.url_without(follower)
    });
}

#[test]
fn add_node_through_a_url_list_that_starts_with_the_rejoining_node_reaches_the_leader() {
    // `courier --url <rejoining>,<others> cluster add-node …`, as an
    // operator with the usual list of every node would type it.
    wipe_remove_and_re_add("cluster-rejoin-any-url", false, |cluster, follower| {
        format!(
            "{},{}",
            cluster.address(follower),
            cluster.url_without(follower)
        )
    });
}

#[test]
fn a_wiped_node_restarted_with_join_is_re_added_through_any_node() {
    // `--join`, the documented way to start a node added later: it founds
    // nothing, so even a list that starts with it reaches the leader.
    wipe_remove_and_re_add("cluster-rejoin-join", true, |cluster, follower| {
        format!(
            "{},{}",
            cluster.address(follower),
            cluster.url_without(follower)
        )
    });
}
