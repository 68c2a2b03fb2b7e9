//! Crash story: power cuts at a commune service center and its two field
//! laptops, with the real `fieldcase` binary.
//!
//! The center ("center") runs `serve` on loopback QUIC and its staff write
//! through the CLI at the same time; the laptops ("laptop-dong",
//! "laptop-tay") take applications in their villages and sync with the
//! center. At seeded random moments a process is killed with SIGKILL:
//! - **during a write**: a `case new`, `note`, `set`, `doc`, `status` or
//!   `attach` on any of the three nodes;
//! - **during sync**: the laptop's `sync` client, the center's `serve`, or
//!   both, while a session moves cases and attachment bytes;
//! - **during compaction**: one case per node is hammered with notes until
//!   its next write is the one that folds 32 incremental chunks into a new
//!   snapshot, and that write is cut.
//!
//! After every kill:
//! - every store opens (`case list` succeeds) and passes
//!   `PRAGMA integrity_check`;
//! - every write the CLI acknowledged (its success line was printed) is
//!   still there: cases by code, notes by their unique text, field and
//!   checklist values, statuses, attachments (metadata and bytes); a write
//!   cut before its acknowledgement is either wholly there or wholly absent,
//!   and once seen it never goes away; nothing appears that was never
//!   attempted; no case a node held disappears from it;
//! - a cut compaction leaves either the 32 chunks (write rolled back) or
//!   none (write and snapshot committed), never anything else;
//! - the killed server is restarted, and a following sync between the
//!   laptop and the center succeeds and converges: identical heads for
//!   every case, identical `case show --json` for the cases written since.
//!
//! Every few kill points (and at the end) all three nodes sync and must be
//! identical (the whole `case list --json` and `case show --json` of every
//! case), and the model is checked against that state in full.
//!
//! Each field, checklist item and status has one writing node, so values
//! never conflict and "the value is the last acknowledged write or a later
//! cut one" is exact. The seed fixes the schedule (operations, victims and
//! cut delays); where inside the program a cut lands still depends on the
//! machine, so the test counts and prints where kills landed.
//!
//! Normal runs cut [`CI_KILL_POINTS`] times; the soak sets
//! `FIELDCASE_CRASH_KILL_POINTS=N`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use fieldcase_node::store::COMPACT_THRESHOLD;
use fieldcase_tests::crash::{self, Ended, Proc};
use fieldcase_tests::{seeded_rng, Node, Server};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

const DEFAULT_SEED: u64 = 0x7e11_d0e5;

/// Kill points in the normal suite.
const CI_KILL_POINTS: usize = 30;

/// A full three-node convergence check every this many kill points.
const FULL_CHECK_EVERY: usize = 15;

/// A server killed mid-session leaves its client waiting for the QUIC idle
/// timeout; after this grace the client is cut too.
const CLIENT_GRACE: Duration = Duration::from_millis(500);

const CENTER: usize = 0;
const DONG: usize = 1;
const TAY: usize = 2;
const NAMES: [&str; 3] = ["center", "laptop-dong", "laptop-tay"];
const ROLES: [&str; 3] = ["center", "field", "field"];
const VILLAGES: [&str; 3] = ["Xa Trung Tam", "Thon Dong", "Thon Tay"];

/// The fields each node writes (and nobody else does).
const FIELDS: [[&str; 2]; 3] = [
    ["assignee", "document-language"],
    ["phone", "document-title"],
    ["id-number", "copies-count"],
];

/// The checklist item each node marks.
const DOC_ITEM: [&str; 3] = ["id-card", "original-document", "copies"];
const DOC_STATES: [&str; 3] = ["received", "missing", "invalid"];

/// Only laptop-dong photographs documents, onto this item.
const ATTACH_ITEM: &str = "signed-document";

/// When to SIGKILL a process.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// This long after it started.
    At(Duration),
    /// This long after its store's write-ahead log first changes.
    OnWal(Duration),
}

/// What became of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// The CLI printed its success line.
    Acked,
    /// Cut before acknowledging; not yet looked for.
    Unknown,
    /// Cut before acknowledging, and found in the store afterwards.
    Committed,
    /// Cut before acknowledging, and not in the store afterwards.
    Absent,
}

impl Fate {
    fn durable(self) -> bool {
        matches!(self, Fate::Acked | Fate::Committed)
    }
}

#[derive(Debug)]
struct CaseRec {
    author: usize,
    code: Option<String>,
    fate: Fate,
}

/// A note (by its unique text) or an attachment (by its unique file name).
#[derive(Debug)]
struct ItemRec {
    author: usize,
    code: String,
    fate: Fate,
}

/// A field, checklist item or status of one case, written by one node.
#[derive(Debug)]
struct Register {
    owner: usize,
    /// The last acknowledged or observed value.
    value: String,
    /// A cut write after it, not yet resolved.
    pending: Option<String>,
}

