//! A TCP relay that can make its connections go silent: a frozen connection keeps both
//! sockets open but moves no more bytes, like a peer that vanished behind a load balancer (or
//! a Redis that failed over) without a FIN or an RST reaching anyone. Connections made after
//! a freeze pass bytes normally, as a new primary at the same address would.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    /// `127.0.0.1:<port>` to connect to instead of the target.
    pub addr: String,
    connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl Relay {
    /// Relays every connection to `target` (`host:port`).
    pub async fn to(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let connections: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let target = target.to_owned();
        let registry = Arc::clone(&connections);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let frozen = Arc::new(AtomicBool::new(false));
                registry.lock().expect("registry").push(Arc::clone(&frozen));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, Arc::clone(&frozen)));
                tokio::spawn(pipe(server_read, client_write, frozen));
            }
        });
        Relay { addr, connections }
    }

    /// Every connection open now goes silent for good; later ones are relayed as usual.
    pub fn freeze_existing(&self) {
        for frozen in self.connections.lock().expect("registry").iter() {
            frozen.store(true, Ordering::SeqCst);
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.lock().expect("registry").len()
    }
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, frozen: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Hold both sockets open and pass nothing on, for as long as the test runs.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
