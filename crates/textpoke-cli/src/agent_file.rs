//! Where `textpoke record` finds the agent it preloads
//! (`libtextpoke_agent.so`), and the copy of it that `textpoke` carries.
//!
//! # The search
//!
//! 1. `TEXTPOKE_AGENT`, when set: that file, or an error.
//! 2. Beside the executable (`DIR/`, `DIR/deps/`: the newest non-empty
//!    one): a workspace build, where cargo puts the agent in the same
//!    target directory as `textpoke`, so that a rebuilt agent is used
//!    without rebuilding `textpoke`.
//! 3. `DIR/../lib/textpoke/`: an installed layout (`/usr/bin/textpoke`,
//!    `/usr/lib/textpoke/libtextpoke_agent.so`).
//! 4. The copy inside `textpoke`, written once to a private file (below).
//!    This is what a `cargo install`ed or copied `textpoke` uses.
//!
//! # The copy inside
//!
//! The build script points `include_bytes!` at the agent cargo builds for
//! this binary (the `textpoke-agent` dependency's cdylib: no second build
//! of it; see `build.rs`), so every `textpoke` carries the agent it was
//! built with, in release and debug builds alike. `LD_PRELOAD` needs a
//! path, so the copy is written to a file, in the first of these
//! directories that is safe to use:
//!
//! - `$XDG_CACHE_HOME/textpoke/` (by default `~/.cache/textpoke/`):
//!   written once per agent and kept across runs and reboots;
//! - `$XDG_RUNTIME_DIR/textpoke/` (a private tmpfs, emptied at logout);
//! - `$TMPDIR/textpoke-<uid>/` (by default `/tmp`).
//!
//! and there in `<version>-<hash of the agent>/libtextpoke_agent.so`.
//! The directory is content-addressed, so two versions of `textpoke` never
//! fight over one file, and the file keeps the agent's own name, by which
//! `textpoke ctl` recognises a process's agent in `/proc/PID/maps`.
//!
//! Why a file, not a memfd (`LD_PRELOAD=/proc/self/fd/N`): the path must
//! stay valid in the program and in every process it starts, since the
//! agent follows fork and exec through `LD_PRELOAD`. A program that closes
//! the descriptors it inherited (daemons, shells, `closefrom`) or execs a
//! child without them would lose the agent there, and the descriptor
//! would be one more the program sees that it did not open (DESIGN rule
//! 9: invisible to the program).
//!
//! # Safety of the file
//!
//! The program loads and runs whatever is at that path, so it must be the
//! agent and no one else's choice:
//!
//! - **The directories.** The parent (`~/.cache`, the runtime directory,
//!   `/tmp`) is resolved to a path without symbolic links, and it and every
//!   directory above it must be owned by root or by us and not writable
//!   by others, unless sticky (`/tmp`: others cannot rename or remove what
//!   is ours there). `textpoke/` (`textpoke-<uid>/`) and the hash directory
//!   are made with mode 0700, and must be real directories (not links)
//!   owned by us and not writable by others; one that another user made
//!   first in `/tmp` is refused, not used. A directory on a filesystem
//!   mounted `noexec` (where the loader could not map the agent's code)
//!   and a path with a space or colon (which `LD_PRELOAD` cannot hold)
//!   are skipped.
//! - **Reuse.** The file is used again only if it is a regular file (opened
//!   with `O_NOFOLLOW`), ours, not writable by others, and holds exactly
//!   the carried bytes: it is read and compared whole on every run. With
//!   the hash that names its directory, that costs a few milliseconds for
//!   a release agent (4.5 MB; not measurable in a `record` run here) and
//!   about 0.3 s for a debug one (26 MB, hashed by unoptimised code),
//!   paid only when the copy is used. Anything else, a truncated or
//!   altered file, a link, a directory, is replaced.
//! - **Writing.** The bytes go to a new temporary file in the same
//!   directory (`O_EXCL`, mode 0500), which is then renamed over the final
//!   name: a reader sees the old file or the new one, never a partial one;
//!   two `textpoke`s writing at once each rename a complete copy; a
//!   program still running with an older file keeps its mapping (the file
//!   is never written in place). There is no `fsync`: a file cut short by
//!   a crash fails the comparison at the next run and is written again.
//!
//! Tested by `tests/install.rs` (a `cargo install`ed and a copied
//! `textpoke`) and the unit tests below.
//!
//! Old versions' directories are not removed (a program started by an
//! older `textpoke` may still run with one); removing the whole directory
//! is safe when no traced program runs.

