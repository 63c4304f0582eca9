//! First contact and handshake throughput: raw QUIC against the full exchange, in the same run.

#[allow(clippy::wildcard_imports)]
use super::*;

// ---------------------------------------------------------------------------------------------------------
// 1. First contact

/// Two real in-process nodes (the library's `Exchange`, store included), the listener behind the delay
/// forwarder. Both sides are timed from the dialer's dial start until the record is committed to that side's
/// store (a store event), i.e. until the node holds the verified record. In RTTs of 2 × delay.
pub(super) async fn first_contact(sizes: &Sizes, work: &Path) -> anyhow::Result<(f64, f64)> {
    let rtt = 2.0 * sizes.contact_delay.as_secs_f64();
    let (mut dialer_rtts, mut listener_rtts, mut verified_rtts) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..sizes.contact_trials {
        let a = LocalNode::start(&work.join(format!("contact-{trial}-a"))).await?;
        let b = LocalNode::start(&work.join(format!("contact-{trial}-b"))).await?;
        let forwarder = delay_forwarder(b.exchange.local_addr()?, sizes.contact_delay).await?;
        let a_holds = tokio::spawn(wait_added(a.store.subscribe(), b.exchange.node_id()));
        let b_holds = tokio::spawn(wait_added(b.store.subscribe(), a.exchange.node_id()));
        let started = Instant::now();
        let verified = a.exchange.connect(forwarder, AddressSource::Manual).await?;
        let timeout = Duration::from_secs(10);
        let a_at = tokio::time::timeout(timeout, a_holds).await???;
        let b_at = tokio::time::timeout(timeout, b_holds).await???;
        let d = (a_at - started).as_secs_f64() / rtt;
        let l = (b_at - started).as_secs_f64() / rtt;
        let v = verified.elapsed.as_secs_f64() / rtt;
        println!(
            "  trial {trial}: dialer verified {v:.3} RTT, stored {d:.3} RTT; listener stored {l:.3} RTT"
        );
        dialer_rtts.push(d);
        listener_rtts.push(l);
        verified_rtts.push(v);
        a.stop().await;
        b.stop().await;
    }
    println!(
        "  median: dialer verified {:.3} RTT, dialer stored {:.3} RTT, listener stored {:.3} RTT (RTT = {:.0} ms)",
        median(&mut verified_rtts),
        median(&mut dialer_rtts),
        median(&mut listener_rtts),
        rtt * 1000.0
    );
    Ok((median(&mut dialer_rtts), median(&mut listener_rtts)))
}

// ---------------------------------------------------------------------------------------------------------
// 2. Handshake throughput

/// Dials `clients` to `address` with `concurrency` dials in flight, with `dial` per client; returns the
/// connections to keep them open.
pub(super) async fn dial_all<T, F, Fut>(
    clients: &Arc<Vec<Client>>,
    concurrency: usize,
    dial: F,
) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(Arc<Vec<Client>>, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (clients, next, dial) = (clients.clone(), next.clone(), dial.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= clients.len() {
                    return Ok::<_, anyhow::Error>(held);
                }
                held.push(dial(clients.clone(), i).await?);
            }
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.extend(result??);
    }
    Ok(all)
}

