//! The services' suite on every durable store: SQLite (a file) and
//! PostgreSQL (a real server of its own), so the stores cannot drift. Each
//! scenario also runs two handles on the same database, as two `fleet
//! serve` instances would.

// Test helpers fail the test on a broken fixture.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use fleet_cloud::store::{ShadowKey, ShadowStore, StoreError, StoredStream, Stores};
use fleet_cloud::{JobSpec, JobsService, PgStore, Registry, ShadowService, TargetSelection};
use fleet_core::jobs::{
    GroupAction, JobStatus, RateLimit, RetryPolicy, RolloutGroup, RolloutPolicy, TimeoutConfig,
};
use fleet_core::shadow::{Shadow, ShadowLimits};
use fleet_testkit::Postgres;
use serde_json::{Value, json};

const T0: u64 = 1_800_000_000;

/// Runs `scenario` on two handles of the same stores (as two `fleet serve`
/// instances would share them): in memory, then a fresh SQLite file, then
/// a fresh PostgreSQL database. The conformance suite: every backend of the
/// storage layer passes the same scenarios.
async fn on_every_store<F, Fut>(scenario: F)
where
    F: Fn(Box<dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Handle>>>>) -> Fut,
    Fut: Future<Output = ()>,
{
    let memory = Stores::memory();
    scenario(Box::new(move || {
        let stores = memory.clone();
        Box::pin(async move {
            Handle {
                name: "memory",
                stores,
            }
        })
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    scenario(Box::new(move || {
        let path = path.clone();
        Box::pin(async move {
            Handle {
                name: "sqlite",
                stores: Stores::sqlite(&path).unwrap(),
            }
        })
    }))
    .await;
    let pg = Postgres::start().unwrap();
    let url = pg.url();
    scenario(Box::new(move || {
        let url = url.clone();
        Box::pin(async move {
            Handle {
                name: "postgres",
                stores: Stores::postgres(&url, 8).await.unwrap(),
            }
        })
    }))
    .await;
}

/// One instance's handle on the stores.
#[derive(Clone, Debug)]
struct Handle {
    name: &'static str,
    stores: Stores,
}

impl Handle {
    fn name(&self) -> &'static str {
        self.name
    }

    fn shadows(&self) -> &dyn ShadowStore {
        &*self.stores.shadows
    }
}

fn key(thing: &str, shadow: Option<&str>) -> ShadowKey {
    ShadowKey {
        thing: thing.into(),
        shadow: shadow.map(String::from),
    }
}

fn updated(s: &Shadow, body: &str) -> Shadow {
    s.update(body.as_bytes(), 1, &ShadowLimits::default())
        .unwrap()
        .shadow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_on_every_store() {
    on_every_store(|open| async move {
        let (a, b) = (open().await, open().await);
        let name = a.name();
        let k = key("dev-1", Some("cfg"));
        let first = a.shadows().load(&k).await.unwrap();
        assert_eq!(first.revision, 0, "{name}");
        let s1 = updated(&first.value, r#"{"state":{"desired":{"a":1}}}"#);
        assert_eq!(a.shadows().save(&k, 0, &s1).await.unwrap(), 1, "{name}");
        // The other instance read revision 0 too: it loses, and sees the
        // winner's write.
        assert!(
            matches!(
                b.shadows().save(&k, 0, &s1).await,
                Err(StoreError::Conflict)
            ),
            "{name}"
        );
        let read = b.shadows().load(&k).await.unwrap();
        assert_eq!(
            (read.value.clone(), read.revision),
            (s1.clone(), 1),
            "{name}"
        );
        let stale = updated(&s1, r#"{"state":{"desired":{"a":2}}}"#);
        assert_eq!(b.shadows().save(&k, 1, &stale).await.unwrap(), 2, "{name}");
        assert!(
            matches!(
                a.shadows().save(&k, 1, &s1).await,
                Err(StoreError::Conflict)
            ),
            "{name}"
        );
        // The classic shadow and other things are independent.
        assert_eq!(
            a.shadows()
                .load(&key("dev-1", None))
                .await
                .unwrap()
                .revision,
            0,
            "{name}"
        );
        // Two instances racing on 50 new records: exactly one wins each.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            for store in [a.clone(), b.clone()] {
                let s1 = s1.clone();
                tasks.spawn(async move {
                    (
                        i,
                        store
                            .shadows()
                            .save(&key(&format!("t{i}"), None), 0, &s1)
                            .await
                            .is_ok(),
                    )
                });
            }
        }
        let mut wins = std::collections::BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            let (i, won) = r.unwrap();
            *wins.entry(i).or_insert(0) += u32::from(won);
        }
        assert!(wins.values().all(|w| *w == 1), "{name}: {wins:?}");
        // A fresh handle (a restarted instance) sees everything.
        let c = open().await;
        assert_eq!(c.shadows().load(&k).await.unwrap().revision, 2, "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_service_on_every_store() {
    on_every_store(|open| async move {
        let (a, b) = (ShadowService::shared(open().await.stores.shadows), ShadowService::shared(open().await.stores.shadows));
        let update = |v: Option<u64>, speed: u64| {
            let mut body = json!({"state": {"reported": {"speed": speed}}, "clientToken": format!("c{speed}")});
            if let Some(v) = v {
                body["version"] = json!(v);
            }
            serde_json::to_vec(&body).unwrap()
        };
        let topic = "$aws/things/pump-1/shadow/update";
        let out = a.handle(&req(topic, &update(None, 1), T0)).await.unwrap();
        assert!(out.iter().any(|o| o.topic.ends_with("/update/accepted")));
        // The second instance applies version 1's update; a stale one is
        // rejected with 409 and changes nothing.
        let out = b.handle(&req(topic, &update(Some(1), 2), T0)).await.unwrap();
        assert!(out.iter().any(|o| o.topic.ends_with("/update/accepted")));
        let out = a.handle(&req(topic, &update(Some(1), 3), T0)).await.unwrap();
        let rejected = out.iter().find(|o| o.topic.ends_with("/update/rejected")).expect("rejected");
        let r: Value = serde_json::from_slice(&rejected.payload).unwrap();
        assert_eq!(r["code"], 409);
        let out = b.handle(&req("$aws/things/pump-1/shadow/get", b"", T0)).await.unwrap();
        let doc: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!((doc["state"]["reported"]["speed"].as_u64(), doc["version"].as_u64()), (Some(2), Some(2)));
        // Concurrent updates from both instances without a version: none
        // is lost.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20u64 {
            let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.spawn(async move {
                let body = serde_json::to_vec(&json!({"state": {"reported": {format!("k{i}"): i}}})).unwrap();
                svc.handle(&req("$aws/things/pump-2/shadow/update", &body, T0)).await.unwrap()
            });
        }
        while tasks.join_next().await.is_some() {}
        let out = a.handle(&req("$aws/things/pump-2/shadow/get", b"", T0)).await.unwrap();
        let doc: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!(doc["version"], 20);
        assert_eq!(doc["state"]["reported"].as_object().unwrap().len(), 20);
        let out = a.handle(&req("$aws/things/pump-2/shadow/delete", b"", T0)).await.unwrap();
        assert!(out.iter().any(|o| o.topic.ends_with("/delete/accepted")));
        // An instance applies an update and dies before its answer goes out;
        // the device's retry (same client token and body) reaches the other
        // instance: answered the same, not applied twice.
        let body = br#"{"state":{"reported":{"speed":7}},"clientToken":"retry-1","version":2}"#;
        let first = a.handle(&req(topic, body, T0)).await.unwrap();
        let accepted = |out: &[fleet_cloud::Outgoing]| {
            out.iter()
                .find(|o| o.topic.ends_with("/update/accepted"))
                .map(|o| o.payload.clone())
                .expect("accepted")
        };
        let retry = b.handle(&req(topic, body, T0 + 3)).await.unwrap();
        assert_eq!(accepted(&retry), accepted(&first), "the same answer");
        assert_eq!(retry.len(), 1, "no second delta or documents");
        let out = b.handle(&req("$aws/things/pump-1/shadow/get", b"", T0)).await.unwrap();
        let doc: Value = serde_json::from_slice(&out[0].payload).unwrap();
        assert_eq!((doc["version"].as_u64(), doc["state"]["reported"]["speed"].as_u64()), (Some(3), Some(7)));
    })
    .await;
}

fn spec(id: &str, things: &[&str], rollout: Option<RolloutPolicy>) -> JobSpec {
    JobSpec {
        job_id: id.into(),
        document: json!({"op": "x"}),
        things: things.iter().map(|t| t.to_string()).collect(),
        groups: Vec::new(),
        selection: TargetSelection::Snapshot,
        timeouts: TimeoutConfig {
            in_progress_timeout_in_minutes: Some(1),
        },
        max_retries: 1,
        rollout,
    }
}

async fn request(
    jobs: &JobsService,
    thing: &str,
    suffix: &str,
    body: Value,
    now: u64,
) -> Vec<(String, Value)> {
    let topic = format!("$aws/things/{thing}/jobs/{suffix}");
    let body = serde_json::to_vec(&body).unwrap();
    jobs.handle(&req(&topic, &body, now))
        .await
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.topic,
                serde_json::from_slice(&m.payload).unwrap_or(Value::Null),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_service_on_every_store() {
    on_every_store(|open| async move {
        let store_a = open().await;
        let name = store_a.name();
        let (a, b) = (
            JobsService::shared(store_a.stores.jobs.clone()),
            JobsService::shared(open().await.stores.jobs),
        );
        let registry = Registry::in_memory().unwrap();
        let out = a
            .create_job(spec("j1", &["t1", "t2"], None), &registry, T0)
            .await
            .unwrap();
        let notices = out
            .iter()
            .filter(|m| m.topic.ends_with("/jobs/notify-next"))
            .count();
        assert_eq!(notices, 2, "{name}: a notice per target: {out:?}");
        assert!(
            a.create_job(spec("j1", &["t1"], None), &registry, T0)
                .await
                .is_err(),
            "{name}"
        );
        // t1 through instance b: start, succeed.
        let r = request(&b, "t1", "start-next", json!({"clientToken": "s"}), T0 + 1).await;
        let accepted = r
            .iter()
            .find(|(t, _)| t.ends_with("start-next/accepted"))
            .expect("accepted");
        assert_eq!(accepted.1["execution"]["jobId"], "j1", "{name}");
        let done = json!({"status": "SUCCEEDED", "expectedVersion": 2, "clientToken": "u"});
        let r = request(&a, "t1", "j1/update", done.clone(), T0 + 2).await;
        assert!(
            r.iter().any(|(t, _)| t.ends_with("j1/update/accepted")),
            "{name}: {r:?}"
        );
        // Its instance died before the answer left: the device's retry
        // reaches b, which answers it again (not a move from a terminal
        // state) and changes nothing.
        let version = |e: &[fleet_cloud::ExecutionSummary]| {
            e.iter()
                .find(|e| e.thing == "t1")
                .map(|e| e.execution.version_number)
        };
        let before = version(&b.executions("j1").await.unwrap());
        let again = request(&b, "t1", "j1/update", done, T0 + 30).await;
        assert_eq!(
            again.len(),
            1,
            "{name}: answered, nothing notified: {again:?}"
        );
        assert_eq!(again[0], r[0], "{name}: the same answer");
        assert_eq!(
            version(&a.executions("j1").await.unwrap()),
            before,
            "{name}"
        );
        // t2 starts and goes silent: the in-progress timeout (1 minute)
        // ends it with no device message, and it is queued again once.
        request(&a, "t2", "start-next", json!({"clientToken": "s"}), T0 + 1).await;
        let out = b.handle_timeouts(T0 + 61).await.unwrap();
        assert!(!out.is_empty(), "{name}: the timeout tells the device");
        let snap = a.snapshot("j1").await.unwrap();
        assert_eq!(
            snap.executions.get(&JobStatus::Succeeded),
            Some(&1),
            "{name}: {snap:?}"
        );
        assert_eq!(
            snap.executions.get(&JobStatus::Queued),
            Some(&1),
            "{name}: retried: {snap:?}"
        );
        // Cancel, then delete.
        a.cancel_job("j1", true, T0 + 70).await.unwrap();
        assert!(b.snapshot("j1").await.unwrap().is_final(), "{name}");
        b.delete_job("j1", false, T0 + 80).await.unwrap();
        assert!(a.job("j1").await.is_err(), "{name}");
        assert!(a.job_ids().await.unwrap().is_empty(), "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_driven_by_two_instances_releases_each_target_once() {
    on_every_store(|open| async move {
        let store_a = open().await;
        let name = store_a.name();
        let (a, b) = (
            JobsService::shared(store_a.stores.jobs.clone()),
            JobsService::shared(open().await.stores.jobs),
        );
        let registry = Registry::in_memory().unwrap();
        let things: Vec<String> = (0..12).map(|i| format!("t{i:02}")).collect();
        let refs: Vec<&str> = things.iter().map(String::as_str).collect();
        let policy = RolloutPolicy {
            rate: RateLimit::Constant { per_minute: 1000 },
            groups: vec![RolloutGroup {
                size: 4,
                success_percent: 100,
                on_success: GroupAction::NextGroup,
                error_threshold: None,
            }],
            abort: Vec::new(),
            retry: RetryPolicy::default(),
            in_progress_timeout_secs: None,
        };
        let first = a
            .create_job(spec("r1", &refs, Some(policy)), &registry, T0)
            .await
            .unwrap();
        let mut released = BTreeSet::new();
        let mut notices = 0;
        let mut pending = first;
        for round in 0..40u64 {
            let now = T0 + round;
            // Both instances drive at once, as their sweepers would.
            let (x, y) = tokio::join!(a.drive_rollouts(now), b.drive_rollouts(now));
            pending.extend(x.unwrap().into_iter().chain(y.unwrap()));
            for m in std::mem::take(&mut pending) {
                if m.topic.ends_with("notify-next") {
                    notices += 1;
                    let thing = m.topic.split('/').nth(2).unwrap().to_string();
                    assert!(
                        released.insert(thing.clone()),
                        "{name}: {thing} released twice"
                    );
                }
            }
            // Released devices succeed.
            for t in released.clone() {
                let svc = if round % 2 == 0 { &a } else { &b };
                request(svc, &t, "start-next", json!({"clientToken": "s"}), now).await;
                request(
                    svc,
                    &t,
                    "r1/update",
                    json!({"status": "SUCCEEDED", "clientToken": "u"}),
                    now,
                )
                .await;
            }
            if released.len() == things.len() {
                break;
            }
        }
        assert_eq!(released.len(), 12, "{name}: {released:?}");
        assert_eq!(notices, 12, "{name}");
        let snap = a.snapshot("r1").await.unwrap();
        assert_eq!(
            snap.executions.get(&JobStatus::Succeeded),
            Some(&12),
            "{name}: {snap:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_holds_the_lease_and_another_takes_over_when_it_dies() {
    use fleet_cloud::{Leadership, PgLease};
    use std::time::Duration;
    let pg = Postgres::start().unwrap();
    let store = PgStore::connect(&pg.url(), 8).await.unwrap();
    let ttl = Duration::from_millis(1500);
    let leases: Vec<PgLease> = (0..3)
        .map(|i| PgLease::new(&store, "jobs-sweeper", &format!("instance-{i}"), ttl))
        .collect();
    // Three instances ask at once, again and again: exactly one holds it,
    // always the same while it renews.
    let mut holder = None;
    for _ in 0..5 {
        let held = futures_all(&leases).await;
        assert_eq!(held.iter().filter(|h| **h).count(), 1, "{held:?}");
        let now = held.iter().position(|h| *h);
        assert!(
            holder.is_none() || holder == now,
            "the lease moved while renewed"
        );
        holder = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let dead = holder.unwrap();
    // The holder dies (stops renewing): within the lease's time another
    // takes over, and only one.
    let others: Vec<&PgLease> = leases
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != dead)
        .map(|(_, l)| l)
        .collect();
    assert!(
        !others[0].is_leader().await && !others[1].is_leader().await,
        "taken before it expired"
    );
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let (a, b) = tokio::join!(others[0].is_leader(), others[1].is_leader());
    assert!(a ^ b, "exactly one takes over: {a} {b}");
    // The old holder, back, does not get it while the new one renews.
    assert!(!leases[dead].is_leader().await);
    // A clean release hands it over at once: the others' renewing tasks
    // (started by their `is_leader` above) take it at their next turn,
    // well before the lease would have run out, and only one does.
    let new = if a { others[0] } else { others[1] };
    let rest: Vec<&PgLease> = leases.iter().filter(|l| !std::ptr::eq(*l, new)).collect();
    new.release().await.unwrap();
    assert!(!new.is_leader().await, "released: not leader any more");
    let released = std::time::Instant::now();
    loop {
        let (a, b) = (rest[0].holds(), rest[1].holds());
        assert!(!(a && b), "two leaders");
        if a || b {
            break;
        }
        assert!(
            released.elapsed() < ttl,
            "not handed over within the lease's time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The holder keeps its lease however long its work takes (it renews from
/// a task of its own); when it is dropped, another takes over, and never
/// two at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_holder_keeps_the_lease_and_two_never_hold_it() {
    use fleet_cloud::{Leadership, PgLease};
    use std::time::{Duration, Instant};
    let pg = Postgres::start().unwrap();
    let store = PgStore::connect(&pg.url(), 8).await.unwrap();
    let ttl = Duration::from_millis(1000);
    let first = PgLease::new(&store, "sweeper", "first", ttl);
    assert!(first.is_leader().await, "nobody held it");
    let second = PgLease::new(&store, "sweeper", "second", ttl);
    assert!(!second.is_leader().await);
    // Four lease times of "work" without asking: still the holder, by its
    // own count and by the database's; the other never got it.
    let start = Instant::now();
    while start.elapsed() < ttl * 4 {
        let (a, b) = (first.holds(), second.holds());
        assert!(a && !b, "{a} {b}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        PgLease::holder(&store, "sweeper").await.unwrap().as_deref(),
        Some("first")
    );
    // The holder goes away (every handle dropped: its renewing task
    // stops): the other takes over once the lease ran out, not before.
    drop(first);
    let gone = Instant::now();
    while !second.holds() {
        assert!(gone.elapsed() < ttl * 2, "no takeover");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        gone.elapsed() >= ttl / 2,
        "taken over {:?} after the holder went, before its lease ran out",
        gone.elapsed()
    );
    assert_eq!(
        PgLease::holder(&store, "sweeper").await.unwrap().as_deref(),
        Some("second")
    );
}

async fn futures_all(leases: &[fleet_cloud::PgLease]) -> Vec<bool> {
    let mut set = tokio::task::JoinSet::new();
    for (i, l) in leases.iter().enumerate() {
        let l = l.clone();
        set.spawn(async move { (i, l.acquire().await.unwrap()) });
    }
    let mut out = vec![false; leases.len()];
    while let Some(r) = set.join_next().await {
        let (i, held) = r.unwrap();
        out[i] = held;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_streams_are_served_by_every_instance_on_postgres() {
    use fleet_cloud::StreamService;
    use fleet_core::stream::{DataBlock, Format, StreamDescription};
    let pg = Postgres::start().unwrap();
    let store = PgStore::connect(&pg.url(), 4).await.unwrap();
    let a = StreamService::load(std::sync::Arc::new(store.clone()))
        .await
        .unwrap();
    let b = StreamService::load(std::sync::Arc::new(store.clone()))
        .await
        .unwrap();
    let describe = "$aws/things/t/streams/fw/describe/json";
    let get = "$aws/things/t/streams/fw/get/json";
    let prefix = fleet_core::topic::TopicPrefix::AWS;
    let ask = |s: &StreamService, topic: &str, body: &[u8]| {
        let (s, topic, body) = (s.clone(), topic.to_string(), body.to_vec());
        async move {
            let request = fleet_cloud::Request::from_broker(&prefix, &topic, &body, T0).unwrap();
            s.handle(&request).await.unwrap()
        }
    };
    // Stored through a: b serves it (a describe and a block).
    assert_eq!(
        a.save("fw", "firmware", vec![vec![7; 300], vec![1]])
            .await
            .unwrap(),
        1
    );
    let d = ask(&b, describe, b"{}").await;
    let desc = StreamDescription::decode(&d[0].payload, Format::Json).unwrap();
    assert_eq!((desc.version, desc.files[0].size), (1, 300));
    let r = ask(&b, get, br#"{"f":0,"l":256,"o":1,"n":1}"#).await;
    let block = DataBlock::decode(&r[0].payload, Format::Json).unwrap();
    assert_eq!(block.payload, vec![7; 44]);
    // Replaced through b: a sees the new version, and a device reading
    // the old one is told.
    assert_eq!(
        b.save("fw", "firmware", vec![vec![9; 10]]).await.unwrap(),
        2
    );
    let r = ask(&a, get, br#"{"f":0,"l":256,"o":0,"n":1,"s":1}"#).await;
    assert!(r[0].topic.ends_with("/rejected/json"), "{:?}", r[0].topic);
    let r = ask(&a, get, br#"{"f":0,"l":256,"o":0,"n":1,"s":2}"#).await;
    let block = DataBlock::decode(&r[0].payload, Format::Json).unwrap();
    assert_eq!(block.payload, vec![9; 10]);
    // A new instance loads what is stored; a removed stream is gone
    // everywhere.
    let c = StreamService::load(std::sync::Arc::new(store.clone()))
        .await
        .unwrap();
    assert_eq!(c.file("fw", 0).unwrap().len(), 10);
    a.remove("fw").await.unwrap();
    let r = ask(&c, describe, b"{}").await;
    assert!(r[0].topic.ends_with("/rejected/json"));
}

/// The stream store's contract on every backend: versions rise with each
/// replacement, a load returns the files in order (all streams, or one),
/// a delete forgets, and a fresh handle sees what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_store_on_every_store() {
    on_every_store(|open| async move {
        let a = open().await;
        let name = a.name();
        let s = &a.stores.streams;
        assert_eq!(s.stream_version("fw").await.unwrap(), None, "{name}");
        let files = vec![vec![1u8; 300], vec![], vec![3; 5]];
        assert_eq!(
            s.save_stream("fw", "firmware", &files).await.unwrap(),
            1,
            "{name}"
        );
        assert_eq!(
            s.save_stream("cfg", "config", &[vec![9]]).await.unwrap(),
            1,
            "{name}"
        );
        let all = s.load_streams(None).await.unwrap();
        let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["cfg", "fw"], "{name}: sorted by id");
        assert_eq!(
            all[1].1,
            StoredStream {
                version: 1,
                description: "firmware".into(),
                files: files.clone()
            },
            "{name}"
        );
        assert_eq!(
            s.save_stream("fw", "firmware 2", &[vec![4; 7]])
                .await
                .unwrap(),
            2,
            "{name}"
        );
        let fw = s.load_streams(Some("fw")).await.unwrap();
        assert_eq!(fw.len(), 1, "{name}");
        assert_eq!(
            (fw[0].1.version, fw[0].1.files.clone()),
            (2, vec![vec![4; 7]]),
            "{name}"
        );
        assert_eq!(s.stream_version("fw").await.unwrap(), Some(2), "{name}");
        // Listed without their files: version, description, file 0's size.
        let listed = s.list_streams("", 10).await.unwrap();
        let summary =
            |id: &str, version, description: &str, size| fleet_cloud::store::StreamSummary {
                id: id.into(),
                version,
                description: description.into(),
                size,
            };
        assert_eq!(
            listed,
            [
                summary("cfg", 1, "config", 1),
                summary("fw", 2, "firmware 2", 7)
            ],
            "{name}"
        );
        assert_eq!(s.list_streams("", 1).await.unwrap()[0].id, "cfg", "{name}");
        assert_eq!(
            s.list_streams("cfg", 10).await.unwrap()[0].id,
            "fw",
            "{name}"
        );
        // Another handle (a restarted instance) sees the same.
        let b = open().await;
        assert_eq!(
            b.stores.streams.stream_version("fw").await.unwrap(),
            Some(2),
            "{name}"
        );
        b.stores.streams.delete_stream("fw").await.unwrap();
        b.stores.streams.delete_stream("never").await.unwrap();
        assert_eq!(s.stream_version("fw").await.unwrap(), None, "{name}");
        assert_eq!(s.load_streams(None).await.unwrap().len(), 1, "{name}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_certificate_authentication() {
    use fleet_cloud::pki::Pki;
    let pki = Pki::new("PostgreSQL test CA").unwrap();
    let server = pki.server_identity().unwrap();
    let pg = Postgres::start_tls(fleet_testkit::PostgresTls {
        cert_pem: server.cert_pem,
        key_pem: server.key_pem,
        client_ca_pem: Some(pki.ca_pem()),
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let client = pki.client_identity("fleet").unwrap();
    let ca = file("ca.pem", &pki.ca_pem());
    let cert = file("client.pem", &client.cert_pem);
    let key_file = file("client.key", &client.key_pem);
    let other = file("other-ca.pem", &Pki::new("another CA").unwrap().ca_pem());
    let base = format!("postgres://fleet@localhost:{}/postgres", pg.port());

    // Verified server, client certificate: connected, and it stores.
    let url =
        format!("{base}?sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key_file}");
    let store = PgStore::connect(&url, 2).await.unwrap();
    let k = key("dev-tls", None);
    let saved = store
        .save(
            &k,
            0,
            &updated(&Shadow::new(), r#"{"state":{"reported":{"on":true}}}"#),
        )
        .await
        .unwrap();
    assert_eq!(store.load(&k).await.unwrap().revision, saved);
    // The key=value form reads the same parameters.
    let kv = format!(
        "host=localhost port={} user=fleet dbname=postgres sslrootcert={ca} sslcert={cert} sslkey={key_file}",
        pg.port()
    );
    PgStore::connect(&kv, 1).await.unwrap();

    // Refused, each with a typed error and no panic: no client certificate,
    // no TLS at all, a server certificate from another CA, `require`
    // without a CA to verify against, a certificate without its key.
    for (url, why) in [
        (format!("{base}?sslrootcert={ca}"), "no client certificate"),
        (base.clone(), "plain text"),
        (
            format!("{base}?sslrootcert={other}&sslcert={cert}&sslkey={key_file}"),
            "an unknown server",
        ),
        (format!("{base}?sslmode=require"), "nothing to verify with"),
        (format!("{base}?sslrootcert={ca}&sslcert={cert}"), "no key"),
    ] {
        match PgStore::connect(&url, 1).await {
            Err(e @ StoreError::Backend(_)) => {
                if why == "nothing to verify with" {
                    assert!(e.to_string().contains("sslrootcert"), "{e}");
                }
                assert!(
                    std::error::Error::source(&e).is_some(),
                    "{why}: the cause is kept"
                );
            }
            other => panic!("{why}: {other:?}"),
        }
    }
}

fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect()
}

/// The registry (things, groups, certificates, tokens) on a SQLite file and
/// on PostgreSQL, each through two handles as two instances would share it:
/// what one writes, the other reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_on_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let pg = Postgres::start().unwrap();
    let store = PgStore::connect(&pg.url(), 4).await.unwrap();
    let memory = Registry::in_memory().unwrap();
    let pairs = [
        ("memory", memory.clone(), memory),
        (
            "sqlite",
            Registry::open(&path).unwrap(),
            Registry::open(&path).unwrap(),
        ),
        (
            "postgres",
            Registry::postgres(&store),
            Registry::postgres(&PgStore::connect(&pg.url(), 4).await.unwrap()),
        ),
    ];
    for (name, r, other) in pairs {
        println!("registry on {name}");
        registry_scenario(&r, &other).await;
    }
}

async fn registry_scenario(r: &Registry, other: &Registry) {
    use fleet_cloud::{CertificateStatus, RegistryError, Scope};
    r.create_thing("pump-1", attrs(&[("site", "gdansk"), ("model", "p7")]))
        .await
        .unwrap();
    r.create_thing("pump-2", attrs(&[("site", "gdansk"), ("model", "p8")]))
        .await
        .unwrap();
    other
        .create_thing("pump-3", attrs(&[("site", "oslo"), ("model", "p7")]))
        .await
        .unwrap();
    assert!(matches!(
        r.create_thing("pump-1", BTreeMap::new()).await,
        Err(RegistryError::AlreadyExists(_))
    ));
    assert!(matches!(
        r.create_thing("bad/name", BTreeMap::new()).await,
        Err(RegistryError::InvalidName(_))
    ));
    assert_eq!(r.thing("pump-3").await.unwrap().attributes["site"], "oslo");
    assert!(matches!(
        r.thing("nope").await,
        Err(RegistryError::NotFound(_))
    ));

    // Paging.
    let first = r.things(None, 2).await.unwrap();
    assert_eq!(
        first.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["pump-1", "pump-2"]
    );
    let rest = r.things(Some("pump-2"), 2).await.unwrap();
    assert_eq!(rest.len(), 1);

    // Static and dynamic groups; a dynamic group follows attribute changes.
    r.create_group("canary", None).await.unwrap();
    r.add_to_group("canary", "pump-3").await.unwrap();
    assert!(matches!(
        r.add_to_group("canary", "ghost").await,
        Err(RegistryError::NotFound(_))
    ));
    r.create_group(
        "gdansk-p7",
        Some(&attrs(&[("site", "gdansk"), ("model", "p7")]).into()),
    )
    .await
    .unwrap();
    assert_eq!(r.group_members("canary").await.unwrap(), ["pump-3"]);
    assert_eq!(r.group_members("gdansk-p7").await.unwrap(), ["pump-1"]);
    r.set_attributes("pump-2", &attrs(&[("site", "gdansk"), ("model", "p7")]))
        .await
        .unwrap();
    assert_eq!(
        r.group_members("gdansk-p7").await.unwrap(),
        ["pump-1", "pump-2"]
    );
    assert!(
        r.add_to_group("gdansk-p7", "pump-3").await.is_err(),
        "dynamic groups have no manual members"
    );

    // Certificates: a thing with all certificates revoked is denied.
    r.add_certificate("c1", "pump-1", "PEM1").await.unwrap();
    r.add_certificate("c2", "pump-1", "PEM2").await.unwrap();
    assert!(matches!(
        r.add_certificate("c3", "ghost", "x").await,
        Err(RegistryError::NotFound(_))
    ));
    r.revoke_certificate("c1").await.unwrap();
    assert!(
        r.denied_identities().await.unwrap().is_empty(),
        "pump-1 still has c2"
    );
    assert_eq!(r.revoked_certificates().await.unwrap(), ["c1"]);
    r.revoke_certificate("c2").await.unwrap();
    assert_eq!(r.denied_identities().await.unwrap(), ["pump-1"]);
    assert_eq!(
        r.certificates("pump-1").await.unwrap()[0].status,
        CertificateStatus::Revoked
    );
    r.set_enabled("pump-3", false).await.unwrap();
    assert_eq!(r.denied_identities().await.unwrap(), ["pump-1", "pump-3"]);

    // The roster a broker without the registry admits by: the same standing.
    let roster = other.roster().await.unwrap();
    assert_eq!(roster.len(), (3, 2));
    let standing = roster.standing("pump-1", "c2");
    assert_eq!(standing.thing, Some(true));
    assert_eq!(standing.certificate, Some(("pump-1".to_string(), false)));
    assert!(!standing.admits("pump-1", false), "c2 is revoked");
    assert!(roster.standing("pump-2", "unknown").admits("pump-2", false));
    assert!(!roster.standing("pump-2", "unknown").admits("pump-2", true));
    assert!(!roster.standing("pump-3", "unknown").admits("pump-3", false));
    assert_eq!(
        fleet_core::admission::Roster::parse(&roster.to_text()).unwrap(),
        roster
    );

    // Deleting a thing removes its memberships and certificates.
    r.delete_thing("pump-3").await.unwrap();
    assert!(r.group_members("canary").await.unwrap().is_empty());
    assert!(r.certificates("pump-3").await.unwrap().is_empty());

    // Another handle (another instance) sees the same registry.
    assert_eq!(
        other.group_members("gdansk-p7").await.unwrap(),
        ["pump-1", "pump-2"]
    );
    assert!(matches!(
        other.create_group("canary", None).await,
        Err(RegistryError::AlreadyExists(_))
    ));

    // API tokens: made by one instance, accepted and revoked by the other.
    let (record, token) = r.create_token("dashboard", Scope::Read).await.unwrap();
    let seen = other.verify_token(&token).await.unwrap().expect("known");
    assert_eq!(
        (seen.id.as_str(), seen.scope),
        (record.id.as_str(), Scope::Read)
    );
    let forged = format!("{}x", &token[..token.len() - 1]);
    assert!(other.verify_token(&forged).await.unwrap().is_none());
    assert!(other.verify_token("not-a-token").await.unwrap().is_none());
    assert_eq!(other.tokens().await.unwrap(), std::slice::from_ref(&record));
    other.revoke_token(&record.id).await.unwrap();
    assert!(r.verify_token(&token).await.unwrap().is_none());
    assert!(matches!(
        r.revoke_token(&record.id).await,
        Err(RegistryError::NotFound(_))
    ));
    assert!(matches!(
        r.create_token("", Scope::Admin).await,
        Err(RegistryError::InvalidName(_))
    ));

    // The audit log: appended by either instance, read in order by both,
    // paged by id; JSON documents come back as they went in.
    let entry = |path: &str, status: u16| fleet_cloud::AuditEntry {
        id: 0,
        at_ms: 1_700_000_000_123,
        token_id: record.id.clone(),
        token_name: "dashboard".into(),
        method: "PUT".into(),
        path: path.into(),
        status,
        request: Some(serde_json::json!({"attributes": {"site": "north"}})),
        before: None,
    };
    let first = r
        .record_audit(&entry("/v1/things/pump-1/attributes", 200))
        .await
        .unwrap();
    let second = other.record_audit(&entry("/v1/things", 403)).await.unwrap();
    let third = r
        .record_audit(&entry("/v1/things/pump-2", 204))
        .await
        .unwrap();
    assert!(first < second && second < third, "{first} {second} {third}");
    let all = other.audit(0, 100).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.id).collect::<Vec<_>>(),
        [first, second, third]
    );
    assert_eq!(all[0].request, entry("", 0).request);
    assert_eq!(all[0].at_ms, 1_700_000_000_123);
    assert_eq!((all[1].status, all[1].path.as_str()), (403, "/v1/things"));
    assert_eq!(all[2].before, None);
    let page = r.audit(first, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, second);
    assert!(r.audit(third, 10).await.unwrap().is_empty());

    // Provisioning templates made through the API: kept by one instance,
    // read by the other, the document as it went in, replaced whole,
    // listed by name, deleted once.
    let document: serde_json::Value = serde_json::from_str(
        r#"{"Resources":{"thing":{"Type":"AWS::IoT::Thing","Properties":{"ThingName":{"Ref":"SerialNumber"}}}},"Parameters":{"SerialNumber":{"Type":"String","Default":"0.50"}}}"#,
    )
    .unwrap();
    let template = |name: &str, version: u64| fleet_cloud::StoredTemplate {
        name: name.into(),
        description: "pumps".into(),
        enabled: true,
        document: document.clone(),
        allow_replace: version > 1,
        hook: Some(fleet_cloud::StoredHook {
            url: "https://hooks.example.com/p".into(),
            ca_pem: None,
            timeout_ms: 2_500,
        }),
        version,
        created_ms: 1_700_000_000_000,
        updated_ms: 1_700_000_000_000 + version,
    };
    assert_eq!(other.stored_template("pumps").await.unwrap(), None);
    r.put_template(&template("pumps", 1)).await.unwrap();
    r.put_template(&template("fans", 1)).await.unwrap();
    assert_eq!(
        other.stored_template("pumps").await.unwrap(),
        Some(template("pumps", 1))
    );
    other.put_template(&template("pumps", 2)).await.unwrap();
    let all = r.stored_templates().await.unwrap();
    assert_eq!(all, [template("fans", 1), template("pumps", 2)]);
    assert_eq!(
        serde_json::to_string(&all[1].document).unwrap(),
        serde_json::to_string(&document).unwrap()
    );
    other.delete_template("fans").await.unwrap();
    assert!(matches!(
        r.delete_template("fans").await,
        Err(RegistryError::NotFound(_))
    ));
    assert_eq!(r.stored_templates().await.unwrap().len(), 1);
}

/// Provisioning by claim through two instances on one store: the ownership
/// token one issued, the other accepts, and once only, on SQLite and on
/// PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_token_is_good_at_every_instance_once() {
    use fleet_cloud::pki::Pki;
    use fleet_cloud::{ProvisioningService, ProvisioningTemplate};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("registry.db");
    let pg = Postgres::start().unwrap();
    let memory = Registry::in_memory().unwrap();
    let pairs = [
        (memory.clone(), memory),
        (
            Registry::open(&path).unwrap(),
            Registry::open(&path).unwrap(),
        ),
        (
            Registry::postgres(&PgStore::connect(&pg.url(), 2).await.unwrap()),
            Registry::postgres(&PgStore::connect(&pg.url(), 2).await.unwrap()),
        ),
    ];
    let ca = Pki::new("fleet CA").unwrap();
    let template = ProvisioningTemplate {
        allow_replace: false,
        name: "factory".into(),
        thing_name_prefix: "pump-".into(),
        name_parameter: "SerialNumber".into(),
        required_parameters: Vec::new(),
        attributes: BTreeMap::new(),
        groups: Vec::new(),
        body: None,
        webhook: None,
    };
    let csr = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pump-7");
        params.serialize_request(&key).unwrap().pem().unwrap()
    };
    for (a, b) in pairs {
        let service = |r: &Registry| {
            let ca = Pki::from_pem(&ca.ca_pem(), &ca.ca_key_pem().unwrap()).unwrap();
            ProvisioningService::new(ca, r.clone(), vec![template.clone()])
        };
        let (first, second) = (service(&a), service(&b));
        let ask = |s: &ProvisioningService, topic: &str, body: String| {
            let (s, topic) = (s.clone(), topic.to_string());
            async move {
                let reply = s
                    .handle(&req(&topic, body.as_bytes(), T0))
                    .await
                    .pop()
                    .unwrap();
                let v: Value = serde_json::from_slice(&reply.payload).unwrap();
                (reply.topic.rsplit('/').next().unwrap().to_string(), v)
            }
        };
        let (outcome, issued) = ask(
            &first,
            "$aws/certificates/create-from-csr/json",
            json!({"certificateSigningRequest": csr}).to_string(),
        )
        .await;
        assert_eq!(outcome, "accepted", "{issued}");
        let register = json!({
            "certificateOwnershipToken": issued["certificateOwnershipToken"],
            "parameters": {"SerialNumber": "7"},
        })
        .to_string();
        let topic = "$aws/provisioning-templates/factory/provision/json";
        let (outcome, r) = ask(&second, topic, register.clone()).await;
        assert_eq!(
            (outcome.as_str(), &r["thingName"]),
            ("accepted", &json!("pump-7"))
        );
        for s in [&first, &second] {
            let (outcome, r) = ask(s, topic, register.clone()).await;
            assert_eq!(outcome, "rejected");
            assert_eq!(r["errorCode"], "InvalidToken", "{r}");
        }
        assert_eq!(a.certificates("pump-7").await.unwrap().len(), 1);
    }
}

/// A request as the broker delivers it (the caller is the thing the topic
/// names).
fn req<'a>(topic: &'a str, payload: &'a [u8], now: u64) -> fleet_cloud::Request<'a> {
    fleet_cloud::Request::from_broker(&fleet_core::TopicPrefix::AWS, topic, payload, now)
        .expect("a request topic")
}

/// A device's MQTT 5 connection to an embedded broker on `port`.
fn device_client(
    pki: &fleet_cloud::pki::Pki,
    id: &fleet_cloud::pki::Identity,
    client_id: &str,
    port: u16,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    rumqttc::v5::AsyncClient::new(client_options(pki, id, client_id, port), 16)
}

/// MQTT 5 options for `id` as `client_id`, trusting `pki`'s CA.
fn client_options(
    pki: &fleet_cloud::pki::Pki,
    id: &fleet_cloud::pki::Identity,
    client_id: &str,
    port: u16,
) -> rumqttc::v5::MqttOptions {
    let tls = fleet_testkit::client_tls_config(id, &pki.ca_pem()).unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(client_id, "localhost", port);
    o.set_keep_alive(std::time::Duration::from_secs(5))
        .set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(tls)),
        ));
    o
}

/// An embedded broker's configuration on loopback with `pki`'s
/// certificates.
fn embedded_config(pki: &fleet_cloud::pki::Pki) -> fleet_cloud::EmbeddedConfig {
    let server = pki.server_identity().unwrap();
    fleet_cloud::EmbeddedConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        &server.cert_pem,
        &server.key_pem,
        &pki.ca_pem(),
    )
}

/// The first packet `pick` takes from `ev` (10 s at most).
async fn next_packet<T>(
    ev: &mut rumqttc::v5::EventLoop,
    mut pick: impl FnMut(&rumqttc::v5::mqttbytes::v5::Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            if let Ok(rumqttc::v5::Event::Incoming(p)) = ev.poll().await
                && let Some(t) = pick(&p)
            {
                return t;
            }
        }
    })
    .await
    .expect("the packet arrives")
}

/// Issue 21: the embedded broker's retained messages are kept in the store
/// and survive a restart, on every store; an empty retained payload
/// deletes, for good. The store itself first: put, replace, delete, load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_broker_restart_on_every_store() {
    use fleet_cloud::EmbeddedBroker;
    use fleet_cloud::store::RetainedMessage;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};

    on_every_store(|instance| async move {
        let a = instance().await;
        let store = a.stores.retained.clone();
        let msg = |topic: &str, payload: &[u8]| RetainedMessage {
            topic: topic.into(),
            payload: payload.to_vec(),
            qos: 1,
            properties: Vec::new(),
            owner: "dev-1".into(),
        };
        store.put_retained(&msg("b/1", b"one")).await.unwrap();
        store.put_retained(&msg("a/1", b"x")).await.unwrap();
        store.put_retained(&msg("b/1", b"two")).await.unwrap();
        store.delete_retained("c/none").await.unwrap();
        let b = instance().await;
        assert_eq!(
            b.stores.retained.load_retained().await.unwrap(),
            vec![msg("a/1", b"x"), msg("b/1", b"two")],
            "{}",
            a.name()
        );
        store.delete_retained("a/1").await.unwrap();
        store.delete_retained("b/1").await.unwrap();
        assert!(store.load_retained().await.unwrap().is_empty());

        // The broker: a device's retained messages, acknowledged once
        // stored, are there after a restart on the same store.
        let pki = fleet_cloud::pki::Pki::new("retained test CA").unwrap();
        let start = |stores: &Stores| {
            let mut config = embedded_config(&pki);
            config.retained_store = Some(stores.retained.clone());
            EmbeddedBroker::start(config)
        };
        let dev = pki.client_identity("dev-1").unwrap();
        let broker = start(&a.stores).await.unwrap();
        let (c, mut ev) = device_client(&pki, &dev, "dev-1", broker.local_addr().port());
        for (topic, payload) in [
            ("dt/dev-1/state", "on"),
            ("dt/dev-1/fw", "1.2"),
            ("dt/dev-1/gone", "soon"),
        ] {
            c.publish(topic, QoS::AtLeastOnce, true, payload)
                .await
                .unwrap();
            let reason = next_packet(&mut ev, |p| match p {
                Packet::PubAck(a) => Some(a.reason),
                _ => None,
            })
            .await;
            assert_eq!(reason, PubAckReason::Success, "{}", a.name());
        }
        // Replaced, and deleted by an empty payload.
        c.publish("dt/dev-1/state", QoS::AtLeastOnce, true, "off")
            .await
            .unwrap();
        c.publish("dt/dev-1/gone", QoS::AtLeastOnce, true, "")
            .await
            .unwrap();
        let mut acks = 0;
        next_packet(&mut ev, |p| {
            acks += usize::from(matches!(p, Packet::PubAck(_)));
            (acks == 2).then_some(())
        })
        .await;
        broker.shutdown().await;

        // Read back by the backend (devices do not read telemetry topics).
        let b = instance().await;
        let broker = start(&b.stores).await.unwrap();
        let backend = pki.client_identity("fleet-backend").unwrap();
        let (c, mut ev) = device_client(&pki, &backend, "svc", broker.local_addr().port());
        c.subscribe("dt/dev-1/#", QoS::AtLeastOnce).await.unwrap();
        let mut got = BTreeMap::new();
        next_packet(&mut ev, |p| {
            if let Packet::Publish(m) = p {
                assert!(m.retain, "delivered as retained");
                got.insert(
                    String::from_utf8_lossy(&m.topic).into_owned(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                );
            }
            (got.len() == 2).then_some(())
        })
        .await;
        assert_eq!(
            got,
            BTreeMap::from([
                ("dt/dev-1/fw".to_string(), "1.2".to_string()),
                ("dt/dev-1/state".to_string(), "off".to_string()),
            ]),
            "{}",
            b.name()
        );
        // Nothing more (the deleted one stays deleted).
        let more = tokio::time::timeout(std::time::Duration::from_millis(300), async {
            loop {
                if let Ok(rumqttc::v5::Event::Incoming(Packet::Publish(m))) = ev.poll().await {
                    return m;
                }
            }
        })
        .await;
        assert!(more.is_err(), "{}: {more:?}", b.name());
        broker.shutdown().await;
        for m in b.stores.retained.load_retained().await.unwrap() {
            b.stores.retained.delete_retained(&m.topic).await.unwrap();
        }
    })
    .await;
}

/// An MQTT 5 connection that keeps its session (Clean Start=false, an
/// expiry of ten minutes): the client, its event loop and whether the
/// CONNACK said the session was present.
async fn kept_session(
    pki: &fleet_cloud::pki::Pki,
    id: &fleet_cloud::pki::Identity,
    port: u16,
    clean: bool,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop, bool) {
    let mut o = client_options(pki, id, &id.common_name, port);
    o.set_clean_start(clean)
        .set_session_expiry_interval(Some(600));
    let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 16);
    let present = next_packet(&mut ev, |p| match p {
        rumqttc::v5::mqttbytes::v5::Packet::ConnAck(a) => Some(a.session_present),
        _ => None,
    })
    .await;
    (c, ev, present)
}

/// Issue 21: persistent sessions survive a restart of the embedded broker,
/// on every store: a device away keeps its subscriptions and the QoS 1
/// messages sent meanwhile; a device connected when the broker stopped
/// keeps its subscriptions; a clean start begins afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_survive_a_broker_restart_on_every_store() {
    use fleet_cloud::EmbeddedBroker;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::Packet;

    on_every_store(|instance| async move {
        let pki = fleet_cloud::pki::Pki::new("session test CA").unwrap();
        let start = |stores: &Stores| {
            let mut config = embedded_config(&pki);
            config.session_store = Some(stores.sessions.clone());
            EmbeddedBroker::start(config)
        };
        let (away, there) = (
            pki.client_identity("dev-away").unwrap(),
            pki.client_identity("dev-there").unwrap(),
        );
        let backend = pki.client_identity("fleet-backend").unwrap();
        let delta = |thing: &str| format!("$aws/things/{thing}/shadow/update/delta");

        let a = instance().await;
        let broker = start(&a.stores).await.unwrap();
        let port = broker.local_addr().port();
        for id in [&away, &there] {
            let (c, mut ev, present) = kept_session(&pki, id, port, false).await;
            assert!(!present, "{}", a.name());
            c.subscribe(delta(&id.common_name), QoS::AtLeastOnce)
                .await
                .unwrap();
            next_packet(&mut ev, |p| matches!(p, Packet::SubAck(_)).then_some(())).await;
            if id.common_name == "dev-away" {
                c.disconnect().await.unwrap();
                let _ = tokio::time::timeout(std::time::Duration::from_millis(300), async {
                    while ev.poll().await.is_ok() {}
                })
                .await;
            } else {
                // Still connected when the broker stops.
                std::mem::forget((c, ev));
            }
        }
        let (b, mut be) = device_client(&pki, &backend, "svc", port);
        for m in ["one", "two"] {
            b.publish(delta("dev-away"), QoS::AtLeastOnce, false, m)
                .await
                .unwrap();
            next_packet(&mut be, |p| matches!(p, Packet::PubAck(_)).then_some(())).await;
        }
        // Written in order by the broker's writer: give it a moment.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        broker.shutdown().await;

        let b2 = instance().await;
        let broker = start(&b2.stores).await.unwrap();
        let port = broker.local_addr().port();
        let (_c, mut ev, present) = kept_session(&pki, &away, port, false).await;
        assert!(present, "{}: the away session was kept", b2.name());
        let mut got = Vec::new();
        next_packet(&mut ev, |p| {
            if let Packet::Publish(m) = p {
                got.push(String::from_utf8_lossy(&m.payload).into_owned());
            }
            (got.len() == 2).then_some(())
        })
        .await;
        assert_eq!(got, ["one", "two"], "{}", b2.name());
        let (_c2, mut ev2, present) = kept_session(&pki, &there, port, false).await;
        assert!(present, "{}: the connected session was kept", b2.name());
        let (b, mut be) = device_client(&pki, &backend, "svc", port);
        b.publish(delta("dev-there"), QoS::AtLeastOnce, false, "live")
            .await
            .unwrap();
        next_packet(&mut be, |p| matches!(p, Packet::PubAck(_)).then_some(())).await;
        let live = next_packet(&mut ev2, |p| match p {
            Packet::Publish(m) => Some(String::from_utf8_lossy(&m.payload).into_owned()),
            _ => None,
        })
        .await;
        assert_eq!(live, "live", "{}: still subscribed", b2.name());
        // A clean start begins afresh.
        let (_c3, _ev3, present) = kept_session(&pki, &away, port, true).await;
        assert!(!present);
        broker.shutdown().await;
        for (id, _) in b2.stores.sessions.load_sessions().await.unwrap() {
            b2.stores.sessions.delete_session(&id).await.unwrap();
        }
    })
    .await;
}

// ---- the fleet index ----

/// A thing of the generated fleet, as the independent filter sees it.
#[derive(Debug, Clone)]
struct Model {
    name: String,
    site: &'static str,
    model: String,
    rev: u32,
    critical: bool,
    temp: f64,
    target: u32,
    firmware: String,
    on: bool,
    mode: Option<&'static str>,
    connected: bool,
    reason: &'static str,
}

/// The fleet: `n` things from a fixed seed.
fn fleet(n: usize) -> Vec<Model> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let r = next();
            Model {
                name: format!("{}-{i:06}", ["pump", "fan", "valve"][(r % 3) as usize]),
                site: ["north", "south", "east", "west"][(r >> 8) as usize % 4],
                model: format!("m{}", (r >> 12) % 25),
                rev: ((r >> 20) % 20) as u32 + 1,
                critical: (r >> 28) % 20 == 0,
                temp: ((next() % 1200) as f64) / 10.0,
                target: 60 + (next() % 20) as u32,
                firmware: format!("1.{}", (r >> 32) % 5),
                on: (r >> 36) % 2 == 0,
                mode: match (r >> 40) % 20 {
                    0 => Some("eco"),
                    1 => Some("boost"),
                    _ => None,
                },
                connected: (r >> 44) % 2 == 0,
                reason: [
                    "CLIENT_INITIATED_DISCONNECT",
                    "MQTT_KEEP_ALIVE_TIMEOUT",
                    "DUPLICATE_CLIENTID",
                ][(r >> 48) as usize % 3],
            }
        })
        .collect()
}

type Predicate = fn(&Model) -> bool;

/// The table of queries, each with the filter that says what it must find.
const ATOMS: &[(&str, Predicate)] = &[
    ("thingName:pump-*", |t| t.name.starts_with("pump-")),
    ("thingName:fan-0001??", |t| {
        t.name.starts_with("fan-0001") && t.name.len() == 10
    }),
    ("thingName:*-00004*", |t| t.name.contains("-00004")),
    ("attributes.site:north", |t| t.site == "north"),
    ("attributes.model:m1*", |t| t.model.starts_with("m1")),
    ("attributes.rev:[5 TO 10]", |t| (5..=10).contains(&t.rev)),
    ("shadow.reported.temp > 80", |t| t.temp > 80.0),
    ("shadow.reported.temp:[20 TO 30}", |t| {
        t.temp >= 20.0 && t.temp < 30.0
    }),
    ("shadow.reported.temp <= 0.5", |t| t.temp <= 0.5),
    ("shadow.reported.firmware:1.2", |t| t.firmware == "1.2"),
    ("shadow.reported.on:true", |t| t.on),
    ("shadow.desired.temp >= 75", |t| t.target >= 75),
    ("shadow.name.cfg.reported.mode:eco", |t| {
        t.mode == Some("eco")
    }),
    ("shadow.name.cfg.reported.mode:*", |t| t.mode.is_some()),
    ("connectivity.connected:true", |t| t.connected),
    (
        "connectivity.disconnectReason:MQTT_KEEP_ALIVE_TIMEOUT",
        |t| !t.connected && t.reason == "MQTT_KEEP_ALIVE_TIMEOUT",
    ),
    ("thingGroupNames:critical", |t| t.critical),
];

/// A query built from the table's atoms, and its filter.
#[derive(Debug, Clone)]
enum Combo {
    Atom(usize),
    And(Box<Combo>, Box<Combo>),
    Or(Box<Combo>, Box<Combo>),
    Not(Box<Combo>),
}

impl Combo {
    fn text(&self) -> String {
        match self {
            Self::Atom(i) => ATOMS[*i].0.to_string(),
            Self::And(a, b) => format!("({} AND {})", a.text(), b.text()),
            Self::Or(a, b) => format!("({} OR {})", a.text(), b.text()),
            Self::Not(a) => format!("NOT {}", a.text()),
        }
    }

    fn test(&self, t: &Model) -> bool {
        match self {
            Self::Atom(i) => (ATOMS[*i].1)(t),
            Self::And(a, b) => a.test(t) && b.test(t),
            Self::Or(a, b) => a.test(t) || b.test(t),
            Self::Not(a) => !a.test(t),
        }
    }
}

fn combos() -> impl proptest::strategy::Strategy<Value = Combo> {
    use proptest::prelude::*;
    let leaf = (0..ATOMS.len()).prop_map(Combo::Atom);
    leaf.prop_recursive(3, 8, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Combo::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Combo::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|a| Combo::Not(Box::new(a))),
        ]
    })
}

/// Writes the fleet into the stores as the services would: registry rows,
/// shadows (classic and named), connectivity.
async fn load_fleet(stores: &Stores, fleet: &[Model]) {
    use fleet_cloud::store::index::registry_entries;
    for chunk in fleet.chunks(2000) {
        let batch = chunk
            .iter()
            .map(|t| {
                let thing = fleet_cloud::Thing {
                    name: t.name.clone(),
                    attributes: attrs(&[
                        ("site", t.site),
                        ("model", &t.model),
                        ("rev", &t.rev.to_string()),
                    ]),
                    enabled: true,
                };
                let groups = if t.critical {
                    vec!["critical".to_string()]
                } else {
                    vec![]
                };
                (t.name.clone(), Some(registry_entries(&thing, &groups)))
            })
            .collect();
        stores.index.index_registry(batch).await.unwrap();
        let events = chunk
            .iter()
            .flat_map(|t| {
                let connected = fleet_cloud::ConnectivityEvent::Connected {
                    thing: t.name.clone(),
                    at: 1_000,
                    session: "s1".into(),
                };
                let gone = fleet_cloud::ConnectivityEvent::Disconnected {
                    thing: t.name.clone(),
                    at: 2_000,
                    session: "s1".into(),
                    reason: t.reason.into(),
                };
                if t.connected {
                    vec![connected]
                } else {
                    vec![connected, gone]
                }
            })
            .collect();
        stores.index.record_connectivity(events).await.unwrap();
        let mut writes = tokio::task::JoinSet::new();
        for t in chunk {
            let (stores, t) = (stores.clone(), t.clone());
            writes.spawn(async move {
                let body = json!({"state": {
                    "reported": {"temp": t.temp, "firmware": t.firmware, "on": t.on},
                    "desired": {"temp": t.target},
                }});
                let s = updated(&Shadow::new(), &body.to_string());
                stores
                    .shadows
                    .save(&key(&t.name, None), 0, &s)
                    .await
                    .unwrap();
                if let Some(mode) = t.mode {
                    let body = json!({"state": {"reported": {"mode": mode}}});
                    let s = updated(&Shadow::new(), &body.to_string());
                    stores
                        .shadows
                        .save(&key(&t.name, Some("cfg")), 0, &s)
                        .await
                        .unwrap();
                }
            });
        }
        while let Some(r) = writes.join_next().await {
            r.unwrap();
        }
    }
}

/// Every page of a search.
async fn search_all(stores: &Stores, q: &fleet_cloud::query::Query) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let page = stores
            .index
            .search(q, out.last().map_or("", String::as_str), 20_000)
            .await
            .unwrap();
        let done = page.len() < 20_000;
        out.extend(page);
        if done {
            return out;
        }
    }
}

