//! The fleet inventory: search and aggregation over the fleet index
//! ([`Inventory`]), and the record of who is connected
//! ([`ConnectivityRecorder`]).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use fleet_cloud::store::{IndexConfig, Stores};
//! use fleet_cloud::{Inventory, Registry};
//! let stores = Stores::memory();
//! let registry = Registry::new(stores.registry.clone()).with_index(stores.index.clone());
//! registry.create_thing("pump-1", [("site".to_string(), "north".to_string())].into()).await?;
//! registry.create_thing("fan-1", Default::default()).await?;
//! let inventory = Inventory::new(stores.index.clone(), IndexConfig::default());
//! assert_eq!(inventory.search("thingName:pump-* AND attributes.site:north", "", 10).await?, ["pump-1"]);
//! assert_eq!(inventory.count("NOT attributes.site:*").await?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::model::{Connectivity, ConnectivityEvent};
use crate::query::{Query, QueryError};
use crate::store::{IndexConfig, IndexStore, NumericStats, StoreError};

/// A search or aggregation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum InventoryError {
    /// The query cannot be parsed (where, and what is wrong).
    Query(QueryError),
    /// The query reads a field the index does not keep (names it).
    NotIndexed(String),
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for InventoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Query(e) => write!(f, "invalid query {e}"),
            Self::NotIndexed(field) => write!(
                f,
                "field `{field}` is not indexed (see the index's shadow-fields setting)"
            ),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for InventoryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Query(e) => Some(e),
            Self::Store(e) => Some(e),
            Self::NotIndexed(_) => None,
        }
    }
}

impl From<StoreError> for InventoryError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Searches and aggregates the fleet index. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Inventory {
    index: Arc<dyn IndexStore>,
    config: Arc<IndexConfig>,
}

impl Inventory {
    /// The inventory of `index`, which keeps what `config` says.
    pub fn new(index: Arc<dyn IndexStore>, config: IndexConfig) -> Self {
        Self {
            index,
            config: Arc::new(config),
        }
    }

    /// Parses `text` and checks that the index keeps every field it reads.
    pub fn parse(&self, text: &str) -> Result<Query, InventoryError> {
        let q = Query::parse(text).map_err(InventoryError::Query)?;
        self.check_field_list(&q.fields())?;
        Ok(q)
    }

    fn check_field_list(&self, fields: &[&str]) -> Result<(), InventoryError> {
        match fields.iter().find(|f| !self.config.indexes(f)) {
            Some(f) => Err(InventoryError::NotIndexed(f.to_string())),
            None => Ok(()),
        }
    }

    fn check_field(&self, field: &str) -> Result<(), InventoryError> {
        crate::query::check_field(field).map_err(|message| {
            InventoryError::Query(QueryError {
                position: 0,
                message,
            })
        })?;
        self.check_field_list(&[field])
    }

