//! The documentation's claims that code can hold: every pipeline written in the README and in
//! docs/ is valid for the shipped stage kinds, the README's stage count is the plan's, and every
//! relative link between the pages leads to a file of the repository.
use std::path::{Path, PathBuf};

use ril_pipe::pipeline::{expand, spec, FileCheck};
use crate::support::repo;

/// README.md and every page of docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(docs.len() >= 9, "docs/ should hold a page per subject, found {docs:?}");
    pages.extend(docs);
    pages
}

/// The ```yaml blocks of a Markdown text.
fn yaml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```yaml") => current = Some(String::new()),
            (Some(block), l) if l.starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// Resolves a pipeline written in a page as if saved in `pipelines/` (where the README says to
/// save it): every file it names must exist. Returns the number of stages.
fn resolve_as_saved(page: &Path, yaml: &str) -> usize {
    let file = repo().join("pipelines").join("from-the-docs.yaml");
    let spec = spec::parse(&file, yaml.to_string()).unwrap_or_else(|e| panic!("{}: a pipeline does not parse:\n{e}\n{yaml}", page.display()));
    let schemas = ril_pipe::stages::registry().schemas();
    let resolved = expand::resolve_with(&spec, &schemas, &[], &ril_pipe::pipeline::interp::ProcessEnv, FileCheck::Require)
        .unwrap_or_else(|e| panic!("{}: a pipeline is invalid:\n{e}\n{yaml}", page.display()));
    resolved.stages.len()
}

#[test]
fn every_pipeline_in_the_docs_is_valid() {
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for block in yaml_blocks(&text).iter().filter(|b| b.lines().any(|l| l.starts_with("stages:"))) {
            resolve_as_saved(&page, block);
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected the README's pipeline and the syntax page's, checked {checked}");
}

#[test]
fn the_readme_pipeline_has_the_stages_it_says() {
    let text = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let blocks = yaml_blocks(&text);
    let first = blocks.iter().find(|b| b.starts_with("name: first")).expect("the README's short pipeline (name: first)");
    let claimed: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("ril-pipe plan pipelines/first.yaml"))
        .and_then(|rest| rest.split('#').nth(1))
        .and_then(|comment| comment.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the README's `ril-pipe plan pipelines/first.yaml  # N stages` line");
    assert_eq!(resolve_as_saved(Path::new("README.md"), first), claimed);
}

#[test]
fn relative_links_lead_to_files_of_the_repository() {
    let link = regex::Regex::new(r"\]\(([^)#\s]+)(#[^)]*)?\)").unwrap();
    let mut broken = Vec::new();
    let mut count = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for cap in link.captures_iter(&text) {
            let target = &cap[1];
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            count += 1;
            let path = page.parent().unwrap().join(target);
            let inside = path.canonicalize().map(|p| p.starts_with(repo().canonicalize().unwrap())).unwrap_or(false);
            if !inside {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links to nothing (or outside the repository): {broken:#?}");
    assert!(count >= 20, "expected the pages to link to each other, found {count} relative links");
}
