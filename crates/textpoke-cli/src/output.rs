//! Where a command's output goes: streamed, in bounded memory whatever the
//! trace's size, and without harming what `-o FILE` names.
//!
//! # Standard output
//!
//! Written as it is made, like any Unix filter (a failure midway leaves
//! what was written; a reader that leaves, `| head`, is not an error).
//!
//! # `-o FILE`
//!
//! FILE's symbolic links are followed first (`textpoke_sys::fs::follow_links`):
//! a link is kept and what it names is written. Then, by what FILE is:
//!
//! - **nothing, or a regular file**: the output goes to a temporary file
//!   beside it (`.NAME.tmp-PID`), renamed over it once complete; on failure
//!   the temporary file is removed and FILE is untouched. A file that was
//!   there keeps its mode, and its owner and group as far as the user may
//!   set them (root may; others keep the group if they belong to it).
//! - **a character or block device, or a FIFO**: opened as it is, never
//!   created, truncated or replaced, and written in place as the output is
//!   made. A FIFO blocks until a reader opens it, as a shell's `>` does.
//! - **a procfs link** (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`):
//!   one of this process's descriptors is written through that descriptor
//!   (its offset and `O_APPEND` hold, as when writing to standard output);
//!   any other (another process's descriptor) is opened and written in
//!   place, a regular file then cut to the output's length.
//! - **a directory, a socket**: refused, untouched.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use textpoke_sys::fs::{follow_links, kind_name};

/// Where the output goes (see the module documentation).
pub enum Output {
    /// Standard output, streamed.
    Stdout(BufWriter<io::Stdout>),
    /// A temporary file beside `path`, renamed over it once complete.
    Replace { path: PathBuf, tmp: PathBuf, w: BufWriter<File> },
    /// A device, FIFO or descriptor, open, streamed; a regular file is
    /// then cut to the output's length when `cut`.
    InPlace { shown: PathBuf, w: BufWriter<Counted<File>>, cut: bool },
}

/// A writer that counts the bytes written through it.
pub struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Buffer size of a streamed output.
const STREAM_BUFFER: usize = 256 << 10;

/// What an existing `-o` path is, for the choice of [`Output`].
enum Found {
    Missing,
    Regular(Metadata),
    Special,
    Refused(&'static str),
}

impl Output {
    /// Output to `path`, or stdout when `None`.
    pub fn create(path: Option<&Path>) -> Result<Output, String> {
        let Some(path) = path else {
            return Ok(Output::Stdout(BufWriter::with_capacity(STREAM_BUFFER, io::stdout())));
        };
        let cannot = |e: io::Error| format!("cannot write {}: {e}", path.display());
        let followed = follow_links(path).map_err(cannot)?;
        let target = followed.path;
        if followed.magic {
            if let Some(fd) = own_descriptor(&target) {
                return through_descriptor(path, fd);
            }
        }
        let found = if followed.magic {
            // Opening the link reaches the file: look at that file.
            std::fs::metadata(&target).map(|m| classify(&m)).map_err(cannot)?
        } else {
            match std::fs::symlink_metadata(&target) {
                Ok(m) => classify(&m),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Found::Missing,
                Err(e) => return Err(cannot(e)),
            }
        };
        match found {
            Found::Refused(kind) => Err(refusal(path, &target, kind)),
            // Another process's descriptor: opened anew, in place.
            _ if followed.magic => in_place(path, &target, true),
            Found::Missing => replace(path, &target, None),
            Found::Regular(m) => replace(path, &target, Some(&m)),
            Found::Special => in_place(path, &target, false),
        }
    }

    fn in_place(shown: &Path, file: File, cut: bool) -> Output {
        let w = BufWriter::with_capacity(STREAM_BUFFER, Counted { inner: file, n: 0 });
        Output::InPlace { shown: shown.to_path_buf(), w, cut }
    }

