//! A user-space UDP relay that impairs the link between two endpoints on
//! loopback, standing in for netem (which this kernel does not have).
//!
//! ```text
//!   client ──► relay.addr() ══[to_server: impaired]══► server
//!   client ◄── relay.addr() ══[to_client: impaired]══◄ server
//! ```
//!
//! The client talks to [`Relay::addr`] instead of the server. The relay
//! forwards each datagram to the server from a second socket of its own, and
//! sends the server's replies back to the latest client address it has seen
//! (so a client that restarts on a new port keeps working: one "session",
//! mapped by the latest client address).
//!
//! Each direction is impaired independently by a [`LinkModel`] with its own
//! ChaCha8 RNG, derived from the relay's seed and the direction, so a run can
//! be replayed: the same seed and the same sequence of datagrams in a
//! direction give the same random decisions. (Tail drops and blackouts also
//! depend on *when* datagrams arrive, so only the random decisions are exactly
//! replayable, not wall-clock effects.)
//!
//! The model of one direction, applied to every datagram in this order:
//!
//! 1. **Random draws.** A fixed number of draws per datagram (whatever
//!    happens to it), so one datagram's fate never shifts another's.
//! 2. **Blackout.** Scheduled ([`Blackouts`]) or manual
//!    ([`Relay::set_blackout`]): dropped. Datagrams already on the way that
//!    would be delivered during a blackout are dropped too.
//! 3. **Bottleneck queue.** With a bandwidth cap, each datagram occupies
//!    the link for `(len + 28) * 8 / bps` seconds (28 = IPv4 + UDP headers).
//!    Datagrams wait for the link in a FIFO of at most
//!    [`LinkProfile::queue_bytes`]; a datagram that does not fit is
//!    tail-dropped, as a bottleneck router does.
//! 4. **Loss.** Independent loss with probability [`LinkProfile::loss`],
//!    and/or a Gilbert-Elliott two-state model ([`GilbertElliott`]) for
//!    bursty loss. A lost datagram has still used its link time (it was lost
//!    on the air, after the bottleneck).
//! 5. **Delay.** Delivery at `max(link free, now) + serialization + rtt/2 +
//!    jitter`, the jitter bounded in `[-jitter, +jitter]` (triangular, i.e.
//!    normal-ish). Unless [`LinkProfile::jitter_reorders`] is set, jitter
//!    does not let a datagram overtake an earlier one (3G RLC and Wi-Fi block
//!    ack deliver in order); with probability [`LinkProfile::reorder`] a
//!    datagram is held back an extra [`LinkProfile::reorder_delay`] and
//!    later ones overtake it.
//! 6. **Duplication.** With probability [`LinkProfile::duplicate`] a second
//!    copy is delivered up to 1 ms after the first (not using link time).
//!
//! Delivery is done by a scheduler: a binary heap keyed by delivery time,
//! drained by the direction's task with `tokio::time::sleep_until`.
//!
//! Everything is bounded: datagrams up to [`DATAGRAM_BYTES_MAX`], the
//! bottleneck queue by `queue_bytes`, and the datagrams scheduled but not yet
//! delivered by [`IN_FLIGHT_DATAGRAMS_MAX`] and [`IN_FLIGHT_BYTES_MAX`] per
//! direction (beyond which datagrams are dropped and counted as queue
//! drops). The tasks end on [`Relay::stop`] (or are aborted when the relay is
//! dropped).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Largest datagram the relay reads (the UDP maximum); larger is impossible.
pub const DATAGRAM_BYTES_MAX: usize = 65_535;

/// Bytes of IPv4 + UDP header counted on the wire for serialization.
pub const WIRE_OVERHEAD_BYTES: usize = 28;

/// Most datagrams scheduled but not yet delivered, per direction.
pub const IN_FLIGHT_DATAGRAMS_MAX: usize = 16_384;

/// Most payload bytes scheduled but not yet delivered, per direction.
pub const IN_FLIGHT_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Extra delay of a duplicate after its original, at most.
const DUPLICATE_LAG_MAX: Duration = Duration::from_millis(1);

