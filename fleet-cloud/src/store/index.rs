//! The fleet index: every thing's searchable fields (registry, shadows,
//! connectivity, job executions) as rows of `(thing, source, field, text,
//! number)`, indexed by `(field, text)` and `(field, number)`, so that a
//! query ([`Query`]) is answered from index ranges, not by reading every
//! thing.
//!
//! Each row belongs to a *source*, rewritten whole when it changes: a
//! shadow's rows in the same transaction as the shadow
//! ([`ShadowStore::save`](super::ShadowStore::save)), a thing's job
//! executions with them ([`JobStore::save_thing`](super::JobStore::save_thing)),
//! its connectivity with its connectivity record, its registry fields
//! when the registry changes (the registry may live in another database:
//! the registry service writes them after the registry, and
//! [`Registry::sync_index`](crate::Registry::sync_index) rewrites them all
//! at start). A query is compiled into one SQL statement of set
//! operations (INTERSECT, UNION, EXCEPT) over index ranges.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use async_trait::async_trait;
use fleet_core::jobs::ThingJobs;
use fleet_core::shadow::Shadow;
use serde_json::Value;

use super::{ShadowKey, StoreError};
use crate::model::{Connectivity, ConnectivityEvent, Thing};
use crate::query::{Entry, FieldValue, Glob, Query, Test};

/// Which shadow fields the index keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexConfig {
    /// Shadow fields indexed: a field (`shadow.reported.firmware`) or a
    /// prefix ending in `*` (`shadow.reported.*`, `shadow.name.cfg.*`);
    /// `None`: every field of every shadow.
    pub shadow_fields: Option<Vec<String>>,
    /// Values kept per shadow at most (the first ones in key order); a
    /// shadow with more has the rest unindexed.
    pub max_values_per_shadow: usize,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            shadow_fields: None,
            max_values_per_shadow: 256,
        }
    }
}

impl IndexConfig {
    /// Whether shadow field `field` is indexed (fields other than a
    /// shadow's always are).
    pub fn indexes(&self, field: &str) -> bool {
        if !field.starts_with("shadow.") {
            return true;
        }
        match &self.shadow_fields {
            None => true,
            Some(list) => list.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => field.starts_with(prefix),
                None => field == p,
            }),
        }
    }

    /// A text that changes when what is indexed changes (kept by the
    /// store: a different one at start rebuilds the shadows' rows).
    pub fn fingerprint(&self) -> String {
        format!(
            "v1;{};{}",
            self.max_values_per_shadow,
            self.shadow_fields
                .as_ref()
                .map_or("*".to_string(), |l| l.join(","))
        )
    }
}

/// The source of the registry's rows of a thing.
pub const REGISTRY: &str = "registry";
/// The source of a thing's job executions.
pub const JOBS: &str = "jobs";
/// The source of a thing's connectivity.
pub const CONNECTIVITY: &str = "connectivity";
/// The source of the rows a thing's verified install receipts give
/// (`inventory.verified.*`).
pub const RECEIPTS: &str = "receipts";

/// The source of a shadow's rows: `shadow` or `shadow:{name}`.
pub fn shadow_source(key: &ShadowKey) -> String {
    match &key.shadow {
        None => "shadow".into(),
        Some(n) => format!("shadow:{n}"),
    }
}

fn leaves(prefix: &str, value: &Value, out: &mut Vec<Entry>, config: &IndexConfig) {
    if out.len() >= config.max_values_per_shadow {
        return;
    }
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                leaves(&format!("{prefix}.{k}"), v, out, config);
            }
        }
        Value::Array(items) => {
            for v in items {
                leaves(prefix, v, out, config);
            }
        }
        Value::Null => {}
        leaf if config.indexes(prefix) => out.push(Entry::new(
            prefix,
            match leaf {
                Value::Bool(b) => FieldValue::Bool(*b),
                Value::Number(n) => FieldValue::Number(n.as_f64().unwrap_or_default()),
                Value::String(s) => FieldValue::Text(s.clone()),
                _ => return,
            },
        )),
        _ => {}
    }
}

