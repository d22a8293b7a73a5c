//! `line.lua` at its boundaries against a real `redis-server` (each test
//! starts its own), every command also run on the in-process rules
//! (`Schedule`) at the same moment: the two stores answer alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use provisioning_gateway::testing::{self, Answer, Ask, RedisLine, Refusal, Rules, Schedule};

use crate::redis::raw;
use crate::support::redis::RedisServer;

const T: i64 = 100_000;
/// How far the script's and the model's waits may differ: the two clocks
/// are read a round trip apart.
const JITTER: i64 = 20_000;

fn rules() -> Rules {
    Rules {
        interval: T,
        burst: 1,
        max_wait: 20 * T,
        max_queue: 10,
        horizon: 400 * T,
        grace: 2 * T,
    }
}

fn ask(ticket: &str, lane: &str, weight: u32, ready_in: i64) -> Ask {
    Ask {
        ticket: ticket.into(),
        lane: lane.into(),
        weight,
        ready_in,
        background: false,
    }
}

fn anon(ticket: &str) -> Ask {
    ask(ticket, "anonymous", 1, 3600 * T)
}

/// One account's line in Redis and in the model, side by side.
struct Both {
    redis: RedisLine,
    model: Schedule,
    rules: Rules,
    origin: Instant,
}

impl Both {
    async fn new(redis: &RedisServer, base: &str, rules: Rules) -> Self {
        Self {
            redis: testing::redis_line(redis.store().await, base, rules),
            model: Schedule::default(),
            rules,
            origin: Instant::now(),
        }
    }

    fn now(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_micros()).unwrap()
    }

    /// Admits on both; asserts they agree; returns the script's answer.
    async fn admit(&mut self, a: &Ask) -> Answer {
        let script = self.redis.admit(a).await.unwrap().answer;
        let now = self.now();
        let model = self.model.admit(&self.rules, now, a).0;
        agree(script, model, &format!("admit {}", a.ticket));
        script
    }

    async fn claim(&mut self, ticket: &str) -> Answer {
        let script = self.redis.claim(ticket).await.unwrap().answer;
        let now = self.now();
        let model = self.model.claim(&self.rules, now, ticket).0;
        agree(script, model, &format!("claim {ticket}"));
        script
    }

    async fn leave(&mut self, ticket: &str) {
        self.redis.leave(ticket).await.unwrap();
        let now = self.now();
        self.model.leave(&self.rules, now, ticket);
    }

    async fn hold(&mut self, ticket: &str, hold: i64) {
        self.redis.hold(ticket, us(hold)).await.unwrap();
        let now = self.now();
        self.model.hold(&self.rules, now, ticket, hold);
    }

    async fn left(&mut self, ticket: &str, late: bool) {
        self.redis.left(ticket, late).await.unwrap();
        let now = self.now();
        self.model.left(&self.rules, now, ticket, late);
    }

    async fn pushback(&mut self, wait: i64) {
        self.redis.pushback(us(wait)).await.unwrap();
        let now = self.now();
        self.model.pushback(&self.rules, now, wait);
    }
}

fn us(n: i64) -> Duration {
    Duration::from_micros(u64::try_from(n).unwrap())
}

/// Same kind of answer, waits within the jitter.
fn agree(script: Answer, model: Answer, what: &str) {
    let close = |a: i64, b: i64| (a - b).abs() <= JITTER;
    let same = match (script, model) {
        (Answer::Queued(a), Answer::Queued(b)) => close(a, b),
        (Answer::Refused(r, a), Answer::Refused(s, b)) => r == s && close(a, b),
        // A slot due within the jitter: one store saw it come, the other not yet.
        (Answer::Granted, Answer::Queued(w)) | (Answer::Queued(w), Answer::Granted) => w <= JITTER,
        (a, b) => a == b,
    };
    assert!(same, "{what}: script {script:?}, model {model:?}");
}

fn wait_of(a: Answer) -> i64 {
    match a {
        Answer::Queued(w) | Answer::Refused(_, w) => w,
        other => panic!("no wait in {other:?}"),
    }
}

async fn sleep_us(n: i64) {
    tokio::time::sleep(us(n.max(0))).await;
}

#[tokio::test]
async fn script_grants_a_free_slot_then_queues_one_interval_apart_and_grants_at_the_slot() {
    let redis = RedisServer::start();
    let mut l = Both::new(&redis, "t:first", rules()).await;
    assert_eq!(l.admit(&anon("a")).await, Answer::Granted);
    let b = wait_of(l.admit(&anon("b")).await);
    assert!(b <= T && b > T - JITTER, "{b}");
    let c = wait_of(l.admit(&anon("c")).await);
    assert!(c <= 2 * T && c > 2 * T - JITTER, "{c}");
    assert!(matches!(l.claim("b").await, Answer::Queued(_)));
    // Sleeping exactly the answer is enough: no polling.
    sleep_us(b).await;
    assert_eq!(l.claim("b").await, Answer::Granted);
    assert_eq!(l.claim("b").await, Answer::Granted, "a retried claim");
    assert!(matches!(l.claim("c").await, Answer::Queued(_)));
    assert_eq!(l.claim("nobody").await, Answer::Gone);
}

