//! The congestion controller for village links: the window is a small
//! multiple of the delivery rate measured over whole round trips, times the
//! minimum RTT.
//!
//! Why not quinn's BBR (what we used before): its bandwidth estimate is a
//! max filter over per-ACK delivery rates, which ACK compression on jittery
//! cellular links inflates; it starts with a 240 KB window; and quinn paces
//! at the window per smoothed RTT, not at BBR's pacing rate. On the relay's
//! links it kept more in flight than the bottleneck queue holds, and tail
//! drops cost retransmissions: 1.07x to 2.2x a blob's size on the wire.
//! Why not Cubic or NewReno: they take random radio loss (3 % on village 3G,
//! 10 % at the edge of coverage) for congestion and collapse to a fraction
//! of the link.
//!
//! How it works ([`RateWindow`], pure: every input, `now` included, is
//! passed in, so the tests drive it with synthetic ACKs and time; the quinn
//! adapter [`RateCapped`] only forwards):
//!
//! - **Rate.** Bytes acknowledged over an interval of at least one minimum
//!   RTT, which averages ACK compression out. A windowed max over the last
//!   [`RATE_SAMPLES_MAX`] intervals rides out a dip from a loss burst.
//! - **Window** = [`WINDOW_GAIN`] x rate x (min RTT + [`ACK_DELAY_ALLOWANCE`]), never below
//!   [`WINDOW_FLOOR_PACKETS`] packets (nor below the initial window while
//!   the first samples come in). While the window limits the flow and there
//!   is no queue, each interval's rate is window / RTT, so the window grows
//!   by up to the gain per round trip: that is the startup probe. Once the
//!   bottleneck is full the rate stops growing and the window stays at
//!   gain x bandwidth-delay product: one BDP in flight, up to (gain - 1) BDP
//!   queued. Random loss does not shrink it.
//! - **Silences.** No ACK for [`GAP_AFTER_SRTTS`] smoothed RTTs (a
//!   blackout, a run of lost probes, an idle spell) is a gap, not a rate:
//!   the interval spanning it is thrown away, so a near-zero rate sampled
//!   across a blackout can never collapse the window (what stalled the
//!   first rate-capped controller at the edge of coverage). The samples from
//!   before a short silence still describe the path, and the window resumes
//!   at them: a fade is not a new path, and re-probing from the initial
//!   window after every 3 s blackout cost a quarter of the edge link's
//!   goodput in our benchmark. After a silence longer than [`STALE_AFTER`]
//!   (moved to another spot, a new cell, a laptop lid closed) the samples
//!   are stale: they are dropped and the controller re-probes from the
//!   initial window, as at the start of a connection. A rate that is too
//!   high after a short silence is forgotten within [`RATE_SAMPLES_MAX`]
//!   intervals, as any rate is.
//!
//! What it must never do: return a window below the floor (quinn needs a
//! non-zero window, and a window of a packet or two leaves loss detection
//! to probe timeouts alone), take a rate over a silence, or read a clock.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// Window as a multiple of the measured bandwidth-delay product. Above 1 so
/// that packets lost in flight, ACK delay and the rate filter's lag do not
/// leave the link idle; small so that what waits at the bottleneck stays
/// below the shallowest queue we model (village 3G with a 64 KB queue holds
/// its 75 KB BDP plus 64 KB queued, about 1.9 BDP). With 2, the benchmark
/// had no tail drops on any profile with the documented queues (README).
pub const WINDOW_GAIN: f64 = 2.0;

/// Added to the minimum RTT in the window: a receiver may hold an ACK
/// back this long (quinn's default `max_ack_delay`, as RFC 9002 adds it to
/// the probe timeout), so ACKs, and with them the window, would otherwise
/// trail the data on a short path. Without it, on loopback (microsecond
/// RTTs) the window sat near its floor: a 10,000-case first sync took
/// 7.2 s as processes and 3.8 s in-process, against 2.6 s and 2.7 s with
/// it (`sync_scale` benchmark). On a 300 ms village path it adds 8 %.
pub const ACK_DELAY_ALLOWANCE: Duration = Duration::from_millis(25);

