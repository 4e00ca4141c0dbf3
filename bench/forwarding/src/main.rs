//! Forwarding-mechanism microbenchmark for Sluice: `copy` (io_uring recv with a provided-buffer
//! ring, then send) vs `splice-poll` (io_uring readiness + non-blocking splice by the worker) vs
//! `splice-uring` (IORING_OP_SPLICE, executed by io-wq kernel threads).
//!
//! Usage:
//!   sluice-forwarding-bench [bench] [--rounds 5] [--bulk-mib 2048] [--pp-count 20000]
//!       [--pp-size 64] [--many-conns 50] [--many-count 1000] [--modes direct,copy,...]
//!       [--pipe-size 262144] [--buf-size 65536] [--bufs 256] [--quota 4]
//!   sluice-forwarding-bench --mode copy|splice-poll|splice-uring --listen ADDR --backend ADDR
//!
//! The driver starts one forwarder child process per mode (so the child's getrusage covers the
//! forwarder thread *and* its io-wq workers, and nothing else), a discard/echo backend thread and
//! the clients in this process, then runs interleaved rounds and prints medians.
#![allow(unsafe_code)]

mod fwd;
mod load;
mod rlimit;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use fwd::{Forwarder, FwdConfig, Mode};

static FWD_TID: AtomicI32 = AtomicI32::new(0);

struct Args {
    mode: Option<Mode>,
    listen: String,
    backend: Option<String>,
    control: bool,
    rounds: usize,
    bulk_mib: u64,
    pp_count: usize,
    pp_size: usize,
    many_conns: usize,
    many_count: usize,
    modes: Vec<String>,
    cfg: FwdConfig,
}

fn usage() -> ! {
    eprintln!(
        "usage: sluice-forwarding-bench [bench] [--rounds N] [--bulk-mib N] [--pp-count N] \
         [--pp-size N] [--many-conns N] [--many-count N] [--modes a,b,..] [--pipe-size N] \
         [--buf-size N] [--bufs N] [--quota N]\n       sluice-forwarding-bench --mode \
         copy|splice-poll|splice-uring --listen ADDR --backend ADDR"
    );
    std::process::exit(64);
}

fn parse_args() -> Args {
    let mut a = Args {
        mode: None,
        listen: "127.0.0.1:0".into(),
        backend: None,
        control: false,
        rounds: 5,
        bulk_mib: 2048,
        pp_count: 20_000,
        pp_size: 64,
        many_conns: 50,
        many_count: 1000,
        modes: ["direct", "copy", "splice-poll", "splice-uring"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        cfg: FwdConfig {
            mode: Mode::Copy,
            pipe_size: 256 * 1024,
            buf_size: 64 * 1024,
            bufs: 256,
            quota: 4,
        },
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "bench" {
            continue;
        }
        if k == "--control" {
            a.control = true;
            continue;
        }
        if k == "-h" || k == "--help" {
            usage();
        }
        let v = it.next().unwrap_or_else(|| usage());
        let num = |v: &str| v.parse::<usize>().unwrap_or_else(|_| usage());
        match k.as_str() {
            "--mode" => a.mode = Some(Mode::parse(&v).unwrap_or_else(|| usage())),
            "--listen" => a.listen = v,
            "--backend" => a.backend = Some(v),
            "--rounds" => a.rounds = num(&v),
            "--bulk-mib" => a.bulk_mib = num(&v) as u64,
            "--pp-count" => a.pp_count = num(&v),
            "--pp-size" => a.pp_size = num(&v),
            "--many-conns" => a.many_conns = num(&v),
            "--many-count" => a.many_count = num(&v),
            "--modes" => a.modes = v.split(',').map(|s| s.to_string()).collect(),
            "--pipe-size" => a.cfg.pipe_size = num(&v),
            "--buf-size" => a.cfg.buf_size = num(&v),
            "--bufs" => a.cfg.bufs = num(&v) as u16,
            "--quota" => a.cfg.quota = num(&v),
            _ => usage(),
        }
    }
    a
}

/// CPU of the whole process (all threads, including exited io-wq workers), nanoseconds.
fn process_cpu_ns() -> u64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is valid for writing.
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU of one thread of this process (schedstat sum_exec_runtime), nanoseconds.
fn thread_cpu_ns(tid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

fn run_forwarder_child(a: &Args, mode: Mode) {
    rlimit::raise_nofile();
    let backend: SocketAddr = a
        .backend
        .as_deref()
        .unwrap_or_else(|| usage())
        .parse()
        .unwrap_or_else(|_| usage());
    let listener = TcpListener::bind(&a.listen).unwrap_or_else(|e| {
        eprintln!("bind {}: {e}", a.listen);
        std::process::exit(71);
    });
    println!("listening {}", listener.local_addr().expect("local addr"));
    let mut cfg = a.cfg;
    cfg.mode = mode;
    let run = move || {
        // SAFETY: gettid has no preconditions.
        FWD_TID.store(unsafe { libc::gettid() }, Ordering::Relaxed);
        let mut f = Forwarder::new(cfg, listener, backend).expect("forwarder setup");
        if let Err(e) = f.run() {
            eprintln!("forwarder: {e}");
            std::process::exit(1);
        }
    };
    if !a.control {
        eprintln!("forwarding ({}) -> {backend}", mode.name());
        run();
        return;
    }
    std::thread::Builder::new()
        .name("forwarder".into())
        .spawn(run)
        .expect("spawn forwarder");
    // Control channel: "cpu" -> "cpu <process_ns> <forwarder_thread_ns> <tasks>"; EOF -> exit.
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "cpu" {
            let tasks = std::fs::read_dir("/proc/self/task")
                .map(|d| d.count())
                .unwrap_or(0);
            let tid = FWD_TID.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "cpu {} {} {}",
                process_cpu_ns(),
                thread_cpu_ns(tid),
                tasks
            );
            let _ = out.flush();
        }
    }
    std::process::exit(0);
}

