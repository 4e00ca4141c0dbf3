//! Throw-away PostgreSQL clusters as backends: a primary made with `initdb`, streaming standbys
//! cloned from it with `pg_basebackup -R`, and `psql` over TCP to see which server a connection
//! reached.
//!
//! The server binaries refuse to run as root: as root, every server command runs as the
//! `postgres` user through `runuser`; as anyone else, as that user.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::addr::free_addr;
use crate::process::run_with_timeout;

/// Where Debian installs the server binaries (`postgresql-NN` packages).
const BIN_ROOT: &str = "/usr/lib/postgresql";
/// How long one server command (`initdb`, `pg_basebackup`, `pg_ctl -w ...`) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`psql_over_tcp`] may take, connect included.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// One running PostgreSQL cluster on a loopback address of its own (see [`free_addr`]), in a
/// temp directory; stopped (`pg_ctl stop -m immediate`) and deleted on drop, a failing test
/// included.
///
/// A primary has these roles (and so do its standbys), allowed over TCP from 127.0.0.0/8 only:
/// - [`PostgresCluster::SCRAM_USER`] with [`PostgresCluster::SCRAM_PASSWORD`], stored and
///   checked as SCRAM-SHA-256;
/// - [`PostgresCluster::MD5_USER`] with [`PostgresCluster::MD5_PASSWORD`], stored as md5 and
///   checked by the `md5` method;
/// - [`PostgresCluster::TRUST_USER`], no password (`trust`).
///
/// The superuser `postgres` connects only over the Unix socket ([`PostgresCluster::psql`]).
#[derive(Debug)]
pub struct PostgresCluster {
    addr: SocketAddr,
    bin: PathBuf,
    /// Owned by the server's user: holds `data/`, `socket/` and `server.log`.
    home: PathBuf,
    running: bool,
    dir: TempDir,
}

impl PostgresCluster {
    /// A role that logs in with SCRAM-SHA-256.
    pub const SCRAM_USER: &'static str = "sluice_scram";
    /// [`Self::SCRAM_USER`]'s password (with a space, to catch quoting mistakes).
    pub const SCRAM_PASSWORD: &'static str = "scram pass 1";
    /// A role that logs in with md5.
    pub const MD5_USER: &'static str = "sluice_md5";
    /// [`Self::MD5_USER`]'s password.
    pub const MD5_PASSWORD: &'static str = "md5-pass-2";
    /// A role that logs in without a password.
    pub const TRUST_USER: &'static str = "sluice_trust";

