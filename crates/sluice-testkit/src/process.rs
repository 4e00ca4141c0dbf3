//! The Sluice binary as a child process: start from a YAML config, wait until ready, observe it
//! through /proc, stop it; and one-shot runs of any command with a time limit.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The line Sluice logs once every worker listens.
pub const READY_MARKER: &str = "sluice ready";
/// How long [`Sluice::start`] waits for [`READY_MARKER`].
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Linux reports process CPU times in clock ticks of 1/100 s (USER_HZ) on every architecture.
const CLOCK_TICKS_PER_SECOND: u64 = 100;

/// A config file in the temp directory, removed on drop.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    /// Writes `yaml` to a fresh file.
    pub fn new(yaml: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "sluice-test-{}-{}.yaml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = std::env::temp_dir().join(name);
        fs::write(&path, yaml).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        Self { path }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A running `sluice run`, killed on drop.
#[derive(Debug)]
pub struct Sluice {
    child: Child,
    config: Option<ConfigFile>,
    stderr: Arc<Mutex<Vec<u8>>>,
    drain: Option<JoinHandle<()>>,
    exit: Option<ExitStatus>,
}

/// A `sluice run` that did not become ready.
#[derive(Debug)]
pub struct StartError {
    /// Why: exited (with its status), or timed out.
    pub reason: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sluice did not become ready: {}\n--- sluice stderr ---\n{}--- end ---",
            self.reason, self.stderr
        )
    }
}

impl std::error::Error for StartError {}

impl Sluice {
    /// Runs `binary run -c CONFIG --log-level info` with `yaml` as the config and waits (at most
    /// [`READY_TIMEOUT`]) for [`READY_MARKER`]; panics with its stderr otherwise.
    pub fn start(binary: &Path, yaml: &str) -> Self {
        Self::try_start(binary, yaml, READY_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}\n--- config ---\n{yaml}"))
    }

    /// As [`Sluice::start`], returning the failure instead of panicking.
    pub fn try_start(
        binary: &Path,
        yaml: &str,
        ready_timeout: Duration,
    ) -> Result<Self, StartError> {
        Self::try_start_with(binary, yaml, ready_timeout, &[])
    }

    /// As [`Sluice::try_start`], run through `wrapper`: a program and its arguments that run
    /// the command line after them in a changed process, such as [`fd_limit_wrapper`]'s (the
    /// test crates forbid `unsafe`, so `pre_exec` is not an option). [`Sluice::pid`] is then
    /// Sluice's own pid as long as every program of the wrapper execs the next.
    pub fn try_start_with(
        binary: &Path,
        yaml: &str,
        ready_timeout: Duration,
        wrapper: &[String],
    ) -> Result<Self, StartError> {
        let config = ConfigFile::new(yaml);
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("run")
            .arg("-c")
            .arg(config.path())
            .args(["--log-level", "info"]);
        Self::spawn(command, Some(config), READY_MARKER, ready_timeout)
    }

    /// Runs another program in Sluice's place (a stand-in proxy such as socat, to prove the
    /// harness itself), ready once a stderr line contains `ready_marker`.
    pub fn start_stand_in(command: Command, ready_marker: &str) -> Self {
        Self::spawn(command, None, ready_marker, READY_TIMEOUT)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn spawn(
        mut command: Command,
        config: Option<ConfigFile>,
        ready_marker: &str,
        ready_timeout: Duration,
    ) -> Result<Self, StartError> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| StartError {
                reason: format!("spawn {command:?}: {error}"),
                stderr: String::new(),
            })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let drain = {
            let stderr = Arc::clone(&stderr);
            let marker = ready_marker.to_owned();
            thread::Builder::new()
                .name("sluice-stderr".into())
                .spawn(move || drain_stderr(pipe, &stderr, &marker, &ready_tx))
                .expect("spawn the stderr reader")
        };
        let mut sluice = Self {
            child,
            config,
            stderr,
            drain: Some(drain),
            exit: None,
        };
        match ready_rx.recv_timeout(ready_timeout) {
            Ok(()) => Ok(sluice),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // stderr closed: the process is exiting; give it a moment to be reaped.
                let status = sluice.wait_exit(Duration::from_secs(2));
                Err(StartError {
                    reason: format!("it exited ({status:?})"),
                    stderr: sluice.stderr_text(),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(StartError {
                reason: format!("no {ready_marker:?} line within {ready_timeout:?}"),
                stderr: sluice.stderr_text(),
            }),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The config file it runs with (`None` for a stand-in).
    pub fn config_path(&self) -> Option<&Path> {
        self.config.as_ref().map(ConfigFile::path)
    }

    /// Everything written to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
        .into_owned()
    }

    /// Resident set size in KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status = self.proc_file("status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid()))
    }

    /// Number of open file descriptors (entries of /proc/PID/fd).
    pub fn fd_count(&self) -> usize {
        let dir = format!("/proc/{}/fd", self.pid());
        fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("read {dir}: {error}"))
            .count()
    }