    /// Things matching `query`, by name after `after`, `limit` at most.
    pub async fn search(
        &self,
        query: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, InventoryError> {
        let q = self.parse(query)?;
        Ok(self.index.search(&q, after, limit).await?)
    }

    /// How many things match `query`.
    pub async fn count(&self, query: &str) -> Result<u64, InventoryError> {
        let q = self.parse(query)?;
        Ok(self.index.count(&q).await?)
    }

    /// How many of the things matching `query` have each value of
    /// `field`, most first, `limit` values at most.
    pub async fn count_by(
        &self,
        query: &str,
        field: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, InventoryError> {
        let q = self.parse(query)?;
        self.check_field(field)?;
        Ok(self.index.count_by(&q, field, limit).await?)
    }

    /// min/max/avg of numeric `field` over the things matching `query`.
    pub async fn stats(&self, query: &str, field: &str) -> Result<NumericStats, InventoryError> {
        let q = self.parse(query)?;
        self.check_field(field)?;
        Ok(self.index.numeric_stats(&q, field).await?)
    }

    /// A thing's connectivity (`None`: never seen connected).
    pub async fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, InventoryError> {
        Ok(self.index.connectivity(thing).await?)
    }

    /// Every indexed field of a thing.
    pub async fn fields(&self, thing: &str) -> Result<Vec<crate::query::Entry>, InventoryError> {
        Ok(self.index.entries(thing).await?)
    }
}

/// Keeps the connectivity brokers report in the fleet index: events are
/// queued (never blocking the broker) and written in batches, in order,
/// by one task. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ConnectivityRecorder {
    tx: mpsc::UnboundedSender<ConnectivityEvent>,
}

/// Events written in one batch at most.
const BATCH: usize = 1000;

impl ConnectivityRecorder {
    /// Starts the task writing to `index` (on the current runtime); it
    /// ends when every clone is dropped, after writing what is queued.
    pub fn start(index: Arc<dyn IndexStore>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<ConnectivityEvent>();
        tokio::spawn(async move {
            let mut pending: Vec<ConnectivityEvent> = Vec::new();
            loop {
                if pending.is_empty() {
                    match rx.recv().await {
                        Some(e) => pending.push(e),
                        None => return,
                    }
                }
                while pending.len() < BATCH {
                    match rx.try_recv() {
                        Ok(e) => pending.push(e),
                        Err(_) => break,
                    }
                }
                match index.record_connectivity(pending.clone()).await {
                    Ok(()) => pending.clear(),
                    Err(e) => {
                        // Kept, in order, and tried again.
                        tracing::warn!(error = %e, events = pending.len(), "cannot record connectivity; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if pending.len() > 100 * BATCH {
                            let drop = pending.len() - 100 * BATCH;
                            pending.retain(|e| !matches!(e, ConnectivityEvent::Seen { .. }));
                            tracing::warn!(
                                dropped = drop,
                                "connectivity backlog too long: activity reports dropped"
                            );
                        }
                    }
                }
            }
        });
        Self { tx }
    }

    /// Queues `event`.
    pub fn record(&self, event: ConnectivityEvent) {
        let _ = self.tx.send(event);
    }
}

/// Records what device agents say of their presence
/// ([`fleet_core::presence`]: a retained birth, a last will, a goodbye on
/// `fleet/things/{thing}/presence`), for a broker that reports no
/// lifecycle events (Mosquitto). Each message is written to the store
/// before it is acknowledged; the topic names the thing (the broker's ACL
/// lets a device write its own presence only), the time is the backend's.
/// A malformed message is dropped with a warning (answering it would tell
/// nobody).
#[derive(Debug, Clone)]
pub struct PresenceService {
    index: Arc<dyn IndexStore>,
}

impl PresenceService {
    /// A service writing to `index`.
    pub fn new(index: Arc<dyn IndexStore>) -> Self {
        Self { index }
    }
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[async_trait::async_trait]
impl crate::Handler for PresenceService {
    fn service(&self) -> fleet_core::topic::Service {
        fleet_core::topic::Service::Presence
    }

    fn prefix(&self) -> &str {
        fleet_core::presence::PREFIX
    }

    async fn handle(
        &self,
        request: &crate::Request<'_>,
    ) -> Result<Vec<crate::Outgoing>, crate::service::HandlerError> {
        use fleet_core::presence::{PresenceEvent, PresenceKind};
        let Some(thing) = request.topic.thing() else {
            return Err(crate::service::HandlerError::NotARequest);
        };
        // An empty retained message clears the topic: nothing to record.
        if request.payload.is_empty() {
            return Ok(Vec::new());
        }
        let event = match PresenceEvent::parse(request.payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(thing = thing.as_str(), "presence: {e}");
                return Ok(Vec::new());
            }
        };
        let (thing, at, session) = (
            thing.as_str().to_string(),
            epoch_ms(),
            event.session_identifier,
        );
        let recorded = match event.event_type {
            PresenceKind::Connected => ConnectivityEvent::Connected { thing, at, session },
            PresenceKind::Disconnected => ConnectivityEvent::Disconnected {
                thing,
                at,
                session,
                reason: event
                    .disconnect_reason
                    .unwrap_or_else(|| fleet_core::presence::CONNECTION_LOST.into()),
            },
        };
        self.index
            .record_connectivity(vec![recorded])
            .await
            .map_err(crate::service::HandlerError::failed)?;
        Ok(Vec::new())
    }
}

impl crate::embedded::PresenceSink for ConnectivityRecorder {
    fn record(&self, event: ConnectivityEvent) {
        ConnectivityRecorder::record(self, event);
    }
}
