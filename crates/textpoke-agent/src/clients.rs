//! The control socket's connections, served together by the agent thread
//! without ever blocking on one of them (the protocol is in
//! [`textpoke_control`]).
//!
//! # Why not one at a time
//!
//! The agent thread has other work that cannot wait: a program thread in
//! `_exit` waits for it to finish the trace, a stop signal must be acted
//! on, a `dlopen` must be followed. A blocking read of one client would
//! hold all of that (and every other client) for as long as the client
//! likes. A thread per client would put an unbounded number of threads
//! into the traced program. So the agent thread polls every connection
//! along with its other descriptors, and each connection is a small state
//! machine with its own buffers and deadlines.
//!
//! # A round
//!
//! After each `poll` the agent thread:
//!
//! 1. **Notes** what `poll` said of each connection ([`Clients::note_polled`]).
//! 2. **Accepts** new connections, at most [`cap`] per round, so that a
//!    flood of connections cannot starve the ones already accepted. Peers
//!    of another uid (root excepted) get an `error` and are closed. When
//!    the table is full, the least recently active connection (one with
//!    nothing half-read or unsent if there is one) gets `error too many
//!    connections` and is closed to make room: a newcomer is always
//!    served, and whoever holds the table idle is the one to lose it.
//! 3. **Serves** each connection ([`Conn::step`]): sends what is left of
//!    its reply; reads one chunk if it has no reply waiting and no
//!    complete line buffered; answers one complete line. One line per
//!    connection per round keeps the round's work bounded and fair; a
//!    connection with more lines buffered makes the next `poll` return at
//!    once ([`Clients::timeout`]).
//!
//! # Bounds
//!
//! - **Connections:** at most [`cap`]: [`MAX_CLIENTS`], or fewer under a
//!   low `RLIMIT_NOFILE` (one 32nd of it), so that the agent never takes a
//!   noticeable part of the program's descriptors. Each is moved above the
//!   numbers programs use (see `fds`); one that cannot be is refused.
//! - **Memory:** a connection is not read while its reply is unsent or a
//!   complete line waits (a client that does not read its replies stops
//!   being read: back-pressure), so it holds at most one read chunk beyond
//!   one line, and one reply.
//! - **Line length:** a line longer than [`MAX_REQUEST_LINE`] gets an
//!   `error` and the connection is closed (what follows cannot be told
//!   apart from the rest of the long line).
//! - **Time:** half a line must be completed within
//!   [`PARTIAL_LINE_TIMEOUT`], a reply taken by the client within
//!   [`SEND_TIMEOUT`]. A connection idle between requests has no deadline:
//!   a monitor may keep one open, until a full table needs its place.
//!
//! # Errors
//!
//! Every malformed line gets `error ...` and the connection goes on (see
//! [`Request::parse_bytes`]). Input that ends inside a line gets an
//! `error` before the connection is closed.

use crate::fds::{nofile_limit, Fd};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};
use textpoke_control::{Reply, Request, MAX_REQUEST_LINE};

/// The most connections served at once (fewer under a low
/// `RLIMIT_NOFILE`: see [`cap`]).
pub(crate) const MAX_CLIENTS: usize = 32;

/// How long half a request line may wait for its end.
pub(crate) const PARTIAL_LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reply may wait for the client to read it.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes read from a connection per round.
const READ_CHUNK: usize = 4096;

/// How many connections the agent serves at once in this process: one
/// 32nd of the descriptor limit, at most [`MAX_CLIENTS`], at least one.
pub(crate) fn cap() -> usize {
    (nofile_limit() / 32).clamp(1, MAX_CLIENTS as u64) as usize
}

/// One connection.
struct Conn {
    fd: Fd,
    /// Bytes received, not yet taken as requests.
    input: Vec<u8>,
    /// Reply bytes not yet sent.
    output: Vec<u8>,
    /// What `poll` said of it this round (`POLLIN` for one accepted this
    /// round: its request may be there already).
    revents: i16,
    /// The last time a byte came in or went out.
    active: Instant,
    /// Since when `input` holds half a line.
    partial_since: Option<Instant>,
    /// Since when `output` waits for the client to read.
    unsent_since: Option<Instant>,
    /// The client will send nothing more.
    eof: bool,
    /// Close once `output` is sent (after an error that ends the
    /// connection).
    closing: bool,
}

/// What a read gave.
enum Read {
    Data,
    Nothing,
    End,
    Failed,
}

impl Conn {
    fn new(fd: Fd, now: Instant) -> Conn {
        Conn {
            fd,
            input: Vec::new(),
            output: Vec::new(),
            revents: libc::POLLIN,
            active: now,
            partial_since: None,
            unsent_since: None,
            eof: false,
            closing: false,
        }
    }

    fn has_line(&self) -> bool {
        self.input.contains(&b'\n')
    }

