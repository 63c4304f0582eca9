//! What each write command does to the database, inside the writer's transaction: upserts that merge by
//! seq, addresses and their quality, topics, punch statistics, pruning. Each `apply_*` function returns its
//! result with the [`PeerEvent`]s the change causes; the writer (`writer.rs`) batches, commits and answers.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::StoreError;
use super::codec::{
    self, MAX_ERROR_BYTES, duration_from_micros, duration_to_micros, encode_attributes, node_id_from_blob,
    truncate_on_char_boundary, u64_from_stored, u64_to_stored,
};
use super::read;
use super::types::{
    JoinedTopic, NatType, NodeType, PeerEvent, PeerSummary, PeerUpsert, PunchOutcome, QualitySample,
    UpsertOutcome,
};
use super::writer::{MAX_ADDRESSES_PER_PEER, PeerId};
use crate::api::names::{NodeId, validate_topic};

/// Inserts a new peer or merges into the stored one according to seq (see [`PeerUpsert::seq`]). Returns the
/// peer's id with the outcome.
///
/// The insert is tried first: in a burst of discoveries most peers are new, and for those the INSERT alone
/// both checks and writes (a SELECT first would look the peer up twice).
pub(super) fn apply_upsert(
    conn: &Connection,
    upsert: &PeerUpsert,
    wants_events: bool,
) -> Result<(UpsertOutcome, PeerId, Vec<PeerEvent>), StoreError> {
    let node_id = upsert.node_id.as_bytes().as_slice();
    let seq = u64_to_stored(upsert.seq);
    let inserted = conn
        .prepare_cached(
            "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type, score)
             VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, 0) ON CONFLICT (node_id) DO NOTHING",
        )?
        .execute(params![
            node_id,
            seq,
            upsert.record,
            upsert.seen_at_ms,
            upsert.node_type as i64,
            upsert.nat_type as i64
        ])?;
    if inserted == 1 {
        // The connection runs nothing else in between: this is the id the INSERT just assigned.
        let id = PeerId(conn.last_insert_rowid());
        let events = write_new_peer(conn, id, upsert, wants_events)?;
        return Ok((UpsertOutcome::Added, id, events));
    }
    let (id, stored_seq): (i64, i64) = conn
        .prepare_cached("SELECT id, seq FROM peers WHERE node_id = ?1")?
        .query_row([node_id], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let id = PeerId(id);
    match u64_from_stored(stored_seq) {
        stored_seq if stored_seq > upsert.seq => {
            return Ok((UpsertOutcome::Stale { stored_seq }, id, Vec::new()));
        }
        stored_seq if stored_seq == upsert.seq => {
            conn.prepare_cached("UPDATE peers SET last_seen = max(last_seen, ?2) WHERE id = ?1")?
                .execute(params![id.0, upsert.seen_at_ms])?;
        }
        _ => {
            conn.prepare_cached(
                "UPDATE peers SET seq = ?2, record = ?3, last_seen = max(last_seen, ?4), node_type = ?5,
                 nat_type = ?6 WHERE id = ?1",
            )?
            .execute(params![
                id.0,
                seq,
                upsert.record,
                upsert.seen_at_ms,
                upsert.node_type as i64,
                upsert.nat_type as i64
            ])?;
            for sql in [
                "DELETE FROM peer_topics WHERE peer = ?1",
                "DELETE FROM peer_capabilities WHERE peer = ?1",
                "DELETE FROM peer_services WHERE peer = ?1",
            ] {
                conn.prepare_cached(sql)?.execute([id.0])?;
            }
            insert_record_details(conn, id, upsert)?;
        }
    }
    merge_addresses(conn, id, upsert, false)?;

    let events = if wants_events {
        read::peer_summary(conn, &upsert.node_id)?.map(PeerEvent::Updated).into_iter().collect()
    } else {
        Vec::new()
    };
    Ok((UpsertOutcome::Updated, id, events))
}

/// The details of a peer just inserted, and its `Added` event: everything the summary shows was just
/// written from the upsert, so nothing is read back.
fn write_new_peer(
    conn: &Connection,
    id: PeerId,
    upsert: &PeerUpsert,
    wants_events: bool,
) -> Result<Vec<PeerEvent>, StoreError> {
    let topics = insert_record_details(conn, id, upsert)?;
    merge_addresses(conn, id, upsert, true)?;
    if !wants_events {
        return Ok(Vec::new());
    }
    Ok(vec![PeerEvent::Added(PeerSummary {
        node_id: upsert.node_id,
        seq: upsert.seq,
        first_seen_ms: upsert.seen_at_ms,
        last_seen_ms: upsert.seen_at_ms,
        node_type: NodeType::from_stored(upsert.node_type as i64),
        nat_type: NatType::from_stored(upsert.nat_type as i64),
        topics,
        score: 0.0,
    })])
}

