//! No module cycles: the library's top-level modules (`gpu`, `layers`,
//! `report`, ...) form a directed acyclic graph by their `crate::` paths,
//! and so do `spectral`'s submodules. A cycle is printed as the modules it
//! walks, each step with the file and line that makes it.
//!
//! Edges come from every `crate::a::b` path in code (comments stripped, use
//! trees with braces expanded) and, inside `spectral`, `super::x` paths; a
//! name a module root re-exports (`pub use sub::{Name}` in lib.rs or
//! spectral/mod.rs) counts as its submodule. The binary's `src/cli` and
//! `src/main.rs` are another crate and are not walked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One dependency: from module, to module, and where.
#[derive(Clone, Debug)]
struct Edge {
    from: String,
    to: String,
    at: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under src/: `gpu/executor/options.rs` ->
/// [gpu, executor, options]; `gpu/mod.rs` -> [gpu]; `lib.rs` -> [].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

/// The text with `//` comments and string literals blanked (line breaks
/// kept, so that offsets still give line numbers).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                i += 1;
            }
            out.extend_from_slice(b"  ");
            i += 2;
        } else if b[i] == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    out.push(b' ');
                    i += 1;
                }
                if i < b.len() {
                    out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'r' && b.get(i + 1) == Some(&b'#') && b.get(i + 2) == Some(&b'"') {
            // r#"..."#: blanked to its closing quote-hash.
            out.extend_from_slice(b"   ");
            i += 3;
            while i < b.len() && !(b[i] == b'"' && b.get(i + 1) == Some(&b'#')) {
                out.push(if b[i] == b'\n' { b'\n' } else { b' ' });
                i += 1;
            }
            out.extend_from_slice(b"  ");
            i += 2;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // An escaped char literal ('\n', '\''): blanked to its close.
            out.extend_from_slice(b"   ");
            i += 3;
            while i < b.len() && b[i] != b'\'' {
                out.push(b' ');
                i += 1;
            }
            out.push(b' ');
            i += 1;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal ('"', '{'): blanked. Lifetimes never close.
            out.extend_from_slice(b"   ");
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A tiny tokenizer over code: identifiers, `::`, and single punctuation.
fn tokens(code: &str) -> Vec<(String, usize)> {
    let b = code.as_bytes();
    let mut out = vec![];
    let mut line = 1;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            out.push((code[s..i].to_string(), line));
        } else if c == b':' && b.get(i + 1) == Some(&b':') {
            out.push(("::".to_string(), line));
            i += 2;
        } else {
            out.push(((c as char).to_string(), line));
            i += 1;
        }
    }
    out
}

/// Expands the use tree / path starting at `toks[i]` (just after a root
/// such as `crate::`): every full path it names, as segment lists.
fn paths_at(toks: &[(String, usize)], mut i: usize) -> Vec<Vec<String>> {
    let mut prefix: Vec<String> = vec![];
    loop {
        match toks.get(i).map(|t| t.0.as_str()) {
            Some("{") => {
                let mut out = vec![];
                i += 1;
                loop {
                    for p in paths_at(toks, i) {
                        let mut full = prefix.clone();
                        full.extend(p);
                        out.push(full);
                    }
                    // Skip to the next `,` or the closing `}` at this depth.
                    let mut depth = 0;
                    while let Some((t, _)) = toks.get(i) {
                        match t.as_str() {
                            "{" => depth += 1,
                            "}" if depth == 0 => break,
                            "}" => depth -= 1,
                            "," if depth == 0 => break,
                            _ => {}
                        }
                        i += 1;
                    }
                    match toks.get(i).map(|t| t.0.as_str()) {
                        Some(",") => i += 1,
                        _ => return out,
                    }
                    if toks.get(i).map(|t| t.0.as_str()) == Some("}") {
                        return out;
                    }
                }
            }
            Some(t) if t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                prefix.push(t.to_string());
                i += 1;
                if toks.get(i).map(|t| t.0.as_str()) == Some("::") {
                    i += 1;
                    continue;
                }
                return vec![prefix];
            }
            _ => return vec![prefix],
        }
    }
}

/// Names a module root re-exports from its submodules: `pub use sub::X`,
/// `pub use sub::{X, Y}` in `root` -> {X: sub, Y: sub}.
fn reexports(root_src: &str) -> BTreeMap<String, String> {
    let toks = tokens(&code_only(root_src));
    let mut map = BTreeMap::new();
    for i in 0..toks.len().saturating_sub(2) {
        if toks[i].0 == "pub" && toks[i + 1].0 == "use" {
            for p in paths_at(&toks, i + 2) {
                if p.len() >= 2 && p[0] != "crate" && p[0] != "self" && p[0] != "super" {
                    map.insert(p.last().unwrap().clone(), p[0].clone());
                }
            }
        }
    }
    map
}