/// A shadow's rows: its reported and desired leaves and its version
/// (none for a deleted shadow).
pub fn shadow_entries(key: &ShadowKey, shadow: &Shadow, config: &IndexConfig) -> Vec<Entry> {
    let Some(state) = shadow.state() else {
        return Vec::new();
    };
    // What the device agent reports it runs: `inventory.*`, whatever the
    // shadow fields configured.
    if key.shadow.as_deref() == Some(fleet_core::shadow::INVENTORY_SHADOW) {
        let mut out = Vec::new();
        let all = IndexConfig::default();
        for (k, v) in state.reported() {
            leaves(&format!("inventory.{k}"), v, &mut out, &all);
        }
        return out;
    }
    let base = match &key.shadow {
        None => "shadow".to_string(),
        Some(n) => format!("shadow.name.{n}"),
    };
    let mut out = Vec::new();
    let version = format!("{base}.version");
    if config.indexes(&version) {
        out.push(Entry::new(
            version,
            FieldValue::Number(shadow.version() as f64),
        ));
    }
    for (section, object) in [("reported", state.reported()), ("desired", state.desired())] {
        for (k, v) in object {
            leaves(&format!("{base}.{section}.{k}"), v, &mut out, config);
        }
    }
    out
}

/// A thing's job rows: `jobs.{jobId}` = the latest execution's status.
pub fn job_entries(jobs: &ThingJobs) -> Vec<Entry> {
    let mut latest = BTreeMap::new();
    for e in jobs.executions() {
        latest.insert(e.job_id.clone(), e.status.as_str());
    }
    latest
        .into_iter()
        .map(|(id, status)| Entry::new(format!("jobs.{id}"), FieldValue::Text(status.into())))
        .collect()
}

/// A thing's registry rows: name, enabled, attributes and static groups.
pub fn registry_entries(thing: &Thing, groups: &[String]) -> Vec<Entry> {
    let mut out = vec![
        Entry::new("thingName", FieldValue::Text(thing.name.clone())),
        Entry::new("enabled", FieldValue::Bool(thing.enabled)),
    ];
    for (k, v) in &thing.attributes {
        out.push(Entry::new(
            format!("attributes.{k}"),
            FieldValue::Text(v.clone()),
        ));
    }
    for g in groups {
        out.push(Entry::new("thingGroupNames", FieldValue::Text(g.clone())));
    }
    out
}

/// A thing's connectivity rows.
pub fn connectivity_entries(c: &Connectivity) -> Vec<Entry> {
    let mut out = vec![
        Entry::new("connectivity.connected", FieldValue::Bool(c.connected)),
        Entry::new(
            "connectivity.timestamp",
            FieldValue::Number(c.timestamp as f64),
        ),
        Entry::new(
            "connectivity.lastSeen",
            FieldValue::Number(c.last_seen as f64),
        ),
    ];
    if let (false, Some(r)) = (c.connected, &c.disconnect_reason) {
        out.push(Entry::new(
            "connectivity.disconnectReason",
            FieldValue::Text(r.clone()),
        ));
    }
    out
}

/// min, max and average of a numeric field over the things a query
/// matches.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct NumericStats {
    /// Values counted (a thing with several counts each).
    pub count: u64,
    /// The least (`None` without values).
    pub min: Option<f64>,
    /// The greatest.
    pub max: Option<f64>,
    /// The mean.
    pub avg: Option<f64>,
}

