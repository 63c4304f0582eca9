//! `-o json`: responses printed in the proto3 JSON mapping, so scripts see the API's own field names and enum
//! names rather than a second, rnctl-specific schema.
//!
//! The generated Rust types carry no reflection data, so each message is re-decoded as a
//! [`DynamicMessage`] against the descriptor set compiled into the `remote-network` crate, and serialized from
//! there. Every field is always present (defaults included) so scripts can rely on stable keys.

use anyhow::{Context as _, anyhow};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use remote_network::api::CONTROL_DESCRIPTOR_SET;
use remote_network::api::control;

/// A control API message printable as JSON: ties the generated Rust type to its full protobuf name.
pub trait ApiMessage: Message {
    const FULL_NAME: &'static str;
}

/// Implements [`ApiMessage`] for generated types, deriving the protobuf name from the Rust one (prost keeps
/// message names unchanged).
macro_rules! api_messages {
    ($($name:ident),* $(,)?) => {
        $(impl ApiMessage for control::$name {
            const FULL_NAME: &'static str = concat!("remote_network.control.v1.", stringify!($name));
        })*
        /// Every type given [`ApiMessage`], so a test can check each name exists in the descriptor set.
        #[cfg(test)]
        const API_MESSAGE_NAMES: &[&str] = &[$(<control::$name as ApiMessage>::FULL_NAME),*];
    };
}

api_messages!(
    GetNodeInfoResponse,
    ListPeersResponse,
    GetPeerResponse,
    ConnectPeerResponse,
    GetNatStatusResponse,
    QueryPeerMetadataResponse,
    PeerEvent,
    ForgetPeerResponse,
    JoinTopicResponse,
    LeaveTopicResponse,
    ListTopicsResponse,
);

/// Converts API messages to proto3 JSON text.
pub struct ProtoJson {
    pool: DescriptorPool,
    options: SerializeOptions,
}

impl ProtoJson {
    /// Decodes the embedded descriptor set; done once per run.
    pub fn new() -> anyhow::Result<Self> {
        let pool = DescriptorPool::decode(CONTROL_DESCRIPTOR_SET)
            .context("the control API descriptor set built into rnctl is unreadable")?;
        // Defaults stay in (`skip_default_fields(false)`) so every key is always there; field names stay
        // lowerCamelCase and enums stay names, as the proto3 JSON mapping specifies.
        let options = SerializeOptions::new().skip_default_fields(false);
        Ok(Self { pool, options })
    }

    /// Indented JSON for a single response.
    pub fn pretty<M: ApiMessage>(&self, message: &M) -> anyhow::Result<String> {
        let mut serializer = serde_json::Serializer::pretty(Vec::new());
        self.dynamic(message)?
            .serialize_with_options(&mut serializer, &self.options)
            .with_context(|| format!("cannot write {} as JSON", M::FULL_NAME))?;
        String::from_utf8(serializer.into_inner()).context("JSON output is not UTF-8")
    }

    /// JSON on one line, for streams printed as newline-delimited JSON.
    pub fn compact<M: ApiMessage>(&self, message: &M) -> anyhow::Result<String> {
        let mut serializer = serde_json::Serializer::new(Vec::new());
        self.dynamic(message)?
            .serialize_with_options(&mut serializer, &self.options)
            .with_context(|| format!("cannot write {} as JSON", M::FULL_NAME))?;
        String::from_utf8(serializer.into_inner()).context("JSON output is not UTF-8")
    }

    fn dynamic<M: ApiMessage>(&self, message: &M) -> anyhow::Result<DynamicMessage> {
        let descriptor = self
            .pool
            .get_message_by_name(M::FULL_NAME)
            .ok_or_else(|| anyhow!("{} is missing from the control API descriptor set", M::FULL_NAME))?;
        DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
            .with_context(|| format!("cannot re-read {} for JSON output", M::FULL_NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost_types::Timestamp;
    use serde_json::{Value, json};

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).expect("valid JSON")
    }

    #[test]
    fn every_api_message_is_in_the_descriptor_set() {
        let json = ProtoJson::new().expect("descriptor set decodes");
        for name in API_MESSAGE_NAMES {
            assert!(json.pool.get_message_by_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn default_fields_are_present_with_camel_case_names() {
        let json = ProtoJson::new().expect("descriptor set decodes");
        let text = json.pretty(&control::ListPeersResponse::default()).expect("serializes");
        // 64-bit integers are strings in the proto3 JSON mapping.
        assert_eq!(parse(&text), json!({"peers": [], "nextPageToken": "", "total": "0"}));
    }

    #[test]
    fn enums_are_names_and_timestamps_rfc3339() {
        let json = ProtoJson::new().expect("descriptor set decodes");
        let event = control::PeerEvent {
            kind: control::PeerEventKind::Added as i32,
            peer: Some(control::Peer {
                node_id: "ab".repeat(32),
                node_type: control::NodeType::Public as i32,
                topics: vec!["chat".into()],
                ..Default::default()
            }),
            at: Some(Timestamp { seconds: 1_735_689_600, nanos: 0 }),
        };
        let text = json.compact(&event).expect("serializes");
        assert!(!text.contains('\n'), "compact JSON must be one line: {text}");
        let value = parse(&text);
        assert_eq!(value["kind"], "PEER_EVENT_KIND_ADDED");
        assert_eq!(value["at"], "2025-01-01T00:00:00Z");
        assert_eq!(value["peer"]["nodeId"], "ab".repeat(32));
        assert_eq!(value["peer"]["nodeType"], "NODE_TYPE_PUBLIC");
        assert_eq!(value["peer"]["natType"], "NAT_TYPE_UNKNOWN");
        assert_eq!(value["peer"]["topics"], json!(["chat"]));
        assert_eq!(value["peer"]["score"], 0.0);
    }

    #[test]
    fn unknown_discovery_counts_are_absent_and_a_known_zero_is_zero() {
        let json = ProtoJson::new().expect("descriptor set decodes");
        let listing = control::ListTopicsResponse {
            topics: vec![
                control::Topic {
                    name: "lone".into(),
                    discovery: Some(control::TopicDiscovery {
                        dht_contacts: Some(0),
                        explanation: "no DHT node knows us yet: 0 contacts".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                control::Topic { name: "new".into(), ..Default::default() },
            ],
        };
        let value = parse(&json.pretty(&listing).expect("serializes"));
        let lone = &value["topics"][0]["discovery"];
        assert_eq!(lone["dhtContacts"], 0, "a zero that is known is printed: {lone}");
        assert!(lone.get("lastLookupPeers").is_none(), "an unknown count is absent: {lone}");
        assert!(lone.get("lastLookupAt").is_none(), "{lone}");
        assert_eq!(lone["lookupRunning"], false);
        assert_eq!(lone["explanation"], "no DHT node knows us yet: 0 contacts");
        assert!(value["topics"][1].get("discovery").is_none(), "no discovery yet: {value}");
    }
}
