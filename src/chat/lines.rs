//! Reading bounded lines and limiting how fast a connection may send them.

use std::io;
use std::time::{Duration, Instant};

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

/// Reads one line into `buf`, never holding more than `max` bytes of it. A longer line is
/// read to its end and discarded, so the next call starts at the next line.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    // One long line must not keep its buffer for the rest of the connection.
    buf.shrink_to(KEEP_LINE_BUFFER);
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if buf.is_empty() {
                Line::Eof
            } else {
                Line::Data
            });
        }
        let (chunk, found_end) = match available.iter().position(|b| *b == b'\n') {
            Some(pos) => (pos, true),
            None => (available.len(), false),
        };
        if !too_long && buf.len() + chunk > max {
            too_long = true;
            buf.clear();
        }
        if !too_long {
            buf.extend_from_slice(&available[..chunk]);
        }
        reader.consume(if found_end { chunk + 1 } else { chunk });
        if found_end {
            if too_long {
                return Ok(Line::TooLong);
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Line::Data);
        }
    }
}

/// A token bucket: `rate` commands a second sustained, `burst` at once.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// When the current stretch of rejections began, and the last rejection.
    over_since: Option<Instant>,
    last_reject: Option<Instant>,
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

impl RateLimiter {
    pub fn new(rate: u32, burst: u32, grace: Duration) -> RateLimiter {
        RateLimiter {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
            over_since: None,
            last_reject: None,
            grace,
        }
    }

    pub fn check(&mut self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        // A steady flood earns a token now and then; only a quiet grace period ends the stretch.
        let quiet = self
            .last_reject
            .is_none_or(|last| now.saturating_duration_since(last) > self.grace);
        if quiet {
            self.over_since = Some(now);
        }
        self.last_reject = Some(now);
        let since = self.over_since.unwrap_or(now);
        if now.saturating_duration_since(since) >= self.grace {
            Verdict::Close
        } else {
            Verdict::Reject
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let data: &[u8] = b"short\r\nthis line is far too long\nok\npartial";
        let mut reader = tokio::io::BufReader::with_capacity(4, data);
        let mut buf = Vec::new();
        assert!(matches!(
            read_line(&mut reader, &mut buf, 10).await.unwrap(),
            Line::Data
        ));
        assert_eq!(buf, b"short");
        assert!(matches!(
            read_line(&mut reader, &mut buf, 10).await.unwrap(),
            Line::TooLong
        ));
        assert!(matches!(
            read_line(&mut reader, &mut buf, 10).await.unwrap(),
            Line::Data
        ));
        assert_eq!(buf, b"ok");
        assert!(matches!(
            read_line(&mut reader, &mut buf, 10).await.unwrap(),
            Line::Data
        ));
        assert_eq!(buf, b"partial");
        assert!(matches!(
            read_line(&mut reader, &mut buf, 10).await.unwrap(),
            Line::Eof
        ));
    }

    #[test]
    fn limiter_rejects_then_closes() {
        let mut l = RateLimiter::new(1, 2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Verdict::Allow);
        assert_eq!(l.check_at(t0), Verdict::Allow);
        assert_eq!(l.check_at(t0), Verdict::Reject);
        assert_eq!(l.check_at(t0 + Duration::from_millis(1500)), Verdict::Allow);
        assert_eq!(
            l.check_at(t0 + Duration::from_millis(1500)),
            Verdict::Reject
        );
        assert_eq!(l.check_at(t0 + Duration::from_millis(2600)), Verdict::Allow);
        assert_eq!(
            l.check_at(t0 + Duration::from_millis(2600)),
            Verdict::Reject
        );
        assert_eq!(l.check_at(t0 + Duration::from_millis(3700)), Verdict::Allow);
    }

    #[test]
    fn a_steady_flood_is_closed() {
        let mut l = RateLimiter::new(10, 10, Duration::from_secs(1));
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..300)
            .map(|i| l.check_at(t0 + Duration::from_millis(10 * i)))
            .collect();
        assert!(verdicts.contains(&Verdict::Allow));
        assert!(verdicts.contains(&Verdict::Close));
    }
}
