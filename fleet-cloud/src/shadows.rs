//! The shadow service: fleet-core's processing rules over a store, with
//! compare-and-set retries.

use crate::Outgoing;
use std::fmt;
use std::sync::Arc;

use fleet_core::shadow::{Shadow, ShadowLimits, UpdateRequest, process};
use fleet_core::topic::{
    Role, Service, ShadowOp, ShadowTopic, ShadowTopicKind, Topic, TopicPrefix,
};
use fleet_core::{ShadowName, ThingName};

use crate::service::{Handler, HandlerError, Request};
use crate::store::{ShadowKey, ShadowStore, StoreError};

/// How often a request is re-read and re-processed after losing a
/// compare-and-set race before the service gives up with a 500.
const MAX_CAS_ATTEMPTS: usize = 32;

/// A request the service could not handle at all (it answers everything it
/// can with a `/rejected` message instead).
#[derive(Debug)]
#[non_exhaustive]
pub enum ServiceError {
    /// Not a shadow request topic under the service's prefix.
    NotAShadowRequest,
    /// The topic prefix is not valid.
    InvalidPrefix,
    /// The store failed.
    Store(StoreError),
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAShadowRequest => f.write_str("not a shadow request topic"),
            Self::InvalidPrefix => f.write_str("invalid topic prefix"),
            Self::Store(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ServiceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => Some(e),
            _ => None,
        }
    }
}

/// Shadows for every thing, backed by a [`ShadowStore`]. Cloning shares
/// the store.
#[derive(Debug, Clone)]
pub struct ShadowService {
    store: Arc<dyn ShadowStore>,
    limits: ShadowLimits,
    prefix: String,
    meters: Arc<Meters>,
}

/// What the service counts on every request, registered once.
#[derive(Debug)]
struct Meters {
    load: metrics::Histogram,
    save: metrics::Histogram,
    /// Accepted requests: get, update, delete.
    accepted: [metrics::Counter; 3],
}

impl Meters {
    fn new() -> Self {
        let seconds = |operation: &'static str| metrics::histogram!("fleet_store_operation_seconds", "operation" => operation);
        Self {
            load: seconds("shadow_load"),
            save: seconds("shadow_save"),
            accepted: ["get", "update", "delete"].map(|operation| {
                metrics::counter!(
                    "fleet_shadow_requests_total",
                    "operation" => operation,
                    "outcome" => "accepted",
                    "code" => ""
                )
            }),
        }
    }
}

impl ShadowService {
    /// A service over `store` with AWS's limits under the `$aws` prefix.
    pub fn new(store: impl ShadowStore) -> Self {
        Self::shared(Arc::new(store))
    }

    /// A service over a store shared with others.
    pub fn shared(store: Arc<dyn ShadowStore>) -> Self {
        Self {
            store,
            limits: ShadowLimits::default(),
            prefix: "$aws".into(),
            meters: Arc::new(Meters::new()),
        }
    }

