//! Time as people read and type it: the `--seen-since` duration syntax (`10m`, `2h`, `1h30m`), durations such
//! as uptime (`1h 2m 3s`), ages relative to now (`3m ago`) and RFC 3339 UTC timestamps.
//!
//! Everything here is pure: the current time is always a parameter, so the formatting is testable and a single
//! command shows all its ages relative to the same instant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_reflect::prost_types;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;

/// Parses a duration such as `90s`, `10m`, `2h`, `7d`, `1w` or a sum of them like `1h30m`.
///
/// A unit is required on every number: a bare `10` is ambiguous (seconds? minutes?) and rejected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    const HINT: &str = "expected a number with a unit s, m, h, d or w, like 90s, 10m, 2h, 7d or 1h30m";
    if text.is_empty() {
        return Err(format!("empty duration: {HINT}"));
    }
    let mut total: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits_end == 0 {
            return Err(format!("unexpected {:?} in {text:?}: {HINT}", rest));
        }
        let (digits, after) = rest.split_at(digits_end);
        let mut chars = after.chars();
        let unit_seconds = match chars.next() {
            Some('s') => 1,
            Some('m') => MINUTE,
            Some('h') => HOUR,
            Some('d') => DAY,
            Some('w') => WEEK,
            Some(other) => return Err(format!("unknown unit {other:?} in {text:?}: {HINT}")),
            None => return Err(format!("missing unit after {digits} in {text:?}: {HINT}")),
        };
        let too_long = || format!("{text:?} is too long a duration");
        let value: u64 = digits.parse().map_err(|_| too_long())?;
        let seconds = value.checked_mul(unit_seconds).ok_or_else(too_long)?;
        total = total.checked_add(seconds).ok_or_else(too_long)?;
        rest = chars.as_str();
    }
    Ok(Duration::from_secs(total))
}

