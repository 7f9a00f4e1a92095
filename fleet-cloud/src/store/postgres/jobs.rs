//! Jobs in PostgreSQL.

use async_trait::async_trait;
use fleet_core::jobs::ThingJobs;

use super::{PgStore, signed};
use crate::model::JobRecord;
use crate::store::{JobStore, StoreError, Versioned, backend, corrupt};

#[async_trait]
impl JobStore for PgStore {
    async fn load_job(&self, job_id: &str) -> Result<Option<Versioned<JobRecord>>, StoreError> {
        let row = self
            .row(
                "SELECT revision, record FROM jobs WHERE job_id = $1",
                &[&job_id],
            )
            .await?;
        row.map(|(revision, bytes)| {
            Ok(Versioned {
                value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                revision,
            })
        })
        .transpose()
    }

    async fn save_job(&self, record: &JobRecord, expected: u64) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(backend)?;
        let id = &record.spec.job_id;
        let expected_db = signed(expected);
        self.cas(
            expected,
            (
                "INSERT INTO jobs (job_id, revision, record) VALUES ($1, 1, $2)
                 ON CONFLICT (job_id) DO NOTHING",
                &[id, &bytes],
            ),
            (
                "UPDATE jobs SET revision = revision + 1, record = $2
                 WHERE job_id = $1 AND revision = $3",
                &[id, &bytes, &expected_db],
            ),
        )
        .await
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT job_id FROM jobs ORDER BY job_id", &[])
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn delete_job(&self, job_id: &str, expected: u64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM jobs WHERE job_id = $1 AND revision = $2",
                &[&job_id, &signed(expected)],
            )
            .await
            .map_err(backend)?;
        if n == 0 {
            return Err(StoreError::Conflict);
        }
        Ok(())
    }

    async fn load_thing(&self, thing: &str) -> Result<Versioned<ThingJobs>, StoreError> {
        let row = self
            .row(
                "SELECT revision, document FROM thing_jobs WHERE thing = $1",
                &[&thing],
            )
            .await?;
        Ok(match row {
            None => Versioned {
                value: ThingJobs::new(thing),
                revision: 0,
            },
            Some((revision, bytes)) => Versioned {
                value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                revision,
            },
        })
    }

    async fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(jobs).map_err(backend)?;
        let deadline = jobs.next_deadline().map(signed);
        let expected_db = signed(expected);
        let entries = crate::store::index::job_entries(jobs);
        self.cas_indexed(
            expected,
            (
                "INSERT INTO thing_jobs (thing, revision, next_deadline, document) VALUES ($1, 1, $2, $3)
                 ON CONFLICT (thing) DO NOTHING",
                &[&thing, &deadline, &bytes],
            ),
            (
                "UPDATE thing_jobs SET revision = revision + 1, next_deadline = $2, document = $3
                 WHERE thing = $1 AND revision = $4",
                &[&thing, &deadline, &bytes, &expected_db],
            ),
            (thing, crate::store::index::JOBS, &entries),
        )
        .await
    }

    async fn due_things(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT thing FROM thing_jobs WHERE next_deadline IS NOT NULL AND next_deadline <= $1 ORDER BY thing",
                &[&signed(now)],
            )
            .await
            .map_err(backend)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}
