//! The admin endpoint: HTTP/1 (hyper) on the control plane's runtime. `GET /metrics` and
//! `GET /healthz`; each connection carries one request and its response, then is closed.
//!
//! Bounded in count and in time, so that clients can neither take the descriptors the data
//! plane counted on nor hold memory without end:
//! - At most `admin.max_connections` connections at once; one over the cap is accepted and
//!   closed at once, never left in the kernel's backlog. The data plane's fd budget leaves this
//!   many descriptors (and the listening socket's) to the admin endpoint (`plan::plane`).
//! - One deadline per exchange: the request must arrive within [`REQUEST_DEADLINE`] of the
//!   accept, and its response be written within [`RESPONSE_DEADLINE`] of being ready. A client
//!   that does not read its response is reset at that deadline, which frees the response and
//!   what the kernel still queued for it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics_render::MetricsView;

/// Time from the accept to the end of the request head.
pub(crate) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Time from a response being ready to its last byte written.
pub(crate) const RESPONSE_DEADLINE: Duration = Duration::from_secs(5);
/// The largest request head read (hyper's smallest buffer); larger heads get 431.
const HEAD_BYTES_MAX: usize = 8 * 1024;
/// How often a repeated warning (out of fds, at the cap) may be logged.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// Binds `bind` (an error here fails the start) and serves in the background, at most
/// `max_connections` connections at once.
pub(crate) async fn serve(
    bind: SocketAddr,
    max_connections: u32,
    view: MetricsView,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(bind).await?;
    let view = Arc::new(view);
    let slots = Arc::new(Semaphore::new(max_connections as usize));
    tokio::spawn(async move {
        let mut out_of_fds = Warning::default();
        let mut at_cap = Warning::default();
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        tokio::spawn(exchange(stream, Arc::clone(&view), slot));
                    }
                    Err(_) => {
                        drop(stream);
                        view.admin_refused
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if at_cap.due() {
                            tracing::warn!(
                                max_connections,
                                "admin.max_connections reached: new admin connections are \
                                 closed at once"
                            );
                        }
                    }
                },
                Err(e) => {
                    // Out of fds (EMFILE), accept fails until some close: back off meanwhile,
                    // like the workers do.
                    if out_of_fds.due() {
                        tracing::warn!(error = e.to_string(), "admin accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

/// One connection: one request and its response, each within its deadline. `_slot` is this
/// connection's share of `admin.max_connections`, given back when it ends.
async fn exchange(stream: TcpStream, view: Arc<MetricsView>, _slot: OwnedSemaphorePermit) {
    let accepted = Instant::now();
    let responded = Arc::new(Notify::new());
    let service = {
        let responded = Arc::clone(&responded);
        service_fn(move |request: Request<Incoming>| {
            let view = Arc::clone(&view);
            let responded = Arc::clone(&responded);
            async move {
                let response = respond(&request, &view);
                // The response deadline starts once the response exists (rendering /metrics
                // takes a while with thousands of backends).
                responded.notify_one();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let mut connection = http1::Builder::new()
        .keep_alive(false)
        .half_close(true)
        .max_buf_size(HEAD_BYTES_MAX)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // Ended before a response was ready: closed by the client, or a malformed request
        // that hyper answered (400, 431).
        _ = &mut connection => return,
        () = responded.notified() => {}
        // No whole request in time: closing is all it gets.
        () = tokio::time::sleep_until(accepted + REQUEST_DEADLINE) => return,
    }
    if tokio::time::timeout(RESPONSE_DEADLINE, &mut connection)
        .await
        .is_err()
    {
        // The client does not read: reset, so that the kernel drops what it still queued
        // instead of keeping it for an orphaned socket.
        let stream = connection.into_parts().io.into_inner();
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
}

/// The admin endpoint's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `GET /metrics`: Prometheus text.
    Metrics,
    /// `GET /healthz`: the process is alive.
    Healthz,
}

impl Endpoint {
    /// The endpoint at `path` (the query string is not part of it).
    fn at(path: &str) -> Option<Self> {
        match path {
            "/metrics" => Some(Self::Metrics),
            "/healthz" => Some(Self::Healthz),
            _ => None,
        }
    }

    /// The methods the endpoint answers (for 405 and its `Allow` header). HEAD is GET
    /// without the body, which hyper leaves out.
    fn allow(self) -> &'static [Method] {
        match self {
            Self::Metrics | Self::Healthz => &[Method::GET, Method::HEAD],
        }
    }
}

/// Routes one request: 404 for an unknown path, 405 for a method the endpoint does not take.
fn respond(request: &Request<Incoming>, view: &MetricsView) -> Response<String> {
    let Some(endpoint) = Endpoint::at(request.uri().path()) else {
        return text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_owned(),
        );
    };
    let allow = endpoint.allow();
    if !allow.contains(request.method()) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD are allowed\n".to_owned(),
        );
        let names: Vec<&str> = allow.iter().map(Method::as_str).collect();
        if let Ok(value) = HeaderValue::from_str(&names.join(", ")) {
            response.headers_mut().insert(ALLOW, value);
        }
        return response;
    }
    match endpoint {
        Endpoint::Metrics => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            view.render(),
        ),
        Endpoint::Healthz => text(StatusCode::OK, "text/plain", "ok\n".to_owned()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A warning logged at most once per [`WARN_EVERY`].
#[derive(Default)]
struct Warning {
    logged: Option<Instant>,
}

impl Warning {
    /// Whether to log now; if so, the next one waits [`WARN_EVERY`].
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.logged.is_some_and(|at| now - at < WARN_EVERY) {
            return false;
        }
        self.logged = Some(now);
        true
    }
}