    /// The writer to write the output to.
    pub fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stdout(w) => w,
            Output::Replace { w, .. } => w,
            Output::InPlace { w, .. } => w,
        }
    }

    /// Publishes the output: writes stdout or the device, or syncs and
    /// renames the file.
    pub fn commit(self) -> Result<(), String> {
        match self {
            Output::Stdout(mut w) => match w.flush() {
                Ok(()) => Ok(()),
                // `textpoke replay | head`: the reader left, not an error.
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                Err(e) => Err(format!("cannot write to standard output: {e}")),
            },
            Output::Replace { path, tmp, w } => {
                let done = w
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .and_then(|_| std::fs::rename(&tmp, &path));
                done.map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    format!("cannot write {}: {e}", path.display())
                })
            }
            Output::InPlace { shown, w, cut } => {
                let done = w.into_inner().map_err(|e| e.into_error()).and_then(|c| {
                    let (file, n) = (c.inner, c.n);
                    if cut {
                        file.set_len(n)
                    } else {
                        Ok(())
                    }
                });
                match done {
                    Ok(()) => Ok(()),
                    // A FIFO's reader left, as with `| head`.
                    Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                    Err(e) => Err(format!("cannot write {}: {e}", shown.display())),
                }
            }
        }
    }

    /// Drops a failed output: removes the temporary file; a device or
    /// FIFO was not written to.
    pub fn abandon(self) {
        if let Output::Replace { tmp, w, .. } = self {
            drop(w);
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

fn classify(m: &Metadata) -> Found {
    let t = m.file_type();
    if t.is_file() {
        Found::Regular(m.clone())
    } else if t.is_char_device() || t.is_block_device() || t.is_fifo() {
        Found::Special
    } else {
        Found::Refused(kind_name(t))
    }
}

/// `PATH (a link to TARGET)` when they differ, else `PATH`.
fn shown(path: &Path, target: &Path) -> String {
    if path == target {
        path.display().to_string()
    } else {
        format!("{} (a link to {})", path.display(), target.display())
    }
}

fn refusal(path: &Path, target: &Path, kind: &str) -> String {
    let hint = if kind == "directory" {
        "give a file name with -o"
    } else {
        "-o writes a regular file, a device or a FIFO; give another path"
    };
    format!("{} is a {kind}; {hint}", shown(path, target))
}

/// A temporary file beside `target`, to be renamed over it; `keep` is the
/// file there now, whose mode, owner and group the new one takes.
fn replace(path: &Path, target: &Path, keep: Option<&Metadata>) -> Result<Output, String> {
    let name = target.file_name().ok_or_else(|| format!("{} has no file name", shown(path, target)))?;
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // Private until it has the old file's mode: the output is never more
    // exposed than the file it replaces.
    let mode = if keep.is_some() { 0o600 } else { 0o666 };
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot create {} (for {}): {e}", tmp.display(), shown(path, target)))?;
    if let Some(m) = keep {
        if let Err(e) = take_owner_and_mode(&f, m) {
            drop(f);
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("cannot give {} the mode of {}: {e}", tmp.display(), shown(path, target)));
        }
    }
    Ok(Output::Replace { path: target.to_path_buf(), tmp, w: BufWriter::new(f) })
}

/// Gives `f` the owner, group and mode of `m`. Only root may give a file
/// to another user and a user may only choose a group of theirs: what is
/// not allowed is left as a new file of this user has it, as an editor's
/// save does; the mode is always kept (after the owner: `chown` clears the
/// set-id bits).
fn take_owner_and_mode(f: &File, m: &Metadata) -> io::Result<()> {
    let now = f.metadata()?;
    if (now.uid(), now.gid()) != (m.uid(), m.gid())
        && std::os::unix::fs::fchown(f, Some(m.uid()), Some(m.gid())).is_err()
    {
        let _ = std::os::unix::fs::fchown(f, None, Some(m.gid()));
    }
    f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))
}

/// A device, FIFO or procfs link, opened as it is: no `O_CREAT`, no
/// `O_TRUNC`. With `cut_file`, a regular file it leads to is cut to the
/// output's length once written.
fn in_place(path: &Path, target: &Path, cut_file: bool) -> Result<Output, String> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(target)
        .map_err(|e| format!("cannot open {}: {e}", shown(path, target)))?;
    let cut = cut_file && file.metadata().is_ok_and(|m| m.is_file());
    Ok(Output::in_place(path, file, cut))
}

/// This process's descriptor `fd`, written through a duplicate of it.
fn through_descriptor(path: &Path, fd: i32) -> Result<Output, String> {
    // SAFETY: `fd` is open in this process (its procfs link exists), and
    // only borrowed for the duplicate.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let owned = borrowed.try_clone_to_owned().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(Output::in_place(path, File::from(owned), false))
}

/// The descriptor number if `link` is `…/fd/N` of this process
/// (`/proc/self/fd`, `/proc/PID/fd`, `/dev/fd` all lead to the same
/// directory).
fn own_descriptor(link: &Path) -> Option<i32> {
    let n: i32 = link.file_name()?.to_str()?.parse().ok()?;
    let dir = std::fs::canonicalize(link.parent()?).ok()?;
    let mine = std::fs::canonicalize("/proc/self/fd").ok()?;
    (dir == mine).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_descriptors_are_recognised() {
        assert_eq!(own_descriptor(Path::new("/proc/self/fd/1")), Some(1));
        assert_eq!(own_descriptor(Path::new("/dev/fd/2")), Some(2));
        assert_eq!(own_descriptor(&PathBuf::from(format!("/proc/{}/fd/0", std::process::id()))), Some(0));
        assert_eq!(own_descriptor(Path::new("/proc/1/fd/1")), None);
        assert_eq!(own_descriptor(Path::new("/proc/self/exe")), None);
    }
}