#[derive(Debug, Clone)]
enum Op {
    New {
        applicant: String,
        village: String,
    },
    Note {
        code: String,
        text: String,
    },
    Set {
        code: String,
        field: String,
        value: String,
    },
    Doc {
        code: String,
        item: String,
        state: String,
    },
    Status {
        code: String,
        to: String,
    },
    Attach {
        code: String,
        file: PathBuf,
        name: String,
    },
}

impl Op {
    fn args(&self) -> Vec<String> {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            Op::New { applicant, village } => v(&[
                "case",
                "new",
                "--procedure",
                "certification",
                "--applicant",
                applicant,
                "--village",
                village,
            ]),
            Op::Note { code, text } => v(&["case", "note", code, text]),
            Op::Set { code, field, value } => v(&["case", "set", code, field, value]),
            Op::Doc { code, item, state } => v(&["case", "doc", code, item, state]),
            Op::Status { code, to } => v(&["case", "status", code, to]),
            Op::Attach { code, file, .. } => v(&[
                "case",
                "attach",
                code,
                ATTACH_ITEM,
                file.to_str().expect("utf-8 temp path"),
            ]),
        }
    }

    /// The line that acknowledges the write, once printed.
    fn ack(&self, stdout: &str) -> bool {
        let has = |l: String| stdout.lines().any(|x| x.trim() == l);
        match self {
            Op::New { .. } => stdout.lines().any(|l| is_code(l.trim())),
            Op::Note { code, .. } => has(format!("{code}: note added")),
            Op::Set { code, field, value } => has(format!("{code}: {field} = {value}")),
            Op::Doc { code, item, state } => has(format!("{code}: {item} marked {state}")),
            Op::Status { code, to } => has(format!("{code}: status is now {to}")),
            Op::Attach { code, name, .. } => stdout
                .lines()
                .any(|l| l.starts_with(&format!("{code}: attached {name} ("))),
        }
    }

    fn code(&self) -> Option<&str> {
        match self {
            Op::New { .. } => None,
            Op::Note { code, .. }
            | Op::Set { code, .. }
            | Op::Doc { code, .. }
            | Op::Status { code, .. }
            | Op::Attach { code, .. } => Some(code),
        }
    }
}

/// `FS2ZD8-000001`: six node characters, a dash, six digits.
fn is_code(s: &str) -> bool {
    let Some((a, b)) = s.split_once('-') else {
        return false;
    };
    a.len() == 6
        && a.chars().all(|c| c.is_ascii_alphanumeric())
        && b.len() == 6
        && b.chars().all(|c| c.is_ascii_digit())
}

fn register_value(view: &Value, key: &str) -> String {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match key.split_once(':') {
        Some(("field", "phone")) => s(&view["applicant"]["phone"]),
        Some(("field", "id-number")) => s(&view["applicant"]["id_number"]),
        Some(("field", "assignee")) => s(&view["assignee"]),
        Some(("field", f)) => s(&view["fields"][f]),
        Some(("doc", item)) => view["checklist"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["item"] == item))
            .map(|c| s(&c["state"]))
            .unwrap_or_default(),
        _ => s(&view["status"]),
    }
}

fn initial_value(key: &str) -> &'static str {
    if key.starts_with("doc:") {
        "missing"
    } else if key == "status" {
        "received"
    } else {
        ""
    }
}

#[derive(Default, Debug)]
struct Counts {
    kill_points: usize,
    write_kills: usize,
    sync_kills: usize,
    compaction_kills: usize,
    sync_client: usize,
    sync_server: usize,
    sync_both: usize,
    client_cut_after_server: usize,
    finished_before_cut: usize,
    wal_triggered: usize,
    killed_after_ack: usize,
    acked: usize,
    cut_committed: usize,
    cut_absent: usize,
    compactions_committed: usize,
    compactions_rolled_back: usize,
    full_checks: usize,
    checks: usize,
}

/// The three nodes, the running server, and what was written.
struct World {
    rng: ChaCha8Rng,
    nodes: Vec<Node>,
    server: Option<Server>,
    files: tempfile::TempDir,
    /// By applicant name (unique per attempt).
    cases: BTreeMap<String, CaseRec>,
    /// By note text (unique per attempt).
    notes: BTreeMap<String, ItemRec>,
    /// By attachment file name (unique per attempt, unique content).
    attachments: BTreeMap<String, ItemRec>,
    /// By (code, key).
    registers: BTreeMap<(String, String), Register>,
    /// Codes each node holds; never shrinks.
    known: [BTreeSet<String>; 3],
    /// Codes written since each laptop last compared with the center.
    dirty: [BTreeSet<String>; 3],
    /// One case per node, hammered with notes to force compactions.
    book: [String; 3],
    /// Typical durations (ms) of an uncut write and an uncut sync.
    write_ms: f64,
    sync_ms: f64,
    next: usize,
    counts: Counts,
}