pub(super) async fn wait_until(mut done: impl FnMut() -> bool) {
    while !done() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Exchanges per second (a real `Exchange` listener: verification and store included) over bare
/// authenticated QUIC handshakes per second (a `QuicEndpoint` listener with the same TLS config that only
/// awaits authentication), the same pre-built clients dialing both, counted until the listener side has
/// completed all of them. Best round of each.
pub(super) async fn handshake_ratio(sizes: &Sizes, work: &Path) -> anyhow::Result<f64> {
    let n = sizes.handshakes;
    let clients = Arc::new((0..n).map(|_| new_client()).collect::<anyhow::Result<Vec<_>>>()?);
    let (mut best_bare, mut best_ours) = (0.0f64, 0.0f64);
    for round in 0..sizes.handshake_rounds {
        // Alternate which loop runs first, so that neither always gets the warmer (or cooler) machine.
        let (bare, ours) = if round % 2 == 0 {
            let bare = bare_round(sizes, &clients).await?;
            (bare, exchange_round(sizes, &clients, work, round).await?)
        } else {
            let ours = exchange_round(sizes, &clients, work, round).await?;
            (bare_round(sizes, &clients).await?, ours)
        };
        println!("  round {round}: bare {bare:.0}/s, exchange {ours:.0}/s, ratio {:.3}", ours / bare);
        best_bare = best_bare.max(bare);
        best_ours = best_ours.max(ours);
    }
    for client in clients.iter() {
        client.endpoint.close().await;
    }
    println!("  best: bare {best_bare:.0}/s, exchange {best_ours:.0}/s");
    Ok(best_ours / best_bare)
}

/// Says when the listener answered dials with a QUIC Retry: each costs the dialer a round trip, so the
/// figures are only comparable when neither loop (or both alike) crossed the admission thresholds.
pub(super) fn report_retries(listener: &str, retries: u64) {
    if retries > 0 {
        println!(
            "  ({listener} listener sent {retries} QUIC Retries: its admission thresholds were crossed)"
        );
    }
}

/// Bare: the listener only completes the authenticated handshake (same endpoint code, same TLS config).
pub(super) async fn bare_round(sizes: &Sizes, clients: &Arc<Vec<Client>>) -> anyhow::Result<f64> {
    let n = clients.len();
    let key = new_key();
    let server = QuicEndpoint::bind(loopback(), &key, QuicLimits::default())?;
    let address = server.local_addr()?;
    let authenticated = Arc::new(AtomicU64::new(0));
    {
        let (server, authenticated) = (server.clone(), authenticated.clone());
        tokio::spawn(async move {
            while let Some(inbound) = server.accept().await {
                let Ok(mut inbound) = inbound else { continue };
                let authenticated = authenticated.clone();
                tokio::spawn(async move {
                    if inbound.authenticated().await.is_ok() {
                        authenticated.fetch_add(1, Ordering::Relaxed);
                    }
                    // Keep the connection until the endpoint closes.
                    let _ = inbound.connection.closed().await;
                });
            }
        });
    }
    let started = Instant::now();
    let held = dial_all(clients, sizes.concurrency, move |clients, i| async move {
        Ok(clients[i].endpoint.connect(address, None).await?.connection)
    })
    .await?;
    let count = authenticated.clone();
    tokio::time::timeout(Duration::from_secs(60), wait_until(|| count.load(Ordering::Relaxed) >= n as u64))
        .await
        .context("bare listener did not authenticate every dial")?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    report_retries("bare", server.admission_stats().retries_sent);
    for c in &held {
        c.close(0u32.into(), b"done");
    }
    server.close().await;
    Ok(rate)
}

/// Ours: a real exchange listener (`Exchange` with its store); each dial is a full exchange of `Hello`s.
pub(super) async fn exchange_round(
    sizes: &Sizes,
    clients: &Arc<Vec<Client>>,
    work: &Path,
    round: usize,
) -> anyhow::Result<f64> {
    let n = clients.len();
    let node = LocalNode::start(&work.join(format!("handshake-{round}"))).await?;
    let address = node.exchange.local_addr()?;
    let started = Instant::now();
    let held = dial_all(clients, sizes.concurrency, move |clients, i| async move {
        client_exchange(&clients[i], address).await
    })
    .await?;
    let exchange = node.exchange.clone();
    tokio::time::timeout(Duration::from_secs(60), wait_until(|| exchange.connected_peers() >= n))
        .await
        .context("the exchange listener did not verify every dial")?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    report_retries("exchange", exchange.quic_admission().retries_sent);
    for h in &held {
        h.connection.close(0u32.into(), b"done");
    }
    drop(held);
    node.stop().await;
    Ok(rate)
}
