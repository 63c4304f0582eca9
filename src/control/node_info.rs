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
            // The DHT and NAT parts are not running in this build: say so rather than guess.
            dht: Some(DhtStatus { state: DhtState::Unknown as i32, ..Default::default() }),
            nat: Some(NatStatus::default()),
            joined_topics: topics.into_iter().map(|t| t.name).collect(),
        };
        Ok(Response::new(GetNodeInfoResponse { node: Some(node) }))
    }
}
