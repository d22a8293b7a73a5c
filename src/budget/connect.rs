//! Opening a connection to Redis in each topology the gateway supports: one
//! endpoint, the primary behind Sentinel (asked of the sentinels at every
//! connect, so a reconnect after a failover finds the new one), or a Cluster
//! (MOVED/ASK and slot changes handled by the cluster connection). Passwords
//! from files are read at every connect, so a rotated Secret applies at the
//! next reconnect without a restart.

use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, Pipeline,
    RedisError, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

use crate::config::{CaPem, RedisConfig, RedisUrl, Topology, read_secret};

/// A live connection, whatever the topology. Cheap to clone (multiplexed).
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Everything needed to (re)connect; holds no secret but the URL's own.
pub(crate) struct Connector {
    url: RedisUrl,
    ca: Option<CaPem>,
    username: Option<String>,
    password_file: Option<std::path::PathBuf>,
    sentinel_password_file: Option<std::path::PathBuf>,
    connect_timeout: Duration,
    response_timeout: Duration,
}

/// The credentials of one connect, read now.
struct Credentials {
    username: Option<String>,
    password: Option<String>,
}

impl Connector {
    pub(crate) fn new(config: &RedisConfig, connect_timeout: Duration, timeout: Duration) -> Self {
        Self {
            url: config.url.clone(),
            ca: config.ca.clone(),
            username: config.username.clone(),
            password_file: config.password_file.clone(),
            sentinel_password_file: config.sentinel_password_file.clone(),
            connect_timeout,
            response_timeout: timeout,
        }
    }

    /// A fresh connection to where the budget lives now.
    pub(crate) async fn open(&self) -> RedisResult<Conn> {
        let creds = self.credentials()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        match self.url.topology() {
            Topology::Standalone => {
                let client = self.client(self.url.expose().into_connection_info()?, &creds)?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Single(conn))
            }
            Topology::Sentinel { master } => {
                let client = self.sentinel_primary(master, &creds).await?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Single(conn))
            }
            Topology::Cluster => {
                let seeds = self
                    .url
                    .nodes()
                    .iter()
                    .map(|(host, port)| self.addr(host, *port));
                let seeds: Vec<_> = seeds
                    .map(|a| a.into_connection_info())
                    .collect::<Result<_, _>>()?;
                let mut builder = ClusterClientBuilder::new(seeds)
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.response_timeout)
                    // Our own timeouts bound every command; the cluster
                    // connection may follow a MOVED or ASK once within them.
                    .retries(1);
                if let Some(user) = &creds.username {
                    builder = builder.username(user);
                }
                if let Some(password) = &creds.password {
                    builder = builder.password(password);
                }
                if self.url.tls() {
                    builder = builder.tls(TlsMode::Secure);
                }
                if let Some(ca) = &self.ca {
                    builder = builder.certs(certificates(ca));
                }
                let conn = builder.build()?.get_async_connection().await?;
                Ok(Conn::Cluster(conn))
            }
        }
    }

    /// A connection of its own for SUBSCRIBE: to the endpoint, the primary
    /// the sentinels name now, or a Cluster's first reachable seed (a
    /// Cluster delivers PUBLISH on every node).
    pub(crate) async fn open_pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let creds = self.credentials()?;
        match self.url.topology() {
            Topology::Standalone => {
                let client = self.client(self.url.expose().into_connection_info()?, &creds)?;
                client.get_async_pubsub().await
            }
            Topology::Sentinel { master } => {
                let client = self.sentinel_primary(master, &creds).await?;
                client.get_async_pubsub().await
            }
            Topology::Cluster => {
                let mut last = None;
                for (host, port) in self.url.nodes() {
                    let info = self.addr(host, *port).into_connection_info()?;
                    match self.client(info, &creds)?.get_async_pubsub().await {
                        Ok(pubsub) => return Ok(pubsub),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    RedisError::from((ErrorKind::InvalidClientConfig, "no cluster node"))
                }))
            }
        }
    }

    /// A client of one node with this connect's credentials and CA.
    fn client(&self, info: redis::ConnectionInfo, creds: &Credentials) -> RedisResult<Client> {
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &creds.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &creds.password {
            settings = settings.set_password(password);
        }
        let info = info.set_redis_settings(settings);
        match &self.ca {
            None => Client::open(info),
            Some(ca) => Client::build_with_tls(info, certificates(ca)),
        }
    }

    /// The primary's client, as the sentinels name it now.
    async fn sentinel_primary(&self, master: &str, creds: &Credentials) -> RedisResult<Client> {
        let sentinels = self.url.nodes().iter().map(|(h, p)| self.addr(h, *p));
        let mut builder =
            SentinelClientBuilder::new(sentinels, master, SentinelServerType::Master)?
                .set_client_to_redis_db(self.url.db());
        if self.url.tls() {
            builder = builder
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(ca) = &self.ca {
            builder = builder.set_client_to_redis_certificates(certificates(ca));
        }
        if let Some(user) = &creds.username {
            builder = builder.set_client_to_redis_username(user);
        }
        if let Some(password) = &creds.password {
            builder = builder.set_client_to_redis_password(password);
        }
        // The sentinels' own password where it differs (an empty file:
        // none); otherwise the data nodes' credentials.
        let sentinel_password = match &self.sentinel_password_file {
            Some(file) => Some(read_secret(file).map_err(config_error)?),
            None => creds.password.clone(),
        };
        if let Some(password) = sentinel_password.filter(|p| !p.is_empty()) {
            if self.sentinel_password_file.is_none()
                && let Some(user) = &creds.username
            {
                builder = builder.set_client_to_sentinel_username(user);
            }
            builder = builder.set_client_to_sentinel_password(password);
        }
        builder.build()?.async_get_client().await
    }

    fn addr(&self, host: &str, port: u16) -> ConnectionAddr {
        if self.url.tls() {
            ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(host.to_owned(), port)
        }
    }

    /// `--redis-username` over the URL's user; the password file, read now,
    /// over the URL's password.
    fn credentials(&self) -> RedisResult<Credentials> {
        let password = match &self.password_file {
            Some(file) => Some(read_secret(file).map_err(config_error)?),
            None => self.url.password().map(str::to_owned),
        };
        Ok(Credentials {
            username: self
                .username
                .clone()
                .or_else(|| self.url.username().map(str::to_owned)),
            password: password.filter(|p| !p.is_empty()),
        })
    }
}

fn certificates(ca: &CaPem) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.0.clone()),
    }
}

/// A problem with the password file (its path, never its content).
fn config_error(problem: String) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, "password file", problem))
}
