//! `NodeService`: who this node is, the state of its parts, and what it knows of its NAT.

use tonic::{Request, Response, Status};

use super::Context;
use super::convert::{self, store_status};
use crate::api::control::node_service_server::NodeService;
use crate::api::control::{
    DhtState, DhtStatus, GetNatStatusRequest, GetNatStatusResponse, GetNodeInfoRequest, GetNodeInfoResponse,
    NatStatus, NodeInfo, ProbeNatRequest, StoreHealth, StoreStats,
};
use crate::store;

pub struct Node(pub Context);

#[tonic::async_trait]
impl NodeService for Node {
    async fn get_nat_status(
        &self,
        _request: Request<GetNatStatusRequest>,
    ) -> Result<Response<GetNatStatusResponse>, Status> {
        Ok(Response::new(GetNatStatusResponse {
            report: Some(nat_report(&self.0, self.0.nat.knowledge()).await),
        }))
    }

    async fn probe_nat(
        &self,
        _request: Request<ProbeNatRequest>,
    ) -> Result<Response<GetNatStatusResponse>, Status> {
        if self.0.exchange.connected_peers() == 0 {
            return Err(Status::failed_precondition(
                "no peer is connected to probe through: join a topic or connect to a peer first",
            ));
        }
        let knowledge = self.0.nat.probe().await;
        Ok(Response::new(GetNatStatusResponse { report: Some(nat_report(&self.0, knowledge).await) }))
    }

    async fn get_node_info(
        &self,
        _request: Request<GetNodeInfoRequest>,
    ) -> Result<Response<GetNodeInfoResponse>, Status> {
        let ctx = &self.0;
        let stats = ctx.store.stats().await.map_err(store_status)?;
        let topics = ctx.store.joined_topics().await.map_err(store_status)?;
        let (health, health_detail) = match ctx.store.health() {
            store::StoreHealth::Ok => (StoreHealth::Ok, String::new()),
            store::StoreHealth::Degraded(why) => (StoreHealth::Degraded, why),
        };
        let node = NodeInfo {
            node_id: ctx.node_id.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: Some(convert::timestamp(convert::unix_ms(ctx.started_at))),
            uptime: Some(convert::duration(ctx.started.elapsed())),
            listen: Some(ctx.listen.clone()),
            data_dir: ctx.data_dir.display().to_string(),
            store: Some(StoreStats {
                health: health as i32,
                health_detail,
                peers: stats.peers,
                peer_addresses: stats.peer_addresses,
                joined_topics: stats.joined_topics,
                size_bytes: stats.size_bytes,
                schema_version: stats.schema_version,
                writes_committed: stats.writes_committed,
                write_batches: stats.write_batches,
                path: ctx.store.path().display().to_string(),
            }),
            dht: Some(dht_status(ctx).await),
            nat: Some(nat_status(ctx)),
            joined_topics: topics.into_iter().map(|t| t.name).collect(),
            connected_peers: u32::try_from(ctx.exchange.connected_peers()).unwrap_or(u32::MAX),
            exchange: Some(exchange_stats(ctx)),
        };
        Ok(Response::new(GetNodeInfoResponse { node: Some(node) }))
    }
}

async fn dht_status(ctx: &super::NodeContext) -> DhtStatus {
    let status = ctx.dht.status().await;
    let counters = ctx.dht.counters();
    DhtStatus {
        state: if status.bootstrapped { DhtState::Ready } else { DhtState::Bootstrapping } as i32,
        routing_table_size: u32::try_from(status.routing_table_size).unwrap_or(u32::MAX),
        public_address: status.public_address.map(|a| a.to_string()).unwrap_or_default(),
        server_mode: status.server_mode,
        firewalled: status.firewalled,
        announces_sent: counters.announces_sent,
        lookups_started: counters.lookups_started,
        peers_found: counters.peers_found,
    }
}

fn exchange_stats(ctx: &super::NodeContext) -> crate::api::control::ExchangeStats {
    use std::sync::atomic::Ordering::Relaxed;
    let counters = ctx.exchange.counters();
    crate::api::control::ExchangeStats {
        verified: counters.exchanges_ok.load(Relaxed),
        failed: counters.exchanges_failed.load(Relaxed),
        replays_rejected: counters.replays_rejected.load(Relaxed),
        impersonations_rejected: counters.impersonations_rejected.load(Relaxed),
        records_from_peer_exchange: counters.records_from_peer_exchange.load(Relaxed),
    }
}

/// The summary `GetNodeInfo` carries: the coarse verdict and the confirmed public addresses.
fn nat_status(ctx: &super::NodeContext) -> NatStatus {
    let knowledge = ctx.nat.knowledge();
    let (_, info) = knowledge.verdict.as_ref().map(crate::nat::prober::record_nat_info).unwrap_or_default();
    let mut public: Vec<String> =
        ctx.exchange.evidence().confirmed_public().iter().map(|a| a.to_string()).collect();
    if let Some(external) = knowledge.verdict.as_ref().and_then(|v| v.external_address) {
        let external = external.to_string();
        if !public.contains(&external) {
            public.insert(0, external);
        }
    }
    NatStatus { nat_type: info.mapping, reachability: info.reachability, public_addresses: public }
}

