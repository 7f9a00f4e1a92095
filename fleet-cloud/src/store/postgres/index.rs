//! The fleet index in PostgreSQL: rows in `fleet_index`, connectivity
//! records in `connectivity`, in the database every instance shares.

use async_trait::async_trait;
use tokio_postgres::types::ToSql;

use super::PgStore;
use crate::model::{Connectivity, ConnectivityEvent};
use crate::query::{Entry, Query};
use crate::store::index::{
    self, CONNECTIVITY, Dialect, IndexConfig, IndexStore, NumericStats, Output, Param, REGISTRY,
};
use crate::store::{ShadowKey, StoreError, backend, corrupt};

type Params = Vec<Box<dyn ToSql + Sync + Send>>;

/// Rows as three arrays (fields, texts, numbers), for `unnest`.
fn columns(entries: &[Entry]) -> (Vec<String>, Vec<String>, Vec<Option<f64>>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for e in entries {
        out.0.push(e.field.clone());
        out.1.push(e.value.text());
        out.2.push(e.value.number());
    }
    out
}

/// The statement that replaces a thing's rows of one source, its
/// parameters from `$first`: thing, source, fields, texts, numbers.
fn replace_sql(first: usize, when: &str) -> String {
    let (t, s, f, x, n) = (first, first + 1, first + 2, first + 3, first + 4);
    // Only what changed is written: rows no longer wanted are deleted,
    // wanted rows not there yet inserted (both against the rows as they
    // were before the statement).
    let wanted = format!("unnest(${f}::text[], ${x}::text[], ${n}::float8[]) AS r(f, x, n)");
    format!(
        "d AS (DELETE FROM fleet_index o WHERE o.thing = ${t}::text AND o.source = ${s}::text {when}
               AND NOT EXISTS (SELECT 1 FROM {wanted}
                               WHERE r.f = o.field AND r.x = o.txt AND r.n IS NOT DISTINCT FROM o.num)),
         i AS (INSERT INTO fleet_index (thing, source, field, txt, num, fold)
               SELECT ${t}::text, ${s}::text, f, x, n, lower(x COLLATE \"C\") FROM (SELECT DISTINCT f, x, n FROM {wanted}) AS r
               WHERE NOT EXISTS (SELECT 1 FROM fleet_index o
                                 WHERE o.thing = ${t}::text AND o.source = ${s}::text AND o.field = r.f
                                   AND o.txt = r.x AND o.num IS NOT DISTINCT FROM r.n) {when}),
         u AS (INSERT INTO fleet_index_orphans (thing)
               SELECT ${t}::text
               WHERE ${s}::text <> 'registry' AND cardinality(${f}::text[]) > 0
                 AND NOT EXISTS (SELECT 1 FROM fleet_index g WHERE g.thing = ${t}::text
                                 AND g.field = 'thingName' AND g.source = 'registry') {when}
               ON CONFLICT DO NOTHING)"
    )
}

/// The parameters of [`replace_sql`].
fn replace_params(thing: &str, source: &str, entries: &[Entry]) -> Params {
    let (f, x, n) = columns(entries);
    vec![
        Box::new(thing.to_string()),
        Box::new(source.to_string()),
        Box::new(f),
        Box::new(x),
        Box::new(n),
    ]
}

fn refs(p: &Params) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

impl PgStore {
    /// The index configuration in force.
    pub(super) fn index_config(&self) -> IndexConfig {
        self.index.read().map(|c| c.clone()).unwrap_or_default()
    }

    /// A compare-and-set write (as [`cas`](Self::cas)) that replaces the
    /// thing's rows of `source` with `entries` in the same statement, only
    /// if the write happened.
    pub(super) async fn cas_indexed(
        &self,
        expected: u64,
        insert: (&str, &[&(dyn ToSql + Sync)]),
        update: (&str, &[&(dyn ToSql + Sync)]),
        (thing, source, entries): (&str, &str, &[Entry]),
    ) -> Result<u64, StoreError> {
        let (sql, params) = if expected == 0 { insert } else { update };
        let text = format!(
            "WITH w AS ({sql} RETURNING 1), {} SELECT COUNT(*) FROM w",
            replace_sql(params.len() + 1, "AND EXISTS (SELECT 1 FROM w)")
        );
        let extra = replace_params(thing, source, entries);
        let mut all: Vec<&(dyn ToSql + Sync)> = params.to_vec();
        all.extend(refs(&extra));
        let client = self.client().await?;
        let stmt = client.prepare_cached(&text).await.map_err(backend)?;
        let changed: i64 = client.query_one(&stmt, &all).await.map_err(backend)?.get(0);
        if changed != 1 {
            return Err(StoreError::Conflict);
        }
        Ok(expected + 1)
    }