#[tokio::test]
async fn script_gives_background_work_only_slots_no_waiting_call_can_use() {
    let redis = RedisServer::start();
    let mut l = Both::new(&redis, "t:background", rules()).await;
    let background = |ticket: &str| Ask {
        background: true,
        ..anon(ticket)
    };
    assert_eq!(l.admit(&background("b1")).await, Answer::Granted);
    let refused = l.admit(&background("b2")).await;
    assert!(
        matches!(refused, Answer::Refused(Refusal::Deadline, w) if w <= T && w > T - JITTER),
        "{refused:?}"
    );
    let a = wait_of(l.admit(&anon("a")).await);
    sleep_us(a).await;
    // The slot came, but a call is waiting for it: background work waits.
    assert!(matches!(
        l.admit(&background("b3")).await,
        Answer::Refused(..)
    ));
    assert_eq!(l.claim("a").await, Answer::Granted);
    let next = wait_of(l.admit(&background("b4")).await);
    sleep_us(next).await;
    assert_eq!(l.admit(&background("b5")).await, Answer::Granted);
}

#[tokio::test]
async fn script_refuses_by_deadline_max_wait_and_queue_bound() {
    let redis = RedisServer::start();
    let r = Rules {
        max_wait: 3 * T,
        max_queue: 3,
        ..rules()
    };
    let mut l = Both::new(&redis, "t:refuse", r).await;
    l.admit(&anon("a")).await;
    // Useful for half an interval only: refused, told to come back when
    // its deadline would reach the slot, half an interval on.
    match l.admit(&ask("short", "x", 1, T / 2)).await {
        Answer::Refused(Refusal::Deadline, wait) => {
            assert!(wait > T / 2 - JITTER && wait <= T / 2, "{wait}")
        }
        other => panic!("{other:?}"),
    }
    // An already passed deadline, a free slot or not.
    let mut idle = Both::new(&redis, "t:idle", r).await;
    assert!(matches!(
        idle.admit(&ask("late", "x", 1, -1)).await,
        Answer::Refused(Refusal::Deadline, _)
    ));
    for t in ["b", "c", "d"] {
        assert!(matches!(l.admit(&anon(t)).await, Answer::Queued(_)), "{t}");
    }
    assert!(matches!(
        l.admit(&anon("e")).await,
        Answer::Refused(Refusal::QueueFull, _)
    ));
    let mut wait = Both::new(
        &redis,
        "t:max-wait",
        Rules {
            max_wait: 2 * T,
            ..rules()
        },
    )
    .await;
    for t in ["a", "b", "c"] {
        wait.admit(&anon(t)).await;
    }
    assert!(matches!(
        wait.admit(&anon("d")).await,
        Answer::Refused(Refusal::MaxWait, _)
    ));
}

#[tokio::test]
async fn script_places_a_fresh_caller_fairly_but_never_past_a_promise() {
    let redis = RedisServer::start();
    let mut l = Both::new(&redis, "t:fair", rules()).await;
    l.admit(&anon("first")).await;
    for i in 0..3 {
        l.admit(&ask(&format!("f{i}"), "flood", 1, 3600 * T)).await;
    }
    // Second in line, before the flood's later calls.
    let lone = wait_of(l.admit(&ask("lone", "lone", 1, 3600 * T)).await);
    assert!(lone <= 2 * T && lone > 2 * T - JITTER, "{lone}");
    // A flood call that cannot be pushed back is not passed.
    let mut p = Both::new(&redis, "t:promise", rules()).await;
    p.admit(&anon("first")).await;
    p.admit(&ask("f0", "flood", 1, 3600 * T)).await;
    p.admit(&ask("f1", "flood", 1, 2 * T)).await;
    let lone = wait_of(p.admit(&ask("lone", "lone", 1, 3600 * T)).await);
    assert!(
        lone > 2 * T,
        "placed after the call it could not push: {lone}"
    );
}

#[tokio::test]
async fn script_shares_slots_by_weight_between_callers_on_two_replicas() {
    let redis = RedisServer::start();
    // Two connections on one account: two replicas.
    let (a, b) = (redis.store().await, redis.store().await);
    // Nothing is due while the 25 are admitted.
    let r = Rules {
        interval: 20_000,
        max_queue: 100,
        ..rules()
    };
    let (la, lb) = (
        testing::redis_line(a, "t:weights", r),
        testing::redis_line(b, "t:weights", r),
    );
    la.admit(&anon("first")).await.unwrap();
    let mut tickets = Vec::new();
    for i in 0..12 {
        la.admit(&ask(&format!("light{i}"), "light", 1, 3600 * T))
            .await
            .unwrap();
        lb.admit(&ask(&format!("heavy{i}"), "heavy", 3, 3600 * T))
            .await
            .unwrap();
        tickets.push((format!("light{i}"), &la));
        tickets.push((format!("heavy{i}"), &lb));
    }
    // Each replica claims its own tickets; who is granted, in order.
    let mut order = Vec::new();
    while order.len() < 12 {
        for (t, line) in &tickets {
            if !order.contains(t) && line.claim(t).await.unwrap().answer == Answer::Granted {
                order.push(t.clone());
            }
        }
    }
    let heavy = order[..12]
        .iter()
        .filter(|t| t.starts_with("heavy"))
        .count();
    assert_eq!(heavy, 9, "three of every four: {order:?}");
}

