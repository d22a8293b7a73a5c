//! Redis topologies from real processes on free loopback ports, for the
//! gateway's Sentinel and Cluster support: a primary, its replica and three
//! sentinels ([`Sentinels`]), and three primaries in cluster mode
//! ([`Cluster`]). Like `redis.rs`, the code is synchronous and blocks while a
//! topology settles; an async test calls the `*_async` wrappers (they run on
//! `spawn_blocking`, so the gateways under test keep running). Every process
//! dies with the value. A wait that does not settle panics, saying what it
//! waited for and what it saw last.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::{
    Connection, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisResult, Value,
};

use super::redis::{RedisServer, free_port};

/// Bounds every wait for a topology to settle (a loaded 2-core machine).
const SETTLE: Duration = Duration::from_secs(20);
/// How often a wait asks again.
const POLL: Duration = Duration::from_millis(50);
/// Connecting to one of our processes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One command's reply (above MIGRATE's own 5 s timeout).
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A primary and one replica, both watched by three sentinels (quorum 2,
/// `down-after-milliseconds` 1000, `failover-timeout` 5000).
pub struct Sentinels {
    name: String,
    password: Option<String>,
    sentinel_password: Option<String>,
    // Declared first, dropped first: the sentinels go before the nodes they
    // would otherwise fail over.
    sentinels: Vec<Process>,
    /// The first primary, then the first replica.
    nodes: Vec<RedisServer>,
}

impl Sentinels {
    /// The master's name the sentinels monitor (the URL's path).
    pub const MASTER: &'static str = "gateway-primary";

    /// Without passwords.
    pub fn start() -> Self {
        Self::start_with(None, None)
    }

    /// Data nodes and sentinels all require `password` (a sentinel URL's
    /// password is used for the sentinels too unless the gateway is given a
    /// separate sentinel password).
    pub fn with_password(password: &str) -> Self {
        Self::start_with(Some(password), Some(password))
    }

    /// The data nodes require `password` (`--requirepass` and `--masterauth`),
    /// the sentinels `sentinel_password`.
    pub fn start_with(password: Option<&str>, sentinel_password: Option<&str>) -> Self {
        let mut node_args = vec![
            // The replica's first sync starts at once, not 5 s later.
            "--repl-diskless-sync-delay".to_owned(),
            "0".to_owned(),
        ];
        if let Some(p) = password {
            node_args.extend(["--masterauth".to_owned(), p.to_owned()]);
        }
        let primary = RedisServer::start_with(password.map(str::to_owned), node_args.clone());
        let mut replica_args = node_args;
        replica_args.extend([
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            primary.port().to_string(),
        ]);
        let replica = RedisServer::start_with(password.map(str::to_owned), replica_args);
        // In sync before the sentinels start: a sentinel reads a replica's
        // state on connecting and then only every 10 s.
        wait_until(
            format!("the replica on {} in sync", replica.port()),
            SETTLE,
            || replication_link(replica.port(), password, primary.port()),
        );
        let mut this = Self {
            name: Self::MASTER.to_owned(),
            password: password.map(str::to_owned),
            sentinel_password: sentinel_password.map(str::to_owned),
            sentinels: Vec::new(),
            nodes: vec![primary, replica],
        };
        for _ in 0..3 {
            let sentinel = this.spawn_sentinel();
            this.sentinels.push(sentinel);
        }
        let (primary, replica) = (this.nodes[0].port(), this.nodes[1].port());
        wait_until(
            format!("the sentinels agreeing on primary {primary}, replica {replica}"),
            SETTLE,
            || {
                for s in this.sentinel_ports() {
                    this.sentinel_view(s, primary, replica)?;
                }
                Ok(())
            },
        );
        this
    }

    /// [`Self::start_with`] off the async runtime.
    pub async fn start_async(password: Option<&str>, sentinel_password: Option<&str>) -> Self {
        let password = password.map(str::to_owned);
        let sentinel_password = sentinel_password.map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            Self::start_with(password.as_deref(), sentinel_password.as_deref())
        })
        .await
        .expect("the sentinels start")
    }

    /// `redis+sentinel://[:password@]127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/<master>`
    /// with the data nodes' password (not URL-encoded: test passwords are plain).
    pub fn url(&self) -> String {
        let auth = match &self.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        let hosts: Vec<String> = self
            .sentinel_ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{auth}{}/{}", hosts.join(","), self.name)
    }

    /// The monitored master's name ([`Self::MASTER`]).
    pub fn master_name(&self) -> &str {
        &self.name
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// Both data nodes: the first primary, then the first replica.
    pub fn node_ports(&self) -> [u16; 2] {
        [self.nodes[0].port(), self.nodes[1].port()]
    }

    /// The primary, as the first sentinel that answers names it.
    pub fn primary_port(&self) -> u16 {
        let mut errors = Vec::new();
        for s in self.sentinel_ports() {
            match self.master_addr(s) {
                Ok(Some(port)) => return port,
                Ok(None) => errors.push(format!("{s}: no such master")),
                Err(e) => errors.push(format!("{s}: {e}")),
            }
        }
        panic!(
            "no sentinel names the primary of {}: {}",
            self.name,
            errors.join("; ")
        );
    }

    /// The data node that is not the primary now.
    pub fn replica_port(&self) -> u16 {
        self.other_node(self.primary_port())
    }

    /// A connection to the primary now (authenticated, 10 s I/O timeouts).
    pub fn primary_connection(&self) -> Connection {
        self.connection(self.primary_port())
    }

    /// A connection to the data node on `port`.
    pub fn connection(&self, port: u16) -> Connection {
        connect(port, self.password.as_deref())
            .unwrap_or_else(|e| panic!("cannot connect to the data node on {port}: {e}"))
    }

    /// A connection to the sentinel on `port`.
    pub fn sentinel_connection(&self, port: u16) -> Connection {
        connect(port, self.sentinel_password.as_deref())
            .unwrap_or_else(|e| panic!("cannot connect to the sentinel on {port}: {e}"))
    }

    /// The data node on `port`, to kill or restart it (a crashed primary).
    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no data node on {port}"))
    }

    /// `SENTINEL FAILOVER` on the first sentinel; returns the new primary's
    /// port once every sentinel names it and it answers `ROLE` as master.
    /// The old primary is then made the new one's replica at once (what the
    /// sentinels do about 10 s later: `REPLICAOF`, then `CLIENT KILL TYPE
    /// normal`, so clients there reconnect) and is in sync on return.
    pub fn force_failover(&self) -> u16 {
        let old = self.primary_port();
        let new = self.other_node(old);
        let sentinel = self.sentinel_ports()[0];
        // After an earlier failover the sentinel may not have read the demoted
        // node yet (NOGOODSLAVE); a failover may still be ending (INPROG).
        wait_until(
            format!("the sentinel on {sentinel} starting a failover of {old}"),
            SETTLE,
            || {
                let mut c = connect(sentinel, self.sentinel_password.as_deref())
                    .map_err(|e| e.to_string())?;
                match redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(&self.name)
                    .query::<()>(&mut c)
                {
                    Ok(()) => Ok(()),
                    Err(e) if matches!(e.code(), Some("NOGOODSLAVE" | "INPROG")) => {
                        Err(e.to_string())
                    }
                    Err(e) => panic!("SENTINEL FAILOVER {}: {e}", self.name),
                }
            },
        );
        wait_until(
            format!("the sentinels naming {new} the primary, and it answering as one"),
            SETTLE,
            || {
                for s in self.sentinel_ports() {
                    match self.master_addr(s) {
                        Ok(Some(p)) if p == new => {}
                        other => return Err(format!("sentinel {s}: {other:?}")),
                    }
                }
                match role(new, self.password.as_deref()) {
                    Ok(r) if r == "master" => Ok(()),
                    other => Err(format!("ROLE on {new}: {other:?}")),
                }
            },
        );
        let mut c = self.connection(old);
        redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(new)
            .query::<()>(&mut c)
            .unwrap_or_else(|e| panic!("REPLICAOF 127.0.0.1 {new} on {old}: {e}"));
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query::<i64>(&mut c)
            .unwrap_or_else(|e| panic!("CLIENT KILL TYPE normal on {old}: {e}"));
        wait_until(
            format!("the old primary on {old} in sync with {new}"),
            SETTLE,
            || replication_link(old, self.password.as_deref(), new),
        );
        new
    }

    /// [`Self::force_failover`] off the async runtime; gives the fixture back
    /// with the new primary's port.
    pub async fn force_failover_async(self) -> (Self, u16) {
        tokio::task::spawn_blocking(move || {
            let port = self.force_failover();
            (self, port)
        })
        .await
        .expect("the failover completes")
    }

    fn other_node(&self, port: u16) -> u16 {
        let [a, b] = self.node_ports();
        if port == a { b } else { a }
    }

    fn master_addr(&self, sentinel: u16) -> RedisResult<Option<u16>> {
        let mut c = connect(sentinel, self.sentinel_password.as_deref())?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.name)
            .query(&mut c)?;
        Ok(addr.map(|(_, port)| port))
    }

    /// Ok when the sentinel on `sentinel` names `primary`, sees `replica` up
    /// and in sync, and sees both other sentinels up.
    fn sentinel_view(&self, sentinel: u16, primary: u16, replica: u16) -> Result<(), String> {
        let view = |e: redis::RedisError| format!("sentinel {sentinel}: {e}");
        let mut c = connect(sentinel, self.sentinel_password.as_deref()).map_err(view)?;
        let master: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.name)
            .query(&mut c)
            .map_err(view)?;
        if master.as_ref().map(|m| m.1) != Some(primary) {
            return Err(format!("sentinel {sentinel} names {master:?}"));
        }
        let replicas: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(&self.name)
            .query(&mut c)
            .map_err(view)?;
        let healthy = replicas.iter().any(|r| {
            r.get("port").map(String::as_str) == Some(replica.to_string().as_str())
                && r.get("flags").is_some_and(|f| !flagged_down(f))
                && r.get("master-link-status").map(String::as_str) == Some("ok")
        });
        if !healthy {
            return Err(format!(
                "sentinel {sentinel} does not see replica {replica} healthy: {replicas:?}"
            ));
        }
        let others: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("sentinels")
            .arg(&self.name)
            .query(&mut c)
            .map_err(view)?;
        let up = others
            .iter()
            .filter(|s| s.get("flags").is_some_and(|f| !flagged_down(f)))
            .count();
        if up != 2 {
            return Err(format!(
                "sentinel {sentinel} knows {up} other sentinels: {others:?}"
            ));
        }
        Ok(())
    }

    fn spawn_sentinel(&self) -> Process {
        let primary = self.nodes[0].port();
        Process::start(
            "redis-server --sentinel",
            self.sentinel_password.as_deref(),
            |port, dir| {
                let mut conf = format!(
                    "port {port}\n\
                 bind 127.0.0.1\n\
                 daemonize no\n\
                 dir \"{dir}\"\n\
                 sentinel resolve-hostnames no\n\
                 sentinel monitor {name} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n",
                    dir = dir.display(),
                    name = self.name,
                );
                if let Some(p) = &self.password {
                    conf.push_str(&format!("sentinel auth-pass {} {p}\n", self.name));
                }
                if let Some(p) = &self.sentinel_password {
                    conf.push_str(&format!("requirepass {p}\nsentinel sentinel-pass {p}\n"));
                }
                // Sentinel rewrites its configuration file: it lives in the temp dir.
                let file = dir.join("sentinel.conf");
                std::fs::write(&file, conf).expect("the sentinel's configuration file");
                let mut cmd = Command::new("redis-server");
                cmd.arg(file).arg("--sentinel");
                cmd
            },
        )
    }
}