/// Things in the fleet index, searched by the query table and by random
/// combinations of it (AND, OR, NOT), find exactly what an independent
/// filter over the same data finds, on every store; counts, counts by
/// value and numeric statistics agree too; an update is visible once
/// acknowledged; a deleted thing is found no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_index_finds_what_an_independent_filter_finds_on_every_store() {
    use fleet_cloud::query::Query;
    use proptest::strategy::{Strategy, ValueTree};
    let n: usize = std::env::var("FLEET_INDEX_TEST_THINGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let whole = fleet(n);
    on_every_store(|open| {
        let whole = whole.clone();
        async move {
            let a = open().await;
            let b = open().await;
            // The memory store scans (it is the tests' store, not a
            // database): 10,000 things are enough to check it.
            let fleet = if a.name() == "memory" {
                whole[..whole.len().min(10_000)].to_vec()
            } else {
                whole
            };
            let n = fleet.len();
            let started = std::time::Instant::now();
            load_fleet(&a.stores, &fleet).await;
            println!("{}: {n} things loaded in {:?}", a.name(), started.elapsed());
            let mut cases: Vec<Combo> = (0..ATOMS.len()).map(Combo::Atom).collect();
            let mut runner = proptest::test_runner::TestRunner::deterministic();
            let strategy = combos();
            cases.extend((0..24).map(|_| strategy.new_tree(&mut runner).unwrap().current()));
            let started = std::time::Instant::now();
            for c in &cases {
                let text = c.text();
                let q = Query::parse(&text).unwrap();
                let want: Vec<String> = {
                    let mut v: Vec<String> = fleet
                        .iter()
                        .filter(|t| c.test(t))
                        .map(|t| t.name.clone())
                        .collect();
                    v.sort();
                    v
                };
                // Read through the other handle: what one instance wrote.
                let got = search_all(&b.stores, &q).await;
                assert_eq!(got.len(), want.len(), "{}: {text}", a.name());
                assert!(got == want, "{}: {text}: results differ", a.name());
                assert_eq!(
                    b.stores.index.count(&q).await.unwrap(),
                    want.len() as u64,
                    "{text}"
                );
            }
            println!(
                "{}: {} queries in {:?}",
                a.name(),
                cases.len(),
                started.elapsed()
            );
            // Aggregations.
            let north = Query::parse("attributes.site:north").unwrap();
            let by_fw = b
                .stores
                .index
                .count_by(&north, "shadow.reported.firmware", 10)
                .await
                .unwrap();
            let mut want: BTreeMap<String, u64> = BTreeMap::new();
            for t in fleet.iter().filter(|t| t.site == "north") {
                *want.entry(t.firmware.clone()).or_default() += 1;
            }
            let got: BTreeMap<String, u64> = by_fw.into_iter().collect();
            assert_eq!(got, want, "{}", a.name());
            let stats = b
                .stores
                .index
                .numeric_stats(&north, "shadow.reported.temp")
                .await
                .unwrap();
            let temps: Vec<f64> = fleet
                .iter()
                .filter(|t| t.site == "north")
                .map(|t| t.temp)
                .collect();
            assert_eq!(stats.count, temps.len() as u64);
            assert_eq!(stats.min, temps.iter().copied().reduce(f64::min));
            assert_eq!(stats.max, temps.iter().copied().reduce(f64::max));
            let mean = temps.iter().sum::<f64>() / temps.len() as f64;
            assert!((stats.avg.unwrap() - mean).abs() < 1e-6, "{stats:?} {mean}");
            // An acknowledged update is found at once, by the other instance.
            let first = &fleet[0];
            let hot = Query::parse("shadow.reported.temp > 1000").unwrap();
            assert!(search_all(&b.stores, &hot).await.is_empty());
            let k = key(&first.name, None);
            let read = a.stores.shadows.load(&k).await.unwrap();
            let s = updated(
                &read.value,
                r#"{"state":{"reported":{"temp":1500,"on":null,"label":"MiXeD"}}}"#,
            );
            a.stores.shadows.save(&k, read.revision, &s).await.unwrap();
            // Values are searched without regard to case, as AWS's fleet
            // indexing searches; statistics show them as reported.
            for q in [
                "shadow.reported.label:mixed",
                "shadow.reported.label:MIXED",
                "shadow.reported.label:mIx*",
                "shadow.reported.label:m?xed",
                "shadow.reported.label:[MA TO MZ]",
            ] {
                let q = Query::parse(q).unwrap();
                assert_eq!(
                    search_all(&b.stores, &q).await,
                    std::slice::from_ref(&first.name),
                    "{}: {q:?}",
                    a.name()
                );
            }
            let labels = b
                .stores
                .index
                .count_by(&Query::All, "shadow.reported.label", 10)
                .await
                .unwrap();
            assert_eq!(labels, [("MiXeD".to_string(), 1)], "{}", a.name());
            let upper = Query::parse("attributes.site:NORTH").unwrap();
            assert_eq!(
                b.stores.index.count(&upper).await.unwrap(),
                fleet.iter().filter(|t| t.site == "north").count() as u64
            );
            // Its old value and its removed field are gone from the index.
            let old = Query::parse(&format!(
                "thingName:{} AND (shadow.reported.temp:{} OR shadow.reported.on:*)",
                first.name,
                fleet_cloud::query::number_text(first.temp)
            ))
            .unwrap();
            assert!(search_all(&b.stores, &old).await.is_empty(), "{}", a.name());
            let kept = Query::parse(&format!(
                "thingName:{} AND shadow.reported.firmware:{}",
                first.name, first.firmware
            ))
            .unwrap();
            assert_eq!(search_all(&b.stores, &kept).await.len(), 1, "{}", a.name());
            assert_eq!(
                search_all(&b.stores, &hot).await,
                std::slice::from_ref(&first.name)
            );
            // A thing gone from the registry is found no more.
            a.stores
                .index
                .index_registry(vec![(first.name.clone(), None)])
                .await
                .unwrap();
            assert!(search_all(&b.stores, &hot).await.is_empty());
            assert_eq!(
                b.stores.index.count(&Query::All).await.unwrap(),
                n as u64 - 1
            );
            // Shadows of things not registered are indexed, not found:
            // the deleted thing updated again, and one never registered;
            // once registered, both are.
            let read = a.stores.shadows.load(&k).await.unwrap();
            let s = updated(&read.value, r#"{"state":{"reported":{"temp":1501}}}"#);
            a.stores.shadows.save(&k, read.revision, &s).await.unwrap();
            let ghost = key("ghost-7", None);
            let s = updated(
                &fleet_core::shadow::Shadow::new(),
                r#"{"state":{"reported":{"temp":1502}}}"#,
            );
            a.stores.shadows.save(&ghost, 0, &s).await.unwrap();
            assert!(search_all(&b.stores, &hot).await.is_empty(), "{}", a.name());
            assert_eq!(b.stores.index.count(&hot).await.unwrap(), 0);
            let by_temp = b
                .stores
                .index
                .count_by(&hot, "shadow.reported.temp", 10)
                .await
                .unwrap();
            assert!(by_temp.is_empty(), "{by_temp:?}");
            let again = |name: &str| {
                let thing = fleet_cloud::Thing {
                    name: name.to_string(),
                    attributes: Default::default(),
                    enabled: true,
                };
                (
                    name.to_string(),
                    Some(fleet_cloud::store::index::registry_entries(&thing, &[])),
                )
            };
            a.stores
                .index
                .index_registry(vec![again(&first.name), again("ghost-7")])
                .await
                .unwrap();
            let mut want = vec![first.name.clone(), "ghost-7".to_string()];
            want.sort();
            assert_eq!(search_all(&b.stores, &hot).await, want, "{}", a.name());
            assert_eq!(b.stores.index.count(&hot).await.unwrap(), 2);
            // Rows of a source of their own (verified install receipts):
            // written, found, replaced.
            use fleet_cloud::query::{Entry, FieldValue};
            let verified = Query::parse("inventory.verified.fw:2.0").unwrap();
            a.stores
                .index
                .index_rows(
                    "ghost-7",
                    fleet_cloud::store::index::RECEIPTS,
                    vec![Entry::new(
                        "inventory.verified.fw",
                        FieldValue::Text("2.0".into()),
                    )],
                )
                .await
                .unwrap();
            assert_eq!(
                search_all(&b.stores, &verified).await,
                ["ghost-7"],
                "{}",
                a.name()
            );
            a.stores
                .index
                .index_rows("ghost-7", fleet_cloud::store::index::RECEIPTS, Vec::new())
                .await
                .unwrap();
            assert!(
                search_all(&b.stores, &verified).await.is_empty(),
                "{}",
                a.name()
            );
        }
    })
    .await;
}
