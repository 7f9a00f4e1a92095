//! The embedded broker's retained messages (one row per topic) and
//! persistent sessions (one row per client id) in SQLite.

use async_trait::async_trait;

use super::SqliteStore;
use crate::store::{RetainedMessage, RetainedStore, SessionStore, StoreError, backend};

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

#[async_trait]
impl SessionStore for SqliteStore {
    async fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare_cached("SELECT client_id, record FROM broker_sessions ORDER BY client_id")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn put_session(&self, client_id: &str, record: &[u8]) -> Result<(), StoreError> {
        let (id, record) = (client_id.to_owned(), record.to_vec());
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO broker_sessions (client_id, record) VALUES (?1, ?2)
                 ON CONFLICT (client_id) DO UPDATE SET record = excluded.record",
            )
            .and_then(|mut s| s.execute((&id, &record)))
            .map_err(backend)?;
            Ok(0)
        })
        .await
        .map(drop)
    }

    async fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        let id = client_id.to_owned();
        self.write(move |c| {
            c.prepare_cached("DELETE FROM broker_sessions WHERE client_id = ?1")
                .and_then(|mut s| s.execute([&id]))
                .map_err(backend)?;
            Ok(0)
        })
        .await
        .map(drop)
    }
}
