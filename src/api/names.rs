//! The one text form of node ids and the rule for topic names, shared by the daemon (which enforces them on every
//! request) and clients (which can check input before sending it).

use std::fmt;

/// Length of a node id in bytes: an ed25519 public key.
pub const NODE_ID_LEN: usize = 32;
/// Maximum length of a topic name in bytes.
pub const TOPIC_MAX_BYTES: usize = 255;

/// A node's identity: its ed25519 public key. Its text form is 64 lowercase hex characters, everywhere: API,
/// CLI, logs and the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeId(pub [u8; NODE_ID_LEN]);

impl NodeId {
    /// Parses the text form, with an error that says what the text form is.
    pub fn parse(text: &str) -> Result<Self, NameError> {
        let bytes = text.as_bytes();
        if bytes.len() != NODE_ID_LEN * 2 {
            return Err(NameError::NodeIdLength { got: bytes.len() });
        }
        let mut id = [0u8; NODE_ID_LEN];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or(NameError::NodeIdChar { at: i * 2 })?;
            let lo = hex_digit(pair[1]).ok_or(NameError::NodeIdChar { at: i * 2 + 1 })?;
            id[i] = hi << 4 | lo;
        }
        Ok(Self(id))
    }

    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }
}

/// Only lowercase digits are accepted so that each id has exactly one text form.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl std::str::FromStr for NodeId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Invisible characters that change how text around them reads without showing themselves: bidirectional
/// embeddings, overrides, isolates and marks (the "Trojan Source" characters, CVE-2021-42574), zero-width
/// spaces and joiners, and the byte-order mark. In a topic they would let two names that look the same be
/// different topics, or make a name shown in a terminal or log read other than it is.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Checks a topic name: 1 to 255 bytes of UTF-8 without control characters or invisible formatting
/// characters (see [`is_invisible_format`]).
pub fn validate_topic(topic: &str) -> Result<(), NameError> {
    if topic.is_empty() {
        return Err(NameError::TopicEmpty);
    }
    if topic.len() > TOPIC_MAX_BYTES {
        return Err(NameError::TopicTooLong { len: topic.len() });
    }
    if let Some((at, c)) = topic.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameError::TopicControlChar { at, code: c as u32 });
    }
    if let Some((at, c)) = topic.char_indices().find(|(_, c)| is_invisible_format(*c)) {
        return Err(NameError::TopicInvisibleChar { at, code: c as u32 });
    }
    Ok(())
}

/// Why a node id or topic name was refused. Messages name the rule so a user can fix the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    NodeIdLength { got: usize },
    NodeIdChar { at: usize },
    TopicEmpty,
    TopicTooLong { len: usize },
    TopicControlChar { at: usize, code: u32 },
    TopicInvisibleChar { at: usize, code: u32 },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NODE_ID_RULE: &str = "a node id is 64 lowercase hexadecimal characters";
        const TOPIC_RULE: &str =
            "a topic is 1-255 bytes of UTF-8 without control characters or invisible formatting characters";
        match self {
            Self::NodeIdLength { got } => write!(f, "{NODE_ID_RULE}, got {got} characters"),
            Self::NodeIdChar { at } => {
                write!(f, "{NODE_ID_RULE}, got a character outside 0-9a-f at position {at}")
            }
            Self::TopicEmpty => write!(f, "{TOPIC_RULE}, got an empty name"),
            Self::TopicTooLong { len } => write!(f, "{TOPIC_RULE}, got {len} bytes"),
            Self::TopicControlChar { at, code } => {
                write!(f, "{TOPIC_RULE}, got control character U+{code:04X} at byte {at}")
            }
            Self::TopicInvisibleChar { at, code } => write!(
                f,
                "{TOPIC_RULE}, got invisible character U+{code:04X} at byte {at} (bidirectional or zero-width \
                 characters would let different topics look the same)"
            ),
        }
    }
}

impl std::error::Error for NameError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_its_text_form() {
        let id = NodeId([0xab; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(NodeId::parse(&text), Ok(id));
    }

    #[test]
    fn node_id_rejects_other_forms() {
        assert_eq!(NodeId::parse("abc"), Err(NameError::NodeIdLength { got: 3 }));
        let upper = "AB".repeat(32);
        assert_eq!(NodeId::parse(&upper), Err(NameError::NodeIdChar { at: 0 }));
        let mut bad = "00".repeat(32);
        bad.replace_range(63..64, "g");
        assert_eq!(NodeId::parse(&bad), Err(NameError::NodeIdChar { at: 63 }));
    }

    #[test]
    fn topic_rule() {
        assert!(validate_topic("chat").is_ok());
        assert!(validate_topic("ünïcødé topic").is_ok());
        assert!(validate_topic(&"x".repeat(255)).is_ok());
        assert_eq!(validate_topic(""), Err(NameError::TopicEmpty));
        assert_eq!(validate_topic(&"x".repeat(256)), Err(NameError::TopicTooLong { len: 256 }));
        assert_eq!(validate_topic("a\nb"), Err(NameError::TopicControlChar { at: 1, code: 10 }));
        assert!(validate_topic("a\u{7f}").is_err());
    }

    /// "Trojan Source" and zero-width characters: a right-to-left override that makes `chat-admin` read
    /// differently, a zero-width space that makes a second `chat`, a byte-order mark.
    #[test]
    fn topics_refuse_invisible_formatting_characters() {
        assert_eq!(
            validate_topic("chat\u{202E}nimda"),
            Err(NameError::TopicInvisibleChar { at: 4, code: 0x202E })
        );
        assert_eq!(
            validate_topic("ch\u{200B}at"),
            Err(NameError::TopicInvisibleChar { at: 2, code: 0x200B })
        );
        assert!(validate_topic("\u{FEFF}chat").is_err());
        assert!(validate_topic("a\u{2066}b\u{2069}").is_err());
        let message = validate_topic("x\u{200D}").expect_err("zero-width joiner").to_string();
        assert!(message.contains("U+200D at byte 1"), "{message}");
        // Visible non-ASCII text stays allowed, right-to-left scripts included.
        assert!(validate_topic("שלום").is_ok());
        assert!(validate_topic("チャット").is_ok());
    }
}