/// Gilbert-Elliott two-state loss model, stepped once per datagram.
///
/// The chain is in state Good or Bad. Before each datagram it moves
/// Good→Bad with probability `p_good_to_bad` and Bad→Good with
/// `p_bad_to_good`; the datagram is then lost with `loss_in_good` or
/// `loss_in_bad`. In the long run the chain is Bad a fraction
/// `π_bad = p_good_to_bad / (p_good_to_bad + p_bad_to_good)` of the time,
/// so the average loss is `π_good·loss_in_good + π_bad·loss_in_bad`
/// ([`GilbertElliott::average_loss`]). A Bad spell lasts
/// `1 / p_bad_to_good` datagrams on average, which sets the burst length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    pub p_good_to_bad: f64,
    pub p_bad_to_good: f64,
    pub loss_in_good: f64,
    pub loss_in_bad: f64,
}

impl GilbertElliott {
    /// Long-run fraction of time in the Bad state.
    pub fn bad_fraction(&self) -> f64 {
        let sum = self.p_good_to_bad + self.p_bad_to_good;
        if sum <= 0.0 {
            0.0
        } else {
            self.p_good_to_bad / sum
        }
    }

    /// Long-run average loss of this model alone.
    pub fn average_loss(&self) -> f64 {
        let bad = self.bad_fraction();
        (1.0 - bad) * self.loss_in_good + bad * self.loss_in_bad
    }

    /// Mean length of a Bad spell, in datagrams.
    pub fn mean_bad_spell(&self) -> f64 {
        if self.p_bad_to_good <= 0.0 {
            f64::INFINITY
        } else {
            1.0 / self.p_bad_to_good
        }
    }
}

/// Scheduled blackouts: the link is dead for `duration` at the start of
/// every `period`, the first one beginning `offset` after the relay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blackouts {
    pub period: Duration,
    pub duration: Duration,
    pub offset: Duration,
}

impl Blackouts {
    /// Whether the link is blacked out `since_start` after the relay began.
    pub fn active(&self, since_start: Duration) -> bool {
        if since_start < self.offset || self.period.is_zero() {
            return false;
        }
        let into = (since_start - self.offset).as_nanos() % self.period.as_nanos();
        into < self.duration.as_nanos()
    }
}

/// How one link behaves; both directions use the same figures (each with
/// its own random state). All probabilities are per datagram, in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// Round-trip propagation delay; each direction adds `rtt / 2`.
    pub rtt: Duration,
    /// Jitter bound: each datagram's one-way delay is shifted by a value in
    /// `[-jitter, +jitter]` (triangular distribution, mean 0), never below
    /// zero delay.
    pub jitter: Duration,
    /// Whether jitter may reorder datagrams. When false (the named
    /// profiles), a datagram is never delivered before one sent earlier
    /// on the same direction, except through `reorder`.
    pub jitter_reorders: bool,
    /// Bottleneck bandwidth in bits per second; `None` = unlimited.
    pub bandwidth_bps: Option<u64>,
    /// Bottleneck buffer: bytes (on the wire) that may wait for the link
    /// before tail drop. Ignored without a bandwidth cap.
    pub queue_bytes: usize,
    /// Independent loss probability.
    pub loss: f64,
    /// Bursty loss on top of `loss`; `None` = none.
    pub burst: Option<GilbertElliott>,
    /// Probability that a datagram is held back by `reorder_delay`.
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Scheduled blackouts; `None` = never.
    pub blackouts: Option<Blackouts>,
}

impl LinkProfile {
    /// No impairment at all: immediate, lossless, unlimited (for control
    /// tests and as a base for custom profiles with `..perfect()`).
    pub fn perfect() -> Self {
        LinkProfile {
            rtt: Duration::ZERO,
            jitter: Duration::ZERO,
            jitter_reorders: false,
            bandwidth_bps: None,
            queue_bytes: 0,
            loss: 0.0,
            burst: None,
            reorder: 0.0,
            reorder_delay: Duration::ZERO,
            duplicate: 0.0,
            blackouts: None,
        }
    }