impl World {
    fn setup(rng: ChaCha8Rng) -> Result<World> {
        let nodes = (0..3)
            .map(|i| Node::init(NAMES[i], ROLES[i]))
            .collect::<Result<Vec<_>>>()?;
        nodes[CENTER].trust(&nodes[DONG], None)?;
        nodes[CENTER].trust(&nodes[TAY], None)?;
        let mut w = World {
            rng,
            nodes,
            server: None,
            files: tempfile::Builder::new()
                .prefix("fieldcase-crash-files-")
                .tempdir()?,
            cases: BTreeMap::new(),
            notes: BTreeMap::new(),
            attachments: BTreeMap::new(),
            registers: BTreeMap::new(),
            known: Default::default(),
            dirty: Default::default(),
            book: Default::default(),
            write_ms: 30.0,
            sync_ms: 150.0,
            next: 0,
            counts: Counts::default(),
        };
        w.start_server()?;
        for n in 0..3 {
            let op = w.new_case_op(n);
            w.write(n, op.clone(), None)?;
            let code = w.code_of(&op).expect("acknowledged");
            w.book[n] = code;
        }
        Ok(w)
    }

    fn start_server(&mut self) -> Result<()> {
        let server = self.nodes[CENTER].serve()?;
        for l in [DONG, TAY] {
            self.nodes[l].trust(&self.nodes[CENTER], Some(server.addr()))?;
        }
        self.server = Some(server);
        Ok(())
    }

    fn n(&mut self) -> usize {
        self.next += 1;
        self.next
    }

    fn code_of(&self, op: &Op) -> Option<String> {
        match op {
            Op::New { applicant, .. } => self.cases[applicant].code.clone(),
            other => other.code().map(str::to_string),
        }
    }

    fn new_case_op(&mut self, node: usize) -> Op {
        let n = self.n();
        Op::New {
            applicant: format!("Applicant {} {n}", NAMES[node]),
            village: VILLAGES[node].to_string(),
        }
    }

    /// A random write `node` may make on a case it holds (not a book, whose
    /// chunk count the compaction kills manage).
    fn random_op(&mut self, node: usize) -> Result<Op> {
        let codes: Vec<String> = self.known[node]
            .iter()
            .filter(|c| !self.book.contains(c))
            .cloned()
            .collect();
        if codes.is_empty() {
            return Ok(self.new_case_op(node));
        }
        let code = codes[self.rng.random_range(0..codes.len())].clone();
        let n = self.n();
        let roll = self.rng.random_range(0..100);
        let op = match roll {
            0..=14 => self.new_case_op(node),
            15..=49 => Op::Note {
                code,
                text: format!("{} note {n}: papers checked", NAMES[node]),
            },
            50..=69 => {
                let field = FIELDS[node][self.rng.random_range(0..2)].to_string();
                let value = match field.as_str() {
                    "phone" => format!("0912 {n:06}"),
                    "id-number" => format!("0790{n:08}"),
                    "copies-count" => format!("{n}"),
                    other => format!("{other} {n}"),
                };
                Op::Set { code, field, value }
            }
            70..=84 => {
                let item = DOC_ITEM[node].to_string();
                let now = self.current(&code, &format!("doc:{item}"));
                let others: Vec<&str> = DOC_STATES.iter().copied().filter(|s| *s != now).collect();
                let state = others[self.rng.random_range(0..others.len())].to_string();
                Op::Doc { code, item, state }
            }
            _ if node == CENTER && self.current(&code, "status") == "received" => Op::Status {
                code,
                to: "needs-documents".into(),
            },
            _ if node == DONG => {
                let name = format!("scan-{n:05}.txt");
                let file = self.files.path().join(&name);
                let body = format!("signed document photographed by laptop-dong, scan {n}\n")
                    .repeat(self.rng.random_range(1..200));
                std::fs::write(&file, body)?;
                Op::Attach { code, file, name }
            }
            _ => Op::Note {
                code,
                text: format!("{} note {n}: applicant called", NAMES[node]),
            },
        };
        Ok(op)
    }

    /// The resolved value of a register (its initial value if never
    /// written).
    fn current(&self, code: &str, key: &str) -> String {
        self.registers
            .get(&(code.to_string(), key.to_string()))
            .map(|r| r.value.clone())
            .unwrap_or_else(|| initial_value(key).to_string())
    }

