//! A connection to the daemon: the three service clients sharing one channel and bearer token, and the
//! per-call deadline from `--timeout`.

use std::future::Future;
use std::time::Duration;

use remote_network::api::client::BearerToken;
use remote_network::api::control::node_service_client::NodeServiceClient;
use remote_network::api::control::peer_service_client::PeerServiceClient;
use remote_network::api::control::topic_service_client::TopicServiceClient;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;

/// A channel whose requests carry the bearer token, if one was given.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

pub struct Daemon {
    channel: Channel,
    token: BearerToken,
    /// Deadline for each unary call; `None` waits forever (`--timeout 0`).
    deadline: Option<Duration>,
}

impl Daemon {
    pub fn new(channel: Channel, token: BearerToken, deadline: Option<Duration>) -> Self {
        Self { channel, token, deadline }
    }

    pub fn nodes(&self) -> NodeServiceClient<AuthChannel> {
        NodeServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    pub fn peers(&self) -> PeerServiceClient<AuthChannel> {
        PeerServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    pub fn topics(&self) -> TopicServiceClient<AuthChannel> {
        TopicServiceClient::with_interceptor(self.channel.clone(), self.token.clone())
    }

    /// The `--timeout` bound, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// Awaits a unary call within the deadline.
    ///
    /// The deadline is enforced here rather than sent as `grpc-timeout`: with the header, tonic cancels the call
    /// itself and reports a vague "cancelled: Timeout expired" instead of saying what happened.
    pub async fn unary<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let response = match self.deadline {
            Some(deadline) => tokio::time::timeout(deadline, call).await.map_err(|_| {
                tonic::Status::deadline_exceeded(format!(
                    "the daemon did not answer within {}s (see --timeout)",
                    deadline.as_secs_f64()
                ))
            })??,
            None => call.await?,
        };
        Ok(response.into_inner())
    }
}