/// Window before any rate is measured, in packets: RFC 9002's recommended
/// initial window (10 packets), not quinn BBR's 200, which alone floods a
/// 64 KB bottleneck queue.
pub const INITIAL_WINDOW_PACKETS: u64 = 10;

/// Smallest window, in packets. Two packets is RFC 9002's minimum; four
/// keeps enough in flight that a loss is detected by later ACKs rather than
/// by a probe timeout (seconds on a link whose RTT is near a second).
pub const WINDOW_FLOOR_PACKETS: u64 = 4;

/// Intervals the rate filter keeps (a windowed max over about that many
/// round trips); also how many measured intervals the initial window stays
/// the floor after a (re)start, so one slow first interval (loss recovery
/// after a blackout) cannot undercut the probe.
pub const RATE_SAMPLES_MAX: usize = 6;

/// Shortest rate-sampling interval, so microsecond RTTs on loopback do not
/// turn single ACKs into rates.
pub const SAMPLE_INTERVAL_MIN: Duration = Duration::from_millis(25);

/// Silence that breaks a rate interval, in smoothed RTTs: ACKs arrive every
/// few milliseconds while data flows, so two RTTs without one means a
/// blackout or an idle spell.
pub const GAP_AFTER_SRTTS: u32 = 2;

/// Floor of the gap threshold, so on loopback a scheduling hiccup is not a
/// blackout.
pub const GAP_AFTER_MIN: Duration = Duration::from_millis(200);

/// Silence after which the rate samples are stale and the controller
/// re-probes from the initial window. Longer than the fades of a few
/// seconds the edge-of-coverage profile models (a 3 s blackout plus the
/// probe timeout after it is about 7 s of silence), shorter than moving to
/// another spot or closing a laptop.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// What the controller learns from one batch of ACKs about the RTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttSample {
    /// Smallest RTT seen on the connection (the propagation delay).
    pub min: Duration,
    /// Smoothed RTT (queueing included).
    pub smoothed: Duration,
}

/// One delivery-rate measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RateSample {
    /// Bytes per second acknowledged over the interval.
    bytes_per_sec: f64,
    /// Whether the sender ran out of data during the interval (the rate
    /// then says how much it had, not what the path carries).
    app_limited: bool,
}

/// The interval being measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Interval {
    /// The ACK batch that opened it (its bytes belong to the interval
    /// before).
    start: Instant,
    /// Bytes acknowledged after `start`.
    bytes: u64,
    /// Whether any batch in it was app-limited.
    app_limited: bool,
}

/// The controller's state, without quinn: see the module docs.
#[derive(Debug, Clone)]
pub struct RateWindow {
    /// Current path MTU, the unit of the floor and the initial window.
    mtu: u64,
    /// Smallest RTT seen on the connection, as quinn's estimator says;
    /// `None` until the first ACK.
    min_rtt: Option<Duration>,
    /// Time of the last ACK batch that acknowledged bytes.
    last_ack: Option<Instant>,
    /// Interval being measured; `None` until an ACK opens one.
    interval: Option<Interval>,
    /// The last [`RATE_SAMPLES_MAX`] rates, oldest first.
    samples: VecDeque<RateSample>,
    /// Samples taken while the window limited the flow since the last
    /// (re)start, up to [`RATE_SAMPLES_MAX`].
    measured: usize,
    /// Silences that broke an interval (for tests and diagnostics).
    gaps: u64,
    /// Times the samples were found stale and the controller re-probed.
    restarts: u64,
}

impl RateWindow {
    /// A controller for a path with this MTU, probing from the initial
    /// window.
    pub fn new(mtu: u16) -> Self {
        RateWindow {
            mtu: u64::from(mtu),
            min_rtt: None,
            last_ack: None,
            interval: None,
            samples: VecDeque::with_capacity(RATE_SAMPLES_MAX + 1),
            measured: 0,
            gaps: 0,
            restarts: 0,
        }
    }

    /// The window before any rate is known.
    pub fn initial_window(&self) -> u64 {
        INITIAL_WINDOW_PACKETS * self.mtu
    }

    /// The window never goes below this.
    pub fn floor(&self) -> u64 {
        WINDOW_FLOOR_PACKETS * self.mtu
    }

