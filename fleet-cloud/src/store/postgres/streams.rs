//! File streams in PostgreSQL: one row per file.

use async_trait::async_trait;

use super::PgStore;
use crate::store::{StoreError, StoredStream, StreamStore, backend};

#[async_trait]
impl StreamStore for PgStore {
    async fn load_streams(
        &self,
        only: Option<&str>,
    ) -> Result<Vec<(String, StoredStream)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT stream, version, description, data FROM stream_files
                 WHERE $1::TEXT IS NULL OR stream = $1 ORDER BY stream, file",
                &[&only],
            )
            .await
            .map_err(backend)?;
        let mut out: Vec<(String, StoredStream)> = Vec::new();
        for r in rows {
            let id: String = r.get(0);
            let version = u32::try_from(r.get::<_, i32>(1)).unwrap_or(0);
            let data: Vec<u8> = r.get(3);
            match out.last_mut() {
                Some((last, s)) if *last == id => s.files.push(data),
                _ => out.push((
                    id,
                    StoredStream {
                        version,
                        description: r.get(2),
                        files: vec![data],
                    },
                )),
            }
        }
        Ok(out)
    }

    async fn list_streams(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<crate::store::StreamSummary>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT stream, version, description, octet_length(data)::BIGINT FROM stream_files
                 WHERE file = 0 AND stream > $1 ORDER BY stream LIMIT $2",
                &[&after, &limit],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| crate::store::StreamSummary {
                id: r.get(0),
                version: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
                description: r.get(2),
                size: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
            })
            .collect())
    }

    async fn stream_version(&self, id: &str) -> Result<Option<u32>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT version FROM stream_files WHERE stream = $1 AND file = 0",
                &[&id],
            )
            .await
            .map_err(backend)?;
        Ok(row.map(|r| u32::try_from(r.get::<_, i32>(0)).unwrap_or(0)))
    }

    async fn save_stream(
        &self,
        id: &str,
        description: &str,
        files: &[Vec<u8>],
    ) -> Result<u32, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&id])
            .await
            .map_err(backend)?;
        let row = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM stream_files WHERE stream = $1",
                &[&id],
            )
            .await
            .map_err(backend)?;
        let version = row.get::<_, i32>(0).saturating_add(1);
        tx.execute("DELETE FROM stream_files WHERE stream = $1", &[&id])
            .await
            .map_err(backend)?;
        for (i, f) in files.iter().enumerate() {
            let file = i32::try_from(i).map_err(backend)?;
            tx.execute(
                "INSERT INTO stream_files (stream, version, description, file, data)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&id, &version, &description, &file, f],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(u32::try_from(version).unwrap_or(0))
    }

    async fn delete_stream(&self, id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM stream_files WHERE stream = $1", &[&id])
            .await
            .map_err(backend)?;
        Ok(())
    }

    fn is_shared(&self) -> bool {
        true
    }
}
