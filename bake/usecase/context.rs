//! The composition root of one bake run: settings, one tokio runtime, the AWS configuration
//! (loaded once, on first use), the store and the cancellation flag, shared by every use case the
//! run calls.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::aws::Aws;
use crate::diagnostic::Diagnose;
use crate::settings::Settings;
use crate::store::{Store, StoreError};

/// What a run shares between its steps. Everything expensive is made on first use, so a command
/// that never talks to AWS never loads its configuration.
pub struct Context {
    pub settings: Settings,
    runtime: OnceLock<tokio::runtime::Runtime>,
    aws: tokio::sync::OnceCell<Aws>,
    store: OnceLock<Store>,
    cancel: OnceLock<Arc<AtomicBool>>,
}

/// The run's shared parts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("could not start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Diagnose for ContextError {}

impl Context {
    pub fn new(settings: Settings) -> Self {
        Context {
            settings,
            runtime: OnceLock::new(),
            aws: tokio::sync::OnceCell::new(),
            store: OnceLock::new(),
            cancel: OnceLock::new(),
        }
    }

    /// The run's one multi-threaded tokio runtime (AWS, registries, SSH).
    pub fn runtime(&self) -> Result<&tokio::runtime::Runtime, ContextError> {
        if let Some(runtime) = self.runtime.get() {
            return Ok(runtime);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(ContextError::Runtime)?;
        Ok(self.runtime.get_or_init(|| runtime))
    }

    /// Runs a future to completion on the run's runtime. Never call it from inside that
    /// runtime: use-case code that is already async awaits instead.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> Result<F::Output, ContextError> {
        Ok(self.runtime()?.block_on(future))
    }

    /// The AWS configuration, loaded once per run (region, credentials, endpoint, emulator).
    pub async fn aws(&self) -> &Aws {
        self.aws.get_or_init(|| Aws::load(&self.settings.aws)).await
    }

    /// The local store, opened (and created) once per run.
    pub fn store(&self) -> Result<&Store, ContextError> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        let store = Store::open(&self.settings.store)?;
        Ok(self.store.get_or_init(|| store))
    }

    /// A flag that SIGINT and SIGTERM set, so a long run stops at its next safe point and cleans
    /// up instead of dying with half-written blobs and cloud resources left behind. The signal
    /// handlers are installed on the first call: a command that never asks keeps the default
    /// Ctrl-C behaviour. (On Ctrl-C the terminal also signals the runner's helper, which kills
    /// the running step at once.)
    pub fn cancel(&self) -> &Arc<AtomicBool> {
        self.cancel.get_or_init(cancel_on_signals)
    }

    /// Whether the run was asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel
            .get()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }
}

/// Set by SIGINT and SIGTERM (one per process, whatever the number of contexts).
static SIGNALLED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(flag) = SIGNALLED.get() {
        flag.store(true, Ordering::SeqCst);
    }
}

/// The process's cancellation flag, with the SIGINT and SIGTERM handlers that set it installed.
pub fn cancel_on_signals() -> Arc<AtomicBool> {
    let flag = Arc::clone(SIGNALLED.get_or_init(|| Arc::new(AtomicBool::new(false))));
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for signal in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { nix::sys::signal::sigaction(signal, &action) };
    }
    flag
}
