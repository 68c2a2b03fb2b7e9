//! A hostile *authenticated* peer: a node the center trusts, speaking the
//! real protocol well enough to get past hello, digest and inventory, then
//! abusing it. It sends malformed Automerge changes inside well-formed case
//! syncs, changes that would rewrite the center's own history, changes that
//! would make a case invalid, endless streams of valid-looking frames,
//! frames at the size limit, and thousands of streams.
//!
//! Whatever it sends, the center (a real `fieldcase serve` process):
//! - stays up, and a real laptop syncs with it afterwards;
//! - bounds its memory: its resident set (and its high-water mark) stays
//!   within [`RSS_GROWTH_MAX_BYTES`] of what it was before the attacks;
//! - closes that connection with `CLOSE_MISBEHAVED` and a reason;
//! - commits nothing: its case list and every case's heads are unchanged.
//!
//! The attacker runs the real `fieldcase_sync::Session` over an in-memory
//! store, in-process, with the node's own identity and TLS code; attacks
//! either forge the attacker's documents or rewrite its outgoing messages.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ROOT};
use fieldcase_node::case::{self, Author, NewCase};
use fieldcase_node::identity::{self, Identity};
use fieldcase_node::net::CLOSE_MISBEHAVED;
use fieldcase_sync::frame::{encode_frame, FrameDecoder, FRAME_BYTES_MAX, FRAME_HEADER_BYTES};
use fieldcase_sync::memory::MemoryNode;
use fieldcase_sync::wire::{ChangesEnd, GoodbyeCode, Hello, Message, PROTOCOL_VERSION};
use fieldcase_sync::{CaseId, Session, SessionConfig};
use fieldcase_tests::{seeded_rng, Node, Server, Snapshot};
use rand::RngExt;

/// How long the center may take to close a misbehaving connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an endless stream keeps sending before the test calls the
/// center's patience unbounded.
const ENDLESS_FOR: Duration = Duration::from_secs(30);

/// How much the center's resident memory may grow over all the attacks.
/// Generous: the point is "bounded", not "small"; one unbounded buffer or
/// map fed by an endless stream grows far past it.
const RSS_GROWTH_MAX_BYTES: u64 = 200 * 1024 * 1024;

/// Idle frames the endless-Idle attacker writes at once.
const IDLE_FRAMES_PER_WRITE: usize = 100;

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

/// `VmRSS` and `VmHWM` (peak) of a process, in bytes.
fn memory_of(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("bad line {line}"))?
            .parse()?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

async fn connect(who: &Identity, addr: SocketAddr) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(identity::client_config(who)?);
    let connecting = ep.connect(addr, identity::SERVER_NAME)?;
    let conn = tokio::time::timeout(CLOSE_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("handshake timed out"))??;
    Ok((ep, conn))
}

/// How one attack connection ended.
#[derive(Debug)]
struct Outcome {
    /// Everything the center said on the sync stream.
    messages: Vec<Message>,
    /// How the connection ended.
    close: quinn::ConnectionError,
}

impl Outcome {
    fn closed_as_misbehaving(&self, what: &str) -> Result<()> {
        let quinn::ConnectionError::ApplicationClosed(c) = &self.close else {
            bail!(
                "{what}: expected an application close, got {:?}",
                self.close
            );
        };
        let reason = String::from_utf8_lossy(&c.reason);
        ensure!(
            c.error_code.into_inner() == u64::from(CLOSE_MISBEHAVED),
            "{what}: expected close code {CLOSE_MISBEHAVED}, got {} ({reason})",
            c.error_code
        );
        ensure!(
            reason.starts_with("misbehaving peer: ") && reason.len() > "misbehaving peer: ".len(),
            "{what}: the close should say why: {reason:?}"
        );
        eprintln!("{what}: closed with {CLOSE_MISBEHAVED}: {reason}");
        Ok(())
    }

    /// The center also said why on the sync stream, in a Goodbye.
    fn said_goodbye(&self, what: &str) -> Result<()> {
        let g = self
            .messages
            .iter()
            .find_map(|m| match m {
                Message::Goodbye(g) => Some(g),
                _ => None,
            })
            .with_context(|| format!("{what}: no goodbye among {:?}", self.messages))?;
        ensure!(g.code == GoodbyeCode::ProtocolError, "{what}: {g:?}");
        Ok(())
    }
}

