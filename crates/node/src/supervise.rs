//! One supervisor for every role's tasks: a task that fails stops the role.
//!
//! A role spawns its listeners and background loops on a [`Supervisor`] and awaits
//! [`Supervisor::run`]. When a task returns an error, panics, or (for a task meant to
//! run until shutdown) ends on its own, the supervisor logs it, flips `/readyz` to
//! not-ready, cancels the role's shutdown token so every other task stops gracefully
//! within its own grace period, waits for them, and returns a [`TaskFailed`] naming
//! the task and its cause. A process never stays "ready" with a dead listener.
//!
//! Shutdown runs in two steps. Tasks spawned with [`spawn`](Supervisor::spawn) stop
//! when the role's token is cancelled; tasks spawned with
//! [`spawn_last`](Supervisor::spawn_last) (the admin listener) run until those have
//! ended, on [`last_token`](Supervisor::last_token): while the listeners drain,
//! `/readyz` keeps answering 503 instead of refusing connections, and `/healthz` 200.
//!
//! Readiness conditions owned here: `shutdown` (false once the role is stopping) and
//! `tasks` (false once a task failed).
//!
//! With the `test-util` feature, [`Faults`] makes a named task panic on demand
//! (tests of the roles' failure paths); without it, `Faults` does nothing.

use std::{any::Any, collections::HashMap, fmt, future::Future};

use tokio::task::{Id, JoinError, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::{admin::Readiness, listener::BoxError};

/// A task of a role failed, and the role stopped because of it.
#[derive(Debug, thiserror::Error)]
#[error("{role} task {task} {cause}")]
pub struct TaskFailed {
    /// The role (the supervisor's name).
    pub role: &'static str,
    /// The task that failed.
    pub task: &'static str,
    /// What happened to it.
    #[source]
    pub cause: Cause,
}

/// How a supervised task failed.
#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// It returned an error.
    #[error("failed: {0}")]
    Failed(#[source] BoxError),
    /// It panicked (with this message, when the payload was a string).
    #[error("panicked: {0}")]
    Panicked(String),
    /// It ended while the role was not shutting down (a listener that stops
    /// accepting on its own).
    #[error("ended before shutdown")]
    Ended,
    /// It was aborted from outside the supervisor (the runtime shutting down).
    #[error("was cancelled")]
    Cancelled,
}

/// What a supervised future may return: `()` or `Result<(), E>`.
pub trait TaskOutput: Send + 'static {
    /// `Err` when the task failed.
    fn into_result(self) -> Result<(), BoxError>;
}

impl TaskOutput for () {
    fn into_result(self) -> Result<(), BoxError> {
        Ok(())
    }
}

impl<E: Into<BoxError> + Send + 'static> TaskOutput for Result<(), E> {
    fn into_result(self) -> Result<(), BoxError> {
        self.map_err(Into::into)
    }
}

/// When a task is expected to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    /// Runs until the role's token is cancelled.
    UntilShutdown,
    /// Runs until [`Supervisor::last_token`] is cancelled, after the others ended.
    UntilLast,
    /// May end whenever its work is done.
    Job,
}

