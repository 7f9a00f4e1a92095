//! File streams in SQLite: one row per file.

use async_trait::async_trait;

use super::SqliteStore;
use crate::store::{StoreError, StoredStream, StreamStore, backend};

#[async_trait]
impl StreamStore for SqliteStore {
    async fn load_streams(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, StoredStream)>, StoreError> {
        let only = only.map(str::to_owned);
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT stream, version, description, data FROM stream_files
                     WHERE ?1 IS NULL OR stream = ?1 ORDER BY stream, file",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([&only], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, u32>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                })
                .map_err(backend)?;
            let mut out: Vec<(String, StoredStream)> = Vec::new();
            for row in rows {
                let (id, version, description, data) = row.map_err(backend)?;
                match out.last_mut() {
                    Some((last, s)) if *last == id => s.files.push(data),
                    _ => out.push((
                        id,
                        StoredStream {
                            version,
                            description,
                            files: vec![data],
                        },
                    )),
                }
            }
            Ok(out)
        })
        .await
    }

    async fn list_streams(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<crate::store::StreamSummary>, StoreError> {
        let (after, limit) = (after.to_owned(), i64::try_from(limit).unwrap_or(i64::MAX));
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT stream, version, description, length(data) FROM stream_files
                     WHERE file = 0 AND stream > ?1 ORDER BY stream LIMIT ?2",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params![after, limit], |r| {
                    Ok(crate::store::StreamSummary {
                        id: r.get(0)?,
                        version: r.get(1)?,
                        description: r.get(2)?,
                        size: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn stream_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        let id = id.to_owned();
        self.with_conn(move |c| {
            c.prepare_cached("SELECT version FROM stream_files WHERE stream = ?1 AND file = 0")
                .map_err(backend)?
                .query_row([&id], |r| r.get::<_, u32>(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(backend(e)),
                })
        })
        .await
    }

    async fn save_stream(
        &self,
        id: &str,
        description: &str,
        files: &[Vec<u8>],
    ) -> Result<u32, StoreError> {
        let (id, description, files) = (id.to_owned(), description.to_owned(), files.to_vec());
        let version = self
            .write(move |c| {
                let version: u64 = c
                    .prepare_cached(
                        "SELECT COALESCE(MAX(version), 0) + 1 FROM stream_files WHERE stream = ?1",
                    )
                    .and_then(|mut s| s.query_row([&id], |r| r.get(0)))
                    .map_err(backend)?;
                c.prepare_cached("DELETE FROM stream_files WHERE stream = ?1")
                    .and_then(|mut s| s.execute([&id]))
                    .map_err(backend)?;
                let mut insert = c
                    .prepare_cached(
                        "INSERT INTO stream_files (stream, version, description, file, data)
                         VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(backend)?;
                for (i, f) in files.iter().enumerate() {
                    let file = i64::try_from(i).map_err(backend)?;
                    insert
                        .execute((&id, version, &description, file, f))
                        .map_err(backend)?;
                }
                Ok(version)
            })
            .await?;
        u32::try_from(version).map_err(backend)
    }

    async fn delete_stream(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            c.prepare_cached("DELETE FROM stream_files WHERE stream = ?1")
                .and_then(|mut s| s.execute([&id]))
                .map_err(backend)?;
            Ok(0)
        })
        .await
        .map(|_| ())
    }
}
