//! The embedded broker's retained messages in SQLite: one row per topic.

use async_trait::async_trait;

use super::SqliteStore;
use crate::store::{RetainedMessage, RetainedStore, StoreError, backend};

#[async_trait]
impl RetainedStore for SqliteStore {
    async fn load_retained(&self) -> Result<Vec<RetainedMessage>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT topic, payload, qos, properties, owner FROM retained ORDER BY topic",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(RetainedMessage {
                        topic: r.get(0)?,
                        payload: r.get(1)?,
                        qos: r.get(2)?,
                        properties: r.get(3)?,
                        owner: r.get(4)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn put_retained(&self, message: &RetainedMessage) -> Result<(), StoreError> {
        let m = message.clone();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO retained (topic, payload, qos, properties, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload,
                   qos = excluded.qos, properties = excluded.properties,
                   owner = excluded.owner",
            )
            .and_then(|mut s| s.execute((&m.topic, &m.payload, m.qos, &m.properties, &m.owner)))
            .map_err(backend)?;
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn delete_retained(&self, topic: &str) -> Result<(), StoreError> {
        let topic = topic.to_owned();
        self.write(move |c| {
            c.prepare_cached("DELETE FROM retained WHERE topic = ?1")
                .and_then(|mut s| s.execute([&topic]))
                .map_err(backend)?;
            Ok(0)
        })
        .await
        .map(drop)
    }
}
