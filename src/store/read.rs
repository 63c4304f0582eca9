//! Queries: run on pooled read connections (inside `spawn_blocking`) for the public read methods, and on the
//! write connection by the writer where it needs a peer's summary for an event.
//!
//! Multi-statement reads run in one read transaction, so for example a page and its total come from the same
//! snapshot even while the writer commits. Rows whose stored node id is malformed are skipped with a warning
//! instead of failing the whole read.

use std::path::Path;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, Row, params_from_iter};

use crate::api::names::NodeId;

use super::StoreError;
use super::codec::{
    count_from_stored, decode_attributes, duration_from_micros, node_id_from_blob, u32_from_stored,
    u64_from_stored,
};
use super::schema::read_user_version;
use super::types::{
    AddressRow, AddressSource, Capabilities, JoinedTopic, NatType, NodeType, PeerCursor, PeerDetail,
    PeerOrder, PeerPage, PeerQuery, PeerSummary, PunchStats, Quality, ServiceEntry, StoreStats,
};

/// Separates topics in the aggregated topic column: U+001F cannot appear in a topic (no control characters).
const TOPIC_SEPARATOR: char = '\u{1f}';

/// Largest page served, whatever the caller asks for.
const MAX_PAGE: u32 = 1000;

/// The columns [`summary_from_row`] reads, from `peers p`. Topics come aggregated in one column so a page
/// costs one query, not one per row.
const SUMMARY_COLUMNS: &str = "p.node_id, p.seq, p.first_seen, p.last_seen, p.node_type, p.nat_type, p.score,
    (SELECT group_concat(t.topic, char(31)) FROM peer_topics t WHERE t.peer = p.id)";

/// How many columns [`SUMMARY_COLUMNS`] selects.
const SUMMARY_COLUMN_COUNT: usize = 8;

/// Reads a row selected with [`SUMMARY_COLUMNS`]; `None` when its node id is malformed.
fn summary_from_row(row: &Row<'_>) -> rusqlite::Result<Option<PeerSummary>> {
    let node_id = match row.get_ref(0)? {
        ValueRef::Blob(blob) => node_id_from_blob(blob),
        _ => None,
    };
    let Some(node_id) = node_id else {
        tracing::warn!("skipping a stored peer whose node id is not a 32-byte blob");
        return Ok(None);
    };
    let topics: Option<String> = row.get(7)?;
    let mut topics: Vec<String> = topics
        .as_deref()
        .unwrap_or("")
        .split(TOPIC_SEPARATOR)
        .filter(|topic| !topic.is_empty())
        .map(str::to_owned)
        .collect();
    topics.sort();
    Ok(Some(PeerSummary {
        node_id,
        seq: u64_from_stored(row.get(1)?),
        first_seen_ms: row.get(2)?,
        last_seen_ms: row.get(3)?,
        node_type: NodeType::from_stored(row.get(4)?),
        nat_type: NatType::from_stored(row.get(5)?),
        topics,
        score: row.get::<_, Option<f64>>(6)?.unwrap_or(0.0),
    }))
}

/// One peer's summary, as shown in lists and events.
pub(crate) fn peer_summary(conn: &Connection, node_id: &NodeId) -> Result<Option<PeerSummary>, StoreError> {
    let sql = format!("SELECT {SUMMARY_COLUMNS} FROM peers p WHERE p.node_id = ?1");
    let summary =
        conn.prepare_cached(&sql)?.query_row([node_id.as_bytes().as_slice()], summary_from_row).optional()?;
    Ok(summary.flatten())
}

/// Stored peers that list `topic`.
pub(crate) fn topic_peer_count(conn: &Connection, topic: &str) -> Result<u64, StoreError> {
    let count: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM peer_topics WHERE topic = ?1")?
        .query_row([topic], |row| row.get(0))?;
    Ok(count_from_stored(count))
}

