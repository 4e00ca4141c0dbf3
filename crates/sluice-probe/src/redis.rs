//! `redis`: optional `AUTH`, `PING` answered by `+PONG`, and optionally `ROLE`, pipelined in one
//! write and answered in order.

use std::net::SocketAddr;

use sluice_health::RedisRole;

use crate::conn::Conn;
use crate::outcome::{Failure, Step, shown};
use crate::resp::{self, Element, Parsed};
use crate::secret::Secret;

#[derive(Debug)]
pub(crate) struct Redis {
    /// The pipelined commands; holds the password when there is one.
    request: Secret,
    password: Option<Secret>,
    role: Option<RedisRole>,
}

/// A reply element copied out of the receive buffer.
#[derive(Debug)]
enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<usize>),
}

impl Redis {
    pub(crate) fn new(password: Option<Secret>, role: Option<RedisRole>) -> Redis {
        let mut request = Vec::new();
        if let Some(password) = &password {
            resp::encode_command(&mut request, &[b"AUTH", password.expose()]);
        }
        resp::encode_command(&mut request, &[b"PING"]);
        if role.is_some() {
            resp::encode_command(&mut request, &[b"ROLE"]);
        }
        Redis {
            request: Secret::new(request),
            password,
            role,
        }
    }

    pub(crate) async fn run(&self, addr: SocketAddr, step: &mut Step) -> Result<(), Failure> {
        let mut conn = Conn::open(addr, step).await?;
        conn.send(self.request.expose()).await?;
        let mut at = 0;
        if self.password.is_some() {
            match next_reply(&mut conn, &mut at, "the AUTH reply").await? {
                Reply::Simple(text) if text == b"OK" => {}
                Reply::Error(text) => {
                    return Err(Failure::Authentication {
                        message: self.scrubbed(&text),
                    });
                }
                other => return Err(self.unexpected("+OK", &other)),
            }
        }
        match next_reply(&mut conn, &mut at, "the PING reply").await? {
            Reply::Simple(text) if text == b"PONG" => {}
            other => return Err(self.unexpected("+PONG", &other)),
        }
        let Some(want) = self.role else {
            return Ok(());
        };
        // Only the first element matters; the rest of the reply is left unread.
        match next_reply(&mut conn, &mut at, "the ROLE reply").await? {
            Reply::Array(Some(count)) if count > 0 => {}
            other => return Err(self.unexpected("a ROLE array", &other)),
        }
        let name = match next_reply(&mut conn, &mut at, "the ROLE reply").await? {
            Reply::Bulk(Some(name)) if !name.is_empty() => name,
            other => return Err(self.unexpected("a role name", &other)),
        };
        let actual = match name.as_slice() {
            b"master" => Some(RedisRole::Master),
            // Redis 7 still answers `slave`; Valkey and newer servers may say `replica`.
            b"slave" | b"replica" => Some(RedisRole::Replica),
            _ => None,
        };
        match actual {
            Some(actual) if actual == want => Ok(()),
            Some(actual) => Err(Failure::WrongRole {
                actual: role_name(actual).to_owned(),
                want: role_name(want),
            }),
            None => Err(Failure::WrongRole {
                actual: self.scrubbed(&name),
                want: role_name(want),
            }),
        }
    }

    fn unexpected(&self, expected: &str, got: &Reply) -> Failure {
        let got = match got {
            Reply::Simple(text) => [b"+", text.as_slice()].concat(),
            Reply::Error(text) => [b"-", text.as_slice()].concat(),
            Reply::Integer(value) => format!(":{value}").into_bytes(),
            Reply::Bulk(Some(text)) => [b"bulk string ", text.as_slice()].concat(),
            Reply::Bulk(None) => b"null bulk string".to_vec(),
            Reply::Array(Some(count)) => format!("array of {count}").into_bytes(),
            Reply::Array(None) => b"null array".to_vec(),
        };
        Failure::Unexpected {
            expected: expected.to_owned(),
            got: self.scrubbed(&got),
        }
    }

    /// Backend text shown in a failure, with the password masked should the server echo it.
    fn scrubbed(&self, text: &[u8]) -> String {
        match &self.password {
            Some(password) => shown(&mask(text, password.expose())),
            None => shown(text),
        }
    }
}

/// Reads until one whole element follows `at` in the buffer, and moves `at` past it.
async fn next_reply(
    conn: &mut Conn<'_>,
    at: &mut usize,
    what: &'static str,
) -> Result<Reply, Failure> {
    loop {
        let buf = &conn.received()[*at..];
        match resp::parse(buf) {
            Parsed::Done(element, len) => {
                let reply = match element {
                    Element::Simple(text) => Reply::Simple(text.to_vec()),
                    Element::Error(text) => Reply::Error(text.to_vec()),
                    Element::Integer(value) => Reply::Integer(value),
                    Element::Bulk(text) => Reply::Bulk(text.map(<[u8]>::to_vec)),
                    Element::Array(count) => Reply::Array(count),
                };
                *at += len;
                return Ok(reply);
            }
            Parsed::Invalid(why) => {
                return Err(Failure::Protocol {
                    message: format!("{why} in {what}: {}", shown(buf)),
                });
            }
            Parsed::Incomplete => conn.receive_more(what).await?,
        }
    }
}

fn role_name(role: RedisRole) -> &'static str {
    match role {
        RedisRole::Master => "master",
        RedisRole::Replica => "replica",
    }
}

/// `text` with every occurrence of `secret` replaced by `***`.
fn mask(text: &[u8], secret: &[u8]) -> Vec<u8> {
    if secret.is_empty() {
        return text.to_vec();
    }
    let mut out = Vec::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if rest.starts_with(secret) {
            out.extend_from_slice(b"***");
            rest = &rest[secret.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_pipelined() {
        let redis = Redis::new(
            Some(Secret::new(b"s3cret".to_vec())),
            Some(RedisRole::Master),
        );
        assert_eq!(
            redis.request.expose(),
            b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nROLE\r\n"
        );
        assert!(!format!("{redis:?}").contains("s3cret"));
        let plain = Redis::new(None, None);
        assert_eq!(plain.request.expose(), b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn echoed_passwords_are_masked() {
        let redis = Redis::new(Some(Secret::new(b"hunter2".to_vec())), None);
        let failure = redis.unexpected("+OK", &Reply::Error(b"ERR bad hunter2 x hunter2".to_vec()));
        assert_eq!(failure.to_string(), "expected +OK, got -ERR bad *** x ***");
        assert_eq!(mask(b"aaa", b"aa"), b"***a");
    }
}
