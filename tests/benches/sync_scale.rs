//! Sync at scale: what a first sync, a reconnect and a live edit cost when
//! a center holds 10,000 or 100,000 cases (issue 5, "Benchmark").
//!
//! Real nodes with real stores (SQLite, `synchronous=FULL`), real QUIC on
//! loopback, cases shaped like real ones: every procedure, applicant and
//! procedure fields, checklist marks, notes and status moves, about 20
//! changes each (the header of the output gives the exact averages).
//!
//! Rows:
//!
//! 1. first sync of 10,000 cases, center -> empty laptop. Twice: once with
//!    both sides as separate processes (`serve` and `sync` of the real CLI,
//!    for peak RSS: the center's `VmHWM` read from `/proc` before it is
//!    stopped, the laptop's `ru_maxrss` from `wait4`), and once in-process
//!    (for the session's own byte counters, and quinn's count of UDP
//!    payload bytes each way). Both connect directly on loopback: a relay
//!    in the middle would take CPU from the two nodes on a 2-core machine
//!    (it did: 0.1-0.2 s of the wall time).
//! 2. reconnect with 10 cases changed on each side: through a relay adding
//!    a fixed 100 ms RTT (round trips = wall time / RTT, QUIC handshake
//!    included), and directly on loopback (median of 3).
//! 3. reconnect with nothing changed, the same two ways.
//! 4. live push: an edit committed at the center (`Node::update`, which
//!    notifies the in-process `Server`) until it is committed in the
//!    laptop's store (polled every 0.2 ms from a second SQLite connection),
//!    over 200 edits of 200 different cases.
//! 5. peak RSS (`VmHWM`) of a `serve` process holding 100,000 cases while
//!    3 empty laptops (`sync` processes) do their first sync at once.
//!
//! Case stores are generated once per fixture version and N, with
//! `Store::create_cases_batch`, and cached under
//! `target/bench-fixtures/`; each run works on copies.
//!
//! Run: `cargo bench -p fieldcase-tests --bench sync_scale` (about 10 min
//! on 2 cores, plus a few minutes to build the fixtures the first time), or
//! `-- --quick` for 10,000 cases only; `-- --fixtures-only` just builds the
//! cached fixtures.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use automerge::Automerge;
use fieldcase_node::case::{self, Author, CaseError, DocState, NewCase, Status};
use fieldcase_node::net::{self, SyncOptions, SyncReport};
use fieldcase_node::node::{open_store, Node, Role};
use fieldcase_node::store::{PeerRow, StoreError, CREATE_BATCH_MAX};
use fieldcase_tests::relay::{LinkProfile, Relay};
use fieldcase_tests::{quiet_sync_options, InProcServer};

/// Bump when the shape of generated cases changes: old caches are ignored.
const FIXTURE_VERSION: u32 = 2;
/// Relay seed (the perfect and fixed-RTT links draw nothing random).
const SEED: u64 = 20260501;
/// Cases created per transaction when building a fixture.
const FIXTURE_BATCH: usize = 5_000;
/// RTT of the relay used to count round trips.
const RTT: Duration = Duration::from_millis(100);
/// Cases changed on each side before a reconnect.
const CHANGED_EACH_SIDE: usize = 10;
/// Live edits measured.
const LIVE_EDITS: usize = 200;
/// Laptops syncing at once in row 5.
const LAPTOPS: usize = 3;
/// Upper bound for one sync.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);
/// Creation time of the generated cases: 2026-03-02 08:00 Vietnam time.
const BASE_MS: i64 = 1_772_413_200_000;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fieldcase-under-test"))
}

// ---------------------------------------------------------------- fixtures

