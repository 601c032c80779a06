//! The layout holds: modules depend on each other without cycles, and only `sys` uses
//! `unsafe` (everything else forbids it).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// Every source file of the crate: (path below src/, text).
fn sources() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
    out
}

/// Top-level module → the top-level modules its files name with `crate::`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in sources() {
        {
            let module = rel
                .split('/')
                .next()
                .unwrap()
                .trim_end_matches(".rs")
                .to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let deps = out.entry(module.clone()).or_default();
            // `crate::name` anywhere, and the first names of `use crate::{a, b::c}`.
            for (at, _) in text.match_indices("crate::") {
                let rest = &text[at + 7..];
                if let Some(block) = rest.strip_prefix('{') {
                    let mut depth = 0;
                    let mut word = String::new();
                    for ch in block.chars() {
                        match ch {
                            '{' => depth += 1,
                            '}' if depth == 0 => break,
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                deps.insert(std::mem::take(&mut word));
                                continue;
                            }
                            _ => {}
                        }
                        if depth == 0 && (ch.is_alphanumeric() || ch == '_') {
                            word.push(ch);
                        } else if depth == 0 && ch == ':' {
                            deps.insert(std::mem::take(&mut word));
                            depth = 100; // skip the path's tail up to the next comma
                        }
                        if depth == 100 && ch == ',' {
                            depth = 0;
                        }
                    }
                    deps.insert(word);
                } else {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    deps.insert(name);
                }
            }
            deps.remove("");
            deps.remove(&module);
        }
    }
    out
}

#[test]
fn modules_depend_on_each_other_without_cycles() {
    let deps = dependencies();
    // Depth-first search for a path back to the start.
    fn reaches(
        deps: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        deps.get(from)
            .into_iter()
            .flatten()
            .any(|next| next == to || (seen.insert(next.clone()) && reaches(deps, next, to, seen)))
    }
    for (module, uses) in &deps {
        for used in uses {
            assert!(
                !reaches(&deps, used, module, &mut BTreeSet::new()),
                "import cycle: {module} uses {used}, which leads back to {module}\n{deps:#?}"
            );
        }
    }
    // The scan sees what the code says (a blind scan would pass any layout).
    for (module, used) in [
        ("agent", "compile"),
        ("agent", "status"),
        ("status", "datapath"),
        ("cli", "agent"),
        ("api", "status"),
    ] {
        assert!(
            deps[module].contains(used),
            "{module} uses {used}: {deps:#?}"
        );
    }
    assert!(!deps["api"].contains("cli"), "api must not call into cli");
}

#[test]
fn only_sys_is_allowed_unsafe() {
    for (name, text) in sources() {
        {
            match name.as_str() {
                "sys.rs" => assert!(text.contains("#![allow(unsafe_code)]")),
                "lib.rs" => assert!(text.contains("#![deny(unsafe_code)]")),
                _ => assert!(
                    text.contains("#![forbid(unsafe_code)]"),
                    "{name} must forbid unsafe code"
                ),
            }
        }
    }
}
