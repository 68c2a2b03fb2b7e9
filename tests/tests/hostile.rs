//! Hostile frames: a node the center trusts sends it bytes no fieldcase
//! node would send. Each time the center closes that connection within a
//! bounded time (with `CLOSE_MISBEHAVED` and, where it could still speak, a
//! Goodbye saying why), keeps running, keeps serving a real laptop, and its
//! cases are unchanged. An untrusted client is closed with
//! `CLOSE_UNTRUSTED`, and a client speaking only protocol version 99 is
//! told, in words, which versions each side speaks.
//!
//! The hostile clients are built in-process with the node's own identity
//! and TLS code, so they pass the handshake like a real node would.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use fieldcase_node::identity::{self, Identity};
use fieldcase_node::net::{CLOSE_MISBEHAVED, CLOSE_UNTRUSTED};
use fieldcase_sync::frame::{encode_frame, FrameDecoder};
use fieldcase_sync::wire::{
    Goodbye, GoodbyeCode, Hello, Message, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN,
};
use fieldcase_sync::CaseId;
use fieldcase_tests::{seeded_rng, Node, Server, Snapshot};
use rand::RngExt;

/// How long the center may take to close a misbehaving connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

/// Connects to `addr` presenting `who`'s certificate.
async fn connect(who: &Identity, addr: SocketAddr) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(identity::client_config(who)?);
    let connecting = ep.connect(addr, identity::SERVER_NAME)?;
    let conn = tokio::time::timeout(CLOSE_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow!("handshake timed out"))??;
    Ok((ep, conn))
}

/// What the center did with one connection.
struct Outcome {
    /// Everything it sent on the stream, as messages.
    messages: Vec<Message>,
    /// How the connection ended.
    close: quinn::ConnectionError,
}

impl Outcome {
    fn close_code(&self) -> Option<u64> {
        match &self.close {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }
    fn close_reason(&self) -> String {
        match &self.close {
            quinn::ConnectionError::ApplicationClosed(c) => {
                String::from_utf8_lossy(&c.reason).into_owned()
            }
            other => other.to_string(),
        }
    }
    fn goodbye(&self) -> Option<&Goodbye> {
        self.messages.iter().find_map(|m| match m {
            Message::Goodbye(g) => Some(g),
            _ => None,
        })
    }
}

/// Opens a stream, sends `bytes` (then finishes the stream if `finish`),
/// reads whatever comes back and waits, bounded, for the close.
async fn send_and_watch(
    who: &Identity,
    addr: SocketAddr,
    bytes: &[u8],
    finish: bool,
) -> Result<Outcome> {
    let (ep, conn) = connect(who, addr).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    // The center may close before all is written; that is its right.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let mut decoder = FrameDecoder::new();
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        // Until the stream ends or the connection is closed.
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            decoder.push(&buf[..n]);
            while let Ok(Some(frame)) = decoder.next_frame() {
                if let Ok(m) = Message::decode(&frame) {
                    messages.push(m);
                }
            }
        }
        conn.closed().await
    };
    let close = tokio::time::timeout(CLOSE_TIMEOUT, read_all)
        .await
        .map_err(|_| anyhow!("the center did not close the connection within {CLOSE_TIMEOUT:?}"))?;
    ep.close(0u32.into(), b"");
    Ok(Outcome { messages, close })
}

fn hello(version_min: u16, version_max: u16) -> Vec<u8> {
    encode_frame(
        &Message::Hello(Hello {
            version_min,
            version_max,
            live: false,
        })
        .encode(),
    )
}

/// The center's data as the CLI shows it.
fn center_state(center: &Node) -> Result<Snapshot> {
    center.snapshot()
}

struct Scene {
    center: Node,
    laptop: Node,
    server: Server,
    addr: SocketAddr,
    evil: Identity,
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
    // Some real data on both sides first.
    center.case_new("certification", "Pham Thi Em", "Trung Tam", &[])?;
    let code = laptop.case_new(
        "birth-registration",
        "Nguyen Van An",
        "Thon Dong",
        &[("phone", "0912 000 111")],
    )?;
    laptop.ok(&["case", "note", &code, "Father brings his ID on Friday"])?;
    laptop.sync_ok("center")?;
    Ok(Scene {
        center,
        laptop,
        server,
        addr,
        evil,
    })
}

/// After an attack: the center runs, holds what it held, and still syncs
/// with the real laptop.
fn still_fine(scene: &mut Scene, before: &Snapshot, what: &str) -> Result<()> {
    ensure!(
        scene.server.is_running(),
        "{what}: the center's server exited:\n{}",
        scene.server.log()
    );
    ensure!(
        &center_state(&scene.center)? == before,
        "{what}: the center's cases changed"
    );
    let s = scene
        .laptop
        .sync_ok("center")
        .with_context(|| format!("after {what}"))?;
    ensure!((s.sent, s.received) == (0, 0), "{what}: {s:?}");
    Ok(())
}

