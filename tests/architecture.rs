//! Tidy checks of the architecture, read from the sources (like
//! rust-analyzer's `tidy.rs`). A single package has no crate graph to keep
//! dependencies pointing one way, so this test does: it reads every `.rs`
//! file under `src/` and checks the rules STYLE.md and DESIGN.md write down.
//!
//! - Dependencies between the top-level modules follow [`LAYER_RULES`]:
//!   `crate::X` paths, `use crate::{..}` trees, and `super::` paths that
//!   climb out of a top-level module all count.
//! - Every file starts with a `//!` line saying what it is.
//! - The guest agent (`src/bin/deskgrid-agent.rs` and its files under
//!   `src/bin/deskgrid-agent/`) names nothing in the `deskgrid` library: it
//!   compiles the shared `desktop/protocol.rs` in with `#[path]`.
//! - Only `actuator/libvirt.rs` (and its submodules) names `virt`; only `federation/transport.rs`
//!   names `quinn`.
//! - No `todo!` or `unimplemented!`.
//!
//! The reader is a small lexer (comments, strings and character literals
//! skipped) and a reader of paths and `use` trees, not a Rust parser; the
//! `reader_*` tests below show it reports what it must and nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// What a module may name in another top-level module of the library.
#[derive(Debug, Clone, Copy)]
enum Allowed {
    /// The whole module and everything under it.
    Module(&'static str),
    /// Only paths that start with these segments (`appliance::config`).
    PathPrefix(&'static [&'static str]),
    /// Only items at the module's root (`crate::actuator::Hypervisor`), never
    /// a submodule (`crate::actuator::libvirt::..`): adapters use each
    /// other's narrow surface, never their internals.
    RootSurface(&'static str),
    /// Anything in the crate.
    Everything,
}

/// One row of the dependency table: what `module` may use besides itself.
#[derive(Debug)]
struct LayerRule {
    module: &'static str,
    allowed: &'static [Allowed],
    rule: &'static str,
}

use Allowed::{Everything, Module, PathPrefix, RootSurface};

const ADAPTER_RULE: &str = "adapters (`actuator`, `federation`, `transfer`, `desktop`) depend on the core \
     (`model`, `state`, `placement`) and on another adapter's root items only, never its internals, \
     the service layer, the faces or `appliance`";
const ADAPTER_ALLOWED: &[Allowed] = &[
    Module("model"),
    Module("state"),
    Module("placement"),
    RootSurface("actuator"),
    RootSurface("federation"),
    RootSurface("transfer"),
    RootSurface("desktop"),
];
const FACE_RULE: &str =
    "faces (`api`, `cli`, `console`) use only `service`, `model` and `state` types, \
     and `appliance`; never another face, an adapter or `placement`";
const FACE_ALLOWED: &[Allowed] = &[
    Module("service"),
    Module("model"),
    Module("state"),
    Module("appliance"),
];

/// The dependency direction of STYLE.md ("Dependencies point one way") and
/// DESIGN.md section 3. Rows for modules that do not exist yet wait for them;
/// a module with no row fails the test, so each new module's place is decided.
const LAYER_RULES: &[LayerRule] = &[
    LayerRule {
        module: "model",
        allowed: &[],
        rule: "`model` depends on nothing else in the crate",
    },
    LayerRule {
        module: "state",
        allowed: &[Module("model")],
        rule: "`state` depends only on `model`",
    },
    LayerRule {
        module: "placement",
        allowed: &[Module("model"), Module("state")],
        rule: "`placement` depends only on `model` and `state`",
    },
    LayerRule {
        module: "actuator",
        allowed: ADAPTER_ALLOWED,
        rule: ADAPTER_RULE,
    },
    LayerRule {
        module: "federation",
        allowed: ADAPTER_ALLOWED,
        rule: ADAPTER_RULE,
    },
    LayerRule {
        module: "transfer",
        allowed: ADAPTER_ALLOWED,
        rule: ADAPTER_RULE,
    },
    LayerRule {
        module: "desktop",
        allowed: ADAPTER_ALLOWED,
        rule: ADAPTER_RULE,
    },
    LayerRule {
        module: "policy",
        allowed: &[
            Module("model"),
            Module("state"),
            Module("placement"),
            RootSurface("actuator"),
            RootSurface("federation"),
            RootSurface("transfer"),
            RootSurface("desktop"),
        ],
        rule: "`policy` turns placement's plans into jobs on the adapters: \
               core plus adapters' root items, never the service layer or the faces",
    },
    LayerRule {
        module: "service",
        allowed: &[
            Module("model"),
            Module("state"),
            Module("placement"),
            Module("actuator"),
            Module("federation"),
            Module("transfer"),
            Module("desktop"),
            // The service implements `policy::PolicyHost` and starts the loop.
            Module("policy"),
            PathPrefix(&["appliance", "config"]),
            PathPrefix(&["appliance", "data_dir"]),
        ],
        rule: "`service` depends on the core, the adapters, `policy`, `appliance::config` and \
               `appliance::data_dir`, never on the faces (`api`, `cli`, `console`)",
    },
    LayerRule {
        module: "api",
        allowed: FACE_ALLOWED,
        rule: FACE_RULE,
    },
    LayerRule {
        module: "cli",
        // The CLI is a client of the API: it may use the API's client side
        // (the control socket's protocol and `call`), as kubectl uses the
        // Kubernetes API client.
        allowed: &[
            Module("service"),
            Module("model"),
            Module("state"),
            Module("appliance"),
            Module("api"),
        ],
        rule: "the CLI uses the faces' shared types (`service`, `model`, `state`), \
               `appliance`, and the API it is a client of; never an adapter or `placement`",
    },
    LayerRule {
        module: "console",
        allowed: FACE_ALLOWED,
        rule: FACE_RULE,
    },
    LayerRule {
        module: "appliance",
        allowed: &[Everything],
        rule: "`appliance` is the composition root and may use anything",
    },
];

const NO_ROW_RULE: &str =
    "every top-level module has a row in LAYER_RULES (tests/architecture.rs), \
     so where it sits is decided, not accidental";
const DOC_LINE_RULE: &str =
    "every module file starts with a `//!` line saying what it is (STYLE.md)";
const AGENT_RULE: &str = "the guest agent names nothing in the `deskgrid` library; it compiles \
     the shared `src/desktop/protocol.rs` in with `#[path]`, because linking the library drags \
     tokio, QUIC and libvirt code in through shared generics (tests/agent_dependencies.rs checks the binary)";
const NO_TODO_RULE: &str =
    "no `todo!` or `unimplemented!` in src/: an unfinished path returns a real error";

/// An external crate only one file may name (STYLE.md: "Adapters behind
/// narrow traits, one importer each").
#[derive(Debug)]
struct SoleImporter {
    /// The crate's names as they appear in paths.
    crate_idents: &'static [&'static str],
    /// The one file allowed: its directory under `src/` and its file name.
    directory: &'static str,
    file_name: &'static str,
    rule: &'static str,
}

