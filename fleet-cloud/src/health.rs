//! Readiness: whether this instance can serve, as `/readyz` reports it.
//!
//! Liveness (`/livez`) only says the process answers; readiness checks
//! what serving needs: the store answers (a read of the registry and of
//! the shadows, each within [`CHECK_TIMEOUT`]), and the connection to the
//! broker is up and subscribed. With several instances on PostgreSQL it
//! also says whether this one holds the lease (informational: a standby
//! instance serves requests too).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::LinkState;
use crate::store::{Leadership, ShadowKey, Stores};

/// How long each check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    stores: Stores,
    link: LinkState,
    leadership: Option<Arc<dyn Leadership>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

/// The outcome of the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every check that decides readiness passed.
    pub ready: bool,
    /// Each check and what it found: `ok`, or why not; `lease` is
    /// `leader` or `standby`.
    pub checks: BTreeMap<String, String>,
}

impl Readiness {
    /// Checks `stores` and the broker connection `link`; `leadership`,
    /// where several instances share the store, is reported too.
    pub fn new(stores: Stores, link: LinkState, leadership: Option<Arc<dyn Leadership>>) -> Self {
        Self {
            stores,
            link,
            leadership,
        }
    }

    /// Runs the checks.
    pub async fn check(&self) -> Report {
        let mut checks = BTreeMap::new();
        let store = tokio::time::timeout(CHECK_TIMEOUT, async {
            self.stores
                .registry
                .things("", 1)
                .await
                .map_err(|e| format!("registry: {e}"))?;
            let probe = ShadowKey {
                thing: "readyz".into(),
                shadow: None,
            };
            self.stores
                .shadows
                .load(&probe)
                .await
                .map_err(|e| format!("shadows: {e}"))?;
            Ok::<(), String>(())
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")));
        let store_ok = store.is_ok();
        checks.insert(
            "store".to_string(),
            store.err().unwrap_or_else(|| "ok".into()),
        );
        let broker_ok = self.link.is_up();
        checks.insert(
            "broker".to_string(),
            if broker_ok {
                "ok".into()
            } else {
                match self.link.last_error() {
                    Some(e) => format!("not connected to the broker: {e}"),
                    None => "not connected to the broker".into(),
                }
            },
        );
        if let Some(l) = &self.leadership {
            let leader = tokio::time::timeout(CHECK_TIMEOUT, l.is_leader())
                .await
                .unwrap_or(false);
            checks.insert(
                "lease".to_string(),
                if leader { "leader" } else { "standby" }.into(),
            );
        }
        Report {
            ready: store_ok && broker_ok,
            checks,
        }
    }
}