/// Everything known about the NAT, with the evidence.
async fn nat_report(
    ctx: &super::NodeContext,
    knowledge: crate::nat::prober::NatKnowledge,
) -> crate::api::control::NatReport {
    use crate::api::control as pb;
    let observed = ctx
        .exchange
        .evidence()
        .observations()
        .into_iter()
        .map(|o| pb::ObservedAddress {
            address: o.address.to_string(),
            confirmations: u32::try_from(o.confirmations).unwrap_or(u32::MAX),
            last_report: Some(convert::timestamp(o.last_report_ms)),
        })
        .collect();
    let dial_backs = knowledge.dial_backs.iter().map(dial_back_result).collect();
    // wire.proto's NatType and control.proto's share their numbers, so values pass through unchanged. Reading
    // the store can fail (a broken disk); the rest of the report is still worth showing.
    let punches = match ctx.exchange.punch_stats().await {
        Ok(stats) => stats,
        Err(e) => {
            tracing::warn!(error = %e, "could not read punch outcomes");
            Vec::new()
        }
    };
    let punches = punches
        .into_iter()
        .map(|stat| pb::PunchStats {
            our_nat: stat.our_nat,
            their_nat: stat.their_nat,
            attempts: stat.attempts,
            successes: stat.successes,
            last_outcome: stat.last_outcome,
            last_attempt: Some(convert::timestamp(stat.last_at_ms)),
            last_time_to_connected: stat
                .last_success_ms
                .map(|ms| convert::duration(std::time::Duration::from_millis(ms))),
        })
        .collect();
    let mut report = pb::NatReport {
        observed,
        dial_backs,
        punches,
        relays: ctx.exchange.relays_reserved().iter().map(ToString::to_string).collect(),
        last_probe: knowledge.last_probe_ms.map(convert::timestamp),
        ..Default::default()
    };
    if let Some(verdict) = &knowledge.verdict {
        describe_verdict(verdict, &mut report);
    }
    report
}

/// A dial-back outcome as the API shows it.
fn dial_back_result(record: &crate::nat::prober::DialBackRecord) -> crate::api::control::DialBackResult {
    use crate::api::control as pb;
    pb::DialBackResult {
        helper: record.outcome.helper.to_string(),
        kind: match record.outcome.kind {
            crate::wire::pb::DialBackKind::OtherPort => pb::DialBackKind::OtherPort,
            crate::wire::pb::DialBackKind::OtherIp => pb::DialBackKind::OtherIp,
            crate::wire::pb::DialBackKind::Unspecified => pb::DialBackKind::Unspecified,
        } as i32,
        attempted: record.outcome.attempted,
        arrived: record.outcome.arrived_from.is_some(),
        from_address: record
            .outcome
            .arrived_from
            .or(record.outcome.declared_from)
            .map(|a| a.to_string())
            .unwrap_or_default(),
        detail: record.outcome.detail.clone(),
        at: Some(convert::timestamp(record.at_ms)),
    }
}

/// The NAT verdict's fields of the report, with its explanation.
fn describe_verdict(verdict: &crate::nat::classify::NatVerdict, report: &mut crate::api::control::NatReport) {
    use crate::api::control as pb;
    use crate::nat::classify::{Filtering, Hairpin, Mapping, PortAllocation};
    let (_, info) = crate::nat::prober::record_nat_info(verdict);
    report.nat_type = info.mapping;
    report.reachability = info.reachability;
    report.mapping = match verdict.mapping {
        Mapping::Unknown => pb::MappingBehavior::Unknown,
        Mapping::NoTranslation => pb::MappingBehavior::None,
        Mapping::EndpointIndependent => pb::MappingBehavior::EndpointIndependent,
        Mapping::EndpointDependent(_) => pb::MappingBehavior::EndpointDependent,
    } as i32;
    report.port_allocation = match verdict.mapping {
        Mapping::EndpointDependent(PortAllocation::Sequential { delta }) => {
            format!("sequential, delta {delta}")
        }
        Mapping::EndpointDependent(PortAllocation::Unpredictable) => "unpredictable".to_owned(),
        _ => String::new(),
    };
    report.port_preservation = verdict.port_preservation;
    report.filtering = match verdict.filtering {
        Filtering::Unknown => pb::FilteringBehavior::Unknown,
        Filtering::EndpointIndependent => pb::FilteringBehavior::EndpointIndependent,
        Filtering::AddressDependent => pb::FilteringBehavior::AddressDependent,
        Filtering::AddressAndPortDependent => pb::FilteringBehavior::AddressAndPortDependent,
    } as i32;
    report.hairpin = match verdict.hairpin {
        Hairpin::Unknown => pb::HairpinSupport::Unknown,
        Hairpin::Supported => pb::HairpinSupport::Supported,
        Hairpin::NotSupported => pb::HairpinSupport::NotSupported,
    } as i32;
    report.explanation = verdict.explain();
}
