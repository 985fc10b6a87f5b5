//! The dependency check: a crate used on its own must not compile what it
//! does not use. An embedded `Queue` or an in-process `Bus` needs no RPC, no
//! TLS and no certificate generator, so `cargo tree -e normal` of those
//! crates without default features must not list them.
//!
//! `cargo tree` is run with `--prefix depth`, whose lines are the depth and
//! the package (`2serde v1.0.229`), so each line's chain from the root is
//! known and the message can say which crate pulled the offender in.

/// One package to check, and what must not appear among its normal
/// dependencies with its default features off.
pub struct Check {
    /// The package, as `cargo tree -p` takes it.
    pub package: &'static str,
    /// Crates that must not appear.
    pub forbidden: &'static [Forbidden],
}

/// A crate that must not appear in a dependency tree.
pub struct Forbidden {
    /// The crate's name.
    pub name: &'static str,
    /// Whether it is allowed as a dependency of a proc-macro from outside
    /// Courier. `syn` is: `serde_derive`, `thiserror-impl` and
    /// `tracing-attributes` need it in every program using derives, so what
    /// is refused is only the `syn` that Courier's own macros bring
    /// (`courier-rpc-macros`).
    pub allowed_under_foreign_macros: bool,
}

const fn always(name: &'static str) -> Forbidden {
    Forbidden {
        name,
        allowed_under_foreign_macros: false,
    }
}

/// Neither the embedded queue nor the in-process bus may pull in the
/// network stack's heavy parts; transport without `dev-certs` has no
/// certificate generator.
pub const CHECKS: &[Check] = &[
    Check {
        package: "courier-queue",
        forbidden: EMBEDDED,
    },
    Check {
        package: "courier-pubsub",
        forbidden: EMBEDDED,
    },
    Check {
        package: "courier-transport",
        forbidden: &[always("rcgen")],
    },
];

const EMBEDDED: &[Forbidden] = &[
    always("rustls"),
    always("rcgen"),
    Forbidden {
        name: "syn",
        allowed_under_foreign_macros: true,
    },
    always("courier-rpc"),
];

/// The arguments of `cargo` that list `package`'s tree.
pub fn tree_args(package: &str) -> Vec<&str> {
    vec![
        "tree",
        "-e",
        "normal",
        "-p",
        package,
        "--no-default-features",
        "--prefix",
        "depth",
    ]
}

/// One line of `cargo tree --prefix depth`.
#[derive(Debug, PartialEq, Eq)]
pub struct Node<'a> {
    /// Distance from the root (0 for the root).
    pub depth: usize,
    /// The package name.
    pub name: &'a str,
    /// Marked `(proc-macro)`.
    pub proc_macro: bool,
}

/// Parses one line; `None` for lines that are not packages (blank lines,
/// anything cargo may add).
pub fn parse_line(line: &str) -> Option<Node<'_>> {
    let digits = line.len() - line.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    let depth = line[..digits].parse().ok()?;
    let rest = &line[digits..];
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    // The version follows the name: tells a package line from anything else.
    if !words.next()?.starts_with('v') {
        return None;
    }
    Some(Node {
        depth,
        name,
        proc_macro: rest.contains("(proc-macro)"),
    })
}

/// Every forbidden crate found in `tree` (the output of `cargo tree
/// --prefix depth` for one package), each once, with the chain that first
/// brought it in: `["courier-queue", "courier-rpc"]`.
pub fn offenders(tree: &str, forbidden: &[Forbidden]) -> Vec<(String, Vec<String>)> {
    let mut chain: Vec<Node<'_>> = Vec::new();
    let mut found: Vec<(String, Vec<String>)> = Vec::new();
    for node in tree.lines().filter_map(parse_line) {
        chain.truncate(node.depth);
        let offence = forbidden.iter().find(|f| f.name == node.name);
        if let Some(rule) = offence {
            let parent = chain.last();
            let excused = rule.allowed_under_foreign_macros
                && parent.is_some_and(|p| p.proc_macro && !p.name.starts_with("courier-"));
            if !excused && !found.iter().any(|(name, _)| name == node.name) {
                let mut path: Vec<String> = chain.iter().map(|n| n.name.to_string()).collect();
                path.push(node.name.to_string());
                found.push((node.name.to_string(), path));
            }
        }
        chain.push(node);
    }
    found
}

