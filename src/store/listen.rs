//! The listening connection: a dedicated connection (outside the pool) that `LISTEN`s on a channel and
//! hands over every notification's payload in the order PostgreSQL sent them. `realtime::notify` decides
//! what the payloads mean; the SQL stays here.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::{Store, StoreError};

/// A dedicated connection that receives notifications. Dropping it closes the connection.
pub struct Listener {
    client: tokio_postgres::Client,
    payloads: mpsc::UnboundedReceiver<String>,
    pump: JoinHandle<()>,
}

impl Store {
    /// Opens a dedicated connection named `application_name` (as `pg_stat_activity` shows it) whose
    /// notifications are queued as they arrive.
    pub async fn listener(&self, application_name: &str) -> Result<Listener, StoreError> {
        let (client, mut connection) = self.connect_dedicated(application_name).await?;
        let (sender, payloads) = mpsc::unbounded_channel::<String>();
        // The connection object must be polled for the client to make progress; it also yields
        // notifications.
        let pump = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if sender.send(n.payload().to_owned()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        });
        Ok(Listener {
            client,
            payloads,
            pump,
        })
    }
}

impl Listener {
    /// `LISTEN channel`: from its answer on, every commit's notification on `channel` arrives.
    pub async fn listen(&self, channel: &str) -> Result<(), tokio_postgres::Error> {
        self.client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
    }

    /// The next notification's payload; `None` once the connection is closed.
    pub async fn next(&mut self) -> Option<String> {
        self.payloads.recv().await
    }

    /// A payload already received, if any.
    pub fn try_next(&mut self) -> Option<String> {
        self.payloads.try_recv().ok()
    }

    /// An empty round trip. PostgreSQL sends every notification committed before it ahead of its answer,
    /// and they are queued in order: once it returns they are all available to `try_next`.
    pub async fn round_trip(&self) -> Result<(), tokio_postgres::Error> {
        self.client.simple_query("").await?;
        Ok(())
    }

    /// `SELECT 1`: a silently dead connection would never report; this asks it something.
    pub async fn check(&self) -> Result<(), tokio_postgres::Error> {
        self.client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.pump.abort();
    }
}
