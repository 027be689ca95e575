//! Where a path that the user names for output leads (`dump -o FILE`,
//! `record -o DIR`).
//!
//! # Links
//!
//! Writing such a path safely means acting on what it names, never on a
//! symbolic link in front of it: renaming a new file over the link, or
//! moving the link aside, would replace the link and leave its target
//! stale. [`follow_links`] follows the links at the path's last component
//! (a link to a link...), as `open` would, and gives the path that a
//! `rename` or `mkdir` must act on. Two kinds of link are not followed by
//! reading them:
//!
//! - **procfs links** (`/proc/self/fd/N`, and `/dev/stdout`, which is a
//!   link to `/proc/self/fd/1`): "magic" links whose text is not a path
//!   (`pipe:[1234]`, `/tmp/x (deleted)`); only opening them reaches the
//!   file. They are returned as they are, marked [`Followed::magic`].
//! - **a link in a sticky world-writable directory** (`/tmp`) owned by
//!   neither the user nor the directory's owner: anyone may plant one
//!   there, aimed at a file that root is about to write. The kernel does
//!   not follow them (`fs.protected_symlinks`), and neither does this.

use std::fs::{FileType, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// As the kernel's `MAXSYMLINKS`.
const MAX_LINKS: usize = 40;

/// What a path leads to once its links are followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Followed {
    /// The path whose last component is no symbolic link (it may not
    /// exist), or a procfs link.
    pub path: PathBuf,
    /// `path` is a procfs link: open it to reach the file, act on nothing
    /// else.
    pub magic: bool,
}

/// Follows the symbolic links at the last component of `path` (see the
/// [module documentation](self)). A missing path, or a link to one, is no
/// error: the path it would be is returned.
pub fn follow_links(path: &Path) -> io::Result<Followed> {
    let mut path = path.to_path_buf();
    for _ in 0..=MAX_LINKS {
        let link = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => m,
            Ok(_) => return Ok(Followed { path, magic: false }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Followed { path, magic: false }),
            Err(e) => return Err(e),
        };
        let dir = parent_dir(&path);
        if on_procfs(&dir)? {
            return Ok(Followed { path, magic: true });
        }
        check_protected(&path, &link, &dir)?;
        // An absolute target replaces `dir`; a relative one is from it.
        path = dir.join(std::fs::read_link(&path)?);
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// The directory holding `path`'s last component.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        Some(_) => PathBuf::from("."),
        None => PathBuf::from("/"),
    }
}

/// Whether `dir` is on procfs (`statfs`).
fn on_procfs(dir: &Path) -> io::Result<bool> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a valid out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type == libc::PROC_SUPER_MAGIC)
}

/// Refuses to follow `link` (in `dir`) where the kernel's
/// `fs.protected_symlinks` would: in a sticky world-writable directory, a
/// link owned by neither this user nor the directory's owner.
fn check_protected(link: &Path, meta: &Metadata, dir: &Path) -> io::Result<()> {
    let d = std::fs::metadata(dir)?;
    let sticky_world_writable = d.mode() & 0o1002 == 0o1002;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !sticky_world_writable || meta.uid() == me || meta.uid() == d.uid() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} is a symbolic link of user {} in the sticky, world-writable directory {}; such a link is not \
             followed (as the kernel's fs.protected_symlinks does), since anyone may plant one: give its target instead",
            link.display(),
            meta.uid(),
            dir.display()
        ),
    ))
}

/// A file type for people: "regular file", "directory", "socket"...
pub fn kind_name(t: FileType) -> &'static str {
    if t.is_file() {
        "regular file"
    } else if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("textpoke-sys-fs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn plain(path: PathBuf) -> Followed {
        Followed { path, magic: false }
    }

    #[test]
    fn links_are_followed_to_what_they_name() {
        let d = tmp("follow");
        std::fs::write(d.join("file"), "x").unwrap();
        symlink("file", d.join("rel")).unwrap();
        symlink(d.join("rel"), d.join("abs")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        symlink("../file", d.join("sub/up")).unwrap();
        symlink("missing", d.join("dangling")).unwrap();
        assert_eq!(follow_links(&d.join("file")).unwrap(), plain(d.join("file")));
        assert_eq!(follow_links(&d.join("abs")).unwrap(), plain(d.join("file")));
        assert_eq!(follow_links(&d.join("sub/up")).unwrap(), plain(d.join("sub/../file")));
        assert_eq!(follow_links(&d.join("dangling")).unwrap(), plain(d.join("missing")));
        assert_eq!(follow_links(&d.join("nothing")).unwrap(), plain(d.join("nothing")));
        symlink("loop2", d.join("loop1")).unwrap();
        symlink("loop1", d.join("loop2")).unwrap();
        assert_eq!(follow_links(&d.join("loop1")).unwrap_err().raw_os_error(), Some(libc::ELOOP));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn procfs_links_are_not_read() {
        let d = tmp("proc");
        symlink("/proc/self/fd/1", d.join("out")).unwrap();
        let f = follow_links(&d.join("out")).unwrap();
        assert_eq!(f, Followed { path: PathBuf::from("/proc/self/fd/1"), magic: true });
        let f = follow_links(Path::new("/dev/stdout")).unwrap();
        assert!(f.magic && f.path.starts_with("/proc"), "{f:?}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_strangers_link_in_a_sticky_directory_is_not_followed() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return; // giving the link to another user needs root
        }
        let d = tmp("sticky");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
        std::fs::write(d.join("target"), "x").unwrap();
        symlink("target", d.join("planted")).unwrap();
        std::os::unix::fs::lchown(d.join("planted"), Some(4242), None).unwrap();
        let e = follow_links(&d.join("planted")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("fs.protected_symlinks"), "{e}");
        // The directory's owner's links, and one's own, are followed.
        std::os::unix::fs::lchown(d.join("planted"), Some(0), None).unwrap();
        assert_eq!(follow_links(&d.join("planted")).unwrap(), plain(d.join("target")));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn kinds_have_names() {
        assert_eq!(kind_name(std::fs::metadata("/").unwrap().file_type()), "directory");
        assert_eq!(kind_name(std::fs::metadata("/dev/null").unwrap().file_type()), "character device");
    }
}