use crate::cmdutil::CliError;
use crate::record::AGENT_FILE_NAME;
use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::hash::Hasher;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The agent `textpoke` was built with; empty when it was built without
/// (`TEXTPOKE_EMBED_AGENT=0`, or a cargo layout the build script does
/// not know: see `build.rs`).
#[cfg(not(test))]
static EMBEDDED: &[u8] = include_bytes!(env!("TEXTPOKE_EMBEDDED_AGENT"));
/// The unit tests give [`extract`] their own bytes: their binary does not
/// carry the agent.
#[cfg(test)]
static EMBEDDED: &[u8] = &[];

/// The agent to preload (see the module docs for the search).
pub fn find() -> Result<PathBuf, CliError> {
    if let Some(p) = std::env::var_os("TEXTPOKE_AGENT") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(CliError::new(1, format!("TEXTPOKE_AGENT={} is not a file", p.display())))
        };
    }
    let exe = std::env::current_exe().map_err(|e| CliError::new(1, format!("cannot find this executable: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    if let Some(p) = beside(dir) {
        return Ok(p);
    }
    let not_beside = format!(
        "TEXTPOKE_AGENT is not set, and there is no {AGENT_FILE_NAME} beside {} (nor in deps/ or ../lib/textpoke/ there)",
        exe.display()
    );
    if EMBEDDED.is_empty() {
        return Err(CliError::new(
            1,
            format!(
                "cannot find the textpoke agent: {not_beside}, and this textpoke was built without it inside \
                 (TEXTPOKE_EMBED_AGENT=0, or see the build's warnings); install it as ../lib/textpoke/{AGENT_FILE_NAME} \
                 beside the directory of textpoke, or set TEXTPOKE_AGENT to its path"
            ),
        ));
    }
    let places = CachePlace::all(&|name| std::env::var_os(name), euid());
    extract(EMBEDDED, &places, euid()).map_err(|tried| {
        CliError::new(
            1,
            format!(
                "cannot find the textpoke agent: {not_beside}, and the copy inside textpoke could not be written: {}. \
                 Set XDG_CACHE_HOME to a directory of yours, or TEXTPOKE_AGENT to the path of {AGENT_FILE_NAME}",
                tried.join("; ")
            ),
        )
    })
}

/// The agent in a workspace build (`dir/`, `dir/deps/`: the newest) or an
/// installed layout (`dir/../lib/textpoke/`). Empty files do not count:
/// `build.rs` leaves one in `deps/` after a `cargo check`.
fn beside(dir: &Path) -> Option<PathBuf> {
    let usable = |p: &Path| std::fs::metadata(p).ok().filter(|m| m.is_file() && m.len() > 0);
    let newest = [dir.join(AGENT_FILE_NAME), dir.join("deps").join(AGENT_FILE_NAME)]
        .into_iter()
        .filter_map(|p| Some((usable(&p)?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p);
    newest.or_else(|| Some(dir.join("../lib/textpoke").join(AGENT_FILE_NAME)).filter(|p| usable(p).is_some()))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A directory the carried agent may be written under: `parent/name/`.
#[derive(Debug, Clone, PartialEq)]
pub struct CachePlace {
    /// An existing directory of the system or the user (`~/.cache`,
    /// `$XDG_RUNTIME_DIR`, `/tmp`); `Err` says why there is none.
    parent: Result<PathBuf, String>,
    /// The directory textpoke makes in it.
    name: String,
    /// Whether `parent` is made when it is missing (`~/.cache` may not
    /// exist yet; a runtime directory that does not exist is not ours to
    /// make).
    make_parent: bool,
}

impl CachePlace {
    /// The places in the order they are tried (see the module docs), from
    /// the environment `var`.
    pub fn all(var: &dyn Fn(&str) -> Option<OsString>, euid: u32) -> Vec<CachePlace> {
        // The XDG base directory specification ignores relative paths.
        let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
        let cache = absolute("XDG_CACHE_HOME")
            .or_else(|| absolute("HOME").map(|h| h.join(".cache")))
            .ok_or_else(|| "neither XDG_CACHE_HOME nor HOME is set to an absolute path".to_string());
        let runtime = absolute("XDG_RUNTIME_DIR").ok_or_else(|| "XDG_RUNTIME_DIR is not set".to_string());
        let temp = absolute("TMPDIR").unwrap_or_else(|| PathBuf::from("/tmp"));
        vec![
            CachePlace { parent: cache, name: "textpoke".into(), make_parent: true },
            CachePlace { parent: runtime, name: "textpoke".into(), make_parent: false },
            CachePlace { parent: Ok(temp), name: format!("textpoke-{euid}"), make_parent: false },
        ]
    }
}

/// Makes `bytes` available as `<place>/<version>-<hash>/libtextpoke_agent.so`
/// in the first of `places` where that is safe, reusing a file already
/// there that holds them; `Err` holds, per place, why it was not used.
pub fn extract(bytes: &[u8], places: &[CachePlace], euid: u32) -> Result<PathBuf, Vec<String>> {
    let leaf = format!("{}-{:016x}", env!("CARGO_PKG_VERSION"), content_hash(bytes));
    let mut tried = Vec::new();
    for place in places {
        let parent = match &place.parent {
            Ok(p) => p,
            Err(why) => {
                tried.push(why.clone());
                continue;
            }
        };
        let path = private_dir(parent, place, &leaf, euid).map(|dir| dir.join(AGENT_FILE_NAME));
        match path.and_then(|path| install(&path, bytes, euid).map(|()| path)) {
            Ok(path) => return Ok(path),
            Err(why) => tried.push(format!("{}: {why}", parent.join(&place.name).display())),
        }
    }
    Err(tried)
}

/// A stable name for the bytes within this build of `textpoke` (SipHash
/// with fixed keys; another Rust version may name the same bytes
/// otherwise, which only costs another copy).
fn content_hash(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// `place/leaf/`, made if needed, after the checks of the module docs.
fn private_dir(parent: &Path, place: &CachePlace, leaf: &str, euid: u32) -> Result<PathBuf, String> {
    if place.make_parent && !parent.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
    }
    let parent = parent.canonicalize().map_err(|e| format!("{}: {e}", parent.display()))?;
    let base = parent.join(&place.name);
    if base.as_os_str().as_bytes().iter().any(|&b| b == b' ' || b == b':') {
        return Err("the path has a space or colon, which LD_PRELOAD cannot hold".into());
    }
    trusted_chain(&parent, euid)?;
    let dir = own_dir(&own_dir(&base, euid)?.join(leaf), euid)?;
    if on_noexec_mount(&dir) {
        return Err("on a filesystem mounted noexec, where the loader cannot map the agent's code".into());
    }
    Ok(dir)
}

/// Every directory from `dir` (without symbolic links) up to `/` is owned
/// by root or `euid` and not writable by others, or sticky.
fn trusted_chain(dir: &Path, euid: u32) -> Result<(), String> {
    for d in dir.ancestors() {
        let m = std::fs::symlink_metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
        if m.uid() != 0 && m.uid() != euid {
            return Err(format!("{} belongs to another user (uid {})", d.display(), m.uid()));
        }
        if m.mode() & 0o022 != 0 && m.mode() & libc::S_ISVTX == 0 {
            return Err(format!("{} is writable by other users ({:o})", d.display(), m.mode() & 0o7777));
        }
    }
    Ok(())
}

/// `dir`, made with mode 0700 if missing, which must be a directory (not
/// a link to one) owned by `euid` and not writable by others.
fn own_dir(dir: &Path, euid: u32) -> Result<PathBuf, String> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot make {}: {e}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.file_type().is_dir() {
        return Err(format!("{} is not a directory (a link?); remove it", dir.display()));
    }
    if m.uid() != euid {
        return Err(format!("{} belongs to another user (uid {}); remove it", dir.display(), m.uid()));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by other users ({:o})", dir.display(), m.mode() & 0o7777));
    }
    Ok(dir.to_path_buf())
}

fn on_noexec_mount(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statvfs to fill.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_flag & libc::ST_NOEXEC != 0
}

/// Makes `path` hold `bytes`: kept if it already does, else written anew
/// and renamed into place.
fn install(path: &Path, bytes: &[u8], euid: u32) -> Result<(), String> {
    if holds(path, bytes, euid) {
        return Ok(());
    }
    let tmp = temp_name(path);
    let written = write_new(&tmp, bytes).and_then(|()| rename_over(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(())
}

/// Whether `path` is a regular file of `euid`'s, not writable by others,
/// with exactly `bytes` in it. (`O_NONBLOCK`: a FIFO put there would
/// otherwise block the open.)
fn holds(path: &Path, bytes: &[u8], euid: u32) -> bool {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let Ok(mut f) = OpenOptions::new().read(true).custom_flags(flags).open(path) else {
        return false;
    };
    let Ok(m) = f.metadata() else { return false };
    if !m.is_file() || m.uid() != euid || m.mode() & 0o022 != 0 || m.len() != bytes.len() as u64 {
        return false;
    }
    same_content(&mut f, bytes).unwrap_or(false)
}

/// Compares a file with `bytes` in chunks (no copy of the whole file).
fn same_content(f: &mut File, bytes: &[u8]) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 1 << 16];
    let mut rest = bytes;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(rest.is_empty());
        }
        if n > rest.len() || buf[..n] != rest[..n] {
            return Ok(false);
        }
        rest = &rest[n..];
    }
}

/// A name beside `path` no other writer uses (pid and a counter; the file
/// is made with `O_EXCL` anyway).
fn temp_name(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Relaxed: the counter only needs to differ between calls.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

fn write_new(tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o500)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(tmp)?;
    f.write_all(bytes)
}

/// Renames `tmp` over `path`; a directory in the way (rename cannot
/// replace one with a file) is removed first.
fn rename_over(tmp: &Path, path: &Path) -> std::io::Result<()> {
    match std::fs::rename(tmp, path) {
        Err(_) if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) => {
            std::fs::remove_dir_all(path)?;
            std::fs::rename(tmp, path)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A fresh private directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            Scratch(crate::cmdutil::private_temp_dir("textpoke-agent-file-test").unwrap())
        }
        fn place(&self, sub: &str) -> CachePlace {
            let parent = self.0.join(sub);
            CachePlace { parent: Ok(parent), name: "textpoke".into(), make_parent: true }
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    const AGENT: &[u8] = b"\x7fELF not really an agent, but bytes to carry";

    fn ino(p: &Path) -> u64 {
        std::fs::symlink_metadata(p).unwrap().ino()
    }

    #[test]
    fn the_copy_is_written_once_then_reused_and_replaced_when_altered() {
        let s = Scratch::new();
        let places = [s.place("cache")];
        let path = extract(AGENT, &places, euid()).unwrap();
        assert_eq!(path.file_name().unwrap(), AGENT_FILE_NAME, "ctl finds the agent by its file name");
        assert_eq!(std::fs::read(&path).unwrap(), AGENT);
        assert_eq!(mode(&path), 0o500);
        let leaf = path.parent().unwrap();
        assert_eq!(mode(leaf), 0o700);
        assert_eq!(mode(leaf.parent().unwrap()), 0o700);
        assert!(leaf.file_name().unwrap().to_str().unwrap().starts_with(concat!(env!("CARGO_PKG_VERSION"), "-")));

        let first = ino(&path);
        assert_eq!(extract(AGENT, &places, euid()).unwrap(), path);
        assert_eq!(ino(&path), first, "the same file, not rewritten");

        // Each alteration is found and the file written anew: a new inode
        // (the new file is made while the old one still exists).
        let fixed = |why: &str| {
            let before = ino(&path);
            assert_eq!(extract(AGENT, &places, euid()).unwrap(), path);
            assert_eq!(std::fs::read(&path).unwrap(), AGENT, "{why}");
            assert_eq!(mode(&path), 0o500, "{why}");
            assert_ne!(ino(&path), before, "{why}: not replaced");
        };
        // Altered in place, same size: found by the comparison.
        let writable = || std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut altered = AGENT.to_vec();
        altered[10] ^= 1;
        writable();
        std::fs::write(&path, &altered).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o500)).unwrap();
        fixed("altered in place");
        writable();
        std::fs::write(&path, &AGENT[..5]).unwrap();
        fixed("cut short");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o522)).unwrap();
        fixed("writable by others");
        // Replaced by a link to a file with the same bytes, or a directory.
        let elsewhere = s.0.join("elsewhere");
        std::fs::write(&elsewhere, AGENT).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        fixed("a link");
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("sub")).unwrap();
        fixed("a directory");

        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(leaf).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [AGENT_FILE_NAME]);
    }

    #[test]
    fn another_agent_gets_another_directory() {
        let s = Scratch::new();
        let places = [s.place("cache")];
        let a = extract(AGENT, &places, euid()).unwrap();
        let b = extract(b"another agent", &places, euid()).unwrap();
        assert_ne!(a.parent(), b.parent());
        assert_eq!(std::fs::read(&a).unwrap(), AGENT, "the first one is left alone");
    }

    #[test]
    fn unsafe_places_are_skipped_for_the_next() {
        let s = Scratch::new();
        // A parent writable by others (not sticky).
        let open = s.0.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        // textpoke/ as a link to a directory of ours.
        let linked = s.0.join("linked");
        std::fs::create_dir(&linked).unwrap();
        std::fs::create_dir(s.0.join("target")).unwrap();
        std::os::unix::fs::symlink(s.0.join("target"), linked.join("textpoke")).unwrap();
        // textpoke/ writable by others.
        let loose = s.0.join("loose");
        std::fs::create_dir_all(loose.join("textpoke")).unwrap();
        std::fs::set_permissions(loose.join("textpoke"), std::fs::Permissions::from_mode(0o777)).unwrap();
        // A parent with a colon in its name.
        let colon = s.0.join("a:b");
        let missing = CachePlace { parent: Err("XDG_RUNTIME_DIR is not set".into()), ..s.place("x") };
        let places = [
            missing,
            s.place("open"),
            s.place("linked"),
            s.place("loose"),
            CachePlace { parent: Ok(colon), ..s.place("x") },
            s.place("good"),
        ];
        let e = extract(AGENT, &places, euid()).unwrap();
        assert!(e.starts_with(s.0.join("good").canonicalize().unwrap()), "{}", e.display());
        let tried = extract(AGENT, &places[..5], euid()).unwrap_err();
        assert_eq!(tried.len(), 5);
        assert!(tried[0].ends_with("XDG_RUNTIME_DIR is not set"), "{tried:?}");
        assert!(tried[1].contains("is writable by other users (777)"), "{tried:?}");
        assert!(tried[2].contains("is not a directory (a link?)"), "{tried:?}");
        assert!(tried[3].contains("textpoke is writable by other users (777)"), "{tried:?}");
        assert!(tried[4].contains("space or colon"), "{tried:?}");
        assert_eq!(std::fs::read_dir(s.0.join("target")).unwrap().count(), 0, "nothing written through the link");
    }

    #[test]
    fn a_sticky_parent_is_trusted_a_directory_of_another_user_is_not() {
        let s = Scratch::new();
        let sticky = s.0.join("sticky");
        std::fs::create_dir(&sticky).unwrap();
        std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let place = CachePlace { make_parent: false, ..s.place("sticky") };
        assert!(extract(AGENT, std::slice::from_ref(&place), euid()).is_ok());
        // The same directories, seen by another user: not theirs to use.
        let tried = extract(AGENT, &[place], euid() + 1).unwrap_err();
        assert!(tried[0].contains("belongs to another user"), "{tried:?}");
    }

    #[test]
    fn concurrent_writers_each_leave_a_complete_copy() {
        let s = Scratch::new();
        let places = [s.place("cache")];
        let big: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let paths: Vec<PathBuf> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8).map(|_| sc.spawn(|| extract(&big, &places, euid()).unwrap())).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(paths.windows(2).all(|w| w[0] == w[1]));
        assert!(std::fs::read(&paths[0]).unwrap() == big);
        let left = std::fs::read_dir(paths[0].parent().unwrap()).unwrap().count();
        assert_eq!(left, 1, "no temporary file is left behind");
    }

    #[test]
    fn places_follow_the_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| OsString::from(v))
        };
        let parents = |v: Vec<CachePlace>| v.into_iter().map(|p| (p.parent.ok(), p.name)).collect::<Vec<_>>();
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            parents(CachePlace::all(&env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/7")]), 7)),
            [
                (p("/home/u/.cache"), "textpoke".into()),
                (p("/run/user/7"), "textpoke".into()),
                (p("/tmp"), "textpoke-7".into())
            ]
        );
        let v = CachePlace::all(&env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/c"), ("TMPDIR", "/t")]), 0);
        assert_eq!(parents(v.clone())[0].0, p("/c"));
        assert_eq!(v[1].parent.as_ref().unwrap_err(), "XDG_RUNTIME_DIR is not set");
        assert_eq!(parents(v)[2], (p("/t"), "textpoke-0".into()));
        // Relative values are ignored, as the XDG specification says.
        let v = CachePlace::all(&env(&[("XDG_CACHE_HOME", "rel"), ("TMPDIR", "tmp")]), 0);
        assert!(v[0].parent.is_err());
        assert_eq!(parents(v)[2].0, p("/tmp"));
    }
}