    async fn replace_rows(
        client: &impl deadpool_postgres::GenericClient,
        thing: &str,
        source: &str,
        entries: &[Entry],
    ) -> Result<(), StoreError> {
        let text = format!("WITH {} SELECT 1", replace_sql(1, ""));
        let p = replace_params(thing, source, entries);
        client.query(&text, &refs(&p)).await.map_err(backend)?;
        Ok(())
    }

    /// Replaces the rows of `source` of many things in one statement.
    async fn replace_many(
        client: &impl deadpool_postgres::GenericClient,
        source: &str,
        things: &[(String, Vec<Entry>)],
    ) -> Result<(), StoreError> {
        let names: Vec<&str> = things.iter().map(|(t, _)| t.as_str()).collect();
        let (mut t, mut f, mut x, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (thing, entries) in things {
            for e in entries {
                t.push(thing.as_str());
                f.push(e.field.as_str());
                x.push(e.value.text());
                n.push(e.value.number());
            }
        }
        client
            .query(
                "WITH d AS (DELETE FROM fleet_index WHERE source = $1 AND thing = ANY($2::text[])),
                      i AS (INSERT INTO fleet_index (thing, source, field, txt, num, fold)
                            SELECT t, $1, f, x, n, lower(x COLLATE \"C\") FROM unnest($3::text[], $4::text[], $5::text[], $6::float8[]) AS r(t, f, x, n)),
                      p AS (DELETE FROM fleet_index_orphans WHERE $1 = 'registry' AND thing = ANY($2::text[])),
                      u AS (INSERT INTO fleet_index_orphans (thing)
                            SELECT DISTINCT t FROM unnest($3::text[]) AS r(t)
                            WHERE $1 <> 'registry'
                              AND NOT EXISTS (SELECT 1 FROM fleet_index g WHERE g.thing = r.t
                                              AND g.field = 'thingName' AND g.source = 'registry')
                            ON CONFLICT DO NOTHING)
                 SELECT 1",
                &[&source, &names, &t, &f, &x, &n],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn rows<T>(
        &self,
        sql: index::Sql,
        f: impl Fn(&tokio_postgres::Row) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let params: Params = sql
            .params
            .into_iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Text(s) => Box::new(s),
                    Param::Number(n) => Box::new(n),
                    Param::Count(n) => Box::new(n),
                }
            })
            .collect();
        let client = self.client().await?;
        let rows = client
            .query(&sql.text, &refs(&params))
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(f).collect())
    }
}

async fn load_connectivity(
    client: &impl deadpool_postgres::GenericClient,
    thing: &str,
) -> Result<Option<Connectivity>, StoreError> {
    let row = client
        .query_opt(
            "SELECT record FROM connectivity WHERE thing = $1",
            &[&thing],
        )
        .await
        .map_err(backend)?;
    row.map(|r| serde_json::from_str(r.get::<_, &str>(0)).map_err(corrupt))
        .transpose()
}

async fn save_connectivity_many(
    client: &impl deadpool_postgres::GenericClient,
    records: &std::collections::BTreeMap<String, Connectivity>,
) -> Result<(), StoreError> {
    let mut names = Vec::new();
    let mut texts = Vec::new();
    let mut rows = Vec::new();
    for (thing, record) in records {
        names.push(thing.as_str());
        texts.push(serde_json::to_string(record).map_err(corrupt)?);
        rows.push((thing.clone(), index::connectivity_entries(record)));
    }
    client
        .execute(
            "INSERT INTO connectivity (thing, record) SELECT t, r FROM unnest($1::text[], $2::text[]) AS x(t, r)
             ON CONFLICT (thing) DO UPDATE SET record = excluded.record",
            &[&names, &texts],
        )
        .await
        .map_err(backend)?;
    PgStore::replace_many(client, CONNECTIVITY, &rows).await
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl IndexStore for PgStore {
    async fn configure(&self, config: IndexConfig) -> Result<bool, StoreError> {
        if let Ok(mut c) = self.index.write() {
            *c = config.clone();
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        // One instance rebuilds; the others wait and find it done.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&super::MIGRATION_LOCK],
        )
        .await
        .map_err(backend)?;
        let stored = tx
            .query_opt(
                "SELECT value FROM fleet_index_meta WHERE key = 'config'",
                &[],
            )
            .await
            .map_err(backend)?
            .map(|r| r.get::<_, String>(0));
        let fingerprint = config.fingerprint();
        if stored.as_deref() == Some(fingerprint.as_str()) {
            return Ok(false);
        }
        tx.execute(
            "DELETE FROM fleet_index WHERE source = 'jobs' OR source = 'shadow' OR source LIKE 'shadow:%'",
            &[],
        )
        .await
        .map_err(backend)?;
        let shadows = tx
            .query("SELECT thing, name, document FROM shadows", &[])
            .await
            .map_err(backend)?;
        for r in shadows {
            let name: String = r.get(1);
            let key = ShadowKey {
                thing: r.get(0),
                shadow: (!name.is_empty()).then_some(name),
            };
            let shadow = fleet_core::shadow::Shadow::from_stored_json(r.get::<_, &[u8]>(2))
                .map_err(corrupt)?;
            let entries = index::shadow_entries(&key, &shadow, &config);
            Self::replace_rows(&tx, &key.thing, &index::shadow_source(&key), &entries).await?;
        }
        let jobs = tx
            .query("SELECT thing, document FROM thing_jobs", &[])
            .await
            .map_err(backend)?;
        for r in jobs {
            let thing: String = r.get(0);
            let jobs: fleet_core::jobs::ThingJobs =
                serde_json::from_slice(r.get::<_, &[u8]>(1)).map_err(corrupt)?;
            Self::replace_rows(&tx, &thing, index::JOBS, &index::job_entries(&jobs)).await?;
        }
        tx.execute(
            "INSERT INTO fleet_index_meta (key, value) VALUES ('config', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&fingerprint],
        )
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(true)
    }

    async fn index_registry(
        &self,
        things: Vec<(String, Option<Vec<Entry>>)>,
    ) -> Result<(), StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let gone: Vec<&str> = things
            .iter()
            .filter(|(_, e)| e.is_none())
            .map(|(t, _)| t.as_str())
            .collect();
        if !gone.is_empty() {
            tx.execute(
                "DELETE FROM fleet_index WHERE thing = ANY($1::text[])",
                &[&gone],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                "DELETE FROM connectivity WHERE thing = ANY($1::text[])",
                &[&gone],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                "DELETE FROM fleet_index_orphans WHERE thing = ANY($1::text[])",
                &[&gone],
            )
            .await
            .map_err(backend)?;
        }
        let kept: Vec<(String, Vec<Entry>)> = things
            .into_iter()
            .filter_map(|(t, e)| e.map(|e| (t, e)))
            .collect();
        if !kept.is_empty() {
            Self::replace_many(&tx, REGISTRY, &kept).await?;
            // A shadow written by another instance while its thing was
            // being registered may have noted it after the registration
            // crossed it off (each statement reads the rows as they were
            // when it began): the registered ones go now. Queries check
            // the list anyway; this keeps it short.
            tx.execute(
                "DELETE FROM fleet_index_orphans o WHERE EXISTS (SELECT 1 FROM fleet_index u
                 WHERE u.thing = o.thing AND u.field = 'thingName' AND u.source = 'registry')",
                &[],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn record_connectivity(&self, events: Vec<ConnectivityEvent>) -> Result<(), StoreError> {
        let mut names: Vec<&str> = events.iter().map(ConnectivityEvent::thing).collect();
        names.sort_unstable();
        names.dedup();
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        // Locked for the transaction, in name order: two instances
        // recording at once apply their events one after the other.
        tx.execute(
            "INSERT INTO connectivity (thing, record) SELECT t, '{}' FROM unnest($1::text[]) AS r(t) ON CONFLICT DO NOTHING",
            &[&names],
        )
        .await
        .map_err(backend)?;
        let rows = tx
            .query(
                "SELECT thing, record FROM connectivity WHERE thing = ANY($1::text[]) ORDER BY thing FOR UPDATE",
                &[&names],
            )
            .await
            .map_err(backend)?;
        let mut records: std::collections::BTreeMap<String, Connectivity> = Default::default();
        for r in rows {
            let record = match r.get::<_, &str>(1) {
                "{}" => Connectivity::default(),
                text => serde_json::from_str(text).map_err(corrupt)?,
            };
            records.insert(r.get(0), record);
        }
        for e in &events {
            if let Some(r) = records.get_mut(e.thing()) {
                r.apply(e);
            }
        }
        save_connectivity_many(&tx, &records).await?;
        tx.commit().await.map_err(backend)
    }

    async fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError> {
        let client = self.client().await?;
        load_connectivity(&client, thing).await
    }

    async fn index_rows(
        &self,
        thing: &str,
        source: &str,
        entries: Vec<Entry>,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        Self::replace_rows(&client, thing, source, &entries).await
    }

    async fn end_connections(&self, reason: &str) -> Result<usize, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        let rows = tx
            .query(
                "SELECT thing, record FROM connectivity ORDER BY thing FOR UPDATE",
                &[],
            )
            .await
            .map_err(backend)?;
        let mut ended = std::collections::BTreeMap::new();
        for row in rows {
            let thing: String = row.get(0);
            let mut r: Connectivity =
                serde_json::from_str(row.get::<_, &str>(1)).map_err(corrupt)?;
            if r.end(reason) {
                ended.insert(thing, r);
            }
        }
        if !ended.is_empty() {
            save_connectivity_many(&tx, &ended).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(ended.len())
    }

    async fn search(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let sql = index::compile(Dialect::Postgres, query, Output::Page(after, limit));
        self.rows(sql, |r| r.get(0)).await
    }

    async fn count(&self, query: &Query) -> Result<u64, StoreError> {
        let sql = index::compile(Dialect::Postgres, query, Output::Count);
        let n = self.rows(sql, |r| r.get::<_, i64>(0)).await?;
        Ok(count(n.first().copied().unwrap_or(0)))
    }

    async fn count_by(
        &self,
        query: &Query,
        field: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let sql = index::compile(Dialect::Postgres, query, Output::CountBy(field, limit));
        self.rows(sql, |r| (r.get(0), count(r.get(1)))).await
    }

    async fn numeric_stats(&self, query: &Query, field: &str) -> Result<NumericStats, StoreError> {
        let sql = index::compile(Dialect::Postgres, query, Output::Stats(field));
        let rows = self
            .rows(sql, |r| NumericStats {
                count: count(r.get(0)),
                min: r.get(1),
                max: r.get(2),
                avg: r.get(3),
            })
            .await?;
        Ok(rows.into_iter().next().unwrap_or_default())
    }

    async fn entries(&self, thing: &str) -> Result<Vec<Entry>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT field, txt, num FROM fleet_index WHERE thing = $1 ORDER BY source, field, txt",
                &[&thing],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| Entry {
                field: r.get(0),
                value: index::value_of(r.get(1), r.get(2)),
            })
            .collect())
    }

    async fn scan(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT thing, field, txt, num FROM fleet_index ORDER BY thing",
                &[],
            )
            .await
            .map_err(backend)?;
        let mut found = Vec::new();
        let mut i = 0;
        while i < rows.len() && found.len() < limit {
            let thing: &str = rows[i].get(0);
            let mut entries = Vec::new();
            while i < rows.len() && rows[i].get::<_, &str>(0) == thing {
                entries.push(Entry {
                    field: rows[i].get(1),
                    value: index::value_of(rows[i].get(2), rows[i].get(3)),
                });
                i += 1;
            }
            found.extend(index::filter_rows(
                std::iter::once((thing, entries.as_slice())),
                query,
                after,
                1,
            ));
        }
        Ok(found)
    }
}