/// An upsert followed, unless it was stale, by its connection's quality sample: the same changes and events
/// as the two commands one after the other, without looking the peer up again.
pub(super) fn apply_upsert_verified(
    conn: &Connection,
    upsert: &PeerUpsert,
    quality: Option<&QualitySample>,
    wants_events: bool,
) -> Result<(UpsertOutcome, Vec<PeerEvent>), StoreError> {
    let (outcome, id, mut events) = apply_upsert(conn, upsert, wants_events)?;
    if let Some(sample) = quality
        && !matches!(outcome, UpsertOutcome::Stale { .. })
    {
        let ((), quality_events) = apply_known_quality(conn, id, &upsert.node_id, sample, wants_events)?;
        events.extend(quality_events);
    }
    Ok((outcome, events))
}

/// Writes what a record carries (topics, capabilities and services) for a peer that has none stored. Returns
/// the topics as stored: valid ones, sorted, without duplicates.
fn insert_record_details(
    conn: &Connection,
    id: PeerId,
    upsert: &PeerUpsert,
) -> Result<Vec<String>, StoreError> {
    let id = id.0;

    let mut topics: Vec<String> = Vec::with_capacity(upsert.topics.len());
    let mut insert_topic =
        conn.prepare_cached("INSERT OR IGNORE INTO peer_topics (peer, topic) VALUES (?1, ?2)")?;
    for topic in &upsert.topics {
        // Listing joins topics with U+001F, which the topic rule excludes; a topic breaking the rule would
        // corrupt that, so it is dropped here whatever let it through.
        if let Err(reason) = validate_topic(topic) {
            tracing::debug!(node_id = %upsert.node_id, %reason, "ignoring an invalid topic of a peer");
            continue;
        }
        insert_topic.execute(params![id, topic])?;
        topics.push(topic.clone());
    }
    topics.sort();
    topics.dedup();

    if let Some(capabilities) = &upsert.capabilities {
        conn.prepare_cached(
            "INSERT INTO peer_capabilities (peer, os, arch, cpu_cores, memory_bytes, software_version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            id,
            capabilities.os,
            capabilities.arch,
            capabilities.cpu_cores,
            u64_to_stored(capabilities.memory_bytes),
            capabilities.software_version
        ])?;
    }

    if !upsert.services.is_empty() {
        let mut insert_service = conn.prepare_cached(
            "INSERT INTO peer_services (peer, position, name, version, attributes) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (position, service) in upsert.services.iter().enumerate() {
            let mut attributes = service.attributes.clone();
            attributes.sort_by(|a, b| a.0.cmp(&b.0));
            insert_service.execute(params![
                id,
                position as i64,
                service.name,
                service.version,
                encode_attributes(&attributes)
            ])?;
        }
    }
    Ok(topics)
}

/// Deletes a peer's addresses beyond the [`MAX_ADDRESSES_PER_PEER`] best. The bound is written into the SQL
/// rather than bound as a parameter: SQLite re-prepares a statement whenever a parameter of its LIMIT is bound
/// again, which cost a full parse and plan on every upsert (a test checks the two numbers agree).
const TRIM_ADDRESSES_SQL: &str = "DELETE FROM peer_addresses WHERE peer = ?1 AND address NOT IN (
     SELECT address FROM peer_addresses WHERE peer = ?1
     ORDER BY last_success IS NULL, last_success DESC, consecutive_failures ASC, first_seen DESC, address
     LIMIT 32)";

/// Adds the upsert's addresses that are new (an address first learned with an unknown source takes the first
/// known one), then trims the peer back to [`MAX_ADDRESSES_PER_PEER`]. Kept first: addresses that succeeded,
/// most recent success first; then fewest consecutive failures; then the most recently learned. So a flood of
/// made-up addresses can only displace addresses that never worked, and known-good ones survive it.
///
/// `new_peer` says the peer had no addresses before, so the rows inserted here are all it has.
fn merge_addresses(
    conn: &Connection,
    id: PeerId,
    upsert: &PeerUpsert,
    new_peer: bool,
) -> Result<(), StoreError> {
    if upsert.addresses.is_empty() {
        return Ok(());
    }
    let id = id.0;
    let mut insert = conn.prepare_cached(
        "INSERT INTO peer_addresses (peer, address, source, first_seen) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (peer, address) DO UPDATE SET source = excluded.source
         WHERE peer_addresses.source = 0",
    )?;
    let mut inserted = 0i64;
    for (address, source) in &upsert.addresses {
        inserted +=
            insert.execute(params![id, address.to_string(), *source as i64, upsert.seen_at_ms])? as i64;
    }
    // Trimming sorts the peer's addresses: only worth it when they may be over the bound.
    let stored = if new_peer {
        inserted
    } else {
        conn.prepare_cached("SELECT COUNT(*) FROM peer_addresses WHERE peer = ?1")?
            .query_row([id], |row| row.get(0))?
    };
    if stored > MAX_ADDRESSES_PER_PEER {
        conn.prepare_cached(TRIM_ADDRESSES_SQL)?.execute([id])?;
    }
    Ok(())
}

