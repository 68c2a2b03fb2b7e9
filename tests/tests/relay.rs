//! The lossy-link relay: what a field laptop's link does to datagrams and
//! to a QUIC transfer. Every random decision is seeded; every wait is
//! bounded; assertions are on counts with generous bounds, never on how
//! fast something happened (except lower bounds the link itself imposes).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use fieldcase_node::identity::{self, Identity};
use fieldcase_tests::relay::{
    Blackouts, Direction, DropReason, Fate, GilbertElliott, LinkModel, LinkProfile, Relay,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// Longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(20);

/// Bounded polling until `f` holds.
async fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !f() {
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> Result<T> {
    timeout(WAIT, fut)
        .await
        .map_err(|_| anyhow!("timed out after {WAIT:?}: {what}"))
}

// ---------------------------------------------------------------- UDP side

/// A plain UDP "server" recording the sequence number (first 4 bytes) of
/// every datagram it receives, in arrival order.
struct Sink {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u32>>>,
    task: JoinHandle<()>,
}

impl Sink {
    async fn start() -> Result<Sink> {
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let addr = sock.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, _)) = sock.recv_from(&mut buf).await {
                if n >= 4 {
                    let seq = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes"));
                    record.lock().unwrap().push(seq);
                }
            }
        });
        Ok(Sink { addr, seen, task })
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<u32> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends datagrams `0..n` of `len` bytes through the relay, at most
/// `window` unaccounted for at a time (each one either reached the sink or
/// was dropped by the relay), so neither the relay's nor the sink's socket
/// buffer can overflow and every loss is the relay's doing.
async fn send_paced(
    relay: &Relay,
    client: &UdpSocket,
    sink: &Sink,
    n: u32,
    len: usize,
    window: u32,
) -> Result<()> {
    ensure!(len >= 4);
    let mut buf = vec![0xA5u8; len];
    // Whatever the relay and the sink accounted for before this call.
    let base = sink.count() as u64 + relay.stats().to_server.dropped();
    let mut sent = 0u32;
    while sent < n {
        let end = (sent + window).min(n);
        for seq in sent..end {
            buf[..4].copy_from_slice(&seq.to_be_bytes());
            client.send_to(&buf, relay.addr()).await?;
        }
        sent = end;
        let target = base + sent as u64;
        wait_for(&format!("{target} datagrams accounted for"), || {
            sink.count() as u64 + relay.stats().to_server.dropped() >= target
        })
        .await?;
    }
    Ok(())
}

/// Lengths of the runs of consecutive lost sequence numbers.
fn loss_runs(received: &[u32], n: u32) -> Vec<usize> {
    let mut got = vec![false; n as usize];
    for &s in received {
        got[s as usize] = true;
    }
    let mut runs = Vec::new();
    let mut run = 0;
    for g in got {
        if g {
            if run > 0 {
                runs.push(run);
            }
            run = 0;
        } else {
            run += 1;
        }
    }
    if run > 0 {
        runs.push(run);
    }
    runs
}

fn mean(runs: &[usize]) -> f64 {
    runs.iter().sum::<usize>() as f64 / runs.len().max(1) as f64
}

/// Runs `n` small datagrams through a relay with `profile` and `seed`;
/// returns the sequence numbers that arrived, in order.
async fn run_datagrams(profile: LinkProfile, seed: u64, n: u32) -> Result<Vec<u32>> {
    let sink = Sink::start().await?;
    let relay = Relay::start(sink.addr, profile, seed).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    send_paced(&relay, &client, &sink, n, 32, 100).await?;
    let stats = relay.stats().to_server;
    let got = sink.seen();
    ensure!(stats.offered_datagrams == n as u64, "relay saw {stats:?}");
    ensure!(
        stats.delivered_datagrams == got.len() as u64,
        "relay delivered {} but the sink got {}",
        stats.delivered_datagrams,
        got.len()
    );
    relay.stop().await;
    Ok(got)
}

fn loss_only(p: f64) -> LinkProfile {
    LinkProfile {
        loss: p,
        ..LinkProfile::perfect()
    }
}

