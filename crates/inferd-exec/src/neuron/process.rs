//! The step worker as a child process reached over a Unix socket: started,
//! greeted, called one step at a time under a deadline, and stopped.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use inferd_contract::ExecError;
use inferd_contract::wire::{
    FailureKind, FromWorker, Manifest, PROTOCOL_VERSION, ToWorker, WireError, check_manifest, read_frame,
    write_frame,
};

use super::NeuronConfig;

/// A running worker and the connection to it.
#[derive(Debug)]
pub(super) struct WorkerProcess {
    child: Child,
    stream: UnixStream,
    /// A private folder holding the socket, removed with the worker.
    dir: PathBuf,
}

/// How a call to the worker went wrong.
#[derive(Debug)]
pub(super) enum CallError {
    /// No answer within the deadline.
    TimedOut,
    /// The connection failed or ended, or a frame was not a message.
    Wire(WireError),
}

impl WorkerProcess {
    /// Starts the worker, waits for it to connect and load its model
    /// (within `cfg.load_timeout`), and checks its manifest.
    pub(super) fn start(cfg: &NeuronConfig) -> Result<(Self, Manifest), ExecError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "inferd-neuron-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        create_private_dir(&dir).map_err(|e| {
            ExecError::Load(format!("creating the worker's socket folder {}: {e}", dir.display()))
        })?;
        let socket = dir.join("worker.sock");
        let listener = UnixListener::bind(&socket)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| ExecError::Load(format!("binding {}: {e}", socket.display())))?;
        let (program, args) =
            cfg.worker.split_first().ok_or_else(|| ExecError::Config("--neuron-worker is empty".into()))?;
        let child = Command::new(program)
            .args(args)
            .arg("--socket")
            .arg(&socket)
            .arg("--model-dir")
            .arg(&cfg.model_dir)
            .arg("--model")
            .arg(&cfg.model_path)
            .spawn()
            .map_err(|e| ExecError::Load(format!("starting the Neuron worker {program:?}: {e}")))?;
        tracing::info!(pid = child.id(), worker = %cfg.worker.join(" "), "Neuron step worker started");
        let mut partial = Partial { child: Some(child), dir: dir.clone() };
        let stream = accept(&listener, partial.child_mut(), cfg.load_timeout)?;
        let child = partial.child.take().expect("still held");
        let mut worker = WorkerProcess { child, stream, dir };
        let manifest = worker.handshake(cfg.load_timeout)?;
        Ok((worker, manifest))
    }

    fn handshake(&mut self, timeout: Duration) -> Result<Manifest, ExecError> {
        let reply = self
            .call(&ToWorker::Hello { protocol: PROTOCOL_VERSION }, timeout)
            .map_err(|e| ExecError::Load(format!("the worker did not answer hello: {}", self.describe(e))))?;
        match reply {
            FromWorker::Manifest(m) => {
                check_manifest(&m).map_err(|e| ExecError::Config(e.to_string()))?;
                Ok(m)
            }
            FromWorker::Failed { kind: FailureKind::Hardware, message, .. } => {
                Err(ExecError::Hardware(message))
            }
            FromWorker::Failed { message, .. } => {
                Err(ExecError::Load(format!("the worker could not load its model: {message}")))
            }
            FromWorker::Done { .. } => Err(ExecError::Load("the worker answered hello with a step".into())),
        }
    }

    /// Sends one message and waits up to `timeout` for the answer.
    pub(super) fn call(&mut self, msg: &ToWorker, timeout: Duration) -> Result<FromWorker, CallError> {
        write_frame(&mut self.stream, msg).map_err(CallError::Wire)?;
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(|e| CallError::Wire(e.into()))?;
        match read_frame(&mut self.stream) {
            Ok(reply) => Ok(reply),
            Err(WireError::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                Err(CallError::TimedOut)
            }
            Err(e) => Err(CallError::Wire(e)),
        }
    }

    /// A call's failure in words, with the worker's exit status if it is gone.
    pub(super) fn describe(&mut self, e: CallError) -> String {
        match e {
            CallError::TimedOut => "no answer in time".into(),
            CallError::Wire(e) => match wait_briefly(&mut self.child) {
                Some(status) => format!("the worker exited ({status}): {e}"),
                None => e.to_string(),
            },
        }
    }

    /// The worker's exit status, if it has exited.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks the worker to exit, then makes sure it has.
    pub(super) fn stop(mut self) {
        let _ = write_frame(&mut self.stream, &ToWorker::Shutdown);
        if wait_briefly(&mut self.child).is_none() {
            let _ = self.child.kill();
        }
        // Drop reaps it and removes the socket folder.
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A worker that has not connected yet: killed and cleaned up if starting fails.
struct Partial {
    child: Option<Child>,
    dir: PathBuf,
}

impl Partial {
    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("held until started")
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn create_private_dir(dir: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

/// Waits for the worker to connect, noticing if it exits first.
fn accept(listener: &UnixListener, child: &mut Child, timeout: Duration) -> Result<UnixStream, ExecError> {
    let until = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| ExecError::Load(e.to_string()))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(ExecError::Load(format!("accepting the worker's connection: {e}"))),
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ExecError::Load(format!("the Neuron worker exited ({status}) before it connected")));
        }
        if Instant::now() >= until {
            return Err(ExecError::Load(format!(
                "the Neuron worker did not connect within {timeout:?} (--neuron-load-timeout)"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The child's exit status if it exits within a moment.
fn wait_briefly(child: &mut Child) -> Option<ExitStatus> {
    let until = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
