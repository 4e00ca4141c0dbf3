//! A real redis-server behind Sluice, driven by redis-cli and redis-benchmark.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::start;
use sluice_testkit::{RedisServer, require_installed, run_with_timeout};

with_workers_1_and_2!(redis_cli_and_benchmark_through_sluice);

fn redis_cli(front: SocketAddr, args: &[&str]) -> String {
    let mut command = Command::new("redis-cli");
    command
        .args([
            "-h",
            &front.ip().to_string(),
            "-p",
            &front.port().to_string(),
        ])
        .args(args);
    let output = run_with_timeout(&mut command, Duration::from_secs(10)).unwrap();
    assert!(
        output.status.success(),
        "redis-cli {args:?}: {:?}\n{}",
        output.status,
        output.stderr
    );
    output.stdout.trim().to_owned()
}

fn redis_cli_and_benchmark_through_sluice(workers: usize) {
    require_installed(&["redis-server", "redis-cli", "redis-benchmark"]);
    let redis = RedisServer::start();
    let (_sluice, front) = start(workers, &[redis.addr()]);
    let value = format!("through sluice with {workers} worker(s)");
    assert_eq!(redis_cli(front, &["SET", "sluice:test", &value]), "OK");
    assert_eq!(redis_cli(front, &["GET", "sluice:test"]), value);
    assert_eq!(redis_cli(front, &["PING"]), "PONG");

    let mut benchmark = Command::new("redis-benchmark");
    benchmark.args([
        "-h",
        &front.ip().to_string(),
        "-p",
        &front.port().to_string(),
        "-n",
        "2000",
        "-q",
        "-t",
        "set,get",
    ]);
    let output = run_with_timeout(&mut benchmark, Duration::from_secs(60)).unwrap();
    assert!(
        output.status.success(),
        "redis-benchmark: {:?}\n{}\n{}",
        output.status,
        output.stdout,
        output.stderr
    );
    for test in ["SET:", "GET:"] {
        assert!(
            output.stdout.contains(test),
            "no {test} result in:\n{}",
            output.stdout
        );
    }
    eprintln!(
        "workers {workers}: redis-benchmark through Sluice in {:?}",
        output.elapsed
    );
    // The benchmark's keys landed in the real server, not somewhere else.
    let mut direct = Command::new("redis-cli");
    direct.args([
        "-h",
        &redis.addr().ip().to_string(),
        "-p",
        &redis.addr().port().to_string(),
        "EXISTS",
        "key:__rand_int__",
    ]);
    let exists = run_with_timeout(&mut direct, Duration::from_secs(10)).unwrap();
    assert_eq!(exists.stdout.trim(), "1", "{}", exists.stderr);
}
