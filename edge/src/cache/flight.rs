//! A fill in flight: one origin fetch that every request for the key waits on.

use std::sync::{Arc, Mutex};

use http::{Response, StatusCode};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::store::{Found, Head, Sliced};
use crate::{body::Growing, error::FetchError};

/// One origin fetch shared by every request that waits for it.
pub(crate) struct Fill {
    outcome: watch::Sender<Option<Arc<Outcome>>>,
}

impl Fill {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self { outcome: watch::Sender::new(None) })
    }

    /// Tells every waiter what the fill produced.
    pub(crate) fn publish(&self, outcome: Outcome) {
        self.outcome.send_replace(Some(Arc::new(outcome)));
    }

    /// Waits for the outcome (the origin's response head, or the failure).
    pub(crate) async fn outcome(self: Arc<Self>) -> Arc<Outcome> {
        let mut rx = self.outcome.subscribe();
        drop(self);
        loop {
            if let Some(outcome) = rx.borrow_and_update().clone() {
                return outcome;
            }
            if rx.changed().await.is_err() {
                return Arc::new(Outcome::Failed(FetchError::Abandoned));
            }
        }
    }
}

/// What a fill produced, as soon as the origin's response head is known.
pub(crate) enum Outcome {
    /// A whole storable response, streaming into the cache.
    Stream { head: Arc<Head>, body: Arc<Growing> },
    /// A large object: its head is stored, its slices are fetched as they are read.
    Sliced(Arc<Sliced>),
    /// One slice, streaming into the cache.
    Slice(Arc<Growing>),
    /// A 304 refreshed the stored response.
    Updated(Found),
    /// Stored, fresh, by a fill that ended between this request's miss and its
    /// start of a fill: served from the cache, not fetched again.
    Stored(Found),
    /// Not shareable. `response` is the origin's answer to exactly the leader's
    /// request when it can be handed over; everyone else fetches for themselves.
    Pass { response: Mutex<Option<Response<Incoming>>>, status: StatusCode },
    /// The origin could not be reached.
    Failed(FetchError),
}