    /// A decent Wi-Fi in the commune office on a fibre/VDSL line.
    ///
    /// Figures (assumptions, typical of 802.11n close to the access point
    /// behind a domestic fibre line in a district town; replace with field
    /// measurements when we have them): ~20 ms RTT, ±2 ms jitter,
    /// 20 Mbit/s, 0.1 % random loss, no reordering or duplication seen at
    /// the IP layer (block ack delivers in order). Buffer 256 KB, about
    /// 100 ms at 20 Mbit/s: access points and home routers queue hundreds
    /// of packets, far more than the 1.5 × BDP (75 KB) of a core router.
    pub fn good_wifi() -> Self {
        LinkProfile {
            rtt: Duration::from_millis(20),
            jitter: Duration::from_millis(2),
            bandwidth_bps: Some(20_000_000),
            queue_bytes: 256 * 1024,
            loss: 0.001,
            ..Self::perfect()
        }
    }

    /// The same link with a 64 KB bottleneck queue, the shallow end of what
    /// operators configure; for showing how the transport copes with
    /// tail drops as well as random loss.
    pub fn shallow_buffer(self) -> Self {
        LinkProfile {
            queue_bytes: 64 * 1024,
            ..self
        }
    }

    /// 3G (HSPA) in a village a few km from the tower: the usual case.
    ///
    /// Figures (assumptions from typical HSPA behaviour on a medium-weak
    /// signal in rural Vietnam — speed tests there commonly report 1–3
    /// Mbit/s and 200–400 ms RTT; replace with field measurements when we
    /// have them): 300 ms RTT, ±30 ms jitter, 2 Mbit/s, 250 KB buffer
    /// (about 1 s at 2 Mbit/s: 3G radio network controllers keep deep
    /// per-user queues; measurements of 3G/4G bufferbloat, e.g. Jiang et
    /// al., "Tackling Bufferbloat in 3G/4G Networks", IMC 2012, saw
    /// queueing delays of seconds). [`LinkProfile::shallow_buffer`] gives
    /// the same link with a 64 KB queue, where BBR overshoots and loses
    /// much more; the blob benchmark reports both.
    ///
    /// Loss ≈ 3 %: 2 % independent plus mild bursts (Gilbert-Elliott: Good→Bad
    /// 0.5 %, Bad→Good 50 %, so Bad ≈ 0.99 % of the time, 2 datagrams per
    /// spell on average, all lost in Bad): total
    /// `1 - (1 - 0.02)(1 - 0.0099) ≈ 2.97 %` ([`LinkProfile::expected_loss`]).
    /// Rare reordering (0.5 % held back 40 ms, e.g. an HARQ retransmission)
    /// and duplication (0.1 %, e.g. an RLC retransmission after a lost ack).
    pub fn village_3g() -> Self {
        LinkProfile {
            rtt: Duration::from_millis(300),
            jitter: Duration::from_millis(30),
            bandwidth_bps: Some(2_000_000),
            queue_bytes: 250_000,
            loss: 0.02,
            burst: Some(GilbertElliott {
                p_good_to_bad: 0.005,
                p_bad_to_good: 0.5,
                loss_in_good: 0.0,
                loss_in_bad: 1.0,
            }),
            reorder: 0.005,
            reorder_delay: Duration::from_millis(40),
            duplicate: 0.001,
            ..Self::perfect()
        }
    }

    /// The far end of the district: one bar of EDGE/3G that comes and goes.
    ///
    /// Figures (assumptions from typical cell-edge behaviour — EDGE or
    /// 3G falling back at the edge of coverage gives a few hundred kbit/s,
    /// RTT near a second, losses in bursts as the signal fades, and the
    /// link disappearing entirely for seconds; replace with field
    /// measurements when we have them): 800 ms RTT, ±100 ms jitter,
    /// 256 kbit/s, 64 KB buffer (2 s at 256 kbit/s, the same deep-queue
    /// reasoning as [`LinkProfile::village_3g`]; BDP is only 25.6 KB).
    ///
    /// Loss 10 %, bursty (Gilbert-Elliott only): Good→Bad 2.5 %, Bad→Good
    /// 25 % (Bad ≈ 9.09 % of the time, 4 datagrams per spell on average),
    /// all lost in Bad and 1 % lost in Good: `0.909 × 0.01 + 0.0909 × 1.0
    /// = 10.0 %`. Reordering 1 % (held back 150 ms), duplication 0.5 %.
    /// A 3 s blackout every 30 s, the first 15 s after the relay starts.
    pub fn edge_of_coverage() -> Self {
        LinkProfile {
            rtt: Duration::from_millis(800),
            jitter: Duration::from_millis(100),
            bandwidth_bps: Some(256_000),
            queue_bytes: 64 * 1024,
            loss: 0.0,
            burst: Some(GilbertElliott {
                p_good_to_bad: 0.025,
                p_bad_to_good: 0.25,
                loss_in_good: 0.01,
                loss_in_bad: 1.0,
            }),
            reorder: 0.01,
            reorder_delay: Duration::from_millis(150),
            duplicate: 0.005,
            blackouts: Some(Blackouts {
                period: Duration::from_secs(30),
                duration: Duration::from_secs(3),
                offset: Duration::from_secs(15),
            }),
            ..Self::perfect()
        }
    }