/// One page of peers in the query's order, after its cursor, with the number of all matching peers.
pub(crate) fn list_peers(conn: &mut Connection, query: &PeerQuery) -> Result<PeerPage, StoreError> {
    let (conditions, values) = filter_conditions(query);
    let count_sql = format!("SELECT COUNT(*) FROM peers p{}", where_clause(&conditions));

    // Keyset pagination: rows strictly after the cursor in (key DESC, tiebreak ASC) order. The first
    // comparison alone bounds the index range scan; the second selects within it. Score ties are broken by
    // the integer id, not the node id: most peers score 0, and an index on (score, node_id) put every new peer
    // at a random place in it, which made each batch of new peers rewrite most of that index.
    let (key_column, tiebreak_column) = match query.order {
        PeerOrder::LastSeen => ("p.last_seen", "p.node_id"),
        PeerOrder::Score => ("p.score", "p.id"),
    };
    let mut page_conditions = conditions.clone();
    let mut page_values = values.clone();
    if let Some(cursor) = &query.after {
        let (key, tiebreak) = match (query.order, cursor) {
            (PeerOrder::LastSeen, PeerCursor::LastSeen { last_seen_ms, node_id }) => {
                (Value::Integer(*last_seen_ms), Value::Blob(node_id.as_bytes().to_vec()))
            }
            (PeerOrder::Score, PeerCursor::Score { score, stored }) => {
                (Value::Real(*score), Value::Integer(*stored))
            }
            _ => return Err(StoreError::CursorOrderMismatch),
        };
        page_values.push(key);
        let key_param = page_values.len();
        page_values.push(tiebreak);
        let tiebreak_param = page_values.len();
        page_conditions.push(format!(
            "{key_column} <= ?{key_param} AND ({key_column} < ?{key_param} OR {tiebreak_column} > ?{tiebreak_param})"
        ));
    }
    // The limit is written into the SQL rather than bound: SQLite re-prepares a statement each time a
    // parameter of its LIMIT is bound again, which cost a parse and plan per page. Page sizes repeat, so the
    // variants stay few in the statement cache.
    let limit = query.limit.clamp(1, MAX_PAGE) as usize;
    // The id comes last, after the summary's columns, for the next page's cursor.
    let page_sql = format!(
        "SELECT {SUMMARY_COLUMNS}, p.id FROM peers p{} ORDER BY {key_column} DESC, {tiebreak_column} ASC LIMIT {}",
        where_clause(&page_conditions),
        limit + 1
    );

    let tx = conn.transaction()?;
    let total: i64 =
        tx.prepare_cached(&count_sql)?.query_row(params_from_iter(values.iter()), |row| row.get(0))?;
    let mut peers = Vec::with_capacity(limit + 1);
    // The id of each row in `peers`.
    let mut stored = Vec::with_capacity(limit + 1);
    {
        let mut statement = tx.prepare_cached(&page_sql)?;
        let mut rows = statement.query(params_from_iter(page_values.iter()))?;
        while let Some(row) = rows.next()? {
            if let Some(summary) = summary_from_row(row)? {
                peers.push(summary);
                stored.push(row.get(SUMMARY_COLUMN_COUNT)?);
            }
        }
    }
    tx.commit()?;

    // One row more than asked for was fetched only to learn whether another page follows.
    let next = if peers.len() > limit {
        peers.truncate(limit);
        peers.last().map(|last| cursor_after(query.order, last, stored[limit - 1]))
    } else {
        None
    };
    Ok(PeerPage { peers, next, total: count_from_stored(total) })
}

/// The query's filters as SQL conditions on `peers p`, with their values bound in order.
fn filter_conditions(query: &PeerQuery) -> (Vec<String>, Vec<Value>) {
    let mut conditions: Vec<String> = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if let Some(topic) = &query.topic {
        values.push(Value::Text(topic.clone()));
        conditions.push(format!(
            "EXISTS (SELECT 1 FROM peer_topics t WHERE t.peer = p.id AND t.topic = ?{})",
            values.len()
        ));
    }
    if let Some(node_type) = query.node_type {
        values.push(Value::Integer(node_type as i64));
        conditions.push(format!("p.node_type = ?{}", values.len()));
    }
    if let Some(since) = query.seen_since_ms {
        values.push(Value::Integer(since));
        conditions.push(format!("p.last_seen >= ?{}", values.len()));
    }
    (conditions, values)
}

fn where_clause(conditions: &[String]) -> String {
    if conditions.is_empty() { String::new() } else { format!(" WHERE {}", conditions.join(" AND ")) }
}

/// The cursor after `last`, whose row has the id `stored`.
fn cursor_after(order: PeerOrder, last: &PeerSummary, stored: i64) -> PeerCursor {
    match order {
        PeerOrder::LastSeen => {
            PeerCursor::LastSeen { last_seen_ms: last.last_seen_ms, node_id: last.node_id }
        }
        PeerOrder::Score => PeerCursor::Score { score: last.score, stored },
    }
}

