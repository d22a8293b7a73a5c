//! The Sentinel and Cluster fixtures (support/topology.rs) on their own,
//! with the `redis` crate only: a gateway test that fails over or moves a
//! slot can then blame the gateway, not the fixture.

use std::time::Instant;

use crate::support::topology::{Cluster, Sentinels};

const PASSWORD: &str = "topology-s3cr3t";

#[test]
fn a_forced_failover_moves_the_primary_and_writes_land_on_the_new_one() {
    let started = Instant::now();
    let sentinels = Sentinels::with_password(PASSWORD);
    eprintln!("sentinels up in {:?}", started.elapsed());
    let url = sentinels.url();
    assert!(
        url.starts_with(&format!("redis+sentinel://:{PASSWORD}@127.0.0.1:"))
            && url.ends_with(&format!("/{}", Sentinels::MASTER))
            && url.matches("127.0.0.1:").count() == 3,
        "{url}"
    );
    let before = sentinels.primary_port();
    assert_eq!(before, sentinels.node_ports()[0]);
    let mut primary = sentinels.primary_connection();
    redis::cmd("SET")
        .arg("before-failover")
        .arg("1")
        .exec(&mut primary)
        .unwrap();
    // On the replica too before the failover (replication is asynchronous).
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut primary)
        .unwrap();
    assert_eq!(acked, 1);

    let failing_over = Instant::now();
    let after = sentinels.force_failover();
    eprintln!("failed over in {:?}", failing_over.elapsed());
    assert_ne!(after, before);
    assert_eq!(sentinels.primary_port(), after);
    assert_eq!(sentinels.replica_port(), before);

    let mut primary = sentinels.primary_connection();
    redis::cmd("SET")
        .arg("after-failover")
        .arg("2")
        .exec(&mut primary)
        .unwrap();
    let kept: Option<String> = redis::cmd("GET")
        .arg("before-failover")
        .query(&mut primary)
        .unwrap();
    assert_eq!(kept.as_deref(), Some("1"));
    // The old primary is a replica now: it refuses writes.
    let refused = redis::cmd("SET")
        .arg("on-the-old-primary")
        .arg("3")
        .exec(&mut sentinels.connection(before))
        .unwrap_err();
    assert_eq!(refused.code(), Some("READONLY"), "{refused}");
}

#[test]
fn a_slot_migration_moves_the_key_to_the_named_node_and_keeps_it_readable() {
    let started = Instant::now();
    let cluster = Cluster::with_password(PASSWORD);
    eprintln!("cluster up in {:?}", started.elapsed());
    let url = cluster.url();
    assert!(
        url.starts_with(&format!("redis+cluster://:{PASSWORD}@127.0.0.1:"))
            && url.matches("127.0.0.1:").count() == 3,
        "{url}"
    );
    let key = |name: &str| format!("provisioning-gateway:test:{{{name}}}");
    let (a, b) = cluster.names_on_different_nodes(key);
    assert!(a.starts_with("acct-") && b.starts_with("acct-"), "{a} {b}");
    let (key_a, key_b) = (key(&a), key(&b));
    let (from, to) = (cluster.node_for_key(&key_a), cluster.node_for_key(&key_b));
    assert_ne!(from, to);
    redis::cmd("SET")
        .arg(&key_a)
        .arg("budget")
        .exec(&mut cluster.connection(from))
        .unwrap();

    let migrating = Instant::now();
    cluster.migrate_slot_of(&key_a, to);
    eprintln!("slot migrated in {:?}", migrating.elapsed());
    assert_eq!(cluster.node_for_key(&key_a), to);

    // The old node redirects; following MOVED by hand reads the key there.
    let moved = redis::cmd("GET")
        .arg(&key_a)
        .query::<Option<String>>(&mut cluster.connection(from))
        .unwrap_err();
    let (addr, slot) = moved.redirect_node().expect("a MOVED redirect");
    assert_eq!(addr, format!("127.0.0.1:{to}"));
    assert_eq!(slot, cluster.slot_of(&key_a));
    let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let value: Option<String> = redis::cmd("GET")
        .arg(&key_a)
        .query(&mut cluster.connection(port))
        .unwrap();
    assert_eq!(value.as_deref(), Some("budget"));
}
