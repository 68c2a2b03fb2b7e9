//! Harness for the multi-node scenario tests.
//!
//! Every node is a temporary home folder driven through the real `fieldcase`
//! command line, run as a real process (the `fieldcase-under-test` binary of
//! this crate, which is `fieldcase_cli::main`). Servers are real `fieldcase
//! serve` processes on loopback QUIC. Every wait is bounded: a command that
//! runs longer than [`COMMAND_TIMEOUT`] is killed and the test fails.

pub mod crash;
pub mod relay;
pub mod sim;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Longest any single CLI command may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest a server may take to print `listening on ADDR`.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Longest a server may take to exit after SIGTERM.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Interval of the bounded polling loops.
const POLL: Duration = Duration::from_millis(10);

static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Tells the harness where the CLI under test is. Integration tests call it
/// with `env!("CARGO_BIN_EXE_fieldcase-under-test")` (the library cannot
/// name that variable itself).
pub fn use_bin(path: &str) {
    let _ = BIN.set(PathBuf::from(path));
}

/// Path of the CLI under test.
pub fn bin_path() -> PathBuf {
    if let Some(p) = BIN.get() {
        return p.clone();
    }
    // Integration tests live in target/<profile>/deps; the binary is one up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("deps dir");
    let up = dir.parent().unwrap_or(dir);
    let name = format!("fieldcase-under-test{}", std::env::consts::EXE_SUFFIX);
    for d in [up, dir] {
        let p = d.join(&name);
        if p.exists() {
            return p;
        }
    }
    panic!("cannot find {name} near {}", exe.display());
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// The command line, for messages.
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Fails with the whole output unless the command succeeded.
    pub fn ok(self) -> Result<Output> {
        if !self.success() {
            bail!(
                "`{}` failed ({}):\n{}",
                self.cmd,
                self.status,
                self.describe()
            );
        }
        Ok(self)
    }

    /// Fails unless the command failed.
    pub fn failed(self) -> Result<Output> {
        if self.success() {
            bail!(
                "`{}` succeeded but should have failed:\n{}",
                self.cmd,
                self.describe()
            );
        }
        Ok(self)
    }

    /// The last non-empty line of stdout.
    pub fn last_line(&self) -> String {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    }

    pub fn describe(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }
}

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a command to completion, killing it after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let text = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {text}"))?;
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            bail!(
                "`{text}` did not finish within {timeout:?}; killed\n--- stdout\n{stdout}--- stderr\n{stderr}"
            );
        }
        thread::sleep(POLL);
    };
    Ok(Output {
        cmd: text,
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// One node: a name and a home folder, driven through the CLI.
pub struct Node {
    pub name: String,
    home: tempfile::TempDir,
    id: Option<String>,
}

impl Node {
    /// A node with a fresh, empty home (not yet initialised).
    pub fn new(name: &str) -> Node {
        let home = tempfile::Builder::new()
            .prefix(&format!("fieldcase-{name}-"))
            .tempdir()
            .expect("tempdir");
        Node {
            name: name.to_string(),
            home,
            id: None,
        }
    }

    /// A node initialised with `role` (`field` or `center`).
    pub fn init(name: &str, role: &str) -> Result<Node> {
        let mut n = Node::new(name);
        let out = n.run(&["init", "--name", name, "--role", role])?.ok()?;
        let id = out.last_line();
        if id.is_empty() {
            bail!("init printed no node ID:\n{}", out.describe());
        }
        n.id = Some(id);
        Ok(n)
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// The node ID printed by `init`.
    pub fn id(&self) -> &str {
        self.id.as_deref().expect("node was initialised")
    }

    /// `fieldcase --home HOME ARGS...`, bounded.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin_path());
        c.arg("--home").arg(self.home()).args(args);
        c.env_remove("FIELDCASE_HOME");
        c
    }

    /// Runs a command to completion (any exit status).
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        run_bounded(self.command(args), COMMAND_TIMEOUT)
    }

    /// Runs a command and requires success.
    pub fn ok(&self, args: &[&str]) -> Result<Output> {
        self.run(args)?.ok()
    }

    /// Trusts `other` under its own name, optionally with an address.
    pub fn trust(&self, other: &Node, addr: Option<&str>) -> Result<()> {
        self.trust_as(other.id(), &other.name, addr)
    }

    /// Trusts node ID `id` under `name`.
    pub fn trust_as(&self, id: &str, name: &str, addr: Option<&str>) -> Result<()> {
        let mut args = vec!["peer", "add", id, "--name", name];
        if let Some(a) = addr {
            args.extend(["--addr", a]);
        }
        self.ok(&args)?;
        Ok(())
    }

    /// `case new`; returns the printed code.
    pub fn case_new(
        &self,
        procedure: &str,
        applicant: &str,
        village: &str,
        set: &[(&str, &str)],
    ) -> Result<String> {
        let pairs: Vec<String> = set.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut args = vec![
            "case",
            "new",
            "--procedure",
            procedure,
            "--applicant",
            applicant,
            "--village",
            village,
        ];
        for p in &pairs {
            args.extend(["--set", p.as_str()]);
        }
        let code = self.ok(&args)?.last_line();
        if code.is_empty() {
            bail!("case new printed no code");
        }
        Ok(code)
    }

    /// `case show CODE --json`, parsed.
    pub fn show_json(&self, code: &str) -> Result<Value> {
        let out = self.ok(&["case", "show", code, "--json"])?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("case show --json is not JSON:\n{}", out.stdout))
    }

    /// `case list --json`, parsed (an array).
    pub fn list_json(&self) -> Result<Value> {
        let out = self.ok(&["case", "list", "--json"])?;
        let v: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("case list --json is not JSON:\n{}", out.stdout))?;
        if !v.is_array() {
            bail!("case list --json is not an array: {v}");
        }
        Ok(v)
    }

    /// The codes of every case this node holds, sorted.
    pub fn codes(&self) -> Result<Vec<String>> {
        let mut codes: Vec<String> = self
            .list_json()?
            .as_array()
            .expect("checked")
            .iter()
            .map(|r| r["code"].as_str().unwrap_or_default().to_string())
            .collect();
        codes.sort();
        Ok(codes)
    }

    /// Everything this node holds: the list plus every case's full JSON
    /// view (which includes heads), keyed by code.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let list = self.list_json()?;
        let mut cases = std::collections::BTreeMap::new();
        for code in self.codes()? {
            let v = self.show_json(&code)?;
            cases.insert(code, v);
        }
        Ok(Snapshot { list, cases })
    }

    /// `sync PEER` (any exit status).
    pub fn sync(&self, peer: &str) -> Result<Output> {
        self.run(&["sync", peer])
    }

    /// `sync PEER`, requiring success; returns the parsed summary line.
    pub fn sync_ok(&self, peer: &str) -> Result<Summary> {
        let out = self.sync(peer)?.ok()?;
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("sync with {peer}:")))
            .ok_or_else(|| anyhow!("no summary line for {peer}:\n{}", out.describe()))?;
        Summary::parse(line)
    }

    /// Starts `serve --listen 127.0.0.1:0` and waits (bounded) until it
    /// prints its address.
    pub fn serve(&self) -> Result<Server> {
        Server::start(self, "127.0.0.1:0")
    }

    /// Starts `serve --listen ADDR` (e.g. the address of a server that was
    /// killed, so that a relay pointing at it keeps working) and waits
    /// (bounded) until it prints its address.
    pub fn serve_on(&self, listen: &str) -> Result<Server> {
        Server::start(self, listen)
    }

    /// Runs a command to completion (any exit status), killing it after
    /// `timeout` instead of [`COMMAND_TIMEOUT`]: for transfers over slow
    /// links.
    pub fn run_for(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        run_bounded(self.command(args), timeout)
    }

    /// Starts a command without waiting for it (for example a `sync` to be
    /// cut off midway).
    pub fn spawn(&self, args: &[&str]) -> Result<Running> {
        Running::start(self.command(args))
    }

    /// `config set KEY VALUE`, requiring success.
    pub fn config_set(&self, key: &str, value: &str) -> Result<()> {
        self.ok(&["config", "set", key, value])?;
        Ok(())
    }

    /// `case attach CODE ITEM FILE --json`, requiring success; returns the
    /// attachment as recorded (hash, size, media_type, name, item...).
    pub fn attach(&self, code: &str, item: &str, file: &Path) -> Result<Value> {
        let file = file
            .to_str()
            .ok_or_else(|| anyhow!("not a UTF-8 path: {}", file.display()))?;
        let out = self.ok(&["case", "attach", code, item, file, "--json"])?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("case attach --json is not JSON:\n{}", out.stdout))
    }

    /// `case files CODE --json`, parsed (one object per attachment, with
    /// `local` = `present`, `partial` or `missing`).
    pub fn files_json(&self, code: &str) -> Result<Vec<Value>> {
        let out = self.ok(&["case", "files", code, "--json"])?;
        let v: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("case files --json is not JSON:\n{}", out.stdout))?;
        match v {
            Value::Array(a) => Ok(a),
            other => bail!("case files --json is not an array: {other}"),
        }
    }

    /// Where the verified bytes of blob `hash` live in this node's home.
    pub fn blob_path(&self, hash: &str) -> PathBuf {
        self.home().join("blobs").join(&hash[..2]).join(hash)
    }

    /// Where an interrupted download of blob `hash` is kept.
    pub fn partial_path(&self, hash: &str) -> PathBuf {
        self.home()
            .join("blobs")
            .join("partial")
            .join(format!("{hash}.part"))
    }
}

