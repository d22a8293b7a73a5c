//! The line in Redis, shared by every replica: each command is one call of
//! [`line.lua`](line_script) (one round trip), which runs the schedule's
//! rules on Redis' clock. On its own it has no fallback: an unreachable
//! Redis is an error (the fallback is in [`crate::budget::shared`]).
//!
//! Keys, per account (`<base>` is `<prefix><account>`, or
//! `<prefix>{<account>}` on a Cluster so that both share a slot): `<base>`
//! (the GCRA `tat`, the fair-share virtual time, the last grants, held
//! requests: one string) and `<base>:line` (the waiting tickets).
//! A caller leaving PUBLISHes the account's name on `<prefix>moved`, which
//! every replica's subscriber turns into a wake-up of its waiters.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::Script;
use tokio::sync::watch;

use super::{Answer, Ask, Refusal, Rules, micros};
use crate::budget::redis::{RedisStore, StoreError};

/// The line script, loaded once per connection and called by its SHA.
pub fn line_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(include_str!("line.lua")))
}

/// The channel every replica listens on for lines that moved up.
pub(crate) fn channel(key_prefix: &str) -> String {
    format!("{key_prefix}moved")
}

/// One account's line in Redis.
pub struct RedisLine {
    store: Arc<RedisStore>,
    account: String,
    keys: [String; 2],
    channel: String,
    rules: Rules,
    moved: watch::Sender<u64>,
}

/// A command's answer with whether the script reset a clock that stepped back.
pub struct Reply {
    pub answer: Answer,
    pub clock_reset: bool,
}

impl RedisLine {
    /// The line of `account`, whose keys start with `base`.
    pub(crate) fn new(
        store: Arc<RedisStore>,
        account: &str,
        base: &str,
        key_prefix: &str,
        rules: Rules,
        moved: watch::Sender<u64>,
    ) -> Self {
        let keys = ["", ":line"].map(|suffix| format!("{base}{suffix}"));
        Self {
            store,
            account: account.to_owned(),
            keys,
            channel: channel(key_prefix),
            rules,
            moved,
        }
    }

    /// The key holding the account's state (its `tat` first).
    pub fn key(&self) -> &str {
        &self.keys[0]
    }

    pub(crate) fn account(&self) -> &str {
        &self.account
    }

    pub(crate) fn moved(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }

    pub async fn admit(&self, ask: &Ask) -> Result<Reply, StoreError> {
        let weight = ask.weight.to_string();
        let ready_in = ask.ready_in.to_string();
        let background = if ask.background { "1" } else { "0" };
        self.call(
            "admit",
            &ask.ticket,
            &[&ask.lane, &weight, &ready_in, background],
        )
        .await
    }

    pub async fn claim(&self, ticket: &str) -> Result<Reply, StoreError> {
        self.call("claim", ticket, &[]).await
    }

    pub async fn leave(&self, ticket: &str) -> Result<Reply, StoreError> {
        self.call("leave", ticket, &[&self.channel, &self.account])
            .await
    }

    pub async fn hold(&self, ticket: &str, hold: Duration) -> Result<Reply, StoreError> {
        self.call("hold", ticket, &[&micros(hold).to_string()])
            .await
    }

    pub async fn left(&self, ticket: &str, late: bool) -> Result<Reply, StoreError> {
        let late = if late { "1" } else { "0" };
        self.call("left", ticket, &[late, &self.channel, &self.account])
            .await
    }

    pub async fn pushback(&self, wait: Duration) -> Result<Reply, StoreError> {
        self.call("pushback", "", &[&micros(wait).to_string()])
            .await
    }

    async fn call(&self, command: &str, ticket: &str, extra: &[&str]) -> Result<Reply, StoreError> {
        let r = &self.rules;
        let mut invocation = line_script().prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        invocation
            .arg(command)
            .arg(r.interval)
            .arg(r.burst)
            .arg(r.max_wait)
            .arg(r.max_queue)
            .arg(r.horizon)
            .arg(r.grace)
            .arg(ticket);
        for arg in extra {
            invocation.arg(*arg);
        }
        let answer: Vec<i64> = self
            .store
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let reply = decode(&answer).ok_or(StoreError::Answer(answer))?;
        if reply.clock_reset {
            super::clock_reset(&self.account);
        }
        Ok(reply)
    }
}

/// The script's `{code, wait, clock_reset, refusal}`.
fn decode(answer: &[i64]) -> Option<Reply> {
    let [code, wait, reset, refusal] = *answer else {
        return None;
    };
    let wait = wait.max(0);
    let answer = match (code, refusal) {
        (0 | 4, _) => Answer::Gone,
        (1, _) => Answer::Granted,
        (2, _) => Answer::Queued(wait),
        (3, 1) => Answer::Refused(Refusal::QueueFull, wait),
        (3, 2) => Answer::Refused(Refusal::MaxWait, wait),
        (3, 3) => Answer::Refused(Refusal::Deadline, wait),
        _ => return None,
    };
    Some(Reply {
        answer,
        clock_reset: reset == 1,
    })
}
