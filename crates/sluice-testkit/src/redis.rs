//! A real `redis-server` as a backend, and RESP over a plain `TcpStream` to talk to it (or to
//! whatever Sluice connects a client to).

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::addr::free_addr;

/// How long a started `redis-server` may take to answer `PING`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one command may wait for its reply when the stream has no read timeout of its own.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest status, error or integer line, and the deepest nesting, a reply may have here.
const LINE_BYTES_MAX: usize = 64 * 1024;
const DEPTH_MAX: usize = 16;
/// The largest bulk string or array this client accepts.
const BULK_BYTES_MAX: usize = 64 * 1024 * 1024;
const ARRAY_LEN_MAX: usize = 1 << 20;

/// A `redis-server` child on a loopback address of its own (see [`free_addr`]), with its
/// working directory and log in a temp directory; killed, and the directory removed, on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

/// One RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`.
    Status(String),
    /// `-ERR ...`.
    Error(String),
    /// `:42`.
    Integer(i64),
    /// `$3\r\nabc`, or `$-1` (`None`).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...`, or `*-1` (`None`).
    Array(Option<Vec<Reply>>),
}

impl RedisServer {
    /// A stand-alone master, without persistence.
    pub fn start() -> Self {
        Self::spawn(&[])
    }

    /// A replica of the server at `master` (`--replicaof`).
    pub fn start_replica_of(master: SocketAddr) -> Self {
        let (ip, port) = (master.ip().to_string(), master.port().to_string());
        Self::spawn(&["--replicaof", &ip, &port])
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one command on a fresh connection and returns the reply.
    pub fn command(&self, args: &[&str]) -> io::Result<Reply> {
        let stream = TcpStream::connect_timeout(&self.addr, REPLY_TIMEOUT)?;
        redis_command(&stream, args)
    }

    /// Its `run_id` (`INFO server`), asked directly: what tells one server from another when a
    /// client asks the one Sluice connected it to ([`run_id`]).
    pub fn run_id(&self) -> String {
        let info = self.command(&["INFO", "server"]).expect("INFO server");
        run_id(&info).unwrap_or_else(|e| panic!("{}: {e}", self.addr))
    }

    /// Its log file so far, for a failing test's message.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    fn spawn(extra: &[&str]) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let addr = free_addr();
        let dir = std::env::temp_dir().join(format!(
            "sluice-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let log = dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--bind", &addr.ip().to_string()])
            .args(["--port", &addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            // Replicas and Sluice connect from 127.0.0.1, a loopback address it already allows;
            // saying so keeps the test independent of that rule.
            .args(["--protected-mode", "no"])
            // A master waits 5 s by default before a diskless sync, for more replicas to join;
            // a test has one, and should not wait.
            .args(["--repl-diskless-sync-delay", "0"])
            // A replica's full sync writes an RDB file: into the temp directory, not the tests'.
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = Self { child, addr, dir };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match server.command(&["PING"]) {
                Ok(Reply::Status(pong)) if pong == "PONG" => return server,
                outcome => assert!(
                    Instant::now() < deadline,
                    "redis-server on {addr} did not answer PING within {START_TIMEOUT:?} \
                     (last: {outcome:?})\n--- log ---\n{}",
                    server.log()
                ),
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Reply {
    /// A status or bulk string as text (lossy); `None` for other replies.
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(text) => Some(text.clone()),
            Reply::Bulk(Some(bytes)) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        }
    }

    /// The elements of an array; empty for other replies.
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(items)) => items,
            _ => &[],
        }
    }
}

/// Panics unless every one of `binaries` is installed (on `PATH`, or in `/usr/bin`): a test of
/// a real server must fail where the server is missing, not pass without running.
/// `scripts/install-deps.sh` (which `.ci/run` calls) installs them.
pub fn require_installed(binaries: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("/usr/bin"));
    let missing: Vec<&&str> = binaries
        .iter()
        .filter(|name| !dirs.iter().any(|dir| is_file(&dir.join(name))))
        .collect();
    assert!(
        missing.is_empty(),
        "{missing:?} not installed: run scripts/install-deps.sh (Debian packages)"
    );
}

/// Writes `args` as one RESP command on `stream` and reads its reply. Waits at most the
/// stream's read timeout, or 10 s when it has none.
pub fn redis_command(stream: &TcpStream, args: &[&str]) -> io::Result<Reply> {
    if stream.read_timeout()?.is_none() {
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    }
    if stream.write_timeout()?.is_none() {
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    }
    write_command(stream, args)?;
    read_reply(stream)
}