/// Three primaries in cluster mode, no replicas (`cluster-node-timeout`
/// 5000), slots 0–5460, 5461–10922 and 10923–16383 in start order.
pub struct Cluster {
    password: Option<String>,
    nodes: Vec<Process>,
}

impl Cluster {
    /// Without a password.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Every node requires `password` (`--requirepass`, `--masterauth`).
    pub fn with_password(password: &str) -> Self {
        Self::start_with(Some(password))
    }

    pub fn start_with(password: Option<&str>) -> Self {
        let nodes: Vec<Process> = (0..3)
            .map(|_| {
                Process::start(
                    "redis-server --cluster-enabled yes",
                    password,
                    |port, dir| {
                        // The cluster bus port is port + 10000 by default: past
                        // 65535 for most ephemeral ports, so a free one of its own.
                        let bus = loop {
                            let bus = free_port();
                            if bus != port {
                                break bus;
                            }
                        };
                        let mut cmd = Command::new("redis-server");
                        cmd.args(["--port", &port.to_string()])
                            .args(["--bind", "127.0.0.1"])
                            .args(["--save", ""])
                            .args(["--appendonly", "no"])
                            .arg("--dir")
                            .arg(dir)
                            .args(["--cluster-enabled", "yes"])
                            .arg("--cluster-config-file")
                            .arg(dir.join("nodes.conf"))
                            .args(["--cluster-port", &bus.to_string()])
                            .args(["--cluster-node-timeout", "5000"]);
                        if let Some(p) = password {
                            cmd.args(["--requirepass", p, "--masterauth", p]);
                        }
                        cmd
                    },
                )
            })
            .collect();
        let this = Self {
            password: password.map(str::to_owned),
            nodes,
        };
        this.create();
        wait_until(
            "every cluster node reporting cluster_state:ok",
            SETTLE,
            || {
                for port in this.ports() {
                    let mut c = this.try_connection(port)?;
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query(&mut c)
                        .map_err(|e| format!("{port}: {e}"))?;
                    if !info.contains("cluster_state:ok") {
                        return Err(format!("{port}: {info}"));
                    }
                }
                this.agreed_slots().map(|_| ())
            },
        );
        this
    }

