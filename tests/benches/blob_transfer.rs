//! Attachment transfer over impaired links: a center holds a 5 MB scan, a
//! laptop syncs through the user-space relay, and we print
//!
//! - goodput: blob bits per second of transfer time, as a fraction of the
//!   profile's bandwidth cap;
//! - bytes sent: everything the center put on the link towards the laptop
//!   during the session (QUIC headers, retransmissions, case records), as a
//!   multiple of the blob size;
//! - bytes delivered: what of that came out of the far end of the link
//!   (after the relay's loss, tail drops and blackouts; its rare duplicates
//!   included), as a multiple of the blob size.
//!
//! The two differ by what the link lost. A sender cannot do better than
//! `1 / (1 - loss)` times what must arrive: at 10 % loss (edge of
//! coverage) every byte needs 1.11 sends on average, so bytes sent stay
//! above 1.11x however good the congestion control is; bytes delivered
//! show the protocol's own overhead (headers, spurious retransmissions).
//! The load average is printed too: the benchmark shares the machine.
//!
//! Real nodes (stores, identities) and real QUIC; only the link is
//! simulated. Seeded, so a run can be replayed.
//!
//! Run: `cargo bench -p fieldcase-tests --bench blob_transfer [PROFILE...]`
//! (a profile name, or NAME+shallow for the same link with a 64 KB queue).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldcase_node::case::NewCase;
use fieldcase_node::net::{self, SyncOptions};
use fieldcase_node::node::{Node, Role};
use fieldcase_node::transfer::BlobProgress;
use fieldcase_tests::relay::{LinkProfile, Relay};
use fieldcase_tests::InProcServer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLOB_BYTES: usize = 5 * 1024 * 1024;
const SEED: u64 = 20261128;
/// Upper bound for one profile's run; edge-of-coverage needs about 3 min.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

struct Figures {
    profile: String,
    cap_bps: u64,
    blob_secs: f64,
    sent_bytes: u64,
    delivered_bytes: u64,
    load_average: String,
    /// Connections lost mid-transfer and opened again by the same sync.
    resumed: u32,
}

/// The 1-minute load average, for the record (runs share the machine).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

async fn run(name: &str) -> anyhow::Result<Figures> {
    let profile = match name.strip_suffix("+shallow") {
        Some(base) => LinkProfile::by_name(base).map(LinkProfile::shallow_buffer),
        None => LinkProfile::by_name(name),
    }
    .ok_or_else(|| anyhow::anyhow!("unknown profile {name}"))?;
    let dir = tempfile::tempdir()?;
    let center_home = dir.path().join("center");
    let laptop_home = dir.path().join("laptop");
    let center_id = Node::init(&center_home, "center", Role::Center)?;
    let laptop_id = Node::init(&laptop_home, "laptop", Role::Field)?;

    let mut center = Node::open(&center_home)?;
    center.add_peer(&laptop_id.to_string(), "laptop", None)?;
    let code = center.new_case(&NewCase {
        procedure: "land-survey".into(),
        applicant: "Le Van Dung".into(),
        village: "Thon Tay".into(),
        fields: vec![],
    })?;
    let mut bytes = vec![0u8; BLOB_BYTES];
    ChaCha8Rng::seed_from_u64(SEED).fill_bytes(&mut bytes);
    bytes[..4].copy_from_slice(&[0xff, 0xd8, 0xff, 0xe0]);
    let scan = dir.path().join("land-certificate-scan.jpg");
    std::fs::write(&scan, &bytes)?;
    center.attach_file(
        &code,
        "land-certificate",
        &scan,
        "scan of the old certificate",
    )?;
    drop(center);

    let server = InProcServer::start(&center_home)?;
    let relay = Relay::start(server.addr, profile, SEED).await?;
    let mut laptop = Node::open(&laptop_home)?;
    laptop.add_peer(
        &center_id.to_string(),
        "center",
        Some(&relay.addr().to_string()),
    )?;
    let peer = laptop.peer("center")?;
    drop(laptop);

    let marks: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::default();
    let progress_marks = marks.clone();
    let opts = SyncOptions {
        live: false,
        changes: None,
        log: Arc::new(|_: &str| {}),
        progress: Arc::new(move |p: &BlobProgress| {
            let mut m = progress_marks.lock().unwrap();
            match p {
                BlobProgress::Started { .. } if m.0.is_none() => m.0 = Some(Instant::now()),
                BlobProgress::Finished { ok: true, .. } => m.1 = Some(Instant::now()),
                _ => {}
            }
        }),
        only_blob: None,
    };
    // As `fieldcase sync` does: a connection lost mid-transfer (a blackout
    // outlasting QUIC's idle timeout) is opened again and the download
    // resumes; the transfer time then includes the outage.
    let report =
        tokio::time::timeout(RUN_TIMEOUT, net::sync_resuming(&laptop_home, &peer, opts)).await??;
    anyhow::ensure!(
        report.blobs.fetched == 1,
        "the blob was not fetched: {report:?}"
    );
    let (start, end) = *marks.lock().unwrap();
    let blob_secs = match (start, end) {
        (Some(s), Some(e)) => (e - s).as_secs_f64(),
        _ => anyhow::bail!("no progress marks"),
    };
    let stats = relay.stats().to_client;
    eprintln!(
        "{name}: to laptop {} datagrams offered, {} delivered ({} duplicates), {} lost on the link, {} tail-dropped at the bottleneck queue, {} lost in blackouts",
        stats.offered_datagrams,
        stats.delivered_datagrams,
        stats.duplicated,
        stats.dropped_loss,
        stats.dropped_queue,
        stats.dropped_blackout
    );
    server.stop().await;
    relay.stop().await;
    Ok(Figures {
        profile: name.to_string(),
        cap_bps: profile.bandwidth_bps.unwrap_or(0),
        blob_secs,
        sent_bytes: stats.offered_bytes,
        delivered_bytes: stats.delivered_bytes,
        load_average: load_average(),
        resumed: report.resumed,
    })
}

fn main() -> anyhow::Result<()> {
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let names: Vec<&str> = if wanted.is_empty() {
        vec![
            "good-wifi",
            "village-3g",
            "edge-of-coverage",
            "village-3g+shallow",
        ]
    } else {
        wanted.iter().map(String::as_str).collect()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for name in names {
        eprintln!("running {name} (load average {}) ...", load_average());
        rows.push(rt.block_on(run(name))?);
    }
    println!("\n5 MB attachment, center -> laptop through the relay (seed {SEED})\n");
    println!(
        "| profile | cap | transfer time | goodput | goodput / cap | bytes sent / blob | bytes delivered / blob | connections lost and resumed | load average |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for f in rows {
        let goodput_bps = BLOB_BYTES as f64 * 8.0 / f.blob_secs;
        println!(
            "| {} | {:.2} Mbit/s | {:.1} s | {:.2} Mbit/s | {:.0}% | {:.3}x | {:.3}x | {} | {} |",
            f.profile,
            f.cap_bps as f64 / 1e6,
            f.blob_secs,
            goodput_bps / 1e6,
            100.0 * goodput_bps / f.cap_bps.max(1) as f64,
            f.sent_bytes as f64 / BLOB_BYTES as f64,
            f.delivered_bytes as f64 / BLOB_BYTES as f64,
            f.resumed,
            f.load_average
        );
    }
    Ok(())
}
