//! `NodeService`: who this node is and the state of its parts.

use tonic::{Request, Response, Status};

use super::Context;
use super::convert::{self, store_status};
use crate::api::control::node_service_server::NodeService;
use crate::api::control::{
    DhtState, DhtStatus, GetNodeInfoRequest, GetNodeInfoResponse, NatStatus, NodeInfo, StoreHealth,
    StoreStats,
};
use crate::store;

pub struct Node(pub Context);

#[tonic::async_trait]
impl NodeService for Node {
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
            started_at: Some(convert::timestamp(convert::system_time_ms(ctx.started_at))),
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
            nat: Some(NatStatus {
                // Classification comes with the NAT work; until then only what peers confirmed is stated.
                nat_type: 0,
                reachability: 0,
                public_addresses: ctx
                    .exchange
                    .confirmed_public_addresses()
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
            }),
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
