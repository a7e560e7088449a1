//! Reading bounded lines and limiting how fast a connection may send them.

use std::io;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

pub enum Line {
    /// One line without its `\n` (and without a trailing `\r`).
    Data,
    /// The line exceeded the limit; its bytes were discarded.
    TooLong,
    Eof,
}

/// The line buffer kept between lines; a longer one is released after its line.
const KEEP_LINE_BUFFER: usize = 16 * 1024;

/// The line being read, kept by the connection between calls of `read_line`. A read dropped
/// halfway through a line (a `select!` whose other branch fired, such as IRC's ping timer,
/// while the rest of the line had not arrived) keeps what it had taken from the reader here,
/// and the next call goes on with it: the line is not lost.
#[derive(Default)]
pub struct LineBuf {
    bytes: Vec<u8>,
    too_long: bool,
    /// The last call returned: the next one starts a new line.
    ended: bool,
}

impl LineBuf {
    /// The line `read_line` last returned as `Line::Data`.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn start(&mut self) {
        self.bytes.clear();
        // One long line must not keep its buffer for the rest of the connection.
        self.bytes.shrink_to(KEEP_LINE_BUFFER);
        self.too_long = false;
        self.ended = false;
    }

    fn end(&mut self, line: Line) -> Line {
        self.ended = true;
        line
    }
}

/// Reads one line into `line`, never holding more than `max` bytes of it. A longer line is
/// read to its end and discarded, so the next call starts at the next line. Cancel-safe: a
/// call dropped before it returned loses nothing (see `LineBuf`).
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut LineBuf,
    max: usize,
) -> io::Result<Line> {
    if line.ended {
        line.start();
    }
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            let end = if line.too_long {
                Line::TooLong
            } else if line.bytes.is_empty() {
                Line::Eof
            } else {
                Line::Data
            };
            return Ok(line.end(end));
        }
        let (chunk, found_end) = match available.iter().position(|b| *b == b'\n') {
            Some(pos) => (pos, true),
            None => (available.len(), false),
        };
        if !line.too_long && line.bytes.len() + chunk > max {
            line.too_long = true;
            line.bytes.clear();
        }
        if !line.too_long {
            line.bytes.extend_from_slice(&available[..chunk]);
        }
        // Nothing awaits between taking bytes from the reader and keeping them in `line`.
        reader.consume(if found_end { chunk + 1 } else { chunk });
        if found_end {
            if line.too_long {
                return Ok(line.end(Line::TooLong));
            }
            if line.bytes.last() == Some(&b'\r') {
                line.bytes.pop();
            }
            return Ok(line.end(Line::Data));
        }
    }
}

/// What a connection may send: `rate` writes a second sustained, `burst` at once (governor's
/// GCRA, one atomic word of state). A write costs one per target (an IRC target list counts
/// each) and junk lines cost one too. A client over the limit has its writes refused; one
/// that stays over it for the grace period is closed.
pub struct RateLimiter<C: Clock = DefaultClock> {
    bucket: Option<Gcra<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>>,
    clock: C,
    burst: NonZeroU32,
    /// When the current stretch of rejections began, and the last rejection.
    over_since: Option<C::Instant>,
    last_reject: Option<C::Instant>,
    grace: Duration,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over the limit: refuse this command.
    Reject,
    /// Over the limit for longer than the grace period: close the connection.
    Close,
}

