//! Jobs in SQLite: one row per job, one per thing's executions (with its
//! next deadline, indexed, for the timeout sweep).

use async_trait::async_trait;
use fleet_core::jobs::ThingJobs;

use super::{SqliteStore, cas_write, versioned_row};
use crate::model::JobRecord;
use crate::store::{JobStore, StoreError, Versioned, backend, corrupt};

#[async_trait]
impl JobStore for SqliteStore {
    async fn load_job(&self, job_id: &str) -> Result<Option<Versioned<JobRecord>>, StoreError> {
        let job_id = job_id.to_string();
        self.with_conn(move |c| {
            let row = versioned_row(
                c,
                "SELECT revision, record FROM jobs WHERE job_id = ?1",
                [&job_id],
            )?;
            row.map(|(revision, bytes)| {
                Ok(Versioned {
                    value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                    revision,
                })
            })
            .transpose()
        })
        .await
    }

    async fn save_job(&self, record: &JobRecord, expected: u64) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(record).map_err(backend)?;
        let id = record.spec.job_id.clone();
        self.write(move |c| {
            cas_write(
                c,
                expected,
                (
                    "INSERT INTO jobs (job_id, revision, record) VALUES (?1, 1, ?2)
                     ON CONFLICT (job_id) DO NOTHING",
                    (&id, &bytes),
                ),
                (
                    "UPDATE jobs SET revision = revision + 1, record = ?2
                     WHERE job_id = ?1 AND revision = ?3",
                    (&id, &bytes, expected),
                ),
            )
        })
        .await
    }

    async fn job_ids(&self) -> Result<Vec<String>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare("SELECT job_id FROM jobs ORDER BY job_id")
                .map_err(backend)?;
            let rows = stmt.query_map([], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }

    async fn delete_job(&self, job_id: &str, expected: u64) -> Result<(), StoreError> {
        let job_id = job_id.to_string();
        self.write(move |c| {
            let n = c
                .execute(
                    "DELETE FROM jobs WHERE job_id = ?1 AND revision = ?2",
                    (&job_id, expected),
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::Conflict);
            }
            Ok(0)
        })
        .await
        .map(|_| ())
    }

    async fn load_thing(&self, thing: &str) -> Result<Versioned<ThingJobs>, StoreError> {
        let thing = thing.to_string();
        self.with_conn(move |c| {
            let row = versioned_row(
                c,
                "SELECT revision, document FROM thing_jobs WHERE thing = ?1",
                [&thing],
            )?;
            Ok(match row {
                None => Versioned {
                    value: ThingJobs::new(&thing),
                    revision: 0,
                },
                Some((revision, bytes)) => Versioned {
                    value: serde_json::from_slice(&bytes).map_err(corrupt)?,
                    revision,
                },
            })
        })
        .await
    }

    async fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> Result<u64, StoreError> {
        let bytes = serde_json::to_vec(jobs).map_err(backend)?;
        let deadline = jobs
            .next_deadline()
            .map(|d| i64::try_from(d).unwrap_or(i64::MAX));
        let thing = thing.to_string();
        let entries = crate::store::index::job_entries(jobs);
        self.write(move |c| {
            let revision = cas_write(
                c,
                expected,
                (
                    "INSERT INTO thing_jobs (thing, revision, next_deadline, document) VALUES (?1, 1, ?2, ?3)
                     ON CONFLICT (thing) DO NOTHING",
                    (&thing, deadline, &bytes),
                ),
                (
                    "UPDATE thing_jobs SET revision = revision + 1, next_deadline = ?2, document = ?3
                     WHERE thing = ?1 AND revision = ?4",
                    (&thing, deadline, &bytes, expected),
                ),
            )?;
            super::index::replace_rows(c, &thing, crate::store::index::JOBS, &entries)?;
            Ok(revision)
        })
        .await
    }

    async fn due_things(&self, now: u64) -> Result<Vec<String>, StoreError> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        self.with_conn(move |c| {
            let mut stmt = c
                .prepare(
                    "SELECT thing FROM thing_jobs WHERE next_deadline IS NOT NULL AND next_deadline <= ?1 ORDER BY thing",
                )
                .map_err(backend)?;
            let rows = stmt.query_map([now], |r| r.get(0)).map_err(backend)?;
            rows.collect::<Result<_, _>>().map_err(backend)
        })
        .await
    }
}
