//! Subjects, filters and the router, against a plain reference matcher.

use courier_pubsub::subject::{Filter, Subject, SubjectError};
use courier_pubsub::Router;
use proptest::prelude::*;

#[test]
fn wildcards_match_as_documented() {
    let cases = [
        ("orders.*.created", "orders.eu.created", true),
        ("orders.*.created", "orders.eu.us.created", false),
        ("orders.>", "orders.eu", true),
        ("orders.>", "orders.eu.created", true),
        ("orders.>", "orders", false),
        ("*", "orders", true),
        ("*", "orders.eu", false),
        (">", "a.b.c", true),
        ("orders.eu", "orders.eu", true),
        ("orders.eu", "orders.us", false),
    ];
    for (filter, subject, expected) in cases {
        let (filter, subject) = (Filter::new(filter).unwrap(), Subject::new(subject).unwrap());
        assert_eq!(filter.matches(&subject), expected, "{filter} ~ {subject}");
        let mut router = Router::new();
        router.insert(&filter, 1);
        let mut out = Vec::new();
        router.matches(&subject, &mut out);
        assert_eq!(!out.is_empty(), expected, "router: {filter} ~ {subject}");
    }
}

#[test]
fn bad_subjects_and_filters_point_at_the_token() {
    let bad: &[(&str, bool, usize, &str)] = &[
        ("orders..created", true, 1, "empty token"),
        ("orders.eu.", true, 2, "empty token"),
        ("orders.e*u", true, 1, "whole token"),
        ("orders.>.created", true, 1, "must be the last"),
        ("orders.*", false, 1, "for filters"),
        ("orders.e u", false, 1, "whitespace"),
    ];
    for (input, filter, position, reason) in bad {
        let err = if *filter {
            Filter::new(input).unwrap_err()
        } else {
            Subject::new(input).unwrap_err()
        };
        match &err {
            SubjectError::InvalidToken {
                position: p,
                reason: r,
                ..
            } => {
                assert_eq!(p, position, "{input}");
                assert!(r.contains(reason), "{input}: {r}");
            }
            other => panic!("{input}: {other:?}"),
        }
        assert!(
            err.to_string().contains(&format!("position {position}")),
            "{err}"
        );
    }
    assert_eq!(Subject::new(""), Err(SubjectError::Empty));
    assert!(matches!(
        Subject::new(&"a.".repeat(200)),
        Err(SubjectError::TooLong { .. })
    ));
    assert!(matches!(
        Filter::new(&vec!["a"; 40].join(".")),
        Err(SubjectError::TooLong { .. })
    ));
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("orders"), Just("eu")].prop_map(String::from)
}

fn subject() -> impl Strategy<Value = String> {
    proptest::collection::vec(token(), 1..5).prop_map(|t| t.join("."))
}

fn filter() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_string())], 0..4),
        any::<bool>(),
    )
        .prop_filter_map("non-empty", |(mut tokens, rest)| {
            if rest {
                tokens.push(">".into());
            }
            (!tokens.is_empty()).then(|| tokens.join("."))
        })
}

proptest! {
    /// The trie agrees with the reference matcher on every subject, with
    /// subscriptions added and removed in between.
    #[test]
    fn the_router_agrees_with_the_reference_matcher(
        filters in proptest::collection::vec(filter(), 1..30),
        removed in proptest::collection::vec(any::<bool>(), 30),
        subjects in proptest::collection::vec(subject(), 1..20),
    ) {
        let filters: Vec<Filter> = filters.iter().map(|f| Filter::new(f).unwrap()).collect();
        let mut router = Router::new();
        for (id, filter) in filters.iter().enumerate() {
            router.insert(filter, id as u64);
        }
        let mut live = vec![true; filters.len()];
        for (id, filter) in filters.iter().enumerate() {
            if removed[id] {
                prop_assert!(router.remove(filter, id as u64));
                live[id] = false;
            }
        }
        prop_assert_eq!(router.len(), live.iter().filter(|l| **l).count());
        for subject in &subjects {
            let subject = Subject::new(subject).unwrap();
            let mut got = Vec::new();
            router.matches(&subject, &mut got);
            got.sort();
            let expected: Vec<u64> = filters
                .iter()
                .enumerate()
                .filter(|(id, f)| live[*id] && f.matches(&subject))
                .map(|(id, _)| id as u64)
                .collect();
            prop_assert_eq!(got, expected, "subject {}", subject);
        }
    }
}

#[test]
fn removing_everything_leaves_an_empty_trie() {
    let mut router = Router::new();
    let filters: Vec<Filter> = ["a.b.c", "a.*.c", "a.>", "*", ">"]
        .iter()
        .map(|f| Filter::new(f).unwrap())
        .collect();
    for (id, f) in filters.iter().enumerate() {
        router.insert(f, id as u64);
    }
    for (id, f) in filters.iter().enumerate() {
        assert!(router.remove(f, id as u64));
        assert!(!router.remove(f, id as u64), "only once");
    }
    assert!(router.is_empty());
    assert_eq!(
        format!("{router:?}").matches("literal: {}").count(),
        1,
        "pruned to the root: {router:?}"
    );
}

fn small_filter() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(
            prop_oneof![
                Just("a".to_string()),
                Just("b".to_string()),
                Just("*".to_string())
            ],
            0..5,
        ),
        any::<bool>(),
    )
        .prop_filter_map("non-empty", |(mut tokens, rest)| {
            if rest {
                tokens.push(">".into());
            }
            (!tokens.is_empty()).then(|| tokens.join("."))
        })
}

/// Every subject over {a, b, z} up to six tokens: long enough to tell any
/// two of these filters apart, with `z` standing for "any other token".
fn all_small_subjects() -> Vec<Subject> {
    let mut all = Vec::new();
    let mut layer = vec![String::new()];
    for _ in 0..6 {
        layer = layer
            .iter()
            .flat_map(|prefix| {
                ["a", "b", "z"].into_iter().map(move |t| {
                    if prefix.is_empty() {
                        t.to_string()
                    } else {
                        format!("{prefix}.{t}")
                    }
                })
            })
            .collect();
        all.extend(layer.iter().map(|s| Subject::new(s).unwrap()));
    }
    all
}

proptest! {
    /// `is_within` (used for subscribe permissions) agrees with brute force:
    /// f is within g exactly when every subject f matches, g matches too.
    #[test]
    fn containment_agrees_with_brute_force(f in small_filter(), g in small_filter()) {
        let (f, g) = (Filter::new(&f).unwrap(), Filter::new(&g).unwrap());
        let brute = all_small_subjects()
            .iter()
            .all(|s| !f.matches(s) || g.matches(s));
        prop_assert_eq!(f.is_within(&g), brute, "{} within {}", f, g);
    }
}
