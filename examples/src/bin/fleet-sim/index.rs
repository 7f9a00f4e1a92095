//! `fleet-sim index`: the fleet index's query latency against a full scan
//! of the same data, at several fleet sizes, on SQLite and PostgreSQL; and
//! what keeping the index costs a shadow update.
//!
//! ```text
//! target/release/fleet-sim index --things 1000,10000,100000
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_cloud::query::Query;
use fleet_cloud::store::index::registry_entries;
use fleet_cloud::store::{IndexConfig, ShadowKey, Stores};
use fleet_cloud::{ConnectivityEvent, Thing};
use fleet_core::shadow::Shadow;

use crate::BoxError;
use crate::stats::Latencies;

/// What `fleet-sim index` measures.
#[derive(clap::Args)]
pub(crate) struct IndexArgs {
    /// Fleet sizes, comma-separated.
    #[arg(long, default_value = "1000,10000,100000", value_delimiter = ',')]
    things: Vec<usize>,
    /// Stores, comma-separated: `sqlite`, `postgres` (a server started
    /// here).
    #[arg(long, default_value = "sqlite,postgres", value_delimiter = ',')]
    stores: Vec<String>,
    /// Timed runs of each indexed query.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Timed runs of each full scan.
    #[arg(long, default_value_t = 3)]
    scan_runs: usize,
    /// Shadow updates timed with and without the index (0: skip).
    #[arg(long, default_value_t = 20_000)]
    updates: usize,
}

/// The queries measured: text prefix, numeric range on a shadow field,
/// Boolean connectivity, group membership, combinations.
const QUERIES: &[(&str, &str)] = &[
    ("text prefix", "thingName:pump-0001*"),
    ("numeric range", "shadow.reported.temp:[100 TO 101]"),
    ("connectivity", "connectivity.connected:false"),
    ("group", "thingGroupNames:critical"),
    (
        "AND/NOT",
        "attributes.site:north AND shadow.reported.temp > 110 AND NOT connectivity.connected:true",
    ),
    (
        "OR",
        "shadow.reported.firmware:1.4 OR thingGroupNames:critical",
    ),
];

struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn key(thing: &str) -> ShadowKey {
    ShadowKey {
        thing: thing.into(),
        shadow: None,
    }
}

fn report(temp: f64, firmware: &str, on: bool, n: u64) -> Result<Shadow, BoxError> {
    let body = serde_json::json!({"state": {
        "reported": {"temp": temp, "firmware": firmware, "on": on, "uptime": n, "rssi": -40 - (n % 50) as i64},
        "desired": {"temp": 70},
    }});
    Ok(Shadow::new()
        .update(body.to_string().as_bytes(), n, &Default::default())
        .map_err(|e| format!("{e:?}"))?
        .shadow)
}

/// Writes `n` things (registry rows, a classic shadow each, connectivity)
/// as the services would.
async fn load(stores: &Stores, n: usize) -> Result<(), BoxError> {
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    let mut i = 0;
    while i < n {
        let end = (i + 2000).min(n);
        let mut registry = Vec::new();
        let mut events = Vec::new();
        let mut writes = tokio::task::JoinSet::new();
        for j in i..end {
            let r = g.next();
            let name = format!("{}-{j:07}", ["pump", "fan", "valve"][(r % 3) as usize]);
            let thing = Thing {
                name: name.clone(),
                attributes: [(
                    "site".to_string(),
                    ["north", "south", "east", "west"][(r >> 8) as usize % 4].to_string(),
                )]
                .into(),
                enabled: true,
            };
            let groups = if (r >> 28).is_multiple_of(20) {
                vec!["critical".to_string()]
            } else {
                Vec::new()
            };
            registry.push((name.clone(), Some(registry_entries(&thing, &groups))));
            events.push(ConnectivityEvent::Connected {
                thing: name.clone(),
                at: 1_000,
                session: "s".into(),
            });
            if (r >> 44).is_multiple_of(2) {
                events.push(ConnectivityEvent::Disconnected {
                    thing: name.clone(),
                    at: 2_000,
                    session: "s".into(),
                    reason: "MQTT_KEEP_ALIVE_TIMEOUT".into(),
                });
            }
            let shadow = report(
                (g.next() % 1200) as f64 / 10.0,
                &format!("1.{}", (r >> 32) % 5),
                (r >> 36).is_multiple_of(2),
                1,
            )?;
            let stores = stores.clone();
            writes.spawn(async move { stores.shadows.save(&key(&name), 0, &shadow).await });
        }
        stores.index.index_registry(registry).await?;
        stores.index.record_connectivity(events).await?;
        while let Some(r) = writes.join_next().await {
            r??;
        }
        i = end;
    }
    Ok(())
}

async fn timed<F, Fut, T>(runs: usize, mut f: F) -> Result<(Latencies, T), BoxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BoxError>>,
{
    let mut l = Latencies::default();
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f().await?);
        l.push(t.elapsed());
    }
    Ok((l, last.ok_or("no runs")?))
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn open(
    kind: &str,
    pg: &mut Option<fleet_testkit::Postgres>,
    pg_url: &mut Option<String>,
    dir: &std::path::Path,
    tag: &str,
) -> Result<Stores, BoxError> {
    match kind {
        "sqlite" => Ok(Stores::sqlite(&dir.join(format!("{tag}.db")))?),
        "postgres" => {
            if pg.is_none() {
                *pg = Some(fleet_testkit::Postgres::start()?);
            }
            let server = pg.as_ref().ok_or("no PostgreSQL")?;
            let url = server.database(&format!("bench_{tag}"))?;
            *pg_url = Some(url.clone());
            Ok(Stores::postgres(&url, 16).await?)
        }
        other => Err(format!("store {other:?}: sqlite or postgres").into()),
    }
}