/// The message for one package's offenders; `None` when there are none.
pub fn report(package: &str, offenders: &[(String, Vec<String>)]) -> Option<String> {
    if offenders.is_empty() {
        return None;
    }
    let lines: Vec<String> = offenders
        .iter()
        .map(|(name, path)| format!("{package} depends on {name}: {}", path.join(" -> ")))
        .collect();
    Some(format!(
        "{}\n  (`cargo {}`; a user of {package} alone must not compile it)",
        lines.join("\n  "),
        tree_args(package).join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from real output of
    /// `cargo tree -e normal -p courier-queue --no-default-features --prefix depth`.
    const QUEUE_WITH_RPC: &str = "\
0courier-queue v0.1.0 (/work/main/crates/queue)
1bytes v1.12.2
2serde v1.0.229
3serde_derive v1.0.229 (proc-macro)
4proc-macro2 v1.0.107
4syn v3.0.10
5proc-macro2 v1.0.107 (*)
1courier-rpc v0.1.0 (/work/main/crates/rpc)
2courier-rpc-macros v0.1.0 (proc-macro) (/work/main/crates/rpc-macros)
3syn v2.0.119
2courier-transport v0.1.0 (/work/main/crates/transport)
3rcgen v0.14.5
3rustls v0.23.31
4ring v0.17.14
3tracing v0.1.44
4tracing-attributes v0.1.31 (proc-macro)
5syn v2.0.119 (*)
1courier-transport v0.1.0 (/work/main/crates/transport) (*)
";

    #[test]
    fn lines_give_depth_name_and_kind() {
        assert_eq!(
            parse_line("3serde_derive v1.0.229 (proc-macro)"),
            Some(Node {
                depth: 3,
                name: "serde_derive",
                proc_macro: true
            })
        );
        assert_eq!(
            parse_line("0courier-queue v0.1.0 (/work/main/crates/queue)"),
            Some(Node {
                depth: 0,
                name: "courier-queue",
                proc_macro: false
            })
        );
        assert_eq!(parse_line("12syn v2.0.119 (*)").map(|n| n.depth), Some(12));
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("courier-queue v0.1.0"), None);
        assert_eq!(parse_line("3 warning: something"), None);
    }

    #[test]
    fn offenders_are_named_with_the_chain_that_brought_them() {
        let found = offenders(QUEUE_WITH_RPC, EMBEDDED);
        let names: Vec<_> = found.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["courier-rpc", "syn", "rcgen", "rustls"]);
        assert_eq!(
            found[1].1,
            ["courier-queue", "courier-rpc", "courier-rpc-macros", "syn"]
        );
        assert_eq!(
            found[3].1,
            [
                "courier-queue",
                "courier-rpc",
                "courier-transport",
                "rustls"
            ]
        );
        let message = report("courier-queue", &found).unwrap();
        assert!(message.contains(
            "courier-queue depends on rustls: courier-queue -> courier-rpc -> courier-transport -> rustls"
        ));
        assert!(message.contains("cargo tree -e normal -p courier-queue --no-default-features"));
    }

    #[test]
    fn syn_under_other_crates_macros_is_no_offence() {
        // What the queue's tree looks like once the remote face is optional:
        // syn only through serde's and tracing's derives.
        let embedded = "\
0courier-queue v0.1.0 (/work/main/crates/queue)
1serde v1.0.229
2serde_derive v1.0.229 (proc-macro)
3syn v3.0.10
1courier-transport v0.1.0 (/work/main/crates/transport)
2tracing v0.1.44
3tracing-attributes v0.1.31 (proc-macro)
4syn v2.0.119
";
        assert!(offenders(embedded, EMBEDDED).is_empty());
        assert_eq!(report("courier-queue", &[]), None);
        // But syn as a plain dependency, or under Courier's own macros, is.
        let direct = "0courier-pubsub v0.1.0 (/x)\n1syn v2.0.119\n";
        assert_eq!(offenders(direct, EMBEDDED)[0].0, "syn");
    }

    #[test]
    fn a_crate_that_only_resembles_a_forbidden_one_is_not_one() {
        let tree = "0courier-pubsub v0.1.0 (/x)\n1rustls-pki-types v1.12.0\n1courier-rpc-macros v0.1.0 (proc-macro) (/y)\n";
        assert!(offenders(tree, &[always("rustls"), always("courier-rpc")]).is_empty());
    }
}