    /// Nothing half-read, nothing unsent.
    fn idle(&self) -> bool {
        self.input.is_empty() && self.output.is_empty()
    }

    /// A complete line waits and can be answered now.
    fn ready(&self) -> bool {
        self.output.is_empty() && !self.closing && self.has_line()
    }

    fn wants_read(&self) -> bool {
        self.output.is_empty() && !self.closing && !self.eof && !self.has_line()
    }

    /// The events to poll for.
    fn events(&self) -> i16 {
        if !self.output.is_empty() {
            libc::POLLOUT
        } else if self.wants_read() {
            libc::POLLIN
        } else {
            0 // errors and hang-ups are reported anyway
        }
    }

    /// One round (see the module docs, step 3). Whether to keep it.
    fn step(&mut self, now: Instant, handle: &mut dyn FnMut(Request) -> Reply) -> bool {
        if !self.fd.ours() {
            return false; // the program closed it: forget it (not closed)
        }
        let rev = std::mem::take(&mut self.revents);
        if rev & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 && !self.flush(now) {
            return false;
        }
        if self.wants_read() && rev & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
            match self.read(now) {
                Read::Failed => return false,
                Read::End => self.eof = true,
                Read::Data | Read::Nothing => {}
            }
        }
        self.answer_one(handle);
        if !self.output.is_empty() && !self.flush(now) {
            return false;
        }
        self.check_deadlines(now) && !(self.closing && self.output.is_empty())
    }

    /// Sends what it can of `output`; false if the connection failed.
    fn flush(&mut self, now: Instant) -> bool {
        while !self.output.is_empty() {
            match send(self.fd.raw(), &self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                    self.active = now;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        self.unsent_since = if self.output.is_empty() { None } else { self.unsent_since.or(Some(now)) };
        true
    }

    fn read(&mut self, now: Instant) -> Read {
        let mut buf = [0u8; READ_CHUNK];
        // SAFETY: receiving into a local buffer of its length from our own
        // socket (checked by `step`), without blocking.
        let n = unsafe { libc::recv(self.fd.raw(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Read::Nothing,
                _ => Read::Failed,
            };
        }
        if n == 0 {
            return Read::End;
        }
        self.input.extend_from_slice(&buf[..n as usize]);
        self.active = now;
        Read::Data
    }

    /// Answers the first buffered line, or the error that ends the
    /// connection (a line too long, the input ending inside a line).
    fn answer_one(&mut self, handle: &mut dyn FnMut(Request) -> Reply) {
        if !self.output.is_empty() || self.closing {
            return;
        }
        let end = self.input.iter().position(|&b| b == b'\n');
        if end.unwrap_or(self.input.len()) > MAX_REQUEST_LINE {
            let msg = format!("request line too long (over {MAX_REQUEST_LINE} bytes); the connection is closed");
            return self.fail(&msg);
        }
        match end {
            Some(end) => {
                let line: Vec<u8> = self.input.drain(..=end).collect();
                let reply = match Request::parse_bytes(&line) {
                    Ok(req) => handle(req),
                    Err(e) => Reply::error(e.to_string()),
                };
                self.output.extend_from_slice(reply.to_text().as_bytes());
            }
            None if self.eof && !self.input.is_empty() => {
                self.fail("the input ended in the middle of a request line (no newline); the connection is closed")
            }
            None if self.eof => self.closing = true,
            None => {}
        }
    }

    /// Replies `error MSG` and closes once it is sent.
    fn fail(&mut self, msg: &str) {
        self.input.clear();
        self.output.extend_from_slice(Reply::error(msg).to_text().as_bytes());
        self.closing = true;
    }

    /// Whether the connection is within its deadlines; half a line too
    /// old gets an error (and the connection closes once it is sent).
    fn check_deadlines(&mut self, now: Instant) -> bool {
        let partial = !self.input.is_empty() && !self.has_line() && !self.closing;
        self.partial_since = if partial { self.partial_since.or(Some(now)) } else { None };
        if self.partial_since.is_some_and(|t| now.duration_since(t) >= PARTIAL_LINE_TIMEOUT) {
            let secs = PARTIAL_LINE_TIMEOUT.as_secs();
            self.fail(&format!("incomplete request: no newline within {secs} s; the connection is closed"));
            self.partial_since = None;
            if !self.flush(now) {
                return false;
            }
        }
        self.unsent_since.is_none_or(|t| now.duration_since(t) < SEND_TIMEOUT)
    }

    /// When this connection needs a round without any event.
    fn deadline(&self) -> Option<Instant> {
        let partial = self.partial_since.map(|t| t + PARTIAL_LINE_TIMEOUT);
        let unsent = self.unsent_since.map(|t| t + SEND_TIMEOUT);
        partial.into_iter().chain(unsent).min()
    }
}

/// Sends from `buf` without blocking or raising `SIGPIPE` in the program.
fn send(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        // SAFETY: sending from a valid buffer of its length.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends `reply` if the socket takes it at once, for a connection about
/// to be closed.
fn send_parting(fd: RawFd, reply: &Reply) {
    let _ = send(fd, reply.to_text().as_bytes());
}

/// Whether the peer of `fd` runs as this process's user, or root.
fn peer_allowed(fd: RawFd) -> bool {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one struct ucred of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    // SAFETY: no preconditions.
    let me = unsafe { libc::geteuid() };
    rc == 0 && (cred.uid == me || cred.uid == 0)
}

/// The connections of the control socket.
#[derive(Default)]
pub(crate) struct Clients {
    conns: Vec<Conn>,
}

impl Clients {
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Appends one `pollfd` per connection, in order (a connection the
    /// program took over is left out: -1 is ignored by `poll`).
    pub fn poll_fds(&self, out: &mut Vec<libc::pollfd>) {
        for c in &self.conns {
            let fd = if c.fd.ours() { c.fd.raw() } else { -1 };
            out.push(libc::pollfd { fd, events: c.events(), revents: 0 });
        }
    }

    /// Takes what `poll` said: `polled` holds the entries [`poll_fds`]
    /// appended, in order.
    ///
    /// [`poll_fds`]: Clients::poll_fds
    pub fn note_polled(&mut self, polled: &[libc::pollfd]) {
        for (c, p) in self.conns.iter_mut().zip(polled) {
            c.revents = p.revents;
        }
    }

    /// How long `poll` may wait for the connections' sake: 0 when a
    /// complete line waits, else until the nearest deadline.
    pub fn timeout(&self, now: Instant) -> Option<Duration> {
        if self.conns.iter().any(Conn::ready) {
            return Some(Duration::ZERO);
        }
        self.conns.iter().filter_map(Conn::deadline).min().map(|t| t.saturating_duration_since(now))
    }

    /// Accepts the connections waiting on `listener` (at most [`cap`]).
    /// False when accepting fails for want of descriptors or memory: the
    /// connection stays in the backlog and the listener stays readable,
    /// so the caller must not poll it again at once (it would spin).
    pub fn accept(&mut self, listener: &Fd, now: Instant) -> bool {
        for _ in 0..cap() {
            // SAFETY: accept4 on our listening socket (checked by the
            // caller); no address wanted.
            let fd = unsafe {
                libc::accept4(
                    listener.raw(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                match e {
                    Some(libc::EINTR | libc::ECONNABORTED) => continue,
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => return false,
                    _ => return true, // none left
                }
            }
            // SAFETY: a new descriptor, owned here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if !peer_allowed(fd.as_raw_fd()) {
                send_parting(fd.as_raw_fd(), &Reply::error("refused: you are not this process's user"));
                continue;
            }
            self.add(fd, now);
        }
        true
    }

    /// Serves a new connection, making room for it if the table is full.
    fn add(&mut self, fd: OwnedFd, now: Instant) {
        let fd = match Fd::adopt_high(fd) {
            Ok(fd) => fd,
            Err(fd) => {
                let msg = "the traced program has no descriptor to spare above its low numbers (RLIMIT_NOFILE); \
                           try again later";
                return send_parting(fd.as_raw_fd(), &Reply::error(msg));
            }
        };
        let cap = cap();
        while self.conns.len() >= cap && self.evict() {}
        self.conns.push(Conn::new(fd, now));
    }

    /// Closes the least recently active connection, preferring one with
    /// nothing half-read or unsent. Whether there was one.
    fn evict(&mut self) -> bool {
        let any_idle = self.conns.iter().any(Conn::idle);
        let Some((i, _)) =
            self.conns.iter().enumerate().filter(|(_, c)| c.idle() || !any_idle).min_by_key(|(_, c)| c.active)
        else {
            return false;
        };
        let c = self.conns.swap_remove(i);
        if c.fd.ours() {
            let msg =
                format!("too many connections (at most {}); this one, the least recently active, is closed", cap());
            send_parting(c.fd.raw(), &Reply::error(msg));
        }
        true
    }

    /// Serves every connection once (see the module docs, step 3).
    pub fn serve(&mut self, now: Instant, handle: &mut dyn FnMut(Request) -> Reply) {
        self.conns.retain_mut(|c| c.step(now, handle));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write};
    use std::os::unix::net::UnixStream;

    /// A connection served by `clients` and the client's end of it.
    fn connect(clients: &mut Clients, now: Instant) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        clients.add(OwnedFd::from(ours), now);
        theirs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        theirs
    }

    fn echo(req: Request) -> Reply {
        Reply::ok().field("req", format!("{req:?}"))
    }

    /// Serves rounds (everything marked readable) until nothing is ready.
    fn rounds(clients: &mut Clients, now: Instant) {
        for _ in 0..16 {
            for c in &mut clients.conns {
                c.revents = libc::POLLIN | libc::POLLOUT;
            }
            clients.serve(now, &mut echo);
        }
    }

    /// Reads one reply (the only one sent: the reader may read ahead).
    fn read_reply(s: &mut UnixStream) -> Reply {
        Reply::read(&mut std::io::BufReader::new(s)).unwrap()
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let (mut clients, now) = (Clients::default(), Instant::now());
        let mut s = connect(&mut clients, now);
        s.write_all(b"status\r\nenable w*\ndisable x\n").unwrap();
        rounds(&mut clients, now);
        let mut r = std::io::BufReader::new(&mut s);
        for want in ["Status", "Enable(\"w*\")", "Disable(\"x\")"] {
            assert_eq!(Reply::read(&mut r).unwrap().get("req"), Some(want));
        }
        assert_eq!(clients.len(), 1, "the connection stays open");
    }

    #[test]
    fn malformed_lines_get_errors_and_the_connection_goes_on() {
        let (mut clients, now) = (Clients::default(), Instant::now());
        let mut s = connect(&mut clients, now);
        s.write_all(b"\x00\x01garbage\xff\nenable \xc3(\nenable \nfrob\nstatus\n").unwrap();
        rounds(&mut clients, now);
        let mut r = std::io::BufReader::new(&mut s);
        for want in ["NUL byte", "not UTF-8", "needs a GLOB", "unknown request \"frob\""] {
            let reply = Reply::read(&mut r).unwrap();
            assert!(reply.error.as_deref().is_some_and(|e| e.contains(want)), "{want}: {reply:?}");
        }
        assert_eq!(Reply::read(&mut r).unwrap().get("req"), Some("Status"));
    }

    #[test]
    fn a_line_too_long_is_refused_and_closed() {
        let (mut clients, now) = (Clients::default(), Instant::now());
        let mut s = connect(&mut clients, now);
        s.write_all(&vec![b'a'; MAX_REQUEST_LINE + 1]).unwrap();
        rounds(&mut clients, now);
        let r = read_reply(&mut s);
        assert!(r.error.unwrap().contains("request line too long (over 4096 bytes)"));
        assert_eq!(clients.len(), 0);
        // A line of exactly the limit is read (and refused as unknown).
        let mut s = connect(&mut clients, now);
        let mut line = vec![b'a'; MAX_REQUEST_LINE];
        line.push(b'\n');
        s.write_all(&line).unwrap();
        rounds(&mut clients, now);
        assert!(read_reply(&mut s).error.unwrap().contains("unknown request"));
        assert_eq!(clients.len(), 1);
    }

    #[test]
    fn half_a_line_gets_an_error_at_its_deadline_or_at_the_end_of_input() {
        let (mut clients, now) = (Clients::default(), Instant::now());
        let mut s = connect(&mut clients, now);
        s.write_all(b"sta").unwrap();
        rounds(&mut clients, now);
        assert_eq!(clients.len(), 1, "waiting for the rest");
        assert_eq!(clients.timeout(now), Some(PARTIAL_LINE_TIMEOUT));
        rounds(&mut clients, now + PARTIAL_LINE_TIMEOUT);
        assert!(read_reply(&mut s).error.unwrap().contains("no newline within 5 s"));
        assert_eq!(clients.len(), 0);

        let mut s = connect(&mut clients, now);
        s.write_all(b"\xde\xad\xbe\xef").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        rounds(&mut clients, now);
        assert!(read_reply(&mut s).error.unwrap().contains("ended in the middle of a request line"));
        assert_eq!(clients.len(), 0);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed after the error");
    }

    #[test]
    fn a_full_table_closes_the_least_recently_active() {
        let (mut clients, t0) = (Clients::default(), Instant::now());
        let mut first = connect(&mut clients, t0);
        let mut busy = Vec::new();
        for i in 1..cap() {
            busy.push(connect(&mut clients, t0 + Duration::from_millis(i as u64)));
        }
        // The first one spoke last: the second is now the least recently active.
        first.write_all(b"status\n").unwrap();
        rounds(&mut clients, t0 + Duration::from_secs(1));
        assert_eq!(read_reply(&mut first).get("req"), Some("Status"));
        let mut newest = connect(&mut clients, t0 + Duration::from_secs(2));
        assert_eq!(clients.len(), cap());
        let r = read_reply(&mut busy[0]);
        assert!(r.error.unwrap().contains("too many connections"), "the least recently active is told why");
        newest.write_all(b"status\n").unwrap();
        rounds(&mut clients, t0 + Duration::from_secs(2));
        assert_eq!(read_reply(&mut newest).get("req"), Some("Status"));
    }
}
