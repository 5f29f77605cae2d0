//! Kept-alive HTTP/1.1 connections for the budget client's one-shot requests.
//!
//! The ledger (every 200 ms), spend reports (every 100 ms) and leases (on the request path) all
//! go to the budget service; a fresh mTLS connection for each was up to ~15 full handshakes a
//! second per sidecar, paid on both sides. Idle connections are kept here instead and handed to
//! the next request.
//!
//! A connection is given out only while it is open, younger than the pool's maximum age and
//! made with the SVID the sidecar holds now: the server authorises every request by the
//! certificate presented at the handshake, so after a rotation (or once an hour-old SVID nears
//! expiry) the next request opens a new connection that presents the current one. Connections
//! that fail these checks are dropped, which closes them.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use rustls::sign::CertifiedKey;
use tokio::time::Instant;

/// Idle connections kept at most: the budget client's callers (ledger, spend, leases) rarely
/// overlap more than this; a burst beyond it opens connections that close after use.
const MAX_IDLE: usize = 4;

/// The SVID a connection presented at its handshake (`None`: anonymous, before the first one).
pub(super) type Svid = Option<Arc<CertifiedKey>>;

/// One HTTP/1.1 connection to the control plane.
pub(super) struct Conn {
    pub(super) sender: SendRequest<Full<Bytes>>,
    born: Instant,
    svid: Svid,
    /// Whether it served a request before this one: only then may a failure be the server
    /// having closed it while idle, which is worth one retry on a fresh connection.
    pub(super) reused: bool,
}

impl Conn {
    /// A connection just made, with the SVID that was current when it was opened (the handshake
    /// reads the SVID after that, so it presented this one or a newer one).
    pub(super) fn fresh(sender: SendRequest<Full<Bytes>>, svid: Svid) -> Self {
        Self {
            sender,
            born: Instant::now(),
            svid,
            reused: false,
        }
    }

    fn usable(&self, svid: &Svid, max_age: Duration) -> bool {
        let same_svid = match (&self.svid, svid) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_svid && self.born.elapsed() < max_age && !self.sender.is_closed()
    }
}

/// The idle connections of one control-plane client.
pub(super) struct Pool {
    idle: Mutex<Vec<Conn>>,
    max_age: Duration,
}

impl Pool {
    pub(super) fn new(max_age: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::with_capacity(MAX_IDLE)),
            max_age,
        }
    }

    /// The most recently used idle connection still fit for a request made with `svid`.
    /// Connections that are closed, too old or made with another SVID are dropped.
    pub(super) fn checkout(&self, svid: &Svid) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let max_age = self.max_age;
        idle.retain(|c| c.usable(svid, max_age));
        idle.pop().map(|mut c| {
            c.reused = true;
            c
        })
    }

    /// Gives back a connection whose response was read to the end.
    pub(super) fn checkin(&self, conn: Conn) {
        if !conn.usable(&conn.svid, self.max_age) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }
}
