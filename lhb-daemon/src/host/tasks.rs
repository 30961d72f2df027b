//! One way for every task of the daemon to end: a cancellation token and a task
//! tracker (tokio-util). Servers, watchers and proxied connections are spawned through
//! [`Tasks`]; at exit, `stop` cancels them all (each is dropped at its next await
//! point) and waits for them, whatever way `lhb run` is leaving. Not through it: the
//! netlink connections and the kernel's log reader, which end with the sockets they
//! read (they never outlive what owns them), and the firewall task, which its own Stop
//! order ends once its rules are removed (`spawn_owned`).

use std::{future::Future, time::Duration};

use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Clone, Debug, Default)]
pub struct Tasks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `f` until it ends or the daemon stops. The handle can end it sooner
    /// (`abort`), as a proxy listener whose rule goes.
    pub fn spawn<F>(&self, f: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = f => {}
            }
        })
    }

    /// [`Tasks::spawn`] on another runtime (the proxy's own).
    pub fn spawn_on<F>(&self, handle: &tokio::runtime::Handle, f: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn_on(
            async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = f => {}
                }
            },
            handle,
        )
    }

    /// Runs `f` to its end, which its owner brings about (the firewall task's Stop
    /// order: it must remove its rules, not be dropped); waited for by `stop`.
    pub fn spawn_owned<F>(&self, f: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(f)
    }

    /// Cancels every task and waits for them, at most `grace`: a task stuck in a
    /// blocking call must not keep the daemon from exiting.
    pub async fn stop(&self, grace: Duration) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} task(s) still running {}s after the stop; exiting anyway",
                self.tracker.len(),
                grace.as_secs()
            );
        }
    }
}
