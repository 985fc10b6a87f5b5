//! Routing subjects to subscriptions: a token trie, so that matching costs
//! grow with the subject's depth, not with the number of subscriptions.

use std::collections::HashMap;
use std::sync::Arc;

use crate::subject::{Filter, Subject, Token};

/// A subscription's identity, chosen by the caller.
pub type SubscriptionId = u64;

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Arc<str>, Node>,
    one: Option<Box<Node>>,
    /// Subscriptions whose filter ends here.
    here: Vec<SubscriptionId>,
    /// Subscriptions whose filter ends here with `>`.
    rest: Vec<SubscriptionId>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.one.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }
}

/// Subscriptions by filter. Adding and removing are proportional to the
/// filter's length; matching visits at most two branches per token (the
/// literal and `*`) plus the `>` lists on the way.
#[derive(Debug, Default)]
pub struct Router {
    root: Node,
    count: usize,
}

impl Router {
    /// An empty router.
    pub fn new() -> Router {
        Router::default()
    }

    /// Adds `id` under `filter`.
    pub fn insert(&mut self, filter: &Filter, id: SubscriptionId) {
        let mut node = &mut self.root;
        for token in filter.tokens() {
            match token {
                Token::Literal(literal) => node = node.literal.entry(literal.clone()).or_default(),
                Token::One => node = node.one.get_or_insert_with(Default::default),
                Token::Rest => {
                    node.rest.push(id);
                    self.count += 1;
                    return;
                }
            }
        }
        node.here.push(id);
        self.count += 1;
    }

    /// Removes `id` from under `filter`; returns whether it was there.
    /// Branches left empty are pruned, so memory follows the live set.
    pub fn remove(&mut self, filter: &Filter, id: SubscriptionId) -> bool {
        fn remove_at(node: &mut Node, tokens: &[Token], id: SubscriptionId) -> bool {
            let Some((first, rest)) = tokens.split_first() else {
                return take(&mut node.here, id);
            };
            match first {
                Token::Rest => take(&mut node.rest, id),
                Token::Literal(literal) => {
                    let Some(child) = node.literal.get_mut(literal) else {
                        return false;
                    };
                    let removed = remove_at(child, rest, id);
                    if child.is_empty() {
                        node.literal.remove(literal);
                    }
                    removed
                }
                Token::One => {
                    let Some(child) = node.one.as_mut() else {
                        return false;
                    };
                    let removed = remove_at(child, rest, id);
                    if child.is_empty() {
                        node.one = None;
                    }
                    removed
                }
            }
        }
        fn take(list: &mut Vec<SubscriptionId>, id: SubscriptionId) -> bool {
            match list.iter().position(|x| *x == id) {
                Some(at) => {
                    list.swap_remove(at);
                    true
                }
                None => false,
            }
        }
        let removed = remove_at(&mut self.root, filter.tokens(), id);
        if removed {
            self.count -= 1;
        }
        removed
    }

    /// Appends every subscription whose filter matches `subject` to `out`.
    pub fn matches(&self, subject: &Subject, out: &mut Vec<SubscriptionId>) {
        fn walk(node: &Node, tokens: &[Arc<str>], out: &mut Vec<SubscriptionId>) {
            let Some((first, rest)) = tokens.split_first() else {
                out.extend_from_slice(&node.here);
                return;
            };
            // `>` here matches this token and everything after it.
            out.extend_from_slice(&node.rest);
            if let Some(child) = node.literal.get(first) {
                walk(child, rest, out);
            }
            if let Some(child) = &node.one {
                walk(child, rest, out);
            }
        }
        walk(&self.root, subject.tokens(), out);
    }

    /// Subscriptions held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