    /// The named profiles: `good-wifi`, `village-3g`, `edge-of-coverage`
    /// (and `perfect`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "good-wifi" => Some(Self::good_wifi()),
            "village-3g" => Some(Self::village_3g()),
            "edge-of-coverage" => Some(Self::edge_of_coverage()),
            "perfect" => Some(Self::perfect()),
            _ => None,
        }
    }

    /// Names accepted by [`LinkProfile::by_name`].
    pub const NAMES: [&'static str; 4] = ["good-wifi", "village-3g", "edge-of-coverage", "perfect"];

    /// Long-run random loss (independent and Gilbert-Elliott combined;
    /// excludes blackouts and tail drops, which depend on timing).
    pub fn expected_loss(&self) -> f64 {
        let burst = self.burst.map_or(0.0, |g| g.average_loss());
        1.0 - (1.0 - self.loss) * (1.0 - burst)
    }

    /// Whether a scheduled blackout is on `since_start` after the relay
    /// began.
    pub fn in_scheduled_blackout(&self, since_start: Duration) -> bool {
        self.blackouts.is_some_and(|b| b.active(since_start))
    }

    /// Time a datagram of `len` payload bytes occupies the link.
    pub fn serialization(&self, len: usize) -> Duration {
        match self.bandwidth_bps {
            Some(bps) if bps > 0 => {
                let bits = ((len + WIRE_OVERHEAD_BYTES) * 8) as u128;
                Duration::from_nanos((bits * 1_000_000_000 / bps as u128) as u64)
            }
            _ => Duration::ZERO,
        }
    }
}

/// Which way a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → server.
    ToServer,
    /// Server → client.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToServer => 0,
            Direction::ToClient => 1,
        }
    }
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Random loss (independent or Gilbert-Elliott).
    Loss,
    /// Scheduled or manual blackout.
    Blackout,
    /// Bottleneck queue full (tail drop), or the in-flight bound reached.
    Queue,
}

/// What the model decided for one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Dropped(DropReason),
    /// Deliver at `at`, and a second copy at `duplicate_at` if set.
    Deliver {
        at: Instant,
        duplicate_at: Option<Instant>,
    },
}

/// The impairment state of one direction, usable without sockets (the
/// tests drive it in virtual time to check the profiles' figures).
#[derive(Debug, Clone)]
pub struct LinkModel {
    rng: ChaCha8Rng,
    epoch: Instant,
    bad: bool,
    link_free: Instant,
    last_at: Instant,
}