    /// Polls the fd count every 10 ms until it is at most `baseline` or `deadline` passes;
    /// returns the last count (leak checks after a crowd of connections closed).
    pub fn wait_fd_count_at_most(&self, baseline: usize, deadline: Instant) -> usize {
        loop {
            let fds = self.fd_count();
            if fds <= baseline || Instant::now() >= deadline {
                return fds;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// User plus system CPU time consumed so far (/proc/PID/stat).
    pub fn cpu_time(&self) -> Duration {
        let stat = self.proc_file("stat");
        // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
        let after_name = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Fields 14 and 15 of the whole line (utime, stime) are the 12th and 13th after the name.
        let ticks: u64 =
            fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
        Duration::from_millis(ticks * 1000 / CLOCK_TICKS_PER_SECOND)
    }

    /// Number of threads (`Threads` in /proc/PID/status).
    pub fn thread_count(&self) -> usize {
        self.proc_file("status")
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits in i32"));
        signal::kill(pid, signal).unwrap_or_else(|error| panic!("kill -{signal} {pid}: {error}"));
    }

    /// Sends SIGTERM and waits at most `timeout` for the exit; `None` when it is still running.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        self.wait_exit(timeout)
    }

    /// Waits at most `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status if the process has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
            if self.exit.is_some()
                && let Some(drain) = self.drain.take()
            {
                let _ = drain.join();
            }
        }
        self.exit
    }

    fn proc_file(&self, name: &str) -> String {
        let path = format!("/proc/{}/{name}", self.pid());
        fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "read {path}: {error}\n--- sluice stderr ---\n{}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if self.try_exit_status().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(drain) = self.drain.take() {
            let _ = drain.join();
        }
    }
}

fn drain_stderr(
    pipe: ChildStderr,
    buffer: &Mutex<Vec<u8>>,
    marker: &str,
    ready: &mpsc::Sender<()>,
) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    let mut announced = false;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(&line);
        if !announced && String::from_utf8_lossy(&line).contains(marker) {
            announced = true;
            let _ = ready.send(());
        }
    }
}

/// A [`Sluice::try_start_with`] wrapper that runs Sluice with RLIMIT_NOFILE at `limit` (soft and
/// hard) and without CAP_SYS_RESOURCE (dropped from the bounding and inheritable sets), so that
/// even as root it cannot raise the limit: util-linux's `setpriv` and `prlimit`, each of which
/// execs the next program. `Err` says why it cannot be used here.
pub fn fd_limit_wrapper(limit: u64) -> Result<Vec<String>, String> {
    for tool in ["setpriv", "prlimit"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success());
        if !found {
            return Err(format!("`{tool}` not found: install util-linux"));
        }
    }
    Ok([
        "setpriv",
        "--bounding-set=-sys_resource",
        "--inh-caps=-sys_resource",
        "prlimit",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("--nofile={limit}:{limit}"), "--".to_owned()])
    .collect())
}

/// The soft and hard RLIMIT_NOFILE of process `pid` (`Max open files` in /proc/PID/limits).
pub fn fd_limits(pid: u32) -> Option<(u64, u64)> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?;
    let mut values = line.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((values.next()??, values.next()??))
}

/// What a command run to its end printed, and how it exited.
#[derive(Debug)]
pub struct CommandOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `command` (stdin closed, stdout and stderr captured) for at most `timeout`; on timeout
/// kills it and returns `TimedOut` with what it printed.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> io::Result<CommandOutput> {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = capture(child.stdout.take().expect("stdout is piped"));
    let stderr = capture(child.stderr.take().expect("stderr is piped"));
    let deadline = started + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(CommandOutput {
            status,
            stdout,
            stderr,
            elapsed: started.elapsed(),
        }),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{command:?} ran past {timeout:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
            ),
        )),
    }
}

/// Runs `binary check -c FILE` on `yaml` (bounded to 10 s).
pub fn check_config(binary: &Path, yaml: &str) -> CommandOutput {
    let config = ConfigFile::new(yaml);
    run_config_command(binary, "check", &config)
}

/// Runs `binary SUBCOMMAND -c FILE` (bounded to 10 s) on an existing config file.
pub fn run_config_command(binary: &Path, subcommand: &str, config: &ConfigFile) -> CommandOutput {
    let mut command = Command::new(binary);
    command.arg(subcommand).arg("-c").arg(config.path());
    run_with_timeout(&mut command, Duration::from_secs(10)).unwrap_or_else(|error| {
        panic!(
            "{} {subcommand} -c {}: {error}",
            binary.display(),
            config.path().display()
        )
    })
}

fn capture(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}