/// Procedure fields per procedure: two given at creation, two set later.
fn procedure_fields(procedure: &str, i: usize) -> [(&'static str, String); 4] {
    match procedure {
        "birth-registration" => [
            ("child-name", format!("Nguyen Van Be {i}")),
            (
                "child-birth-date",
                format!("2026-0{}-1{}", 1 + i % 2, i % 10),
            ),
            (
                "child-sex",
                if i.is_multiple_of(2) {
                    "male"
                } else {
                    "female"
                }
                .into(),
            ),
            ("birth-place", "Tram y te xa Tan Phu".into()),
        ],
        "household-registration" => [
            ("address", format!("So {} thon {}", i % 300, i % 12)),
            ("household-head", format!("Tran Thi Mai {i}")),
            ("relationship-to-head", "con".into()),
            ("move-in-date", format!("2025-1{}-0{}", i % 3, 1 + i % 9)),
        ],
        "certification" => [
            ("certification-type", "copy".into()),
            ("document-title", format!("Giay khai sinh ban sao {i}")),
            ("copies-count", format!("{}", 1 + i % 5)),
            ("document-language", "vi".into()),
        ],
        "land-survey" => [
            ("parcel-number", format!("{}", 100 + i % 900)),
            ("map-sheet", format!("{}", 1 + i % 40)),
            ("area-m2", format!("{}.5", 80 + i % 400)),
            ("land-use-purpose", "ONT".into()),
        ],
        "social-insurance" => [
            ("contribution-plan", "monthly".into()),
            (
                "income-basis",
                format!("{}", 1_500_000 + (i % 20) * 100_000),
            ),
            ("start-date", "2026-04-01".into()),
            ("insurance-number", format!("79{:08}", i)),
        ],
        _ => [
            ("household-size", format!("{}", 2 + i % 6)),
            ("registered-clinic", "Tram y te xa Tan Phu".into()),
            ("beneficiary-group", "HGD".into()),
            ("card-number", format!("GD479{:010}", i)),
        ],
    }
}

/// One case shaped like a real one; returns it with its number of changes.
fn make_case(code: &str, i: usize, author: &Author) -> Result<(Automerge, usize), CaseError> {
    let procs = case::procedures();
    let p = &procs[i % procs.len()];
    let pf = procedure_fields(p.id, i);
    let mut t = BASE_MS + (i as i64 % 86_400) * 1_000;
    let mut tick = || {
        t += 60_000;
        t
    };
    let new = NewCase {
        procedure: p.id.to_string(),
        applicant: format!("Le Thi Hoa {i}"),
        village: format!("Thon {}", 1 + i % 12),
        fields: vec![
            (
                "birth-date".into(),
                format!("19{}-0{}-1{}", 60 + i % 40, 1 + i % 9, i % 10),
            ),
            ("id-number".into(), format!("0792{:08}", i % 100_000_000)),
            (pf[0].0.into(), pf[0].1.clone()),
            (pf[1].0.into(), pf[1].1.clone()),
        ],
    };
    let mut doc = case::create(code, &new, author, tick())?;
    let mut changes = 1;
    let mut set = |doc: &mut Automerge, f: &str, v: &str| -> Result<(), CaseError> {
        case::set_field(doc, f, v, author, tick())
    };
    set(&mut doc, "phone", &format!("09{:08}", i % 100_000_000))?;
    set(&mut doc, "assignee", &format!("can bo {}", i % 7))?;
    set(&mut doc, pf[2].0, &pf[2].1)?;
    set(&mut doc, pf[3].0, &pf[3].1)?;
    changes += 4;
    // Checklist: the first required item is brought unusable once, then
    // every required item is received, and one optional item too.
    let required: Vec<_> = p.checklist.iter().filter(|d| d.required).collect();
    let optional = p.checklist.iter().find(|d| !d.required);
    case::mark_document(&mut doc, required[0].id, DocState::Invalid, author, tick())?;
    changes += 1;
    for d in &required {
        case::mark_document(&mut doc, d.id, DocState::Received, author, tick())?;
        changes += 1;
    }
    if let Some(d) = optional {
        case::mark_document(&mut doc, d.id, DocState::Received, author, tick())?;
        changes += 1;
    }
    let notes = 2 + i % 2;
    for n in 0..notes {
        case::add_note(
            &mut doc,
            &format!(
                "Ghi chu {n}: da goi dien cho cong dan, hen ngay {}",
                1 + i % 28
            ),
            author,
            tick(),
        )?;
        changes += 1;
    }
    case::change_status(&mut doc, Status::Processing, author, tick())?;
    changes += 1;
    // Corrections after the fact, as happen: a mistyped phone, ID number
    // and name, a procedure field re-entered, the case handed over.
    let mut set = |doc: &mut Automerge, f: &str, v: &str| -> Result<(), CaseError> {
        case::set_field(doc, f, v, author, tick())
    };
    set(&mut doc, "phone", &format!("03{:08}", i % 100_000_000))?;
    set(
        &mut doc,
        "id-number",
        &format!("0793{:08}", i % 100_000_000),
    )?;
    set(&mut doc, "applicant", &format!("Le Thi Hoa {i} (Hoa)"))?;
    set(&mut doc, pf[0].0, &pf[0].1)?;
    set(&mut doc, "assignee", &format!("can bo {}", (i + 1) % 7))?;
    changes += 5;
    if i.is_multiple_of(3) {
        case::change_status(&mut doc, Status::ResultReady, author, tick())?;
        changes += 1;
    }
    Ok((doc, changes))
}

fn author_of(node: &Node) -> Author {
    Author {
        actor: node.node_id().actor_id(),
        node_id: node.node_id().to_string(),
        name: node.name().to_string(),
    }
}

struct Fixture {
    /// The center's home (read-only cache; copy before use).
    center: PathBuf,
    n: usize,
    /// Sum of `Automerge::save().len()` over all cases.
    saved_bytes: u64,
    /// Average changes and fields per case.
    changes_per_case: f64,
    fields_per_case: f64,
}

fn target_dir() -> PathBuf {
    // target/<profile>/deps/<bench>
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")))
}

fn fixture(n: usize) -> Result<Fixture> {
    let dir = target_dir()
        .join("bench-fixtures")
        .join(format!("sync-scale-v{FIXTURE_VERSION}-{n}"));
    let ready = dir.join("ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        build_fixture(&dir, n)?;
    }
    let text = std::fs::read_to_string(&ready)?;
    let nums: Vec<f64> = text
        .split_whitespace()
        .map(|s| s.parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad {}", ready.display()))?;
    ensure!(nums.len() == 3, "bad {}", ready.display());
    Ok(Fixture {
        center: dir.join("center"),
        n,
        saved_bytes: nums[0] as u64,
        changes_per_case: nums[1],
        fields_per_case: nums[2],
    })
}

fn build_fixture(dir: &Path, n: usize) -> Result<()> {
    let started = Instant::now();
    eprintln!(
        "building fixture: a center with {n} cases in {} ...",
        dir.display()
    );
    let home = dir.join("center");
    Node::init(&home, "center", Role::Center)?;
    let mut node = Node::open(&home)?;
    let author = author_of(&node);
    let prefix = node.node_id().short_prefix();
    let batch = FIXTURE_BATCH.min(CREATE_BATCH_MAX);
    let (mut saved, mut changes, mut fields) = (0u64, 0usize, 0usize);
    let mut start = 0;
    while start < n {
        let count = batch.min(n - start);
        // Generating the documents is the slow part: both cores, then one
        // transaction for the whole batch. The store numbers a fresh
        // store's cases from 1, which the closure checks.
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = count.div_ceil(threads);
        let docs: Vec<(Automerge, usize, usize, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let (author, prefix) = (&author, &prefix);
                    s.spawn(move || {
                        let lo = start + t * chunk;
                        let hi = (lo + chunk).min(start + count);
                        (lo..hi)
                            .map(|i| {
                                let (doc, changes) =
                                    make_case(&format!("{prefix}-{:06}", i + 1), i, author)?;
                                let view = case::view(&doc)?;
                                let fields = 5
                                    + view.fields.len()
                                    + usize::from(!view.assignee.is_empty())
                                    + view.checklist.len();
                                let saved = doc.save().len() as u64;
                                Ok::<_, CaseError>((doc, changes, fields, saved))
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("generator thread"))
                .collect::<Result<Vec<Vec<_>>, _>>()
                .map(|v| v.into_iter().flatten().collect())
        })?;
        for (_, c, f, b) in &docs {
            saved += b;
            changes += c;
            fields += f;
        }
        let mut docs = docs.into_iter();
        node.store()
            .create_cases_batch(count, |k, seq| {
                let i = start + k;
                let (doc, ..) = docs.next().ok_or("ran out of documents")?;
                if seq != i as u64 + 1 {
                    return Err("the store did not number cases from 1");
                }
                Ok((format!("{prefix}-{seq:06}"), doc))
            })
            .map_err(|e| anyhow!("batch insert failed: {e:?}"))?;
        start += count;
        eprintln!("  {start} cases, {:.0} s", started.elapsed().as_secs_f64());
    }
    drop(node);
    std::fs::write(
        dir.join("ready"),
        format!(
            "{saved} {} {}\n",
            changes as f64 / n as f64,
            fields as f64 / n as f64
        ),
    )?;
    Ok(())
}

/// A laptop that already holds every case of the fixture's center, byte for
/// byte (the center's documents, inserted with `create_cases_batch`), as
/// after a completed first sync but without the hours a 100,000-case first
/// sync takes with one commit per case. Its first reconnect lists every case
/// both ways and settles the cursors; [`reconnects`] does that unmeasured.
/// Cached beside the center (which trusts it). Returns its home and peer row.
fn paired_laptop(fx: &Fixture) -> Result<(PathBuf, PeerRow)> {
    let dir = fx.center.parent().expect("fixture dir").to_path_buf();
    let home = dir.join("laptop");
    let ready = dir.join("ready-laptop");
    if !ready.exists() {
        let started = Instant::now();
        eprintln!(
            "building fixture: a laptop holding the same {} cases ...",
            fx.n
        );
        let _ = std::fs::remove_dir_all(&home);
        let laptop_id = Node::init(&home, "laptop", Role::Field)?;
        let mut center = Node::open(&fx.center)?;
        center.add_peer(&laptop_id.to_string(), "laptop", None)?;
        let center_id = center.node_id();
        let mut laptop = Node::open(&home)?;
        laptop.add_peer(&center_id.to_string(), "center", Some("127.0.0.1:9"))?;
        let mut after: Option<String> = None;
        loop {
            let page = center.store().codes_page(after.as_deref(), FIXTURE_BATCH)?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            let mut docs = Vec::with_capacity(page.len());
            for code in &page {
                let doc = center
                    .store()
                    .load_case(code)?
                    .ok_or_else(|| anyhow!("{code} vanished"))?;
                docs.push((code.clone(), doc));
            }
            let mut docs = docs.into_iter();
            laptop
                .store()
                .create_cases_batch(page.len(), |_, _| docs.next().ok_or("ran out of documents"))
                .map_err(|e| anyhow!("laptop batch insert failed: {e:?}"))?;
            after = Some(last);
        }
        drop((center, laptop));
        std::fs::write(&ready, "")?;
        eprintln!("  done in {:.0} s", started.elapsed().as_secs_f64());
    }
    let peer = Node::open(&home)?.peer("center")?;
    Ok((home, peer))
}

/// Copies a node home (database and keys; not notification sockets).
fn copy_home(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if entry.file_name() != "notify" {
                copy_home(&path, &to.join(entry.file_name()))?;
            }
        } else if entry.file_type()?.is_file() {
            std::fs::copy(&path, to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A fresh laptop that trusts `center` (and is trusted by it).
fn new_laptop(dir: &Path, name: &str, center_home: &Path) -> Result<(PathBuf, PeerRow)> {
    let home = dir.join(name);
    let laptop_id = Node::init(&home, name, Role::Field)?;
    let mut center = Node::open(center_home)?;
    center.add_peer(&laptop_id.to_string(), name, None)?;
    let center_id = center.node_id();
    drop(center);
    let mut laptop = Node::open(&home)?;
    // Placeholder address; each run sets the one it uses.
    laptop.add_peer(&center_id.to_string(), "center", Some("127.0.0.1:9"))?;
    let peer = laptop.peer("center")?;
    Ok((home, peer))
}

fn case_count(home: &Path) -> Result<u64> {
    Ok(open_store(home)?.changed_since(0)?)
}

// ------------------------------------------------------------ in-process

/// What one outgoing sync took.
struct Timing {
    /// `sync_with` returned: session finished, connection closed and
    /// drained (what `fieldcase sync` waits for before exiting).
    wall: Duration,
    /// The laptop recorded the sync as complete (`record_sync` at
    /// convergence), seen by polling its peer row every 0.5 ms.
    converged: Option<Duration>,
}

async fn sync_to(home: &Path, peer: &PeerRow, addr: SocketAddr) -> Result<(SyncReport, Timing)> {
    let mut peer = peer.clone();
    peer.addr = Some(addr.to_string());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let watcher = {
        let (home, stop) = (home.to_path_buf(), stop.clone());
        std::thread::spawn(move || -> Option<Duration> {
            let store = open_store(&home).ok()?;
            let last = |s: &fieldcase_node::store::Store| {
                s.peer_by_name("center")
                    .ok()
                    .flatten()
                    .and_then(|p| p.last_sync_at_ms)
            };
            let before = last(&store);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if last(&store) != before {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            None
        })
    };
    let report = tokio::time::timeout(
        SYNC_TIMEOUT,
        net::sync_with(home, &peer, quiet_sync_options()),
    )
    .await
    .map_err(|_| anyhow!("sync timed out"));
    let wall = t0.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let converged = watcher.join().ok().flatten();
    Ok((report??, Timing { wall, converged }))
}

#[derive(Clone, Copy, Default)]
struct Wire {
    /// UDP payload bytes laptop -> center and back, handshake included.
    up: u64,
    down: u64,
}

impl Wire {
    fn total(&self) -> u64 {
        self.up + self.down
    }
}

fn relay_wire(relay: &Relay) -> Wire {
    let s = relay.stats();
    Wire {
        up: s.to_server.offered_bytes,
        down: s.to_client.offered_bytes,
    }
}

fn session_bytes(r: &SyncReport) -> u64 {
    r.stats.bytes_sent + r.stats.bytes_received
}

/// One sync through a fresh relay with `profile`.
async fn sync_via_relay(
    home: &Path,
    peer: &PeerRow,
    server: SocketAddr,
    profile: LinkProfile,
) -> Result<(SyncReport, Timing, Wire)> {
    let relay = Relay::start(server, profile, SEED).await?;
    let (report, timing) = sync_to(home, peer, relay.addr()).await?;
    let wire = relay_wire(&relay);
    relay.stop().await;
    Ok((report, timing, wire))
}

fn rtt_profile() -> LinkProfile {
    LinkProfile {
        rtt: RTT,
        ..LinkProfile::perfect()
    }
}

// ------------------------------------------------------------- processes

/// A `fieldcase serve` child process.
struct ServeProc {
    pid: libc::pid_t,
    addr: SocketAddr,
    reaped: bool,
}

impl ServeProc {
    fn start(home: &Path) -> Result<ServeProc> {
        let mut child = Command::new(bin())
            .arg("--home")
            .arg(home)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("FIELDCASE_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start serve")?;
        let pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("listening on ") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let mut me = ServeProc {
            pid,
            addr: "127.0.0.1:9".parse()?,
            reaped: false,
        };
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow!("serve did not print its address"))?;
        me.addr = addr.parse()?;
        // `child` is dropped without waiting: we reap it with wait4.
        Ok(me)
    }

    /// Peak resident set so far, from /proc (bytes).
    fn vm_hwm(&self) -> Result<u64> {
        vm_hwm(self.pid)
    }

    /// SIGTERM and reap.
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on a child we spawned and have not reaped yet.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let (_, _) = wait4(self.pid)?;
        self.reaped = true;
        Ok(())
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: as above; the child is ours and not yet reaped.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = wait4(self.pid);
        }
    }
}

fn vm_hwm(pid: libc::pid_t) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or_else(|| anyhow!("no VmHWM for {pid}"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad VmHWM line"))?
        .parse()?;
    Ok(kb * 1024)
}

/// Waits for a child; returns its exit status and peak RSS in bytes.
fn wait4(pid: libc::pid_t) -> Result<(i32, u64)> {
    wait4_cpu(pid).map(|(s, r, _)| (s, r))
}

/// Like [`wait4`], with the child's CPU time (user + system).
fn wait4_cpu(pid: libc::pid_t) -> Result<(i32, u64, Duration)> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4({pid}) failed: {}", std::io::Error::last_os_error());
    }
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    Ok((
        status,
        usage.ru_maxrss.max(0) as u64 * 1024,
        tv(usage.ru_utime) + tv(usage.ru_stime),
    ))
}

/// CPU time (user + system) a live process has used, from /proc.
fn proc_cpu(pid: libc::pid_t) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).unwrap_or(&"0").parse::<u64>()? + f.get(12).unwrap_or(&"0").parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

/// CPU time of this whole process so far.
fn self_cpu() -> Duration {
    // SAFETY: plain data filled by getrusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv =
        |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Runs `fieldcase sync center` as a child, in a blocking thread; returns
/// wall time, peak RSS, CPU time and its output.
async fn sync_process(home: PathBuf) -> Result<(Duration, u64, Duration, String)> {
    tokio::task::spawn_blocking(move || -> Result<(Duration, u64, Duration, String)> {
        let t0 = Instant::now();
        let mut child = Command::new(bin())
            .arg("--home")
            .arg(&home)
            .args(["sync", "center"])
            .env_remove("FIELDCASE_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start sync")?;
        let pid = child.id() as libc::pid_t;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let mut text = String::new();
        std::io::Read::read_to_string(&mut out, &mut text)?;
        let (status, rss, cpu) = wait4_cpu(pid)?;
        let wall = t0.elapsed();
        let errtext = reader.join().unwrap_or_default();
        ensure!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "sync failed ({status}):\n{text}\n{errtext}"
        );
        Ok((wall, rss, cpu, text))
    })
    .await?
}

// ---------------------------------------------------------------- rows

struct FirstSync {
    proc_wall: Duration,
    inproc: Timing,
    wire_inproc: Wire,
    session: u64,
    case_messages: u64,
    saved: u64,
    center_rss: u64,
    laptop_rss: u64,
    center_cpu: Duration,
    laptop_cpu: Duration,
    /// CPU of this process (both sides and the relay) in the in-process run.
    inproc_cpu: Duration,
}

/// Row 1; leaves `work/center` and the in-process laptop as a synced pair.
async fn first_sync(fx: &Fixture, work: &Path) -> Result<(FirstSync, PathBuf, PeerRow)> {
    let center = work.join("center");
    copy_home(&fx.center, &center)?;
    let (laptop_p, peer_p) = new_laptop(work, "laptop-p", &center)?;
    let (laptop_i, peer_i) = new_laptop(work, "laptop-i", &center)?;

    // Separate processes, for RSS.
    let serve = ServeProc::start(&center)?;
    Node::open(&laptop_p)?.add_peer(&peer_p.node_id, "center", Some(&serve.addr.to_string()))?;
    let center_cpu0 = proc_cpu(serve.pid)?;
    let (proc_wall, laptop_rss, laptop_cpu, _) = sync_process(laptop_p.clone()).await?;
    let center_cpu = proc_cpu(serve.pid)? - center_cpu0;
    let center_rss = serve.vm_hwm()?;
    serve.stop()?;
    ensure!(
        case_count(&laptop_p)? == fx.n as u64,
        "process laptop incomplete"
    );

    // In-process, for the session's counters.
    let server = InProcServer::start(&center)?;
    let cpu0 = self_cpu();
    let (report, inproc) = sync_to(&laptop_i, &peer_i, server.addr).await?;
    let wire_inproc = Wire {
        up: report.udp_bytes.0,
        down: report.udp_bytes.1,
    };
    let inproc_cpu = self_cpu() - cpu0;
    server.stop().await;
    ensure!(
        case_count(&laptop_i)? == fx.n as u64,
        "in-process laptop incomplete"
    );
    Ok((
        FirstSync {
            proc_wall,
            inproc,
            wire_inproc,
            session: session_bytes(&report),
            case_messages: report.stats.case_messages_sent + report.stats.case_messages_received,
            saved: fx.saved_bytes,
            center_rss,
            laptop_rss,
            center_cpu,
            laptop_cpu,
            inproc_cpu,
        },
        laptop_i,
        peer_i,
    ))
}

/// Codes of the center's cases (first `n` by code).
fn codes(home: &Path, n: usize) -> Result<Vec<String>> {
    Ok(open_store(home)?.codes_page(None, n)?)
}

/// Edits `count` cases starting at `from` in `home`'s node.
fn edit_cases(home: &Path, all: &[String], from: usize, count: usize, what: &str) -> Result<()> {
    let mut node = Node::open(home)?;
    for code in all.iter().skip(from).take(count) {
        node.update(code, |doc, author, now| {
            case::add_note(doc, &format!("{what}: goi lai cho cong dan"), author, now)
        })?;
    }
    Ok(())
}

struct Reconnect {
    rtt: Timing,
    rtt_session: u64,
    rtt_wire: Wire,
    rtt_case_messages: u64,
    direct: Vec<Timing>,
    direct_session: u64,
}

impl Reconnect {
    /// Round trips until converged, and until `sync_with` returned.
    fn round_trips(&self) -> (f64, f64) {
        let rt = |d: Duration| d.as_secs_f64() / RTT.as_secs_f64();
        (self.rtt.converged.map_or(f64::NAN, rt), rt(self.rtt.wall))
    }
    /// Median direct (converged, returned).
    fn direct_median(&self) -> (Duration, Duration) {
        let mut w: Vec<Duration> = self.direct.iter().map(|t| t.wall).collect();
        let mut c: Vec<Duration> = self
            .direct
            .iter()
            .map(|t| t.converged.unwrap_or(t.wall))
            .collect();
        w.sort();
        c.sort();
        (c[c.len() / 2], w[w.len() / 2])
    }
}

/// Rows 2 and 3 on a synced pair.
async fn reconnects(
    center: &Path,
    laptop: &Path,
    peer: &PeerRow,
    n: usize,
) -> Result<(Reconnect, Reconnect)> {
    let all = codes(center, n)?;
    ensure!(all.len() >= 200, "too few cases");
    let server = InProcServer::start(center)?;
    let mut round = 0usize;
    let changed = |round: &mut usize| -> Result<()> {
        // Different cases each round; the center's and the laptop's apart.
        let base = 1 + *round * 2 * CHANGED_EACH_SIDE * 37 % (n - 40);
        edit_cases(center, &all, base, CHANGED_EACH_SIDE, "center")?;
        edit_cases(
            laptop,
            &all,
            base + CHANGED_EACH_SIDE,
            CHANGED_EACH_SIDE,
            "laptop",
        )?;
        *round += 1;
        Ok(())
    };
    // Not measured: settle the cursors (a laptop built from a copy lists
    // everything once), warm the page cache, and give the cases the
    // measured rounds edit a persisted Automerge sync state, as cases that
    // are worked on keep being worked on.
    for k in 0..4 {
        changed(&mut round)?;
        let (r, _) = sync_to(laptop, peer, server.addr).await?;
        ensure!(
            r.stats.cases_received.len() == CHANGED_EACH_SIDE,
            "warm-up {k} received {} cases",
            r.stats.cases_received.len()
        );
    }
    round = 0;

    // Row 2: 10 + 10 changed.
    changed(&mut round)?;
    let (r, rtt, rtt_wire) = sync_via_relay(laptop, peer, server.addr, rtt_profile()).await?;
    ensure!(
        r.stats.cases_sent.len() == CHANGED_EACH_SIDE
            && r.stats.cases_received.len() == CHANGED_EACH_SIDE,
        "reconnect moved {} / {} cases",
        r.stats.cases_sent.len(),
        r.stats.cases_received.len()
    );
    let mut changed_row = Reconnect {
        rtt,
        rtt_session: session_bytes(&r),
        rtt_wire,
        rtt_case_messages: r.stats.case_messages_sent + r.stats.case_messages_received,
        direct: vec![],
        direct_session: 0,
    };
    for _ in 0..3 {
        changed(&mut round)?;
        let (r, timing) = sync_to(laptop, peer, server.addr).await?;
        ensure!(r.stats.cases_received.len() == CHANGED_EACH_SIDE);
        changed_row.direct.push(timing);
        changed_row.direct_session = session_bytes(&r);
    }

    // Row 3: nothing changed.
    let (r, rtt, rtt_wire) = sync_via_relay(laptop, peer, server.addr, rtt_profile()).await?;
    ensure!(r.stats.cases_sent.is_empty() && r.stats.cases_received.is_empty());
    let mut idle_row = Reconnect {
        rtt,
        rtt_session: session_bytes(&r),
        rtt_wire,
        rtt_case_messages: r.stats.case_messages_sent + r.stats.case_messages_received,
        direct: vec![],
        direct_session: 0,
    };
    for _ in 0..3 {
        let (r, timing) = sync_to(laptop, peer, server.addr).await?;
        idle_row.direct.push(timing);
        idle_row.direct_session = session_bytes(&r);
    }
    server.stop().await;
    Ok((changed_row, idle_row))
}

/// Row 4: latencies in ms, sorted.
async fn live_push(center: &Path, laptop: &Path, peer: &PeerRow, n: usize) -> Result<Vec<f64>> {
    let all = codes(center, n)?;
    let server = InProcServer::start(center)?;
    let mut peer = peer.clone();
    peer.addr = Some(server.addr.to_string());
    let (_tx, rx) = tokio::sync::broadcast::channel::<String>(1024);
    let home = laptop.to_path_buf();
    let session = tokio::spawn(async move {
        let opts = SyncOptions {
            live: true,
            changes: Some(rx),
            ..quiet_sync_options()
        };
        net::sync_with(&home, &peer, opts).await
    });
    let center = center.to_path_buf();
    let laptop = laptop.to_path_buf();
    // Blocking edits and polling on a plain thread; the runtime's workers
    // run the server and the laptop's session.
    let lat = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        let mut node = Node::open(&center)?;
        let center_store = open_store(&center)?;
        let laptop_store = open_store(&laptop)?;
        let mut lat = Vec::new();
        let warmup = 10;
        for (k, code) in all.iter().rev().take(LIVE_EDITS + warmup).enumerate() {
            let t0 = Instant::now();
            node.update(code, |doc, author, now| {
                case::set_field(doc, "assignee", &format!("can bo truc {k}"), author, now)
            })?;
            let want = center_store
                .case_heads(code)?
                .ok_or_else(|| anyhow!("no case {code}"))?;
            let deadline = t0 + Duration::from_secs(10);
            loop {
                match laptop_store.case_heads(code) {
                    Ok(Some(h)) if h == want => break,
                    Ok(_) | Err(StoreError::Busy { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                if Instant::now() > deadline {
                    bail!("edit {k} of {code} did not reach the laptop in 10 s");
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if k >= warmup {
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(lat)
    })
    .await??;
    session.abort();
    let _ = session.await;
    server.stop().await;
    let mut lat = lat;
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

struct Crowd {
    center_rss: u64,
    /// Center RSS sampled every second.
    samples: Vec<u64>,
    laptop_rss: Vec<u64>,
    /// Cases each laptop held when the row ended.
    received: Vec<u64>,
    /// All syncs finished (else cut at `limit`).
    finished: bool,
    wall: Duration,
}

/// Row 5: a `serve` process with `fx.n` cases while three empty laptops
/// (`sync` processes) first-sync at once, cut after `limit` (a 100,000-case
/// first sync runs for many minutes at one commit per case).
fn crowd(fx: &Fixture, work: &Path, limit: Duration) -> Result<Crowd> {
    let center = work.join("center");
    copy_home(&fx.center, &center)?;
    let mut laptops = Vec::new();
    for k in 0..LAPTOPS {
        laptops.push(new_laptop(work, &format!("laptop-{k}"), &center)?);
    }
    let serve = ServeProc::start(&center)?;
    for (home, peer) in &laptops {
        Node::open(home)?.add_peer(&peer.node_id, "center", Some(&serve.addr.to_string()))?;
    }
    let t0 = Instant::now();
    let mut pids = Vec::new();
    for (home, _) in &laptops {
        let child = Command::new(bin())
            .arg("--home")
            .arg(home)
            .args(["sync", "center"])
            .env_remove("FIELDCASE_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start sync")?;
        pids.push(Some(child.id() as libc::pid_t));
    }
    let mut laptop_rss = vec![0; LAPTOPS];
    let mut samples = Vec::new();
    let mut next_sample = t0;
    while pids.iter().any(Option::is_some) && t0.elapsed() < limit {
        for (k, slot) in pids.iter_mut().enumerate() {
            if let Some(pid) = *slot {
                let mut status = 0;
                // SAFETY: plain data filled by wait4 for our own child.
                let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
                let rc = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
                if rc == pid {
                    ensure!(
                        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                        "laptop {k} sync failed ({status})"
                    );
                    laptop_rss[k] = usage.ru_maxrss.max(0) as u64 * 1024;
                    *slot = None;
                }
            }
        }
        if Instant::now() >= next_sample {
            samples.push(vm_rss(serve.pid)?);
            next_sample += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed();
    let center_rss = serve.vm_hwm()?;
    let finished = pids.iter().all(Option::is_none);
    for (k, slot) in pids.iter_mut().enumerate() {
        if let Some(pid) = slot.take() {
            laptop_rss[k] = vm_hwm(pid).unwrap_or(0);
            // SAFETY: kill(2) on our own child, reaped just below.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait4(pid);
        }
    }
    serve.stop()?;
    let received = laptops
        .iter()
        .map(|(home, _)| case_count(home))
        .collect::<Result<Vec<_>>>()?;
    Ok(Crowd {
        center_rss,
        samples,
        laptop_rss,
        received,
        finished,
        wall,
    })
}

fn vm_rss(pid: libc::pid_t) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?
        .parse()?;
    Ok(kb * 1024)
}

// ---------------------------------------------------------------- output

fn mb(b: u64) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

fn kb(b: u64) -> String {
    if b >= 100_000 {
        format!("{:.1} MB", b as f64 / 1e6)
    } else {
        format!("{:.1} KB", b as f64 / 1e3)
    }
}

fn ms(d: Duration) -> String {
    let m = d.as_secs_f64() * 1e3;
    if m >= 10_000.0 {
        format!("{:.1} s", m / 1e3)
    } else {
        format!("{m:.0} ms")
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    format!("{date}, {nproc} cores (nproc), {cpu}; load average {load} when the run began (other work shares this machine)")
}

fn reconnect_cells(n: usize, r: &Reconnect) -> String {
    let (rt_conv, rt_wall) = r.round_trips();
    let (d_conv, d_wall) = r.direct_median();
    format!(
        "N={n}: {rt_conv:.1} RTT to converged / {rt_wall:.1} RTT until closed ({} / {} at {} ms RTT); direct loopback {} converged / {} closed (median of 3); session {}, UDP {} ({} up / {} down); {} per-case messages",
        ms(r.rtt.converged.unwrap_or_default()),
        ms(r.rtt.wall),
        RTT.as_millis(),
        ms(d_conv),
        ms(d_wall),
        kb(r.rtt_session),
        kb(r.rtt_wire.total()),
        kb(r.rtt_wire.up),
        kb(r.rtt_wire.down),
        r.rtt_case_messages
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--crowd-secs S`: how long row 5 runs before it is cut (default 120);
    // `--crowd-secs 0` runs the three first syncs to the end.
    let crowd_limit = match args.iter().position(|a| a == "--crowd-secs") {
        Some(k) => {
            let secs: u64 = args
                .get(k + 1)
                .ok_or_else(|| anyhow!("--crowd-secs S"))?
                .parse()?;
            if secs == 0 {
                Duration::from_secs(24 * 3600)
            } else {
                Duration::from_secs(secs)
            }
        }
        None => Duration::from_secs(120),
    };
    let header = machine();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let scratch = target_dir().join("bench-fixtures").join("scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let work = tempfile::Builder::new()
        .prefix("sync-scale-")
        .tempdir_in(&scratch)?;

    let small = fixture(10_000)?;
    let big = if quick { None } else { Some(fixture(100_000)?) };
    if args.iter().any(|a| a == "--fixtures-only") {
        eprintln!("fixtures ready");
        return Ok(());
    }
    let started = Instant::now();

    eprintln!("row 1: first sync of {} cases ...", small.n);
    let w1 = work.path().join("first");
    let (first, laptop, peer) = rt.block_on(first_sync(&small, &w1))?;
    let center_small = w1.join("center");
    eprintln!("rows 2-3: reconnects at {} ...", small.n);
    let (changed_small, idle_small) =
        rt.block_on(reconnects(&center_small, &laptop, &peer, small.n))?;
    eprintln!("row 4: live push ...");
    let lat = rt.block_on(live_push(&center_small, &laptop, &peer, small.n))?;

    let mut big_rows = None;
    if let Some(big) = &big {
        let (laptop_fx, _) = paired_laptop(big)?;
        eprintln!(
            "row 5: {LAPTOPS} laptops first-syncing {} cases at once (cut after {} s) ...",
            big.n,
            crowd_limit.as_secs()
        );
        let crowd = crowd(big, &work.path().join("crowd"), crowd_limit)?;
        eprintln!("rows 2-3: reconnects at {} ...", big.n);
        let w = work.path().join("big");
        let center = w.join("center");
        let laptop = w.join("laptop");
        copy_home(&big.center, &center)?;
        copy_home(&laptop_fx, &laptop)?;
        let peer = Node::open(&laptop)?.peer("center")?;
        let (c, i) = rt.block_on(reconnects(&center, &laptop, &peer, big.n))?;
        big_rows = Some((crowd, c, i));
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());

    // ------------------------------------------------------------ table
    let median = lat[lat.len() / 2];
    let p99 = lat[((lat.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
    println!("\n## fieldcase sync at scale\n");
    println!("{header}\n");
    println!(
        "Cases: all six procedures, {:.1} changes and {:.1} fields each on average; saved size {:.0} bytes each on average. Stores are SQLite with synchronous=FULL; QUIC on loopback.\n",
        small.changes_per_case,
        small.fields_per_case,
        small.saved_bytes as f64 / small.n as f64
    );
    println!("| # | figure | measured | goal | verdict |");
    println!("|---|---|---|---|---|");
    let ratio_udp = first.wire_inproc.total() as f64 / first.saved as f64;
    let ratio_session = first.session as f64 / first.saved as f64;
    println!(
        "| 1 | first sync, {} cases, center -> empty laptop | processes (`serve` + `sync`): {} wall; in-process: {} wall ({} to converged), UDP {} ({} up / {} down) = {:.2}x saved sizes ({}), session {} = {:.2}x, {} per-case messages; peak RSS center {}, laptop {}; CPU time center {:.1} s, laptop {:.1} s (processes), {:.1} s both in-process | <= 2 s; <= 1.3x saved sizes | time {}, bytes {} |",
        small.n,
        ms(first.proc_wall),
        ms(first.inproc.wall),
        ms(first.inproc.converged.unwrap_or_default()),
        kb(first.wire_inproc.total()),
        kb(first.wire_inproc.up),
        kb(first.wire_inproc.down),
        ratio_udp,
        kb(first.saved),
        kb(first.session),
        ratio_session,
        first.case_messages,
        mb(first.center_rss),
        mb(first.laptop_rss),
        first.center_cpu.as_secs_f64(),
        first.laptop_cpu.as_secs_f64(),
        first.inproc_cpu.as_secs_f64(),
        verdict(first.proc_wall.as_secs_f64() <= 2.0 && first.inproc.wall.as_secs_f64() <= 2.0),
        verdict(ratio_udp <= 1.3),
    );
    let mut changed = vec![(small.n, &changed_small)];
    let mut idle = vec![(small.n, &idle_small)];
    if let Some((_, c, i)) = &big_rows {
        changed.push((big.as_ref().map_or(0, |b| b.n), c));
        idle.push((big.as_ref().map_or(0, |b| b.n), i));
    }
    let ok2 = changed.iter().all(|(_, r)| {
        r.direct_median().1 <= Duration::from_millis(50) && r.rtt_wire.total() <= 10_000
    });
    println!(
        "| 2 | reconnect, {CHANGED_EACH_SIDE} cases changed on each side | {} | <= 50 ms and <= 10 KB, same for 10k and 100k | {} |",
        changed
            .iter()
            .map(|(n, r)| reconnect_cells(*n, r))
            .collect::<Vec<_>>()
            .join("<br>"),
        verdict(ok2)
    );
    let ok3 = idle
        .iter()
        .all(|(_, r)| r.round_trips().1 <= 2.5 && r.rtt_wire.total() <= 2_000);
    println!(
        "| 3 | reconnect, nothing changed | {} | <= 2 round trips, <= 2 KB | {} |",
        idle.iter()
            .map(|(n, r)| reconnect_cells(*n, r))
            .collect::<Vec<_>>()
            .join("<br>"),
        verdict(ok3)
    );
    println!(
        "| 4 | live push, edit committed at center -> committed at laptop, {} edits | median {:.1} ms, p99 {:.1} ms, max {:.1} ms | median <= 20 ms, p99 <= 100 ms | {} |",
        lat.len(),
        median,
        p99,
        lat[lat.len() - 1],
        verdict(median <= 20.0 && p99 <= 100.0)
    );
    match &big_rows {
        Some((crowd, _, _)) => {
            let n = big.as_ref().map_or(0, |b| b.n);
            let progress = if crowd.finished {
                format!("all three finished in {}", ms(crowd.wall))
            } else {
                format!(
                    "cut after {} with {} of {n} cases received by the laptops (a first sync of {n} did not finish in time)",
                    ms(crowd.wall),
                    crowd
                        .received
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(" / ")
                )
            };
            let trend = match (crowd.samples.get(1), crowd.samples.last()) {
                (Some(a), Some(b)) => {
                    format!("; center RSS {} at 1 s, {} at the end", mb(*a), mb(*b))
                }
                _ => String::new(),
            };
            println!(
                "| 5 | peak RSS of a `serve` process holding {n} cases while {LAPTOPS} empty laptops (`sync` processes) first-sync at once | center VmHWM {} (laptops {}); {progress}{trend} | <= 300 MB | {} |",
                mb(crowd.center_rss),
                crowd
                    .laptop_rss
                    .iter()
                    .map(|r| mb(*r))
                    .collect::<Vec<_>>()
                    .join(", "),
                if crowd.finished {
                    verdict(crowd.center_rss <= 300_000_000)
                } else if crowd.center_rss > 300_000_000 {
                    "**missed**"
                } else {
                    "within goal so far (run incomplete)"
                }
            )
        }
        None => println!("| 5 | (skipped with --quick) | | <= 300 MB | |"),
    }
    println!(
        "\nRTT figures go through a relay adding {} ms RTT (no loss, no cap); round trips = wall time / RTT, QUIC handshake included. UDP = datagram payload bytes through the relay, handshake included. Session = sync-protocol frame bytes both ways (`SessionStats`).",
        RTT.as_millis()
    );
    Ok(())
}
