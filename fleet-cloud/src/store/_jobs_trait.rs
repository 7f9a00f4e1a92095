/// Where jobs and executions are kept. Writes are compare-and-set on a
/// revision, atomic and durable once they return `Ok`.
pub trait JobStore: Send + Sync + 'static {
    /// A job and its revision (`None`: no such job).
    fn load_job(
        &self,
        job_id: &str,
    ) -> impl Future<Output = Result<Option<Versioned<JobRecord>>, StoreError>> + Send;
    /// Writes a job if it is still at `expected` (0: new).
    fn save_job(
        &self,
        record: &JobRecord,
        expected: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Every job id, sorted.
    fn job_ids(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Removes a job if it is still at `expected`.
    fn delete_job(
        &self,
        job_id: &str,
        expected: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A thing's executions (a thing without any: empty, revision 0).
    fn load_thing(
        &self,
        thing: &str,
    ) -> impl Future<Output = Result<Versioned<ThingJobs>, StoreError>> + Send;
    /// Writes a thing's executions if still at `expected`.
    fn save_thing(
        &self,
        thing: &str,
        expected: u64,
        jobs: &ThingJobs,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Things with a timer due at or before `now`.
    fn due_things(&self, now: u64) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}
