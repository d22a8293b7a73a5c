//! The `--redis-url` forms: one endpoint (`redis://`, `rediss://`), Sentinel
//! (`redis+sentinel://…/<master>`) and Cluster (`redis+cluster://…`). A URL
//! may carry a password: `Debug` and `Display` show it replaced, and no
//! refusal echoes it.

use std::fmt;

use redis::IntoConnectionInfo;
use url::Url;

/// How the gateway reaches Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One endpoint: a standalone Redis or a managed primary.
    Standalone,
    /// The primary named `master`, discovered through the sentinels.
    Sentinel { master: String },
    /// A Redis Cluster, its nodes discovered from the seeds.
    Cluster,
}

/// A checked Redis URL.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// As given (with its password): the client of a single endpoint opens it.
    raw: String,
    topology: Topology,
    tls: bool,
    /// Sentinels or cluster seeds (one entry for a single endpoint).
    nodes: Vec<(String, u16)>,
    username: Option<String>,
    password: Option<String>,
    db: i64,
}

const FORMS: &str = "redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB], \
    redis[s]+sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]/MASTER[/DB] or \
    redis[s]+cluster://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT…]";

impl RedisUrl {
    /// Checks a URL of one of the three forms. Problems are described
    /// without echoing the URL, which may hold a password.
    pub fn new(url: impl Into<String>) -> Result<Self, String> {
        let raw = url.into().trim().to_owned();
        let Some((scheme, rest)) = raw.split_once("://") else {
            return Err(format!("is not a Redis URL ({FORMS})"));
        };
        let (tls, topology) = match scheme {
            "redis" => (false, None),
            "rediss" => (true, None),
            "redis+sentinel" => (false, Some(true)),
            "rediss+sentinel" => (true, Some(true)),
            "redis+cluster" => (false, Some(false)),
            "rediss+cluster" => (true, Some(false)),
            _ => return Err(format!("must start with one of: {FORMS}")),
        };
        match topology {
            None => Self::standalone(raw, tls),
            Some(sentinel) => Self::multi(&raw, rest, tls, sentinel),
        }
    }

    fn standalone(raw: String, tls: bool) -> Result<Self, String> {
        let parsed = Url::parse(&raw).map_err(|e| format!("not a valid URL ({e})"))?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("has no host")?;
        let info = raw
            .as_str()
            .into_connection_info()
            .map_err(|_| format!("is not a Redis URL the client accepts ({FORMS})"))?;
        let settings = info.redis_settings();
        Ok(Self {
            topology: Topology::Standalone,
            tls,
            nodes: vec![(host.to_owned(), parsed.port().unwrap_or(6379))],
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
            db: settings.db(),
            raw,
        })
    }

