//! Records between connected peers: `GetRecordRequest` fetches a peer's current record, and a `RecordUpdate`
//! is pushed to every connected peer when ours changes, so peers hold (and pass on) the current one without
//! asking. An update must be the sender's own record and pass every rule of a `Hello`'s record.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;

use super::router::Protocol;
use super::{ExchangeError, Inner};
use crate::api::names::NodeId;
use crate::wire::{self, pb};

/// Answers `GetRecordRequest` with our current record.
pub(super) struct GetRecord;

impl Protocol for GetRecord {
    type Request = pb::GetRecordRequest;

    super::router::accepts_variant!(GetRecordRequest);

    async fn answer(&self, node: &Arc<Inner>, _peer: NodeId, _request: Self::Request) -> pb::envelope::Kind {
        pb::envelope::Kind::GetRecordResponse(pb::GetRecordResponse {
            record: Some((*node.publisher.current()).clone()),
        })
    }
}

/// Takes a connected peer's new record (`RecordUpdate`): verified as its own, stored unless it is a replay.
pub(super) struct AcceptUpdate;

impl Protocol for AcceptUpdate {
    type Request = pb::RecordUpdate;

    super::router::accepts_variant!(RecordUpdate);

    async fn answer(&self, node: &Arc<Inner>, peer: NodeId, update: Self::Request) -> pb::envelope::Kind {
        let refuse = |message: String| {
            pb::envelope::Kind::Error(pb::ErrorResponse { code: pb::ErrorCode::Malformed as u32, message })
        };
        let Some(signed) = update.record else { return refuse("RecordUpdate without a record".into()) };
        let verified = match wire::verify_record(&signed, Some(peer), &node.policy()) {
            Ok(verified) => verified,
            Err(e) => {
                if matches!(e, wire::RecordError::NodeIdMismatch { .. }) {
                    node.counters.impersonations_rejected.fetch_add(1, Ordering::Relaxed);
                }
                return refuse(format!("record refused: {e}"));
            }
        };
        match node.store_verified(&verified, None, None).await {
            Ok(()) => pb::envelope::Kind::RecordUpdateAck(pb::RecordUpdateAck {}),
            Err(e) => {
                if matches!(e, ExchangeError::Replay { .. }) {
                    node.counters.replays_rejected.fetch_add(1, Ordering::Relaxed);
                }
                refuse(format!("record refused: {e}"))
            }
        }
    }
}

/// Tells every connected peer when our record changes, until shutdown.
pub(super) async fn push_record_updates(inner: std::sync::Weak<Inner>, shutdown: CancellationToken) {
    let Some(mut records) = inner.upgrade().map(|inner| inner.publisher.subscribe()) else { return };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = records.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let record = (**records.borrow_and_update()).clone();
        let Some(inner) = inner.upgrade() else { return };
        for (peer, session) in inner.sessions.all() {
            let update = pb::envelope::Kind::RecordUpdate(pb::RecordUpdate { record: Some(record.clone()) });
            let timeout = inner.options.request_timeout;
            inner.tasks.spawn(async move {
                if let Err(e) = session.request(update, timeout).await {
                    tracing::debug!(%peer, error = %e, "peer did not take our record update");
                }
            });
        }
    }
}