/// A CLI process started with [`Node::spawn`], its output collected in
/// the background. Killed (SIGKILL) on drop.
pub struct Running {
    cmd: String,
    child: Option<Child>,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Running {
    fn start(mut cmd: Command) -> Result<Running> {
        let text = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {text}"))?;
        let stdout = drain(child.stdout.take().expect("piped"));
        let stderr = drain(child.stderr.take().expect("piped"));
        Ok(Running {
            cmd: text,
            child: Some(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
        })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process at once (SIGKILL), as a crash or a closed lid
    /// would, and returns what it printed until then.
    pub fn kill(mut self) -> Result<Output> {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let status = child.wait()?;
        Ok(self.output(status))
    }

    /// Waits (bounded) for the process to exit; kills it after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Output> {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                let out = self.output(status);
                bail!(
                    "`{}` did not finish within {timeout:?}; killed\n{}",
                    out.cmd,
                    out.describe()
                );
            }
            thread::sleep(POLL);
        };
        Ok(self.output(status))
    }

    fn output(&mut self, status: ExitStatus) -> Output {
        let join = |h: Option<thread::JoinHandle<String>>| {
            h.and_then(|h| h.join().ok()).unwrap_or_default()
        };
        Output {
            cmd: self.cmd.clone(),
            status,
            stdout: join(self.stdout.take()),
            stderr: join(self.stderr.take()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A node's data as the CLI shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// `case list --json`.
    pub list: Value,
    /// `case show CODE --json` per code.
    pub cases: std::collections::BTreeMap<String, Value>,
}

/// The parsed one-line sync summary:
/// `sync with PEER: N case(s) sent, M case(s) received, K new conflict(s)`,
/// followed by `, F file(s) received (X.Y MB)` when attachments arrived
/// (see [`Summary::files_received`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub sent: usize,
    pub received: usize,
    pub new_conflicts: usize,
}

impl Summary {
    /// Parses a summary line, checking its exact format including plurals.
    pub fn parse(line: &str) -> Result<Summary> {
        let bad = || anyhow!("not a sync summary line: {line:?}");
        let rest = line.strip_prefix("sync with ").ok_or_else(bad)?;
        let (_, counts) = rest.split_once(": ").ok_or_else(bad)?;
        let parts: Vec<&str> = counts.split(", ").collect();
        if parts.len() != 3 && parts.len() != 4 {
            return Err(bad());
        }
        Summary::files_received(line)?;
        let count = |part: &str, one: &str, many: &str| -> Result<usize> {
            let (n, what) = part.split_once(' ').ok_or_else(bad)?;
            let n: usize = n.parse().map_err(|_| bad())?;
            let expected = if n == 1 { one } else { many };
            if what != expected {
                bail!("in {line:?}: expected '{n} {expected}', got '{part}'");
            }
            Ok(n)
        };
        Ok(Summary {
            sent: count(parts[0], "case sent", "cases sent")?,
            received: count(parts[1], "case received", "cases received")?,
            new_conflicts: count(parts[2], "new conflict", "new conflicts")?,
        })
    }

    /// The files part of a summary line, `F file(s) received (X.Y MB)`, as
    /// (F, X.Y); `None` when the line has none. Checks the plural.
    pub fn files_received(line: &str) -> Result<Option<(usize, f64)>> {
        let bad = || anyhow!("not a sync summary line with files: {line:?}");
        let Some((_, counts)) = line.split_once(": ") else {
            return Err(bad());
        };
        let parts: Vec<&str> = counts.split(", ").collect();
        let Some(part) = parts.get(3) else {
            return Ok(None);
        };
        let (n, rest) = part.split_once(' ').ok_or_else(bad)?;
        let n: usize = n.parse().map_err(|_| bad())?;
        let expected = if n == 1 {
            "file received ("
        } else {
            "files received ("
        };
        let mb = rest
            .strip_prefix(expected)
            .and_then(|r| r.strip_suffix(" MB)"))
            .ok_or_else(|| anyhow!("in {line:?}: expected '{n} {expected}X MB)', got '{part}'"))?;
        let mb: f64 = mb.parse().map_err(|_| bad())?;
        Ok(Some((n, mb)))
    }
}

/// A running `fieldcase serve`. Killed (SIGKILL) on drop.
pub struct Server {
    child: Option<Child>,
    addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Server {
    fn start(node: &Node, listen: &str) -> Result<Server> {
        let mut cmd = node.command(&["serve", "--listen", listen]);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start serve")?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = drain(child.stderr.take().expect("piped"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().expect("lock").push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut server = Server {
            child: Some(child),
            addr: String::new(),
            lines,
            stderr: Some(stderr),
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on ") {
                        server.addr = addr.trim().to_string();
                        return Ok(server);
                    }
                }
                Err(_) => {
                    let log = server.log();
                    let err = server.kill_and_stderr();
                    bail!("serve did not print its address in time\n--- stdout\n{log}--- stderr\n{err}");
                }
            }
        }
    }

    /// The address the server listens on, HOST:PORT.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the server printed on stdout so far.
    pub fn log(&self) -> String {
        let mut s = self.lines.lock().expect("lock").join("\n");
        s.push('\n');
        s
    }

    /// Waits (bounded) until a stdout line satisfies `pred`; returns it.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        poll_until(timeout, "server log line", || {
            Ok(self.lines().into_iter().find(|l| pred(l)))
        })
        .with_context(|| format!("server log so far:\n{}", self.log()))
    }

    /// Waits (bounded) until at least `n` stdout lines satisfy `pred`.
    pub fn wait_for_count(
        &self,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Result<()> {
        poll_until(timeout, "server log lines", || {
            Ok((self.lines().iter().filter(|l| pred(l)).count() >= n).then_some(()))
        })
        .with_context(|| {
            format!(
                "expected {n} matching lines; server log so far:\n{}",
                self.log()
            )
        })
    }

    /// A copy of the stdout lines so far (the lock is not held afterwards,
    /// so predicates may call back into the server).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> Result<(ExitStatus, String)> {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) with a PID we spawned and have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if rc != 0 {
            let _ = child.kill();
            let _ = child.wait();
            bail!("cannot send SIGTERM to serve");
        }
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("serve did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM");
            }
            thread::sleep(POLL);
        };
        // Let the reader thread take the last lines (EOF follows exit).
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !self.log().contains("shut down cleanly") {
            thread::sleep(POLL);
        }
        Ok((status, self.log()))
    }

    /// Kills the process at once (SIGKILL), as a crash or power cut would.
    pub fn kill(mut self) {
        let _ = self.kill_and_stderr();
    }

    fn kill_and_stderr(&mut self) -> String {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A seeded RNG; the seed comes from `FIELDCASE_TEST_SEED` or `default`,
/// and is printed so a failure can be replayed.
pub fn seeded_rng(test: &str, default: u64) -> (rand_chacha::ChaCha8Rng, u64) {
    use rand::SeedableRng;
    let seed = std::env::var("FIELDCASE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("{test}: seed {seed} (replay with FIELDCASE_TEST_SEED={seed})");
    (rand_chacha::ChaCha8Rng::seed_from_u64(seed), seed)
}

/// Shuffles `items` with `rng` (Fisher-Yates).
pub fn shuffle<T>(rng: &mut impl rand::Rng, items: &mut [T]) {
    use rand::RngExt;
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

/// Bounded polling: calls `f` until it returns `Some`, or fails after
/// `timeout`.
pub fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not reached within {timeout:?}");
        }
        thread::sleep(POLL);
    }
}

/// The runtime the in-process stories run on: two workers, like the
/// 2-core machines the nodes run on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A center's `Server` running in this process on a loopback port, for
/// benchmarks and stories that read both stores afterwards. Call it from
/// inside a tokio runtime.
pub struct InProcServer {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), fieldcase_node::net::NetError>>>,
}

impl InProcServer {
    /// Binds the node at `home` to 127.0.0.1 on a free port and serves.
    pub fn start(home: &Path) -> Result<InProcServer> {
        let server = fieldcase_node::net::Server::bind(
            home,
            "127.0.0.1:0".parse()?,
            Arc::new(|_: &str| {}),
        )?;
        let addr = server.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Ok(InProcServer {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops serving and waits for the server (at most 10 s).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

/// Options for a one-shot sync that logs and reports nothing.
pub fn quiet_sync_options() -> fieldcase_node::net::SyncOptions {
    fieldcase_node::net::SyncOptions {
        live: false,
        changes: None,
        log: Arc::new(|_: &str| {}),
        progress: Arc::new(|_: &_| {}),
        only_blob: None,
    }
}
