//! A whole trace directory in one file: the reader corpus's format.
//!
//! A reader input is a directory (`meta.json`, `symbols.jsonl`,
//! `counts.json`, the threads' event files, `child-<pid>/` directories),
//! and what the fuzzer changes includes the kind of each entry (a FIFO, a
//! symbolic link or a directory where a file should be). A corpus entry
//! (`*.tpf`) holds all of it:
//!
//! ```text
//! textpoke-fuzz trace 1
//! file 123 meta.json
//! <123 bytes>
//! dir 0 child-42
//!
//! fifo 0 tid-7.bin
//!
//! symlink 9 counts.json
//! /dev/zero
//! socket 0 child-42/meta.json
//!
//! ```
//!
//! Each entry is a line `KIND LENGTH PATH`, then `LENGTH` bytes (a file's
//! contents or a link's target; nothing for the other kinds), then a
//! newline, so that text files stay readable in the corpus. `PATH` is
//! relative, `/`-separated, without `.`, `..` or empty components.
//! Entries are created in order ([`TraceInput::write_to`]); parents that
//! are not listed are created as directories.

use std::path::{Component, Path};

/// The first line of a container.
pub const MAGIC: &str = "textpoke-fuzz trace 1\n";

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Fifo,
    Socket,
    Symlink(String),
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::File(_) => "file",
            Kind::Dir => "dir",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::Symlink(_) => "symlink",
        }
    }
}

/// One entry of a trace directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Relative path inside the directory.
    pub path: String,
    pub kind: Kind,
}

/// A trace directory as data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceInput {
    pub entries: Vec<Entry>,
}

/// Whether `p` is a relative path of plain components.
pub fn plain_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && !p.contains('\n')
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && Path::new(p).components().all(|c| matches!(c, Component::Normal(_)))
}

impl TraceInput {
    /// Parses a container; says what is wrong and where.
    pub fn parse(bytes: &[u8]) -> Result<TraceInput, String> {
        let mut rest =
            bytes.strip_prefix(MAGIC.as_bytes()).ok_or("not a textpoke-fuzz trace container (first line)")?;
        let mut entries = Vec::new();
        while !rest.is_empty() {
            let at = bytes.len() - rest.len();
            let nl = rest.iter().position(|&b| b == b'\n').ok_or(format!("byte {at}: entry line without newline"))?;
            let line = std::str::from_utf8(&rest[..nl]).map_err(|_| format!("byte {at}: entry line is not UTF-8"))?;
            let mut f = line.splitn(3, ' ');
            let (kind, len, path) = match (f.next(), f.next(), f.next()) {
                (Some(k), Some(l), Some(p)) => (k, l, p),
                _ => return Err(format!("byte {at}: expected `KIND LENGTH PATH`, found {line:?}")),
            };
            let len: usize = len.parse().map_err(|_| format!("byte {at}: bad length {len:?}"))?;
            if !plain_path(path) {
                return Err(format!("byte {at}: path {path:?} is not a plain relative path"));
            }
            rest = &rest[nl + 1..];
            if rest.len() < len + 1 || rest[len] != b'\n' {
                return Err(format!("byte {at}: entry {path} holds fewer than {len} bytes and a newline"));
            }
            let data = &rest[..len];
            rest = &rest[len + 1..];
            let kind = match kind {
                "file" => Kind::File(data.to_vec()),
                "symlink" => Kind::Symlink(
                    String::from_utf8(data.to_vec()).map_err(|_| format!("link {path}: target is not UTF-8"))?,
                ),
                "dir" | "fifo" | "socket" if len != 0 => {
                    return Err(format!("byte {at}: a {kind} entry has no contents (length {len})"))
                }
                "dir" => Kind::Dir,
                "fifo" => Kind::Fifo,
                "socket" => Kind::Socket,
                _ => return Err(format!("byte {at}: unknown kind {kind:?}")),
            };
            entries.push(Entry { path: path.to_string(), kind });
        }
        Ok(TraceInput { entries })
    }

