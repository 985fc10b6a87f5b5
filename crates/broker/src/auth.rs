//! Who may connect and what each identity may do, from the `[auth]` part of
//! the configuration.
//!
//! ```toml
//! [auth]
//! # Refuse connections that prove no identity (token or client certificate).
//! required = true
//!
//! [[auth.users]]
//! name = "billing"            # also the identity in a client certificate
//! token = "a long random string"
//! publish = ["invoices.>"]    # subject filters it may publish to
//! subscribe = ["orders.>"]    # filters its subscriptions must stay within
//! request = ["svc.tax"]       # services (subjects) it may send requests to
//! produce = ["jobs.>"]        # queues it may store messages in
//! consume = ["jobs.>", "durable.billing"]  # queues it may take from
//! admin = false               # may read the broker's stats (and, in a
//!                             # cluster, its status and membership)
//! kv_read = ["config/"]       # key prefixes it may read, list and watch
//! kv_write = ["config/"]      # key prefixes it may put and delete (and
//!                             # any non-empty list allows leases)
//! cluster = false             # may act as a cluster peer (Raft traffic):
//!                             # the identity of the other nodes' `token`
//! ```
//!
//! With no users configured, the broker is open: anyone may do anything.
//! With users, an identity not listed (or an anonymous connection) may do
//! nothing, except what request-reply needs: subscribing to its own inbox
//! (`_inbox.<id>` or `_inbox.<id>.*`, the id written out) and publishing
//! replies to inbox subjects. Inbox ids are random, and a wildcard in the id
//! position needs an explicit permission.
//!
//! Queue names are matched as subjects (`jobs.>` covers `jobs.eu`); a
//! durable subscription `name` keeps its messages in queue `durable.<name>`.

use std::collections::HashMap;

use courier_pubsub::remote::PubSubAccess;
use courier_pubsub::{Filter, Subject};
use courier_queue::remote::QueueAccess;
use courier_rpc::{Authenticator, Secret};

use crate::config::ConfigError;

/// The `[auth]` section.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Refuse connections without an identity. Default false.
    pub required: bool,
    /// The identities and their permissions.
    pub users: Vec<UserConfig>,
}

/// One identity and what it may do.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// The identity (a client certificate's DNS name proves it too).
    pub name: String,
    /// A bearer token that proves it (never logged).
    pub token: Option<Secret>,
    /// Subject filters it may publish to.
    pub publish: Vec<String>,
    /// Filters its subscriptions must stay within.
    pub subscribe: Vec<String>,
    /// Subjects (filters) it may send requests to.
    pub request: Vec<String>,
    /// Queues (as filters) it may store messages in.
    pub produce: Vec<String>,
    /// Queues (as filters) it may take messages from.
    pub consume: Vec<String>,
    /// May read the broker's stats.
    pub admin: bool,
    /// Key prefixes it may read in the cluster's key-value store.
    pub kv_read: Vec<String>,
    /// Key prefixes it may write.
    pub kv_write: Vec<String>,
    /// May send Raft traffic as a cluster peer.
    pub cluster: bool,
}

#[derive(Debug, Default)]
struct Rules {
    publish: Vec<Filter>,
    subscribe: Vec<Filter>,
    request: Vec<Filter>,
    produce: Vec<Filter>,
    consume: Vec<Filter>,
    admin: bool,
    kv_read: Vec<String>,
    kv_write: Vec<String>,
    cluster: bool,
}

/// The compiled `[auth]` section: authenticator and access decisions.
#[derive(Debug, Default)]
pub struct Policy {
    open: bool,
    tokens: Vec<(Secret, String)>,
    users: HashMap<String, Rules>,
}

fn filters(user: &str, what: &'static str, list: &[String]) -> Result<Vec<Filter>, ConfigError> {
    list.iter()
        .map(|f| {
            Filter::new(f).map_err(|err| ConfigError::Invalid {
                key: "auth.users",
                reason: format!("user {user:?}, {what}: {err}"),
            })
        })
        .collect()
}

/// A reply subject: `_inbox.<id>` or `_inbox.<id>.<n>`.
fn is_inbox(subject: &Subject) -> bool {
    matches!(subject.tokens(), [first, _] | [first, _, _] if &**first == "_inbox")
}

