//! One session of a flow ([`Session`]), its [`SessionState`], and the `requests`/`responses`
//! limits ([`Limits`]) that end it.
//!
//! # `requests` and `responses`
//!
//! These follow nginx's `proxy_requests` and `proxy_responses` as nginx implements them
//! (`ngx_stream_proxy_test_finalize`), with one difference: `0` means unlimited for both keys
//! (nginx's default), so there is no way to say nginx's `proxy_responses 0`, "expect no reply".
//! A session counts the datagrams it forwarded from the client to its backend (`requests`) and
//! from its backend to the client (`responses`); after each one, with `R = requests` and
//! `M = responses` from the config:
//!
//! - **Unbound** once `R > 0` and `requests >= R`: the session takes no more datagrams from its
//!   client. The client's next datagram starts a new session (a new pick of backend), while this
//!   one keeps relaying its backend's replies until it is finished or idle.
//! - **Finished** once (`R == 0` or `requests >= R`) and `M > 0` and
//!   `responses >= M * requests`: every expected reply has been relayed, and the driver closes
//!   the session at once. `M` is a number of replies *per request*: with `responses: 1` a session
//!   that forwarded two queries before the first answer waits for two answers.
//! - Otherwise the session stays **Open** and ends only when it is idle for `timeouts.idle`, or
//!   evicted.
//!
//! So `responses: 1` (DNS) frees each session after its answer; `requests: 1, responses: 1` also
//! sends every query of one client port to a fresh pick; `requests: N` alone rebalances a client
//! every `N` datagrams and lets each old session idle out.

use std::time::Instant;

use crate::key::{FlowId, FlowKey};

/// A listener's `requests` and `responses` settings; `0` is unlimited. See the [module
/// documentation](self) for what they do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Datagrams from the client after which the session takes no more (`requests`).
    pub requests: u32,
    /// Replies expected per request, after which the session is finished (`responses`).
    pub responses: u32,
}

/// Where a session is in its life, as its `requests` and `responses` counts and the
/// [`Limits`] decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Takes datagrams from its client and relays replies: what lookups by key find.
    Open,
    /// Took its last request: relays replies, but the client's next datagram starts a new
    /// session. Found only by its [`FlowId`].
    Unbound,
    /// Relayed every expected reply: the driver should remove it (by its [`FlowId`]) and close
    /// its backend socket. Found only by its [`FlowId`] until then.
    Finished,
}

/// One session of a flow: the driver's `payload` (its backend socket and backend identity) and
/// what the table keeps about it.
#[derive(Debug)]
pub struct Session<S> {
    /// The driver's per-session state: typically the connected backend socket and the backend's
    /// identity with the snapshot generation it was picked in.
    pub payload: S,
    key: FlowKey,
    id: FlowId,
    created: Instant,
    last_active: Instant,
    requests: u64,
    responses: u64,
    state: SessionState,
}

impl<S> Session<S> {
    /// The flow: the client's address and the local address its replies leave from.
    pub fn key(&self) -> FlowKey {
        self.key
    }

    /// This session's handle in its table; stale once the session has left it.
    pub fn id(&self) -> FlowId {
        self.id
    }

    /// When the session was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// When a datagram last went through the session either way (as the table last saw time).
    pub fn last_active(&self) -> Instant {
        self.last_active
    }

    /// Datagrams forwarded from the client to the backend, as recorded by
    /// [`Session::record_request`].
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Datagrams relayed from the backend to the client, as recorded by
    /// [`Session::record_response`].
    pub fn responses(&self) -> u64 {
        self.responses
    }

    /// Where the session is in its life.
    pub fn state(&self) -> SessionState {
        self.state
    }

    /// Counts one datagram forwarded from the client to the backend and answers the session's
    /// state after it. `Unbound` and `Finished` are explained in the [module
    /// documentation](self); the driver forwards this datagram in every case, then removes the
    /// session if it is `Finished`.
    pub fn record_request(&mut self, limits: Limits) -> SessionState {
        self.requests = self.requests.saturating_add(1);
        self.judge(limits)
    }

    /// Counts one datagram relayed from the backend to the client and answers the session's
    /// state after it; `Finished` means the driver relays this reply and then removes the
    /// session.
    pub fn record_response(&mut self, limits: Limits) -> SessionState {
        self.responses = self.responses.saturating_add(1);
        self.judge(limits)
    }

