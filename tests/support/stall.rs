//! A TCP proxy in front of Redis whose replies can be held back for a while
//! (a latency spike, not an outage): requests pass at once, replies wait
//! until the stall ends, then all arrive, in order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// The proxy; stops listening when dropped (open connections end with the test).
pub struct StallProxy {
    pub port: u16,
    until: Arc<Mutex<Option<Instant>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let until = Arc::new(Mutex::new(None));
        let stall = Arc::clone(&until);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                tokio::spawn(pipe(client, server, Arc::clone(&stall)));
            }
        });
        Self {
            port,
            until,
            accept,
        }
    }

    /// Holds every reply back for `d` from now.
    pub fn stall(&self, d: Duration) {
        *self.until.lock().unwrap() = Some(Instant::now() + d);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, stall: Arc<Mutex<Option<Instant>>>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let requests = async {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let until = *stall.lock().unwrap();
            if let Some(until) = until {
                tokio::time::sleep_until(until).await;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(requests, replies);
}
