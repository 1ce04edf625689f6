//! The code's shape, checked: the gateway's modules import one another without cycles (arrows point down),
//! and the protocol crate stays apart from transport, runtime, storage, configuration and chain access.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a source folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The top-level modules each top-level module of `src/` names through `crate::`, tests and comments left out.
fn module_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = repo("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative.components().next().expect("a path").as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        for line in code.lines().map(|l| l.split("//").next().unwrap_or("")) {
            for (at, _) in line.match_indices("crate::") {
                let name: String =
                    line[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != module {
                    imports.entry(module.clone()).or_default().insert(name);
                }
            }
        }
    }
    imports
}

/// A cycle through `from`, if there is one: the modules on it.
fn cycle_through(imports: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut path = vec![from.to_string()];
    let mut seen = BTreeSet::new();
    fn walk(
        imports: &BTreeMap<String, BTreeSet<String>>,
        target: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let here = path.last().expect("a module").clone();
        for next in imports.get(&here).into_iter().flatten() {
            if next == target {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(imports, target, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(imports, from, &mut path, &mut seen).then_some(path)
}

#[test]
fn the_gateways_modules_import_one_another_without_cycles() {
    let imports = module_imports();
    assert!(imports.contains_key("pipeline") && imports["pipeline"].contains("proxy"), "the walk found imports");
    for module in imports.keys() {
        if let Some(cycle) = cycle_through(&imports, module) {
            panic!("an import cycle: {} → {module}", cycle.join(" → "));
        }
    }
}

#[test]
fn the_protocol_crate_depends_on_no_transport_runtime_storage_or_provider() {
    let manifest = std::fs::read_to_string(repo("crates/x402-proto/Cargo.toml")).expect("the protocol crate");
    let manifest: toml::Table = manifest.parse().expect("a valid manifest");
    let dependencies = manifest["dependencies"].as_table().expect("dependencies");
    let names: Vec<&str> = dependencies.keys().map(String::as_str).collect();
    for forbidden in ["hyper", "hyper-util", "tokio", "rusqlite", "toml", "alloy", "http", "x402-chain"] {
        assert!(!names.contains(&forbidden), "x402-proto depends on {forbidden}: {names:?}");
    }
    assert!(names.contains(&"alloy-primitives"), "{names:?}");
}
