//! `textpoke dump -o FILE` leaves what FILE is as it was (issue #10,
//! defect 7): a character device, a FIFO and a symbolic link stay what
//! they are, a regular file keeps its mode, the command's own descriptors
//! (`/proc/self/fd/N`) are written through, and what cannot be written
//! safely is refused. The device is a node this test makes in its own
//! directory (a copy of /dev/null's numbers); /dev itself is never
//! touched.

use std::fs::Permissions;
use std::io::Read;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use textpoke_record::{self as record, RecorderConfig};

fn tmpdir(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dump-output").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small trace, recorded once for all tests (the recorder is
/// process-wide).
fn trace() -> &'static str {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tmpdir("trace");
        let (outer, inner) = (record::register_function(0xa000, "outer"), record::register_function(0xa100, "inner"));
        let rec = record::start(RecorderConfig::new(&dir)).unwrap();
        for _ in 0..10 {
            assert!(record::entry(outer, 0) && record::entry(inner, 1));
            assert!(record::exit(inner, 1) && record::exit(outer, 0));
        }
        rec.stop().unwrap();
        dir
    })
    .to_str()
    .unwrap()
}

fn dump(format: &str, out: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_textpoke"));
    c.args(["dump", format, "-i", trace(), "-o"]).arg(out).stdin(Stdio::null());
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn succeeds(o: &Output) {
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", text(&o.stderr));
}

/// The folded stacks as `dump` prints them on standard output.
fn folded() -> Vec<u8> {
    let o = Command::new(env!("CARGO_BIN_EXE_textpoke")).args(["dump", "--folded", "-i", trace()]).output().unwrap();
    succeeds(&o);
    assert!(!o.stdout.is_empty());
    o.stdout
}

/// No temporary file is left in `dir`.
fn no_leftovers(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_character_device_stays_a_device() {
    let dir = tmpdir("chardev");
    let node = dir.join("null");
    let c = std::ffi::CString::new(node.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; the numbers of /dev/null (1, 3).
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(made, 0, "mknod needs root: {}", std::io::Error::last_os_error());
    succeeds(&dump("--chrome", &node).output().unwrap());
    let m = std::fs::symlink_metadata(&node).unwrap();
    assert!(m.file_type().is_char_device(), "{node:?} is now a {:?}", m.file_type());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    no_leftovers(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_fifo_stays_a_fifo_and_its_reader_gets_the_output() {
    let dir = tmpdir("fifo");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // The reader opens first, without blocking, so that the writer's open
    // does not wait; reading until the writer has exited and closed.
    let mut reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    let mut child = dump("--folded", &fifo).stderr(Stdio::piped()).spawn().unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        match reader.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => match child.try_wait().unwrap() {
                Some(s) => {
                    // Whatever the writer left in the pipe before exiting.
                    while let Ok(n @ 1..) = reader.read(&mut buf) {
                        got.extend_from_slice(&buf[..n]);
                    }
                    break s;
                }
                None if Instant::now() > deadline => panic!("dump -o FIFO did not finish"),
                None => std::thread::sleep(Duration::from_millis(5)),
            },
        }
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    assert_eq!(text(&got), text(&folded()), "the reader got the output");
    no_leftovers(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_regular_file_keeps_its_mode() {
    let dir = tmpdir("mode");
    let file = dir.join("out.folded");
    std::fs::write(&file, "old contents, longer than the new ones ".repeat(100)).unwrap();
    std::fs::set_permissions(&file, Permissions::from_mode(0o640)).unwrap();
    succeeds(&dump("--folded", &file).output().unwrap());
    assert_eq!(std::fs::read(&file).unwrap(), folded());
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o7777, 0o640);
    no_leftovers(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_symlink_stays_a_link_and_what_it_names_is_written() {
    let dir = tmpdir("symlink");
    std::fs::create_dir(dir.join("real")).unwrap();
    let target = dir.join("real/out.folded");
    std::fs::write(&target, "old").unwrap();
    std::fs::set_permissions(&target, Permissions::from_mode(0o600)).unwrap();
    let link = dir.join("link");
    symlink("real/out.folded", &link).unwrap();
    let chain = dir.join("chain");
    symlink(&link, &chain).unwrap();
    for path in [&link, &chain] {
        std::fs::write(&target, "old").unwrap();
        succeeds(&dump("--folded", path).output().unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), folded(), "through {path:?}");
    }
    assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("real/out.folded"), "the link is kept");
    assert_eq!(std::fs::read_link(&chain).unwrap(), link);
    assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o7777, 0o600, "the target keeps its mode");
    // A dangling link: what it names is created, the link kept.
    let dangling = dir.join("dangling");
    symlink("real/new.folded", &dangling).unwrap();
    succeeds(&dump("--folded", &dangling).output().unwrap());
    assert_eq!(std::fs::read(dir.join("real/new.folded")).unwrap(), folded());
    assert!(std::fs::symlink_metadata(&dangling).unwrap().file_type().is_symlink());
    no_leftovers(&dir);
    no_leftovers(&dir.join("real"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `dump -o PATH`, which must fail with `needles` in its message.
fn refused(path: &Path, needles: &[&str]) {
    let o = dump("--folded", path).output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err:?}");
    }
}

#[test]
fn what_cannot_be_written_safely_is_refused() {
    let dir = tmpdir("refused");
    let sock = dir.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    refused(&sock, &["is a socket", "-o writes a regular file, a device or a FIFO"]);
    assert!(std::fs::symlink_metadata(&sock).unwrap().file_type().is_socket());
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    refused(&sub, &["is a directory"]);
    symlink("sub", dir.join("to-sub")).unwrap();
    refused(&dir.join("to-sub"), &["to-sub (a link to", "is a directory"]);
    assert!(std::fs::symlink_metadata(dir.join("to-sub")).unwrap().file_type().is_symlink());
    symlink("loop", dir.join("loop")).unwrap();
    refused(&dir.join("loop"), &["Too many levels of symbolic links"]);
    no_leftovers(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_strangers_link_in_a_sticky_directory_is_not_followed() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test plants a link of another user, which needs root");
    let dir = tmpdir("sticky");
    std::fs::set_permissions(&dir, Permissions::from_mode(0o1777)).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let planted = dir.join("planted");
    symlink(&victim, &planted).unwrap();
    std::os::unix::fs::lchown(&planted, Some(4242), Some(4242)).unwrap();
    refused(&planted, &["fs.protected_symlinks"]);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn its_own_descriptors_are_written_through() {
    let dir = tmpdir("fd");
    let link = dir.join("stdout");
    symlink("/proc/self/fd/1", &link).unwrap();
    // A pipe.
    let o = dump("--folded", &link).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), text(&folded()));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    // A file opened for appending (`>> log`): appended to, as on stdout.
    let log = dir.join("log");
    std::fs::write(&log, "previous line\n").unwrap();
    let f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let o = dump("--folded", &link).stdout(f).output().unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), format!("previous line\n{}", text(&folded())));
    no_leftovers(&dir);
    let _ = std::fs::remove_dir_all(dir);
}
