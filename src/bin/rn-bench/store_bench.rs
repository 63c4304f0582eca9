//! The store: upserts per second against raw batched rusqlite, and ListPeers pages against the raw query.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// 4. Store

/// Upserts built from verified records (signed by distinct keys, verified as the exchange does; signing and
/// verification happen before the timing), one topic and two addresses each.
pub(super) fn verified_upserts(count: usize) -> anyhow::Result<Vec<PeerUpsert>> {
    let now = now_ms();
    let policy = VerifyPolicy::at(now);
    (0..count)
        .map(|i| {
            let key = new_key();
            let octets = format!("{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
            let signed = client_record(&key, "bench", &format!("10.{octets}:30906"));
            let verified = wire::verify_record(&signed, None, &policy)?;
            let contact = (format!("100.{octets}:40000").parse()?, AddressSource::Inbound);
            Ok(upsert_from_record(&verified, Some(contact), now - i as i64))
        })
        .collect()
}

/// Upserts per second of raw batched rusqlite: the same rows into the same schema, in transactions of the
/// writer's batch size.
async fn raw_upsert_rate(work: &Path, raw_rows: Vec<PeerUpsert>) -> anyhow::Result<f64> {
    // Raw: same schema (created by opening a store), the write connection's pragmas (durability, cache and
    // automatic checkpoint threshold), plain INSERTs.
    let raw_db = work.join("raw.db");
    Store::open(StoreOptions::new(&raw_db))?.close().await?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut conn = rusqlite::Connection::open(&raw_db)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "cache_size", -32 * 1024)?;
        conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
        let started = Instant::now();
        for chunk in raw_rows.chunks(StoreOptions::new("x").max_batch) {
            let tx = conn.transaction()?;
            {
                let mut peer = tx.prepare_cached(
                    "INSERT INTO peers (node_id, seq, record, first_seen, last_seen, node_type, nat_type)
                     VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)",
                )?;
                let mut address = tx.prepare_cached(
                    "INSERT INTO peer_addresses (peer, address, source, first_seen) VALUES (?1, ?2, ?3, ?4)",
                )?;
                let mut topic = tx.prepare_cached("INSERT INTO peer_topics (peer, topic) VALUES (?1, ?2)")?;
                for u in chunk {
                    peer.execute(rusqlite::params![
                        &u.node_id.0[..],
                        u.seq as i64,
                        u.record,
                        u.seen_at_ms,
                        u.node_type as i64,
                        u.nat_type as i64
                    ])?;
                    // What the peer's rows are keyed by, as the store does.
                    let id = tx.last_insert_rowid();
                    for (a, source) in &u.addresses {
                        address.execute(rusqlite::params![
                            id,
                            a.to_string(),
                            *source as i64,
                            u.seen_at_ms
                        ])?;
                    }
                    for t in &u.topics {
                        topic.execute(rusqlite::params![id, t])?;
                    }
                }
            }
            tx.commit()?;
        }
        Ok(raw_rows.len() as f64 / started.elapsed().as_secs_f64())
    })
    .await?
}

/// Upserts per second through the store's writer (all submitted concurrently so that it batches) over raw
/// batched rusqlite inserts of the same rows into the same schema (transactions of the writer's batch size).
/// Returns the ratio, the store's rate, and the filled database (used by the ListPeers figure).
pub(super) async fn store_upserts(sizes: &Sizes, work: &Path) -> anyhow::Result<(f64, f64, PathBuf)> {
    let n = sizes.store_peers;
    let upserts = verified_upserts(n)?;
    let dir = work.join("store-data");
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("peers.db");

    let raw_rate = raw_upsert_rate(work, upserts.clone()).await?;

    let store = Store::open(StoreOptions::new(&db))?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for upsert in upserts {
        let store = store.clone();
        tasks.spawn(async move { store.upsert_peer(upsert).await });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let elapsed = started.elapsed();
    let rate = n as f64 / elapsed.as_secs_f64();
    let stats = store.stats().await?;
    // Where the store's time went: inside the writer's transactions, or queueing and answering around them.
    println!(
        "  writer busy in transactions {:.0} ms of {:.0} ms",
        store.write_batch_seconds().sum * 1e3,
        elapsed.as_secs_f64() * 1e3
    );
    store.close().await?;
    println!(
        "  {n} upserts: store {rate:.0}/s ({} batches), raw rusqlite {raw_rate:.0}/s, ratio {:.3}",
        stats.write_batches,
        rate / raw_rate
    );
    Ok((rate / raw_rate, rate, db))
}

/// One row of the raw list query, every column read as the store reads it.
type ListRow = (Vec<u8>, i64, i64, i64, i64, i64, f64, Option<String>);

/// A ListPeers page of 1000 over gRPC (the real daemon on the filled store, over its Unix control socket) over
/// the same page's SQL query run directly on the same file. Medians of repeated runs.
pub(super) async fn list_page_ratio(
    sizes: &Sizes,
    work: &Path,
    binary: &Path,
    db: &Path,
) -> anyhow::Result<f64> {
    let dir = work.join("list");
    std::fs::create_dir_all(dir.join("data"))?;
    std::fs::rename(db, dir.join("data").join("peers.db"))?;
    let daemon = start_daemon(binary, &dir, None).await?;
    let mut peers = PeerServiceClient::new(daemon.channel.clone());
    let request = ListPeersRequest { page_size: 1000, ..Default::default() };
    let first = peers.list_peers(request.clone()).await?.into_inner();
    println!("  daemon store: {} peers, page of {}", first.total, first.peers.len());
    let mut grpc = Vec::new();
    for _ in 0..sizes.list_repeats {
        let started = Instant::now();
        let page = peers.list_peers(request.clone()).await?.into_inner();
        grpc.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(page.peers.len() == 1000, "a page of {}", page.peers.len());
    }
    let path = dir.join("data").join("peers.db");
    let repeats = sizes.list_repeats;
    let mut raw = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let conn = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let sql = "SELECT p.node_id, p.seq, p.first_seen, p.last_seen, p.node_type, p.nat_type, p.score,
                   (SELECT group_concat(t.topic, char(31)) FROM peer_topics t WHERE t.peer = p.id)
                   FROM peers p ORDER BY p.last_seen DESC, p.node_id LIMIT 1000";
        let mut times = Vec::new();
        for _ in 0..repeats {
            let started = Instant::now();
            let mut statement = conn.prepare_cached(sql)?;
            let rows: Vec<ListRow> = statement
                .query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            times.push(started.elapsed().as_secs_f64());
            anyhow::ensure!(rows.len() == 1000, "raw page of {}", rows.len());
        }
        let started = Instant::now();
        for _ in 0..repeats {
            let _: i64 = conn.prepare_cached("SELECT COUNT(*) FROM peers p")?.query_row([], |r| r.get(0))?;
        }
        println!(
            "  (the store also counts the matching rows for `total`: {:.2} ms per COUNT(*) on the raw connection)",
            started.elapsed().as_secs_f64() * 1e3 / repeats as f64
        );
        Ok(times)
    })
    .await??;
    let (g, r) = (median(&mut grpc), median(&mut raw));
    println!("  page of 1000: gRPC {:.2} ms, raw SQL {:.2} ms, ratio {:.3}", g * 1e3, r * 1e3, g / r);
    drop(daemon);
    Ok(g / r)
}
