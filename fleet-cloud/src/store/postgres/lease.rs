//! The lease: one instance at a time drives rollouts and sweeps timeouts.

use super::PgStore;
use crate::store::{Leadership, StoreError, backend};

/// A lease in PostgreSQL: held by one instance at a time until it expires
/// (by the database's clock, so instances' clocks do not matter); another
/// instance takes it over once it expired (the holder died or lost the
/// database).
///
/// The holder renews it from a task of its own, five times per `ttl`, so
/// that however long the work it guards takes, the lease does not lapse
/// under it. The holder counts its lease as ended a fifth of `ttl` before
/// the database does (measured from when it asked for the renewal), so two
/// instances never both count themselves leaders, even when a renewal is
/// slow or lost.
#[derive(Debug, Clone)]
pub struct PgLease {
    inner: std::sync::Arc<LeaseInner>,
}

#[derive(Debug)]
struct LeaseInner {
    store: PgStore,
    name: String,
    holder: String,
    ttl: std::time::Duration,
    /// Until when this instance may act, by its own monotonic clock.
    valid_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// Whether the renewing task runs.
    keeping: std::sync::atomic::AtomicBool,
    /// Given up ([`PgLease::release`]): not asked for again.
    released: std::sync::atomic::AtomicBool,
    /// Whether the last answer was "held" (to log the changes).
    held: std::sync::atomic::AtomicBool,
}

impl PgLease {
    /// A lease `name` asked for by `holder` (unique per instance), which
    /// lasts `ttl` after each renewal.
    pub fn new(store: &PgStore, name: &str, holder: &str, ttl: std::time::Duration) -> Self {
        Self {
            inner: std::sync::Arc::new(LeaseInner {
                store: store.clone(),
                name: name.into(),
                holder: holder.into(),
                ttl,
                valid_until: std::sync::Mutex::new(None),
                keeping: std::sync::atomic::AtomicBool::new(false),
                released: std::sync::atomic::AtomicBool::new(false),
                held: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Who holds lease `name` now (an unexpired lease), if anyone.
    pub async fn holder(store: &PgStore, name: &str) -> Result<Option<String>, StoreError> {
        let client = store.client().await?;
        let row = client
            .query_opt(
                "SELECT holder FROM fleet_leases WHERE name = $1
                   AND expires_at >= (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                &[&name],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Takes or renews the lease once; whether this instance holds it now.
    pub async fn acquire(&self) -> Result<bool, StoreError> {
        let asked = std::time::Instant::now();
        let result = self.try_acquire().await;
        let held = matches!(result, Ok(true));
        let inner = &self.inner;
        {
            let mut valid = inner
                .valid_until
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if held {
                *valid = Some(asked + inner.ttl - inner.ttl / 5);
            } else if result.is_ok() {
                *valid = None;
            }
            // On an error, what was held stays valid until it runs out.
        }
        let now = self.holds();
        let before = inner.held.swap(now, std::sync::atomic::Ordering::Relaxed);
        if now != before {
            if now {
                tracing::info!(lease = %inner.name, holder = %inner.holder, "lease taken");
            } else {
                tracing::info!(lease = %inner.name, holder = %inner.holder, "lease lost");
            }
        }
        result
    }

    async fn try_acquire(&self) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let ttl_ms = i64::try_from(inner.ttl.as_millis()).unwrap_or(i64::MAX);
        let client = inner.store.client().await?;
        let stmt = client
            .prepare_cached(
                "INSERT INTO fleet_leases (name, holder, expires_at)
                 VALUES ($1, $2, (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $3)
                 ON CONFLICT (name) DO UPDATE
                   SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                   WHERE fleet_leases.holder = EXCLUDED.holder
                      OR fleet_leases.expires_at < (extract(epoch FROM clock_timestamp()) * 1000)::bigint
                 RETURNING holder",
            )
            .await
            .map_err(backend)?;
        let row = client
            .query_opt(&stmt, &[&inner.name, &inner.holder, &ttl_ms])
            .await
            .map_err(backend)?;
        Ok(row.is_some())
    }

    /// Whether this instance holds the lease now, by its last renewal (no
    /// round trip to the database).
    pub fn holds(&self) -> bool {
        self.inner
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| std::time::Instant::now() < t)
    }

    /// Starts the task that asks for the lease and renews it, five times
    /// per `ttl`, until this lease (every clone) is dropped or released.
    /// Call it within a Tokio runtime; [`Leadership::is_leader`] starts it
    /// on its first call. Calling it again does nothing.
    pub fn keep(&self) {
        use std::sync::atomic::Ordering;
        if self.inner.keeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak = std::sync::Arc::downgrade(&self.inner);
        let every = (self.inner.ttl / 5).max(std::time::Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.released.load(Ordering::SeqCst) {
                    return;
                }
                let lease = PgLease { inner };
                if let Err(e) = lease.acquire().await {
                    tracing::warn!("lease {}: {e}", lease.inner.name);
                }
            }
        });
    }

    /// Gives the lease up at once (a clean shutdown), if held, and stops
    /// asking for it.
    pub async fn release(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        inner
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        *inner
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let client = inner.store.client().await?;
        client
            .execute(
                "DELETE FROM fleet_leases WHERE name = $1 AND holder = $2",
                &[&inner.name, &inner.holder],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }
}

impl Leadership for PgLease {
    fn release(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Err(e) = PgLease::release(self).await {
                tracing::warn!("lease: {e}");
            }
        })
    }

    /// The first call asks for the lease and starts renewing it
    /// ([`PgLease::keep`]); later calls answer from the last renewal.
    fn is_leader(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            if self
                .inner
                .released
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return false;
            }
            if !self.inner.keeping.load(std::sync::atomic::Ordering::SeqCst) {
                if let Err(e) = self.acquire().await {
                    tracing::warn!("lease {}: {e}", self.inner.name);
                }
                self.keep();
            }
            self.holds()
        })
    }
}