    /// The container's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.as_bytes().to_vec();
        for e in &self.entries {
            let data: &[u8] = match &e.kind {
                Kind::File(d) => d,
                Kind::Symlink(t) => t.as_bytes(),
                _ => &[],
            };
            out.extend_from_slice(format!("{} {} {}\n", e.kind.name(), data.len(), e.path).as_bytes());
            out.extend_from_slice(data);
            out.push(b'\n');
        }
        out
    }

    /// Total bytes of the files.
    pub fn size(&self) -> usize {
        self.entries.iter().map(|e| if let Kind::File(d) = &e.kind { d.len() } else { 0 }).sum()
    }

    /// The entry at `path`.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.path == path)
    }

    /// The contents of the file at `path`.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        match &self.get(path)?.kind {
            Kind::File(d) => Some(d),
            _ => None,
        }
    }

    /// The contents of the file at `path`, to change.
    pub fn file_mut(&mut self, path: &str) -> Option<&mut Vec<u8>> {
        self.entries.iter_mut().find(|e| e.path == path).and_then(|e| match &mut e.kind {
            Kind::File(d) => Some(d),
            _ => None,
        })
    }

    /// Sets the file at `path` (replacing any entry there).
    pub fn set_file(&mut self, path: &str, data: Vec<u8>) {
        match self.entries.iter_mut().find(|e| e.path == path) {
            Some(e) => e.kind = Kind::File(data),
            None => self.entries.push(Entry { path: path.to_string(), kind: Kind::File(data) }),
        }
    }

    /// Reads a directory tree (regular files, directories, links, FIFOs
    /// and sockets; at most `max_bytes` of file contents in all).
    pub fn from_dir(dir: &Path, max_bytes: u64) -> Result<TraceInput, String> {
        let mut input = TraceInput::default();
        let mut budget = max_bytes;
        walk(dir, "", &mut input, &mut budget, 0)?;
        Ok(input)
    }

    /// Creates the tree under `root`, which must not exist. Entries that
    /// cannot be made (a path under a file, a socket path too long for
    /// `bind`) are skipped: a mutated input may ask for them, and what is
    /// made from it is the same every time.
    pub fn write_to(&self, root: &Path) -> std::io::Result<()> {
        std::fs::create_dir(root)?;
        for e in &self.entries {
            let p = root.join(&e.path);
            if let Some(parent) = p.parent() {
                if std::fs::create_dir_all(parent).is_err() {
                    continue;
                }
            }
            let _ = match &e.kind {
                Kind::File(d) => std::fs::write(&p, d),
                Kind::Dir => std::fs::create_dir(&p),
                Kind::Symlink(t) => std::os::unix::fs::symlink(t, &p),
                Kind::Fifo => mkfifo(&p),
                Kind::Socket => std::os::unix::net::UnixListener::bind(&p).map(drop),
            };
        }
        Ok(())
    }
}

fn mkfifo(p: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn walk(dir: &Path, prefix: &str, input: &mut TraceInput, budget: &mut u64, level: usize) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    if level > 64 {
        return Err(format!("{}: directories nested too deep", dir.display()));
    }
    let rd = std::fs::read_dir(dir).map_err(|e| format!("cannot read directory {}: {e}", dir.display()))?;
    let mut names: Vec<_> = rd.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        let name = name.to_str().ok_or(format!("{}: a name that is not UTF-8", dir.display()))?.to_string();
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let p = dir.join(&name);
        let m = std::fs::symlink_metadata(&p).map_err(|e| format!("cannot inspect {}: {e}", p.display()))?;
        let t = m.file_type();
        let kind = if t.is_symlink() {
            let target = std::fs::read_link(&p).map_err(|e| format!("cannot read link {}: {e}", p.display()))?;
            Kind::Symlink(target.to_str().ok_or(format!("{}: link target not UTF-8", p.display()))?.to_string())
        } else if t.is_dir() {
            input.entries.push(Entry { path: rel.clone(), kind: Kind::Dir });
            walk(&p, &rel, input, budget, level + 1)?;
            continue;
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else if t.is_file() {
            if m.len() > *budget {
                return Err(format!("{}: more file data than the limit", p.display()));
            }
            *budget -= m.len();
            Kind::File(std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?)
        } else {
            return Err(format!("{}: a device; a container holds no devices", p.display()));
        };
        input.entries.push(Entry { path: rel, kind });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containers_round_trip_and_refuse_escapes() {
        let t = TraceInput {
            entries: vec![
                Entry { path: "meta.json".into(), kind: Kind::File(b"{\n}".to_vec()) },
                Entry { path: "child-1".into(), kind: Kind::Dir },
                Entry { path: "child-1/tid-1.bin".into(), kind: Kind::Fifo },
                Entry { path: "x".into(), kind: Kind::Symlink("/dev/zero".into()) },
                Entry { path: "s".into(), kind: Kind::Socket },
                Entry { path: "empty".into(), kind: Kind::File(Vec::new()) },
            ],
        };
        assert_eq!(TraceInput::parse(&t.to_bytes()).unwrap(), t);
        for bad in ["file 1 ../x\na\n", "file 1 /x\na\n", "file 1 a//b\na\n", "file 5 a\nab\n", "dir 1 a\nx\n"] {
            let b = [MAGIC.as_bytes(), bad.as_bytes()].concat();
            assert!(TraceInput::parse(&b).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn containers_make_and_read_directories() {
        let base = std::env::temp_dir().join(format!("tpf-container-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let t = TraceInput {
            entries: vec![
                Entry { path: "a/b".into(), kind: Kind::File(b"data".to_vec()) },
                Entry { path: "f".into(), kind: Kind::Fifo },
                Entry { path: "l".into(), kind: Kind::Symlink("a/b".into()) },
                Entry { path: "s".into(), kind: Kind::Socket },
            ],
        };
        t.write_to(&base).unwrap();
        let back = TraceInput::from_dir(&base, 1 << 20).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        let mut want = t.clone();
        want.entries.insert(0, Entry { path: "a".into(), kind: Kind::Dir });
        assert_eq!(back, want);
    }
}