impl LinkModel {
    /// A model whose RNG is derived from `seed` and `direction` (ChaCha8
    /// seeded from `seed`, stream = direction), with scheduled blackouts
    /// counted from `epoch`.
    pub fn new(seed: u64, direction: Direction, epoch: Instant) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(direction.index() as u64);
        LinkModel {
            rng,
            epoch,
            bad: false,
            link_free: epoch,
            last_at: epoch,
        }
    }

    /// Whether the Gilbert-Elliott chain is in its Bad state.
    pub fn in_bad_state(&self) -> bool {
        self.bad
    }

    /// Decides the fate of a datagram of `len` bytes offered at `now`.
    pub fn offer(
        &mut self,
        profile: &LinkProfile,
        now: Instant,
        len: usize,
        manual_blackout: bool,
    ) -> Fate {
        // 1. The same draws for every datagram, whatever happens to it.
        let u_transition: f64 = self.rng.random();
        let u_burst: f64 = self.rng.random();
        let u_loss: f64 = self.rng.random();
        let u_jitter_a: f64 = self.rng.random();
        let u_jitter_b: f64 = self.rng.random();
        let u_reorder: f64 = self.rng.random();
        let u_duplicate: f64 = self.rng.random();
        let u_duplicate_lag: f64 = self.rng.random();

        // The Gilbert-Elliott chain steps with every datagram.
        let burst_lost = match profile.burst {
            Some(g) => {
                self.bad = if self.bad {
                    u_transition >= g.p_bad_to_good
                } else {
                    u_transition < g.p_good_to_bad
                };
                let p = if self.bad {
                    g.loss_in_bad
                } else {
                    g.loss_in_good
                };
                u_burst < p
            }
            None => {
                self.bad = false;
                false
            }
        };

        // 2. Blackout.
        if manual_blackout || self.in_blackout(profile, now) {
            return Fate::Dropped(DropReason::Blackout);
        }

        // 3. Bottleneck queue.
        let serialization = profile.serialization(len);
        let departs = if let Some(bps) = profile.bandwidth_bps.filter(|b| *b > 0) {
            let waiting = self.link_free.saturating_duration_since(now);
            let backlog_bytes = (waiting.as_nanos() * bps as u128 / 8 / 1_000_000_000) as usize;
            if backlog_bytes + len + WIRE_OVERHEAD_BYTES > profile.queue_bytes {
                return Fate::Dropped(DropReason::Queue);
            }
            let start = self.link_free.max(now);
            self.link_free = start + serialization;
            self.link_free
        } else {
            now
        };

        // 4. Loss (after the link time was spent).
        if u_loss < profile.loss || burst_lost {
            return Fate::Dropped(DropReason::Loss);
        }

        // 5. Delay, jitter, reorder.
        let one_way = profile.rtt / 2;
        // Triangular on [-1, 1]: normal-ish, bounded.
        let shape = u_jitter_a + u_jitter_b - 1.0;
        let jitter_nanos = profile.jitter.as_nanos() as f64 * shape;
        let delay_nanos = (one_way.as_nanos() as f64 + jitter_nanos).max(0.0);
        let mut at = departs + Duration::from_nanos(delay_nanos as u64);
        if u_reorder < profile.reorder {
            // Held back; later datagrams overtake it. Not the new baseline.
            at = at.max(self.last_at) + profile.reorder_delay;
        } else {
            if !profile.jitter_reorders {
                at = at.max(self.last_at);
            }
            self.last_at = self.last_at.max(at);
        }

        // 6. Duplication.
        let duplicate_at = (u_duplicate < profile.duplicate)
            .then(|| at + DUPLICATE_LAG_MAX.mul_f64(u_duplicate_lag));
        Fate::Deliver { at, duplicate_at }
    }

    /// Whether a scheduled blackout is on at `t`.
    pub fn in_blackout(&self, profile: &LinkProfile, t: Instant) -> bool {
        profile.in_scheduled_blackout(t.saturating_duration_since(self.epoch))
    }
}

/// Counters of one direction. Once the relay is idle,
/// `delivered = offered - dropped + duplicated - send_errors` (in datagrams).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams (and payload bytes) the relay received for this direction.
    pub offered_datagrams: u64,
    pub offered_bytes: u64,
    /// Datagrams (and payload bytes) the relay sent on, duplicates included.
    pub delivered_datagrams: u64,
    pub delivered_bytes: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Dropped by a blackout (on arrival or at delivery time).
    pub dropped_blackout: u64,
    /// Tail-dropped at the bottleneck, or over the in-flight bound.
    pub dropped_queue: u64,
    /// Extra copies scheduled.
    pub duplicated: u64,
    /// Could not be sent on (no client known yet, or a socket error).
    pub send_errors: u64,
}

impl DirectionStats {
    /// All drops.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_blackout + self.dropped_queue
    }
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub to_server: DirectionStats,
    pub to_client: DirectionStats,
}