    /// A new primary with the roles listed above. Panics when the server binaries are missing
    /// (naming the script that installs them) or when a step fails (with its output).
    pub fn primary() -> Self {
        let mut cluster = Self::prepare("primary");
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let hba = format!(
            "local all all trust\n\
             local replication all trust\n\
             host all {trust} 127.0.0.0/8 trust\n\
             host all {md5} 127.0.0.0/8 md5\n\
             host all all 127.0.0.0/8 scram-sha-256\n",
            trust = Self::TRUST_USER,
            md5 = Self::MD5_USER,
        );
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        cluster.configure();
        cluster.start();
        cluster.psql(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {} LOGIN PASSWORD '{}';
             SET password_encryption = 'md5';
             CREATE ROLE {} LOGIN PASSWORD '{}';
             CREATE ROLE {} LOGIN;",
            Self::SCRAM_USER,
            Self::SCRAM_PASSWORD,
            Self::MD5_USER,
            Self::MD5_PASSWORD,
            Self::TRUST_USER,
        ));
        cluster
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R`, running and accepting
    /// read-only connections.
    pub fn standby_of(primary: &Self) -> Self {
        let mut cluster = Self::prepare("standby");
        let data = cluster.data();
        let socket = primary.socket();
        let port = primary.addr.port().to_string();
        cluster.run(
            "pg_basebackup",
            &[
                "-h",
                path_str(&socket),
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                path_str(&data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        cluster.configure();
        cluster.start();
        cluster
    }

    /// The TCP address it listens on (`127.X.Y.Z:PORT`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Runs `sql` as the superuser over the Unix socket; returns psql's unaligned, tuples-only
    /// output. Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        let socket = self.socket();
        let port = self.addr.port().to_string();
        self.run(
            "psql",
            &[
                "-X",
                "-h",
                path_str(&socket),
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
        )
    }

    /// Writes the password of `user` (one of the roles above that has one) to a file in this
    /// cluster's temp directory, followed by a newline, readable by the current user only,
    /// and returns its path: a `password_file` for a health check.
    pub fn password_file(&self, user: &str) -> PathBuf {
        let password = match user {
            Self::SCRAM_USER => Self::SCRAM_PASSWORD,
            Self::MD5_USER => Self::MD5_PASSWORD,
            _ => panic!("{user} has no password"),
        };
        let path = self.dir.path().join(format!("{user}.pass"));
        fs::write(&path, format!("{password}\n"))
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)))
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        path
    }

    /// Promotes a standby to primary and waits until it is one (`pg_ctl promote -w`).
    pub fn promote(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-w", "-t", "30", "promote"],
        );
    }

    /// Stops the server and waits until it is down (`pg_ctl stop -m fast`); does nothing if it
    /// is already stopped.
    pub fn stop(&mut self) {
        if self.running {
            self.running = false;
            let data = self.data();
            self.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data),
                    "-w",
                    "-t",
                    "30",
                    "-m",
                    "fast",
                    "stop",
                ],
            );
        }
    }

    /// Its server log so far, for a failing test's message.
    pub fn log(&self) -> String {
        fs::read_to_string(self.home.join("server.log")).unwrap_or_default()
    }

    /// A temp dir with a `home` the server's user owns, on a fresh address.
    fn prepare(label: &str) -> Self {
        let bin = server_bin_dir();
        let dir = TempDir::new(label);
        let home = dir.path().join("pg");
        fs::create_dir(&home).expect("create cluster home");
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        if running_as_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown home to postgres");
        }
        let cluster = Self {
            addr: free_addr(),
            bin,
            home,
            running: false,
            dir,
        };
        cluster.run("mkdir", &[path_str(&cluster.socket())]);
        cluster
    }

    /// Appends this cluster's address, socket and test-speed settings to `postgresql.conf`
    /// (later lines win, so a standby's copy of the primary's settings is overridden).
    fn configure(&self) {
        let settings = format!(
            "\n# sluice test settings\n\
             listen_addresses = '{}'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 20\n\
             max_wal_senders = 4\n",
            self.addr.ip(),
            self.addr.port(),
            self.socket().display()
        );
        let mut conf = OpenOptions::new()
            .append(true)
            .open(self.data().join("postgresql.conf"))
            .expect("open postgresql.conf");
        conf.write_all(settings.as_bytes())
            .expect("append to postgresql.conf");
    }

    fn start(&mut self) {
        let data = self.data();
        let log = self.home.join("server.log");
        let started = self.try_run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        if let Err(error) = started {
            panic!("{error}\n--- server.log ---\n{}", self.log());
        }
        self.running = true;
    }

    fn data(&self) -> PathBuf {
        self.home.join("data")
    }

    fn socket(&self) -> PathBuf {
        self.home.join("socket")
    }

    /// Runs a server binary (or, for `mkdir`, a system one) as the server's user, bounded to
    /// [`COMMAND_TIMEOUT`]; panics with its output when it fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        self.try_run(program, args)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    fn try_run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let program = match program {
            "mkdir" => PathBuf::from("mkdir"),
            _ => self.bin.join(program),
        };
        let mut command = if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        // The server's user may not be allowed into the test's working directory.
        command.args(args).current_dir(&self.home);
        let output = run_with_timeout(&mut command, COMMAND_TIMEOUT)
            .map_err(|error| format!("{}: {error}", program.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} {args:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                program.display(),
                output.status,
                output.stdout,
                output.stderr
            ));
        }
        Ok(output.stdout)
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        if self.running {
            self.running = false;
            let data = self.data();
            // Immediate: nothing here needs a clean shutdown, and a failing test should not wait.
            let _ = self.try_run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data),
                    "-w",
                    "-t",
                    "30",
                    "-m",
                    "immediate",
                    "stop",
                ],
            );
        }
    }
}

/// Runs `sql` with `psql` on a new TCP connection to `addr` (a server, or Sluice in front of
/// servers) as `user` with `password`, bounded to 10 s, connect included; returns psql's
/// unaligned, tuples-only output, trimmed, or what went wrong. Runs as the current user (psql,
/// unlike the server, does not mind root). Panics when the binaries are missing.
pub fn psql_over_tcp(
    addr: SocketAddr,
    user: &str,
    password: &str,
    sql: &str,
) -> Result<String, String> {
    let psql = server_bin_dir().join("psql");
    let mut command = Command::new(&psql);
    command
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At"])
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["-U", user, "-d", "postgres", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGSSLMODE", "disable");
    let output = run_with_timeout(&mut command, QUERY_TIMEOUT)
        .map_err(|error| format!("{}: {error}", psql.display()))?;
    if !output.status.success() {
        return Err(format!(
            "psql to {addr}: {}: {}",
            output.status,
            output.stderr.trim()
        ));
    }
    Ok(output.stdout.trim().to_owned())
}

/// A fresh directory under the system's temp dir, removed (with its content) on drop.
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// `$TMPDIR/sluice-pg-<label>-<pid>-<n>`.
    fn new(label: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("sluice-pg-{label}-{}-{n}", std::process::id()));
        // A leftover of an earlier run with the same pid would be stale.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        // The server's user must be able to reach its home inside.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        Self { path }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The newest `/usr/lib/postgresql/NN/bin` holding `initdb`; panics with the fix when none.
fn server_bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(BIN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL server binaries not found in {BIN_ROOT}/*/bin; \
             scripts/install-deps.sh installs the postgresql package (CI runs it)"
        ),
    }
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The `postgres` user's uid and gid, from `id`.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        assert!(
            output.status.success(),
            "no postgres user ({}); scripts/install-deps.sh installs the postgresql package, \
             which creates it",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}
