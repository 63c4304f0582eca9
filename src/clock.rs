//! Wall-clock time as the node records it everywhere (store rows, records, API timestamps): Unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// `time` as Unix milliseconds; times before 1970 are negative, far futures saturate.
pub fn unix_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The current time as Unix milliseconds.
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}