    /// Silences that broke a rate interval.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }

    /// Times the samples were found stale and the controller re-probed.
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The rate the window is computed from: the highest recent sample, in
    /// bytes per second (`None` until one is taken).
    pub fn rate(&self) -> Option<f64> {
        self.samples
            .iter()
            .map(|s| s.bytes_per_sec)
            .fold(None, |best, r| Some(best.map_or(r, |b: f64| b.max(r))))
    }

    /// Bytes that may be in flight.
    pub fn window(&self) -> u64 {
        // Until enough samples were taken while the window, not the
        // application, limited the flow, they may only say how little there
        // was to send, or how slow loss recovery was after a blackout: the
        // probe does not go below the initial window on their account.
        let floor = if self.measured >= RATE_SAMPLES_MAX {
            self.floor()
        } else {
            self.initial_window()
        };
        match (self.rate(), self.min_rtt) {
            (Some(rate), Some(min_rtt)) => {
                let window = WINDOW_GAIN * rate * (min_rtt + ACK_DELAY_ALLOWANCE).as_secs_f64();
                // `as` saturates: a NaN or huge product cannot wrap.
                (window as u64).max(floor)
            }
            _ => floor,
        }
    }

    /// A batch of ACKs arrived at `now`, acknowledging `bytes` of
    /// ack-eliciting packets; `app_limited` if the sender had run out of
    /// data before it.
    pub fn on_acks(&mut self, now: Instant, bytes: u64, app_limited: bool, rtt: RttSample) {
        if bytes == 0 {
            return;
        }
        // The estimator's own minimum, not a minimum of what it said: quinn
        // hands the first ACKs over before its first RTT sample, when its
        // minimum is still the 333 ms default; kept, that would pin the
        // window below the BDP of any slower path (800 ms at the edge of
        // coverage).
        self.min_rtt = Some(rtt.min);
        let silence = self
            .last_ack
            .map_or(Duration::ZERO, |last| now.saturating_duration_since(last));
        self.last_ack = Some(now);
        if silence > STALE_AFTER {
            self.restart();
        } else if silence > (rtt.smoothed * GAP_AFTER_SRTTS).max(GAP_AFTER_MIN) {
            self.gaps += 1;
            self.interval = None;
        }
        let Some(interval) = self.interval.as_mut() else {
            // This batch opens the first interval (or the first after a
            // silence); its bytes were delivered before it.
            self.interval = Some(Interval {
                start: now,
                bytes: 0,
                app_limited: false,
            });
            return;
        };
        interval.bytes += bytes;
        interval.app_limited |= app_limited;
        let span = now.saturating_duration_since(interval.start);
        if span < rtt.min.max(SAMPLE_INTERVAL_MIN) {
            return;
        }
        let sample = RateSample {
            bytes_per_sec: interval.bytes as f64 / span.as_secs_f64(),
            app_limited: interval.app_limited,
        };
        *interval = Interval {
            start: now,
            bytes: 0,
            app_limited: false,
        };
        // An app-limited interval says little about the path unless it is
        // faster than what we knew.
        if !sample.app_limited || self.rate().is_none_or(|best| sample.bytes_per_sec > best) {
            self.samples.push_back(sample);
            if self.samples.len() > RATE_SAMPLES_MAX {
                self.samples.pop_front();
            }
        }
        if !sample.app_limited {
            self.measured = (self.measured + 1).min(RATE_SAMPLES_MAX);
        }
    }

    /// Packets were declared lost. Random radio loss is not congestion, and
    /// tail drops show in the rate, so loss changes nothing but this:
    /// persistent congestion (everything sent over several probe timeouts
    /// lost) means the interval being measured spans a blackout.
    pub fn on_loss(&mut self, persistent: bool) {
        if persistent && self.interval.take().is_some() {
            self.gaps += 1;
        }
    }

    /// The path MTU changed.
    pub fn on_mtu(&mut self, mtu: u16) {
        self.mtu = u64::from(mtu);
    }

    /// Forgets the rate and re-probes from the initial window.
    fn restart(&mut self) {
        self.restarts += 1;
        self.samples.clear();
        self.interval = None;
        self.measured = 0;
    }
}

