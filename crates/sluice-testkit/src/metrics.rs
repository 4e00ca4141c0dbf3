//! Reading the admin endpoint: plain HTTP/1.0 over a `TcpStream`, Prometheus text parsed into a map.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// How long one admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP response: status code and body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, as text.
    pub body: String,
}

/// `GET path` over HTTP/1.0 (bounded to 5 s).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    // One write: a server that answers after the first segment must see the whole request.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} in response: {text:?}"),
        )
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status code"))?;
    Ok(HttpResponse {
        status,
        body: body.to_owned(),
    })
}

/// Scrapes `GET /metrics` into a map from series to value.
///
/// Keys are the series text `name{label="value",...}` with labels sorted by name, as [`series`]
/// builds them, so a test's key matches whatever label order the exporter prints; a series without
/// labels is its bare name.
pub fn scrape_metrics(addr: SocketAddr) -> io::Result<HashMap<String, f64>> {
    let response = http_get(addr, "/metrics")?;
    if response.status != 200 {
        return Err(io::Error::other(format!(
            "GET /metrics answered {}: {}",
            response.status, response.body
        )));
    }
    Ok(parse_prometheus(&response.body))
}

/// The key [`scrape_metrics`] uses for `name` with `labels`.
pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    render(name, &mut labels)
}

/// One value of `/metrics`: 0 when the series is absent (a counter not yet touched). Panics
/// when `/metrics` does not answer.
pub fn metric(addr: SocketAddr, key: &str) -> f64 {
    scrape_metrics(addr)
        .unwrap_or_else(|e| panic!("scrape /metrics at {addr}: {e}"))
        .get(key)
        .copied()
        .unwrap_or(0.0)
}

/// `sluice_connections_closed_total` of `listener` for `reason` (see [`metric`]).
pub fn closed_connections(addr: SocketAddr, listener: &str, reason: &str) -> f64 {
    let key = series(
        "sluice_connections_closed_total",
        &[("listener", listener), ("reason", reason)],
    );
    metric(addr, &key)
}

/// Polls `/metrics` until `key` equals `expected` or `timeout` passes; returns the last value seen
/// (`None` when the series was absent), so the caller asserts with the real value in the message.
/// Counters are merged from the workers when scraped and a close is counted just after the
/// client sees it, hence the polling.
pub fn wait_metric(addr: SocketAddr, key: &str, expected: f64, timeout: Duration) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = scrape_metrics(addr)
            .ok()
            .and_then(|metrics| metrics.get(key).copied());
        if value == Some(expected) || Instant::now() >= deadline {
            return value;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Parses Prometheus text exposition into [`scrape_metrics`]'s map; lines it cannot read are skipped.
pub fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_sample)
        .collect()
}

fn parse_sample(line: &str) -> Option<(String, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let (name, rest) = line.split_once(char::is_whitespace)?;
            (name, Vec::new(), rest)
        }
    };
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().ok()?,
    };
    let mut labels = labels;
    Some((render(name.trim(), &mut labels), value))
}

/// `a="x",b="y\"z"` into pairs, unescaping values.
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().trim_start_matches(',').trim().to_owned(), value));
        rest = after[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Some(labels)
}

fn render(name: &str, labels: &mut [(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    labels.sort();
    let body: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{name}{{{}}}", body.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises_label_order() {
        let text = "# HELP x y\n# TYPE sluice_bytes_to_backend_total counter\n\
            sluice_bytes_to_backend_total{listener=\"web\",backend=\"127.0.0.1:7001\"} 1234\n\
            sluice_up 1\n\
            weird{a=\"q\\\"uote, }\",b=\"2\"} 5 1700000000\n";
        let metrics = parse_prometheus(text);
        let key = series(
            "sluice_bytes_to_backend_total",
            &[("listener", "web"), ("backend", "127.0.0.1:7001")],
        );
        assert_eq!(
            key,
            "sluice_bytes_to_backend_total{backend=\"127.0.0.1:7001\",listener=\"web\"}"
        );
        assert_eq!(metrics.get(&key), Some(&1234.0));
        assert_eq!(metrics.get("sluice_up"), Some(&1.0));
        assert_eq!(
            metrics.get(&series("weird", &[("b", "2"), ("a", "q\"uote, }")])),
            Some(&5.0)
        );
    }
}