struct Target {
    name: String,
    addr: SocketAddr,
    child: Option<(Child, ChildStdin, BufReader<ChildStdout>)>,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    proc_ns: u64,
    thread_ns: u64,
    tasks: u64,
}

impl Target {
    fn cpu(&mut self) -> Cpu {
        let Some((_, stdin, stdout)) = &mut self.child else {
            return Cpu::default();
        };
        writeln!(stdin, "cpu").expect("control write");
        stdin.flush().expect("control flush");
        let mut line = String::new();
        stdout.read_line(&mut line).expect("control read");
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        Cpu {
            proc_ns: v[0],
            thread_ns: v[1],
            tasks: v[2],
        }
    }
}

fn spawn_forwarder(a: &Args, mode: &str, backend: SocketAddr) -> Target {
    let exe = std::env::current_exe().expect("current exe");
    let c = &a.cfg;
    let mut child = Command::new(exe)
        .args(["--mode", mode, "--listen", "127.0.0.1:0", "--backend"])
        .arg(backend.to_string())
        .arg("--control")
        .args(["--pipe-size", &c.pipe_size.to_string()])
        .args(["--buf-size", &c.buf_size.to_string()])
        .args(["--bufs", &c.bufs.to_string()])
        .args(["--quota", &c.quota.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn forwarder");
    let stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("forwarder ready line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad ready line from {mode}: {line:?}"));
    Target {
        name: mode.to_string(),
        addr,
        child: Some((child, stdin, stdout)),
    }
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64
}

/// Metric columns, per target: collected samples per round.
#[derive(Default)]
struct Samples {
    bulk_gibs: Vec<f64>,
    bulk_cpu_per_gib: Vec<f64>,
    bulk_thread_per_gib: Vec<f64>,
    bulk_tasks: Vec<f64>,
    pp_p50_us: Vec<f64>,
    pp_p99_us: Vec<f64>,
    pp_cpu_us: Vec<f64>,
    many_rps: Vec<f64>,
    many_cpu_us: Vec<f64>,
    many_tasks: Vec<f64>,
}

fn main() {
    let a = parse_args();
    if let Some(mode) = a.mode {
        run_forwarder_child(&a, mode);
        return;
    }
    rlimit::raise_nofile();
    let bl = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let backend = bl.local_addr().expect("backend addr");
    std::thread::Builder::new()
        .name("backend".into())
        .spawn(move || load::backend_server(bl))
        .expect("spawn backend");

    let mut targets: Vec<Target> = a
        .modes
        .iter()
        .map(|m| {
            if m == "direct" {
                Target {
                    name: "direct".into(),
                    addr: backend,
                    child: None,
                }
            } else {
                if Mode::parse(m).is_none() {
                    usage();
                }
                spawn_forwarder(&a, m, backend)
            }
        })
        .collect();
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    let dl = Duration::from_secs(60);
    let gib = (1u64 << 30) as f64;
    let bulk_bytes = a.bulk_mib << 20;

    // Warm-up: a short pass of every workload through every target.
    for t in &targets {
        load::bulk(t.addr, 64 << 20, dl).expect("warm-up bulk");
        load::pingpong(t.addr, a.pp_size, 100, 1000, dl).expect("warm-up pingpong");
        load::pingpong_many(t.addr, a.many_conns, a.pp_size, 50, dl).expect("warm-up many");
    }
    std::thread::sleep(Duration::from_millis(200));

    let n = targets.len();
    for r in 0..a.rounds {
        for w in 0..3 {
            for k in 0..n {
                let i = (k + r) % n; // rotate the order every round
                let t = &mut targets[i];
                let s = &mut samples[i];
                let c0 = t.cpu();
                match w {
                    0 => {
                        let secs = load::bulk(t.addr, bulk_bytes, dl).expect("bulk");
                        let c1 = t.cpu();
                        let g = bulk_bytes as f64 / gib;
                        s.bulk_gibs.push(g / secs);
                        s.bulk_cpu_per_gib
                            .push((c1.proc_ns - c0.proc_ns) as f64 / 1e9 / g);
                        s.bulk_thread_per_gib
                            .push((c1.thread_ns - c0.thread_ns) as f64 / 1e9 / g);
                        s.bulk_tasks.push(c1.tasks as f64);
                    }
                    1 => {
                        let (mut lat, _) =
                            load::pingpong(t.addr, a.pp_size, 500, a.pp_count, dl).expect("pp");
                        let c1 = t.cpu();
                        lat.sort_unstable();
                        s.pp_p50_us.push(pct(&lat, 0.5) / 1e3);
                        s.pp_p99_us.push(pct(&lat, 0.99) / 1e3);
                        s.pp_cpu_us
                            .push((c1.proc_ns - c0.proc_ns) as f64 / 1e3 / lat.len() as f64);
                    }
                    _ => {
                        let secs =
                            load::pingpong_many(t.addr, a.many_conns, a.pp_size, a.many_count, dl)
                                .expect("pingpong_many");
                        let c1 = t.cpu();
                        let rts = (a.many_conns * a.many_count) as f64;
                        s.many_rps.push(rts / secs);
                        s.many_cpu_us
                            .push((c1.proc_ns - c0.proc_ns) as f64 / 1e3 / rts);
                        s.many_tasks.push(c1.tasks as f64);
                    }
                }
                // Let the connections of this run close before the next one.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        eprintln!("round {}/{} done", r + 1, a.rounds);
    }

    println!(
        "Forwarding microbenchmark: {} rounds (interleaved, order rotated), medians. bulk = {} \
         MiB one way in 128 KiB writes; ping-pong = {} B each way; 1 conn x {} round trips; \
         {} conns x {} round trips. pipe {} B, buffers {} x {} B, quota {} buffers/direction.\n",
        a.rounds,
        a.bulk_mib,
        a.pp_size,
        a.pp_count,
        a.many_conns,
        a.many_count,
        a.cfg.pipe_size,
        a.cfg.bufs,
        a.cfg.buf_size,
        a.cfg.quota
    );
    println!(
        "| mode | bulk GiB/s | bulk fwd CPU s/GiB (process, incl. io-wq) | of which fwd thread \
         s/GiB | fwd threads after bulk | 1-conn RTT p50 us | 1-conn RTT p99 us | 1-conn fwd CPU \
         us/RT | 50-conn RT/s | 50-conn fwd CPU us/RT | fwd threads after 50-conn |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (t, s) in targets.iter().zip(samples.iter_mut()) {
        let fwd = t.child.is_some();
        let f = |v: &mut Vec<f64>, prec: usize| -> String {
            if fwd {
                format!("{:.*}", prec, median(v))
            } else {
                "-".into()
            }
        };
        println!(
            "| {} | {:.2} | {} | {} | {} | {:.1} | {:.1} | {} | {:.0} | {} | {} |",
            t.name,
            median(&mut s.bulk_gibs),
            f(&mut s.bulk_cpu_per_gib, 3),
            f(&mut s.bulk_thread_per_gib, 3),
            f(&mut s.bulk_tasks, 0),
            median(&mut s.pp_p50_us),
            median(&mut s.pp_p99_us),
            f(&mut s.pp_cpu_us, 2),
            median(&mut s.many_rps),
            f(&mut s.many_cpu_us, 2),
            f(&mut s.many_tasks, 0),
        );
    }
    for t in &mut targets {
        if let Some((child, stdin, _)) = t.child.take() {
            drop(stdin);
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
