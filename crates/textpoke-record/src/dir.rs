//! The trace directory a recording writes, made ready without harming
//! what the user has there.
//!
//! # Rules
//!
//! [`prepare`]`(DIR, replace)`:
//!
//! 1. DIR's symbolic links are followed ([`follow_links`]): a link is
//!    kept, and everything below happens at the directory it names (an
//!    earlier trace moves to `TARGET.old`, beside it). A procfs link
//!    (`/proc/self/cwd`) is refused: nothing can be moved beside it.
//! 2. Missing: created, with its parents.
//! 3. Not a directory (a file, a device...): refused.
//! 4. An empty directory: used.
//! 5. A textpoke trace (it holds a `meta.json` file) when `replace`: moved
//!    to `DIR.old`. What is at `DIR.old` is removed first only if it is an
//!    earlier trace or an empty directory; a symbolic link, a file, or a
//!    directory holding anything else is refused and left as it is.
//! 6. With `keep_children`, a directory holding only `child-*`
//!    directories and no trace: used as it is. That is the directory of a
//!    process that exec'd a traced program after its earlier image, which
//!    recorded nothing, started traced children (a shell script ending in
//!    `exec ./prog`): the new image's trace is written beside them.
//! 7. Anything else (a trace when not `replace`, a directory of other
//!    files): refused.
//!
//! [`check`] makes the same decisions without changing anything, so that
//! a front end can refuse before it starts a program.

use super::format::{CHILD_DIR_PREFIX, META_FILE};
use super::RecordError;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use textpoke_sys::fs::{follow_links, kind_name};

/// What [`prepare`] will do.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Create the directory (and its parents).
    Create(PathBuf),
    /// It is an empty directory: nothing to do.
    Use,
    /// Move the trace `dir` to `old`, removing an earlier trace (or an
    /// empty directory) there first when `clear_old`.
    MoveAside { dir: PathBuf, old: PathBuf, clear_old: bool },
}

/// Checks that [`prepare`] would accept `dir`, changing nothing.
pub fn check(dir: &Path, replace: bool) -> Result<(), RecordError> {
    plan(dir, replace, false).map(|_| ())
}

/// Makes `dir` ready for a new trace (see the [module
/// documentation](self)): afterwards it is an empty directory.
/// `keep_children`: rule 6.
pub fn prepare(dir: &Path, replace: bool, keep_children: bool) -> Result<(), RecordError> {
    match plan(dir, replace, keep_children)? {
        Plan::Create(target) => std::fs::create_dir_all(&target).map_err(io_err("create directory", &target)),
        Plan::Use => Ok(()),
        Plan::MoveAside { dir, old, clear_old } => {
            if clear_old {
                std::fs::remove_dir_all(&old).map_err(io_err("remove the earlier trace", &old))?;
            }
            std::fs::rename(&dir, &old).map_err(io_err("move the trace aside from", &dir))?;
            std::fs::create_dir(&dir).map_err(io_err("create directory", &dir))
        }
    }
}

fn plan(dir: &Path, replace: bool, keep_children: bool) -> Result<Plan, RecordError> {
    let followed = follow_links(dir).map_err(io_err("follow the links of", dir))?;
    let target = followed.path;
    if followed.magic {
        return Err(refused("record into", &target, "it is a link in /proc; give the directory's own path"));
    }
    let meta = match std::fs::symlink_metadata(&target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Plan::Create(target)),
        Err(e) => return Err(io_err("inspect", &target)(e)),
    };
    if !meta.is_dir() {
        let why = format!("it is a {}, not a directory; choose another directory", kind_name(meta.file_type()));
        return Err(refused("record into", &target, &why));
    }
    let mut entries = std::fs::read_dir(&target).map_err(io_err("read directory", &target))?;
    if entries.next().is_none() {
        return Ok(Plan::Use);
    }
    if !holds_trace(&target) {
        if keep_children && holds_only_children(&target) {
            return Ok(Plan::Use);
        }
        return Err(RecordError::DirNotEmpty { dir: target });
    }
    if !replace {
        return Err(refused("record into", &target, "it holds an earlier trace, and replacing it was not asked for"));
    }
    let old = old_path(&target);
    let clear_old = check_old(&old)?;
    Ok(Plan::MoveAside { dir: target, old, clear_old })
}