impl RateLimiter<DefaultClock> {
    /// `rate` 0: no limit.
    pub fn new(rate: u32, burst: u32, grace: Duration) -> RateLimiter {
        RateLimiter::with_clock(rate, burst, grace, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RateLimiter<C> {
    pub fn with_clock(rate: u32, burst: u32, grace: Duration, clock: C) -> RateLimiter<C> {
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let bucket = NonZeroU32::new(rate).map(|rate| {
            Gcra::direct_with_clock(Quota::per_second(rate).allow_burst(burst), clock.clone())
        });
        RateLimiter {
            bucket,
            clock,
            burst,
            over_since: None,
            last_reject: None,
            grace,
        }
    }

    pub fn check(&mut self) -> Verdict {
        self.check_n(1)
    }

    /// Charges `cost` writes (at most a burst: a longer target list is charged a burst).
    pub fn check_n(&mut self, cost: u32) -> Verdict {
        let Some(bucket) = &self.bucket else {
            return Verdict::Allow;
        };
        let cost = NonZeroU32::new(cost.min(self.burst.get())).unwrap_or(NonZeroU32::MIN);
        if matches!(bucket.check_n(cost), Ok(Ok(()))) {
            return Verdict::Allow;
        }
        let now = self.clock.now();
        let since = |earlier: C::Instant| Duration::from(now.duration_since(earlier));
        // A steady flood earns a token now and then; only a quiet grace period ends the stretch.
        let quiet = self.last_reject.is_none_or(|last| since(last) > self.grace);
        if quiet {
            self.over_since = Some(now);
        }
        self.last_reject = Some(now);
        match self.over_since {
            Some(start) if since(start) >= self.grace => Verdict::Close,
            _ => Verdict::Reject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// What the next read returned: the line, or `<too long>` / `<eof>`.
    async fn next<R: AsyncBufRead + Unpin>(
        reader: &mut R,
        line: &mut LineBuf,
        max: usize,
    ) -> String {
        match read_line(reader, line, max).await.unwrap() {
            Line::Data => String::from_utf8_lossy(line.bytes()).into_owned(),
            Line::TooLong => "<too long>".into(),
            Line::Eof => "<eof>".into(),
        }
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let data: &[u8] = b"short\r\nthis line is far too long\nok\npartial";
        let mut reader = tokio::io::BufReader::with_capacity(4, data);
        let mut buf = LineBuf::default();
        assert_eq!(next(&mut reader, &mut buf, 10).await, "short");
        assert_eq!(next(&mut reader, &mut buf, 10).await, "<too long>");
        assert_eq!(next(&mut reader, &mut buf, 10).await, "ok");
        assert_eq!(next(&mut reader, &mut buf, 10).await, "partial");
        assert_eq!(next(&mut reader, &mut buf, 10).await, "<eof>");
    }

    #[tokio::test]
    async fn a_read_dropped_halfway_through_a_line_loses_none_of_it() {
        // IRC's ping timer fires while the rest of a line has not arrived: the read is
        // dropped, and the next one must still return the whole line.
        let (mut client, server) = tokio::io::duplex(4096);
        let mut reader = tokio::io::BufReader::new(server);
        let mut line = LineBuf::default();
        let wait = Duration::from_millis(20);
        client.write_all(b"JOIN #sp").await.unwrap();
        let waited = tokio::time::timeout(wait, read_line(&mut reader, &mut line, 100)).await;
        assert!(waited.is_err(), "a line without its end was returned");
        client.write_all(b"lit\r\nPING x\r\n").await.unwrap();
        assert_eq!(next(&mut reader, &mut line, 100).await, "JOIN #split");
        assert_eq!(next(&mut reader, &mut line, 100).await, "PING x");
        // The same for a line over the limit: it is still discarded whole.
        client.write_all(&[b'x'; 150]).await.unwrap();
        let waited = tokio::time::timeout(wait, read_line(&mut reader, &mut line, 100)).await;
        assert!(waited.is_err());
        client.write_all(b"yy\nok\n").await.unwrap();
        assert_eq!(next(&mut reader, &mut line, 100).await, "<too long>");
        assert_eq!(next(&mut reader, &mut line, 100).await, "ok");
    }

    #[test]
    fn limiter_rejects_then_closes() {
        let clock = governor::clock::FakeRelativeClock::default();
        let mut l = RateLimiter::with_clock(1, 2, Duration::from_secs(1), clock.clone());
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Reject);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Reject);
        clock.advance(Duration::from_millis(1100));
        assert_eq!(l.check(), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Reject);
    }

    #[test]
    fn a_target_list_costs_each_target() {
        let clock = governor::clock::FakeRelativeClock::default();
        let mut l = RateLimiter::with_clock(10, 10, Duration::from_secs(1), clock.clone());
        assert_eq!(l.check_n(7), Verdict::Allow);
        assert_eq!(l.check_n(7), Verdict::Reject, "3 left, 7 asked");
        assert_eq!(l.check_n(3), Verdict::Allow);
        clock.advance(Duration::from_millis(1500));
        // More targets than a burst are charged a whole burst, not refused forever.
        assert_eq!(l.check_n(1000), Verdict::Allow);
        assert_eq!(l.check(), Verdict::Reject);
    }

    #[test]
    fn a_steady_flood_is_closed() {
        let clock = governor::clock::FakeRelativeClock::default();
        let mut l = RateLimiter::with_clock(10, 10, Duration::from_secs(1), clock.clone());
        let verdicts: Vec<Verdict> = (0..300)
            .map(|_| {
                clock.advance(Duration::from_millis(10));
                l.check()
            })
            .collect();
        assert!(verdicts.contains(&Verdict::Allow));
        assert!(verdicts.contains(&Verdict::Close));
    }
}