/// A peer's stored addresses, the ones that worked most recently first.
fn peer_addresses(tx: &rusqlite::Transaction<'_>, id: i64) -> Result<Vec<AddressRow>, StoreError> {
    Ok(tx
        .prepare_cached(
            "SELECT address, source, first_seen, last_success, last_failure, consecutive_failures
             FROM peer_addresses WHERE peer = ?1
             ORDER BY last_success IS NULL, last_success DESC, address",
        )?
        .query_map([id], |row| {
            let text: String = row.get(0)?;
            // Only parsed addresses are written; a row that is not one was edited by hand or is corrupt.
            let address = text.parse().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
            })?;
            Ok(AddressRow {
                address,
                source: AddressSource::from_stored(row.get(1)?),
                first_seen_ms: row.get(2)?,
                last_success_ms: row.get(3)?,
                last_failure_ms: row.get(4)?,
                consecutive_failures: u32_from_stored(row.get(5)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Everything stored about one peer.
pub(crate) fn get_peer(conn: &mut Connection, node_id: &NodeId) -> Result<Option<PeerDetail>, StoreError> {
    let tx = conn.transaction()?;
    let Some(summary) = peer_summary(&tx, node_id)? else {
        return Ok(None);
    };
    // The tables about the peer are keyed by its integer id (see the v3 migration in `schema.rs`).
    let (id, record): (i64, Vec<u8>) = tx
        .prepare_cached("SELECT id, record FROM peers WHERE node_id = ?1")?
        .query_row([node_id.as_bytes().as_slice()], |row| Ok((row.get(0)?, row.get(1)?)))?;

    let addresses = peer_addresses(&tx, id)?;

    let quality = tx
        .prepare_cached(
            "SELECT rtt_ewma_us, rtt_samples, successes, failures, last_error, last_error_at, last_success_at
             FROM peer_quality WHERE peer = ?1",
        )?
        .query_row([id], |row| {
            Ok(Quality {
                rtt_ewma: row.get::<_, Option<i64>>(0)?.map(duration_from_micros),
                rtt_samples: count_from_stored(row.get(1)?),
                successes: count_from_stored(row.get(2)?),
                failures: count_from_stored(row.get(3)?),
                last_error: row.get(4)?,
                last_error_ms: row.get(5)?,
                last_success_ms: row.get(6)?,
            })
        })
        .optional()?
        .unwrap_or_default();

    let capabilities = tx
        .prepare_cached(
            "SELECT os, arch, cpu_cores, memory_bytes, software_version FROM peer_capabilities WHERE peer = ?1",
        )?
        .query_row([id], |row| {
            Ok(Capabilities {
                os: row.get(0)?,
                arch: row.get(1)?,
                cpu_cores: u32_from_stored(row.get(2)?),
                memory_bytes: u64_from_stored(row.get(3)?),
                software_version: row.get(4)?,
            })
        })
        .optional()?;

    let services = tx
        .prepare_cached(
            "SELECT name, version, attributes FROM peer_services WHERE peer = ?1 ORDER BY position",
        )?
        .query_map([id], |row| {
            Ok(ServiceEntry {
                name: row.get(0)?,
                version: row.get(1)?,
                attributes: decode_attributes(&row.get::<_, String>(2)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    tx.commit()?;

    Ok(Some(PeerDetail { summary, record, addresses, quality, capabilities, services }))
}

/// Joined topics sorted by name, each with the number of stored peers sharing it.
pub(crate) fn punch_stats(conn: &Connection) -> Result<Vec<PunchStats>, StoreError> {
    let stats = conn
        .prepare_cached(
            "SELECT our_nat, their_nat, attempts, successes, last_outcome, last_at, last_success_ms
             FROM punch_stats ORDER BY our_nat, their_nat",
        )?
        .query_map([], |row| {
            Ok(PunchStats {
                our_nat: row.get(0)?,
                their_nat: row.get(1)?,
                attempts: count_from_stored(row.get(2)?),
                successes: count_from_stored(row.get(3)?),
                last_outcome: row.get(4)?,
                last_at_ms: row.get(5)?,
                last_success_ms: row.get::<_, Option<i64>>(6)?.map(count_from_stored),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(stats)
}

pub(crate) fn joined_topics(conn: &Connection) -> Result<Vec<JoinedTopic>, StoreError> {
    let topics = conn
        .prepare_cached(
            "SELECT j.topic, j.joined_at, (SELECT COUNT(*) FROM peer_topics t WHERE t.topic = j.topic)
             FROM joined_topics j ORDER BY j.topic",
        )?
        .query_map([], |row| {
            Ok(JoinedTopic {
                name: row.get(0)?,
                joined_at_ms: row.get(1)?,
                peers: count_from_stored(row.get(2)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(topics)
}

/// Table counts, schema version and file sizes; the writer's counters are filled in by the caller.
pub(crate) fn stats(conn: &mut Connection, path: &Path) -> Result<StoreStats, StoreError> {
    let tx = conn.transaction()?;
    let count = |sql: &str| -> rusqlite::Result<u64> {
        tx.query_row(sql, [], |row| row.get::<_, i64>(0)).map(count_from_stored)
    };
    let peers = count("SELECT COUNT(*) FROM peers")?;
    let peer_addresses = count("SELECT COUNT(*) FROM peer_addresses")?;
    let joined_topics = count("SELECT COUNT(*) FROM joined_topics")?;
    let schema_version = read_user_version(&tx)?;
    tx.commit()?;
    Ok(StoreStats {
        peers,
        peer_addresses,
        joined_topics,
        size_bytes: file_size(path) + file_size(&wal_path(path)),
        schema_version,
        writes_committed: 0,
        write_batches: 0,
    })
}

/// SQLite's write-ahead log lives beside the database as `<name>-wal`.
pub(crate) fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

/// Size of a file, 0 when it does not exist (the WAL is removed when the last connection closes).
fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}