/// Builds [`RateCapped`] controllers for quinn.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateCappedConfig;

impl ControllerFactory for RateCappedConfig {
    fn build(self: Arc<Self>, _now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(RateCapped {
            core: RateWindow::new(current_mtu),
            batch_bytes: 0,
            batch_rtt: None,
        })
    }
}

/// quinn's side of [`RateWindow`]: collects a batch's ACKs and hands the
/// batch over when quinn says it ended.
#[derive(Debug, Clone)]
pub struct RateCapped {
    core: RateWindow,
    /// Bytes acknowledged in the batch being delivered.
    batch_bytes: u64,
    /// The RTT estimate as of the batch's last ACK.
    batch_rtt: Option<RttSample>,
}

impl RateCapped {
    /// The pure controller inside.
    pub fn core(&self) -> &RateWindow {
        &self.core
    }
}

impl Controller for RateCapped {
    fn on_ack(
        &mut self,
        _now: Instant,
        _sent: Instant,
        bytes: u64,
        _app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.batch_bytes += bytes;
        self.batch_rtt = Some(RttSample {
            min: rtt.min(),
            smoothed: rtt.get(),
        });
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        _in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        if let Some(rtt) = self.batch_rtt.take() {
            self.core.on_acks(now, self.batch_bytes, app_limited, rtt);
        }
        self.batch_bytes = 0;
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        self.core.on_loss(is_persistent_congestion);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.core.on_mtu(new_mtu);
    }