/// Where the fleet index is kept: in the database of the shadows and jobs,
/// so that their rows change in the same transaction as they do.
#[async_trait]
pub trait IndexStore: Send + Sync + std::fmt::Debug + 'static {
    /// Sets which shadow fields are indexed; when that differs from what
    /// the stored rows were built with, rebuilds every shadow's rows.
    /// Returns whether it rebuilt.
    async fn configure(&self, config: IndexConfig) -> Result<bool, StoreError>;

    /// Replaces the registry rows of each thing listed (`None`: the thing
    /// is gone; every row of it, of every source, is removed).
    async fn index_registry(
        &self,
        things: Vec<(String, Option<Vec<Entry>>)>,
    ) -> Result<(), StoreError>;

    /// Applies connectivity events in order (each thing's record and rows).
    async fn record_connectivity(&self, events: Vec<ConnectivityEvent>) -> Result<(), StoreError>;

    /// Replaces a thing's rows of a source of their own ([`RECEIPTS`]:
    /// what its verified install receipts attest).
    async fn index_rows(
        &self,
        thing: &str,
        source: &str,
        entries: Vec<Entry>,
    ) -> Result<(), StoreError>;

    /// A thing's connectivity (`None`: never connected).
    async fn connectivity(&self, thing: &str) -> Result<Option<Connectivity>, StoreError>;

    /// Marks every thing recorded as connected as disconnected for
    /// `reason` at its last-seen time (a broker that stopped without
    /// saying so took its connections with it); returns how many.
    async fn end_connections(&self, reason: &str) -> Result<usize, StoreError>;

    /// Things matching `query`, by name after `after`, `limit` at most.
    async fn search(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;

    /// How many things match.
    async fn count(&self, query: &Query) -> Result<u64, StoreError>;

    /// Among the things matching, how many have each value of `field`
    /// (most first, `limit` values at most).
    async fn count_by(
        &self,
        query: &Query,
        field: &str,
        limit: usize,
    ) -> Result<Vec<(String, u64)>, StoreError>;

    /// min/max/avg of numeric `field` over the things matching.
    async fn numeric_stats(&self, query: &Query, field: &str) -> Result<NumericStats, StoreError>;

    /// Every row of a thing.
    async fn entries(&self, thing: &str) -> Result<Vec<Entry>, StoreError>;

    /// [`search`](Self::search) without the index: reads every row of
    /// every thing and evaluates the query on each (the baseline the
    /// benchmarks compare with).
    async fn scan(
        &self,
        query: &Query,
        after: &str,
        limit: usize,
    ) -> Result<Vec<String>, StoreError>;
}

/// SQL flavour of a compiled query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A parameter of a compiled query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Number(f64),
    Count(i64),
}

/// A compiled query: SQL and its parameters in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sql {
    pub text: String,
    pub params: Vec<Param>,
}

impl Sql {
    fn bind(&mut self, d: Dialect, p: Param) -> String {
        self.params.push(p);
        match d {
            Dialect::Sqlite => format!("?{}", self.params.len()),
            Dialect::Postgres => format!("${}", self.params.len()),
        }
    }
}

/// The text just past every text starting with `prefix` (in byte order).
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