    pub(crate) fn new(key: FlowKey, id: FlowId, payload: S, now: Instant) -> Session<S> {
        Session {
            payload,
            key,
            id,
            created: now,
            last_active: now,
            requests: 0,
            responses: 0,
            state: SessionState::Open,
        }
    }

    pub(crate) fn touch(&mut self, now: Instant) {
        self.last_active = now;
    }

    /// Unbinds an open session whose key the table gives to a newer session.
    pub(crate) fn unbind(&mut self) {
        if self.state == SessionState::Open {
            self.state = SessionState::Unbound;
        }
    }

    /// nginx's `ngx_stream_proxy_test_finalize` for UDP, with 0 meaning unlimited for both
    /// limits. A state never goes back: `requests` only grows, and a finished session stays so.
    fn judge(&mut self, limits: Limits) -> SessionState {
        if self.state == SessionState::Finished {
            return self.state;
        }
        let requests_done = limits.requests == 0 || self.requests >= u64::from(limits.requests);
        let responses_done = limits.responses != 0
            && self.responses >= u64::from(limits.responses).saturating_mul(self.requests);
        if requests_done && responses_done {
            self.state = SessionState::Finished;
        } else if limits.requests != 0 && requests_done {
            self.state = SessionState::Unbound;
        }
        self.state
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use SessionState::{Finished, Open, Unbound};

    fn session() -> Session<()> {
        let key = FlowKey::new(
            SocketAddr::from(([192, 0, 2, 1], 5000)),
            SocketAddr::from(([198, 51, 100, 1], 53)),
        );
        Session::new(key, FlowId::new(0, 0), (), Instant::now())
    }

    fn limits(requests: u32, responses: u32) -> Limits {
        Limits {
            requests,
            responses,
        }
    }

    #[test]
    fn unlimited_never_ends() {
        let mut s = session();
        for _ in 0..1000 {
            assert_eq!(s.record_request(Limits::default()), Open);
            assert_eq!(s.record_response(Limits::default()), Open);
        }
        assert_eq!((s.requests(), s.responses()), (1000, 1000));
    }

    #[test]
    fn dns_one_response_finishes_after_the_answer() {
        let l = limits(0, 1);
        let mut s = session();
        assert_eq!(s.record_request(l), Open);
        assert_eq!(s.record_response(l), Finished);
    }

    #[test]
    fn responses_count_per_request() {
        // Two queries before the first answer: the session waits for two answers.
        let l = limits(0, 1);
        let mut s = session();
        assert_eq!(s.record_request(l), Open);
        assert_eq!(s.record_request(l), Open);
        assert_eq!(s.record_response(l), Open);
        assert_eq!(s.record_response(l), Finished);

        // Three replies per request.
        let l = limits(0, 3);
        let mut s = session();
        s.record_request(l);
        assert_eq!(s.record_response(l), Open);
        assert_eq!(s.record_response(l), Open);
        assert_eq!(s.record_response(l), Finished);
    }

    #[test]
    fn requests_alone_unbind_and_never_finish() {
        let l = limits(2, 0);
        let mut s = session();
        assert_eq!(s.record_request(l), Open);
        assert_eq!(s.record_request(l), Unbound);
        for _ in 0..10 {
            assert_eq!(s.record_response(l), Unbound);
        }
    }

    #[test]
    fn requests_and_responses_finish_after_all_replies() {
        let l = limits(2, 1);
        let mut s = session();
        assert_eq!(s.record_request(l), Open);
        // The first request's answer does not finish a session that still takes requests.
        assert_eq!(s.record_response(l), Open);
        assert_eq!(s.record_request(l), Unbound);
        assert_eq!(s.record_response(l), Finished);
        // Finished stays finished.
        assert_eq!(s.record_response(l), Finished);
        assert_eq!(s.record_request(l), Finished);
    }

    #[test]
    fn surplus_replies_can_finish_on_a_request() {
        // A backend that answered twice to the first request: once the last request is in,
        // the replies already relayed cover it (nginx checks after either direction too).
        let l = limits(2, 1);
        let mut s = session();
        s.record_request(l);
        s.record_response(l);
        s.record_response(l);
        assert_eq!(s.record_request(l), Finished);
    }
}