    /// The same service under another topic prefix (`$aws` by default).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, ServiceError> {
        TopicPrefix::new(prefix).map_err(|_| ServiceError::InvalidPrefix)?;
        self.prefix = prefix.into();
        Ok(self)
    }

    /// The topic prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ShadowStore> {
        &self.store
    }

    /// Answers a shadow request (from a device, or anyone allowed) and
    /// returns what to send. A request the rules refuse is answered on
    /// `/rejected` and changes nothing.
    pub async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, ServiceError> {
        let r = shadow_request(&request.topic).ok_or(ServiceError::NotAShadowRequest)?;
        self.apply(
            r.thing,
            r.shadow,
            r.op,
            request.payload,
            request.received_at,
        )
        .await
    }

    /// The answer to a shadow request refused for being one too many (429
    /// "Too many requests", with the request's `clientToken`), without
    /// touching the store; `None` if it is not a shadow request.
    pub fn throttled(&self, request: &Request<'_>) -> Option<Outgoing> {
        let ShadowRequest { thing, shadow, op } = shadow_request(&request.topic)?;
        let prefix = TopicPrefix::new(&self.prefix).ok()?;
        let client_token = serde_json::from_slice::<serde_json::Value>(request.payload)
            .ok()
            .and_then(|v| v.get("clientToken")?.as_str().map(String::from))
            .filter(|t| t.len() <= 64);
        let mut rejection =
            fleet_core::shadow::Rejection::new(fleet_core::shadow::ShadowError::Throttled);
        rejection.client_token = client_token;
        let reply = Topic::Shadow(ShadowTopic {
            thing,
            shadow,
            kind: ShadowTopicKind::Op(op, Role::Rejected),
        });
        Some(Outgoing {
            topic: reply.to_string_under(&prefix),
            payload: rejection.to_payload(request.received_at),
        })
    }

    /// Updates a shadow from the backend (an application setting desired
    /// state), with the same rules and messages as a device's request.
    pub async fn update(
        &self,
        thing: &ThingName<'_>,
        shadow: Option<&ShadowName<'_>>,
        request: &UpdateRequest,
        now: u64,
    ) -> Result<Vec<Outgoing>, ServiceError> {
        self.apply(
            thing.borrow(),
            shadow.map(ShadowName::borrow),
            ShadowOp::Update,
            &request.to_payload(),
            now,
        )
        .await
    }

    /// The stored shadow.
    pub async fn get(
        &self,
        thing: &ThingName<'_>,
        shadow: Option<&ShadowName<'_>>,
    ) -> Result<Shadow, ServiceError> {
        let key = ShadowKey {
            thing: thing.as_str().into(),
            shadow: shadow.map(|s| s.as_str().into()),
        };
        Ok(self
            .store
            .load(&key)
            .await
            .map_err(ServiceError::Store)?
            .value)
    }

    async fn apply(
        &self,
        thing: ThingName<'_>,
        shadow: Option<ShadowName<'_>>,
        op: ShadowOp,
        payload: &[u8],
        now: u64,
    ) -> Result<Vec<Outgoing>, ServiceError> {
        let key = ShadowKey {
            thing: thing.as_str().into(),
            shadow: shadow.as_ref().map(|s| s.as_str().into()),
        };
        let prefix = TopicPrefix::new(&self.prefix).map_err(|_| ServiceError::NotAShadowRequest)?;
        for attempt in 0..MAX_CAS_ATTEMPTS {
            let started = std::time::Instant::now();
            let current = self.store.load(&key).await.map_err(ServiceError::Store)?;
            self.meters.load.record(started.elapsed().as_secs_f64());
            // AWS names the classic shadow by its thing, a named one by its name.
            let name = shadow.as_ref().map_or(thing.as_str(), ShadowName::as_str);
            let out = process(&current.value, name, op, payload, now, &self.limits);
            if let Some(next) = &out.shadow {
                let started = std::time::Instant::now();
                let saved = self.store.save(&key, current.revision, next).await;
                self.meters.save.record(started.elapsed().as_secs_f64());
                match saved {
                    Ok(_) => {}
                    Err(StoreError::Conflict) => {
                        // Another instance wrote it in between.
                        metrics::counter!("fleet_store_conflicts_total", "kind" => "shadow")
                            .increment(1);
                        crate::store::after_conflict(attempt).await;
                        continue;
                    }
                    Err(e) => return Err(ServiceError::Store(e)),
                }
            }
            self.count_outcome(op, &out.messages);
            return Ok(out
                .messages
                .into_iter()
                .map(|m| Outgoing {
                    topic: Topic::Shadow(ShadowTopic {
                        thing: thing.borrow(),
                        shadow: shadow.as_ref().map(ShadowName::borrow),
                        kind: m.kind,
                    })
                    .to_string_under(&prefix),
                    payload: m.payload,
                })
                .collect());
        }
        Err(ServiceError::Store(StoreError::Conflict))
    }
}

impl ShadowService {
    /// Counts a request's outcome in `fleet_shadow_requests_total`:
    /// accepted, or rejected with the code its rejection carries.
    fn count_outcome(&self, op: ShadowOp, messages: &[fleet_core::shadow::ShadowMessage]) {
        let (index, operation) = match op {
            ShadowOp::Get => (0, "get"),
            ShadowOp::Update => (1, "update"),
            ShadowOp::Delete => (2, "delete"),
        };
        let rejected = messages
            .iter()
            .find(|m| matches!(m.kind, ShadowTopicKind::Op(_, Role::Rejected)));
        let Some(m) = rejected else {
            self.meters.accepted[index].increment(1);
            return;
        };
        let code = serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v.get("code")?.as_u64())
            .map_or_else(String::new, |c| c.to_string());
        metrics::counter!(
            "fleet_shadow_requests_total",
            "operation" => operation,
            "outcome" => "rejected",
            "code" => code
        )
        .increment(1);
    }
}

/// A shadow request's thing, shadow and operation, read from its topic.
struct ShadowRequest<'t> {
    thing: ThingName<'t>,
    shadow: Option<ShadowName<'t>>,
    op: ShadowOp,
}

fn shadow_request<'t>(topic: &'t Topic<'_>) -> Option<ShadowRequest<'t>> {
    let Topic::Shadow(ShadowTopic {
        thing,
        shadow,
        kind: ShadowTopicKind::Op(op, Role::Request),
    }) = topic
    else {
        return None;
    };
    Some(ShadowRequest {
        thing: thing.borrow(),
        shadow: shadow.as_ref().map(ShadowName::borrow),
        op: *op,
    })
}