/// Runs a role's tasks; see the [module docs](self).
pub struct Supervisor {
    name: &'static str,
    shutdown: CancellationToken,
    last: CancellationToken,
    readiness: Option<Readiness>,
    tasks: JoinSet<Result<(), BoxError>>,
    names: HashMap<Id, (&'static str, Lifetime)>,
    faults: Faults,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut tasks: Vec<_> = self.names.values().map(|(name, _)| *name).collect();
        tasks.sort_unstable();
        f.debug_struct("Supervisor").field("name", &self.name).field("tasks", &tasks).finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor for the role `name`. A failing task cancels `shutdown` (the token
    /// the role's tasks stop on) and marks `readiness` not ready.
    pub fn new(name: &'static str, shutdown: CancellationToken, readiness: Option<Readiness>) -> Self {
        if let Some(readiness) = &readiness {
            readiness.set("shutdown", !shutdown.is_cancelled());
            readiness.set("tasks", true);
        }
        Self {
            name,
            shutdown,
            last: CancellationToken::new(),
            readiness,
            tasks: JoinSet::new(),
            names: HashMap::new(),
            faults: Faults::default(),
        }
    }

    /// Lets `faults` make this supervisor's tasks panic (tests; see [`Faults`]).
    #[must_use]
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The role's token: cancelled on shutdown or when a task fails.
    pub fn token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The token of the tasks spawned with [`spawn_last`](Self::spawn_last): cancelled
    /// once every other task has ended.
    pub fn last_token(&self) -> CancellationToken {
        self.last.clone()
    }

    /// Runs `task` until the role's token is cancelled: returning an error, panicking
    /// or ending before that fails the role.
    pub fn spawn<F>(&mut self, task: &'static str, future: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.start(task, Lifetime::UntilShutdown, future);
    }

    /// Runs `task` until [`last_token`](Self::last_token) is cancelled, after every
    /// other task has ended (the admin listener, so `/readyz` answers while the
    /// others drain). The future must stop on that token.
    pub fn spawn_last<F>(&mut self, task: &'static str, future: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.start(task, Lifetime::UntilLast, future);
    }

    /// Runs `task`, which may end whenever its work is done; an error or a panic
    /// still fails the role.
    pub fn spawn_job<F>(&mut self, task: &'static str, future: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        self.start(task, Lifetime::Job, future);
    }

    fn start<F>(&mut self, task: &'static str, lifetime: Lifetime, future: F)
    where
        F: Future + Send + 'static,
        F::Output: TaskOutput,
    {
        let future = self.faults.wrap(task, future);
        let id = self.tasks.spawn(async move { future.await.into_result() }).id();
        self.names.insert(id, (task, lifetime));
    }

    /// Waits until every task has ended: after the role's token is cancelled, or
    /// after a task failed (then every other task is stopped, and the first failure
    /// is returned).
    pub async fn run(mut self) -> Result<(), TaskFailed> {
        let mut failure: Option<TaskFailed> = None;
        let mut stopping = false;
        loop {
            if stopping && !self.last.is_cancelled() && !self.names.values().any(|(_, l)| *l != Lifetime::UntilLast) {
                debug!(role = self.name, "tasks stopped; stopping the last ones");
                self.last.cancel();
            }
            let joined = tokio::select! {
                () = self.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    if let Some(readiness) = &self.readiness {
                        readiness.set("shutdown", false);
                    }
                    continue;
                }
                joined = self.tasks.join_next_with_id() => joined,
            };
            let Some(joined) = joined else { break };
            let (id, outcome) = match joined {
                Ok((id, result)) => (id, result.map_err(Cause::Failed)),
                Err(error) => (error.id(), Err(cause_of(error))),
            };
            let Some((task, lifetime)) = self.names.remove(&id) else { continue };
            let outcome = match (outcome, lifetime) {
                (Ok(()), Lifetime::UntilShutdown) if !self.shutdown.is_cancelled() => Err(Cause::Ended),
                (Ok(()), Lifetime::UntilLast) if !self.last.is_cancelled() => Err(Cause::Ended),
                (outcome, _) => outcome,
            };
            let Err(cause) = outcome else {
                debug!(role = self.name, task, "task ended");
                continue;
            };
            error!(role = self.name, task, error = %cause, "task failed; stopping the role");
            if let Some(readiness) = &self.readiness {
                readiness.set("tasks", false);
            }
            self.shutdown.cancel();
            if failure.is_none() {
                failure = Some(TaskFailed { role: self.name, task, cause });
            }
        }
        match failure {
            Some(failure) => Err(failure),
            None => {
                info!(role = self.name, "every task stopped");
                Ok(())
            }
        }
    }
}

fn cause_of(error: JoinError) -> Cause {
    match error.try_into_panic() {
        Ok(payload) => Cause::Panicked(panic_message(payload.as_ref())),
        Err(_) => Cause::Cancelled,
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_string()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

/// Test hook: makes named tasks panic, to test how a role handles a dead task.
///
/// Hand it to a role (each role's `faults()`), start the role, then call
/// `panic("http")`: the task named `http` panics wherever it is.
#[cfg(feature = "test-util")]
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Faults(std::sync::Arc<tokio::sync::watch::Sender<std::collections::BTreeSet<String>>>);

#[cfg(feature = "test-util")]
impl Default for Faults {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::Sender::new(std::collections::BTreeSet::new())))
    }
}

#[cfg(feature = "test-util")]
impl Faults {
    /// Makes the task named `task` panic (now, or as soon as it is spawned).
    pub fn panic(&self, task: &str) {
        self.0.send_modify(|tasks| {
            tasks.insert(task.to_string());
        });
    }

