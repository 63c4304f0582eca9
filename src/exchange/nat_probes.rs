//! The exchange as the NAT prober sees it ([`NatProbes`]): the active probes that gather evidence about our
//! NAT (dial-backs, a second port of a peer, a hairpin), the peers that witness it, and where a verdict goes
//! (our signed record, and another punch for peers reached only through a relay).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::session::CloseCode;
use super::{ConnectionPath, Exchange, ExchangeError, ProtocolViolation};
use crate::api::names::NodeId;
use crate::nat::probes::{DialBackOutcome, NatProbes, Witness};
use crate::quic::QuicEndpoint;
use crate::store::StoreError;
use crate::wire::pb;

/// How long a hairpin probe waits for its connection to come back: a loop through our own NAT takes
/// microseconds, so this only allows for a lost packet and its retransmission.
const HAIRPIN_TIMEOUT: Duration = Duration::from_secs(3);

/// How old the peer's report on our connection may be for a mapping probe to its DHT socket to be compared
/// with it.
const MAPPING_PROBE_FRESHNESS_MS: i64 = 5 * 60 * 1000;

impl NatProbes for Exchange {
    type Error = ExchangeError;

    fn local_addr(&self) -> Option<SocketAddr> {
        self.inner.endpoint.local_addr().ok()
    }

    fn witnesses(&self) -> Vec<Witness> {
        let sessions = self.inner.sessions.all();
        let direct = sessions.into_iter().filter(|(_, s)| !s.path().is_relayed());
        direct
            .map(|(peer, s)| Witness {
                peer,
                remote: s.connection().remote_address(),
                punched: s.path() == ConnectionPath::Punched,
            })
            .collect()
    }

    async fn refresh_interfaces(&self) -> bool {
        self.inner.publisher.refresh_interfaces().await
    }

    async fn publish_nat(&self, node_type: pb::NodeType, nat: pb::NatInfo) -> Result<(), ExchangeError> {
        self.inner.publisher.set_nat(node_type, nat).await.map_err(|e: StoreError| e.into())
    }

    async fn publish_rendezvous(&self, rendezvous: Vec<SocketAddr>) {
        self.inner.publisher.set_rendezvous(rendezvous).await;
    }

    /// Dials our own external address from a second socket of this host: true when the connection reaches
    /// our endpoint (the NAT hairpins, RFC 4787 §6: a node behind the same NAT can reach us at our public
    /// address), false when nothing came back in time. A second socket, because that is the case that matters
    /// (a neighbour), and because Linux drops a packet hairpinned back to the very socket that sent it.
    async fn probe_hairpin(&self, external: SocketAddr) -> bool {
        let limits = crate::quic::QuicLimits {
            max_connections: 1,
            handshake_timeout: HAIRPIN_TIMEOUT,
            inbound_handshake_timeout: HAIRPIN_TIMEOUT,
            ..crate::quic::QuicLimits::default()
        };
        let bind = SocketAddr::new(
            if external.is_ipv4() {
                std::net::IpAddr::from([0u8; 4])
            } else {
                std::net::IpAddr::from([0u16; 8])
            },
            0,
        );
        let Ok(prober) = QuicEndpoint::bind(bind, self.inner.publisher.signing_key(), limits) else {
            return false;
        };
        let arrived = match prober.connect(external, Some(self.inner.local)).await {
            Ok(outbound) => {
                CloseCode::SelfConnection.close(&outbound.connection, "hairpin probe");
                true
            }
            Err(_) => false,
        };
        self.inner.tasks.spawn(async move { prober.close().await });
        arrived
    }