/// `VACUUM (ANALYZE)` through `psql`.
fn vacuum(url: &str) -> Result<(), BoxError> {
    let out = std::process::Command::new("psql")
        .arg(url)
        .args(["-q", "-c", "VACUUM (ANALYZE)"])
        .output()
        .map_err(|e| format!("psql (apt-get install postgresql-client): {e}"))?;
    if !out.status.success() {
        return Err(format!("VACUUM: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

pub(crate) async fn run(args: IndexArgs) -> Result<(), BoxError> {
    let dir = tempfile::tempdir()?;
    let mut pg = None;
    println!("# fleet index: query latency, indexed against a full scan of the same rows (ms)");
    println!(
        "| store | things | query | matches | indexed count p50 | p99 | first page (100) p50 | p99 | scan count p50 | speed-up |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for kind in &args.stores {
        for &n in &args.things {
            let mut url = None;
            let stores = open(kind, &mut pg, &mut url, dir.path(), &format!("q{n}")).await?;
            let t = Instant::now();
            load(&stores, n).await?;
            // The state autovacuum brings a table to shortly after a bulk
            // load (visibility map set, statistics current), so that both
            // the index and the scan are measured as a running fleet's.
            if let Some(url) = &url {
                vacuum(url)?;
            }
            eprintln!(
                "{kind}: {n} things loaded in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            for (name, text) in QUERIES {
                let q = Query::parse(text)?;
                let index = stores.index.clone();
                let (counts, matches) = timed(args.runs, || {
                    let (index, q) = (index.clone(), q.clone());
                    async move { Ok(index.count(&q).await?) }
                })
                .await?;
                let (pages, _) = timed(args.runs, || {
                    let (index, q) = (index.clone(), q.clone());
                    async move { Ok(index.search(&q, "", 100).await?) }
                })
                .await?;
                let (scans, scanned) = timed(args.scan_runs, || {
                    let (index, q) = (index.clone(), q.clone());
                    async move { Ok(index.scan(&q, "", usize::MAX).await?.len() as u64) }
                })
                .await?;
                if scanned != matches {
                    return Err(format!("{text}: scan found {scanned}, the index {matches}").into());
                }
                let p50 = counts.percentile(50.0);
                println!(
                    "| {kind} | {n} | {name} `{text}` | {matches} | {} | {} | {} | {} | {} | {:.0}x |",
                    ms(p50),
                    ms(counts.percentile(99.0)),
                    ms(pages.percentile(50.0)),
                    ms(pages.percentile(99.0)),
                    ms(scans.percentile(50.0)),
                    scans.percentile(50.0).as_secs_f64() / p50.as_secs_f64().max(1e-9),
                );
            }
        }
    }
    if args.updates > 0 {
        println!();
        println!("# what keeping the index costs a shadow update (updates/s, 64 at once)");
        println!(
            "| store | fields changed per update (of 5) | without the index | with every field indexed | ratio |"
        );
        println!("|---|---|---|---|---|");
        for kind in &args.stores {
            for changed in [2, 5] {
                let mut rates = Vec::new();
                for (tag, config) in [
                    (
                        "off",
                        IndexConfig {
                            shadow_fields: Some(Vec::new()),
                            ..Default::default()
                        },
                    ),
                    ("on", IndexConfig::default()),
                ] {
                    let stores = open(
                        kind,
                        &mut pg,
                        &mut None,
                        dir.path(),
                        &format!("u{tag}{changed}"),
                    )
                    .await?;
                    stores.index.configure(config).await?;
                    rates.push(updates(&stores, args.updates, changed).await?);
                }
                println!(
                    "| {kind} | {changed} | {:.0} | {:.0} | {:.2} |",
                    rates[0],
                    rates[1],
                    rates[1] / rates[0]
                );
            }
        }
    }
    Ok(())
}

/// Shadow updates per second: `total` updates of 1,000 things' shadows,
/// 64 at a time, each a load and a compare-and-set save of a report of 5
/// fields, `changed` of which change each time.
async fn updates(stores: &Stores, total: usize, changed: usize) -> Result<f64, BoxError> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (stores, next) = (stores.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), BoxError>(());
                }
                let k = key(&format!("dev-{:04}", i % 1000));
                loop {
                    let read = stores.shadows.load(&k).await?;
                    let v = |n: usize| if n < changed { i } else { 0 };
                    let body = serde_json::json!({"state": {"reported": {
                        "temp": (v(0) % 1200) as f64 / 10.0, "uptime": v(1),
                        "rssi": -40 - (v(2) % 50) as i64, "on": v(3) % 2 == 0,
                        "firmware": format!("1.{}", v(4) % 5),
                    }}});
                    let s = read
                        .value
                        .update(body.to_string().as_bytes(), i as u64, &Default::default())
                        .map_err(|e| format!("{e:?}"))?
                        .shadow;
                    match stores.shadows.save(&k, read.revision, &s).await {
                        Ok(_) => break,
                        Err(fleet_cloud::store::StoreError::Conflict) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}