    fn wrap<F>(&self, task: &'static str, future: F) -> impl Future<Output = F::Output> + Send + 'static
    where
        F: Future + Send + 'static,
        F::Output: Send,
    {
        let mut faults = self.0.subscribe();
        async move {
            tokio::select! {
                output = future => output,
                _ = faults.wait_for(|tasks| tasks.contains(task)) => panic!("injected fault in task {task}"),
            }
        }
    }
}

/// Test hook: does nothing without the `test-util` feature.
#[cfg(not(feature = "test-util"))]
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct Faults(());

#[cfg(not(feature = "test-util"))]
impl Faults {
    fn wrap<F: Future>(&self, _task: &'static str, future: F) -> F {
        future
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A task that runs until `token`, then takes `linger` to stop.
    async fn service(token: CancellationToken, linger: Duration, stopped: tokio::sync::mpsc::Sender<&'static str>) {
        token.cancelled().await;
        tokio::time::sleep(linger).await;
        let _ = stopped.send("service").await;
    }

    fn supervisor() -> (Supervisor, CancellationToken, Readiness) {
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new();
        (Supervisor::new("test", shutdown.clone(), Some(readiness.clone())), shutdown, readiness)
    }

    #[tokio::test]
    async fn graceful_shutdown_waits_for_every_task_and_stops_the_last_ones_last() {
        let (mut supervisor, shutdown, readiness) = supervisor();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        supervisor.spawn("a", service(supervisor.token(), Duration::from_millis(50), tx.clone()));
        supervisor.spawn_job("job", async { Ok::<(), std::io::Error>(()) });
        let last = supervisor.last_token();
        let admin_tx = tx.clone();
        supervisor.spawn_last("admin", async move {
            last.cancelled().await;
            let _ = admin_tx.send("admin").await;
        });
        drop(tx);
        let run = tokio::spawn(supervisor.run());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(readiness.is_ready(), "{:?}", readiness.failing());
        shutdown.cancel();
        run.await.unwrap().unwrap();
        assert_eq!(readiness.failing(), vec!["shutdown"]);
        assert_eq!(rx.recv().await, Some("service"));
        assert_eq!(rx.recv().await, Some("admin"), "the last task stops after the others");
        assert_eq!(rx.recv().await, None);
    }

    async fn fails_the_role(spawn: impl FnOnce(&mut Supervisor)) -> (TaskFailed, Readiness) {
        let (mut supervisor, shutdown, readiness) = supervisor();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        supervisor.spawn("other", service(supervisor.token(), Duration::from_millis(20), tx));
        let last = supervisor.last_token();
        supervisor.spawn_last("admin", async move { last.cancelled().await });
        spawn(&mut supervisor);
        let failed = tokio::time::timeout(Duration::from_secs(5), supervisor.run())
            .await
            .expect("the role stops by itself")
            .unwrap_err();
        assert!(shutdown.is_cancelled(), "the other tasks were told to stop");
        assert_eq!(rx.recv().await, Some("service"), "and stopped gracefully");
        assert_eq!(readiness.failing(), vec!["shutdown", "tasks"]);
        (failed, readiness)
    }

    #[tokio::test]
    async fn a_panic_stops_the_role() {
        let (failed, _) = fails_the_role(|s| {
            s.spawn("http", async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if true {
                    panic!("boom");
                }
            });
        })
        .await;
        assert_eq!((failed.role, failed.task), ("test", "http"));
        assert!(matches!(&failed.cause, Cause::Panicked(message) if message == "boom"), "{failed:?}");
        assert_eq!(failed.to_string(), "test task http panicked: boom");
    }

    #[tokio::test]
    async fn an_error_stops_the_role_and_keeps_its_cause() {
        let (failed, _) = fails_the_role(|s| {
            s.spawn_job("loader", async { Err::<(), _>(std::io::Error::other("disk gone")) });
        })
        .await;
        assert_eq!(failed.task, "loader");
        let source = std::error::Error::source(&failed).and_then(std::error::Error::source).expect("typed cause");
        assert_eq!(source.downcast_ref::<std::io::Error>().map(std::io::Error::kind), Some(std::io::ErrorKind::Other));
        assert_eq!(failed.to_string(), "test task loader failed: disk gone");
    }

    #[tokio::test]
    async fn a_task_that_ends_early_stops_the_role() {
        let (failed, _) = fails_the_role(|s| s.spawn("h3", async {})).await;
        assert_eq!(failed.task, "h3");
        assert!(matches!(failed.cause, Cause::Ended), "{failed:?}");
    }

    #[tokio::test]
    async fn a_last_task_that_ends_early_stops_the_role() {
        let (failed, _) = fails_the_role(|s| s.spawn_last("metrics", async {})).await;
        assert_eq!(failed.task, "metrics");
        assert!(matches!(failed.cause, Cause::Ended), "{failed:?}");
    }

    #[tokio::test]
    async fn an_error_during_shutdown_is_reported() {
        let (mut supervisor, shutdown, _) = supervisor();
        let token = supervisor.token();
        supervisor.spawn("dns", async move {
            token.cancelled().await;
            Err::<(), _>(std::io::Error::other("flush failed"))
        });
        shutdown.cancel();
        let failed = supervisor.run().await.unwrap_err();
        assert_eq!(failed.to_string(), "test task dns failed: flush failed");
    }

    #[tokio::test]
    async fn without_tasks_run_returns_at_once() {
        let (supervisor, _shutdown, readiness) = supervisor();
        supervisor.run().await.unwrap();
        assert!(readiness.is_ready());
    }

    #[cfg(feature = "test-util")]
    #[tokio::test]
    async fn faults_make_a_named_task_panic() {
        let faults = Faults::default();
        let (supervisor, _shutdown, _) = supervisor();
        let mut supervisor = supervisor.with_faults(faults.clone());
        let token = supervisor.token();
        supervisor.spawn("http", async move { token.cancelled().await });
        faults.panic("http");
        let failed = supervisor.run().await.unwrap_err();
        assert!(matches!(&failed.cause, Cause::Panicked(m) if m == "injected fault in task http"), "{failed:?}");
    }
}