impl Policy {
    /// Compiles the section; every filter is checked.
    pub fn new(config: &AuthConfig) -> Result<Policy, ConfigError> {
        if config.required && config.users.is_empty() {
            return Err(ConfigError::Invalid {
                key: "auth.required",
                reason: "no [[auth.users]] are configured, so nobody could connect".into(),
            });
        }
        let mut policy = Policy {
            open: config.users.is_empty(),
            ..Policy::default()
        };
        for user in &config.users {
            if user.name.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "auth.users",
                    reason: "a user without a name".into(),
                });
            }
            if let Some(token) = &user.token {
                policy.tokens.push((token.clone(), user.name.clone()));
            }
            let rules = Rules {
                publish: filters(&user.name, "publish", &user.publish)?,
                subscribe: filters(&user.name, "subscribe", &user.subscribe)?,
                request: filters(&user.name, "request", &user.request)?,
                produce: filters(&user.name, "produce", &user.produce)?,
                consume: filters(&user.name, "consume", &user.consume)?,
                admin: user.admin,
                kv_read: user.kv_read.clone(),
                kv_write: user.kv_write.clone(),
                cluster: user.cluster,
            };
            policy.users.insert(user.name.clone(), rules);
        }
        Ok(policy)
    }

    /// Whether anyone may do anything (no users configured).
    pub fn is_open(&self) -> bool {
        self.open
    }

    fn rules(&self, who: Option<&str>) -> Option<&Rules> {
        who.and_then(|who| self.users.get(who))
    }

    /// Is `who` a user with `admin = true`?
    pub fn is_admin(&self, who: &str) -> bool {
        self.users.get(who).is_some_and(|rules| rules.admin)
    }

    /// May `who` call the RPC service `service`?
    pub fn may_call(&self, who: Option<&str>, service: &str) -> bool {
        if self.open {
            return true;
        }
        match service {
            "BrokerService" => self.rules(who).is_some_and(|r| r.admin),
            // Only peers speak Raft: anyone else could vote or append.
            // Likewise routes: anyone else could inject messages or interest;
            // and the replicated queues' forwarding, which trusts the
            // forwarding member to have checked its caller.
            "RaftTransport" | "RouteService" | "ReplicaQueue" => {
                self.rules(who).is_some_and(|r| r.cluster)
            }
            _ => true,
        }
    }

    fn queue_allowed(&self, rules: Option<&[Filter]>, queue: &str) -> bool {
        self.open
            || Subject::new(queue)
                .is_ok_and(|queue| rules.is_some_and(|r| r.iter().any(|f| f.matches(&queue))))
    }
}

impl Authenticator for Policy {
    fn authenticate(&self, token: &Secret) -> Option<String> {
        // Every token is compared, so the time taken says nothing about
        // which (if any) matched.
        let mut found = None;
        for (known, name) in &self.tokens {
            if known.matches(token) && found.is_none() {
                found = Some(name.clone());
            }
        }
        found
    }
}

impl courier_cluster::service::ClusterAccess for Policy {
    fn may_read(&self, who: Option<&str>, key: &str) -> bool {
        self.open
            || self
                .rules(who)
                .is_some_and(|r| r.kv_read.iter().any(|p| key.starts_with(p.as_str())))
    }

    fn may_write(&self, who: Option<&str>, key: &str) -> bool {
        self.open
            || self
                .rules(who)
                .is_some_and(|r| r.kv_write.iter().any(|p| key.starts_with(p.as_str())))
    }

    fn may_lease(&self, who: Option<&str>) -> bool {
        self.open || self.rules(who).is_some_and(|r| !r.kv_write.is_empty())
    }

    fn may_admin(&self, who: Option<&str>) -> bool {
        self.open || self.rules(who).is_some_and(|r| r.admin)
    }
}

impl PubSubAccess for Policy {
    fn may_publish(&self, who: Option<&str>, subject: &Subject) -> bool {
        self.open
            || is_inbox(subject)
            || self
                .rules(who)
                .is_some_and(|r| r.publish.iter().any(|f| f.matches(subject)))
    }

    fn may_request(&self, who: Option<&str>, subject: &Subject) -> bool {
        self.open
            || self
                .rules(who)
                .is_some_and(|r| r.request.iter().any(|f| f.matches(subject)))
    }

    fn may_subscribe(&self, who: Option<&str>, filter: &Filter) -> bool {
        // One's own inbox: `_inbox.<id>` or `_inbox.<id>.*`, with the random
        // id written out (a wildcard in its place would be eavesdropping).
        use courier_pubsub::subject::Token;
        let own_inbox = matches!(
            filter.tokens(),
            [Token::Literal(first), Token::Literal(_)]
                | [Token::Literal(first), Token::Literal(_), Token::One]
                if &**first == "_inbox"
        );
        self.open
            || own_inbox
            || self
                .rules(who)
                .is_some_and(|r| r.subscribe.iter().any(|allowed| filter.is_within(allowed)))
    }
}