/// Collects the center's messages from the sync stream into `out` until
/// the connection ends; sets `goodbye` once the center said goodbye.
async fn read_messages(
    mut recv: quinn::RecvStream,
    out: &mut Vec<Message>,
    goodbye: &std::sync::atomic::AtomicBool,
) {
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(Some(n)) = recv.read(&mut buf).await {
        dec.push(&buf[..n]);
        while let Ok(Some(frame)) = dec.next_frame() {
            if let Ok(m) = Message::decode(&frame) {
                if matches!(m, Message::Goodbye(_)) {
                    goodbye.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                out.push(m);
            }
        }
    }
}

/// Runs the real session protocol from the attacker's `node`, passing
/// every outgoing message through `tamper` (which may replace it by any
/// messages). Returns when the connection is closed; an honest session
/// that finishes closes it itself.
async fn run_session(
    who: &Identity,
    addr: SocketAddr,
    node: &mut MemoryNode,
    mut tamper: impl FnMut(Message) -> Vec<Message>,
) -> Result<Outcome> {
    let (ep, conn) = connect(who, addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut session = Session::new(SessionConfig::default());
    session.start(&mut node.for_peer("center"))?;
    let mut seen = FrameDecoder::new();
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut finished = false;
    let deadline = Instant::now() + CLOSE_TIMEOUT * 3;
    loop {
        while let Some(frame) = session.poll_transmit() {
            let msg = Message::decode(&frame[FRAME_HEADER_BYTES..])?;
            for m in tamper(msg) {
                // The center may close before all is written.
                let _ = send.write_all(&encode_frame(&m.encode())).await;
            }
        }
        if session.is_finished() && !finished {
            finished = true;
            let _ = send.finish();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, recv.read(&mut buf)).await {
            Err(_) => bail!("the session neither finished nor was closed in time"),
            Ok(Ok(Some(n))) => {
                seen.push(&buf[..n]);
                while let Ok(Some(f)) = seen.next_frame() {
                    if let Ok(m) = Message::decode(&f) {
                        messages.push(m);
                    }
                    // The attacker's own session may fail (the center said
                    // goodbye); keep reading until the connection closes.
                    let _ = session.handle_bytes(&encode_frame(&f), &mut node.for_peer("center"));
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => break,
        }
    }
    if session.is_finished() {
        conn.close(0u32.into(), b"done");
    }
    let close = tokio::time::timeout(CLOSE_TIMEOUT, conn.closed())
        .await
        .map_err(|_| anyhow!("the center did not close the connection in time"))?;
    ep.close(0u32.into(), b"");
    Ok(Outcome { messages, close })
}

fn frame(m: &Message) -> Vec<u8> {
    encode_frame(&m.encode())
}

fn hello() -> Vec<u8> {
    frame(&Message::Hello(Hello {
        version_min: PROTOCOL_VERSION,
        version_max: PROTOCOL_VERSION,
        live: false,
    }))
}

/// Hello, a cursor and an empty listing: a correct opening after which
/// both sides are in the sync phase (the center then lists its cases).
fn opening() -> Vec<u8> {
    [
        hello(),
        frame(&Message::Since {
            store_id: [0xEE; 16],
            seq: 0,
        }),
        frame(&Message::ListingStart { after: 0 }),
        frame(&Message::Changes {
            entries: vec![],
            end: Some(ChangesEnd {
                store_id: [0xEE; 16],
                upto: 0,
            }),
        }),
    ]
    .concat()
}

/// Sends `opening` and then frames from `next` (until it returns `None`,
/// the connection closes, or [`ENDLESS_FOR`] passes), while reading what
/// the center says. The center must close the connection.
async fn endless(
    who: &Identity,
    addr: SocketAddr,
    opening: Vec<u8>,
    mut next: impl FnMut(u64) -> Option<Vec<u8>>,
) -> Result<(Outcome, u64)> {
    let (ep, conn) = connect(who, addr).await?;
    let (mut send, recv) = conn.open_bi().await?;
    let mut messages = Vec::new();
    let goodbye = std::sync::atomic::AtomicBool::new(false);
    let reader = read_messages(recv, &mut messages, &goodbye);
    let writer = async {
        send.write_all(&opening).await.ok();
        let started = Instant::now();
        let mut sent = 0u64;
        // Once the center said goodbye, stop: a flood that goes on can
        // crowd out the close on a loaded machine, and the client then
        // sees only a stateless reset.
        while started.elapsed() < ENDLESS_FOR && !goodbye.load(std::sync::atomic::Ordering::Relaxed)
        {
            let Some(bytes) = next(sent) else { break };
            if send.write_all(&bytes).await.is_err() {
                break;
            }
            sent += 1;
            // Let this task read the center's answers (and its close)
            // between writes.
            tokio::task::yield_now().await;
        }
        sent
    };
    let (_, sent) = tokio::join!(reader, writer);
    let close = tokio::time::timeout(CLOSE_TIMEOUT, conn.closed())
        .await
        .map_err(|_| anyhow!("still open after {sent} frames"))?;
    ep.close(0u32.into(), b"");
    Ok((Outcome { messages, close }, sent))
}

struct Scene {
    center: Node,
    laptop: Node,
    server: Server,
    addr: SocketAddr,
    evil: Identity,
    /// What the center held before any attack.
    before: Snapshot,
    /// The center's memory before any attack.
    rss_before: u64,
}

fn scene() -> Result<Scene> {
    let center = Node::init("center", "center")?;
    let laptop = Node::init("laptop-dong", "field")?;
    let server = center.serve()?;
    let addr: SocketAddr = server.addr().parse()?;
    center.trust(&laptop, None)?;
    laptop.trust(&center, Some(server.addr()))?;
    let evil = Identity::generate("evil")?;
    center.trust_as(&evil.node_id().to_string(), "evil", None)?;
    let code = center.case_new(
        "certification",
        "Pham Thi Em",
        "Trung Tam",
        &[("phone", "0912 000 222")],
    )?;
    center.ok(&["case", "note", &code, "Originals checked at the desk"])?;
    laptop.case_new(
        "birth-registration",
        "Nguyen Van An",
        "Thon Dong",
        &[("phone", "0912 000 111")],
    )?;
    laptop.sync_ok("center")?;
    let before = center.snapshot()?;
    let (rss_before, _) = memory_of(server.pid())?;
    Ok(Scene {
        center,
        laptop,
        server,
        addr,
        evil,
        before,
        rss_before,
    })
}

impl Scene {
    /// After an attack: the center runs, holds exactly what it held, its
    /// memory is bounded, and the real laptop still syncs with it.
    fn still_fine(&mut self, what: &str) -> Result<()> {
        ensure!(
            self.server.is_running(),
            "{what}: the center's server exited:\n{}",
            self.server.log()
        );
        let (rss, peak) = memory_of(self.server.pid())?;
        eprintln!(
            "{what}: center RSS {:.1} MB (peak {:.1} MB, before the attacks {:.1} MB)",
            rss as f64 / 1e6,
            peak as f64 / 1e6,
            self.rss_before as f64 / 1e6
        );
        ensure!(
            peak < self.rss_before + RSS_GROWTH_MAX_BYTES,
            "{what}: the center's memory peaked at {peak} bytes, from {} before",
            self.rss_before
        );
        ensure!(
            self.center.snapshot()? == self.before,
            "{what}: the center's cases changed"
        );
        let s = self
            .laptop
            .sync_ok("center")
            .with_context(|| format!("the laptop's sync after {what}"))?;
        ensure!((s.sent, s.received) == (0, 0), "{what}: {s:?}");
        Ok(())
    }
}

/// An honest session from the attacker: afterwards its memory holds
/// copies of every case the center shares with it.
fn honest_copy(rt: &tokio::runtime::Runtime, scene: &Scene) -> Result<MemoryNode> {
    let mut node = MemoryNode::with_store_id([0xE0; 16]);
    let out = rt.block_on(run_session(&scene.evil, scene.addr, &mut node, |m| vec![m]))?;
    ensure!(
        matches!(out.close, quinn::ConnectionError::LocallyClosed),
        "the honest session should end normally: {:?}",
        out.close
    );
    ensure!(
        node.docs.len() == scene.before.cases.len(),
        "the attacker should hold the center's {} cases, holds {}",
        scene.before.cases.len(),
        node.docs.len()
    );
    Ok(node)
}

fn evil_author() -> Author {
    Author {
        actor: ActorId::from(vec![0xEE; 16]),
        node_id: "evil".into(),
        name: "evil".into(),
    }
}

fn new_case(code: &str, actor: ActorId, applicant: &str) -> Result<Automerge> {
    let author = Author {
        actor,
        ..evil_author()
    };
    Ok(case::create(
        code,
        &NewCase {
            procedure: "certification".into(),
            applicant: applicant.into(),
            village: "Thon Dong".into(),
            fields: vec![],
        },
        &author,
        1_767_225_600_000,
    )?)
}

#[test]
fn bad_changes_inside_well_formed_case_syncs_are_refused_and_nothing_is_committed() -> Result<()> {
    setup();
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;
    let copy = honest_copy(&rt, &scene)?;
    scene.still_fine("an honest session from the attacker")?;
    let (center_code, center_doc) = copy
        .docs
        .iter()
        .find(|(_, d)| {
            case::view(d)
                .map(|v| v.created_by_name == "center")
                .unwrap_or(false)
        })
        .map(|(id, d)| (id.clone(), d.clone()))
        .context("the center's own case")?;
    let center_actor = center_doc
        .get_changes(&[])
        .first()
        .context("a first change")?
        .actor_id()
        .clone();

    // 1. A brand-new case whose change bytes are damaged in flight: the
    //    case sync frame and the Automerge message around it are fine.
    //    The center asks for the new case whole first; the damaged
    //    document does not load, so it falls back to an Automerge
    //    exchange, whose damaged change is refused.
    let mut node = copy_of(&copy);
    let fresh = CaseId::new("EVIL00-000001")?;
    node.docs.insert(
        fresh.clone(),
        new_case(fresh.as_str(), evil_author().actor, "Nobody")?,
    );
    let mut damaged = 0;
    let out = rt.block_on(run_session(&scene.evil, scene.addr, &mut node, |m| {
        match m {
            Message::CaseSync { case, mut data } if data.len() > 200 => {
                // Flip bytes well inside the change chunk.
                let at = data.len() - 40;
                for b in &mut data[at..at + 8] {
                    *b ^= 0x5A;
                }
                damaged += 1;
                vec![Message::CaseSync { case, data }]
            }
            Message::CaseDoc { case, mut data } if data.len() > 200 => {
                let at = data.len() - 40;
                for b in &mut data[at..at + 8] {
                    *b ^= 0x5A;
                }
                vec![Message::CaseDoc { case, data }]
            }
            m => vec![m],
        }
    }))?;
    ensure!(damaged > 0, "the attacker never sent its change");
    out.closed_as_misbehaving("a damaged change chunk")?;
    out.said_goodbye("a damaged change chunk")?;
    scene.still_fine("a damaged change chunk")?;

    // 2. Rewriting the center's history: a different first change under
    //    the center's own actor (same actor, same sequence number 1),
    //    carried in the attacker's first, otherwise honest, sync message
    //    for that case.
    let mut node = copy_of(&copy);
    let forged = new_case(center_code.as_str(), center_actor.clone(), "Someone Else")?;
    let forged_change = forged.get_changes(&[])[0].clone();
    let real_first = center_doc.get_changes(&[])[0].clone();
    ensure!(forged_change.actor_id() == real_first.actor_id());
    ensure!(forged_change.seq() == real_first.seq());
    ensure!(forged_change.hash() != real_first.hash());
    node.docs.insert(center_code.clone(), forged);
    let mut carried = 0;
    let out = rt.block_on(run_session(
        &scene.evil,
        scene.addr,
        &mut node,
        |m| match m {
            Message::CaseSync { case, data } if case == center_code && carried == 0 => {
                let mut am = automerge::sync::Message::decode(&data).expect("our own message");
                am.changes = vec![forged_change.raw_bytes().to_vec()].into();
                carried += 1;
                vec![Message::CaseSync {
                    case,
                    data: am.encode(),
                }]
            }
            m => vec![m],
        },
    ))?;
    ensure!(
        carried == 1,
        "the forged change was never sent: {:?} {:?}",
        out.close,
        out.messages
    );
    out.closed_as_misbehaving("a change reusing the center's actor and sequence number")?;
    out.said_goodbye("a change reusing the center's actor and sequence number")?;
    scene.still_fine("a change reusing the center's actor and sequence number")?;

    // 3. A change on top of the center's case that breaks the case model.
    let mut node = copy_of(&copy);
    let doc = node.docs.get_mut(&center_code).expect("copied");
    doc.set_actor(evil_author().actor);
    let mut tx = doc.transaction();
    tx.put(ROOT, "schema", 99_i64)?;
    tx.put(ROOT, "procedure", "launch-rockets")?;
    tx.commit();
    let out = rt.block_on(run_session(&scene.evil, scene.addr, &mut node, |m| vec![m]))?;
    out.closed_as_misbehaving("a change that makes the case invalid")?;
    out.said_goodbye("a change that makes the case invalid")?;
    scene.still_fine("a change that makes the case invalid")?;

    // 4. A new case that is no case at all, and a real case sent under
    //    another case's code.
    for (what, id, doc) in [
        ("a new case that is not a case", "EVIL00-000002", {
            let mut d = Automerge::new();
            let mut tx = d.transaction();
            tx.put(ROOT, "code", "EVIL00-000002")?;
            tx.commit();
            d
        }),
        (
            "a real case sent under another code",
            "EVIL00-000003",
            new_case("EVIL00-000004", evil_author().actor, "Wrong Code")?,
        ),
    ] {
        let mut node = copy_of(&copy);
        node.docs.insert(CaseId::new(id)?, doc);
        let out = rt.block_on(run_session(&scene.evil, scene.addr, &mut node, |m| vec![m]))?;
        out.closed_as_misbehaving(what)?;
        out.said_goodbye(what)?;
        scene.still_fine(what)?;
        ensure!(
            !scene.center.codes()?.iter().any(|c| c.starts_with("EVIL")),
            "{what}: the center stored an attacker's case"
        );
    }
    Ok(())
}

/// The attacker's documents in a store it has never synced from: a new
/// store id each time, so it lists everything it holds.
fn copy_of(node: &MemoryNode) -> MemoryNode {
    static STORES: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    MemoryNode {
        docs: node.docs.clone(),
        ..MemoryNode::with_store_id([n; 16])
    }
}

#[test]
fn endless_idle_and_blobs_done_streams_are_cut_off() -> Result<()> {
    setup();
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;

    // Endless Idle frames, each with the same (plausible) counts: nothing
    // is ever exchanged, but the session would never end.
    let idle = frame(&Message::Idle {
        received: 0,
        sent: 1,
    })
    .repeat(IDLE_FRAMES_PER_WRITE);
    let (out, sent) = rt.block_on(endless(&scene.evil, scene.addr, opening(), |_| {
        Some(idle.clone())
    }))?;
    eprintln!(
        "endless Idle: {} frames written before the close",
        sent * IDLE_FRAMES_PER_WRITE as u64
    );
    out.closed_as_misbehaving("endless Idle frames")?;
    scene.still_fine("endless Idle frames")?;

    // Endless BlobsDone frames.
    let done = frame(&Message::BlobsDone);
    let (out, _) = rt.block_on(endless(&scene.evil, scene.addr, opening(), |_| {
        Some(done.clone())
    }))?;
    out.closed_as_misbehaving("endless BlobsDone frames")?;
    scene.still_fine("endless BlobsDone frames")?;

    Ok(())
}

#[test]
fn frames_at_the_size_limit_cost_one_frame_of_memory_each() -> Result<()> {
    setup();
    let (mut rng, _) = seeded_rng("hostile_peer_huge", 0x8BADF00D);
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;

    // A case sync as large as a frame may be, full of noise.
    let header_bytes = Message::CaseSync {
        case: CaseId::new("EVIL00-000001")?,
        data: vec![],
    }
    .encode()
    .len()
        + 3; // the data length grows from one varint byte to four
    let mut noise = vec![0u8; FRAME_BYTES_MAX - header_bytes];
    rng.fill(&mut noise[..]);
    let huge = Message::CaseSync {
        case: CaseId::new("EVIL00-000001")?,
        data: noise,
    }
    .encode();
    ensure!(huge.len() == FRAME_BYTES_MAX, "{} bytes", huge.len());
    let huge = encode_frame(&huge);

    // Eight connections at once, each sending one maximal frame.
    let outcomes = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (evil, addr, bytes) = (
                scene.evil.clone(),
                scene.addr,
                [opening(), huge.clone()].concat(),
            );
            tasks.push(tokio::spawn(async move {
                endless(&evil, addr, bytes, |_| None).await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        Ok::<_, anyhow::Error>(out)
    })?;
    for (out, _) in &outcomes {
        out.closed_as_misbehaving("a maximal case-sync frame of noise")?;
    }
    scene.still_fine("maximal frames on eight connections")?;

    // One byte over the limit is refused from the header alone.
    let over = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes().to_vec();
    let (out, _) = rt.block_on(endless(
        &scene.evil,
        scene.addr,
        [opening(), over].concat(),
        |_| None,
    ))?;
    out.closed_as_misbehaving("a frame one byte over the limit")?;
    scene.still_fine("a frame one byte over the limit")
}

/// Streams the attacker opens at once on one connection; far beyond the
/// 64 concurrent streams QUIC allows it.
const STREAMS: usize = 2000;

#[test]
fn thousands_of_streams_are_served_within_limits_and_a_bad_one_closes_the_connection() -> Result<()>
{
    setup();
    let (mut rng, _) = seeded_rng("hostile_peer_streams", 0x5EED5);
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;
    let hashes: Vec<[u8; 32]> = (0..STREAMS)
        .map(|_| {
            let mut h = [0u8; 32];
            rng.fill(&mut h[..]);
            h
        })
        .collect();
    let (answered, out) = rt.block_on(async {
        let (ep, conn) = connect(&scene.evil, scene.addr).await?;
        // The sync stream first, so the center starts serving blobs.
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&opening()).await?;
        let mut messages = Vec::new();
        let goodbye = std::sync::atomic::AtomicBool::new(false);
        let sync_reader = read_messages(recv, &mut messages, &goodbye);
        let flood = async {
            let mut tasks = tokio::task::JoinSet::new();
            for h in &hashes {
                let conn = conn.clone();
                let h = *h;
                tasks.spawn(async move {
                    let (mut s, mut r) = conn.open_bi().await.ok()?;
                    s.write_all(&frame(&Message::BlobRequest { hash: h, offset: 0 }))
                        .await
                        .ok()?;
                    let _ = s.finish();
                    let bytes = r.read_to_end(4096).await.ok()?;
                    let mut dec = FrameDecoder::new();
                    dec.push(&bytes);
                    let f = dec.next_frame().ok()??;
                    Some(matches!(
                        Message::decode(&f).ok()?,
                        Message::BlobUnavailable { .. }
                    ))
                });
            }
            let mut answered = 0usize;
            let deadline = Duration::from_secs(120);
            let all = async {
                while let Some(r) = tasks.join_next().await {
                    if let Ok(Some(true)) = r {
                        answered += 1;
                    }
                }
            };
            tokio::time::timeout(deadline, all)
                .await
                .map_err(|_| anyhow!("{STREAMS} blob requests not answered in {deadline:?}"))?;
            // Then one stream that opens with something else than a
            // blob request.
            let (mut s, _r) = conn.open_bi().await?;
            s.write_all(&frame(&Message::BlobsDone)).await?;
            let _ = s.finish();
            let close = tokio::time::timeout(CLOSE_TIMEOUT, conn.closed())
                .await
                .map_err(|_| anyhow!("not closed after a bad blob stream"))?;
            Ok::<_, anyhow::Error>((answered, close))
        };
        let (_, r) = tokio::join!(sync_reader, flood);
        let (answered, close) = r?;
        ep.close(0u32.into(), b"");
        Ok::<_, anyhow::Error>((answered, Outcome { messages, close }))
    })?;
    eprintln!("{answered} of {STREAMS} blob streams answered 'unavailable'");
    ensure!(
        answered == STREAMS,
        "every well-formed request gets an answer"
    );
    out.closed_as_misbehaving("a blob stream opened with the wrong message")?;
    scene.still_fine("thousands of streams")
}
