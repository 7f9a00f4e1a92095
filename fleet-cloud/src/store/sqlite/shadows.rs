//! Shadows in SQLite: one row per shadow, its document as stored JSON.

use async_trait::async_trait;
use fleet_core::shadow::Shadow;

use super::{SqliteStore, cas_write, versioned_row};
use crate::store::{ShadowKey, ShadowStore, StoreError, Versioned, index};

#[async_trait]
impl ShadowStore for SqliteStore {
    async fn load(&self, key: &ShadowKey) -> Result<Versioned<Shadow>, StoreError> {
        let (thing, name) = (key.thing.clone(), key.name_column().to_string());
        self.with_conn(move |c| {
            let row = versioned_row(
                c,
                "SELECT revision, document FROM shadows WHERE thing = ?1 AND name = ?2",
                (&thing, &name),
            )?;
            match row {
                None => Ok(Versioned {
                    value: Shadow::new(),
                    revision: 0,
                }),
                Some((revision, doc)) => Ok(Versioned {
                    value: Shadow::from_stored_json(&doc)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    revision,
                }),
            }
        })
        .await
    }

    async fn save(
        &self,
        key: &ShadowKey,
        expected: u64,
        shadow: &Shadow,
    ) -> Result<u64, StoreError> {
        let (thing, name) = (key.thing.clone(), key.name_column().to_string());
        let doc = shadow.to_stored_json();
        let entries = index::shadow_entries(key, shadow, &self.index_config());
        let source = index::shadow_source(key);
        self.write(move |c| {
            let revision = cas_write(
                c,
                expected,
                (
                    "INSERT INTO shadows (thing, name, revision, document) VALUES (?1, ?2, 1, ?3)
                     ON CONFLICT (thing, name) DO NOTHING",
                    (&thing, &name, &doc),
                ),
                (
                    "UPDATE shadows SET revision = revision + 1, document = ?3
                     WHERE thing = ?1 AND name = ?2 AND revision = ?4",
                    (&thing, &name, &doc, expected),
                ),
            )?;
            super::index::replace_rows(c, &thing, &source, &entries)?;
            Ok(revision)
        })
        .await
    }
}