    /// Runs a write on `node`, cut `cut` after its start if given. Records
    /// the attempt and its fate (Unknown if cut before acknowledging).
    /// Returns how the process ended.
    fn write(&mut self, node: usize, op: Op, cut: Option<Cut>) -> Result<Ended> {
        // Record the attempt first: whatever happens, it was attempted.
        match &op {
            Op::New { applicant, .. } => {
                self.cases.insert(
                    applicant.clone(),
                    CaseRec {
                        author: node,
                        code: None,
                        fate: Fate::Unknown,
                    },
                );
            }
            Op::Note { code, text } => {
                self.notes.insert(
                    text.clone(),
                    ItemRec {
                        author: node,
                        code: code.clone(),
                        fate: Fate::Unknown,
                    },
                );
            }
            Op::Attach { code, name, .. } => {
                self.attachments.insert(
                    name.clone(),
                    ItemRec {
                        author: node,
                        code: code.clone(),
                        fate: Fate::Unknown,
                    },
                );
            }
            _ => {}
        }
        let args = op.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let wal = crash::wal_path(self.nodes[node].home());
        let before = crash::stamp(&wal);
        let mut proc = Proc::start(self.nodes[node].command(&args))?;
        let ended = match cut {
            Some(Cut::At(at)) => proc.kill_at(at)?,
            Some(Cut::OnWal(then)) => {
                if proc.wait_for_change(&wal, before)? {
                    std::thread::sleep(then);
                }
                proc.kill_now()?
            }
            None => proc.wait()?,
        };
        if ended.killed && matches!(cut, Some(Cut::OnWal(_))) {
            self.counts.wal_triggered += 1;
        }

        let out = &ended.output;
        let acked = op.ack(&out.stdout);
        if ended.killed && acked {
            self.counts.killed_after_ack += 1;
        }
        if !ended.killed {
            // A write that ran to its end must have succeeded.
            ensure!(
                out.success() && acked,
                "{}: `{}` failed without being cut:\n{}",
                NAMES[node],
                out.cmd,
                out.describe()
            );
            self.write_ms = 0.8 * self.write_ms + 0.2 * ended.elapsed.as_secs_f64() * 1000.0;
        }
        if acked {
            self.counts.acked += 1;
        }
        let fate = if acked { Fate::Acked } else { Fate::Unknown };
        match &op {
            Op::New { applicant, .. } => {
                let rec = self.cases.get_mut(applicant).expect("recorded");
                rec.fate = fate;
                if acked {
                    let code = out
                        .stdout
                        .lines()
                        .map(str::trim)
                        .find(|l| is_code(l))
                        .expect("ack has a code")
                        .to_string();
                    rec.code = Some(code.clone());
                    self.known[node].insert(code.clone());
                    self.touch(&code);
                }
            }
            Op::Note { text, code } => {
                self.notes.get_mut(text).expect("recorded").fate = fate;
                self.touch(code);
            }
            Op::Attach { name, code, .. } => {
                self.attachments.get_mut(name).expect("recorded").fate = fate;
                self.touch(code);
            }
            Op::Set { code, field, value } => {
                self.set_register(node, code, &format!("field:{field}"), value, acked);
            }
            Op::Doc { code, item, state } => {
                self.set_register(node, code, &format!("doc:{item}"), state, acked);
            }
            Op::Status { code, to } => self.set_register(node, code, "status", to, acked),
        }
        Ok(ended)
    }

    fn touch(&mut self, code: &str) {
        for d in &mut self.dirty {
            d.insert(code.to_string());
        }
    }

    fn set_register(&mut self, node: usize, code: &str, key: &str, value: &str, acked: bool) {
        let r = self
            .registers
            .entry((code.to_string(), key.to_string()))
            .or_insert_with(|| Register {
                owner: node,
                value: initial_value(key).to_string(),
                pending: None,
            });
        assert_eq!(r.owner, node, "{key} of {code} has one writer");
        if acked {
            r.value = value.to_string();
            r.pending = None;
        } else {
            r.pending = Some(value.to_string());
        }
        self.touch(code);
    }

    // ----- checks --------------------------------------------------------

    /// The store of `node` opens and passes the integrity check; every case
    /// it held is still there, every case in it was attempted, and cut
    /// `case new`s by `node` are resolved. Returns its codes.
    fn check_store(&mut self, node: usize) -> Result<BTreeSet<String>> {
        let list = self.nodes[node]
            .list_json()
            .with_context(|| format!("{}: the store does not open", NAMES[node]))?;
        crash::integrity_check(self.nodes[node].home())
            .with_context(|| format!("{}: integrity", NAMES[node]))?;
        let mut codes = BTreeSet::new();
        let mut by_applicant = BTreeMap::new();
        for row in list.as_array().expect("array") {
            let code = row["code"].as_str().unwrap_or_default().to_string();
            let applicant = row["applicant"].as_str().unwrap_or_default().to_string();
            let Some(rec) = self.cases.get(&applicant) else {
                bail!(
                    "{}: case {code} of '{applicant}' was never attempted",
                    NAMES[node]
                );
            };
            ensure!(
                rec.fate != Fate::Absent,
                "{}: case {code} of '{applicant}' was resolved absent after its cut but is back",
                NAMES[node]
            );
            if let Some(c) = &rec.code {
                ensure!(
                    c == &code,
                    "{}: '{applicant}' is case {code}, acknowledged as {c}",
                    NAMES[node]
                );
            }
            ensure!(
                by_applicant
                    .insert(applicant.clone(), code.clone())
                    .is_none(),
                "{}: '{applicant}' has two cases",
                NAMES[node]
            );
            codes.insert(code);
        }
        // Resolve cut `case new`s of this node and require its durable ones.
        for (applicant, rec) in self.cases.iter_mut() {
            if rec.author != node {
                continue;
            }
            match (rec.fate, by_applicant.get(applicant)) {
                (Fate::Unknown, Some(code)) => {
                    rec.fate = Fate::Committed;
                    rec.code = Some(code.clone());
                    self.counts.cut_committed += 1;
                    for d in &mut self.dirty {
                        d.insert(code.clone());
                    }
                }
                (Fate::Unknown, None) => {
                    rec.fate = Fate::Absent;
                    self.counts.cut_absent += 1;
                }
                (f, None) if f.durable() => bail!(
                    "{}: LOST {f:?} case of '{applicant}' ({:?})",
                    NAMES[node],
                    rec.code
                ),
                _ => {}
            }
        }
        let lost: Vec<&String> = self.known[node].difference(&codes).collect();
        ensure!(
            lost.is_empty(),
            "{}: cases it held are gone: {lost:?}",
            NAMES[node]
        );
        self.known[node] = codes.clone();
        self.counts.checks += 1;
        Ok(codes)
    }

