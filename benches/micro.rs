//! Criterion micro-benchmarks of the hot pieces of a call:
//! parsing the request and encoding the vendor body, the status mapping
//! table (with and without rich details), and one in-process admission to the line.
//!
//! `cargo bench --bench micro` (HTML-free: plain text reports).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use provisioning_gateway::domain::Association;
use provisioning_gateway::pb::{Channel, DeleteAssociationRequest, ResourceType};
use provisioning_gateway::testing::{
    Ask, BudgetError, CallError, Rejection, Reply, Schedule, bench_rules, code_for_http,
};
use reqwest::header::HeaderMap;

fn request() -> DeleteAssociationRequest {
    DeleteAssociationRequest {
        resource_type: ResourceType::Number as i32,
        channel: Channel::Sms as i32,
        application_id: "8F0792F86035A9F4290821F1EE6BC06A".into(),
        entity_id: Some("entity-42".into()),
        resource_id: "number-key-8F0792F86035A9F4".into(),
        ..Default::default()
    }
}

fn parse_and_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("request");
    g.bench_function("parse (TryFrom)", |b| {
        b.iter_batched(request, Association::try_from, BatchSize::SmallInput)
    });
    let association = Association::try_from(request()).expect("a valid request");
    g.bench_function("encode JSON body", |b| {
        b.iter(|| black_box(&association).to_json())
    });
    g.bench_function("parse + encode", |b| {
        b.iter_batched(
            request,
            |r| Association::try_from(r).map(|a| a.to_json()),
            BatchSize::SmallInput,
        )
    });
    let invalid = DeleteAssociationRequest::default();
    g.bench_function("parse invalid (4 violations)", |b| {
        b.iter_batched(
            || invalid.clone(),
            Association::try_from,
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn mapping(c: &mut Criterion) {
    let mut g = c.benchmark_group("mapping");
    let statuses: Vec<u16> = (100..600).collect();
    g.bench_function("code_for_http (500 statuses)", |b| {
        b.iter(|| {
            black_box(&statuses)
                .iter()
                .map(|&s| code_for_http(s) as i32)
                .sum::<i32>()
        })
    });
    let body = br#"{"requestError":{"serviceException":{"messageId":"NOT_FOUND","text":"Resource association not found."}}}"#;
    g.bench_function("Reply::new (parse vendor error body)", |b| {
        b.iter(|| Reply::new(404, &HeaderMap::new(), black_box(body)))
    });
    let not_found = CallError::Upstream(Reply::new(404, &HeaderMap::new(), body));
    g.bench_function("to_status: upstream 404 + ErrorInfo", |b| {
        b.iter(|| black_box(&not_found).to_status("default"))
    });
    let refused = CallError::Budget(BudgetError::Exhausted {
        reason: Rejection::Deadline,
        retry_after: Duration::from_millis(681),
    });
    // The same refusal again: reused from the thread's last one.
    g.bench_function("to_status: budget refusal, repeated", |b| {
        b.iter(|| black_box(&refused).to_status("default"))
    });
    // A new RetryInfo every time: built and encoded.
    let mut retry_ms = 0;
    g.bench_function("to_status: budget refusal, new", |b| {
        b.iter(|| {
            retry_ms += 10;
            CallError::Budget(BudgetError::Exhausted {
                reason: Rejection::Deadline,
                retry_after: Duration::from_millis(retry_ms),
            })
            .to_status("default")
        })
    });
    g.finish();
}

fn ask(n: u64, ready_in: i64) -> Ask {
    Ask {
        ticket: format!("t{n}"),
        lane: "bench".into(),
        weight: 1,
        ready_in,
        background: false,
    }
}

fn budget(c: &mut Criterion) {
    let mut g = c.benchmark_group("budget");
    let rules = |us: u64| bench_rules(std::time::Duration::from_micros(us));
    // A 1 µs interval, the clock moving 1 µs per admission: every one is granted.
    let free = rules(1);
    let mut schedule = Schedule::default();
    let (mut now, mut n) = (0, 0);
    g.bench_function("Schedule::admit granted", |b| {
        b.iter(|| {
            now += 1;
            n += 1;
            black_box(schedule.admit(&free, now, &ask(n, 1_000_000)))
        })
    });
    // 1 rps with 20 calls waiting: every admission is placed (and leaves).
    let busy = rules(1_010_000);
    let mut schedule = Schedule::default();
    for i in 0..20 {
        schedule.admit(&busy, 0, &ask(1_000_000 + i, 60_000_000));
    }
    g.bench_function("Schedule::admit queued behind 20", |b| {
        b.iter(|| {
            n += 1;
            let a = ask(n, 60_000_000);
            black_box(schedule.admit(&busy, 0, &a));
            schedule.leave(&busy, 0, &a.ticket);
        })
    });
    g.finish();
}

criterion_group!(benches, parse_and_encode, mapping, budget);
criterion_main!(benches);