#[async_trait::async_trait]
impl Handler for ShadowService {
    fn service(&self) -> Service {
        Service::Shadows
    }

    fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn handle(&self, request: &Request<'_>) -> Result<Vec<Outgoing>, HandlerError> {
        ShadowService::handle(self, request)
            .await
            .map_err(HandlerError::failed)
    }

    fn throttled(&self, request: &Request<'_>) -> Option<Outgoing> {
        ShadowService::throttled(self, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn req<'a>(topic: &'a str, payload: &'a [u8], now: u64) -> Request<'a> {
        Request::from_broker(&TopicPrefix::AWS, topic, payload, now).expect("a request")
    }

    #[test]
    fn a_throttled_request_is_rejected_429_with_its_token() {
        let service = ShadowService::new(MemoryStore::new());
        let o = service
            .throttled(&req(
                "$aws/things/p1/shadow/name/cfg/update",
                br#"{"state":{},"clientToken":"t-1"}"#,
                7,
            ))
            .unwrap();
        assert_eq!(o.topic, "$aws/things/p1/shadow/name/cfg/update/rejected");
        let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
        assert_eq!(v["code"], 429);
        assert_eq!(v["clientToken"], "t-1");
        assert_eq!(v["timestamp"], 7);
        let jobs = req("$aws/things/p1/jobs/get", b"{}", 7);
        assert!(service.throttled(&jobs).is_none());
    }

    /// Two instances (two handles on one SQLite file) updating one shadow
    /// at once, many requests in flight each: every update is applied,
    /// none given up on conflicts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn contended_updates_are_all_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.db");
        let instances = [
            std::sync::Arc::new(ShadowService::new(crate::SqliteStore::open(&path).unwrap())),
            std::sync::Arc::new(ShadowService::new(crate::SqliteStore::open(&path).unwrap())),
        ];
        const EACH: usize = 100;
        let mut tasks = tokio::task::JoinSet::new();
        for (k, service) in instances.iter().enumerate() {
            for i in 0..EACH {
                let service = service.clone();
                tasks.spawn(async move {
                    let body = format!(r#"{{"state":{{"reported":{{"k{k}-{i}":1}}}}}}"#);
                    service
                        .handle(&req("$aws/things/dev-1/shadow/update", body.as_bytes(), 5))
                        .await
                });
            }
        }
        while let Some(r) = tasks.join_next().await {
            let out = r.unwrap().expect("applied, not given up");
            assert!(out[0].topic.ends_with("/update/accepted"), "{out:?}");
        }
        let shadow = instances[0]
            .get(&ThingName::new("dev-1").unwrap(), None)
            .await
            .unwrap();
        assert_eq!(shadow.version(), 2 * EACH as u64);
    }

    #[tokio::test]
    async fn requests_become_replies_on_the_right_topics() {
        let service = ShadowService::new(MemoryStore::new());
        let out = service
            .handle(&req(
                "$aws/things/dev-1/shadow/name/cfg/update",
                br#"{"state":{"desired":{"a":1}}}"#,
                5,
            ))
            .await
            .unwrap();
        let topics: Vec<_> = out.iter().map(|o| o.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "$aws/things/dev-1/shadow/name/cfg/update/accepted",
                "$aws/things/dev-1/shadow/name/cfg/update/delta",
                "$aws/things/dev-1/shadow/name/cfg/update/documents",
            ]
        );
        let out = service
            .handle(&req("$aws/things/dev-1/shadow/get", b"", 5))
            .await
            .unwrap();
        assert_eq!(out[0].topic, "$aws/things/dev-1/shadow/get/rejected");
        assert!(matches!(
            service
                .handle(&req("$aws/things/dev-1/jobs/get", b"{}", 5))
                .await,
            Err(ServiceError::NotAShadowRequest)
        ));
    }

    #[tokio::test]
    async fn concurrent_updates_never_lose_a_version() {
        let service = ShadowService::new(MemoryStore::new());
        let thing = ThingName::new("dev-1").unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let s = service.clone();
            let thing = thing.clone().into_owned();
            tasks.push(tokio::spawn(async move {
                let req = UpdateRequest::reported(serde_json::json!({ format!("k{i}"): i }));
                s.update(&thing, None, &req, 1).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let shadow = service.get(&thing, None).await.unwrap();
        assert_eq!(shadow.version(), 50);
        assert_eq!(shadow.state().unwrap().reported().len(), 50);
    }
}