/// Every (module path referenced, line) of a file: `crate::...` paths,
/// and `super::...` ones resolved against the file's module.
fn references(src: &str, module: &[String]) -> Vec<(Vec<String>, usize)> {
    let toks = tokens(&code_only(src));
    let mut out = vec![];
    let mut i = 0;
    while i + 1 < toks.len() {
        let t = toks[i].0.as_str();
        // The start of a path (not `x::crate`, which does not occur).
        let after_sep = i > 0 && toks[i - 1].0 == "::";
        if (t == "crate" || t == "super") && toks[i + 1].0 == "::" && !after_sep {
            let line = toks[i].1;
            let mut base: Vec<String> = if t == "crate" {
                vec![]
            } else {
                // `super` of a file's module; `super::super` walks on.
                let mut b = module.to_vec();
                b.pop();
                b
            };
            let mut j = i + 2;
            while toks.get(j).map(|t| t.0.as_str()) == Some("super")
                && toks.get(j + 1).map(|t| t.0.as_str()) == Some("::")
            {
                base.pop();
                j += 2;
            }
            for p in paths_at(&toks, j) {
                let mut full = base.clone();
                full.extend(p);
                out.push((full, line));
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// A cycle of the graph, if any, as its edges in order.
fn find_cycle(edges: &[Edge]) -> Option<Vec<Edge>> {
    let mut adj: BTreeMap<&str, Vec<&Edge>> = BTreeMap::new();
    for e in edges {
        adj.entry(&e.from).or_default().push(e);
    }
    // Depth-first search with colours; the stack holds the edges taken.
    fn visit<'a>(
        n: &'a str,
        adj: &BTreeMap<&'a str, Vec<&'a Edge>>,
        colour: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a Edge>,
    ) -> Option<Vec<Edge>> {
        colour.insert(n, 1);
        for e in adj.get(n).into_iter().flatten() {
            match colour.get(e.to.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|s| s.from == e.to).unwrap_or(0);
                    let mut c: Vec<Edge> = stack[start..].iter().map(|&s| s.clone()).collect();
                    c.push((*e).clone());
                    return Some(c);
                }
                0 => {
                    stack.push(e);
                    if let Some(c) = visit(&e.to, adj, colour, stack) {
                        return Some(c);
                    }
                    stack.pop();
                }
                _ => {}
            }
        }
        colour.insert(n, 2);
        None
    }
    let mut colour = BTreeMap::new();
    let nodes: BTreeSet<&str> = edges.iter().map(|e| e.from.as_str()).collect();
    for n in nodes {
        if colour.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, &adj, &mut colour, &mut vec![]) {
                return Some(c);
            }
        }
    }
    None
}