impl QueueAccess for Policy {
    fn may_produce(&self, who: Option<&str>, queue: &str) -> bool {
        self.queue_allowed(self.rules(who).map(|r| &r.produce[..]), queue)
    }

    fn may_consume(&self, who: Option<&str>, queue: &str) -> bool {
        self.queue_allowed(self.rules(who).map(|r| &r.consume[..]), queue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(&AuthConfig {
            required: true,
            users: vec![UserConfig {
                name: "alice".into(),
                token: Some(Secret::new("t")),
                publish: vec!["orders.>".into()],
                subscribe: vec!["orders.*.created".into()],
                request: vec!["svc.tax".into()],
                produce: vec!["jobs".into()],
                consume: vec!["jobs.>".into()],
                admin: false,
                kv_read: vec!["config/".into()],
                kv_write: vec!["config/app/".into()],
                cluster: false,
            }],
        })
        .unwrap()
    }

    #[test]
    fn keys_are_permitted_by_prefix_and_raft_only_to_cluster_peers() {
        use courier_cluster::service::ClusterAccess;
        let p = policy();
        let alice = Some("alice");
        assert!(p.may_read(alice, "config/app/color"));
        assert!(p.may_read(alice, "config/db"));
        assert!(!p.may_read(alice, "secrets/db"));
        assert!(p.may_write(alice, "config/app/color"));
        assert!(!p.may_write(alice, "config/db"));
        assert!(p.may_lease(alice), "a writer may hold leases");
        assert!(!p.may_admin(alice));
        assert!(
            !p.may_read(None, "config/db"),
            "anonymous callers get nothing"
        );
        assert!(!p.may_call(alice, "RaftTransport"));
        assert!(p.may_call(alice, "ClusterService"));
        let open = Policy::new(&AuthConfig::default()).unwrap();
        assert!(open.may_call(None, "RaftTransport") && open.may_write(None, "x"));
    }

    #[test]
    fn each_permission_allows_what_it_names_and_nothing_else() {
        let p = policy();
        let s = |t: &str| Subject::new(t).unwrap();
        let f = |t: &str| Filter::new(t).unwrap();
        let alice = Some("alice");
        assert!(p.may_publish(alice, &s("orders.eu.created")));
        assert!(!p.may_publish(alice, &s("payments.eu")));
        assert!(!p.may_publish(Some("mallory"), &s("orders.eu")));
        assert!(!p.may_publish(None, &s("orders.eu")));
        assert!(p.may_subscribe(alice, &f("orders.eu.created")));
        assert!(p.may_subscribe(alice, &f("orders.*.created")));
        assert!(
            !p.may_subscribe(alice, &f("orders.>")),
            "wider than allowed"
        );
        assert!(p.may_request(alice, &s("svc.tax")));
        assert!(!p.may_request(alice, &s("svc.payroll")));
        assert!(p.may_produce(alice, "jobs"));
        assert!(!p.may_produce(alice, "jobs.eu"));
        assert!(p.may_consume(alice, "jobs.eu"));
        assert!(!p.may_consume(alice, "jobs"));
        assert!(!p.may_call(alice, "BrokerService"));
        assert!(p.may_call(alice, "PubSubService"));
        // Request-reply plumbing: one's own inbox, and replies.
        assert!(p.may_subscribe(None, &f("_inbox.12345")));
        assert!(p.may_subscribe(None, &f("_inbox.12345.*")));
        assert!(!p.may_subscribe(None, &f("_inbox.*.*")));
        assert!(!p.may_subscribe(None, &f("_inbox.12345.>")));
        assert!(p.may_publish(None, &s("_inbox.12345.7")));
        assert!(!p.may_subscribe(alice, &f("_inbox.*")), "no eavesdropping");
        assert!(!p.may_subscribe(alice, &f(">")));
        assert!(p.may_publish(None, &s("_inbox.12345")));
        assert_eq!(p.authenticate(&Secret::new("t")).as_deref(), Some("alice"));
        assert_eq!(p.authenticate(&Secret::new("x")), None);
    }

    #[test]
    fn no_users_means_open_and_required_without_users_is_refused() {
        let open = Policy::new(&AuthConfig::default()).unwrap();
        assert!(open.is_open());
        assert!(open.may_consume(None, "anything"));
        let err = Policy::new(&AuthConfig {
            required: true,
            users: Vec::new(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("nobody could connect"), "{err}");
        let err = Policy::new(&AuthConfig {
            required: false,
            users: vec![UserConfig {
                name: "x".into(),
                publish: vec!["a..b".into()],
                ..Default::default()
            }],
        })
        .unwrap_err();
        assert!(err.to_string().contains("publish"), "{err}");
    }
}
