//! A peer process for multi-process tests.
//!
//! `courier-peer echo ADDRESS`: listens on ADDRESS, prints the bound address,
//! and echoes every frame on every connection.
//!
//! `courier-peer half-frame`: listens on TCP, prints the address, and for
//! the first client completes the handshake, writes half a frame and then
//! hangs, waiting to be killed mid-frame.

use anyhow::Context;
use bytes::BytesMut;
use courier_transport::{bind, Address, Frame, TransportConfig};
use courier_wire::{preamble, FrameCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["echo", address] => echo(address.parse()?).await,
        ["half-frame"] => half_frame().await,
        _ => anyhow::bail!("usage: courier-peer echo ADDRESS | courier-peer half-frame"),
    }
}

async fn echo(address: Address) -> anyhow::Result<()> {
    let mut listener = bind(&address, &TransportConfig::default()).await?;
    println!("{}", listener.local_addr());
    loop {
        let mut conn = listener.accept().await?;
        tokio::spawn(async move {
            while let Ok(Some(frame)) = conn.recv().await {
                if conn.send(frame).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn half_frame() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", Address::tcp(listener.local_addr()?));
    let (mut socket, _) = listener.accept().await?;
    socket.write_all(&preamble::preamble()).await?;
    let mut theirs = [0u8; preamble::PREAMBLE_LEN];
    socket.read_exact(&mut theirs).await?;
    let mut frame = BytesMut::new();
    FrameCodec::new().encode_frame(&Frame::data(1, vec![9u8; 1000]), &mut frame)?;
    socket
        .write_all(&frame[..frame.len() / 2])
        .await
        .context("half a frame")?;
    socket.flush().await?;
    std::future::pending::<()>().await;
    Ok(())
}
