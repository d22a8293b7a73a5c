//! Upstream faults under concurrent load: 500 storms, a hanging upstream,
//! connection resets, and 429 storms (pushback holds: no hammering).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use provisioning_gateway::mock::Scripted;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{assert_definite, call, gaps, storm, tally};
use crate::support::{Opts, request, spawn_app};

fn vendor_error(id: &str) -> String {
    format!(
        r#"{{"requestError":{{"serviceException":{{"messageId":"{id}","text":"vendor trouble"}}}}}}"#
    )
}

#[tokio::test]
async fn a_500_storm_is_answered_internal_within_budget_and_the_gateway_recovers() {
    // 20/s: the vendor allows one per 50 ms; the gateway sends one per 90 ms
    // (the tests' 40 ms margin), so 30 calls fit well within 5 s deadlines.
    let app = spawn_app(Opts::default()).await;
    app.mock.script(std::iter::repeat_n(
        Scripted::new(500, vendor_error("SERVER_ERROR")),
        30,
    ));
    let client = app.client().await;
    let outcomes = storm(
        &client,
        (0..30).map(|n| (request(n), Duration::from_secs(5))),
        30,
    )
    .await;
    assert_definite(&outcomes);
    let t = tally(&outcomes);
    assert_eq!(t.get("Internal/SERVER_ERROR"), Some(&30), "{t:?}");
    let arrivals = app.mock.arrivals();
    assert_eq!(arrivals.len(), 30, "a 500 is not retried: {t:?}");
    let min = gaps(&arrivals).into_iter().min().unwrap();
    assert!(
        min >= Duration::from_millis(50),
        "gap {min:?} under the vendor's interval"
    );

    // The storm is over: the next call goes through.
    let after = call(&mut client.clone(), request(100), Duration::from_secs(4)).await;
    assert!(after.result.is_ok(), "{after:?}");
}

/// A raw upstream that reads the first `hang` requests and never answers
/// them (holding their connections open), then answers 204 to the rest.
/// Returns its address and when each request arrived.
async fn hanging_upstream(hang: usize) -> (std::net::SocketAddr, Arc<Mutex<Vec<Instant>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&arrivals);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                while let Ok(1..) = conn.read(&mut buf).await {
                    let index = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(Instant::now());
                        seen.len()
                    };
                    if index <= hang {
                        // Hang: hold the connection until the gateway drops it.
                        while let Ok(1..) = conn.read(&mut buf).await {}
                        return;
                    }
                    let reply = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, arrivals)
}

#[tokio::test]
async fn a_hanging_upstream_never_holds_a_caller_past_its_deadline() {
    let (upstream, arrivals) = hanging_upstream(30).await;
    let app = spawn_app(Opts {
        upstream_timeout: Duration::from_millis(800),
        upstream_url: Some(format!("http://{upstream}")),
        ..Opts::default()
    })
    .await;
    let client = app.client().await;
    // 30 slots 90 ms apart (2.7 s) and an 800 ms attempt each fit within the
    // 5 s deadlines: every call is admitted and ends at the upstream timeout,
    // well before its deadline. (An attempt capped by the deadline itself
    // answers 20 ms before it, server-side; tests/mapping.rs covers that.)
    let outcomes = storm(
        &client,
        (0..30).map(|n| (request(n), Duration::from_secs(5))),
        30,
    )
    .await;
    assert_definite(&outcomes);
    let t = tally(&outcomes);
    assert_eq!(
        t.get("DeadlineExceeded/UPSTREAM_TIMEOUT"),
        Some(&30),
        "{t:?}"
    );
    let at = arrivals.lock().unwrap().clone();
    assert_eq!(
        at.len(),
        30,
        "one attempt each: a timeout may have taken effect"
    );
    let min = at.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    assert!(
        min >= Duration::from_millis(50),
        "gap {min:?} under the vendor's interval"
    );

    // The hung connections are abandoned, not reused: the next call goes through.
    let after = call(&mut client.clone(), request(100), Duration::from_secs(4)).await;
    assert!(after.result.is_ok(), "{after:?}");
}

