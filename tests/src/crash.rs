//! Helpers for the real-process crash test (`tests/crash.rs`): cutting a
//! CLI process off with SIGKILL at a chosen moment, as a power cut or a
//! closed laptop lid would, and looking inside a node's SQLite file the way
//! an auditor would after the cut.
//!
//! Every wait here is bounded: a process that outlives
//! [`crate::COMMAND_TIMEOUT`] is killed and reported.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use rusqlite::{Connection, OpenFlags};

use crate::{Output, COMMAND_TIMEOUT};

/// Environment variable that sets the number of kill points (the soak
/// mode runs the same test with a bigger number).
pub const KILL_POINTS_VAR: &str = "FIELDCASE_CRASH_KILL_POINTS";

/// Name of the store file inside a node's home.
pub const DB_FILE: &str = "fieldcase.db";

/// The number of kill points: `FIELDCASE_CRASH_KILL_POINTS` or `default`.
pub fn kill_points(default: usize) -> Result<usize> {
    match std::env::var(KILL_POINTS_VAR) {
        Ok(s) => {
            let n: usize = s
                .trim()
                .parse()
                .with_context(|| format!("{KILL_POINTS_VAR}={s:?} is not a number"))?;
            ensure!(n > 0, "{KILL_POINTS_VAR} must be at least 1");
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// A CLI process running in the background, its output collected.
/// Killed (SIGKILL) on drop.
pub struct Proc {
    cmd: String,
    child: Option<Child>,
    started: Instant,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub output: Output,
    /// The SIGKILL landed while the process was still running (it did not
    /// exit on its own first).
    pub killed: bool,
    /// From start to exit or kill.
    pub elapsed: Duration,
}

impl Proc {
    /// Starts `cmd` (`std::process::Command::spawn` returns once the new
    /// program is executing, so delays are measured from its start).
    pub fn start(mut cmd: Command) -> Result<Proc> {
        let text = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {text}"))?;
        let started = Instant::now();
        let stdout = drain(child.stdout.take().expect("piped"));
        let stderr = drain(child.stderr.take().expect("piped"));
        Ok(Proc {
            cmd: text,
            child: Some(child),
            started,
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Polls until the file at `path` is not empty and differs from
    /// `before` (true), or the process exits first (false). Bounded by
    /// [`COMMAND_TIMEOUT`].
    ///
    /// Watching a store's write-ahead log this way catches a process right
    /// as it writes a transaction's pages, before or while it syncs them
    /// and acknowledges: the window a uniformly random cut rarely hits.
    /// (Opening a store creates an empty log; only written bytes count.)
    pub fn wait_for_change(&mut self, path: &Path, before: Stamp) -> Result<bool> {
        let deadline = self.started + COMMAND_TIMEOUT;
        loop {
            let now = stamp(path);
            if now.0 > 0 && now != before {
                return Ok(true);
            }
            if !self.is_running() {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                bail!("`{}` still running after {COMMAND_TIMEOUT:?}", self.cmd);
            }
            thread::sleep(Duration::from_micros(50));
        }
    }

    /// Sleeps until `at` after the start, then kills the process with
    /// SIGKILL if it is still running.
    pub fn kill_at(self, at: Duration) -> Result<Ended> {
        let left = at.saturating_sub(self.started.elapsed());
        thread::sleep(left);
        self.kill_now()
    }

    /// Kills the process with SIGKILL now (if it is still running).
    pub fn kill_now(mut self) -> Result<Ended> {
        let mut child = self.child.take().expect("running");
        let elapsed = self.started.elapsed();
        let _ = child.kill();
        let status = child.wait()?;
        Ok(self.ended(status, elapsed))
    }

    /// Waits for the process to exit, at most `timeout`; kills it with
    /// SIGKILL after that (the result says so).
    pub fn wait_or_kill(mut self, timeout: Duration) -> Result<Ended> {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                let elapsed = self.started.elapsed();
                return Ok(self.ended(status, elapsed));
            }
            if Instant::now() >= deadline {
                let elapsed = self.started.elapsed();
                let _ = child.kill();
                let status = child.wait()?;
                return Ok(self.ended(status, elapsed));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits (bounded by [`COMMAND_TIMEOUT`]) for the process to exit on
    /// its own; fails if it had to be killed.
    pub fn wait(self) -> Result<Ended> {
        let ended = self.wait_or_kill(COMMAND_TIMEOUT)?;
        if ended.killed {
            bail!(
                "`{}` did not finish within {COMMAND_TIMEOUT:?}; killed\n{}",
                ended.output.cmd,
                ended.output.describe()
            );
        }
        Ok(ended)
    }

    fn ended(&mut self, status: ExitStatus, elapsed: Duration) -> Ended {
        let join = |h: Option<thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        Ended {
            killed: status.signal() == Some(libc::SIGKILL),
            elapsed,
            output: Output {
                cmd: self.cmd.clone(),
                status,
                stdout: join(self.stdout.take()),
                stderr: join(self.stderr.take()),
            },
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `cmd` and kills it with SIGKILL `at` after its start, unless it
/// finished before.
pub fn run_and_cut(cmd: Command, at: Duration) -> Result<Ended> {
    Proc::start(cmd)?.kill_at(at)
}

/// Length and modification time of a file (zeros if it does not exist).
pub type Stamp = (u64, Option<SystemTime>);

/// The [`Stamp`] of a file now.
pub fn stamp(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    }
}

/// The write-ahead log of a node's store.
pub fn wal_path(home: &Path) -> PathBuf {
    home.join(format!("{DB_FILE}-wal"))
}

fn open(home: &Path) -> Result<Connection> {
    let path = home.join(DB_FILE);
    // Read-write without CREATE: a missing file is an error, and a WAL left
    // by a killed process can be recovered.
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

/// `PRAGMA integrity_check` on a node's store; fails unless it says `ok`.
pub fn integrity_check(home: &Path) -> Result<()> {
    let conn = open(home)?;
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    ensure!(
        lines == ["ok"],
        "integrity_check of {} failed: {lines:?}",
        home.join(DB_FILE).display()
    );
    Ok(())
}

/// The stored heads column of every case, by code: what two converged
/// stores must agree on, read without starting the CLI once per case.
pub fn stored_heads(home: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let conn = open(home)?;
    let mut stmt = conn.prepare("SELECT code, heads FROM cases ORDER BY code")?;
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?
        .collect::<rusqlite::Result<BTreeMap<_, _>>>()?;
    Ok(rows)
}

/// The number of incremental chunks stored for `code` (the store compacts
/// them into a new snapshot on the write that would exceed
/// `fieldcase_node::store::COMPACT_THRESHOLD`).
pub fn chunk_count(home: &Path, code: &str) -> Result<usize> {
    let conn = open(home)?;
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM case_changes WHERE code = ?1",
        [code],
        |r| r.get(0),
    )?;
    Ok(usize::try_from(n).unwrap_or(0))
}