    fn window(&self) -> u64 {
        self.core.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = ControllerMetrics::default();
        m.congestion_window = self.core.window();
        m.pacing_rate = self.core.rate().map(|r| (r * 8.0) as u64);
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.core.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    //! The controller driven with synthetic ACK batches and a synthetic
    //! clock: no sockets, no sleeping, the same result every run.

    use super::*;

    const MTU: u16 = 1200;

    /// Village 3G's figures: 300 ms RTT, 2 Mbit/s.
    const MIN_RTT: Duration = Duration::from_millis(300);
    const RATE_BYTES_PER_SEC: u64 = 250_000;

    fn rtt() -> RttSample {
        RttSample {
            min: MIN_RTT,
            smoothed: Duration::from_millis(450),
        }
    }

    /// Feeds ACK batches every 10 ms for `span`, acknowledging
    /// `bytes_per_sec`; returns the time after the last batch. Checks the
    /// floor after every batch.
    fn feed(
        rw: &mut RateWindow,
        from: Instant,
        span: Duration,
        bytes_per_sec: u64,
        app_limited: bool,
    ) -> Instant {
        let step = Duration::from_millis(10);
        let per_batch = bytes_per_sec / 100;
        let mut now = from;
        while now < from + span {
            now += step;
            rw.on_acks(now, per_batch, app_limited, rtt());
            assert!(rw.window() >= rw.floor(), "window below the floor");
        }
        now
    }

    fn expected_cap(bytes_per_sec: u64) -> u64 {
        (WINDOW_GAIN * bytes_per_sec as f64 * (MIN_RTT + ACK_DELAY_ALLOWANCE).as_secs_f64()) as u64
    }

    #[test]
    fn starts_at_the_initial_window() {
        let rw = RateWindow::new(MTU);
        assert_eq!(rw.window(), INITIAL_WINDOW_PACKETS * u64::from(MTU));
        assert_eq!(rw.rate(), None);
    }

    #[test]
    fn window_is_the_gain_times_rate_times_min_rtt() {
        let mut rw = RateWindow::new(MTU);
        feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(5),
            RATE_BYTES_PER_SEC,
            false,
        );
        assert_eq!(rw.rate(), Some(RATE_BYTES_PER_SEC as f64));
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC));
        // 2 x 81.25 KB: the BDP (with the ACK delay allowance) in flight
        // and as much again queued.
        assert_eq!(rw.window(), 162_500);
    }

    #[test]
    fn random_loss_does_not_shrink_the_window() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(5),
            RATE_BYTES_PER_SEC,
            false,
        );
        let before = rw.window();
        for _ in 0..100 {
            rw.on_loss(false);
        }
        assert_eq!(rw.window(), before);
        feed(
            &mut rw,
            now,
            Duration::from_secs(1),
            RATE_BYTES_PER_SEC,
            false,
        );
        assert_eq!(rw.window(), before);
    }

    #[test]
    fn follows_the_rate_down_once_the_filter_forgets_the_old_one() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(5),
            RATE_BYTES_PER_SEC,
            false,
        );
        // A handover to a cell with half the capacity, ACKs never stopping.
        feed(
            &mut rw,
            now,
            Duration::from_secs(5),
            RATE_BYTES_PER_SEC / 2,
            false,
        );
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC / 2));
        assert_eq!(rw.restarts(), 0);
    }

    /// A fluid model of a window-limited flow: each RTT, what is in flight
    /// is acknowledged, at most the link's rate. The window must grow by
    /// about the gain per round trip from the initial window to the cap,
    /// and then stay there.
    #[test]
    fn probes_up_to_the_link_rate_and_stops_there() {
        let mut rw = RateWindow::new(MTU);
        let step = Duration::from_millis(10);
        let mut now = Instant::now();
        let mut windows = Vec::new();
        for _round in 0..12 {
            let window = rw.window();
            windows.push(window);
            let rate = (window as f64 / MIN_RTT.as_secs_f64()).min(RATE_BYTES_PER_SEC as f64);
            let per_batch = (rate / 100.0) as u64;
            for _ in 0..30 {
                now += step;
                rw.on_acks(now, per_batch, false, rtt());
                assert!(rw.window() >= rw.floor());
            }
        }
        let cap = expected_cap(RATE_BYTES_PER_SEC);
        // Monotonic growth, by at most the gain per round trip (with the
        // ACK delay allowance on top of the RTT).
        let per_round =
            WINDOW_GAIN * (MIN_RTT + ACK_DELAY_ALLOWANCE).as_secs_f64() / MIN_RTT.as_secs_f64();
        for pair in windows.windows(2) {
            assert!(pair[1] >= pair[0], "window shrank: {windows:?}");
            assert!(
                pair[1] as f64 <= pair[0] as f64 * per_round * 1.01,
                "{windows:?}"
            );
        }
        // Reached the cap within a few round trips (a sample closes one
        // batch into the next round, so the gain applies every other round
        // here), and never beyond it.
        let at_cap = windows.iter().position(|w| w.abs_diff(cap) <= cap / 100);
        assert!(
            at_cap.is_some_and(|round| round <= 10),
            "did not reach {cap}: {windows:?}"
        );
        assert!(windows.iter().all(|w| *w <= cap + cap / 100), "{windows:?}");
    }

    #[test]
    fn never_below_the_floor() {
        let mut rw = RateWindow::new(MTU);
        // A trickle while there was little to send: the initial window stays.
        let now = feed(&mut rw, Instant::now(), Duration::from_secs(3), 100, true);
        assert_eq!(rw.window(), rw.initial_window());
        // A trickle while the window limited the flow: the floor, not zero.
        feed(&mut rw, now, Duration::from_secs(3), 100, false);
        assert_eq!(rw.window(), WINDOW_FLOOR_PACKETS * u64::from(MTU));
        assert!(rw.window() > 0);
    }

    #[test]
    fn app_limited_samples_only_raise_the_rate() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(3),
            RATE_BYTES_PER_SEC,
            false,
        );
        // Little to send for a while (case records): no news about the path.
        feed(&mut rw, now, Duration::from_secs(3), 1_000, true);
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC));
    }

    /// The edge-of-coverage failure the previous rate-capped controller
    /// had: a rate sampled across a blackout is near zero, and a window
    /// built from it starves the connection. Here the silence is a gap: no
    /// sample spans it, the window resumes at the rate from before, and the
    /// slow first round trip of loss recovery does not pull it down.
    #[test]
    fn resumes_after_a_blackout() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(5),
            RATE_BYTES_PER_SEC,
            false,
        );
        let cap = rw.window();
        assert_eq!(cap, expected_cap(RATE_BYTES_PER_SEC));

        // 3 s without an ACK, then one batch acknowledging a probe.
        let after = now + Duration::from_secs(3);
        rw.on_acks(after, 1200, false, rtt());
        assert_eq!((rw.gaps(), rw.restarts()), (1, 0));
        assert_eq!(rw.window(), cap);

        // Loss recovery trickles for a second, then delivery resumes.
        let now = feed(&mut rw, after, Duration::from_secs(1), 5_000, false);
        assert_eq!(rw.window(), cap);
        feed(
            &mut rw,
            now,
            Duration::from_secs(1),
            RATE_BYTES_PER_SEC,
            false,
        );
        assert_eq!(rw.window(), cap);
        assert_eq!((rw.gaps(), rw.restarts()), (1, 0));
    }

    /// After a long silence the samples are stale (the laptop may be on
    /// another cell): the controller re-probes from the initial window and
    /// is back at the new path's rate within a round trip or two.
    #[test]
    fn reprobes_after_a_long_silence() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(5),
            RATE_BYTES_PER_SEC,
            false,
        );
        let after = now + STALE_AFTER + Duration::from_secs(1);
        rw.on_acks(after, 1200, false, rtt());
        assert_eq!(rw.restarts(), 1);
        assert_eq!(rw.rate(), None, "a rate from before the silence");
        assert_eq!(rw.window(), rw.initial_window());

        // A slow first interval does not pull the probe below the initial
        // window.
        let now = feed(&mut rw, after, Duration::from_millis(400), 2_000, false);
        assert_eq!(rw.window(), rw.initial_window());
        // The new path is half as fast.
        feed(
            &mut rw,
            now,
            Duration::from_secs(3),
            RATE_BYTES_PER_SEC / 2,
            false,
        );
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC / 2));
        assert_eq!(rw.restarts(), 1);
    }

    #[test]
    fn a_pause_shorter_than_two_rtts_is_not_a_blackout() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(3),
            RATE_BYTES_PER_SEC,
            false,
        );
        rw.on_acks(now + Duration::from_millis(800), 1200, false, rtt());
        assert_eq!(rw.restarts(), 0);
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC));
    }

    #[test]
    fn persistent_congestion_breaks_the_interval_not_the_rate() {
        let mut rw = RateWindow::new(MTU);
        let now = feed(
            &mut rw,
            Instant::now(),
            Duration::from_secs(3),
            RATE_BYTES_PER_SEC,
            false,
        );
        rw.on_loss(true);
        assert_eq!((rw.gaps(), rw.restarts()), (1, 0));
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC));
        feed(
            &mut rw,
            now,
            Duration::from_secs(1),
            RATE_BYTES_PER_SEC,
            false,
        );
        assert_eq!(rw.window(), expected_cap(RATE_BYTES_PER_SEC));
    }

    /// quinn hands the first ACKs over before its first RTT sample, with
    /// its 333 ms default as the minimum; on an 800 ms path the window must
    /// follow the real minimum, or it stays below the BDP and never grows.
    #[test]
    fn the_min_rtt_is_the_estimators_latest_word() {
        let mut rw = RateWindow::new(MTU);
        let start = Instant::now();
        let default = RttSample {
            min: Duration::from_millis(333),
            smoothed: Duration::from_millis(333),
        };
        rw.on_acks(start, 1200, false, default);
        let edge = RttSample {
            min: Duration::from_millis(800),
            smoothed: Duration::from_millis(900),
        };
        let mut now = start;
        for _ in 0..300 {
            now += Duration::from_millis(10);
            rw.on_acks(now, 320, false, edge);
        }
        // 32,000 B/s x (0.8 s + the ACK delay allowance) x gain.
        assert_eq!(rw.window(), (WINDOW_GAIN * 32_000.0 * 0.825) as u64);
    }

    #[test]
    fn the_floor_follows_the_mtu() {
        let mut rw = RateWindow::new(MTU);
        rw.on_mtu(1452);
        assert_eq!(rw.floor(), WINDOW_FLOOR_PACKETS * 1452);
        assert_eq!(rw.initial_window(), INITIAL_WINDOW_PACKETS * 1452);
    }
}
