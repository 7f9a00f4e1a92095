//! Acknowledged means stored: a device's QoS 1 message that the services
//! receive is acknowledged to the device only when every backend client it
//! went to has acknowledged it in turn (the backend acknowledges after the
//! service handled it: stored the shadow, wrote the telemetry).
//!
//! The publisher's session holds a [`Receipt`]; each QoS 1 delivery to a
//! backend client carries a [`Delivery`] token. The backend's session keeps
//! the token until the backend's PUBACK for it arrives, then
//! [`acknowledge`s](Delivery::acknowledge) it. A token dropped unacknowledged
//! (the backend went away, a full queue dropped the message) fails the
//! receipt: the broker then closes the publisher's connection without a
//! PUBACK, so the device sends the message again, as it would after any
//! lost connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

struct State {
    /// Tokens not yet acknowledged or dropped, plus one for the receipt
    /// while deliveries are still being made.
    remaining: AtomicUsize,
    failed: AtomicBool,
    done: Mutex<Option<oneshot::Sender<bool>>>,
}

impl State {
    fn release(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(tx) = self
                .done
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        {
            let _ = tx.send(!self.failed.load(Ordering::Acquire));
        }
    }
}

/// What the publisher waits on.
pub(super) struct Receipt {
    state: Arc<State>,
    rx: oneshot::Receiver<bool>,
}

impl Receipt {
    /// A receipt with no delivery yet.
    pub(super) fn new() -> Self {
        let (tx, rx) = oneshot::channel();
        Self {
            state: Arc::new(State {
                remaining: AtomicUsize::new(1),
                failed: AtomicBool::new(false),
                done: Mutex::new(Some(tx)),
            }),
            rx,
        }
    }

    /// A token for one more delivery that must be acknowledged.
    pub(super) fn delivery(&self) -> Delivery {
        self.state.remaining.fetch_add(1, Ordering::AcqRel);
        Delivery {
            state: Some(self.state.clone()),
        }
    }

    /// No more deliveries: resolves `true` once every token is
    /// acknowledged, `false` if one was dropped unacknowledged.
    pub(super) fn seal(self) -> oneshot::Receiver<bool> {
        self.state.release();
        self.rx
    }
}

/// One delivery's obligation to acknowledge.
pub(super) struct Delivery {
    state: Option<Arc<State>>,
}

impl Delivery {
    /// The backend acknowledged it.
    pub(super) fn acknowledge(mut self) {
        if let Some(state) = self.state.take() {
            state.release();
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state.failed.store(true, Ordering::Release);
            state.release();
        }
    }
}

/// A copy of a message is another delivery to acknowledge.
impl Clone for Delivery {
    fn clone(&self) -> Self {
        if let Some(state) = &self.state {
            state.remaining.fetch_add(1, Ordering::AcqRel);
        }
        Self {
            state: self.state.clone(),
        }
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Delivery")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_resolves_when_every_delivery_is_acknowledged() {
        let r = Receipt::new();
        let a = r.delivery();
        let b = r.delivery();
        let mut done = r.seal();
        a.acknowledge();
        assert!(done.try_recv().is_err(), "one is still out");
        b.acknowledge();
        assert_eq!(done.try_recv(), Ok(true));

        // Without deliveries it resolves at once.
        assert_eq!(Receipt::new().seal().try_recv(), Ok(true));

        // One dropped unacknowledged fails it.
        let r = Receipt::new();
        let a = r.delivery();
        let b = a.clone();
        let mut done = r.seal();
        a.acknowledge();
        drop(b);
        assert_eq!(done.try_recv(), Ok(false));
    }
}
