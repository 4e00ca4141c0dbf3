//! Opens and holds idle TCP connections, or accepts and holds them (memory-per-connection bench).
//!
//!   idle-conns hold --listen ADDR
//!       accept forever and keep every connection open; prints "holding ADDR".
//!   idle-conns open --connect ADDR --count N
//!       open N connections, print "open N", then read totals from stdin, one per line, growing
//!       to each (printing "open M"); exits (closing all) on stdin EOF.
#![allow(unsafe_code)]

use std::io::{BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

#[path = "../rlimit.rs"]
mod rlimit;

/// A listener with a deep accept queue (std uses 128), so a burst of proxied connects from the
/// balancer under test is never dropped by the holder.
fn listen(addr: &str) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn usage() -> ! {
    eprintln!("usage: idle-conns hold --listen ADDR | idle-conns open --connect ADDR --count N");
    std::process::exit(64);
}

fn main() {
    rlimit::raise_nofile();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        Some("hold") => {
            let addr = get("--listen").unwrap_or_else(|| usage());
            let l = listen(&addr).unwrap_or_else(|e| {
                eprintln!("bind {addr}: {e}");
                std::process::exit(71)
            });
            println!("holding {}", l.local_addr().expect("addr"));
            let _ = std::io::stdout().flush();
            let mut held = Vec::new();
            loop {
                match l.accept() {
                    Ok((s, _)) => held.push(s),
                    Err(e) => {
                        eprintln!("accept: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
        Some("open") => {
            let addr = get("--connect").unwrap_or_else(|| usage());
            let count: usize = get("--count")
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| usage());
            let mut held: Vec<TcpStream> = Vec::new();
            let grow = |n: usize, held: &mut Vec<TcpStream>| {
                let mut errors = 0;
                while held.len() < n {
                    match TcpStream::connect_timeout(
                        &addr.parse().unwrap_or_else(|_| usage()),
                        Duration::from_secs(5),
                    ) {
                        Ok(s) => held.push(s),
                        Err(e) => {
                            errors += 1;
                            if errors > 100 {
                                eprintln!("connect failed 100 times, last: {e}");
                                std::process::exit(1);
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                println!("open {}", held.len());
                let _ = std::io::stdout().flush();
            };
            grow(count, &mut held);
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if let Ok(n) = line.trim().parse::<usize>() {
                    grow(n, &mut held);
                }
            }
        }
        _ => usage(),
    }
}
