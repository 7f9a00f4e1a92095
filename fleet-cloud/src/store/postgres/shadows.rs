//! Shadows in PostgreSQL.

use async_trait::async_trait;
use fleet_core::shadow::Shadow;

use super::{PgStore, signed};
use crate::store::{ShadowKey, ShadowStore, StoreError, Versioned, corrupt, index};

#[async_trait]
impl ShadowStore for PgStore {
    async fn load(&self, key: &ShadowKey) -> Result<Versioned<Shadow>, StoreError> {
        let name = key.shadow.clone().unwrap_or_default();
        let row = self
            .row(
                "SELECT revision, document FROM shadows WHERE thing = $1 AND name = $2",
                &[&key.thing, &name],
            )
            .await?;
        Ok(match row {
            None => Versioned {
                value: Shadow::new(),
                revision: 0,
            },
            Some((revision, doc)) => Versioned {
                value: Shadow::from_stored_json(&doc).map_err(corrupt)?,
                revision,
            },
        })
    }

    async fn save(
        &self,
        key: &ShadowKey,
        expected: u64,
        shadow: &Shadow,
    ) -> Result<u64, StoreError> {
        let name = key.shadow.clone().unwrap_or_default();
        let doc = shadow.to_stored_json();
        let expected_db = signed(expected);
        let entries = index::shadow_entries(key, shadow, &self.index_config());
        let source = index::shadow_source(key);
        self.cas_indexed(
            expected,
            (
                "INSERT INTO shadows (thing, name, revision, document) VALUES ($1, $2, 1, $3)
                 ON CONFLICT (thing, name) DO NOTHING",
                &[&key.thing, &name, &doc],
            ),
            (
                "UPDATE shadows SET revision = revision + 1, document = $3
                 WHERE thing = $1 AND name = $2 AND revision = $4",
                &[&key.thing, &name, &doc, &expected_db],
            ),
            (&key.thing, &source, &entries),
        )
        .await
    }
}