    /// [`Self::start_with`] off the async runtime.
    pub async fn start_async(password: Option<&str>) -> Self {
        let password = password.map(str::to_owned);
        tokio::task::spawn_blocking(move || Self::start_with(password.as_deref()))
            .await
            .expect("the cluster starts")
    }

    /// `redis+cluster://[:password@]127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`
    /// (the password not URL-encoded: test passwords are plain).
    pub fn url(&self) -> String {
        let auth = match &self.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{auth}{}", hosts.join(","))
    }

    /// The nodes' ports, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// A plain (not cluster-aware) connection to the node on `port`.
    pub fn connection(&self, port: u16) -> Connection {
        self.try_connection(port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The node's cluster ID (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.connection(port))
            .unwrap_or_else(|e| panic!("CLUSTER MYID on {port}: {e}"))
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn slot_of(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.connection(self.nodes[0].port))
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
    }

    /// The port of the node serving `key`'s slot now.
    pub fn node_for_key(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        owner(&self.slots(self.nodes[0].port), slot)
            .unwrap_or_else(|| panic!("no node serves slot {slot} (of {key})"))
    }

    /// Moves the slot holding `key`, with its keys, to the node on `to_port`,
    /// by the manual resharding procedure (IMPORTING, MIGRATING, MIGRATE,
    /// SETSLOT NODE on every node); returns once every node says `to_port`
    /// serves it. Panics if it is there already.
    pub fn migrate_slot_of(&self, key: &str, to_port: u16) {
        assert!(
            self.ports().contains(&to_port),
            "no cluster node on {to_port} (nodes: {:?})",
            self.ports()
        );
        let slot = self.slot_of(key);
        let from_port = self.node_for_key(key);
        assert_ne!(
            from_port, to_port,
            "slot {slot} (of {key}) is on {to_port} already"
        );
        let (from_id, to_id) = (self.node_id(from_port), self.node_id(to_port));
        let mut to = self.connection(to_port);
        let mut from = self.connection(from_port);
        let setslot = |c: &mut Connection, port: u16, state: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .query::<()>(c)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} {id} on {port}: {e}"));
        };
        setslot(&mut to, to_port, "IMPORTING", &from_id);
        setslot(&mut from, from_port, "MIGRATING", &to_id);
        loop {
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut from)
                .unwrap_or_else(|e| panic!("CLUSTER GETKEYSINSLOT {slot} on {from_port}: {e}"));
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("REPLACE");
            if let Some(p) = &self.password {
                migrate.arg("AUTH").arg(p);
            }
            migrate.arg("KEYS").arg(&keys);
            // OK, or NOKEY when the keys expired meanwhile.
            migrate
                .query::<String>(&mut from)
                .unwrap_or_else(|e| panic!("MIGRATE of slot {slot} to {to_port}: {e}"));
        }
        // The new owner first, then the old one, then the rest.
        setslot(&mut to, to_port, "NODE", &to_id);
        setslot(&mut from, from_port, "NODE", &to_id);
        for port in self.ports() {
            if port != to_port && port != from_port {
                setslot(&mut self.connection(port), port, "NODE", &to_id);
            }
        }
        wait_until(
            format!("every node serving slot {slot} from {to_port}"),
            SETTLE,
            || {
                let slots = self.agreed_slots()?;
                match owner(&slots, slot) {
                    Some(p) if p == to_port => Ok(()),
                    other => Err(format!("slot {slot} on {other:?}")),
                }
            },
        );
    }

    /// [`Self::migrate_slot_of`] off the async runtime; gives the fixture back.
    pub async fn migrate_slot_of_async(self, key: String, to_port: u16) -> Self {
        tokio::task::spawn_blocking(move || {
            self.migrate_slot_of(&key, to_port);
            self
        })
        .await
        .expect("the slot migrates")
    }

    /// Two short names ("acct-a", "acct-b", …) whose keys, as `key` makes
    /// them from a name, are on different nodes now.
    pub fn names_on_different_nodes(&self, key: impl Fn(&str) -> String) -> (String, String) {
        let slots = self.slots(self.nodes[0].port);
        let node = |name: &str| {
            let slot = self.slot_of(&key(name));
            owner(&slots, slot).unwrap_or_else(|| panic!("no node serves slot {slot}"))
        };
        let first = "acct-a".to_owned();
        let first_node = node(&first);
        let candidates = ('b'..='z')
            .map(|c| format!("acct-{c}"))
            .chain(('a'..='z').map(|c| format!("acct-a{c}")));
        for name in candidates {
            if node(&name) != first_node {
                return (first, name);
            }
        }
        panic!("every candidate name's key is on {first_node}: does `key` use one hash tag?");
    }

    fn try_connection(&self, port: u16) -> Result<Connection, String> {
        connect(port, self.password.as_deref())
            .map_err(|e| format!("cannot connect to the cluster node on {port}: {e}"))
    }

    /// `redis-cli --cluster create`, bounded.
    #[allow(clippy::disallowed_methods)] // polls a child process
    fn create(&self) {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--cluster", "create"])
            .args(self.ports().iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = &self.password {
            // Not -a: no warning, and not in `ps`.
            cmd.env("REDISCLI_AUTH", p);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-cli is not on PATH: the Redis Cluster tests need it (Debian/Ubuntu: \
                 apt-get install redis-tools; scripts/test installs it)"
            ),
            Err(e) => panic!("cannot run redis-cli: {e}"),
        };
        let deadline = Instant::now() + SETTLE;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                _ => {
                    let _ = child.kill();
                    break;
                }
            }
        }
        let out = child.wait_with_output().expect("redis-cli's output");
        assert!(
            out.status.success(),
            "redis-cli --cluster create (on {:?}) failed or took over {SETTLE:?}: {}{}",
            self.ports(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `CLUSTER SLOTS` on `port`: (first slot, last slot, serving port).
    fn slots(&self, port: u16) -> Vec<(u16, u16, u16)> {
        self.try_slots(port).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_slots(&self, port: u16) -> Result<Vec<(u16, u16, u16)>, String> {
        let mut c = self.try_connection(port)?;
        let ranges: Vec<Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut c)
            .map_err(|e| format!("CLUSTER SLOTS on {port}: {e}"))?;
        let int = |v: &Value| match v {
            Value::Int(i) => u16::try_from(*i).ok(),
            _ => None,
        };
        let mut slots = ranges
            .iter()
            .map(|range| match range {
                Value::Array(items) => match &items[..] {
                    [first, last, Value::Array(node), ..] => {
                        Some((int(first)?, int(last)?, int(node.get(1)?)?))
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("CLUSTER SLOTS on {port}: unexpected reply {ranges:?}"))?;
        slots.sort_unstable();
        Ok(slots)
    }

    /// The slot map, once every node has the same one.
    fn agreed_slots(&self) -> Result<Vec<(u16, u16, u16)>, String> {
        let maps = self
            .ports()
            .into_iter()
            .map(|p| self.try_slots(p).map(|s| (p, s)))
            .collect::<Result<Vec<_>, _>>()?;
        if maps.iter().all(|(_, s)| *s == maps[0].1) {
            Ok(maps[0].1.clone())
        } else {
            Err(format!("the nodes' slot maps differ: {maps:?}"))
        }
    }
}

/// The serving port of `slot` in a slot map.
fn owner(slots: &[(u16, u16, u16)], slot: u16) -> Option<u16> {
    slots
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, port)| *port)
}

/// One process of a topology (a sentinel, a cluster node), on a free port
/// with a temp dir of its own; killed on drop.
struct Process {
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Process {
    /// Runs what `command` builds for a free port and a fresh temp dir, until
    /// it answers PING; another free port if it exits first (port taken).
    fn start(
        what: &str,
        password: Option<&str>,
        mut command: impl FnMut(u16, &Path) -> Command,
    ) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("a temp dir for redis-server");
            let mut cmd = command(port, dir.path());
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                    "redis-server is not on PATH: the Redis tests need it (Debian/Ubuntu: \
                     apt-get install redis-server; scripts/test installs it)"
                ),
                Err(e) => panic!("cannot run redis-server: {e}"),
            };
            let mut process = Self {
                port,
                child: Some(child),
                _dir: dir,
            };
            match process.wait_ready(password) {
                Ok(()) => return process,
                Err(e) => last = e,
            }
        }
        panic!("{what} did not start on any of 5 free ports: {last}");
    }

    #[allow(clippy::disallowed_methods)] // polls a child process, as redis.rs
    fn wait_ready(&mut self, password: Option<&str>) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut c) = connect(self.port, password)
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("exited with {status} (port {})", self.port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("no PING reply on {} within 10 s", self.port))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A connection to 127.0.0.1:`port`, authenticated with `password`.
fn connect(port: u16, password: Option<&str>) -> RedisResult<Connection> {
    let info = ConnectionAddr::Tcp("127.0.0.1".to_owned(), port).into_connection_info()?;
    let mut settings = RedisConnectionInfo::default();
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    let conn = redis::Client::open(info.set_redis_settings(settings))?
        .get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// The node on `port`'s `ROLE` ("master", "slave", "sentinel").
fn role(port: u16, password: Option<&str>) -> RedisResult<String> {
    let reply: Vec<Value> = redis::cmd("ROLE").query(&mut connect(port, password)?)?;
    match reply.first() {
        Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        other => Ok(format!("{other:?}")),
    }
}

/// Ok once the node on `port` replicates `primary` with its link up.
fn replication_link(port: u16, password: Option<&str>, primary: u16) -> Result<(), String> {
    let mut c = connect(port, password).map_err(|e| format!("{port}: {e}"))?;
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut c)
        .map_err(|e| format!("INFO replication on {port}: {e}"))?;
    let synced = info.contains("role:slave")
        && info.contains(&format!("master_port:{primary}\r\n"))
        && info.contains("master_link_status:up");
    if synced {
        Ok(())
    } else {
        Err(info.replace("\r\n", " "))
    }
}

/// Whether a sentinel's `flags` say the instance is down or unreachable.
fn flagged_down(flags: &str) -> bool {
    flags
        .split(',')
        .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
}

/// Polls `check` until it is Ok; panics after `timeout` with its last error.
#[allow(clippy::disallowed_methods)] // a test fixture waiting on processes
fn wait_until(
    what: impl std::fmt::Display,
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(POLL),
        }
    }
}
