//! Proves the harness itself, before and independently of the Sluice binary: the backends and
//! clients directly against each other, and through socat as a stand-in proxy (socat carries
//! half-close, so every forwarding check here holds for a correct proxy).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use sluice_testkit::{
    EchoServer, SeededStream, Sluice, StreamEnd, assert_echo, free_addr, http_get, read_to_end,
    read_up_to, refusing_addr, run_with_timeout, scrape_metrics, series, verify_echo_many,
    write_stream,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// socat listening on a fresh port and forwarding to `backend`; `None` when socat is absent.
fn socat(backend: SocketAddr) -> Option<(Sluice, SocketAddr)> {
    if !Path::new("/usr/bin/socat").exists() {
        eprintln!("SKIPPED: /usr/bin/socat is not installed (scripts/install-deps.sh installs it)");
        return None;
    }
    let front = free_addr();
    let mut command = Command::new("socat");
    command.args([
        "-d",
        "-d",
        &format!(
            "TCP-LISTEN:{},bind={},fork,reuseaddr,backlog=512",
            front.port(),
            front.ip()
        ),
        &format!("TCP:{backend}"),
    ]);
    Some((Sluice::start_stand_in(command, "listening on"), front))
}

#[test]
fn echo_server_echoes_and_records() {
    let backend = EchoServer::echo();
    let report = assert_echo(backend.addr(), 8 << 20, 1, TIMEOUT);
    let records = backend
        .wait_records(1, Duration::from_secs(5))
        .expect("one record");
    assert_eq!(records[0].received, report.sent);
    assert_eq!(records[0].sent, report.sent.bytes);
    assert_eq!(records[0].error, None);
    assert_eq!(backend.accepted(), 1);
}

#[test]
fn many_connections_through_socat() {
    let backend = EchoServer::echo();
    let Some((_proxy, front)) = socat(backend.addr()) else {
        return;
    };
    let started = Instant::now();
    let results = verify_echo_many(front, 50, 2 << 20, 100, TIMEOUT);
    for (i, result) in results.iter().enumerate() {
        let report = result
            .as_ref()
            .unwrap_or_else(|error| panic!("connection {i}: {error}"));
        report.assert_echoed();
    }
    eprintln!("50 x 2 MiB through socat in {:?}", started.elapsed());
    assert_eq!(backend.accepted(), 50);
}

#[test]
fn client_fin_first_through_socat() {
    let backend = EchoServer::read_then_send(3 << 20, 11);
    let Some((_proxy, front)) = socat(backend.addr()) else {
        return;
    };
    let stream = TcpStream::connect(front).unwrap();
    let sent = write_stream(&stream, 1 << 20, 10, true).unwrap();
    let read = read_to_end(&stream, Instant::now() + TIMEOUT);
    assert_eq!(read.end, StreamEnd::Eof);
    assert_eq!(read.received, SeededStream::summary(11, 3 << 20));
    let records = backend.wait_records(1, Duration::from_secs(5)).unwrap();
    assert_eq!(records[0].received, sent);
}

#[test]
fn backend_fin_first_through_socat() {
    let backend = EchoServer::send_then_fin(1 << 20, 21);
    let Some((_proxy, front)) = socat(backend.addr()) else {
        return;
    };
    let stream = TcpStream::connect(front).unwrap();
    let read = read_to_end(&stream, Instant::now() + TIMEOUT);
    assert_eq!(read.end, StreamEnd::Eof);
    assert_eq!(read.received, SeededStream::summary(21, 1 << 20));
    let sent = write_stream(&stream, 5 << 20, 20, true).unwrap();
    let records = backend.wait_records(1, TIMEOUT).unwrap();
    assert_eq!(records[0].received, sent);
}

#[test]
fn reset_after_bytes_is_seen_as_reset() {
    let backend = EchoServer::send_then_reset(2 << 20, 31);
    let stream = TcpStream::connect(backend.addr()).unwrap();
    // Let the server fill the socket buffers before the client starts reading.
    thread::sleep(Duration::from_millis(100));
    let read = read_to_end(&stream, Instant::now() + TIMEOUT);
    assert_eq!(read.received, SeededStream::summary(31, 2 << 20));
    assert_eq!(read.end, StreamEnd::Reset);
    let records = backend.wait_records(1, Duration::from_secs(5)).unwrap();
    assert_eq!(
        records[0].error, None,
        "the server could not wait for the acknowledgement"
    );
}

#[test]
fn greeting_through_socat_reaches_a_silent_client() {
    let backend = EchoServer::greeting(b"220 hello\r\n");
    let Some((_proxy, front)) = socat(backend.addr()) else {
        return;
    };
    let stream = TcpStream::connect(front).unwrap();
    let read = read_up_to(&stream, 11, Instant::now() + Duration::from_secs(5));
    assert_eq!(read.end, StreamEnd::LimitReached);
    assert_eq!(read.received, sluice_testkit::summary_of(b"220 hello\r\n"));
}

#[test]
fn refusing_addr_refuses_promptly() {
    let started = Instant::now();
    let error = TcpStream::connect_timeout(&refusing_addr(), Duration::from_secs(2)).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn process_handle_observes_and_terminates() {
    let backend = EchoServer::echo();
    let Some((mut proxy, front)) = socat(backend.addr()) else {
        return;
    };
    assert!(proxy.rss_kib() > 0);
    assert!(proxy.fd_count() >= 3);
    assert!(proxy.cpu_time() < Duration::from_secs(5));
    assert!(proxy.stderr_text().contains("listening on"));
    assert_echo(front, 1000, 1, TIMEOUT);
    let status = proxy
        .terminate(Duration::from_secs(5))
        .expect("socat exits on SIGTERM");
    assert!(
        !status.success() || status.success(),
        "an exit status was reaped"
    );
    assert!(TcpStream::connect_timeout(&front, Duration::from_secs(1)).is_err());
}

#[test]
fn run_with_timeout_bounds_a_hung_command() {
    let started = Instant::now();
    let error =
        run_with_timeout(Command::new("sleep").arg("10"), Duration::from_millis(300)).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(3));
    let output = run_with_timeout(
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        TIMEOUT,
    )
    .unwrap();
    assert_eq!(
        (
            output.status.code(),
            output.stdout.as_str(),
            output.stderr.as_str()
        ),
        (Some(3), "out\n", "err\n")
    );
}

#[test]
fn scrape_reads_a_prometheus_page() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0; 1024];
            let _ = stream.read(&mut request).unwrap();
            let body = "# TYPE sluice_connections_accepted_total counter\n\
                sluice_connections_accepted_total{listener=\"echo\"} 7\n";
            write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{body}"
            )
            .unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
        }
    });
    let metrics = scrape_metrics(addr).unwrap();
    assert_eq!(
        metrics[&series("sluice_connections_accepted_total", &[("listener", "echo")])],
        7.0
    );
    let response = http_get(addr, "/healthz").unwrap();
    assert_eq!(response.status, 200);
    server.join().unwrap();
}