fn term_sql(d: Dialect, field: &str, test: &Test, sql: &mut Sql) -> String {
    let mut w = format!(
        "SELECT thing FROM fleet_index WHERE field = {}",
        sql.bind(d, Param::Text(field.into()))
    );
    let mut bound = |w: &mut String, col: &str, op: &str, p: Param| {
        let _ = write!(w, " AND {col} {op} {}", sql.bind(d, p));
    };
    match test {
        Test::Exists => {}
        Test::Equals(v) => match crate::query::parse_number(v) {
            Some(n) => {
                let (a, b) = (
                    sql.bind(d, Param::Text(v.clone())),
                    sql.bind(d, Param::Number(n)),
                );
                // Two ranges of the index, each used on its own.
                let f = sql.bind(d, Param::Text(field.into()));
                w = format!(
                    "{w} AND fold = {a} UNION SELECT thing FROM fleet_index WHERE field = {f} AND num = {b}"
                );
            }
            None => bound(&mut w, "fold", "=", Param::Text(v.clone())),
        },
        Test::Prefix(p) => {
            bound(&mut w, "fold", ">=", Param::Text(p.clone()));
            bound(&mut w, "fold", "<", Param::Text(prefix_end(p)));
        }
        Test::Pattern(globs) => {
            if let Some(Glob::Literal(l)) = globs.first() {
                bound(&mut w, "fold", ">=", Param::Text(l.clone()));
                bound(&mut w, "fold", "<", Param::Text(prefix_end(l)));
            }
            match d {
                Dialect::Sqlite => {
                    let mut g = String::new();
                    for piece in globs {
                        match piece {
                            Glob::Any => g.push('*'),
                            Glob::One => g.push('?'),
                            Glob::Literal(l) => {
                                for c in l.chars() {
                                    match c {
                                        '*' | '?' | '[' | ']' => {
                                            g.push('[');
                                            g.push(c);
                                            g.push(']');
                                        }
                                        c => g.push(c),
                                    }
                                }
                            }
                        }
                    }
                    bound(&mut w, "fold", "GLOB", Param::Text(g));
                }
                Dialect::Postgres => {
                    let mut g = String::new();
                    for piece in globs {
                        match piece {
                            Glob::Any => g.push('%'),
                            Glob::One => g.push('_'),
                            Glob::Literal(l) => {
                                for c in l.chars() {
                                    if matches!(c, '%' | '_' | '\\') {
                                        g.push('\\');
                                    }
                                    g.push(c);
                                }
                            }
                        }
                    }
                    bound(&mut w, "fold", "LIKE", Param::Text(g));
                }
            }
        }
        Test::Number(lo, hi) => {
            if let Some(b) = lo {
                bound(
                    &mut w,
                    "num",
                    if b.inclusive { ">=" } else { ">" },
                    Param::Number(b.value),
                );
            }
            if let Some(b) = hi {
                bound(
                    &mut w,
                    "num",
                    if b.inclusive { "<=" } else { "<" },
                    Param::Number(b.value),
                );
            }
            if lo.is_none() && hi.is_none() {
                w.push_str(" AND num IS NOT NULL");
            }
        }
        Test::Text(lo, hi) => {
            if let Some(b) = lo {
                bound(
                    &mut w,
                    "fold",
                    if b.inclusive { ">=" } else { ">" },
                    Param::Text(b.value.clone()),
                );
            }
            if let Some(b) = hi {
                bound(
                    &mut w,
                    "fold",
                    if b.inclusive { "<=" } else { "<" },
                    Param::Text(b.value.clone()),
                );
            }
        }
    }
    w
}

const EVERY_THING: &str =
    "SELECT thing FROM fleet_index WHERE source = 'registry' AND field = 'thingName'";

/// A SELECT of the things `q` matches (registered or not: [`compile`]
/// keeps registered ones), as one set expression.
fn set_sql(d: Dialect, q: &Query, sql: &mut Sql, n: &mut usize) -> String {
    let wrap = |s: String, n: &mut usize| {
        *n += 1;
        format!("SELECT thing FROM ({s}) AS q{n}")
    };
    match q {
        Query::All => EVERY_THING.to_string(),
        Query::Term(t) => term_sql(d, &t.field, &t.test, sql),
        Query::Not(inner) => {
            let inner = set_sql(d, inner, sql, n);
            let every = wrap(EVERY_THING.to_string(), n);
            format!("{every} EXCEPT {}", wrap(inner, n))
        }
        Query::Or(parts) => {
            let parts: Vec<String> = parts
                .iter()
                .map(|p| {
                    let s = set_sql(d, p, sql, n);
                    wrap(s, n)
                })
                .collect();
            parts.join(" UNION ")
        }
        Query::And(parts) => {
            // Positive parts intersected, then the negated ones taken out.
            let (neg, pos): (Vec<&Query>, Vec<&Query>) =
                parts.iter().partition(|p| matches!(p, Query::Not(_)));
            let out = match pos.is_empty() {
                true => wrap(EVERY_THING.to_string(), n),
                false => {
                    let mut acc: Option<String> = None;
                    for p in pos {
                        let s = set_sql(d, p, sql, n);
                        let s = wrap(s, n);
                        acc = Some(match acc {
                            None => s,
                            Some(a) => format!("{} INTERSECT {s}", wrap(a, n)),
                        });
                    }
                    acc.unwrap_or_default()
                }
            };
            if neg.is_empty() {
                return out;
            }
            // PostgreSQL subtracts sets by hashing (measured faster there).
            if d == Dialect::Postgres {
                let mut out = out;
                for p in neg {
                    let Query::Not(inner) = p else { continue };
                    let s = set_sql(d, inner, sql, n);
                    out = format!("{} EXCEPT {}", wrap(out, n), wrap(s, n));
                }
                return out;
            }
            // SQLite: each negated part a probe of the (smaller) set kept
            // so far, rather than a set of its own to subtract (a negation
            // is often most of the fleet).
            *n += 1;
            let kept = format!("k{n}");
            let mut probes = Vec::new();
            for p in neg {
                let Query::Not(inner) = p else { continue };
                let s = set_sql(d, inner, sql, n);
                *n += 1;
                probes.push(format!(
                    "NOT EXISTS (SELECT 1 FROM ({s}) AS x{n} WHERE x{n}.thing = {kept}.thing)"
                ));
            }
            format!(
                "SELECT DISTINCT {kept}.thing FROM ({out}) AS {kept} WHERE {}",
                probes.join(" AND ")
            )
        }
    }
}

