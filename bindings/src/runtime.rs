//! The tokio runtime the agents run on, owned by this library.
//!
//! Foreign executors (asyncio, Kotlin coroutines) poll our futures, but
//! the agent's pump, its timers and its sockets need tokio: each async call
//! is spawned onto this runtime and the foreign side awaits its handle.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};

use crate::FleetError;

/// `None` before the first use; `Some(None)` after [`shutdown_runtime`].
static RUNTIME: Mutex<Option<Option<Runtime>>> = Mutex::new(None);

fn runtime() -> Result<Handle, FleetError> {
    let mut slot = RUNTIME
        .lock()
        .map_err(|_| FleetError::other("the runtime lock is poisoned"))?;
    if slot.is_none() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fleet-runtime")
            .enable_all()
            .build()
            .map_err(|e| FleetError::other(format!("cannot start the tokio runtime: {e}")))?;
        *slot = Some(Some(rt));
    }
    match slot.as_ref().and_then(Option::as_ref) {
        Some(rt) => Ok(rt.handle().clone()),
        None => Err(FleetError::Stopped),
    }
}

/// Stops every agent and the library's runtime threads (waiting up to a
/// second for them), for a process about to exit: afterwards no thread of
/// this library calls into the foreign runtime (Python registers it with
/// `atexit`, since an interpreter that is finalizing must not be called
/// from other threads). Every later call fails with `Stopped`.
#[uniffi::export]
pub fn shutdown_runtime() {
    let rt = RUNTIME.lock().ok().and_then(|mut slot| {
        let rt = slot.take().flatten();
        *slot = Some(None);
        rt
    });
    if let Some(rt) = rt {
        rt.shutdown_timeout(Duration::from_secs(1));
    }
}

/// Runs `f` inside the runtime's context (for what spawns tasks, such as
/// starting an agent).
pub(crate) fn enter<T>(f: impl FnOnce() -> T) -> Result<T, FleetError> {
    let handle = runtime()?;
    let _guard = handle.enter();
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