const SOLE_IMPORTERS: &[SoleImporter] = &[
    SoleImporter {
        crate_idents: &["virt", "virt_sys"],
        directory: "src/actuator/",
        file_name: "libvirt.rs",
        rule: "only `actuator/libvirt.rs` and its submodules name `virt` (STYLE.md, one importer per adapter)",
    },
    SoleImporter {
        crate_idents: &["quinn", "quinn_proto"],
        directory: "src/federation/",
        file_name: "transport.rs",
        rule: "only `federation/transport.rs` names `quinn` (STYLE.md, one importer per adapter)",
    },
];

#[test]
fn sources_follow_the_architecture_rules() -> anyhow::Result<()> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = manifest_dir.join("src");
    let layout = CrateLayout::read(&src)?;
    let files = rust_files(&src)?;

    let mut violations = Vec::new();
    let mut n_crate_paths = 0;
    for path in &files {
        let relative = path
            .strip_prefix(manifest_dir)
            .with_context(|| format!("{} is outside the package", path.display()))?;
        let file = relative
            .components()
            .map(|component| component.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let source =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report = check_file(&layout, &file, &source);
        n_crate_paths += report.n_crate_paths;
        violations.extend(report.violations);
    }

    println!(
        "checked {} files under src/ ({} crate-internal paths) against modules {:?}",
        files.len(),
        n_crate_paths,
        layout.modules.keys().collect::<Vec<_>>()
    );
    // A reader that finds nothing passes everything: make sure it found something.
    assert!(
        files.iter().any(|path| path.ends_with("lib.rs")) && n_crate_paths > 0,
        "read {} files and {n_crate_paths} crate-internal paths: the source walk or the reader is broken",
        files.len()
    );
    assert!(
        violations.is_empty(),
        "{} architecture violation(s):\n{}",
        violations.len(),
        violations
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The checks

#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    file: String,
    line: usize,
    detail: String,
    rule: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}\n    rule: {}",
            self.file, self.line, self.detail, self.rule
        )
    }
}

