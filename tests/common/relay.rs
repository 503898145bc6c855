//! A TCP relay that can make its connections go silent: a frozen connection keeps both
//! sockets open but moves no more bytes, like a peer that vanished behind a load balancer (or
//! a Redis that failed over) without a FIN or an RST reaching anyone. Connections made after
//! a freeze pass bytes normally, as a new primary at the same address would. Freezing the
//! replies after a given command lets that command reach the server and run while its answer
//! never comes back (a connection lost between a command and its reply).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Per connection: the freeze flags of its (requests, replies) directions.
type Registry = Arc<Mutex<Vec<(Arc<AtomicBool>, Arc<AtomicBool>)>>>;

pub struct Relay {
    /// `127.0.0.1:<port>` to connect to instead of the target.
    pub addr: String,
    connections: Registry,
    /// Bytes that, the next time a client sends them, freeze that connection's replies.
    trigger: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Relay {
    /// Relays every connection to `target` (`host:port`).
    pub async fn to(target: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let connections: Registry = Arc::default();
        let target = target.to_owned();
        let registry = Arc::clone(&connections);
        let trigger: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let armed = Arc::clone(&trigger);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let requests = Arc::new(AtomicBool::new(false));
                let replies = Arc::new(AtomicBool::new(false));
                registry
                    .lock()
                    .expect("registry")
                    .push((Arc::clone(&requests), Arc::clone(&replies)));
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(
                    client_read,
                    server_write,
                    requests,
                    Some((Arc::clone(&armed), Arc::clone(&replies))),
                ));
                tokio::spawn(pipe(server_read, client_write, replies, None));
            }
        });
        Relay {
            addr,
            connections,
            trigger,
        }
    }

    /// Every connection open now goes silent for good; later ones are relayed as usual.
    pub fn freeze_existing(&self) {
        for (requests, replies) in self.connections.lock().expect("registry").iter() {
            requests.store(true, Ordering::SeqCst);
            replies.store(true, Ordering::SeqCst);
        }
    }

    /// The next time a client sends `command` (bytes of it, e.g. `EVALSHA`), it is delivered
    /// and runs, but no reply comes back on that connection any more; other connections, and
    /// later ones, are relayed as usual.
    pub fn freeze_replies_after(&self, command: &str) {
        *self.trigger.lock().expect("trigger") = Some(command.as_bytes().to_vec());
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections.lock().expect("registry").len()
    }
}

/// The trigger (requests only): the relay's armed bytes, and the flag of this connection's
/// replies that they set when seen.
type Trigger = (Arc<Mutex<Option<Vec<u8>>>>, Arc<AtomicBool>);

async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    trigger: Option<Trigger>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some((armed, replies)) = &trigger {
            let mut armed = armed.lock().expect("trigger");
            if armed
                .as_ref()
                .is_some_and(|bytes| buf[..n].windows(bytes.len()).any(|w| w == &bytes[..]))
            {
                *armed = None;
                replies.store(true, Ordering::SeqCst);
            }
        }
        if frozen.load(Ordering::SeqCst) {
            // Hold both sockets open and pass nothing on, for as long as the test runs.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
