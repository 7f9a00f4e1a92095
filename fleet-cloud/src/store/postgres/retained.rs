//! The embedded broker's retained messages (one row per topic) and
//! persistent sessions (one row per client id) in PostgreSQL.

use async_trait::async_trait;

use super::PgStore;
use crate::store::{RetainedMessage, RetainedStore, SessionStore, StoreError, backend, corrupt};

#[async_trait]
impl RetainedStore for PgStore {
    async fn load_retained(&self) -> Result<Vec<RetainedMessage>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT topic, payload, qos, properties, owner FROM retained ORDER BY topic",
                &[],
            )
            .await
            .map_err(backend)?;
        rows.iter()
            .map(|r| {
                Ok(RetainedMessage {
                    topic: r.get(0),
                    payload: r.get(1),
                    qos: u8::try_from(r.get::<_, i16>(2)).map_err(corrupt)?,
                    properties: r.get(3),
                    owner: r.get(4),
                })
            })
            .collect()
    }

    async fn put_retained(&self, message: &RetainedMessage) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO retained (topic, payload, qos, properties, owner)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (topic) DO UPDATE SET payload = excluded.payload,
                   qos = excluded.qos, properties = excluded.properties,
                   owner = excluded.owner",
                &[
                    &message.topic,
                    &message.payload,
                    &i16::from(message.qos),
                    &message.properties,
                    &message.owner,
                ],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn delete_retained(&self, topic: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM retained WHERE topic = $1", &[&topic])
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl SessionStore for PgStore {
    async fn load_sessions(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT client_id, record FROM broker_sessions ORDER BY client_id",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    async fn put_session(&self, client_id: &str, record: &[u8]) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO broker_sessions (client_id, record) VALUES ($1, $2)
                 ON CONFLICT (client_id) DO UPDATE SET record = excluded.record",
                &[&client_id, &record],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn delete_session(&self, client_id: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM broker_sessions WHERE client_id = $1",
                &[&client_id],
            )
            .await
            .map_err(backend)?;
        Ok(())
    }
}