    /// Asks `helper` (a connected peer) to dial us back from a fresh 4-tuple and reports whether it arrived.
    async fn request_dial_back(
        &self,
        helper: NodeId,
        kind: pb::DialBackKind,
    ) -> Result<DialBackOutcome, ExchangeError> {
        let session = self.inner.sessions.get(&helper).ok_or(ExchangeError::Unreachable(helper))?;
        let arrival = self.inner.dial_backs_expected.expect(helper).ok_or(ExchangeError::Busy)?;
        let request = pb::envelope::Kind::DialBackRequest(pb::DialBackRequest { kind: kind as i32 });
        // The helper answers after its attempt, so the request may take as long as its dial.
        let answer = session
            .request(request, self.inner.options.request_timeout + super::dial_back::DIAL_TIMEOUT)
            .await;
        let response = match answer {
            Ok((pb::envelope::Kind::DialBackResponse(response), _)) => response,
            Ok(_) => {
                self.inner.dial_backs_expected.forget(&helper);
                return Err(ProtocolViolation::UnexpectedAnswer { request: "DialBackRequest" }.into());
            }
            Err(e) => {
                self.inner.dial_backs_expected.forget(&helper);
                return Err(e);
            }
        };
        // The handshake completes at our end before the helper hears about it; allow a moment for ordering.
        let arrived_from = if response.attempted {
            tokio::time::timeout(Duration::from_secs(2), arrival).await.ok().and_then(Result::ok)
        } else {
            None
        };
        self.inner.dial_backs_expected.forget(&helper);
        Ok(DialBackOutcome {
            helper,
            kind,
            attempted: response.attempted,
            declared_from: response.from_address.parse().ok(),
            arrived_from,
            detail: response.detail,
            busy: response.busy,
        })
    }

    /// Tries a punch to every peer reached only through a relay, one after the other (a punch that succeeds
    /// replaces the relayed session). For when what we know of our NAT changed.
    fn punch_relayed_peers(&self) {
        let relayed: Vec<NodeId> = self
            .inner
            .sessions
            .all()
            .into_iter()
            .filter(|(_, session)| session.path().is_relayed())
            .map(|(peer, _)| peer)
            .collect();
        if relayed.is_empty() {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let shutdown = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            for peer in relayed {
                let Some(inner) = inner.upgrade() else { return };
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => return,
                    attempt = inner.punch_to(peer) => attempt,
                };
                match attempt {
                    Ok(session) => tracing::info!(%peer, path = ?session.path(), "relayed peer punched"),
                    Err(e) => tracing::debug!(%peer, error = %e, "relayed peer still not punchable"),
                }
            }
        });
    }

    /// Measures our NAT's mapping towards a second port of a directly connected peer: its DHT socket (the port
    /// its record names, on the IP we reach it at), pinged from our QUIC socket. The address that socket saw is
    /// kept as a mapping sample beside the one the peer reports on our connection: with a single public peer,
    /// two ports that saw us at two addresses show that our NAT maps per destination. `None` if the peer names
    /// no DHT port or did not answer.
    async fn probe_mapping_via_dht(&self, peer: NodeId) -> Option<SocketAddr> {
        let inner = &self.inner;
        // A direct session: a relayed one's address is a circuit's, which says nothing about our mapping.
        let session = inner.direct_session(&peer)?;
        let connection = session.connection();
        let remote = connection.remote_address();
        // The two samples are compared: the peer's report on our connection must be recent, or a NAT that
        // rebound the flow since (or a lost mapping) would look like one that maps per destination port.
        if !inner.evidence.fresh_sample_towards(remote, MAPPING_PROBE_FRESHNESS_MS) {
            return None;
        }
        let body = inner.stored_record_body(peer).await?;
        let port = u16::try_from(body.dht_port).ok().filter(|port| *port != 0)?;
        let dht = SocketAddr::new(remote.ip(), port);
        if dht == remote {
            return None;
        }
        inner.evidence.contacted(dht, false);
        let observed = SocketAddr::V4(inner.endpoint.mapping_towards(dht).await?);
        inner.evidence.contacted(dht, true);
        let local = inner.endpoint.local_addr().ok()?;
        let local = connection.local_ip().map_or(local, |ip| SocketAddr::new(ip, local.port()));
        inner.evidence.sample(peer, local, dht, observed);
        tracing::debug!(%peer, %dht, %observed, "mapping towards the peer's DHT socket");
        Some(observed)
    }

    /// Asks `relay` (a directly connected peer) to relay circuits to us; true once it accepted.
    async fn reserve_relay(&self, relay: NodeId) -> Result<bool, ExchangeError> {
        self.inner.reserve_relay(relay).await
    }
}