/// Whether [`set_sql`] gives `q`'s things once each (a set operation,
/// or a SELECT DISTINCT), so that counting needs no DISTINCT.
fn is_distinct(q: &Query) -> bool {
    match q {
        Query::All => false,
        Query::Term(t) => {
            matches!(&t.test, Test::Equals(v) if crate::query::parse_number(v).is_some())
        }
        Query::Not(_) | Query::Or(_) => true,
        Query::And(parts) => {
            let positive = parts.iter().filter(|p| !matches!(p, Query::Not(_))).count();
            positive != 1 || parts.len() > 1
        }
    }
}

/// What to do with the things a query matches.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Output<'a> {
    /// Their names after `.0`, `.1` at most.
    Page(&'a str, usize),
    /// How many.
    Count,
    /// How many per value of a field, `.1` values at most.
    CountBy(&'a str, usize),
    /// min, max, avg of a numeric field.
    Stats(&'a str),
}

/// Compiles `q` into one statement (only registered things match).
pub(crate) fn compile(d: Dialect, q: &Query, out: Output<'_>) -> Sql {
    let mut sql = Sql::default();
    let mut n = 0;
    let set = set_sql(d, q, &mut sql, &mut n);
    // Registered things only. Rows of things that were not registered
    // when written are noted in `fleet_index_orphans` (a few, if any):
    // those still unregistered are taken out, a lookup in a small list
    // per row rather than in the index.
    let matched = format!(
        "SELECT r.thing FROM ({set}) AS r WHERE r.thing NOT IN (SELECT o.thing FROM fleet_index_orphans o WHERE NOT EXISTS (SELECT 1 FROM fleet_index u WHERE u.thing = o.thing AND u.source = 'registry' AND u.field = 'thingName'))"
    );
    sql.text = match out {
        Output::Page(after, limit) => {
            let a = sql.bind(d, Param::Text(after.into()));
            let l = sql.bind(d, Param::Count(i64::try_from(limit).unwrap_or(i64::MAX)));
            format!(
                "SELECT DISTINCT thing FROM ({matched}) AS m WHERE thing > {a} ORDER BY thing LIMIT {l}"
            )
        }
        // A set operation's rows are distinct already.
        Output::Count if is_distinct(q) => format!("SELECT COUNT(*) FROM ({matched}) AS m"),
        Output::Count => format!("SELECT COUNT(DISTINCT thing) FROM ({matched}) AS m"),
        Output::CountBy(field, limit) => {
            let f = sql.bind(d, Param::Text(field.into()));
            let l = sql.bind(d, Param::Count(i64::try_from(limit).unwrap_or(i64::MAX)));
            // The field's rows, kept when their thing is in the matched set
            // (built once: a semi-join, not a lookup per thing).
            format!(
                "SELECT i.txt, COUNT(DISTINCT i.thing) FROM fleet_index i
                 WHERE i.field = {f} AND i.thing IN (SELECT thing FROM ({matched}) AS m)
                 GROUP BY i.txt ORDER BY 2 DESC, 1 LIMIT {l}"
            )
        }
        Output::Stats(field) => {
            let f = sql.bind(d, Param::Text(field.into()));
            format!(
                "SELECT COUNT(i.num), MIN(i.num), MAX(i.num), AVG(i.num) FROM fleet_index i
                 WHERE i.field = {f} AND i.num IS NOT NULL AND i.thing IN (SELECT thing FROM ({matched}) AS m)"
            )
        }
    };
    sql
}

/// Evaluates a query over rows grouped by thing (memory, and the scan
/// baseline): the names matching, after `after`, `limit` at most.
pub(crate) fn filter_rows<'a>(
    rows: impl Iterator<Item = (&'a str, &'a [Entry])>,
    query: &Query,
    after: &str,
    limit: usize,
) -> Vec<String> {
    rows.filter(|(name, entries)| *name > after && query.matches(entries))
        .map(|(name, _)| name.to_string())
        .take(limit)
        .collect()
}

/// A row as an entry: a number where there is one (text that is a
/// number matches the same either way).
pub(crate) fn value_of(txt: String, num: Option<f64>) -> FieldValue {
    match num {
        Some(n)
            if crate::query::parse_number(&txt) == Some(n)
                && txt == crate::query::number_text(n) =>
        {
            FieldValue::Number(n)
        }
        _ if txt == "true" => FieldValue::Bool(true),
        _ if txt == "false" => FieldValue::Bool(false),
        _ => FieldValue::Text(txt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shadow_gives_its_leaves_arrays_each_and_its_version() {
        let s = Shadow::new()
            .update(
                br#"{"state":{"reported":{"temp":81.5,"fw":{"main":"1.2"},"tags":["a","b"],"on":true,"gone":null},"desired":{"temp":70}}}"#,
                1,
                &Default::default(),
            )
            .unwrap()
            .shadow;
        let key = ShadowKey {
            thing: "t".into(),
            shadow: None,
        };
        let got: Vec<(String, String)> = shadow_entries(&key, &s, &IndexConfig::default())
            .into_iter()
            .map(|e| (e.field, e.value.text()))
            .collect();
        let want = [
            ("shadow.version", "1"),
            ("shadow.reported.fw.main", "1.2"),
            ("shadow.reported.on", "true"),
            ("shadow.reported.tags", "a"),
            ("shadow.reported.tags", "b"),
            ("shadow.reported.temp", "81.5"),
            ("shadow.desired.temp", "70"),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        );
        let only = IndexConfig {
            shadow_fields: Some(vec!["shadow.reported.fw.*".into()]),
            ..Default::default()
        };
        let named = ShadowKey {
            thing: "t".into(),
            shadow: Some("cfg".into()),
        };
        assert!(shadow_entries(&named, &s, &only).is_empty());
        assert_eq!(shadow_entries(&key, &s, &only).len(), 1, "fw.main only");
    }

    #[test]
    fn a_query_compiles_to_one_statement_of_set_operations() {
        let q = Query::parse("thingName:p* AND NOT connectivity.connected:true OR attributes.n:5")
            .unwrap();
        let sql = compile(Dialect::Postgres, &q, Output::Page("", 10));
        // PostgreSQL subtracts the negation; SQLite probes for it.
        assert!(
            sql.text.contains("EXCEPT") && sql.text.contains("UNION"),
            "{}",
            sql.text
        );
        let lite = compile(Dialect::Sqlite, &q, Output::Page("", 10));
        assert!(
            lite.text.contains("NOT EXISTS") && lite.text.contains("UNION"),
            "{}",
            lite.text
        );
        assert_eq!(sql.text.matches('$').count(), sql.params.len());
        // A NOT alone is the fleet less a set; counted without DISTINCT
        // where the set is distinct already.
        let not = compile(
            Dialect::Sqlite,
            &Query::parse("NOT attributes.site:north").unwrap(),
            Output::Count,
        );
        assert!(
            not.text.contains("EXCEPT") && not.text.starts_with("SELECT COUNT(*)"),
            "{}",
            not.text
        );
        let term = compile(
            Dialect::Sqlite,
            &Query::parse("shadow.reported.tags:a*").unwrap(),
            Output::Count,
        );
        assert!(
            term.text.starts_with("SELECT COUNT(DISTINCT thing)"),
            "{}",
            term.text
        );
    }
}
