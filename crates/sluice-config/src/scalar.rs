//! Parsers for the config's scalar spellings: durations and addresses.
//!
//! Each takes the text as written and returns the value or a message that says what was
//! expected. They never panic, whatever the input.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::BackendAddress;

/// The longest duration accepted anywhere. Longer ones are surely typos, and keeping
/// durations small means `Instant + duration` can never overflow in the binary.
pub(crate) const DURATION_MAX: Duration = Duration::from_secs(365 * 24 * 3600);

const DURATION_EXPECTED: &str =
    "expected a whole number with a unit (ms, s, m, h), e.g. 250ms or 2s, or 0";

/// Parses `0`, or a whole number followed directly by `ms`, `s`, `m` or `h`.
///
/// Fractions are rejected (with a hint to use a smaller unit) so that every accepted
/// spelling is exact and there is one way to write each value.
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if !digits.is_empty() && unit.starts_with('.') {
        return Err(format!(
            "invalid duration {text:?}: fractions are not supported; use a smaller unit, \
             e.g. 1500ms instead of 1.5s"
        ));
    }
    let seconds_per_unit = match unit {
        "ms" => None,
        "s" => Some(1),
        "m" => Some(60),
        "h" => Some(3600),
        _ => return Err(format!("invalid duration {text:?}: {DURATION_EXPECTED}")),
    };
    if digits.is_empty() {
        return Err(format!("invalid duration {text:?}: {DURATION_EXPECTED}"));
    }
    let too_long = || {
        format!(
            "invalid duration {text:?}: must be at most {}h",
            DURATION_MAX.as_secs() / 3600
        )
    };
    // Digits that overflow u64 are far beyond DURATION_MAX in any unit.
    let count: u64 = digits.parse().map_err(|_| too_long())?;
    let value = match seconds_per_unit {
        None => Duration::from_millis(count),
        Some(unit) => Duration::from_secs(count.checked_mul(unit).ok_or_else(too_long)?),
    };
    if value > DURATION_MAX {
        return Err(too_long());
    }
    Ok(value)
}

/// Parses a listening address: an IP address and a port, IPv6 in brackets. Port 0 is refused:
/// every worker binds its own socket, so the kernel would give each a different port, and no
/// client could know any of them.
pub(crate) fn bind(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        if address.port() == 0 {
            return Err(format!(
                "invalid address {text:?}: the port must be between 1 and 65535 (with port 0 \
                 the kernel would pick a port that no client knows)"
            ));
        }
        return Ok(address);
    }
    Err(format!(
        "invalid address {text:?}: {}",
        address_problem(text).unwrap_or(
            "expected an IP address and a port, e.g. \"0.0.0.0:6379\" or \"[::]:6379\" \
             (hostnames are not allowed here)"
        )
    ))
}

/// Parses a backend address: an IP address and a port, or a hostname and a port. The
/// hostname is kept as written; the binary resolves it.
pub(crate) fn backend(text: &str) -> Result<BackendAddress, String> {
    let invalid = |why: &str| format!("invalid backend address {text:?}: {why}");
    if let Ok(address) = text.parse::<SocketAddr>() {
        if address.port() == 0 {
            return Err(invalid("the port must be between 1 and 65535"));
        }
        return Ok(BackendAddress::Ip(address));
    }
    if let Some(problem) = address_problem(text) {
        return Err(invalid(problem));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(invalid("a port is required, e.g. \"db.example:5432\""));
    };
    let port = match port.parse::<u16>() {
        Ok(port) if port > 0 => port,
        _ => return Err(invalid("the port must be between 1 and 65535")),
    };
    hostname(host).map_err(invalid)?;
    Ok(BackendAddress::Host {
        host: host.to_owned(),
        port,
    })
}

const IPV6_UNBRACKETED: &str =
    "an IPv6 address must be in brackets and followed by a port, e.g. \"[::1]:6379\"";

/// Recognises the mistakes that are worth a specific message: an IP address without a port,
/// and an IPv6 address without brackets.
fn address_problem(text: &str) -> Option<&'static str> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(match ip {
            IpAddr::V4(_) => "a port is required, e.g. \"10.0.0.1:6379\"",
            IpAddr::V6(_) => IPV6_UNBRACKETED,
        });
    }
    if text.starts_with('[') {
        return Some("expected a bracketed IPv6 address and a port, e.g. \"[::1]:6379\"");
    }
    if text.matches(':').count() > 1 {
        return Some(IPV6_UNBRACKETED);
    }
    None
}

/// Checks a DNS name: labels of 1 to 63 letters, digits, `-` or `_` (not starting or ending
/// with `-`), 253 characters at most, an optional final dot.
fn hostname(host: &str) -> Result<(), &'static str> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("expected an IP address or a hostname before the port");
    }
    if name.len() > 253 {
        return Err("a hostname is at most 253 characters");
    }
    for label in name.split('.') {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(
                "a hostname is made of dot-separated labels of 1 to 63 letters, \
                        digits, '-' or '_'",
            );
        }
    }
    // No top-level domain is all digits, so this is a mistyped IPv4 address such as
    // 10.0.0.256; resolving it as a name would only fail later and less clearly.
    if name
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("not a valid IPv4 address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        assert_eq!(duration("0s"), Ok(Duration::ZERO));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("8760h"), Ok(DURATION_MAX));
        for bad in [
            "", "s", "2", "2 s", "2sec", "-1s", "+1s", "1.5s", "2S", "１s", "0x10s",
        ] {
            assert!(duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(duration("1.5s").unwrap_err().contains("1500ms"));
        assert!(duration("8761h").unwrap_err().contains("at most 8760h"));
        assert!(duration("99999999999999999999999h").is_err());
        assert!(duration("18446744073709551615h").is_err());
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(bind("0.0.0.0:6379"), Ok("0.0.0.0:6379".parse().unwrap()));
        assert_eq!(bind("[::]:6379"), Ok("[::]:6379".parse().unwrap()));
        assert!(
            bind("127.0.0.1:0")
                .unwrap_err()
                .contains("between 1 and 65535")
        );
        assert!(bind("[::]:0").is_err());
        assert!(
            bind("localhost:80")
                .unwrap_err()
                .contains("hostnames are not allowed")
        );
        assert!(bind("::1:80").unwrap_err().contains("brackets"));
        assert!(bind("10.0.0.1").unwrap_err().contains("port is required"));
        assert!(bind("0.0.0.0:65536").is_err());
    }

    #[test]
    fn backend_addresses() {
        let ip = |s: &str| Ok(BackendAddress::Ip(s.parse().unwrap()));
        let host = |h: &str, port| {
            Ok(BackendAddress::Host {
                host: h.to_owned(),
                port,
            })
        };
        assert_eq!(backend("10.0.0.1:6379"), ip("10.0.0.1:6379"));
        assert_eq!(backend("[::1]:6379"), ip("[::1]:6379"));
        assert_eq!(backend("db.example:5432"), host("db.example", 5432));
        assert_eq!(backend("redis_1:6379"), host("redis_1", 6379));
        assert_eq!(backend("db.example.:5432"), host("db.example.", 5432));
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.256:80",
            "::1:6379",
            "[::1]",
            "[::1:6379",
            "db.example",
            "db.example:",
            "db.example:99999",
            ":80",
            "-db:80",
            "db..example:80",
            "db example:80",
            "db/x:80",
        ] {
            assert!(backend(bad).is_err(), "{bad:?} accepted");
        }
        assert!(backend("::1:6379").unwrap_err().contains("brackets"));
        let long = format!("{}:80", "a.".repeat(128));
        assert!(backend(&long).is_err());
    }
}
