//! The layering rule: a crate under `crates/` may depend (normally, for
//! builds, or for tests) only on Courier crates of a strictly lower layer.
//! Crates in one layer are siblings: neither may depend on the other.
//!
//! The layer order is declared here, once.

use std::fs;
use std::path::Path;

/// Bottom to top; the crates of one entry share a layer. `messaging` and
/// `rpc` are siblings: both build on the transport and share only what lies
/// below them (the schema fingerprints are in `wire`). `cluster` and `web`
/// are siblings too: both build on pub/sub, for the broker. `rpc-macros` sits just
/// below `rpc` (see [`layer_of`]).
pub const LAYERS: &[&[&str]] = &[
    &["wire"],
    &["transport"],
    &["messaging", "rpc"],
    &["queue"],
    &["pubsub"],
    &["cluster", "web"],
    &["broker"],
    &["cli"],
];

/// Test helpers (std only, outside the layers) that any crate may use as a
/// dev-dependency, and nothing may use otherwise.
pub const TEST_ONLY: &[&str] = &["courier-test-support"];

/// The layer of a folder under `crates/`, in half-steps so that `rpc-macros`
/// fits just below `rpc` (and so below its sibling `messaging` too).
pub fn layer_of(folder: &str) -> Option<u32> {
    let index = |name: &str| {
        LAYERS
            .iter()
            .position(|layer| layer.contains(&name))
            .map(|i| i as u32 * 2)
    };
    if folder == "rpc-macros" {
        return index("rpc").map(|layer| layer - 1);
    }
    index(folder)
}

/// The order, readable: `wire < transport < messaging | rpc < queue ...`.
pub fn order() -> String {
    LAYERS
        .iter()
        .map(|layer| layer.join(" | "))
        .collect::<Vec<_>>()
        .join(" < ")
}

/// Courier crates named as dependencies in a manifest, with the section each
/// appears in. Understands `name = ...`, `name.workspace = true` and
/// `[dependencies.name]` forms, and target-specific sections.
pub fn courier_dependencies(manifest: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut section = String::new();
    for line in manifest.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = header.trim().to_string();
            // `[dependencies.courier-wire]`
            if let Some((table, name)) = section.rsplit_once('.') {
                if table.ends_with("dependencies") && name.trim_matches('"').starts_with("courier-")
                {
                    found.push((name.trim_matches('"').to_string(), table.to_string()));
                }
            }
            continue;
        }
        if !section.ends_with("dependencies") {
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let name = key.trim().split('.').next().unwrap_or("").trim_matches('"');
        if name.starts_with("courier-") {
            found.push((name.to_string(), section.clone()));
        }
    }
    found
}