#[derive(Debug, Default)]
struct FileReport {
    violations: Vec<Violation>,
    /// `crate::`/`super::` paths that reach the crate root: the reader's pulse.
    n_crate_paths: usize,
}

/// The library's top-level modules, each with its submodules, from the disk.
#[derive(Debug, Default)]
struct CrateLayout {
    modules: BTreeMap<String, BTreeSet<String>>,
}

impl CrateLayout {
    fn read(src: &Path) -> anyhow::Result<Self> {
        let mut layout = CrateLayout::default();
        for (name, path) in module_entries(src)? {
            if matches!(name.as_str(), "lib" | "main" | "bin") {
                continue;
            }
            let directory = if path.is_dir() { path } else { src.join(&name) };
            let submodules = if directory.is_dir() {
                module_entries(&directory)?
                    .into_iter()
                    .map(|(submodule, _)| submodule)
                    .filter(|submodule| submodule != "mod")
                    .collect()
            } else {
                BTreeSet::new()
            };
            layout.modules.insert(name, submodules);
        }
        Ok(layout)
    }

    /// A name `crate::NAME` may mean as a module: one on disk or in the table.
    fn is_module(&self, name: &str) -> bool {
        self.modules.contains_key(name) || LAYER_RULES.iter().any(|rule| rule.module == name)
    }

    fn is_submodule(&self, module: &str, name: &str) -> bool {
        self.modules
            .get(module)
            .is_some_and(|submodules| submodules.contains(name))
    }
}

/// Module names in a directory: `name.rs` files and subdirectories.
fn module_entries(directory: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut entries = Vec::new();
    for entry in
        std::fs::read_dir(directory).with_context(|| format!("listing {}", directory.display()))?
    {
        let path = entry
            .with_context(|| format!("listing {}", directory.display()))?
            .path();
        let name = if path.is_dir() {
            path.file_name()
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            path.file_stem()
        } else {
            None
        };
        if let Some(name) = name {
            entries.push((name.to_string_lossy().into_owned(), path));
        }
    }
    entries.sort();
    Ok(entries)
}