    /// Checks one case as `node` shows it: everything in it was attempted
    /// on this case and not resolved absent; every durable write by a node
    /// in `authors` is there, with cut writes by them resolved; registers
    /// owned by `authors` hold their last durable value (or a later cut
    /// one, which then becomes the value).
    fn check_case(&mut self, node: usize, view: &Value, authors: &[usize]) -> Result<()> {
        let code = view["code"].as_str().unwrap_or_default().to_string();
        let who = NAMES[node];
        let texts = |list: &str, key: &str| -> BTreeSet<String> {
            view[list]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| n[key].as_str().unwrap_or_default().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        for (what, present, model) in [
            ("note", texts("notes", "text"), &mut self.notes),
            (
                "attachment",
                texts("attachments", "name"),
                &mut self.attachments,
            ),
        ] {
            for p in &present {
                let Some(rec) = model.get(p) else {
                    bail!("{who}: {code} shows {what} '{p}' that was never attempted");
                };
                ensure!(
                    rec.code == code,
                    "{who}: {what} '{p}' was written on {} but shows on {code}",
                    rec.code
                );
                ensure!(
                    rec.fate != Fate::Absent,
                    "{who}: {code}: {what} '{p}' was resolved absent after its cut but is back"
                );
            }
            for (key, rec) in model.iter_mut() {
                if rec.code != code || !authors.contains(&rec.author) {
                    continue;
                }
                match (rec.fate, present.contains(key)) {
                    (Fate::Unknown, true) => {
                        rec.fate = Fate::Committed;
                        self.counts.cut_committed += 1;
                    }
                    (Fate::Unknown, false) => {
                        ensure!(
                            rec.author == node,
                            "{who}: cut {what} '{key}' of {} resolved on another node",
                            NAMES[rec.author]
                        );
                        rec.fate = Fate::Absent;
                        self.counts.cut_absent += 1;
                    }
                    (f, false) if f.durable() => {
                        bail!(
                            "{who}: {code}: LOST {f:?} {what} '{key}' by {}",
                            NAMES[rec.author]
                        )
                    }
                    _ => {}
                }
            }
        }
        for ((c, key), r) in self.registers.iter_mut() {
            if c != &code || !authors.contains(&r.owner) {
                continue;
            }
            let seen = register_value(view, key);
            if seen == r.value && r.pending.as_deref() != Some(&seen) {
                if r.pending.take().is_some() {
                    self.counts.cut_absent += 1;
                }
            } else if r.pending.as_deref() == Some(&seen) {
                r.value = seen;
                r.pending = None;
                self.counts.cut_committed += 1;
            } else {
                bail!(
                    "{who}: {code}: {key} is '{seen}' but the last durable write by {} was '{}' \
                     (cut write after it: {:?})",
                    NAMES[r.owner],
                    r.value,
                    r.pending
                );
            }
        }
        Ok(())
    }

    /// After a kill: restart the server if it died, check every store,
    /// check the cases `touched` as `writer` holds them, then sync `laptop`
    /// with the center and compare.
    fn after_kill(
        &mut self,
        writer: Option<usize>,
        touched: Option<String>,
        laptop: usize,
    ) -> Result<()> {
        let server_dead = match self.server.as_mut() {
            Some(s) => !s.is_running(),
            None => true,
        };
        if server_dead {
            self.server = None;
        }
        for n in 0..3 {
            self.check_store(n)?;
        }
        if let (Some(w), Some(code)) = (writer, touched) {
            if self.known[w].contains(&code) {
                let view = self.nodes[w].show_json(&code)?;
                self.check_case(w, &view, &[w])?;
            }
        }
        if self.server.is_none() {
            self.start_server()?;
        }
        self.converge_pair(laptop)
    }

    /// `laptop` syncs with the center; both must then hold identical heads
    /// for every case and identical views of the cases written since they
    /// last compared.
    fn converge_pair(&mut self, laptop: usize) -> Result<()> {
        let started = std::time::Instant::now();
        self.nodes[laptop]
            .sync_ok("center")
            .with_context(|| format!("{} could not sync after the kill", NAMES[laptop]))?;
        self.sync_ms = 0.8 * self.sync_ms + 0.2 * started.elapsed().as_secs_f64() * 1000.0;
        let a = crash::stored_heads(self.nodes[laptop].home())?;
        let b = crash::stored_heads(self.nodes[CENTER].home())?;
        if a != b {
            let differ: Vec<&String> = a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .collect();
            bail!(
                "{} and center differ after a successful sync on {differ:?}",
                NAMES[laptop]
            );
        }
        let dirty: Vec<String> = std::mem::take(&mut self.dirty[laptop])
            .into_iter()
            .collect();
        for code in dirty {
            if !b.contains_key(&code) {
                continue;
            }
            let va = self.nodes[laptop].show_json(&code)?;
            let vb = self.nodes[CENTER].show_json(&code)?;
            ensure!(
                va["heads"] == vb["heads"] && va == vb,
                "{code}: case show --json differs between {} and center after sync:\n{va}\n---\n{vb}",
                NAMES[laptop]
            );
            self.check_case(CENTER, &vb, &[CENTER, laptop])?;
        }
        for n in [laptop, CENTER] {
            self.known[n] = a.keys().cloned().collect();
        }
        Ok(())
    }

    /// All three nodes sync and must be identical; the whole model is
    /// checked against that state, attachment bytes included.
    fn full_check(&mut self) -> Result<()> {
        self.converge_pair(DONG)?;
        self.converge_pair(TAY)?;
        self.converge_pair(DONG)?;
        let snaps = self
            .nodes
            .iter()
            .map(|n| n.snapshot())
            .collect::<Result<Vec<_>>>()?;
        for (i, s) in snaps.iter().enumerate().skip(1) {
            ensure!(
                s.list == snaps[0].list,
                "case list --json differs between center and {}",
                NAMES[i]
            );
            for (code, v) in &snaps[0].cases {
                ensure!(
                    s.cases.get(code) == Some(v),
                    "{code}: case show --json differs between center and {}",
                    NAMES[i]
                );
            }
        }
        for n in 0..3 {
            self.check_store(n)?;
        }
        for v in snaps[0].cases.values() {
            self.check_case(CENTER, v, &[CENTER, DONG, TAY])?;
        }
        // Every durable write is in the converged state.
        for (applicant, rec) in &self.cases {
            if rec.fate.durable() {
                let code = rec.code.as_ref().expect("durable cases have codes");
                ensure!(
                    snaps[0].cases.contains_key(code),
                    "LOST {:?} case {code} of '{applicant}'",
                    rec.fate
                );
            }
            ensure!(
                rec.fate != Fate::Unknown,
                "case of '{applicant}' unresolved"
            );
        }
        for (what, model) in [("note", &self.notes), ("attachment", &self.attachments)] {
            for (k, rec) in model {
                ensure!(rec.fate != Fate::Unknown, "{what} '{k}' unresolved");
                ensure!(
                    !rec.fate.durable() || snaps[0].cases.contains_key(&rec.code),
                    "LOST case {} holding {what} '{k}'",
                    rec.code
                );
            }
        }
        // Attachment bytes: on every node, for every durable attachment.
        let with_files: BTreeSet<&String> = self
            .attachments
            .values()
            .filter(|r| r.fate.durable())
            .map(|r| &r.code)
            .collect();
        for code in with_files {
            for (i, node) in self.nodes.iter().enumerate() {
                for f in files_json(node, code)? {
                    ensure!(
                        f["local"] == "present",
                        "{}: {code}: attachment {} is {} after convergence",
                        NAMES[i],
                        f["name"],
                        f["local"]
                    );
                }
            }
        }
        self.counts.full_checks += 1;
        Ok(())
    }

    // ----- kill points -----------------------------------------------------

    /// Cuts one write on a random node. Returns whether the kill landed.
    fn kill_write(&mut self) -> Result<bool> {
        let node = self.rng.random_range(0..3);
        let op = self.random_op(node)?;
        let cut = self.choose_cut(self.write_ms);
        let ended = self.write(node, op.clone(), Some(cut))?;
        let touched = self.code_of(&op);
        let laptop = if node == CENTER {
            [DONG, TAY][self.rng.random_range(0..2)]
        } else {
            node
        };
        self.after_kill(Some(node), touched, laptop)?;
        if ended.killed {
            self.counts.write_kills += 1;
        }
        Ok(ended.killed)
    }

    /// Hammers the node's book case with notes until the next write
    /// compacts it, then cuts that write.
    fn kill_compaction(&mut self) -> Result<bool> {
        // The book closest to compacting (a rolled-back compaction leaves
        // it one write away); ties by the seed.
        let mut chunks = Vec::new();
        for n in 0..3 {
            chunks.push(crash::chunk_count(self.nodes[n].home(), &self.book[n])?);
        }
        let most = *chunks.iter().max().expect("three books");
        let candidates: Vec<usize> = (0..3).filter(|n| chunks[*n] == most).collect();
        let node = candidates[self.rng.random_range(0..candidates.len())];
        let code = self.book[node].clone();
        let home = self.nodes[node].home().to_path_buf();
        let mut hammer_ms = Vec::new();
        let mut bound = 0;
        while crash::chunk_count(&home, &code)? < COMPACT_THRESHOLD {
            let n = self.n();
            let op = Op::Note {
                code: code.clone(),
                text: format!("{} book entry {n}", NAMES[node]),
            };
            let ended = self.write(node, op, None)?;
            hammer_ms.push(ended.elapsed.as_secs_f64() * 1000.0);
            bound += 1;
            ensure!(
                bound <= 2 * COMPACT_THRESHOLD,
                "{}: {code} never reached {COMPACT_THRESHOLD} chunks",
                NAMES[node]
            );
        }
        ensure!(
            crash::chunk_count(&home, &code)? == COMPACT_THRESHOLD,
            "more than {COMPACT_THRESHOLD} chunks stored for {code}"
        );
        hammer_ms.sort_by(f64::total_cmp);
        let typical = hammer_ms
            .get(hammer_ms.len() / 2)
            .copied()
            .unwrap_or(self.write_ms);
        let cut = self.choose_cut(typical * 1.3);
        let n = self.n();
        let text = format!("{} book entry {n} (compacting)", NAMES[node]);
        let op = Op::Note {
            code: code.clone(),
            text: text.clone(),
        };
        let ended = self.write(node, op, Some(cut))?;
        // The cut compaction is all or nothing: the 32 chunks and no new
        // note, or no chunk and the note in the new snapshot.
        let chunks = crash::chunk_count(&home, &code)?;
        let view = self.nodes[node].show_json(&code)?;
        let has_note = view["notes"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["text"] == text.as_str()));
        match (chunks, has_note) {
            (0, true) if ended.killed => self.counts.compactions_committed += 1,
            (c, false) if c == COMPACT_THRESHOLD => self.counts.compactions_rolled_back += 1,
            (0, true) => {}
            (c, h) => bail!(
                "{}: {code} after a cut compaction: {c} chunks, compacting note present: {h}",
                NAMES[node]
            ),
        }
        let laptop = if node == CENTER {
            [DONG, TAY][self.rng.random_range(0..2)]
        } else {
            node
        };
        self.after_kill(Some(node), Some(code), laptop)?;
        if ended.killed {
            self.counts.compaction_kills += 1;
        }
        Ok(ended.killed)
    }

