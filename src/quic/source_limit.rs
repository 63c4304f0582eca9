//! Token buckets per source IP for the datagrams the node answers without authentication (address
//! reflections): one source gets its share however fast it sends, and everyone together stay within a
//! global budget, so that the node cannot be used to amplify a flood and one flooder cannot starve the others.
//!
//! The table of sources is bounded: when it is full, sources whose buckets have refilled are forgotten (they
//! lose nothing: a new bucket starts full), and if none has, the newcomers share one overflow bucket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// A bucket's size and refill rate.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Tokens per second.
    pub per_second: f64,
    /// Largest burst: the bucket's capacity.
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self { tokens: rate.burst, updated: now }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * rate.per_second >= rate.burst
    }
}

/// Per-source and global token buckets; see the module documentation.
#[derive(Debug)]
pub struct SourceLimiter {
    per_source: Rate,
    global_rate: Rate,
    max_sources: usize,
    sources: HashMap<IpAddr, Bucket>,
    overflow: Bucket,
    global: Bucket,
}

impl SourceLimiter {
    pub fn new(per_source: Rate, global: Rate, max_sources: usize) -> Self {
        let now = Instant::now();
        Self {
            per_source,
            global_rate: global,
            max_sources: max_sources.max(1),
            sources: HashMap::new(),
            overflow: Bucket::full(per_source, now),
            global: Bucket::full(global, now),
        }
    }

    /// New rates from now on; buckets keep their tokens, up to the new bursts.
    pub fn set_rates(&mut self, per_source: Rate, global: Rate) {
        self.per_source = per_source;
        self.global_rate = global;
        for bucket in self.sources.values_mut().chain([&mut self.overflow]) {
            bucket.tokens = bucket.tokens.min(per_source.burst);
        }
        self.global.tokens = self.global.tokens.min(global.burst);
    }

    /// Whether a datagram from `source` may be answered now; takes a token from its bucket and the global one.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        self.global.refill(self.global_rate, now);
        if self.global.tokens < 1.0 {
            return false;
        }
        if !self.sources.contains_key(&source) && self.sources.len() >= self.max_sources {
            let rate = self.per_source;
            self.sources.retain(|_, bucket| !bucket.is_full(rate, now));
        }
        let bucket = if self.sources.len() < self.max_sources || self.sources.contains_key(&source) {
            self.sources.entry(source).or_insert_with(|| Bucket::full(self.per_source, now))
        } else {
            &mut self.overflow
        };
        bucket.refill(self.per_source, now);
        if bucket.tokens < 1.0 {
            return false;
        }
        bucket.tokens -= 1.0;
        self.global.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const PER_SOURCE: Rate = Rate { per_second: 10.0, burst: 20.0 };
    const GLOBAL: Rate = Rate { per_second: 100.0, burst: 100.0 };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, last])
    }

    fn allowed(limiter: &mut SourceLimiter, source: IpAddr, count: usize, now: Instant) -> usize {
        (0..count).filter(|_| limiter.allow(source, now)).count()
    }

    #[test]
    fn a_flooder_gets_its_burst_and_another_source_still_gets_answers() {
        let mut limiter = SourceLimiter::new(PER_SOURCE, GLOBAL, 64);
        let now = Instant::now();
        assert_eq!(allowed(&mut limiter, ip(1), 1000, now), 20);
        assert_eq!(
            allowed(&mut limiter, ip(2), 5, now),
            5,
            "the flood does not use up another source's share"
        );
        // A second later the flooder has earned ten more.
        assert_eq!(allowed(&mut limiter, ip(1), 1000, now + Duration::from_secs(1)), 10);
    }

    #[test]
    fn new_rates_apply_at_once_and_cap_saved_tokens() {
        let mut limiter = SourceLimiter::new(PER_SOURCE, GLOBAL, 64);
        let now = Instant::now();
        assert_eq!(allowed(&mut limiter, ip(1), 3, now), 3);
        limiter.set_rates(Rate { per_second: 1.0, burst: 2.0 }, GLOBAL);
        // 17 tokens were left; the new burst holds two.
        assert_eq!(allowed(&mut limiter, ip(1), 100, now), 2);
        assert_eq!(allowed(&mut limiter, ip(2), 100, now), 2, "a new source starts with the new burst");
        assert_eq!(allowed(&mut limiter, ip(1), 100, now + Duration::from_secs(1)), 1);
    }

    #[test]
    fn all_sources_together_stay_within_the_global_budget() {
        let mut limiter = SourceLimiter::new(PER_SOURCE, GLOBAL, 64);
        let now = Instant::now();
        let total: usize = (0..50).map(|i| allowed(&mut limiter, ip(i), 20, now)).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn a_full_table_forgets_refilled_sources_and_shares_an_overflow_bucket() {
        let mut limiter = SourceLimiter::new(PER_SOURCE, Rate { per_second: 1e6, burst: 1e6 }, 4);
        let now = Instant::now();
        for i in 0..4 {
            assert_eq!(allowed(&mut limiter, ip(i), 20, now), 20);
        }
        // No bucket has refilled: newcomers share the overflow bucket.
        assert_eq!(allowed(&mut limiter, ip(10), 15, now), 15);
        assert_eq!(allowed(&mut limiter, ip(11), 15, now), 5);
        // Once the old buckets are full again, they are forgotten and newcomers get buckets of their own.
        let later = now + Duration::from_secs(3);
        assert_eq!(allowed(&mut limiter, ip(12), 20, later), 20);
        assert!(limiter.sources.len() <= 4);
    }
}
