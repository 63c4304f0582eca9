//! How values cross the boundary between Rust and SQLite columns: enums as their discriminants, node ids as
//! 32-byte blobs, unsigned counters as signed integers, service attributes as one escaped text column.
//!
//! Everything read back is treated as untrusted: an out-of-range integer or a malformed blob becomes `Unknown`,
//! a clamp, or `None` (and the caller skips the row), never a panic.

use std::time::Duration;

use crate::api::names::{NODE_ID_LEN, NodeId};

use super::types::{AddressSource, NatType, NodeType};

/// Longest stored `last_error`, in bytes: errors come from the network and can be arbitrarily long.
pub(crate) const MAX_ERROR_BYTES: usize = 512;

/// The node id in a blob column, or `None` when the blob has the wrong length.
pub(crate) fn node_id_from_blob(blob: &[u8]) -> Option<NodeId> {
    let bytes: [u8; NODE_ID_LEN] = blob.try_into().ok()?;
    Some(NodeId(bytes))
}

impl NodeType {
    pub(crate) fn from_stored(value: i64) -> Self {
        match value {
            1 => Self::Public,
            2 => Self::Private,
            _ => Self::Unknown,
        }
    }
}

impl NatType {
    pub(crate) fn from_stored(value: i64) -> Self {
        match value {
            1 => Self::None,
            2 => Self::EndpointIndependent,
            3 => Self::EndpointDependent,
            4 => Self::UdpBlocked,
            _ => Self::Unknown,
        }
    }
}

impl AddressSource {
    pub(crate) fn from_stored(value: i64) -> Self {
        match value {
            1 => Self::Dht,
            2 => Self::Inbound,
            3 => Self::PeerExchange,
            4 => Self::Manual,
            5 => Self::Record,
            _ => Self::Unknown,
        }
    }
}

/// SQLite integers are signed 64-bit; a `u64` is stored with the same bits so that every value round-trips
/// (a peer may pick any record seq). Such columns are only compared for equality or in Rust, never ordered in
/// SQL, so the sign of the stored value does not matter.
pub(crate) fn u64_to_stored(value: u64) -> i64 {
    value as i64
}

/// Inverse of [`u64_to_stored`].
pub(crate) fn u64_from_stored(value: i64) -> u64 {
    value as u64
}

/// A counter read back; a negative value (never written by this code) counts as zero.
pub(crate) fn count_from_stored(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// A small count read back, saturated into `u32`.
pub(crate) fn u32_from_stored(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

/// A duration as whole microseconds, saturating (no realistic round trip time comes near the limit).
pub(crate) fn duration_to_micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Microseconds read back; negative values count as zero.
pub(crate) fn duration_from_micros(micros: i64) -> Duration {
    Duration::from_micros(count_from_stored(micros))
}

/// Cuts `text` to at most `max_bytes`, on a character boundary so the result stays valid UTF-8.
pub(crate) fn truncate_on_char_boundary(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Encodes service attributes in one text column: one `key=value` pair per line, where `\` is written `\\`,
/// a newline `\n` and `=` `\e`. The escapes keep the separators unambiguous, so any strings round-trip.
pub(crate) fn encode_attributes(attributes: &[(String, String)]) -> String {
    let mut out = String::new();
    for (index, (key, value)) in attributes.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        escape_into(&mut out, key);
        out.push('=');
        escape_into(&mut out, value);
    }
    out
}

fn escape_into(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '=' => out.push_str("\\e"),
            other => out.push(other),
        }
    }
}

/// Inverse of [`encode_attributes`], returning pairs sorted by key. Text that this code did not write (a line
/// without `=`, an unknown escape) is decoded as leniently as possible rather than failing the whole read.
pub(crate) fn decode_attributes(encoded: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    if encoded.is_empty() {
        return pairs;
    }
    for line in encoded.split('\n') {
        let mut key = String::new();
        let mut value = String::new();
        let mut in_value = false;
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            let target = if in_value { &mut value } else { &mut key };
            match c {
                '\\' => match chars.next() {
                    Some('\\') => target.push('\\'),
                    Some('n') => target.push('\n'),
                    Some('e') => target.push('='),
                    Some(other) => {
                        target.push('\\');
                        target.push(other);
                    }
                    None => target.push('\\'),
                },
                '=' if !in_value => in_value = true,
                other => target.push(other),
            }
        }
        pairs.push((key, value));
    }
    // Stable: pairs with equal keys keep their stored order.
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    pairs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_including_separators() {
        let attributes = vec![
            ("a".to_owned(), "plain".to_owned()),
            ("b=c".to_owned(), "x\\ny\nz=".to_owned()),
            (String::new(), String::new()),
            ("\\".to_owned(), "\\e".to_owned()),
        ];
        let mut expected = attributes.clone();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(decode_attributes(&encode_attributes(&attributes)), expected);
        assert!(decode_attributes(&encode_attributes(&[])).is_empty());
    }

    #[test]
    fn malformed_attribute_text_does_not_panic() {
        assert_eq!(
            decode_attributes("novalue\nk=v\\"),
            vec![("k".to_owned(), "v\\".to_owned()), ("novalue".to_owned(), String::new())]
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        let text = "é".repeat(300); // 600 bytes
        let cut = truncate_on_char_boundary(&text, 511);
        assert_eq!(cut.len(), 510);
        assert_eq!(truncate_on_char_boundary("short", 512), "short");
    }

    #[test]
    fn stored_integers_are_read_defensively() {
        assert_eq!(NodeType::from_stored(99), NodeType::Unknown);
        assert_eq!(NatType::from_stored(-1), NatType::Unknown);
        assert_eq!(AddressSource::from_stored(5), AddressSource::Record);
        assert_eq!(u64_from_stored(u64_to_stored(u64::MAX)), u64::MAX);
        assert_eq!(count_from_stored(-5), 0);
        assert_eq!(u32_from_stored(i64::MAX), u32::MAX);
        assert!(node_id_from_blob(&[0; 31]).is_none());
        assert_eq!(node_id_from_blob(&[7; 32]), Some(NodeId([7; 32])));
    }
}
