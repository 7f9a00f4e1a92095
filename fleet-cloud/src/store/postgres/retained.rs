//! The embedded broker's retained messages in PostgreSQL: one row per topic.

use async_trait::async_trait;

use super::PgStore;
use crate::store::{RetainedMessage, RetainedStore, StoreError, backend, corrupt};

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
