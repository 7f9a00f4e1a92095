//! The tokio runtime the agents run on, owned by this library.
//!
//! Foreign executors (asyncio, Kotlin coroutines) poll our futures, but
//! the agent's pump, its timers and its sockets need tokio: each async call
//! is spawned onto this runtime and the foreign side awaits its handle.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::Runtime;

use crate::FleetError;

fn runtime() -> Result<&'static Runtime, FleetError> {
    static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("fleet-runtime")
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| FleetError::other(format!("cannot start the tokio runtime: {e}")))
}

/// Runs `f` inside the runtime's context (for what spawns tasks, such as
/// starting an agent).
pub(crate) fn enter<T>(f: impl FnOnce() -> T) -> Result<T, FleetError> {
    let _guard = runtime()?.enter();
    Ok(f())
}

/// Spawns `fut` on the runtime and waits for it; if the caller stops
/// waiting (a cancelled coroutine), the task is aborted.
pub(crate) async fn run<T: Send + 'static>(
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, FleetError> {
    let handle = AbortOnDrop(runtime()?.spawn(fut));
    handle.join().await
}

/// Spawns `fut` and hands back a handle that aborts it.
pub(crate) fn spawn(
    fut: impl Future<Output = ()> + Send + 'static,
) -> Result<tokio::task::AbortHandle, FleetError> {
    Ok(runtime()?.spawn(fut).abort_handle())
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> Result<T, FleetError> {
        (&mut self.0)
            .await
            .map_err(|e| FleetError::other(format!("the task failed: {e}")))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