/// The edge-of-coverage burst model alone, without its delay or blackouts.
fn bursty() -> LinkProfile {
    LinkProfile {
        burst: LinkProfile::edge_of_coverage().burst,
        ..LinkProfile::perfect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_drops_about_a_tenth_and_bursty_loss_comes_in_bursts() -> Result<()> {
    const N: u32 = 10_000;

    // Independent loss: about 10 %, and losses mostly alone.
    let got = run_datagrams(loss_only(0.10), 42, N).await?;
    let lost = N as usize - got.len();
    let runs = loss_runs(&got, N);
    eprintln!(
        "independent 10%: lost {lost}/{N}, {} runs, mean run {:.2}",
        runs.len(),
        mean(&runs)
    );
    assert!(
        (800..=1200).contains(&lost),
        "10 % loss dropped {lost} of {N}"
    );
    assert!(mean(&runs) < 1.5, "independent losses should rarely touch");
    // Nothing else happened to them: in order, no duplicates.
    assert!(got.windows(2).all(|w| w[0] < w[1]));

    // Gilbert-Elliott (edge of coverage): about 10 % too, in bursts.
    let got = run_datagrams(bursty(), 42, N).await?;
    let lost = N as usize - got.len();
    let runs = loss_runs(&got, N);
    let longest = runs.iter().max().copied().unwrap_or(0);
    eprintln!(
        "Gilbert-Elliott: lost {lost}/{N}, {} bursts, mean burst {:.2}, longest {longest}",
        runs.len(),
        mean(&runs)
    );
    assert!(
        (700..=1300).contains(&lost),
        "bursty 10 % loss dropped {lost} of {N}"
    );
    assert!(
        mean(&runs) > 1.5,
        "bursty losses should come in bursts, mean {:.2}",
        mean(&runs)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_replays_the_same_drop_pattern() -> Result<()> {
    const N: u32 = 3_000;
    let mut profile = bursty();
    profile.loss = 0.05;
    let first = run_datagrams(profile, 7, N).await?;
    let second = run_datagrams(profile, 7, N).await?;
    assert!(first.len() < N as usize, "something must be lost");
    assert_eq!(first, second, "same seed, same datagrams: same pattern");
    let other = run_datagrams(profile, 8, N).await?;
    assert_ne!(first, other, "another seed gives another pattern");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_megabit_link_takes_its_time_and_its_queue_overflows() -> Result<()> {
    let two_mbit = LinkProfile {
        bandwidth_bps: Some(2_000_000),
        queue_bytes: 64 * 1024,
        ..LinkProfile::perfect()
    };

    // 200 KB, paced so the 64 KB queue never overflows: 200 datagrams of
    // 1000 bytes at 2 Mbit/s is at least 0.8 s of link time.
    let sink = Sink::start().await?;
    let relay = Relay::start(sink.addr, two_mbit, 1).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let started = Instant::now();
    send_paced(&relay, &client, &sink, 200, 1000, 16).await?;
    let took = started.elapsed();
    let stats = relay.stats().to_server;
    eprintln!("200 KB through 2 Mbit/s took {took:?}; {stats:?}");
    assert!(
        took >= Duration::from_millis(700),
        "200 KB through 2 Mbit/s took only {took:?}"
    );
    assert_eq!(stats.offered_bytes, 200_000);
    assert_eq!(stats.delivered_bytes, 200_000);
    assert_eq!(stats.delivered_datagrams, 200);
    assert_eq!(stats.dropped(), 0);
    assert_eq!(sink.count(), 200);
    relay.stop().await;

    // The same 200 KB offered far faster than 2 Mbit/s (waiting only until
    // the relay has read each 32 KB, so the kernel drops nothing): the
    // bottleneck keeps what its 64 KB buffer holds and tail-drops the rest,
    // like a router.
    let sink = Sink::start().await?;
    let relay = Relay::start(sink.addr, two_mbit, 1).await?;
    let buf = vec![0u8; 1000];
    for window in 1..=200u64 / 25 {
        for _ in 0..25 {
            client.send_to(&buf, relay.addr()).await?;
        }
        wait_for("the relay to read the window", || {
            relay.stats().to_server.offered_datagrams >= window * 25
        })
        .await?;
    }
    wait_for("the queue to drain", || {
        let s = relay.stats().to_server;
        s.delivered_datagrams + s.dropped() >= 200
    })
    .await?;
    let stats = relay.stats().to_server;
    eprintln!("200 KB offered at once into a 64 KB queue: {stats:?}");
    assert!(stats.dropped_queue > 0, "a full queue must tail-drop");
    assert_eq!(stats.dropped(), stats.dropped_queue);
    assert_eq!(stats.delivered_datagrams + stats.dropped_queue, 200);
    wait_for("the sink to read what was delivered", || {
        sink.count() as u64 == stats.delivered_datagrams
    })
    .await?;
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_blackout_cuts_both_ways_including_datagrams_on_the_air() -> Result<()> {
    let sink = Sink::start().await?;
    let relay = Relay::start(sink.addr, LinkProfile::perfect(), 3).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;

    // The link is down: nothing arrives, everything is counted dropped.
    relay.set_blackout(true);
    let mut buf = [0u8; 32];
    for seq in 0..50u32 {
        buf[..4].copy_from_slice(&seq.to_be_bytes());
        client.send_to(&buf, relay.addr()).await?;
    }
    wait_for("50 datagrams offered", || {
        relay.stats().to_server.offered_datagrams >= 50
    })
    .await?;
    let stats = relay.stats().to_server;
    assert_eq!(stats.dropped_blackout, 50);
    assert_eq!(stats.delivered_datagrams, 0);
    assert_eq!(sink.count(), 0);

    // Back up: traffic flows again.
    relay.set_blackout(false);
    send_paced(&relay, &client, &sink, 50, 32, 10).await?;
    assert_eq!(sink.count(), 50);
    assert_eq!(relay.stats().to_server.delivered_datagrams, 50);
    relay.stop().await;

    // Datagrams already on their way (1 s one-way delay) when the link
    // dies are lost too.
    let slow = LinkProfile {
        rtt: Duration::from_secs(2),
        ..LinkProfile::perfect()
    };
    let sink = Sink::start().await?;
    let relay = Relay::start(sink.addr, slow, 3).await?;
    for seq in 0..10u32 {
        buf[..4].copy_from_slice(&seq.to_be_bytes());
        client.send_to(&buf, relay.addr()).await?;
    }
    wait_for("10 datagrams offered", || {
        relay.stats().to_server.offered_datagrams >= 10
    })
    .await?;
    relay.set_blackout(true);
    wait_for("the 10 to be lost on the air", || {
        relay.stats().to_server.dropped_blackout >= 10
    })
    .await?;
    relay.set_blackout(false);
    assert_eq!(sink.count(), 0);
    assert_eq!(relay.stats().to_server.delivered_datagrams, 0);
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_profile_applies_to_the_next_datagram() -> Result<()> {
    let sink = Sink::start().await?;
    let relay = Relay::start(sink.addr, LinkProfile::perfect(), 4).await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    send_paced(&relay, &client, &sink, 20, 32, 10).await?;
    assert_eq!(sink.count(), 20);

    // The laptop walks out of coverage: everything is lost.
    relay.set_profile(loss_only(1.0));
    assert_eq!(relay.profile(), loss_only(1.0));
    send_paced(&relay, &client, &sink, 20, 32, 10).await?;
    assert_eq!(sink.count(), 20);
    assert_eq!(relay.stats().to_server.dropped_loss, 20);

    // And back.
    relay.set_profile(LinkProfile::perfect());
    send_paced(&relay, &client, &sink, 20, 32, 10).await?;
    assert_eq!(sink.count(), 40);
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_follow_a_client_that_restarted_on_a_new_port() -> Result<()> {
    // An echo server.
    let server = UdpSocket::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let _ = server.send_to(&buf[..n], from).await;
        }
    });
    let relay = Relay::start(server_addr, LinkProfile::perfect(), 5).await?;

    for name in ["before restart", "after restart"] {
        let client = UdpSocket::bind("127.0.0.1:0").await?;
        client.send_to(name.as_bytes(), relay.addr()).await?;
        let mut buf = [0u8; 64];
        let (n, from) = bounded("the echo", client.recv_from(&mut buf)).await??;
        assert_eq!(&buf[..n], name.as_bytes());
        assert_eq!(from, relay.addr(), "replies come from the relay");
    }
    let stats = relay.stats();
    assert_eq!(stats.to_server.delivered_datagrams, 2);
    assert_eq!(stats.to_client.delivered_datagrams, 2);
    relay.stop().await;
    echo.abort();
    Ok(())
}

// ------------------------------------------------------- the model alone

/// Every named profile's random loss, run through the model in virtual
/// time (one datagram every 50 ms, so the bottleneck never queues), matches
/// the figure its docs give; the edge profile's blackouts take a tenth of
/// the time.
#[test]
fn the_profiles_lose_what_their_docs_say() {
    for (name, documented) in [
        ("good-wifi", 0.001),
        ("village-3g", 0.0297),
        ("edge-of-coverage", 0.10),
        ("perfect", 0.0),
    ] {
        let profile = LinkProfile::by_name(name).expect("named profile");
        assert!(
            (profile.expected_loss() - documented).abs() < 0.001,
            "{name}: expected_loss {} but docs say {documented}",
            profile.expected_loss()
        );
        for direction in [Direction::ToServer, Direction::ToClient] {
            let epoch = Instant::now();
            let mut model = LinkModel::new(11, direction, epoch);
            let (mut offered, mut lost, mut blacked) = (0u32, 0u32, 0u32);
            const N: u32 = 100_000;
            for i in 0..N {
                let now = epoch + Duration::from_millis(50) * i;
                match model.offer(&profile, now, 100, false) {
                    Fate::Dropped(DropReason::Blackout) => blacked += 1,
                    Fate::Dropped(DropReason::Loss) => {
                        offered += 1;
                        lost += 1;
                    }
                    Fate::Dropped(DropReason::Queue) => panic!("{name}: queue drop at 50 ms pace"),
                    Fate::Deliver { at, .. } => {
                        offered += 1;
                        assert!(at >= now + profile.rtt / 2 - profile.jitter);
                    }
                }
            }
            let rate = lost as f64 / offered as f64;
            let slack = 0.002 + documented * 0.15;
            eprintln!("{name} {direction:?}: loss {rate:.4} (documented {documented})");
            assert!(
                (rate - documented).abs() <= slack,
                "{name} {direction:?}: simulated loss {rate:.4}, documented {documented}"
            );
            let blackout_share = blacked as f64 / N as f64;
            let expected_share = if name == "edge-of-coverage" { 0.1 } else { 0.0 };
            assert!(
                (blackout_share - expected_share).abs() < 0.01,
                "{name}: blacked out {blackout_share:.3} of the time"
            );
        }
    }
    assert!(LinkProfile::by_name("dial-up").is_none());
    for name in LinkProfile::NAMES {
        assert!(LinkProfile::by_name(name).is_some());
    }
    assert_eq!(
        LinkProfile::by_name("perfect"),
        Some(LinkProfile::perfect())
    );

    // The burst model's arithmetic, as documented.
    let ge = GilbertElliott {
        p_good_to_bad: 0.025,
        p_bad_to_good: 0.25,
        loss_in_good: 0.01,
        loss_in_bad: 1.0,
    };
    assert!((ge.average_loss() - 0.10).abs() < 1e-9);
    assert!((ge.mean_bad_spell() - 4.0).abs() < 1e-9);

    let b = Blackouts {
        period: Duration::from_secs(30),
        duration: Duration::from_secs(3),
        offset: Duration::from_secs(15),
    };
    assert!(!b.active(Duration::from_secs(14)));
    assert!(b.active(Duration::from_secs(15)));
    assert!(b.active(Duration::from_millis(17_999)));
    assert!(!b.active(Duration::from_secs(18)));
    assert!(b.active(Duration::from_secs(46)));
}

/// The two directions draw from different streams of the same seed.
#[test]
fn the_directions_are_impaired_independently() {
    let epoch = Instant::now();
    let profile = loss_only(0.5);
    let pattern = |direction, seed| {
        let mut m = LinkModel::new(seed, direction, epoch);
        (0..256)
            .map(|_| matches!(m.offer(&profile, epoch, 10, false), Fate::Dropped(_)))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        pattern(Direction::ToServer, 1),
        pattern(Direction::ToServer, 1)
    );
    assert_ne!(
        pattern(Direction::ToServer, 1),
        pattern(Direction::ToClient, 1)
    );
}

// --------------------------------------------------------------- QUIC side

/// A QUIC server that echoes one bi stream, counting bytes as they arrive.
struct EchoServer {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    task: JoinHandle<Result<()>>,
}

impl EchoServer {
    fn start() -> Result<EchoServer> {
        let id = Identity::generate("center")?;
        let endpoint =
            quinn::Endpoint::server(identity::server_config(&id)?, "127.0.0.1:0".parse()?)?;
        let addr = endpoint.local_addr()?;
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        let task = tokio::spawn(async move {
            let incoming = endpoint.accept().await.context("no connection")?;
            let conn = incoming.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut data = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            while let Some(n) = recv.read(&mut chunk).await? {
                data.extend_from_slice(&chunk[..n]);
                count.store(data.len(), Ordering::SeqCst);
                ensure!(data.len() <= 4 * 1024 * 1024, "too much data");
            }
            send.write_all(&data).await?;
            send.finish()?;
            // Stay up until the client has read it all and closed.
            let _ = conn.closed().await;
            endpoint.close(0u32.into(), b"done");
            Ok(())
        });
        Ok(EchoServer {
            addr,
            received,
            task,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<u8>()).collect()
}

/// Connects to `addr` (the relay), sends `data` on a bi stream and returns
/// what comes back.
async fn echo_through(addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
    let id = Identity::generate("laptop")?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(identity::client_config(&id)?);
    let conn = endpoint.connect(addr, identity::SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(data).await?;
    send.finish()?;
    let back = recv.read_to_end(4 * 1024 * 1024).await?;
    conn.close(0u32.into(), b"thanks");
    Ok(back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_crosses_a_perfect_relay_intact() -> Result<()> {
    let server = EchoServer::start()?;
    let relay = Relay::start(server.addr, LinkProfile::perfect(), 1).await?;
    let data = payload(1024 * 1024, 1);
    let back = bounded("1 MB echo", echo_through(relay.addr(), &data)).await??;
    assert!(back == data, "the echo differs from what was sent");
    let stats = relay.stats();
    eprintln!("1 MB echo through perfect relay: {stats:?}");
    assert_eq!(stats.dropped(), 0);
    assert!(stats.to_server.delivered_bytes >= 1024 * 1024);
    assert!(stats.to_client.delivered_bytes >= 1024 * 1024);
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_transfer_survives_a_two_second_blackout() -> Result<()> {
    // Good Wi-Fi slowed to 8 Mbit/s, so 1 MB takes about a second and can
    // be cut mid-way.
    let profile = LinkProfile {
        bandwidth_bps: Some(8_000_000),
        ..LinkProfile::good_wifi()
    };
    let server = EchoServer::start()?;
    let relay = Relay::start(server.addr, profile, 9).await?;
    const LEN: usize = 1024 * 1024;
    let data = payload(LEN, 9);
    let addr = relay.addr();
    let sent = data.clone();
    let transfer = tokio::spawn(async move { echo_through(addr, &sent).await });

    // A quarter of the way through, the link dies for 2 s.
    wait_for("a quarter of the upload", || {
        server.received.load(Ordering::SeqCst) >= LEN / 4
    })
    .await?;
    relay.set_blackout(true);
    let at_cut = server.received.load(Ordering::SeqCst);
    eprintln!("cut after {at_cut} bytes reached the server");
    ensure!(at_cut < LEN, "the upload finished before the cut");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = relay.stats();
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let after = relay.stats();
    let during = server.received.load(Ordering::SeqCst);
    relay.set_blackout(false);

    assert_eq!(
        after.to_server.delivered_datagrams, before.to_server.delivered_datagrams,
        "nothing reaches the server during a blackout"
    );
    assert_eq!(
        after.to_client.delivered_datagrams,
        before.to_client.delivered_datagrams
    );
    assert!(
        after.to_server.dropped_blackout > before.to_server.dropped_blackout,
        "the client kept trying (QUIC probes) during the blackout"
    );
    assert!(during < LEN, "the upload cannot finish while cut");

    // QUIC recovers by itself once the link is back.
    let back = bounded("the transfer after the blackout", transfer).await???;
    assert!(back == data, "the echo differs from what was sent");
    let stats = relay.stats();
    eprintln!("after the blackout: {stats:?}");
    relay.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_transfer_completes_over_village_3g() -> Result<()> {
    let server = EchoServer::start()?;
    let relay = Relay::start(server.addr, LinkProfile::village_3g(), 3).await?;
    let data = payload(128 * 1024, 3);
    let started = Instant::now();
    let back = bounded(
        "128 KB echo over village 3G",
        echo_through(relay.addr(), &data),
    )
    .await??;
    assert!(back == data, "the echo differs from what was sent");
    let stats = relay.stats();
    eprintln!(
        "128 KB echo over village-3g took {:?}: {stats:?}",
        started.elapsed()
    );
    relay.stop().await;
    Ok(())
}