#[tokio::test]
async fn script_moves_the_line_up_when_a_caller_leaves_and_says_so() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("test:moved").await.unwrap();
    let mut l = Both::new(&redis, "t:leave", rules()).await;
    for t in ["a", "b", "c"] {
        l.admit(&anon(t)).await;
    }
    l.leave("b").await;
    let message = tokio::time::timeout(Duration::from_secs(2), pubsub.on_message().next())
        .await
        .expect("announced")
        .unwrap();
    assert_eq!(message.get_payload::<String>().unwrap(), "test");
    // `c` now has the slot `b` had.
    let c = wait_of(l.claim("c").await);
    assert!(c <= T && c > T - JITTER, "{c}");
}

#[tokio::test]
async fn script_holds_every_grant_while_a_request_is_held_then_one_interval_after_it_left() {
    let redis = RedisServer::start();
    let mut l = Both::new(&redis, "t:hold", rules()).await;
    l.admit(&anon("a")).await;
    l.admit(&anon("b")).await;
    l.hold("a", 3 * T).await;
    sleep_us(T).await;
    // Its slot has come, but `a` has not left: held (three intervals, and
    // one after that).
    let held = wait_of(l.claim("b").await);
    assert!(held > 2 * T, "{held}");
    l.left("a", true).await;
    let after = wait_of(l.claim("b").await);
    assert!(
        after > T - JITTER && after <= T,
        "one interval after it left: {after}"
    );
    sleep_us(after).await;
    assert_eq!(l.claim("b").await, Answer::Granted);
}

#[tokio::test]
async fn script_pushback_holds_every_replica_and_never_shortens() {
    let redis = RedisServer::start();
    let mut l = Both::new(&redis, "t:push", rules()).await;
    l.admit(&anon("a")).await;
    l.pushback(8 * T).await;
    l.pushback(T).await;
    // Another replica, on its own connection.
    let other = testing::redis_line(redis.store().await, "t:push", rules());
    let wait = wait_of(other.admit(&anon("b")).await.unwrap().answer);
    assert!(wait > 8 * T - JITTER && wait <= 8 * T, "{wait}");
}

#[tokio::test]
async fn script_resets_a_next_slot_beyond_any_horizon_and_says_so() {
    let redis = RedisServer::start();
    let line = testing::redis_line(redis.store().await, "t:clock", rules());
    assert_eq!(
        line.admit(&anon("a")).await.unwrap().answer,
        Answer::Granted
    );
    let mut c = raw(&redis).await;
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let hour_ahead = secs * 1_000_000 + micros + 3_600_000_000;
    let () = redis::cmd("SET")
        .arg("t:clock")
        .arg(hour_ahead)
        .query_async(&mut c)
        .await
        .unwrap();
    let reply = line.admit(&anon("b")).await.unwrap();
    // One interval from now: a grant may have gone just before the step.
    let wait = wait_of(reply.answer);
    assert!(wait > T - JITTER && wait <= T, "{wait}");
    assert!(reply.clock_reset, "reported");
    let reply = line.admit(&anon("c")).await.unwrap();
    assert!(!reply.clock_reset, "once");
}

#[tokio::test]
async fn script_keys_expire_and_the_script_comes_back_after_a_flush_and_a_restart() {
    let mut redis = RedisServer::start();
    let store = redis.store().await;
    let line = testing::redis_line(Arc::clone(&store), "t:keys", rules());
    line.admit(&anon("a")).await.unwrap();
    line.admit(&anon("b")).await.unwrap();
    let mut c = raw(&redis).await;
    for key in ["t:keys", "t:keys:line"] {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} is kept for ever ({ttl})");
    }
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .unwrap();
    // NOSCRIPT → loaded again → answered, in the same call.
    assert!(matches!(
        line.admit(&anon("c")).await.unwrap().answer,
        Answer::Queued(_)
    ));
    redis.restart();
    assert!(
        line.admit(&anon("d")).await.is_err(),
        "the old connection is gone"
    );
    store.connect().await.unwrap();
    assert_eq!(
        line.admit(&anon("e")).await.unwrap().answer,
        Answer::Granted,
        "a restarted, empty Redis: a free slot again"
    );
}
