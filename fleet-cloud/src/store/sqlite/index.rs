//! The fleet index in SQLite: rows in `fleet_index`, connectivity records
//! in `connectivity`, in the file of the shadows and jobs.

use async_trait::async_trait;
use rusqlite::types::{ToSql, ToSqlOutput};

use super::{SqliteStore, backend};
use crate::model::{Connectivity, ConnectivityEvent};
use crate::query::{Entry, Query};
use crate::store::index::{
    self, CONNECTIVITY, Dialect, IndexConfig, IndexStore, NumericStats, Output, Param, REGISTRY,
};
use crate::store::{ShadowKey, StoreError, corrupt};

impl ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Param::Text(s) => s.to_sql(),
            Param::Number(n) => n.to_sql(),
            Param::Count(n) => n.to_sql(),
        }
    }
}

/// Replaces a thing's rows of one source (inside a write), writing only
/// what changed: a shadow update that changes two fields rewrites two rows,
/// not every row of the shadow.
pub(super) fn replace_rows(
    c: &rusqlite::Connection,
    thing: &str,
    source: &str,
    entries: &[Entry],
) -> Result<(), StoreError> {
    // Rows of a thing not registered are noted as such (queries leave
    // it out); a registration crosses it off.
    if source == REGISTRY {
        c.prepare_cached("DELETE FROM fleet_index_orphans WHERE thing = ?1")
            .and_then(|mut s| s.execute([thing]))
            .map_err(backend)?;
    } else if !entries.is_empty() {
        c.prepare_cached(
            "INSERT OR IGNORE INTO fleet_index_orphans (thing) SELECT ?1
             WHERE NOT EXISTS (SELECT 1 FROM fleet_index u WHERE u.thing = ?1
                               AND u.field = 'thingName' AND u.source = 'registry')",
        )
        .and_then(|mut s| s.execute([thing]))
        .map_err(backend)?;
    }
    // A field's value once (an array may hold it twice).
    let mut wanted: Vec<(String, String, Option<f64>)> = Vec::with_capacity(entries.len());
    for e in entries {
        let text = e.value.text();
        if !wanted.iter().any(|(f, t, _)| *f == e.field && *t == text) {
            wanted.push((e.field.clone(), text, e.value.number()));
        }
    }
    let old: Vec<(String, String)> = {
        let mut stmt = c
            .prepare_cached("SELECT field, txt FROM fleet_index WHERE thing = ?1 AND source = ?2")
            .map_err(backend)?;
        let rows = stmt
            .query_map((thing, source), |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)?
    };
    let mut delete = c
        .prepare_cached(
            "DELETE FROM fleet_index WHERE thing = ?1 AND field = ?2 AND source = ?3 AND txt = ?4",
        )
        .map_err(backend)?;
    for (field, txt) in old {
        // Kept (the text gives the number): crossed off what is to insert.
        match wanted.iter().position(|(f, t, _)| *f == field && *t == txt) {
            Some(i) => {
                wanted.swap_remove(i);
            }
            None => {
                delete
                    .execute((thing, &field, source, &txt))
                    .map_err(backend)?;
            }
        }
    }
    let mut insert = c
        .prepare_cached(
            "INSERT INTO fleet_index (thing, source, field, txt, num, fold) VALUES (?1, ?2, ?3, ?4, ?5, lower(?4))",
        )
        .map_err(backend)?;
    for (field, txt, num) in wanted {
        insert
            .execute((thing, source, field, txt, num))
            .map_err(backend)?;
    }
    Ok(())
}

fn load_connectivity(
    c: &rusqlite::Connection,
    thing: &str,
) -> Result<Option<Connectivity>, StoreError> {
    let row: Option<String> = c
        .prepare_cached("SELECT record FROM connectivity WHERE thing = ?1")
        .map_err(backend)?
        .query_row([thing], |r| r.get(0))
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(backend(e)),
        })?;
    row.map(|r| serde_json::from_str(&r).map_err(corrupt))
        .transpose()
}

fn save_connectivity(
    c: &rusqlite::Connection,
    thing: &str,
    record: &Connectivity,
) -> Result<(), StoreError> {
    let text = serde_json::to_string(record).map_err(corrupt)?;
    c.prepare_cached(
        "INSERT INTO connectivity (thing, record) VALUES (?1, ?2)
         ON CONFLICT (thing) DO UPDATE SET record = excluded.record",
    )
    .and_then(|mut s| s.execute((thing, &text)))
    .map_err(backend)?;
    replace_rows(c, thing, CONNECTIVITY, &index::connectivity_entries(record))
}

