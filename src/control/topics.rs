//! `TopicService`: joining, leaving and listing topics. Joins are stored, so they survive restarts; the listing
//! adds, per topic, where its discovery on the DHT stands.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use super::Context;
use super::convert::{self, store_status, topic_arg};
use crate::api::control as pb;
use crate::api::control::topic_service_server::TopicService;
use crate::api::control::{
    JoinTopicRequest, JoinTopicResponse, LeaveTopicRequest, LeaveTopicResponse, ListTopicsRequest,
    ListTopicsResponse,
};
use crate::dht::DhtTopicStatus;

pub struct Topics(pub Context);

#[tonic::async_trait]
impl TopicService for Topics {
    async fn join_topic(
        &self,
        request: Request<JoinTopicRequest>,
    ) -> Result<Response<JoinTopicResponse>, Status> {
        let topic = request.into_inner().topic;
        topic_arg("topic", &topic)?;
        let (joined, newly_joined) =
            self.0.store.join_topic(topic, convert::now_ms()).await.map_err(store_status)?;
        if newly_joined {
            tracing::info!(topic = %joined.name, "joined topic");
            self.0.topic_changed(&joined.name, true).await.map_err(store_status)?;
        }
        Ok(Response::new(JoinTopicResponse { topic: Some(convert::topic(&joined)), newly_joined }))
    }

    async fn leave_topic(
        &self,
        request: Request<LeaveTopicRequest>,
    ) -> Result<Response<LeaveTopicResponse>, Status> {
        let topic = request.into_inner().topic;
        topic_arg("topic", &topic)?;
        let left = self.0.store.leave_topic(topic.clone()).await.map_err(store_status)?;
        if left {
            tracing::info!(%topic, "left topic");
            self.0.topic_changed(&topic, false).await.map_err(store_status)?;
        }
        Ok(Response::new(LeaveTopicResponse { left }))
    }

    async fn list_topics(
        &self,
        _request: Request<ListTopicsRequest>,
    ) -> Result<Response<ListTopicsResponse>, Status> {
        let topics = self.0.store.joined_topics().await.map_err(store_status)?;
        // The store says what is joined, the DHT actor how its discovery goes. A topic the actor does not know
        // (yet: joins reach it a moment later, and not at all while the DHT is down) gets no discovery rather
        // than an invented one.
        let mut discovery: HashMap<String, DhtTopicStatus> =
            self.0.dht.topics().await.into_iter().map(|status| (status.topic.clone(), status)).collect();
        let topics = topics
            .iter()
            .map(|joined| pb::Topic {
                discovery: discovery.remove(&joined.name).as_ref().map(convert::topic_discovery),
                ..convert::topic(joined)
            })
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }
}