#[test]
fn malformed_streams_get_the_connection_closed_and_nothing_else() -> Result<()> {
    setup();
    let (mut rng, _) = seeded_rng("hostile", 0xF1E1D);
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;
    let before = center_state(&scene.center)?;

    let mut attacks: Vec<(String, Vec<u8>, bool)> = vec![
        (
            "garbage (an HTTP request)".into(),
            b"GET / HTTP/1.1\r\nHost: center\r\n\r\n".to_vec(),
            false,
        ),
        (
            "a frame header announcing 4 GiB".into(),
            u32::MAX.to_be_bytes().to_vec(),
            false,
        ),
        (
            "a valid hello, then a case-sync before the digest".into(),
            [
                hello(PROTOCOL_VERSION, PROTOCOL_VERSION),
                encode_frame(
                    &Message::CaseSync {
                        case: CaseId::new("AAAAAA-000001").expect("valid id"),
                        data: vec![0x42, 0x00, 0x01],
                    }
                    .encode(),
                ),
            ]
            .concat(),
            false,
        ),
        (
            "a hello with bad magic".into(),
            encode_frame(b"\x01XXXX\x00\x01\x00\x01\x00"),
            false,
        ),
        (
            "half a frame, then the end of the stream".into(),
            [hello(1, 1), encode_frame(&[2u8; 40])[..20].to_vec()].concat(),
            true,
        ),
    ];
    for i in 0..4 {
        let len = rng.random_range(1..4096usize);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        attacks.push((format!("random bytes #{i} ({len} bytes)"), bytes, true));
    }

    for (n, (what, bytes, finish)) in attacks.iter().enumerate() {
        let out = rt
            .block_on(send_and_watch(&scene.evil, scene.addr, bytes, *finish))
            .with_context(|| what.clone())?;
        ensure!(
            out.close_code() == Some(CLOSE_MISBEHAVED.into()),
            "{what}: expected close code {CLOSE_MISBEHAVED}, got {:?} ({})",
            out.close,
            out.close_reason()
        );
        ensure!(
            out.close_reason().starts_with("misbehaving peer"),
            "{what}: {}",
            out.close_reason()
        );
        let g = out.goodbye().with_context(|| {
            format!(
                "{what}: the center closed without a goodbye; it said {:?}",
                out.messages
            )
        })?;
        ensure!(g.code == GoodbyeCode::ProtocolError, "{what}: {g:?}");
        // The center logs each one.
        let count = n + 1;
        scene
            .server
            .wait_for_count(Duration::from_secs(10), count, |l| {
                l.contains("closed connection from misbehaving peer")
            })
            .with_context(|| what.clone())?;
        still_fine(&mut scene, &before, what)?;
    }

    // Real work still flows both ways.
    let code = scene
        .laptop
        .case_new("health-insurance", "Tran Thi Cuc", "Thon Dong", &[])?;
    let s = scene.laptop.sync_ok("center")?;
    ensure!((s.sent, s.received) == (1, 0), "{s:?}");
    ensure!(scene.center.show_json(&code)? == scene.laptop.show_json(&code)?);
    Ok(())
}

#[test]
fn an_untrusted_client_is_closed_with_close_untrusted() -> Result<()> {
    setup();
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;
    let before = center_state(&scene.center)?;
    let stranger = Identity::generate("stranger")?;
    let close = rt.block_on(async {
        match connect(&stranger, scene.addr).await {
            // Closed during the handshake.
            Err(e) => match e.downcast::<quinn::ConnectionError>() {
                Ok(c) => Ok(c),
                Err(e) => Err(e),
            },
            Ok((ep, conn)) => {
                // Try to talk anyway; nothing must come back.
                if let Ok((mut send, mut recv)) = conn.open_bi().await {
                    let _ = send.write_all(&hello(1, 1)).await;
                    let mut buf = [0u8; 1024];
                    let got = tokio::time::timeout(CLOSE_TIMEOUT, recv.read(&mut buf)).await;
                    if let Ok(Ok(Some(n))) = got {
                        bail!("an untrusted client received {n} bytes");
                    }
                }
                let c = tokio::time::timeout(CLOSE_TIMEOUT, conn.closed())
                    .await
                    .map_err(|_| anyhow!("not closed in time"))?;
                ep.close(0u32.into(), b"");
                Ok(c)
            }
        }
    })?;
    let quinn::ConnectionError::ApplicationClosed(c) = &close else {
        bail!("expected an application close, got {close:?}");
    };
    ensure!(
        c.error_code.into_inner() == u64::from(CLOSE_UNTRUSTED),
        "{c:?}"
    );
    let reason = String::from_utf8_lossy(&c.reason);
    ensure!(reason.contains("not trusted"), "{reason}");
    ensure!(reason.contains(&stranger.node_id().to_string()), "{reason}");
    scene.server.wait_for_line(Duration::from_secs(10), |l| {
        l.contains("refused untrusted node") && l.contains("stranger")
    })?;
    still_fine(&mut scene, &before, "an untrusted client")
}

#[test]
fn a_client_speaking_only_version_99_is_told_both_version_ranges() -> Result<()> {
    setup();
    let rt = fieldcase_tests::runtime();
    let mut scene = scene()?;
    let before = center_state(&scene.center)?;
    let out = rt.block_on(send_and_watch(
        &scene.evil,
        scene.addr,
        &hello(99, 99),
        false,
    ))?;
    let g = out
        .goodbye()
        .with_context(|| format!("no goodbye; got {:?}", out.messages))?;
    ensure!(g.code == GoodbyeCode::VersionMismatch, "{g:?}");
    ensure!(
        g.reason.contains("99..=99")
            && g.reason
                .contains(&format!("{PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION}")),
        "the reason should name both ranges: {}",
        g.reason
    );
    ensure!(
        !out.messages
            .iter()
            .any(|m| matches!(m, Message::Changes { .. } | Message::CaseSync { .. })),
        "the center sent data to a peer it cannot talk to: {:?}",
        out.messages
    );
    eprintln!(
        "version mismatch closed with {:?}: {}",
        out.close_code(),
        out.close_reason()
    );
    still_fine(&mut scene, &before, "a version-99 client")
}