/// Rebuilds the rows of every shadow and every thing's jobs (inside a
/// write).
fn rebuild(c: &rusqlite::Connection, config: &IndexConfig) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM fleet_index WHERE source = 'jobs' OR source = 'shadow' OR source LIKE 'shadow:%'",
        (),
    )
    .map_err(backend)?;
    let mut shadows = c
        .prepare("SELECT thing, name, document FROM shadows")
        .map_err(backend)?;
    let mut rows = shadows.query(()).map_err(backend)?;
    while let Some(r) = rows.next().map_err(backend)? {
        let (thing, name, doc): (String, String, Vec<u8>) = (
            r.get(0).map_err(backend)?,
            r.get(1).map_err(backend)?,
            r.get(2).map_err(backend)?,
        );
        let key = ShadowKey {
            thing,
            shadow: (!name.is_empty()).then_some(name),
        };
        let shadow = fleet_core::shadow::Shadow::from_stored_json(&doc).map_err(corrupt)?;
        let entries = index::shadow_entries(&key, &shadow, config);
        replace_rows(c, &key.thing, &index::shadow_source(&key), &entries)?;
    }
    let mut jobs = c
        .prepare("SELECT thing, document FROM thing_jobs")
        .map_err(backend)?;
    let mut rows = jobs.query(()).map_err(backend)?;
    while let Some(r) = rows.next().map_err(backend)? {
        let (thing, doc): (String, Vec<u8>) =
            (r.get(0).map_err(backend)?, r.get(1).map_err(backend)?);
        let jobs: fleet_core::jobs::ThingJobs = serde_json::from_slice(&doc).map_err(corrupt)?;
        replace_rows(c, &thing, index::JOBS, &index::job_entries(&jobs))?;
    }
    c.execute(
        "INSERT INTO fleet_index_meta (key, value) VALUES ('config', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [config.fingerprint()],
    )
    .map_err(backend)?;
    Ok(())
}

impl SqliteStore {
    /// The index configuration in force.
    pub(super) fn index_config(&self) -> IndexConfig {
        self.index.read().map(|c| c.clone()).unwrap_or_default()
    }

    async fn query_rows<T: Send + 'static>(
        &self,
        sql: index::Sql,
        row: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        self.with_conn(move |c| {
            let mut stmt = c.prepare_cached(&sql.text).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(sql.params.iter()), row)
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl IndexStore for SqliteStore {
    async fn configure(&self, config: IndexConfig) -> Result<bool, StoreError> {
        if let Ok(mut c) = self.index.write() {
            *c = config.clone();
        }
        let fingerprint = config.fingerprint();
        let rebuilt = self
            .write(move |c| {
                let stored: Option<String> = c
                    .query_row(
                        "SELECT value FROM fleet_index_meta WHERE key = 'config'",
                        (),
                        |r| r.get(0),
                    )
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(backend(e)),
                    })?;
                if stored.as_deref() == Some(fingerprint.as_str()) {
                    return Ok(0);
                }
                rebuild(c, &config)?;
                Ok(1)
            })
            .await?;
        Ok(rebuilt == 1)
    }