impl RelayStats {
    /// All drops, both directions.
    pub fn dropped(&self) -> u64 {
        self.to_server.dropped() + self.to_client.dropped()
    }

    /// All duplicates, both directions.
    pub fn duplicated(&self) -> u64 {
        self.to_server.duplicated + self.to_client.duplicated
    }

    /// The counters of `direction`.
    pub fn direction(&self, direction: Direction) -> &DirectionStats {
        match direction {
            Direction::ToServer => &self.to_server,
            Direction::ToClient => &self.to_client,
        }
    }
}

#[derive(Default)]
struct Counters {
    offered_datagrams: AtomicU64,
    offered_bytes: AtomicU64,
    delivered_datagrams: AtomicU64,
    delivered_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_blackout: AtomicU64,
    dropped_queue: AtomicU64,
    duplicated: AtomicU64,
    send_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, AtomicOrdering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> DirectionStats {
        let get = |c: &AtomicU64| c.load(AtomicOrdering::Relaxed);
        DirectionStats {
            offered_datagrams: get(&self.offered_datagrams),
            offered_bytes: get(&self.offered_bytes),
            delivered_datagrams: get(&self.delivered_datagrams),
            delivered_bytes: get(&self.delivered_bytes),
            dropped_loss: get(&self.dropped_loss),
            dropped_blackout: get(&self.dropped_blackout),
            dropped_queue: get(&self.dropped_queue),
            duplicated: get(&self.duplicated),
            send_errors: get(&self.send_errors),
        }
    }

    fn dropped(&self, reason: DropReason) {
        let c = match reason {
            DropReason::Loss => &self.dropped_loss,
            DropReason::Blackout => &self.dropped_blackout,
            DropReason::Queue => &self.dropped_queue,
        };
        bump(c, 1);
    }
}

/// State shared by the handle and both direction tasks.
struct Shared {
    server: SocketAddr,
    /// The latest address a client sent from.
    client: Mutex<Option<SocketAddr>>,
    profile: Mutex<LinkProfile>,
    blackout: AtomicBool,
    counters: [Counters; 2],
}

impl Shared {
    fn profile(&self) -> LinkProfile {
        *self.profile.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A datagram waiting for its delivery time.
struct Scheduled {
    at: Instant,
    seq: u64,
    to: SocketAddr,
    data: Arc<[u8]>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed, so the `BinaryHeap` (a max-heap) pops the earliest first;
    /// ties in send order.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// A running relay. See the module docs.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Binds 127.0.0.1:0, forwards datagrams between whichever client sends
    /// to it and `server` (one client "session"; a new client source address
    /// after a restart works too — replies go to the latest client address).
    pub async fn start(
        server: SocketAddr,
        profile: LinkProfile,
        seed: u64,
    ) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back_bind: SocketAddr = if server.is_ipv6() {
            "[::1]:0".parse().expect("literal")
        } else {
            "127.0.0.1:0".parse().expect("literal")
        };
        let back = Arc::new(UdpSocket::bind(back_bind).await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            server,
            client: Mutex::new(None),
            profile: Mutex::new(profile),
            blackout: AtomicBool::new(false),
            counters: Default::default(),
        });
        let epoch = Instant::now();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for (direction, src, dst) in [
            (Direction::ToServer, front.clone(), back.clone()),
            (Direction::ToClient, back.clone(), front.clone()),
        ] {
            let task = DirectionTask {
                direction,
                src,
                dst,
                shared: shared.clone(),
                model: LinkModel::new(seed, direction, epoch),
                heap: BinaryHeap::new(),
                in_flight_bytes: 0,
                seq: 0,
            };
            tasks.push(tokio::spawn(task.run(stop_rx.clone())));
        }
        Ok(Relay {
            addr,
            shared,
            stop,
            tasks,
        })
    }

    /// Where clients connect instead of the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server this relay forwards to.
    pub fn server(&self) -> SocketAddr {
        self.shared.server
    }

