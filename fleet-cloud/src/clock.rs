//! The one clock of the backend: every service, front-end and the API
//! read the time through a [`Clock`], so a test or a simulation can set
//! it.

use std::fmt;
use std::sync::Arc;

/// Seconds since the Unix epoch, from the system clock or from a function
/// a test controls. Cloning shares the source.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use fleet_cloud::Clock;
///
/// let t = Arc::new(AtomicU64::new(1_700_000_000));
/// let clock = Clock::from_fn({ let t = t.clone(); move || t.load(Ordering::SeqCst) });
/// assert_eq!(clock.now(), 1_700_000_000);
/// t.fetch_add(5, Ordering::SeqCst);
/// assert_eq!(clock.now(), 1_700_000_005);
/// assert!(Clock::system().now() > 1_700_000_000);
/// ```
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(Arc::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }))
    }

    /// A clock that reads `f`.
    pub fn from_fn(f: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Now, in seconds since the Unix epoch.
    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}