/// Formats whole seconds as `2d 3h 4m 5s`, leaving out zero parts (`1h 5s`); zero is `0s`.
pub fn format_duration(seconds: u64) -> String {
    if seconds == 0 {
        return "0s".to_owned();
    }
    let parts = [
        (seconds / DAY, "d"),
        (seconds % DAY / HOUR, "h"),
        (seconds % HOUR / MINUTE, "m"),
        (seconds % MINUTE, "s"),
    ];
    parts
        .iter()
        .filter(|(amount, _)| *amount > 0)
        .map(|(amount, unit)| format!("{amount}{unit}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Formats a protobuf duration (uptime, timeouts) like [`format_duration`]; negative values count as zero.
pub fn format_proto_duration(duration: &prost_types::Duration) -> String {
    format_duration(u64::try_from(duration.seconds).unwrap_or(0))
}

/// Formats a round-trip time in milliseconds with one decimal, e.g. `12.3 ms`.
pub fn format_rtt(duration: &prost_types::Duration) -> String {
    let millis = duration.seconds as f64 * 1000.0 + f64::from(duration.nanos) / 1_000_000.0;
    format!("{millis:.1} ms")
}

/// How long ago `then` was, in its largest whole unit: `42s ago`, `3m ago`, `2h ago`, `5d ago`.
/// Times in the future (clock skew between machines) read `in 3m`.
pub fn format_age(then_seconds: i64, now_seconds: i64) -> String {
    let difference = now_seconds.saturating_sub(then_seconds);
    if difference == 0 {
        return "just now".to_owned();
    }
    let magnitude = difference.unsigned_abs();
    let amount = match magnitude {
        s if s < MINUTE => format!("{s}s"),
        s if s < HOUR => format!("{}m", s / MINUTE),
        s if s < DAY => format!("{}h", s / HOUR),
        s => format!("{}d", s / DAY),
    };
    if difference > 0 { format!("{amount} ago") } else { format!("in {amount}") }
}

/// Seconds since the Unix epoch of `time`, negative before it.
pub fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// The protobuf timestamp `age` before `now`, for filters such as `seen_since`.
pub fn timestamp_before(now: SystemTime, age: Duration) -> prost_types::Timestamp {
    let seconds = unix_seconds(now).saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
    prost_types::Timestamp { seconds, nanos: 0 }
}

/// First and last second that RFC 3339 can write (years 0001 to 9999).
const RFC3339_MIN_SECONDS: i64 = -62_135_596_800;
const RFC3339_MAX_SECONDS: i64 = 253_402_300_799;

/// Formats seconds since the Unix epoch as RFC 3339 in UTC, to the second: `2025-03-04T05:06:07Z`.
/// A value outside years 1-9999 (only a confused peer or daemon would send one) is shown as `@<seconds>`.
pub fn format_rfc3339(seconds: i64) -> String {
    if !(RFC3339_MIN_SECONDS..=RFC3339_MAX_SECONDS).contains(&seconds) {
        return format!("@{seconds}");
    }
    let days = seconds.div_euclid(DAY as i64);
    let second_of_day = seconds.rem_euclid(DAY as i64);
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / HOUR as i64,
        second_of_day % HOUR as i64 / MINUTE as i64,
        second_of_day % MINUTE as i64,
    )
}

/// Year, month and day of a day number counted from 1970-01-01 (proleptic Gregorian calendar).
///
/// Walks whole 400-year cycles (always 146 097 days) first, so the year loop below runs at most 400 times.
fn civil_date(days_since_epoch: i64) -> (i64, u32, u32) {
    const DAYS_PER_400_YEARS: i64 = 146_097;
    let cycles = days_since_epoch.div_euclid(DAYS_PER_400_YEARS);
    let mut day_in_cycle = days_since_epoch.rem_euclid(DAYS_PER_400_YEARS);
    let mut year = 1970 + cycles * 400;
    while day_in_cycle >= days_in_year(year) {
        day_in_cycle -= days_in_year(year);
        year += 1;
    }
    let mut month = 1;
    for length in month_lengths(year) {
        if day_in_cycle < length {
            break;
        }
        day_in_cycle -= length;
        month += 1;
    }
    // day_in_cycle is now the zero-based day of the month, below 31.
    (year, month, day_in_cycle as u32 + 1)
}

fn is_leap_year(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_year(year: i64) -> i64 {
    if is_leap_year(year) { 366 } else { 365 }
}

fn month_lengths(year: i64) -> [i64; 12] {
    let february = if is_leap_year(year) { 29 } else { 28 };
    [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_single_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0m"), Ok(Duration::ZERO));
    }

    #[test]
    fn parses_sums_of_units() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d2h3m4s"), Ok(Duration::from_secs(93_784)));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in ["", "10", "m", "10x", "1.5h", "-1h", " 10m", "10m ", "1h30", "10M"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(parse_duration("99999999999999999w").is_err());
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
    }

    #[test]
    fn formats_durations_without_zero_parts() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(59), "59s");
        assert_eq!(format_duration(3723), "1h 2m 3s");
        assert_eq!(format_duration(3601), "1h 1s");
        assert_eq!(format_duration(3600), "1h");
        assert_eq!(format_duration(93_784), "1d 2h 3m 4s");
    }

    #[test]
    fn formats_rtt_in_milliseconds() {
        let rtt = prost_types::Duration { seconds: 0, nanos: 12_345_678 };
        assert_eq!(format_rtt(&rtt), "12.3 ms");
        let rtt = prost_types::Duration { seconds: 1, nanos: 500_000_000 };
        assert_eq!(format_rtt(&rtt), "1500.0 ms");
    }

    #[test]
    fn formats_ages_in_their_largest_unit() {
        let now = 1_000_000;
        assert_eq!(format_age(now, now), "just now");
        assert_eq!(format_age(now - 42, now), "42s ago");
        assert_eq!(format_age(now - 60, now), "1m ago");
        assert_eq!(format_age(now - 3 * 60 - 59, now), "3m ago");
        assert_eq!(format_age(now - 2 * 3600, now), "2h ago");
        assert_eq!(format_age(now - 5 * 86_400 - 10, now), "5d ago");
        assert_eq!(format_age(now + 180, now), "in 3m");
        assert_eq!(format_age(i64::MIN, i64::MAX), format_age(0, i64::MAX));
    }

    #[test]
    fn formats_rfc3339_in_utc() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(format_rfc3339(1_735_689_600), "2025-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(RFC3339_MIN_SECONDS), "0001-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(RFC3339_MAX_SECONDS), "9999-12-31T23:59:59Z");
        assert_eq!(format_rfc3339(RFC3339_MAX_SECONDS + 1), "@253402300800");
    }

    #[test]
    fn timestamp_before_subtracts_the_age() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let since = timestamp_before(now, Duration::from_secs(600));
        assert_eq!((since.seconds, since.nanos), (9_400, 0));
    }
}