    /// Gives a laptop and the center something to exchange, then cuts the
    /// session: the client, the server, or both.
    fn kill_sync(&mut self) -> Result<bool> {
        let laptop = [DONG, TAY][self.rng.random_range(0..2)];
        for (node, max) in [(laptop, 3), (CENTER, 2)] {
            for _ in 0..self.rng.random_range(0..=max) {
                let op = self.random_op(node)?;
                self.write(node, op, None)?;
            }
        }
        let victim = self.rng.random_range(0..4);
        // Both at once are cut at a moment; one alone may be cut right as
        // its store takes a transaction from the session.
        let cut = match victim {
            3 => Cut::At(self.cut_delay(self.sync_ms, 0.0, 1.0)),
            _ => self.choose_cut(self.sync_ms),
        };
        let watched = if victim == 2 { CENTER } else { laptop };
        let wal = crash::wal_path(self.nodes[watched].home());
        let before = crash::stamp(&wal);
        let mut client = Proc::start(self.nodes[laptop].command(&["sync", "center"]))?;
        match cut {
            Cut::At(at) => {
                let left = at.saturating_sub(client.elapsed());
                std::thread::sleep(left);
            }
            Cut::OnWal(then) => {
                if client.wait_for_change(&wal, before)? {
                    std::thread::sleep(then);
                }
            }
        }
        let landed = match victim {
            // The laptop's lid closes.
            0 | 1 => {
                let ended = client.kill_now()?;
                if ended.killed {
                    self.counts.sync_client += 1;
                }
                ended.killed
            }
            // The center loses power (2), or both at once (3).
            _ => {
                let running = client.is_running();
                if let Some(s) = self.server.take() {
                    s.kill();
                }
                let ended = if victim == 3 {
                    client.kill_now()?
                } else {
                    let e = client.wait_or_kill(CLIENT_GRACE)?;
                    if e.killed {
                        self.counts.client_cut_after_server += 1;
                    }
                    e
                };
                if running {
                    if victim == 3 {
                        self.counts.sync_both += 1;
                    } else {
                        self.counts.sync_server += 1;
                    }
                }
                // A client that exits 0 must have printed its summary.
                ensure!(
                    !ended.output.success() || ended.output.stdout.contains("sync with center:"),
                    "sync reported success without a summary:\n{}",
                    ended.output.describe()
                );
                running
            }
        };
        self.after_kill(None, None, laptop)?;
        if landed {
            self.counts.sync_kills += 1;
            if matches!(cut, Cut::OnWal(_)) {
                self.counts.wal_triggered += 1;
            }
        }
        Ok(landed)
    }