/// Every `.rs` file under `directory`, sorted so the report is stable.
fn rust_files(directory: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(directory) = pending.pop() {
        for entry in std::fs::read_dir(&directory)
            .with_context(|| format!("listing {}", directory.display()))?
        {
            let path = entry
                .with_context(|| format!("listing {}", directory.display()))?
                .path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The module path of a library file (`src/state/store.rs` is
/// `["state", "store"]`, `src/lib.rs` is `[]`); `None` for binaries.
fn module_path(file: &str) -> Option<Vec<String>> {
    let relative = file.strip_prefix("src/")?.strip_suffix(".rs")?;
    if relative.starts_with("bin/") || relative == "main" {
        return None;
    }
    let mut path: Vec<String> = relative.split('/').map(String::from).collect();
    if path.last().is_some_and(|last| last == "mod") || path == ["lib"] {
        path.pop();
    }
    Some(path)
}

/// All the checks on one file; `file` is its path from the package root with
/// `/` separators (`src/state/store.rs`).
fn check_file(layout: &CrateLayout, file: &str, source: &str) -> FileReport {
    let mut report = FileReport::default();
    let mut violate = |line: usize, detail: String, rule: &'static str| {
        report.violations.push(Violation {
            file: file.to_owned(),
            line,
            detail,
            rule,
        });
    };

    if !source.starts_with("//!") {
        violate(
            1,
            "the file does not start with a `//!` line".to_owned(),
            DOC_LINE_RULE,
        );
    }

    let tokens = lex(source);
    for (index, lexeme) in tokens.iter().enumerate() {
        if let Token::Ident(name) = &lexeme.token {
            if matches!(name.as_str(), "todo" | "unimplemented")
                && token_at(&tokens, index + 1) == Some(&Token::Punct('!'))
            {
                violate(lexeme.line, format!("`{name}!` left in"), NO_TODO_RULE);
            }
        }
    }

    for importer in SOLE_IMPORTERS {
        // The importer's own submodules (`actuator/libvirt/events.rs`) are
        // part of it.
        let own_submodule = format!(
            "{}{}/",
            importer.directory,
            importer.file_name.trim_end_matches(".rs")
        );
        let is_the_importer = (file.starts_with(importer.directory)
            && file.rsplit('/').next() == Some(importer.file_name))
            || file.starts_with(&own_submodule);
        if is_the_importer {
            continue;
        }
        for &crate_ident in importer.crate_idents {
            for reference in external_crate_paths(&tokens, crate_ident) {
                violate(
                    reference.line,
                    format!("names `{}`", display_path(crate_ident, &reference.path)),
                    importer.rule,
                );
            }
        }
    }

    let Some(own_path) = module_path(file) else {
        if file == "src/bin/deskgrid-agent.rs" || file.starts_with("src/bin/deskgrid-agent/") {
            for reference in external_crate_paths(&tokens, "deskgrid") {
                violate(
                    reference.line,
                    format!("names `{}`", display_path("deskgrid", &reference.path)),
                    AGENT_RULE,
                );
            }
        }
        return report;
    };
    let Some(own_module) = own_path.first() else {
        // The crate root declares the modules; it sits above the layers.
        return report;
    };

    let crate_paths = crate_root_paths(&tokens, &own_path);
    report.n_crate_paths = crate_paths.len();
    let Some(rule) = LAYER_RULES.iter().find(|rule| rule.module == own_module) else {
        report.violations.push(Violation {
            file: file.to_owned(),
            line: 1,
            detail: format!("module `{own_module}` has no row in the dependency table"),
            rule: NO_ROW_RULE,
        });
        return report;
    };
    for reference in crate_paths {
        if !is_allowed(layout, rule, &reference.path) {
            report.violations.push(Violation {
                file: file.to_owned(),
                line: reference.line,
                detail: format!(
                    "`{own_module}` uses `{}`",
                    display_path("crate", &reference.path)
                ),
                rule: rule.rule,
            });
        }
    }
    report
}

fn is_allowed(layout: &CrateLayout, rule: &LayerRule, path: &[String]) -> bool {
    let Some(first) = path.first() else {
        return true;
    };
    if first == rule.module || !layout.is_module(first) {
        // Its own module, or an item of the crate root such as `error_chain`.
        return true;
    }
    rule.allowed.iter().any(|allowed| match *allowed {
        Module(module) => first == module,
        PathPrefix(prefix) => starts_with_segments(path, prefix),
        RootSurface(module) => {
            first == module
                && path
                    .get(1)
                    .is_some_and(|item| item != "*" && !layout.is_submodule(module, item))
        }
        Everything => true,
    })
}

fn starts_with_segments(path: &[String], prefix: &[&str]) -> bool {
    path.len() >= prefix.len()
        && path
            .iter()
            .zip(prefix)
            .all(|(segment, want)| segment == want)
}

fn display_path(root: &str, path: &[String]) -> String {
    std::iter::once(root)
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join("::")
}

// ---------------------------------------------------------------------------
// The reader: a lexer and a reader of paths and `use` trees

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
    /// A string, character or number literal; its content is irrelevant.
    Literal,
}

#[derive(Debug, Clone)]
struct Lexeme {
    token: Token,
    line: usize,
}

/// A path found in the source, as segments after its root (`crate`,
/// `deskgrid`, ...), with the line of its first segment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference {
    line: usize,
    path: Vec<String>,
}

fn token_at(tokens: &[Lexeme], index: usize) -> Option<&Token> {
    tokens.get(index).map(|lexeme| &lexeme.token)
}

fn is_ident(token: Option<&Token>, name: &str) -> bool {
    matches!(token, Some(Token::Ident(ident)) if ident == name)
}

/// Splits Rust source into identifiers, `::` and punctuation, dropping
/// whitespace and comments and reducing literals to [`Token::Literal`], so
/// a path in a comment or a string is not a dependency and a `'{'` is not a
/// brace.
fn lex(source: &str) -> Vec<Lexeme> {
    let chars: Vec<char> = source.chars().collect();
    let at = |index: usize| chars.get(index).copied().unwrap_or('\0');
    let mut lexemes = Vec::new();
    let mut line = 1;
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        let start_line = line;
        let mut push = |token: Token| {
            lexemes.push(Lexeme {
                token,
                line: start_line,
            })
        };
        if c == '\n' {
            line += 1;
            index += 1;
        } else if c.is_whitespace() {
            index += 1;
        } else if c == '/' && at(index + 1) == '/' {
            while index < chars.len() && chars[index] != '\n' {
                index += 1;
            }
        } else if c == '/' && at(index + 1) == '*' {
            index = skip_block_comment(&chars, index, &mut line);
        } else if c == '"' {
            index = skip_string(&chars, index + 1, &mut line);
            push(Token::Literal);
        } else if c == '\'' {
            match char_literal_end(&chars, index) {
                Some(end) => {
                    index = end;
                    push(Token::Literal);
                }
                // A lifetime or a label: its name lexes as an identifier next.
                None => index += 1,
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = index;
            while index < chars.len() && (chars[index].is_alphanumeric() || chars[index] == '_') {
                index += 1;
            }
            let word: String = chars[start..index].iter().collect();
            let mut hashes = 0;
            while at(index + hashes) == '#' {
                hashes += 1;
            }
            if matches!(word.as_str(), "r" | "br" | "cr") && at(index + hashes) == '"' {
                index = skip_raw_string(&chars, index + hashes + 1, hashes, &mut line);
                push(Token::Literal);
            } else if matches!(word.as_str(), "b" | "c") && at(index) == '"' {
                index = skip_string(&chars, index + 1, &mut line);
                push(Token::Literal);
            } else if word == "b" && at(index) == '\'' {
                index = char_literal_end(&chars, index).unwrap_or(index + 1);
                push(Token::Literal);
            } else {
                push(Token::Ident(word));
            }
        } else if c.is_ascii_digit() {
            while index < chars.len() && (chars[index].is_alphanumeric() || chars[index] == '_') {
                index += 1;
            }
            push(Token::Literal);
        } else if c == ':' && at(index + 1) == ':' {
            index += 2;
            push(Token::PathSep);
        } else {
            index += 1;
            push(Token::Punct(c));
        }
    }
    lexemes
}

/// From the `/` of `/*` to past its (nested) end.
fn skip_block_comment(chars: &[char], mut index: usize, line: &mut usize) -> usize {
    let mut depth = 0;
    while index < chars.len() {
        let next = chars.get(index + 1).copied();
        if chars[index] == '/' && next == Some('*') {
            depth += 1;
            index += 2;
        } else if chars[index] == '*' && next == Some('/') {
            depth -= 1;
            index += 2;
            if depth == 0 {
                break;
            }
        } else {
            if chars[index] == '\n' {
                *line += 1;
            }
            index += 1;
        }
    }
    index
}

/// From just after an opening `"` to just after its closing `"`.
fn skip_string(chars: &[char], mut index: usize, line: &mut usize) -> usize {
    while index < chars.len() {
        match chars[index] {
            '"' => return index + 1,
            '\\' => {
                if chars.get(index + 1) == Some(&'\n') {
                    *line += 1;
                }
                index += 2;
            }
            '\n' => {
                *line += 1;
                index += 1;
            }
            _ => index += 1,
        }
    }
    index
}

/// From just after the opening `"` of `r##"` to just after its `"##`.
fn skip_raw_string(chars: &[char], mut index: usize, hashes: usize, line: &mut usize) -> usize {
    while index < chars.len() {
        if chars[index] == '"' && (1..=hashes).all(|offset| chars.get(index + offset) == Some(&'#'))
        {
            return index + 1 + hashes;
        }
        if chars[index] == '\n' {
            *line += 1;
        }
        index += 1;
    }
    index
}

/// If a character literal starts at the `'` at `index`, the index just past
/// it; `None` for a lifetime or label (`'a`, `'outer:`).
fn char_literal_end(chars: &[char], index: usize) -> Option<usize> {
    let at = |offset: usize| chars.get(index + offset).copied();
    if at(1) == Some('\\') {
        // Skip the escaped character itself (it may be `'`), then find the end.
        let mut end = index + 3;
        while end < chars.len() && chars[end] != '\'' {
            end += 1;
        }
        Some(end + 1)
    } else if at(2) == Some('\'') {
        Some(index + 3)
    } else {
        None
    }
}

/// Reads the path or `use` tree starting at `index` (`a::b`, `{a, b::{c, d}}`,
/// `a::*`), appending each leaf path to `out` with `prefix` in front.
/// Returns the index just past what it read.
fn read_tree(
    tokens: &[Lexeme],
    mut index: usize,
    prefix: &[String],
    out: &mut Vec<Reference>,
) -> usize {
    let mut path = prefix.to_vec();
    let mut first_line = None;
    loop {
        match token_at(tokens, index) {
            Some(Token::Ident(segment)) => {
                first_line.get_or_insert(tokens[index].line);
                path.push(segment.clone());
                index += 1;
                if token_at(tokens, index) == Some(&Token::PathSep) {
                    index += 1;
                    continue;
                }
            }
            Some(Token::Punct('*')) => {
                first_line.get_or_insert(tokens[index].line);
                path.push("*".to_owned());
                index += 1;
            }
            Some(Token::Punct('{')) => {
                index += 1;
                loop {
                    match token_at(tokens, index) {
                        None => return index,
                        Some(Token::Punct('}')) => return index + 1,
                        Some(Token::Punct(',')) => {
                            index += 1;
                            continue;
                        }
                        _ => {}
                    }
                    let start = index;
                    index = read_tree(tokens, index, &path, out);
                    // Skip `as name` (and anything unexpected) up to `,` or `}`.
                    let mut depth = 0usize;
                    while let Some(token) = token_at(tokens, index) {
                        match token {
                            Token::Punct('{') => depth += 1,
                            Token::Punct('}') if depth == 0 => break,
                            Token::Punct('}') => depth -= 1,
                            Token::Punct(',') if depth == 0 => break,
                            _ => {}
                        }
                        index += 1;
                    }
                    if index == start {
                        index += 1;
                    }
                }
            }
            // The end of the path: `;`, `(`, `<` of a turbofish, ...
            _ => {}
        }
        if let Some(line) = first_line {
            out.push(Reference { line, path });
        }
        return index;
    }
}

/// Paths from the crate root in a library file at module path `own_path`:
/// `crate::..` and `super::..` that climbs to the root, with inline `mod x {}`
/// blocks counted in how far `super` has to climb.
fn crate_root_paths(tokens: &[Lexeme], own_path: &[String]) -> Vec<Reference> {
    let mut references = Vec::new();
    // Brace depth at which each open inline module's body sits.
    let mut inline_modules: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    for (index, lexeme) in tokens.iter().enumerate() {
        let after_path_sep = index > 0 && token_at(tokens, index - 1) == Some(&Token::PathSep);
        let next_is_path_sep = token_at(tokens, index + 1) == Some(&Token::PathSep);
        match &lexeme.token {
            Token::Punct('{') => depth += 1,
            Token::Punct('}') => {
                depth = depth.saturating_sub(1);
                while inline_modules.last().is_some_and(|&body| body > depth) {
                    inline_modules.pop();
                }
            }
            Token::Ident(word)
                if word == "mod"
                    && matches!(token_at(tokens, index + 1), Some(Token::Ident(_)))
                    && token_at(tokens, index + 2) == Some(&Token::Punct('{')) =>
            {
                inline_modules.push(depth + 1);
            }
            Token::Ident(word) if word == "crate" && next_is_path_sep && !after_path_sep => {
                read_tree(tokens, index + 2, &[], &mut references);
            }
            Token::Ident(word) if word == "super" && next_is_path_sep && !after_path_sep => {
                let mut climbs = 0;
                let mut next = index;
                while is_ident(token_at(tokens, next), "super")
                    && token_at(tokens, next + 1) == Some(&Token::PathSep)
                {
                    climbs += 1;
                    next += 2;
                }
                if climbs >= own_path.len() + inline_modules.len() {
                    read_tree(tokens, next, &[], &mut references);
                }
            }
            _ => {}
        }
    }
    references
}

/// Keywords that may come right before a leading `::` (`use ::virt::..`):
/// there the name after `::` is a crate, not someone's submodule.
const KEYWORDS_BEFORE_ABSOLUTE_PATH: &[&str] = &[
    "use", "return", "in", "mut", "dyn", "impl", "let", "const", "static", "if", "match", "while",
    "for", "break", "move", "else",
];

/// Paths rooted at the external crate `crate_ident` (`virt::Connect`,
/// `::quinn::Endpoint`, `use deskgrid::{..}`), and bare mentions such as
/// `extern crate virt` or `use virt as libvirt` (an empty path).
fn external_crate_paths(tokens: &[Lexeme], crate_ident: &str) -> Vec<Reference> {
    let mut references = Vec::new();
    for (index, lexeme) in tokens.iter().enumerate() {
        if !is_ident(Some(&lexeme.token), crate_ident) {
            continue;
        }
        let before = index.checked_sub(1).and_then(|i| token_at(tokens, i));
        let before_that = index.checked_sub(2).and_then(|i| token_at(tokens, i));
        let inside_another_path = before == Some(&Token::PathSep)
            && match before_that {
                Some(Token::Ident(word)) => !KEYWORDS_BEFORE_ABSOLUTE_PATH.contains(&word.as_str()),
                Some(Token::Punct('>')) => true,
                _ => false,
            };
        if inside_another_path || before == Some(&Token::Punct('.')) {
            continue;
        }
        if token_at(tokens, index + 1) == Some(&Token::PathSep) {
            let n_before = references.len();
            read_tree(tokens, index + 2, &[], &mut references);
            if references.len() == n_before {
                references.push(Reference {
                    line: lexeme.line,
                    path: Vec::new(),
                });
            }
        } else if is_ident(before, "use") || is_ident(before, "crate") {
            references.push(Reference {
                line: lexeme.line,
                path: Vec::new(),
            });
        }
    }
    references
}

// ---------------------------------------------------------------------------
// The reader on made-up sources: it must report what it must, and only that.

fn test_layout() -> CrateLayout {
    let mut layout = CrateLayout::default();
    for (module, submodules) in [
        ("model", &["ids", "names"][..]),
        ("state", &["store", "storage"]),
        ("service", &[]),
        ("api", &["control_socket"]),
        ("cli", &["output"]),
        ("appliance", &["config", "data_dir"]),
        ("actuator", &["libvirt", "fake"]),
        ("transfer", &["manifest"]),
        ("desktop", &["protocol"]),
        ("federation", &["transport"]),
    ] {
        layout.modules.insert(
            module.to_owned(),
            submodules.iter().map(|name| (*name).to_owned()).collect(),
        );
    }
    layout
}

fn violations(file: &str, source: &str) -> Vec<Violation> {
    check_file(&test_layout(), file, source).violations
}

#[test]
fn reader_reports_a_face_used_by_model() {
    let found = violations(
        "src/model/ids.rs",
        "//! Ids.\n\nuse std::fmt;\nuse crate::cli::Foo;\n",
    );
    assert_eq!(found.len(), 1, "{found:?}");
    let violation = &found[0];
    assert_eq!(
        (violation.file.as_str(), violation.line),
        ("src/model/ids.rs", 4)
    );
    assert!(violation.detail.contains("crate::cli::Foo"), "{violation}");
    assert_eq!(
        violation.rule,
        "`model` depends on nothing else in the crate"
    );
    let message = violation.to_string();
    assert!(
        message.starts_with("src/model/ids.rs:4: `model` uses `crate::cli::Foo`"),
        "{message}"
    );
}

#[test]
fn reader_accepts_allowed_paths_and_ignores_comments_and_strings() {
    let source = r##"//! The store.
use super::grid_state::GridState;
use crate::model::{ServerId, names::Name};
use crate::{error_chain, model};
// use crate::cli::Foo;
/* use crate::api::Bar; /* nested */ crate::cli::Baz */
const TEXT: &str = "crate::cli::Foo";
const RAW: &str = r#"crate::cli::Foo"#;
const BRACE: char = '{';
fn f<'a>(x: &'a str) -> String { crate::model::SiteLabel::new(x) }
mod tests {
    use super::*;
    use crate::model::sample_template;
}
"##;
    assert_eq!(violations("src/state/store.rs", source), []);
    assert_eq!(
        check_file(&test_layout(), "src/state/store.rs", source).n_crate_paths,
        6,
        "expected model::ServerId, model::names::Name, error_chain, model, \
         model::SiteLabel::new and model::sample_template: the reader lost or invented a path"
    );
}