    /// `[[user]:password@]host:port[,host:port…][/path]` after the scheme.
    fn multi(raw: &str, rest: &str, tls: bool, sentinel: bool) -> Result<Self, String> {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (Some(userinfo), hosts),
            None => (None, authority),
        };
        let default_port = if sentinel { 26379 } else { 6379 };
        let nodes = hosts
            .split(',')
            .map(|node| host_port(node, default_port))
            .collect::<Result<Vec<_>, _>>()?;
        // The client decodes the user information as it would in a plain URL.
        let (username, password) = match userinfo {
            None => (None, None),
            Some(userinfo) => {
                let probe = format!("redis://{userinfo}@localhost");
                let info = probe
                    .as_str()
                    .into_connection_info()
                    .map_err(|_| "has user information the client cannot read".to_owned())?;
                let s = info.redis_settings();
                (
                    s.username().map(str::to_owned),
                    s.password().map(str::to_owned),
                )
            }
        };
        let mut segments = path.split('/').filter(|s| !s.is_empty());
        let (topology, db) = if sentinel {
            let master = segments
                .next()
                .ok_or("needs the master's name: redis+sentinel://HOST:PORT[,…]/MASTER[/DB]")?;
            let db = match segments.next() {
                None => 0,
                Some(db) => db
                    .parse()
                    .map_err(|_| "has a database that is not a number")?,
            };
            let master = master.to_owned();
            (Topology::Sentinel { master }, db)
        } else {
            (Topology::Cluster, 0)
        };
        if segments.next().is_some() {
            return Err(if sentinel {
                "has more after /MASTER/DB than a Sentinel URL holds".into()
            } else {
                "has a path: a Cluster URL names no database (a cluster has only database 0)".into()
            });
        }
        Ok(Self {
            raw: raw.to_owned(),
            topology,
            tls,
            nodes,
            username,
            password,
            db,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// TLS to every node (`rediss…`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The sentinels, the cluster seeds, or the one endpoint.
    pub fn nodes(&self) -> &[(String, u16)] {
        &self.nodes
    }

    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The database (0 unless the URL names one; always 0 on a Cluster).
    pub fn db(&self) -> i64 {
        self.db
    }

    /// Whether the URL itself carries a password.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The password in the URL, for the Redis client only.
    pub(crate) fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The URL as given, with its password, for the client of one endpoint.
    pub(crate) fn expose(&self) -> &str {
        &self.raw
    }

    fn redacted(&self) -> String {
        let scheme = self.raw.split_once("://").map_or("redis", |(s, _)| s);
        let user = match (&self.username, &self.password) {
            (None, None) => String::new(),
            (user, Some(_)) => format!("{}:***@", user.as_deref().unwrap_or("")),
            (Some(user), None) => format!("{user}@"),
        };
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|(h, p)| {
                if h.contains(':') {
                    format!("[{h}]:{p}")
                } else {
                    format!("{h}:{p}")
                }
            })
            .collect();
        let path = match &self.topology {
            Topology::Sentinel { master } => format!("/{master}/{}", self.db),
            Topology::Standalone => format!("/{}", self.db),
            Topology::Cluster => String::new(),
        };
        format!("{scheme}://{user}{}{path}", hosts.join(","))
    }
}

/// `host:port`, `[v6]:port` or `host` (with the default port).
fn host_port(node: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = node.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("has an unclosed [IPv6] host")?;
        (host, after.strip_prefix(':'))
    } else {
        match node.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (node, None),
        }
    };
    if host.is_empty() {
        return Err("has an empty host in its host list".into());
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse()
            .map_err(|_| "has a port that is not a number in its host list")?,
    };
    Ok((host.to_owned(), port))
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_url_never_prints_its_password() {
        for url in [
            "rediss://user:s3cr3t-pw@redis.example:6380/2",
            "redis+sentinel://user:s3cr3t-pw@s1:26379,s2:26380/mymaster/1",
            "rediss+cluster://:s3cr3t-pw@n1:7000,n2:7001",
        ] {
            let parsed = RedisUrl::new(url).unwrap();
            let shown = format!("{parsed:?} {parsed}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert_eq!(parsed.password(), Some("s3cr3t-pw"));
        }
        for bad in [
            "http://x",
            "redis://",
            "redis://:s3cr3t@x:notaport",
            "redis://:s3cr3t@x/notadb",
            "redis+sentinel://:s3cr3t@x:1",
            "redis+sentinel://:s3cr3t@x:notaport/m",
            "redis+sentinel://:s3cr3t@x:1/m/notadb",
            "redis+cluster://:s3cr3t@x:1/0",
            "redis+cluster://:s3cr3t@,y:1",
        ] {
            let problem = RedisUrl::new(bad).unwrap_err();
            assert!(!problem.contains("s3cr3t"), "{problem}");
        }
    }

    #[test]
    fn the_three_forms_parse_into_topology_nodes_and_credentials() {
        let s = RedisUrl::new("rediss+sentinel://app:pw@10.0.0.1:26379,[::1]:26380,s3/primary/2")
            .unwrap();
        assert_eq!(
            s.topology(),
            &Topology::Sentinel {
                master: "primary".into()
            }
        );
        assert!(s.tls());
        assert_eq!(s.username(), Some("app"));
        assert_eq!(s.db(), 2);
        assert_eq!(
            s.nodes(),
            [
                ("10.0.0.1".to_owned(), 26379),
                ("::1".to_owned(), 26380),
                ("s3".to_owned(), 26379)
            ]
        );
        assert_eq!(
            s.to_string(),
            "rediss+sentinel://app:***@10.0.0.1:26379,[::1]:26380,s3:26379/primary/2"
        );
        let c = RedisUrl::new("redis+cluster://n1:7000,n2").unwrap();
        assert_eq!(c.topology(), &Topology::Cluster);
        assert_eq!(c.nodes()[1], ("n2".to_owned(), 6379));
        assert!(!c.has_password());
        let one = RedisUrl::new("redis://:p%40ss@r:6380/3").unwrap();
        assert_eq!(one.topology(), &Topology::Standalone);
        assert_eq!((one.password(), one.db()), (Some("p@ss"), 3));
    }
}