    /// Counters so far.
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            to_server: self.shared.counters[0].snapshot(),
            to_client: self.shared.counters[1].snapshot(),
        }
    }

    /// Manual cut: while on, every datagram is dropped both ways, including
    /// those already on the way.
    pub fn set_blackout(&self, on: bool) {
        self.shared.blackout.store(on, AtomicOrdering::SeqCst);
    }

    /// Replaces the profile for datagrams offered from now on (the loss
    /// chain's state and the link's backlog carry over).
    pub fn set_profile(&self, p: LinkProfile) {
        *self
            .shared
            .profile
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = p;
    }

    /// The current profile.
    pub fn profile(&self) -> LinkProfile {
        self.shared.profile()
    }

    /// Stops both tasks and waits for them; undelivered datagrams are
    /// discarded and the sockets closed.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct DirectionTask {
    direction: Direction,
    src: Arc<UdpSocket>,
    dst: Arc<UdpSocket>,
    shared: Arc<Shared>,
    model: LinkModel,
    heap: BinaryHeap<Scheduled>,
    in_flight_bytes: usize,
    seq: u64,
}

impl DirectionTask {
    fn counters(&self) -> &Counters {
        &self.shared.counters[self.direction.index()]
    }

    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut buf = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            let next = self.heap.peek().map(|s| s.at);
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                    self.deliver_due().await;
                }
                r = self.src.recv_from(&mut buf) => {
                    // Errors (e.g. ICMP unreachable reported on the socket)
                    // are not fatal to a relay.
                    if let Ok((n, from)) = r {
                        self.receive(&buf[..n], from);
                    }
                }
            }
        }
    }

    fn receive(&mut self, data: &[u8], from: SocketAddr) {
        if self.direction == Direction::ToClient && from != self.shared.server {
            return; // Not the server: not part of the session.
        }
        let c = self.counters();
        bump(&c.offered_datagrams, 1);
        bump(&c.offered_bytes, data.len() as u64);
        let mut client = self.shared.client.lock().unwrap_or_else(|e| e.into_inner());
        let to = match self.direction {
            Direction::ToServer => {
                *client = Some(from);
                self.shared.server
            }
            Direction::ToClient => match *client {
                Some(c) => c,
                None => {
                    drop(client);
                    bump(&self.counters().send_errors, 1);
                    return;
                }
            },
        };
        drop(client);

        let profile = self.shared.profile();
        let manual = self.shared.blackout.load(AtomicOrdering::SeqCst);
        let fate = self
            .model
            .offer(&profile, Instant::now(), data.len(), manual);
        let (at, duplicate_at) = match fate {
            Fate::Dropped(reason) => {
                self.counters().dropped(reason);
                return;
            }
            Fate::Deliver { at, duplicate_at } => (at, duplicate_at),
        };
        let data: Arc<[u8]> = Arc::from(data);
        for (i, when) in std::iter::once(at).chain(duplicate_at).enumerate() {
            if self.heap.len() >= IN_FLIGHT_DATAGRAMS_MAX
                || self.in_flight_bytes + data.len() > IN_FLIGHT_BYTES_MAX
            {
                // Over the bound: the original is a queue drop; an extra
                // copy is simply not made.
                if i == 0 {
                    self.counters().dropped(DropReason::Queue);
                    return;
                }
                continue;
            }
            if i > 0 {
                bump(&self.counters().duplicated, 1);
            }
            self.seq += 1;
            self.in_flight_bytes += data.len();
            self.heap.push(Scheduled {
                at: when,
                seq: self.seq,
                to,
                data: data.clone(),
            });
        }
    }

    async fn deliver_due(&mut self) {
        let now = Instant::now();
        while self.heap.peek().is_some_and(|s| s.at <= now) {
            let s = self.heap.pop().expect("peeked");
            self.in_flight_bytes -= s.data.len();
            let profile = self.shared.profile();
            if self.shared.blackout.load(AtomicOrdering::SeqCst)
                || self.model.in_blackout(&profile, now)
            {
                self.counters().dropped(DropReason::Blackout);
                continue;
            }
            match self.dst.send_to(&s.data, s.to).await {
                Ok(_) => {
                    let c = self.counters();
                    bump(&c.delivered_datagrams, 1);
                    bump(&c.delivered_bytes, s.data.len() as u64);
                }
                Err(_) => bump(&self.counters().send_errors, 1),
            }
        }
    }
}