#[tokio::test]
async fn connection_resets_are_unavailable_and_never_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await; // the request arrived...
                let _ = conn.set_zero_linger(); // ...and the connection is reset (RST).
            });
        }
    });
    let app = spawn_app(Opts {
        rate_per_second: 50,
        upstream_url: Some(format!("http://{addr}")),
        ..Opts::default()
    })
    .await;
    let outcomes = storm(
        &app.client().await,
        (0..50).map(|n| (request(n), Duration::from_secs(3))),
        50,
    )
    .await;
    assert_definite(&outcomes);
    let t = tally(&outcomes);
    let unreachable = t
        .get("Unavailable/UPSTREAM_UNREACHABLE")
        .copied()
        .unwrap_or(0);
    assert!(unreachable > 0, "{t:?}");
    assert_eq!(
        unreachable
            + t.get("ResourceExhausted/BUDGET_EXHAUSTED")
                .copied()
                .unwrap_or(0),
        50,
        "{t:?}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        unreachable,
        "a reset after the request was sent may have taken effect: one attempt each"
    );
}

#[tokio::test]
async fn a_429_storm_without_retry_after_backs_off_exponentially() {
    // T = 90 ms (20/s + the tests' 40 ms margin). Backoff after consecutive
    // 429s: T, 2T, 4T, 8T, 16T, ...
    let app = spawn_app(Opts::default()).await;
    app.mock.script(std::iter::repeat_n(
        Scripted::new(429, vendor_error("TOO_MANY_REQUESTS")),
        100,
    ));
    let outcomes = storm(
        &app.client().await,
        (0..20).map(|n| (request(n), Duration::from_secs(3))),
        20,
    )
    .await;
    assert_definite(&outcomes);
    assert!(
        outcomes
            .iter()
            .all(|o| o.label().starts_with("ResourceExhausted/")),
        "{:?}",
        tally(&outcomes)
    );
    // Without pushback the budget alone would allow ~33 attempts in 3 s;
    // with it: 0, T, 3T, 7T, 15T, 31T (2.79 s) → 6, and a couple more if a
    // 429 took longer than T to come back.
    let arrivals = app.mock.arrivals();
    assert!(
        (2..=9).contains(&arrivals.len()),
        "{} attempts in a 429 storm; gaps {:?}",
        arrivals.len(),
        gaps(&arrivals)
    );
    let longest = gaps(&arrivals).into_iter().max().unwrap();
    assert!(
        longest >= Duration::from_millis(240),
        "no backoff: {longest:?}"
    );
}

#[tokio::test]
async fn a_429_storm_with_retry_after_waits_as_told() {
    // 5/s (T = 240 ms); the vendor says "come back in 1 s" each time.
    let app = spawn_app(Opts {
        rate_per_second: 5,
        ..Opts::default()
    })
    .await;
    let mut busy = Scripted::new(429, vendor_error("TOO_MANY_REQUESTS"));
    busy.headers.push(("retry-after".into(), "1".into()));
    app.mock.script(std::iter::repeat_n(busy, 100));
    let client = app.client().await;
    let outcomes = storm(
        &client,
        (0..10).map(|n| (request(n), Duration::from_millis(2500))),
        10,
    )
    .await;
    assert_definite(&outcomes);
    let arrivals = app.mock.arrivals();
    let gaps = gaps(&arrivals);
    // At t≈0, ≈1 s and ≈2 s; ~10 would fit the budget in 2.5 s without
    // pushback. Three at least, so that two gaps are measured: with two
    // arrivals any single wait of a second would do.
    assert!(
        (3..=4).contains(&arrivals.len()),
        "{} attempts; gaps {gaps:?}",
        arrivals.len(),
    );
    // Each 429 held the next attempt back a second. One gap may be short: a
    // slot granted before a 429 came back (4 attempts then).
    let honoured = gaps
        .iter()
        .filter(|g| **g >= Duration::from_secs(1))
        .count();
    assert!(
        honoured >= 2 && honoured + 1 >= gaps.len(),
        "Retry-After not honoured as told: {gaps:?}"
    );
}
