//! Throw-away PostgreSQL clusters for tests: [`PostgresCluster::primary`] runs `initdb` and
//! starts a server on a free loopback port, [`PostgresCluster::standby_of`] clones a running
//! one with `pg_basebackup -R` and starts it as a streaming standby. Each is stopped
//! (`pg_ctl stop -m immediate`) and its directory removed on drop, a failing test included.
//!
//! The server binaries refuse to run as root: as root, every command runs as the `postgres`
//! user through `runuser`; as anyone else, as that user.
//!
//! Roles created in a primary (and so in its standbys), all allowed from 127.0.0.1 only:
//! - [`SCRAM_USER`] with [`SCRAM_PASSWORD`], stored and checked as SCRAM-SHA-256;
//! - [`MD5_USER`] with [`MD5_PASSWORD`], stored as md5 and checked by the `md5` method;
//! - [`TRUST_USER`], no password (`trust`).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_testkit::{free_port, run_with_timeout};

use super::temp::TempDir;

pub const SCRAM_USER: &str = "sluice_scram";
pub const SCRAM_PASSWORD: &str = "scram pass 1";
pub const MD5_USER: &str = "sluice_md5";
pub const MD5_PASSWORD: &str = "md5-pass-2";
pub const TRUST_USER: &str = "sluice_trust";

/// Where Debian installs the server binaries (`postgresql-NN` packages).
const BIN_ROOT: &str = "/usr/lib/postgresql";

/// One running cluster; stopped and deleted on drop.
pub struct PostgresCluster {
    /// The TCP address it listens on (`127.0.0.1:PORT`).
    pub addr: SocketAddr,
    bin: PathBuf,
    /// Owned by the server's user: holds `data/`, `socket/` and `server.log`.
    home: PathBuf,
    running: bool,
    _dir: TempDir,
}

impl PostgresCluster {
    /// A new primary with the roles listed in the module docs.
    pub fn primary() -> PostgresCluster {
        let mut cluster = PostgresCluster::prepare("pg-primary");
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
             host all {TRUST_USER} 127.0.0.1/32 trust\n\
             host all {MD5_USER} 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        cluster.configure();
        cluster.start();
        cluster.psql(&format!(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}';
             SET password_encryption = 'md5';
             CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';
             CREATE ROLE {TRUST_USER} LOGIN;"
        ));
        cluster
    }

    /// A streaming standby of `primary`, made with `pg_basebackup -R`, running and accepting
    /// read-only connections.
    pub fn standby_of(primary: &PostgresCluster) -> PostgresCluster {
        let mut cluster = PostgresCluster::prepare("pg-standby");
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

    /// Runs `sql` as the superuser over the Unix socket; returns psql's unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        let socket = self.socket();
        let port = self.addr.port().to_string();
        self.run(
            "psql",
            &[
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

    /// Promotes a standby to primary and waits for it (`pg_ctl promote -w`).
    pub fn promote(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-w", "-t", "30", "promote"],
        );
    }

    /// Stops the server now (`-m fast`).
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

    /// A temp dir with a `home` the server's user owns, on a fresh port.
    fn prepare(label: &str) -> PostgresCluster {
        let bin = server_bin_dir();
        let dir = TempDir::new(label);
        let home = dir.path().join("pg");
        fs::create_dir(&home).expect("create cluster home");
        fs::set_permissions(&home, fs::Permissions::from_mode(0o700)).expect("chmod home");
        if running_as_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&home, Some(uid), Some(gid)).expect("chown home to postgres");
        }
        let cluster = PostgresCluster {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            bin,
            home,
            running: false,
            _dir: dir,
        };
        cluster.run("mkdir", &[path_str(&cluster.socket())]);
        cluster
    }

    /// Appends this cluster's address, socket and test-speed settings to `postgresql.conf`
    /// (later lines win, so a standby's copy of the primary's settings is overridden).
    fn configure(&self) {
        let settings = format!(
            "\n# sluice-probe test settings\n\
             listen_addresses = '127.0.0.1'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 16MB\n\
             max_connections = 20\n\
             max_wal_senders = 4\n",
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
            let log = fs::read_to_string(&log).unwrap_or_default();
            panic!("{error}\n--- server.log ---\n{log}");
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
    /// 60 s; panics with its output when it fails.
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
        let output = run_with_timeout(&mut command, Duration::from_secs(60))
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
             scripts/install-deps.sh installs the postgresql package"
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
            "no postgres user: {}",
            String::from_utf8_lossy(&output.stderr)
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