/// The groups of modules that reach each other (strongly connected
/// components of more than one module), each with its internal edges.
fn tangles(edges: &[Edge]) -> Vec<(BTreeSet<String>, Vec<String>)> {
    let nodes: BTreeSet<&str> = edges
        .iter()
        .flat_map(|e| [e.from.as_str(), e.to.as_str()])
        .collect();
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(n) = todo.pop() {
            for e in edges.iter().filter(|e| e.from == n) {
                if seen.insert(e.to.clone()) {
                    todo.push(e.to.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&str, BTreeSet<String>> = nodes.iter().map(|&n| (n, reach(n))).collect();
    let mut out: Vec<(BTreeSet<String>, Vec<String>)> = vec![];
    for &n in &nodes {
        let group: BTreeSet<String> = nodes
            .iter()
            .filter(|&&m| m == n || (reaches[n].contains(m) && reaches[m].contains(n)))
            .map(|m| m.to_string())
            .collect();
        if group.len() > 1 && !out.iter().any(|(g, _)| *g == group) {
            let mut inside: Vec<String> = edges
                .iter()
                .filter(|e| group.contains(&e.from) && group.contains(&e.to))
                .map(|e| format!("{} -> {}   ({})", e.from, e.to, e.at))
                .collect();
            inside.dedup_by(|a, b| a.split("   ").next() == b.split("   ").next());
            out.push((group, inside));
        }
    }
    out
}

fn show_all(edges: &[Edge]) -> String {
    let mut s = String::new();
    for (g, inside) in tangles(edges) {
        s.push_str(&format!("\nmodules that depend on each other: {g:?}\n"));
        for e in inside {
            s.push_str(&format!("  {e}\n"));
        }
    }
    s
}

fn show(cycle: &[Edge]) -> String {
    let mut s = cycle[0].from.clone();
    for e in cycle {
        s.push_str(&format!("\n  -> {}   ({})", e.to, e.at));
    }
    s
}

/// The edges of the library: between top-level modules, and between
/// spectral's submodules.
fn graphs(src: &Path) -> (Vec<Edge>, Vec<Edge>) {
    let mut files = vec![];
    rust_files(src, &mut files);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let crate_names = reexports(&read(&src.join("lib.rs")));
    let spectral_names = reexports(&read(&src.join("spectral/mod.rs")));
    let (mut top, mut spectral) = (vec![], vec![]);
    for f in &files {
        let rel = f.strip_prefix(src).unwrap();
        if rel.starts_with("cli") || rel == Path::new("main.rs") {
            continue;
        }
        let module = module_of(rel);
        let text = read(f);
        for (path, line) in references(&text, &module) {
            let at = format!("src/{}:{line}", rel.display());
            let Some(first) = path.first() else { continue };
            let to_top = crate_names.get(first).unwrap_or(first).clone();
            if let Some(from_top) = module.first() {
                if *from_top != to_top && !matches!(to_top.as_str(), "self" | "super") {
                    top.push(Edge {
                        from: from_top.clone(),
                        to: to_top.clone(),
                        at: at.clone(),
                    });
                }
            }
            if module.len() >= 2 && module[0] == "spectral" && to_top == "spectral" {
                if let Some(second) = path.get(1) {
                    let to = spectral_names.get(second).unwrap_or(second);
                    if *to != module[1] {
                        spectral.push(Edge {
                            from: format!("spectral::{}", module[1]),
                            to: format!("spectral::{to}"),
                            at,
                        });
                    }
                }
            }
        }
    }
    (top, spectral)
}

#[test]
fn no_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (top, _) = graphs(&src);
    assert!(
        top.iter().any(|e| e.from == "gpu" && e.to == "model"),
        "the walker found no gpu -> model edge: it is not reading the sources"
    );
    if let Some(c) = find_cycle(&top) {
        panic!(
            "module cycle between top-level modules:\n{}\n{}",
            show(&c),
            show_all(&top)
        );
    }
}

#[test]
fn no_cycle_between_spectral_submodules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (_, spectral) = graphs(&src);
    assert!(
        spectral
            .iter()
            .any(|e| e.from == "spectral::slq" && e.to == "spectral::lanczos"),
        "the walker found no spectral::slq -> spectral::lanczos edge"
    );
    if let Some(c) = find_cycle(&spectral) {
        panic!(
            "module cycle within spectral:\n{}\n{}",
            show(&c),
            show_all(&spectral)
        );
    }
}

/// The walker itself: braces, `super`, comments and strings, re-exports,
/// and a cycle it must report.
#[test]
fn walker_reads_use_trees_and_finds_cycles() {
    let src = "use crate::{a::{b, c::D}, e}; // crate::zzz\nfn f() { super::g::h(); let s = \"crate::yyy\"; }";
    let refs = references(src, &["spectral".into(), "slq".into()]);
    let paths: Vec<String> = refs.iter().map(|(p, _)| p.join("::")).collect();
    assert_eq!(
        paths,
        ["a::b", "a::c::D", "e", "spectral::g::h"],
        "{refs:?}"
    );
    assert_eq!(refs[3].1, 2);
    let names = reexports("pub use operator::{DenseOperator, SymOperator};\npub mod x;");
    assert_eq!(
        names.get("SymOperator").map(String::as_str),
        Some("operator")
    );
    let e = |a: &str, b: &str| Edge {
        from: a.into(),
        to: b.into(),
        at: String::new(),
    };
    let cyc = find_cycle(&[e("a", "b"), e("b", "c"), e("c", "a"), e("a", "d")]).unwrap();
    let walk: Vec<&str> = cyc.iter().map(|e| e.to.as_str()).collect();
    assert_eq!(walk.len(), 3);
    assert!(find_cycle(&[e("a", "b"), e("b", "c"), e("a", "c")]).is_none());
}

/// The house rule beside the graph: no source file over 800 lines (split
/// by concern instead).
#[test]
fn no_source_file_over_800_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "{} files under src/", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 800).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "over 800 lines: {long:?}");
}
