//! Wall-clock time for the cache, injectable so tests can move it forward.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// The system clock plus an offset that only tests change.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicU64>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now, as the cache sees it.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// `real` (a reading of the system clock), as the cache sees it: one clock
    /// read serves both the `Date` header and the cache's age arithmetic.
    pub fn at(&self, real: SystemTime) -> SystemTime {
        real + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock (and its clones) forward by `by`. Test hook (feature
    /// `test-util`), with [`Edge::bind_with_clock`](crate::Edge::bind_with_clock).
    #[cfg(feature = "test-util")]
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}