#[test]
fn reader_follows_use_trees_and_super_out_of_the_module() {
    let source = "//! Ids.
use crate::{model::A, cli::{B, output::C}};
use super::super::api::D;
use super::ModelError;
mod tests {
    use super::super::E;
    use super::super::super::service::F;
}
";
    let lines: Vec<(usize, String)> = violations("src/model/ids.rs", source)
        .into_iter()
        .map(|violation| (violation.line, violation.detail))
        .collect();
    assert_eq!(
        lines,
        [
            (2, "`model` uses `crate::cli::B`".to_owned()),
            (2, "`model` uses `crate::cli::output::C`".to_owned()),
            (3, "`model` uses `crate::api::D`".to_owned()),
            (7, "`model` uses `crate::service::F`".to_owned()),
        ]
    );
}

#[test]
fn reader_lets_adapters_use_each_others_root_items_only() {
    let source = "//! Manifests.
use crate::actuator::Hypervisor;
use crate::actuator::libvirt::LibvirtHypervisor;
use crate::state::GridState;
use crate::service::GridService;
use crate::appliance::config::Config;
";
    let lines: Vec<usize> = violations("src/transfer/manifest.rs", source)
        .iter()
        .map(|violation| violation.line)
        .collect();
    assert_eq!(lines, [3, 5, 6]);
    assert_eq!(
        violations(
            "src/service/mod.rs",
            "//! Service.\nuse crate::appliance::config::Config;\nuse crate::appliance::Appliance;\n"
        )
        .iter()
        .map(|violation| violation.line)
        .collect::<Vec<_>>(),
        [3]
    );
}