/// Writes `args` as one RESP command (an array of bulk strings), in one write.
pub fn write_command(mut stream: &TcpStream, args: &[&str]) -> io::Result<()> {
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)
}

/// Reads one reply. It reads no byte past the reply (header lines a byte at a time), so the
/// next reply on the same stream is left whole.
pub fn read_reply(mut reader: impl Read) -> io::Result<Reply> {
    read_nested(&mut reader, 0)
}

fn read_nested(reader: &mut impl Read, depth: usize) -> io::Result<Reply> {
    if depth > DEPTH_MAX {
        return Err(invalid(format!("replies nested deeper than {DEPTH_MAX}")));
    }
    let line = read_line(reader)?;
    let (kind, rest) = line
        .split_first()
        .ok_or_else(|| invalid("an empty reply line".into()))?;
    let rest = String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' => Ok(Reply::Status(rest)),
        b'-' => Ok(Reply::Error(rest)),
        b':' => Ok(Reply::Integer(number(&rest)?)),
        b'$' => match length(&rest, BULK_BYTES_MAX)? {
            None => Ok(Reply::Bulk(None)),
            Some(len) => {
                let mut bytes = vec![0; len + 2];
                reader.read_exact(&mut bytes)?;
                if !bytes.ends_with(b"\r\n") {
                    return Err(invalid("a bulk string not ended by CRLF".into()));
                }
                bytes.truncate(len);
                Ok(Reply::Bulk(Some(bytes)))
            }
        },
        b'*' => match length(&rest, ARRAY_LEN_MAX)? {
            None => Ok(Reply::Array(None)),
            Some(len) => (0..len)
                .map(|_| read_nested(reader, depth + 1))
                .collect::<io::Result<Vec<_>>>()
                .map(|items| Reply::Array(Some(items))),
        },
        other => Err(invalid(format!(
            "unknown reply type {:?} in {:?}",
            char::from(*other),
            String::from_utf8_lossy(&line)
        ))),
    }
}

/// One line without its CRLF.
fn read_line(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() > LINE_BYTES_MAX {
            return Err(invalid(format!(
                "a line longer than {LINE_BYTES_MAX} bytes"
            )));
        }
        match reader.read(&mut byte) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn number(text: &str) -> io::Result<i64> {
    text.parse()
        .map_err(|_| invalid(format!("{text:?} is not an integer")))
}

/// A bulk or array length: `None` for -1 (a null reply), at most `max`.
fn length(text: &str, max: usize) -> io::Result<Option<usize>> {
    match number(text)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .map(Some)
            .ok_or_else(|| invalid(format!("length {n} out of 0..={max}"))),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

fn is_file(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.is_file())
}

/// The `run_id` line of an `INFO server` reply.
pub fn run_id(info: &Reply) -> Result<String, String> {
    info.text()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|id| id.trim().to_owned())
        })
        .ok_or_else(|| format!("no run_id in {info:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_replies_and_leaves_the_next_one() {
        let wire: &[u8] = b"*3\r\n$6\r\nmaster\r\n:42\r\n*0\r\n+OK\r\n-ERR no\r\n$-1\r\n";
        let mut reader = wire;
        assert_eq!(
            read_reply(&mut reader).unwrap(),
            Reply::Array(Some(vec![
                Reply::Bulk(Some(b"master".to_vec())),
                Reply::Integer(42),
                Reply::Array(Some(vec![])),
            ]))
        );
        assert_eq!(read_reply(&mut reader).unwrap(), Reply::Status("OK".into()));
        assert_eq!(
            read_reply(&mut reader).unwrap(),
            Reply::Error("ERR no".into())
        );
        assert_eq!(read_reply(&mut reader).unwrap(), Reply::Bulk(None));
        assert!(reader.is_empty());
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        for wire in [
            &b"?\r\n"[..],
            b"$5\r\nab\r\n",
            b"$999999999999\r\n",
            b"*-7\r\n",
            b":x\r\n",
            b"\r\n",
            b"+unterminated",
        ] {
            assert!(read_reply(wire).is_err(), "{wire:?}");
        }
        let deep = "*1\r\n".repeat(DEPTH_MAX + 2);
        assert!(read_reply(deep.as_bytes()).is_err());
    }
}