/// The next smoothed round trip time, in microseconds: like TCP's SRTT (RFC 6298), each sample moves the
/// average by 1/8 of the difference; the first sample sets it.
pub(crate) fn next_rtt_ewma_us(previous_us: Option<i64>, sample_us: i64) -> i64 {
    match previous_us {
        None => sample_us,
        Some(previous) => previous.saturating_add(sample_us.saturating_sub(previous) / 8),
    }
}

/// A peer's score, used to order peers from most to least useful:
///
/// `score = successes / (successes + failures + 1) × 1 / (1 + rtt_ms / 1000)`
///
/// The first factor is the success ratio, pulled towards 0 while there are few attempts (the `+ 1`); the second
/// halves the score for each second of smoothed round trip time, and is 1 while no RTT was measured. Both
/// factors lie in [0, 1], so the score does too (and is 0 for a peer never reached).
pub(crate) fn score(successes: u64, failures: u64, rtt: Option<Duration>) -> f64 {
    let successes = successes as f64;
    let attempts = successes + failures as f64 + 1.0;
    let rtt_ms = rtt.map_or(0.0, |rtt| rtt.as_secs_f64() * 1000.0);
    let value = successes / attempts / (1.0 + rtt_ms / 1000.0);
    if value.is_finite() { value.clamp(0.0, 1.0) } else { 0.0 }
}

/// Folds one connection attempt into the peer's quality and score. Samples for unknown peers are dropped:
/// quality is only kept for peers the store knows.
pub(super) fn apply_quality(
    conn: &Connection,
    node_id: &NodeId,
    sample: &QualitySample,
    wants_events: bool,
) -> Result<((), Vec<PeerEvent>), StoreError> {
    let id = conn
        .prepare_cached("SELECT id FROM peers WHERE node_id = ?1")?
        .query_row([node_id.as_bytes().as_slice()], |row| row.get(0))
        .optional()?;
    let Some(id) = id else {
        return Ok(((), Vec::new()));
    };
    apply_known_quality(conn, PeerId(id), node_id, sample, wants_events)
}

/// [`apply_quality`] for a peer known to be stored under `id`.
pub(super) fn apply_known_quality(
    conn: &Connection,
    id: PeerId,
    node_id: &NodeId,
    sample: &QualitySample,
    wants_events: bool,
) -> Result<((), Vec<PeerEvent>), StoreError> {
    let id = id.0;
    conn.prepare_cached("INSERT OR IGNORE INTO peer_quality (peer) VALUES (?1)")?.execute([id])?;

    match &sample.outcome {
        Ok(rtt) => {
            if let Some(rtt) = rtt {
                let previous: Option<i64> = conn
                    .prepare_cached("SELECT rtt_ewma_us FROM peer_quality WHERE peer = ?1")?
                    .query_row([id], |row| row.get(0))?;
                let ewma = next_rtt_ewma_us(previous, duration_to_micros(*rtt));
                conn.prepare_cached(
                    "UPDATE peer_quality SET rtt_ewma_us = ?2, rtt_samples = rtt_samples + 1 WHERE peer = ?1",
                )?
                .execute(params![id, ewma])?;
            }
            // max(): samples may arrive out of order; the latest success is what matters.
            conn.prepare_cached(
                "UPDATE peer_quality SET successes = successes + 1,
                 last_success_at = max(coalesce(last_success_at, ?2), ?2) WHERE peer = ?1",
            )?
            .execute(params![id, sample.at_ms])?;
            if let Some(address) = &sample.address {
                conn.prepare_cached(
                    "UPDATE peer_addresses SET last_success = max(coalesce(last_success, ?3), ?3),
                     consecutive_failures = 0 WHERE peer = ?1 AND address = ?2",
                )?
                .execute(params![id, address.to_string(), sample.at_ms])?;
            }
        }
        Err(message) => {
            let message = truncate_on_char_boundary(message, MAX_ERROR_BYTES);
            conn.prepare_cached(
                "UPDATE peer_quality SET failures = failures + 1, last_error = ?2, last_error_at = ?3
                 WHERE peer = ?1",
            )?
            .execute(params![id, message, sample.at_ms])?;
            if let Some(address) = &sample.address {
                conn.prepare_cached(
                    "UPDATE peer_addresses SET last_failure = max(coalesce(last_failure, ?3), ?3),
                     consecutive_failures = consecutive_failures + 1 WHERE peer = ?1 AND address = ?2",
                )?
                .execute(params![id, address.to_string(), sample.at_ms])?;
            }
        }
    }

    let (successes, failures, rtt_us): (i64, i64, Option<i64>) = conn
        .prepare_cached("SELECT successes, failures, rtt_ewma_us FROM peer_quality WHERE peer = ?1")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    let score = score(
        codec::count_from_stored(successes),
        codec::count_from_stored(failures),
        rtt_us.map(duration_from_micros),
    );
    conn.prepare_cached("UPDATE peers SET score = ?2 WHERE id = ?1")?.execute(params![id, score])?;

    if !wants_events {
        return Ok(((), Vec::new()));
    }
    let events = read::peer_summary(conn, node_id)?.map(PeerEvent::Updated).into_iter().collect();
    Ok(((), events))
}

