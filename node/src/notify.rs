//! Local change notification between processes sharing one node home.
//!
//! `fieldcase case set` and `fieldcase serve` are separate processes writing
//! the same SQLite file. So that a running `serve` or `sync --watch` pushes
//! an edit to connected peers at once, without polling the database, every
//! process that holds live sessions binds a Unix datagram socket under
//! `HOME/notify/`, and every committed local write sends the case code to
//! each of them. Delivery is best effort: a missed notification only delays
//! the edit to the next sync, it never loses it, because the data is already
//! committed before anyone is told.

use std::path::{Path, PathBuf};

use tokio::sync::broadcast;

/// Name of the folder holding listener sockets.
const NOTIFY_DIR: &str = "notify";

/// Longest datagram accepted: a case code is far shorter.
const DATAGRAM_BYTES_MAX: usize = 256;

/// Capacity of the in-process fan-out; a lagging session resyncs fully on
/// its next connection, so dropping notifications under overload is safe.
pub const CHANNEL_CAPACITY: usize = 1024;

fn notify_dir(home: &Path) -> PathBuf {
    home.join(NOTIFY_DIR)
}

/// Tells every listening process in `home` that `code` changed. Errors are
/// ignored on purpose (see the module docs); stale sockets of processes
/// that died are removed.
pub fn announce(home: &Path, code: &str) {
    announce_many(home, std::slice::from_ref(&code));
}

/// Like [`announce`] for many codes at once (a bulk import's batch): the
/// listener folder is read once, not once per code. A listener whose socket
/// buffer fills drops the rest, which is harmless (see the module docs).
pub fn announce_many<S: AsRef<str>>(home: &Path, codes: &[S]) {
    if codes.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(notify_dir(home)) else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let _ = sock.set_nonblocking(true);
    for entry in entries.flatten() {
        let path = entry.path();
        for code in codes {
            match sock.send_to(code.as_ref().as_bytes(), &path) {
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        || e.kind() == std::io::ErrorKind::NotFound =>
                {
                    let _ = std::fs::remove_file(&path);
                    break;
                }
                // Full buffer or anything else: skip this listener.
                Err(_) => break,
            }
        }
    }
}

/// A bound listener that forwards announced case codes into a broadcast
/// channel. The socket file is removed when the listener is dropped.
pub struct ChangeListener {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl ChangeListener {
    /// Binds a socket for this process and forwards every announcement to
    /// `tx`. Must be called inside a tokio runtime.
    pub fn bind(home: &Path, tx: broadcast::Sender<String>) -> std::io::Result<ChangeListener> {
        let dir = notify_dir(home);
        std::fs::create_dir_all(&dir)?;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sock = tokio::net::UnixDatagram::bind(&path)?;
        let task = tokio::spawn(async move {
            let mut buf = [0u8; DATAGRAM_BYTES_MAX];
            while let Ok(n) = sock.recv(&mut buf).await {
                if let Ok(code) = std::str::from_utf8(&buf[..n]) {
                    let _ = tx.send(code.to_string());
                }
            }
        });
        Ok(ChangeListener { path, task })
    }
}

impl Drop for ChangeListener {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}