    async fn index_registry(
        &self,
        things: Vec<(String, Option<Vec<Entry>>)>,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            for (thing, entries) in &things {
                match entries {
                    Some(entries) => replace_rows(c, thing, REGISTRY, entries)?,
                    None => {
                        c.prepare_cached("DELETE FROM fleet_index WHERE thing = ?1")
                            .and_then(|mut s| s.execute([thing]))
                            .map_err(backend)?;
                        c.prepare_cached("DELETE FROM connectivity WHERE thing = ?1")
                            .and_then(|mut s| s.execute([thing]))
                            .map_err(backend)?;
                        c.prepare_cached("DELETE FROM fleet_index_orphans WHERE thing = ?1")
                            .and_then(|mut s| s.execute([thing]))
                            .map_err(backend)?;
                    }
                }
            }
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn record_connectivity(&self, events: Vec<ConnectivityEvent>) -> Result<(), StoreError> {
        self.write(move |c| {
            let mut records: std::collections::BTreeMap<String, Connectivity> = Default::default();
            for e in &events {
                let thing = e.thing();
                if !records.contains_key(thing) {
                    let r = load_connectivity(c, thing)?.unwrap_or_default();
                    records.insert(thing.to_string(), r);
                }
                if let Some(r) = records.get_mut(thing) {
                    r.apply(e);
                }
            }
            for (thing, r) in &records {
                save_connectivity(c, thing, r)?;
            }
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError> {
        let thing = thing.to_string();
        self.with_conn(move |c| load_connectivity(c, &thing)).await
    }

    async fn index_rows(
        &self,
        thing: &str,
        source: &str,
        entries: Vec<Entry>,
    ) -> Result<(), StoreError> {
        let (thing, source) = (thing.to_string(), source.to_string());
        self.write(move |c| {
            replace_rows(c, &thing, &source, &entries)?;
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn end_connections(&self, reason: &str) -> Result<usize, StoreError> {
        let reason = reason.to_string();
        self.write(move |c| {
            let connected: Vec<(String, String)> = {
                let mut stmt = c
                    .prepare("SELECT thing, record FROM connectivity")
                    .map_err(backend)?;
                let rows = stmt
                    .query_map((), |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            let mut ended = 0;
            for (thing, record) in connected {
                let mut r: Connectivity = serde_json::from_str(&record).map_err(corrupt)?;
                if r.end(&reason) {
                    save_connectivity(c, &thing, &r)?;
                    ended += 1;
                }
            }
            Ok(ended)
        })
        .await
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn search(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let sql = index::compile(Dialect::Sqlite, query, Output::Page(after, limit));
        self.query_rows(sql, |r| r.get(0)).await
    }

    async fn count(&self, query: &Query) -> Result<u64, StoreError> {
        let sql = index::compile(Dialect::Sqlite, query, Output::Count);
        let n: Vec<i64> = self.query_rows(sql, |r| r.get(0)).await?;
        Ok(count(n.first().copied().unwrap_or(0)))
    }

    async fn count_by(
        &self,
        query: &Query,
        field: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let sql = index::compile(Dialect::Sqlite, query, Output::CountBy(field, limit));
        let rows: Vec<(String, i64)> = self.query_rows(sql, |r| Ok((r.get(0)?, r.get(1)?))).await?;
        Ok(rows.into_iter().map(|(v, n)| (v, count(n))).collect())
    }

    async fn numeric_stats(&self, query: &Query, field: &str) -> Result<NumericStats, StoreError> {
        let sql = index::compile(Dialect::Sqlite, query, Output::Stats(field));
        let rows: Vec<NumericStats> = self
            .query_rows(sql, |r| {
                Ok(NumericStats {
                    count: count(r.get(0)?),
                    min: r.get(1)?,
                    max: r.get(2)?,
                    avg: r.get(3)?,
                })
            })
            .await?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }

    async fn entries(&self, thing: &str) -> Result<Vec<Entry>, StoreError> {
        let thing = thing.to_string();
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT field, txt, num FROM fleet_index WHERE thing = ?1 ORDER BY source, field, txt",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([&thing], row_entry).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn scan(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (query, after) = (query.clone(), after.to_string());
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT thing, field, txt, num FROM fleet_index ORDER BY thing")
                .map_err(backend)?;
            let mut rows = stmt.query(()).map_err(backend)?;
            let mut found = Vec::new();
            let mut current: Option<(String, Vec<Entry>)> = None;
            let finish = |t: Option<(String, Vec<Entry>)>, found: &mut Vec<String>| {
                if let Some((name, entries)) = t {
                    found.extend(index::filter_rows(
                        std::iter::once((name.as_str(), entries.as_slice())),
                        &query,
                        &after,
                        1,
                    ));
                }
            };
            while let Some(r) = rows.next().map_err(backend)? {
                let thing: String = r.get(0).map_err(backend)?;
                let entry = Entry {
                    field: r.get(1).map_err(backend)?,
                    value: index::value_of(r.get(2).map_err(backend)?, r.get(3).map_err(backend)?),
                };
                match &mut current {
                    Some((name, entries)) if *name == thing => entries.push(entry),
                    _ => {
                        finish(current.take(), &mut found);
                        if found.len() >= limit {
                            break;
                        }
                        current = Some((thing, vec![entry]));
                    }
                }
            }
            finish(current, &mut found);
            found.truncate(limit);
            Ok(found)
        })
        .await
    }
}

fn row_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        field: r.get(0)?,
        value: index::value_of(r.get(1)?, r.get(2)?),
    })
}