/// `DIR.old`.
fn old_path(dir: &Path) -> PathBuf {
    let mut old = OsString::from(dir.as_os_str());
    old.push(".old");
    PathBuf::from(old)
}

/// Whether `dir` holds a textpoke trace: a `meta.json` file (not a link).
fn holds_trace(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir.join(META_FILE)).is_ok_and(|m| m.is_file())
}

/// Whether every entry of `dir` is a `child-*` directory (not a link).
fn holds_only_children(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.into_iter().all(|e| {
        e.is_ok_and(|e| {
            e.file_name().as_encoded_bytes().starts_with(CHILD_DIR_PREFIX.as_bytes())
                && e.file_type().is_ok_and(|t| t.is_dir())
        })
    })
}

/// Whether `old` must be removed before the trace moves there: `false`
/// when nothing is there, `true` for an earlier trace or an empty
/// directory; anything else is refused.
fn check_old(old: &Path) -> Result<bool, RecordError> {
    const WHAT: &str = "move the earlier trace to";
    let meta = match std::fs::symlink_metadata(old) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("inspect", old)(e)),
    };
    if !meta.is_dir() {
        let why = format!(
            "it is a {}, which textpoke does not remove; move it away or choose another directory",
            kind_name(meta.file_type())
        );
        return Err(refused(WHAT, old, &why));
    }
    let empty = std::fs::read_dir(old).map_err(io_err("read directory", old))?.next().is_none();
    if empty || holds_trace(old) {
        return Ok(true);
    }
    Err(refused(
        WHAT,
        old,
        "it is a directory that holds no textpoke trace, which textpoke does not remove; move it away or \
         choose another directory",
    ))
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RecordError + 'a {
    move |source| RecordError::Io { what, path: path.to_path_buf(), source }
}

