//! A small WebSocket client for the gateway's tests: JSON frames in and
//! out, every wait bounded.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the server did next.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// A text frame, parsed.
    Frame(Value),
    /// A close frame with this code.
    Close(u16),
    /// The stream ended without a close frame.
    End,
}

/// One WebSocket connection to a gateway.
pub struct Client<S> {
    pub ws: WebSocketStream<S>,
}

/// Opens a plain connection to `url` (`ws://...`), without `connect`.
pub async fn open(
    url: &str,
) -> Result<Client<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .context("opening the WebSocket timed out")??;
    Ok(Client { ws })
}

/// Opens a connection and says `connect` with `token`; returns the client
/// and the gateway's first answer.
pub async fn connect(
    url: &str,
    token: Option<&str>,
) -> Result<(
    Client<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Value,
)> {
    let mut client = open(url).await?;
    let mut hello = json!({"op": "connect", "name": "test"});
    if let Some(token) = token {
        hello["token"] = json!(token);
    }
    client.send(hello).await?;
    let answer = client.frame().await?;
    Ok((client, answer))
}

/// Opens and connects anonymously, checking the answer is `connected`.
pub async fn connected(
    url: &str,
) -> Result<Client<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let (client, answer) = connect(url, None).await?;
    if answer["op"] != "connected" {
        bail!("expected connected, got {answer}");
    }
    Ok(client)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Sends one JSON frame.
    pub async fn send(&mut self, frame: Value) -> Result<()> {
        self.send_text(frame.to_string()).await
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        tokio::time::timeout(WAIT, self.ws.send(Message::text(text)))
            .await
            .context("sending timed out")??;
        Ok(())
    }

    /// What comes next (pings and pongs skipped).
    pub async fn next(&mut self) -> Result<Next> {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .context("nothing came from the gateway in time")?;
            return Ok(match next {
                Some(Ok(Message::Text(text))) => Next::Frame(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(frame))) => {
                    Next::Close(frame.map_or(1005, |f| f.code.into()))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => bail!("unexpected frame {other:?}"),
                Some(Err(_)) | None => Next::End,
            });
        }
    }

    /// The next text frame; an error if the connection closes instead.
    pub async fn frame(&mut self) -> Result<Value> {
        match self.next().await? {
            Next::Frame(frame) => Ok(frame),
            other => bail!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame with this `op`, skipping others (at most 10,000).
    pub async fn frame_with_op(&mut self, op: &str) -> Result<Value> {
        for _ in 0..10_000 {
            let frame = self.frame().await?;
            if frame["op"] == op {
                return Ok(frame);
            }
        }
        bail!("no {op} frame")
    }

    /// Expects an `error` of `kind` next.
    pub async fn error(&mut self, kind: &str) -> Result<Value> {
        let frame = self.frame().await?;
        if frame["op"] != "error" || frame["kind"] != kind {
            bail!("expected an error of kind {kind}, got {frame}");
        }
        Ok(frame)
    }

    /// Expects the connection to close with `code` (after any frames,
    /// which are returned).
    pub async fn closed_with(&mut self, code: u16) -> Result<Vec<Value>> {
        let mut frames = Vec::new();
        loop {
            match self.next().await? {
                Next::Frame(frame) => frames.push(frame),
                Next::Close(got) if got == code => return Ok(frames),
                other => bail!("expected close {code}, got {other:?} after {frames:?}"),
            }
        }
    }

    /// Checks the connection still answers: a ping gets its pong.
    pub async fn still_open(&mut self) -> Result<()> {
        self.send(json!({"op": "ping", "id": "alive"})).await?;
        let pong = self.frame_with_op("pong").await?;
        if pong["id"] != "alive" {
            bail!("pong without its id: {pong}");
        }
        Ok(())
    }

    /// Subscribes with an id, waiting for its `ok`.
    pub async fn subscribe(&mut self, sid: &str, subject: &str, queue: Option<&str>) -> Result<()> {
        let mut frame =
            json!({"op": "sub", "id": format!("sub-{sid}"), "sid": sid, "subject": subject});
        if let Some(queue) = queue {
            frame["queue"] = json!(queue);
        }
        self.send(frame).await?;
        let ok = self.frame().await?;
        if ok["op"] != "ok" || ok["id"] != format!("sub-{sid}") {
            bail!("expected ok for sub {sid}, got {ok}");
        }
        Ok(())
    }
}

/// Waits until `check` holds, polling; an error after [`WAIT`].
pub async fn eventually(mut check: impl FnMut() -> bool, what: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