/// Every violation of the layering rule in the workspace at `root`.
pub fn check(root: &Path) -> Result<Vec<String>, String> {
    let crates = root.join("crates");
    let mut violations = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&crates)
        .map_err(|e| format!("cannot read {}: {e}", crates.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let folder = entry.file_name().to_string_lossy().into_owned();
        let Some(own) = layer_of(&folder) else {
            violations.push(format!(
                "crates/{folder} is not in the layer table (xtask/src/layers.rs); add it there"
            ));
            continue;
        };
        let manifest_path = entry.path().join("Cargo.toml");
        let manifest = fs::read_to_string(&manifest_path)
            .map_err(|e| format!("cannot read {}: {e}", manifest_path.display()))?;
        for (dependency, section) in courier_dependencies(&manifest) {
            if TEST_ONLY.contains(&dependency.as_str()) {
                if !section.ends_with("dev-dependencies") {
                    violations.push(format!(
                        "crates/{folder} depends on {dependency} in [{section}]; it is for tests only ([dev-dependencies])"
                    ));
                }
                continue;
            }
            let target = dependency.trim_start_matches("courier-");
            // A crate's dev-dependency on itself only turns features on for
            // its own tests (transport's `dev-certs`); it is no edge at all.
            if target == folder && section.ends_with("dev-dependencies") {
                continue;
            }
            match layer_of(target) {
                Some(theirs) if theirs < own => {}
                Some(_) => violations.push(format!(
                    "crates/{folder} depends on {dependency} in [{section}], which is not below it; \
                     the order is {}",
                    order()
                )),
                None => violations.push(format!(
                    "crates/{folder} depends on {dependency} in [{section}], which has no layer"
                )),
            }
        }
    }
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_respects_its_layers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let violations = check(root).unwrap();
        assert!(violations.is_empty(), "{violations:#?}");
    }

    #[test]
    fn dependencies_are_found_in_every_form() {
        let manifest = r#"
[package]
name = "courier-rpc"
[dependencies]
courier-wire.workspace = true
courier-transport = { path = "../transport" }
serde = "1"
[dev-dependencies]
"courier-queue" = { workspace = true } # a test-only upward edge
[target.'cfg(unix)'.dependencies]
courier-messaging = { workspace = true }
[dependencies.courier-broker]
path = "../broker"
[features]
courier-cli = []
"#;
        let found = courier_dependencies(manifest);
        let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "courier-wire",
                "courier-transport",
                "courier-queue",
                "courier-messaging",
                "courier-broker"
            ]
        );
        assert_eq!(found[2].1, "dev-dependencies");
    }

    #[test]
    fn upward_and_sideways_edges_are_reported() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        let write = |folder: &str, body: &str| {
            std::fs::create_dir_all(dir.join("crates").join(folder)).unwrap();
            std::fs::write(dir.join("crates").join(folder).join("Cargo.toml"), body).unwrap();
        };
        write(
            "wire",
            "[dev-dependencies]\ncourier-transport.workspace = true\ncourier-test-support.workspace = true\n",
        );
        write(
            "queue",
            "[dependencies]\ncourier-test-support.workspace = true\n",
        );
        write(
            "transport",
            "[dependencies]\ncourier-transport.workspace = true\ncourier-wire.workspace = true\n",
        );
        write(
            "rpc",
            "[dependencies]\ncourier-rpc-macros.workspace = true\n\
             [dev-dependencies]\ncourier-rpc = { workspace = true, features = [\"x\"] }\n",
        );
        write(
            "rpc-macros",
            "[dependencies]\ncourier-rpc.workspace = true\n",
        );
        write("extras", "[dependencies]\n");
        let violations = check(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let joined = violations.join("\n");
        assert_eq!(violations.len(), 5, "{joined}");
        assert!(joined.contains(
            "crates/queue depends on courier-test-support in [dependencies]; it is for tests only"
        ));
        assert!(joined.contains("crates/wire depends on courier-transport in [dev-dependencies]"));
        assert!(joined.contains("crates/transport depends on courier-transport"));
        assert!(joined.contains("crates/rpc-macros depends on courier-rpc"));
        // A dev-dependency on itself (for a feature in its own tests) is no edge.
        assert!(!joined.contains("crates/rpc depends on courier-rpc "));
        assert!(joined.contains("crates/extras is not in the layer table"));
    }

    #[test]
    fn messaging_and_rpc_are_siblings() {
        assert_eq!(layer_of("messaging"), layer_of("rpc"));
        assert!(layer_of("rpc-macros") < layer_of("messaging"));
        assert!(layer_of("transport") < layer_of("rpc-macros"));
        assert!(order().contains("transport < messaging | rpc < queue"));

        let dir = std::env::temp_dir().join(format!("xtask-siblings-{}", std::process::id()));
        let write = |folder: &str, body: &str| {
            std::fs::create_dir_all(dir.join("crates").join(folder)).unwrap();
            std::fs::write(dir.join("crates").join(folder).join("Cargo.toml"), body).unwrap();
        };
        write(
            "messaging",
            "[dependencies]\ncourier-wire.workspace = true\ncourier-rpc.workspace = true\n",
        );
        write(
            "rpc",
            "[dependencies]\ncourier-wire.workspace = true\ncourier-rpc-macros.workspace = true\n\
             [dev-dependencies]\ncourier-messaging.workspace = true\n",
        );
        write("rpc-macros", "[dependencies]\n");
        write("wire", "[dependencies]\n");
        let violations = check(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let joined = violations.join("\n");
        assert_eq!(violations.len(), 2, "{joined}");
        assert!(joined.contains("crates/messaging depends on courier-rpc in [dependencies]"));
        assert!(joined.contains("crates/rpc depends on courier-messaging in [dev-dependencies]"));
    }
}