/// A refusal, as `cannot WHAT PATH: WHY`.
fn refused(what: &'static str, path: &Path, why: &str) -> RecordError {
    io_err(what, path)(io::Error::other(why.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("textpoke-record-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A directory that looks like a trace, with `mark` in it.
    fn trace(dir: &Path, mark: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(META_FILE), "{}").unwrap();
        std::fs::write(dir.join("mark"), mark).unwrap();
    }

    fn mark(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("mark")).unwrap()
    }

    fn is_empty_dir(dir: &Path) -> bool {
        std::fs::symlink_metadata(dir).unwrap().is_dir() && std::fs::read_dir(dir).unwrap().next().is_none()
    }

    fn err(dir: &Path) -> String {
        let e = prepare(dir, true, false).unwrap_err();
        assert_eq!(check(dir, true).unwrap_err().to_string(), e.to_string(), "check and prepare agree");
        e.to_string()
    }

    #[test]
    fn missing_empty_and_earlier_traces() {
        let d = tmp("basic");
        let dir = d.join("a/b/trace");
        prepare(&dir, true, false).unwrap();
        assert!(is_empty_dir(&dir));
        prepare(&dir, true, false).unwrap();
        assert!(is_empty_dir(&dir));
        trace(&dir, "first");
        prepare(&dir, true, false).unwrap();
        assert!(is_empty_dir(&dir));
        assert_eq!(mark(&old_path(&dir)), "first");
        // An earlier DIR.old trace is replaced by the newer one.
        trace(&dir, "second");
        prepare(&dir, true, false).unwrap();
        assert_eq!(mark(&old_path(&dir)), "second");
        // An empty DIR.old is replaced too.
        std::fs::remove_dir_all(old_path(&dir)).unwrap();
        std::fs::create_dir(old_path(&dir)).unwrap();
        trace(&dir, "third");
        prepare(&dir, true, false).unwrap();
        assert_eq!(mark(&old_path(&dir)), "third");
        // Not asked to replace: refused, left.
        trace(&dir, "fourth");
        let e = prepare(&dir, false, false).unwrap_err().to_string();
        assert!(e.contains("holds an earlier trace"), "{e}");
        assert_eq!(mark(&dir), "fourth");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn what_is_not_a_trace_is_left_alone() {
        let d = tmp("refuse");
        let file = d.join("file");
        std::fs::write(&file, "keep").unwrap();
        assert!(err(&file).contains("it is a regular file, not a directory"), "{}", err(&file));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

        let other = d.join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "keep").unwrap();
        assert!(err(&other).contains("holds no textpoke trace"), "{}", err(&other));
        assert!(other.join("notes.txt").exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn children_of_an_exec_d_process_are_kept_only_when_asked() {
        let d = tmp("children");
        let dir = d.join("t");
        std::fs::create_dir_all(dir.join("child-41")).unwrap();
        trace(&dir.join("child-41"), "sibling");
        // A front end (no keep_children) refuses it, leaving it alone.
        assert!(err(&dir).contains("holds no textpoke trace"), "{}", err(&dir));
        prepare(&dir, true, true).unwrap();
        assert_eq!(mark(&dir.join("child-41")), "sibling");
        // Anything else beside the children: refused even so.
        std::fs::write(dir.join("notes.txt"), "keep").unwrap();
        assert!(prepare(&dir, true, true).is_err());
        assert!(dir.join("notes.txt").exists());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn dir_old_is_removed_only_when_it_is_a_trace() {
        let d = tmp("old");
        let dir = d.join("trace");
        let old = old_path(&dir);
        // A directory of the user's own at DIR.old.
        trace(&dir, "new");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("thesis.tex"), "keep").unwrap();
        let e = err(&dir);
        assert!(e.contains("trace.old") && e.contains("holds no textpoke trace"), "{e}");
        assert_eq!(std::fs::read_to_string(old.join("thesis.tex")).unwrap(), "keep");
        assert_eq!(mark(&dir), "new");
        std::fs::remove_dir_all(&old).unwrap();
        // A link at DIR.old, to a trace or to anything else: left, and so
        // is what it names.
        let elsewhere = d.join("elsewhere");
        trace(&elsewhere, "linked");
        symlink(&elsewhere, &old).unwrap();
        let e = err(&dir);
        assert!(e.contains("it is a symbolic link, which textpoke does not remove"), "{e}");
        assert!(std::fs::symlink_metadata(&old).unwrap().file_type().is_symlink());
        assert_eq!(mark(&elsewhere), "linked");
        std::fs::remove_file(&old).unwrap();
        // A file at DIR.old.
        std::fs::write(&old, "keep").unwrap();
        assert!(err(&dir).contains("it is a regular file"));
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "keep");
        assert_eq!(mark(&dir), "new");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_linked_dir_is_kept_and_its_target_prepared() {
        let d = tmp("link");
        let real = d.join("disk/run");
        let link = d.join("trace");
        trace(&real, "first");
        symlink("disk/run", &link).unwrap();
        prepare(&link, true, false).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("disk/run"), "the link is kept");
        assert!(is_empty_dir(&real));
        assert_eq!(mark(&d.join("disk/run.old")), "first", "the old trace moves beside the target");
        assert!(!d.join("trace.old").exists());
        // A dangling link: its target is created.
        let dangling = d.join("dangling");
        symlink("made/here", &dangling).unwrap();
        prepare(&dangling, true, false).unwrap();
        assert!(is_empty_dir(&d.join("made/here")));
        assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
        // A link to a file is refused like the file.
        std::fs::write(d.join("file"), "keep").unwrap();
        symlink("file", d.join("to-file")).unwrap();
        assert!(err(&d.join("to-file")).contains("regular file, not a directory"));
        assert!(err(Path::new("/proc/self/cwd")).contains("a link in /proc"));
        let _ = std::fs::remove_dir_all(d);
    }
}