/// Deletes a peer and, through the foreign keys' cascade, everything about it.
pub(super) fn apply_forget(
    conn: &Connection,
    node_id: &NodeId,
) -> Result<(bool, Vec<PeerEvent>), StoreError> {
    let deleted = conn
        .prepare_cached("DELETE FROM peers WHERE node_id = ?1")?
        .execute([node_id.as_bytes().as_slice()])?;
    if deleted == 0 {
        return Ok((false, Vec::new()));
    }
    Ok((true, vec![PeerEvent::Removed(*node_id)]))
}

pub(super) fn apply_join_topic(
    conn: &Connection,
    topic: &str,
    now_ms: i64,
    max_joined_topics: u64,
) -> Result<((JoinedTopic, bool), Vec<PeerEvent>), StoreError> {
    validate_topic(topic)?;
    let existing: Option<i64> = conn
        .prepare_cached("SELECT joined_at FROM joined_topics WHERE topic = ?1")?
        .query_row([topic], |row| row.get(0))
        .optional()?;
    let (joined_at_ms, newly_joined) = match existing {
        Some(joined_at) => (joined_at, false),
        None => {
            let joined: i64 = conn.query_row("SELECT COUNT(*) FROM joined_topics", [], |row| row.get(0))?;
            if codec::count_from_stored(joined) >= max_joined_topics {
                return Err(StoreError::TooManyTopics { max: max_joined_topics });
            }
            conn.prepare_cached("INSERT INTO joined_topics (topic, joined_at) VALUES (?1, ?2)")?
                .execute(params![topic, now_ms])?;
            (now_ms, true)
        }
    };
    let peers = read::topic_peer_count(conn, topic)?;
    let joined = JoinedTopic { name: topic.to_owned(), joined_at_ms, peers };
    Ok(((joined, newly_joined), Vec::new()))
}

/// The `node_state` key holding the seq of the node's own latest metadata record (8 bytes, big-endian).
const RECORD_SEQ_KEY: &str = "record_seq";

/// Takes the next seq for the node's own record: above every seq issued before (so peers never see it go
/// back, even after a restart) and at least `floor` (the caller passes the clock, so seqs stay increasing even
/// if this database is lost).
pub(super) fn apply_next_record_seq(
    conn: &Connection,
    floor: u64,
) -> Result<(u64, Vec<PeerEvent>), StoreError> {
    let stored: Option<Vec<u8>> = conn
        .prepare_cached("SELECT value FROM node_state WHERE key = ?1")?
        .query_row([RECORD_SEQ_KEY], |row| row.get(0))
        .optional()?;
    let previous =
        stored.and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok()).map(u64::from_be_bytes);
    let next = previous.map_or(floor, |seq| seq.saturating_add(1).max(floor)).max(1);
    conn.prepare_cached("INSERT INTO node_state (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
        .execute(params![RECORD_SEQ_KEY, next.to_be_bytes().as_slice()])?;
    Ok((next, Vec::new()))
}