    /// How to cut an operation that typically takes `typical_ms` uncut:
    /// 40 % at a uniform moment of the whole run (start-up, opening the
    /// store, loading), 20 % late in the run (around commit and
    /// acknowledgement), 40 % right when the process writes its store's
    /// write-ahead log: 0 to 6 ms after the log's first bytes, which with
    /// `synchronous=FULL` spans the synced log header, the transaction's
    /// frames and their sync, and the acknowledgement.
    fn choose_cut(&mut self, typical_ms: f64) -> Cut {
        match self.rng.random_range(0..5) {
            0 | 1 => Cut::At(self.cut_delay(typical_ms, 0.0, 0.9)),
            2 => Cut::At(self.cut_delay(typical_ms, 0.5, 1.05)),
            _ => Cut::OnWal(Duration::from_micros(self.rng.random_range(0..6000))),
        }
    }

    /// A moment between `lo` and `hi` times a typical run.
    fn cut_delay(&mut self, typical_ms: f64, lo: f64, hi: f64) -> Duration {
        let typical_us = (typical_ms * 1000.0).max(1000.0);
        let f = lo + (hi - lo) * self.rng.random_range(0.0..1.0);
        Duration::from_micros((typical_us * f) as u64)
    }
}

/// `case files CODE --json` (one object per attachment, with `local` =
/// `present`, `partial` or `missing`).
fn files_json(node: &Node, code: &str) -> Result<Vec<Value>> {
    let out = node.ok(&["case", "files", code, "--json"])?;
    let v: Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("case files --json is not JSON:\n{}", out.stdout))?;
    match v {
        Value::Array(a) => Ok(a),
        other => bail!("case files --json is not an array: {other}"),
    }
}

