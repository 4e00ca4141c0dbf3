//! The admin endpoint: a small HTTP/1.x server on the control plane's runtime. `GET /metrics`
//! and `GET /healthz`; each request gets one response and the connection is closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics_render::MetricsView;

/// The largest request head read; larger requests get 431.
const HEAD_BYTES_MAX: usize = 8 * 1024;
/// A client that sends its request slower than this is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `bind` (an error here fails the start) and serves in the background.
pub(crate) async fn serve(bind: SocketAddr, view: MetricsView) -> std::io::Result<()> {
    let listener = TcpListener::bind(bind).await?;
    let view = Arc::new(view);
    tokio::spawn(async move {
        // Out of fds (EMFILE), accept fails until some close: log it at most once a second,
        // like the workers do, and back off meanwhile.
        let mut logged: Option<tokio::time::Instant> = None;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(handle(stream, view.clone()));
                }
                Err(e) => {
                    let now = tokio::time::Instant::now();
                    if logged.is_none_or(|at| now - at >= Duration::from_secs(1)) {
                        tracing::warn!(error = %e, "admin accept failed");
                        logged = Some(now);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn handle(mut stream: TcpStream, view: Arc<MetricsView>) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => respond(&head, &view),
        Ok(Err(HeadError::TooLarge)) => reply(431, "text/plain", "request header too large\n"),
        Ok(Err(HeadError::Closed)) | Err(_) => return,
    };
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
}

enum HeadError {
    TooLarge,
    Closed,
}

/// Reads until the blank line that ends the request head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        head.extend_from_slice(&chunk[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > HEAD_BYTES_MAX {
            return Err(HeadError::TooLarge);
        }
    }
}

fn respond(head: &[u8], view: &MetricsView) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return reply(400, "text/plain", "malformed request line\n");
    };
    let path = target.split('?').next().unwrap_or(target);
    match (method, path) {
        ("GET", "/metrics") => reply(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            &view.render(),
        ),
        ("GET", "/healthz") => reply(200, "text/plain", "ok\n"),
        (_, "/metrics" | "/healthz") => reply(405, "text/plain", "only GET is allowed\n"),
        _ => reply(404, "text/plain", "not found: try /metrics or /healthz\n"),
    }
}

fn reply(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