#[test]
fn reader_reports_the_other_rules() {
    let agent = "//! Agent.
use deskgrid::desktop::protocol::Message;
use deskgrid::model::ServerId;
fn main() { let _ = ::deskgrid::error_chain; }
#[path = \"../desktop/protocol.rs\"]
mod protocol;
use protocol::Message;
";
    for file in [
        "src/bin/deskgrid-agent.rs",
        "src/bin/deskgrid-agent/guest_sessions.rs",
    ] {
        let lines: Vec<(usize, &str)> = violations(file, agent)
            .iter()
            .map(|violation| (violation.line, violation.rule))
            .collect();
        assert_eq!(
            lines,
            [(2, AGENT_RULE), (3, AGENT_RULE), (4, AGENT_RULE)],
            "{file}"
        );
    }

    let adapter = "use virt::connect::Connect;
use std::io;
fn f() { let quinn = 1; todo!(\"later\") }
extern crate quinn_proto;
fn g() -> crate::federation::quinn::X { unimplemented!() }
";
    let found: Vec<(usize, &str)> = violations("src/transfer/mod.rs", adapter)
        .iter()
        .map(|violation| (violation.line, violation.rule))
        .collect();
    assert_eq!(
        found,
        [
            (1, DOC_LINE_RULE),
            (3, NO_TODO_RULE),
            (5, NO_TODO_RULE),
            (1, SOLE_IMPORTERS[0].rule),
            (4, SOLE_IMPORTERS[1].rule),
        ]
    );
    assert_eq!(
        violations(
            "src/actuator/libvirt.rs",
            "//! Libvirt.\nuse virt::connect::Connect;\n"
        ),
        []
    );
    assert_eq!(
        violations(
            "src/actuator/libvirt/events.rs",
            "//! Libvirt events.\nuse virt::connect::Connect;\n"
        ),
        []
    );
    assert_eq!(
        violations("src/gizmo/mod.rs", "//! Gizmo.\nuse crate::model::Id;\n")
            .iter()
            .map(|violation| violation.rule)
            .collect::<Vec<_>>(),
        [NO_ROW_RULE]
    );
}
