//! Files stay in their place: stage ids and parameters cannot make ril-pipe write or delete
//! outside the cache and report roots, and gc, verify and the cleanup of killed runs never
//! follow a symbolic link out of the cache.
use std::path::{Path, PathBuf};

use super::*;

/// Every file under `root`, relative.
fn files_under(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            files_under(root, &path, out);
        } else {
            out.push(path.strip_prefix(root).unwrap().to_path_buf());
        }
    }
}

#[test]
fn stage_ids_and_parameters_cannot_write_outside_the_cache() {
    let sandbox = tempfile::tempdir().unwrap();
    let work = sandbox.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // Ids that look like the cache's own folders, and a failing stage whose log is kept.
    let text = format!(
        "name: paths\ndefaults:\n{SMALL_DEFAULTS}stages:\n  - id: objects\n    kind: tiny_world\n    params: {{root: {random}}}\n  - id: locks\n    kind: tiny_world\n    params: {{root: {nan}}}\n  - id: tmp/x\n    kind: evaluate\n    inputs: {{model: objects}}\n  - id: runs/evil\n    kind: evaluate\n    inputs: {{model: objects}}\n    params: {{seed: 7}}\n  - id: partial/fail=+-_\n    kind: finetune\n    inputs: {{model: locks}}\n    params: {{task: aesthetic, method: baseline}}\n",
        random = world("random").display(),
        nan = world("nan_head").display()
    );
    std::fs::write(work.join("p.yaml"), text).unwrap();
    let out = ril_in(&["run", "p.yaml", "--cache", "cache", "--device", "cpu", "--threads", "1", "--no-progress", "--keep-going"], Some(&work));
    assert_eq!(out.code, Some(1), "the NaN fine-tune fails, the rest runs:\n{}", out.text);
    assert!(out.text.contains("  done    runs/evil"), "{}", out.text);

    // Ids and names that try to leave are refused before anything is written.
    let escapes = ["../escape", "/abs/olute", "a/../../b", "a/./b", "..", "a//b", "a\\b", "a b", "~/x", "$HOME/x"];
    let mut refused = 0;
    for (i, id) in escapes.iter().enumerate() {
        let file = format!("bad{i}.yaml");
        std::fs::write(work.join(&file), format!("stages:\n  - id: '{id}'\n    kind: tiny_world\n    params: {{root: {}}}\n", world("random").display())).unwrap();
        let out = ril_in(&["run", &file, "--cache", "cache", "--no-progress"], Some(&work));
        refused += usize::from(out.code == Some(2) && out.text.contains("not a valid stage id"));
    }
    for (i, name) in ["../../evil", "/etc/evil", "..", "a/b"].iter().enumerate() {
        let file = format!("badname{i}.yaml");
        std::fs::write(work.join(&file), format!("name: '{name}'\nstages:\n  - id: a\n    kind: tiny_world\n    params: {{root: {}}}\n", world("random").display())).unwrap();
        let out = ril_in(&["run", &file, "--cache", "cache", "--no-progress"], Some(&work));
        refused += usize::from(out.code == Some(2) && out.text.contains("not a valid pipeline name"));
    }
    let tries = escapes.len() + 4;

    let mut files = Vec::new();
    files_under(sandbox.path(), sandbox.path(), &mut files);
    let outside: Vec<&PathBuf> = files.iter().filter(|f| !(f.starts_with("work/cache") || f.starts_with("work/reports") || f.extension().is_some_and(|e| e == "yaml"))).collect();
    let kept_log = files.iter().any(|f| f.starts_with("work/cache/logs") && f.to_string_lossy().contains("partial_fail"));
    report(&format!(
        "paths: {refused}/{tries} ids and pipeline names with ../, absolute paths or other escapes refused (exit 2, nothing written); a run with ids named like the cache's folders wrote {} files, {} outside the cache (the failed stage's log kept as cache/logs/...: {kept_log})",
        files.len(),
        outside.len()
    ));
    assert_eq!(refused, tries);
    assert!(outside.is_empty(), "written outside the cache: {outside:?}");
    assert!(kept_log, "{files:?}");
}

#[test]
fn gc_verify_and_cleanup_never_follow_links_out_of_the_cache() {
    let r = reference();
    let sandbox = tempfile::tempdir().unwrap();
    let victim = sandbox.path().join("victim");
    std::fs::create_dir_all(victim.join("sub")).unwrap();
    std::fs::write(victim.join("precious.txt"), b"keep me").unwrap();
    std::fs::write(victim.join("sub/also.txt"), b"keep me too").unwrap();
    let cache = sandbox.path().join("cache");
    copy_tree(&r.cache, &cache);
    let key = |c: char| c.to_string().repeat(64);
    let link = |at: PathBuf| {
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&victim, &at).unwrap();
        at
    };
    // A stale temporary folder, a trash folder, an object, a resumable checkpoint: each a link
    // to the victim; an object whose file is a link to a file of the victim.
    let mut traps = vec![
        link(cache.join("tmp").join(format!("{}.999999.1", key('a')))),
        link(cache.join("tmp").join(format!("trash.{}.1", key('b')))),
        link(cache.join("objects").join("cc").join(key('c'))),
        link(cache.join("partial").join(key('d'))),
    ];
    let inner = cache.join("objects").join("ee").join(key('e'));
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::write(inner.join("MANIFEST.json"), std::fs::read(object_dir(&r.cache, &r.keys["base"]).join("MANIFEST.json")).unwrap()).unwrap();
    std::os::unix::fs::symlink(victim.join("precious.txt"), inner.join("model.json")).unwrap();
    traps.push(inner.join("model.json"));

    let verify = ril(&["verify", "--cache", s(&cache), "--repair"]);
    let gc = ril(&["gc", "--cache", s(&cache)]);
    let run = ril(&run_args(s(&r.pipeline), s(&cache)));
    let intact = std::fs::read(victim.join("precious.txt")).ok().as_deref() == Some(b"keep me".as_slice()) && std::fs::read(victim.join("sub/also.txt")).ok().as_deref() == Some(b"keep me too".as_slice());
    let removed = traps.iter().filter(|t| std::fs::symlink_metadata(t).is_err()).count();
    let results_ok = run.code == Some(0) && started_none(&run.text) && all_results(&r.keys, &cache) == r.results;
    report(&format!(
        "links: {} symbolic links out of the cache planted (stale temporary folder, trash, object, checkpoint, object file): after verify --repair, gc and a run the victim folder is intact: {intact}; {removed}/{} links removed, results of the real objects kept: {results_ok}",
        traps.len(),
        traps.len()
    ));
    assert!(intact, "verify:\n{}\ngc:\n{}", verify.text, gc.text);
    assert_eq!(removed, traps.len(), "verify:\n{}\ngc:\n{}", verify.text, gc.text);
    assert!(results_ok, "{}", run.text);
}

fn started_none(text: &str) -> bool {
    !text.lines().any(|l| l.starts_with("  start   "))
}