fn run(rng: ChaCha8Rng, kill_points: usize) -> Result<Counts> {
    let mut w = World::setup(rng)?;
    // Some shared history first, so every node holds every book.
    w.converge_pair(DONG)?;
    w.converge_pair(TAY)?;
    for n in 0..3 {
        for _ in 0..3 {
            let op = w.random_op(n)?;
            w.write(n, op, None)?;
        }
    }
    w.full_check()?;
    let mut attempts = 0;
    while w.counts.kill_points < kill_points {
        attempts += 1;
        ensure!(
            attempts <= kill_points * 4,
            "only {} of {attempts} cuts landed before the process finished",
            w.counts.kill_points
        );
        let roll = w.rng.random_range(0..100);
        let landed = match roll {
            0..=44 => w.kill_write()?,
            45..=74 => w.kill_sync()?,
            _ => w.kill_compaction()?,
        };
        if landed {
            w.counts.kill_points += 1;
            if w.counts.kill_points % FULL_CHECK_EVERY == 0 {
                w.full_check()?;
            }
        } else {
            w.counts.finished_before_cut += 1;
        }
    }
    w.full_check()?;
    if let Some(s) = w.server.take() {
        let (status, log) = s.terminate()?;
        ensure!(status.success(), "serve exited with {status}:\n{log}");
    }
    Ok(w.counts)
}

#[test]
fn acknowledged_writes_survive_kill_9_during_writes_sync_and_compaction() -> Result<()> {
    setup();
    let kill_points = crash::kill_points(CI_KILL_POINTS)?;
    let (rng, seed) = seeded_rng("crash", DEFAULT_SEED);
    let replay = format!(
        "FIELDCASE_TEST_SEED={seed} {}={kill_points} cargo test -p fieldcase-tests --test crash -- --nocapture",
        crash::KILL_POINTS_VAR
    );
    eprintln!("crash: replay with {replay}");
    let c =
        run(rng, kill_points).map_err(|e| anyhow!("{e:#}\nseed {seed}; replay with {replay}"))?;
    let durable = c.acked + c.cut_committed;
    let mut line = String::new();
    write!(
        line,
        "crash summary (seed {seed}): {} kill points: {} during writes, {} during sync \
         ({} client, {} server, {} both; {} clients cut after their server died), {} during \
         compaction ({} committed, {} rolled back); {} kills triggered by a write-ahead-log \
         write; {} writes killed after their acknowledgement (closing the store); \
         {} cuts came after the process finished; \
         {} acknowledged writes checked; {} cut writes found committed, {} absent; \
         {} durable writes in the final state on all 3 nodes; {} store checks; {} full \
         convergence checks",
        c.kill_points,
        c.write_kills,
        c.sync_kills,
        c.sync_client,
        c.sync_server,
        c.sync_both,
        c.client_cut_after_server,
        c.compaction_kills,
        c.compactions_committed,
        c.compactions_rolled_back,
        c.wal_triggered,
        c.killed_after_ack,
        c.finished_before_cut,
        c.acked,
        c.cut_committed,
        c.cut_absent,
        durable,
        c.checks,
        c.full_checks,
    )?;
    eprintln!("{line}");
    bail_if_empty(&c)
}

/// The run must actually have cut every kind of process.
fn bail_if_empty(c: &Counts) -> Result<()> {
    if c.kill_points >= 12 {
        ensure!(
            c.write_kills > 0 && c.sync_kills > 0 && c.compaction_kills > 0,
            "some kind of kill never landed: {c:?}"
        );
    }
    Ok(())
}