/// Counts one punch attempt for its pair of NAT types.
pub(super) fn apply_record_punch(
    conn: &Connection,
    outcome: &PunchOutcome,
) -> Result<((), Vec<PeerEvent>), StoreError> {
    conn.prepare_cached(
        "INSERT INTO punch_stats (our_nat, their_nat, attempts, successes, last_outcome, last_at, last_success_ms)
         VALUES (?1, ?2, 1, ?3, ?4, ?5, ?6)
         ON CONFLICT (our_nat, their_nat) DO UPDATE SET
             attempts = attempts + 1,
             successes = successes + excluded.successes,
             last_outcome = excluded.last_outcome,
             last_at = excluded.last_at,
             last_success_ms = coalesce(excluded.last_success_ms, last_success_ms)",
    )?
    .execute(params![
        outcome.our_nat,
        outcome.their_nat,
        i64::from(outcome.time_to_connected_ms.is_some()),
        outcome.detail,
        outcome.at_ms,
        outcome.time_to_connected_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)),
    ])?;
    Ok(((), Vec::new()))
}

pub(super) fn apply_leave_topic(
    conn: &Connection,
    topic: &str,
) -> Result<(bool, Vec<PeerEvent>), StoreError> {
    let deleted = conn.prepare_cached("DELETE FROM joined_topics WHERE topic = ?1")?.execute([topic])?;
    Ok((deleted > 0, Vec::new()))
}

/// Deletes peers not seen within the retention, then the least recently seen beyond `max_peers`.
pub(super) fn apply_prune(
    conn: &Connection,
    now_ms: i64,
    retention_ms: i64,
    max_peers: u64,
) -> Result<(u64, Vec<PeerEvent>), StoreError> {
    let cutoff = now_ms.saturating_sub(retention_ms);
    let mut removed =
        delete_returning_ids(conn, "DELETE FROM peers WHERE last_seen < ?1 RETURNING node_id", cutoff)?;

    let stored: i64 = conn.query_row("SELECT COUNT(*) FROM peers", [], |row| row.get(0))?;
    let excess = codec::count_from_stored(stored).saturating_sub(max_peers);
    if excess > 0 {
        removed.extend(delete_returning_ids(
            conn,
            "DELETE FROM peers WHERE id IN (
                 SELECT id FROM peers ORDER BY last_seen ASC, node_id ASC LIMIT ?1)
             RETURNING node_id",
            i64::try_from(excess).unwrap_or(i64::MAX),
        )?);
    }
    if !removed.is_empty() {
        tracing::debug!(removed = removed.len(), "pruned peers");
    }
    let count = removed.len() as u64;
    let events = removed.into_iter().map(PeerEvent::Removed).collect();
    Ok((count, events))
}

/// Runs a `DELETE … RETURNING node_id` with one parameter and collects the ids (a malformed stored id is
/// deleted like any other but cannot be reported in an event).
fn delete_returning_ids(conn: &Connection, sql: &str, param: i64) -> Result<Vec<NodeId>, StoreError> {
    let mut statement = conn.prepare_cached(sql)?;
    let mut rows = statement.query([param])?;
    let mut ids = Vec::new();
    while let Some(row) = rows.next()? {
        if let rusqlite::types::ValueRef::Blob(blob) = row.get_ref(0)?
            && let Some(id) = node_id_from_blob(blob)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trim_statement_keeps_the_address_bound() {
        assert!(TRIM_ADDRESSES_SQL.ends_with(&format!("LIMIT {MAX_ADDRESSES_PER_PEER})")));
    }

    #[test]
    fn ewma_follows_tcp_srtt() {
        assert_eq!(next_rtt_ewma_us(None, 100_000), 100_000);
        assert_eq!(next_rtt_ewma_us(Some(100_000), 200_000), 112_500);
        assert_eq!(next_rtt_ewma_us(Some(112_500), 0), 112_500 - 14_062);
    }

    #[test]
    fn score_stays_within_unit_interval() {
        assert_eq!(score(0, 0, None), 0.0);
        assert_eq!(score(0, 100, Some(Duration::from_millis(10))), 0.0);
        assert!((score(1, 0, None) - 0.5).abs() < 1e-12);
        assert!((score(3, 0, Some(Duration::from_secs(1))) - 0.375).abs() < 1e-12);
        for (s, f, rtt) in [
            (u64::MAX, 0, None),
            (u64::MAX, u64::MAX, Some(Duration::MAX)),
            (5, 7, Some(Duration::ZERO)),
            (1_000_000, 0, Some(Duration::from_micros(1))),
        ] {
            let value = score(s, f, rtt);
            assert!((0.0..=1.0).contains(&value), "{value} out of range");
        }
    }
}
