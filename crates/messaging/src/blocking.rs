//! The blocking face, for programs without a tokio runtime. Each
//! [`BlockingNode`] owns a small runtime (one worker thread) and drives the
//! same [`Node`] as the async face, so both behave identically.
//!
//! Call these from ordinary threads: like every blocking call, they must not
//! be used from inside an async task.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use courier_transport::Address;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    Delivery, EndpointError, Envelope, Mailbox, Node, NodeConfig, NodeId, Progress, RequestError,
    SendError, Sender, ShutdownReport, StartError,
};

/// A [`Node`] for synchronous code.
///
/// ```
/// use std::time::Duration;
/// use courier_messaging::blocking::BlockingNode;
/// use courier_messaging::{Delivery, NodeConfig};
///
/// let server = BlockingNode::start(NodeConfig::listening("mem://blocking-doc".parse()?))?;
/// server.respond("double", |n: u32| async move { n * 2 })?;
/// let mut inbox = server.mailbox::<String>("inbox")?;
///
/// let client = BlockingNode::start(NodeConfig::default())?;
/// let at = server.addresses()[0].clone();
/// assert_eq!(client.request::<u32, u32>(&at, "double", &21, Duration::from_secs(5))?, 42);
/// client.sender::<String>(&at, "inbox", Delivery::AtLeastOnce).send("hi".into())?;
/// assert_eq!(inbox.recv().unwrap().body, "hi");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlockingNode {
    node: Node,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl BlockingNode {
    /// Starts a node on a runtime of its own.
    pub fn start(config: NodeConfig) -> Result<BlockingNode, StartError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("courier-node")
            .enable_all()
            .build()
            .map_err(|err| StartError::Runtime(err.to_string()))?;
        let node = runtime.block_on(Node::start(config))?;
        Ok(BlockingNode {
            node,
            runtime: Arc::new(runtime),
        })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.node.id()
    }

    /// The addresses this node listens on.
    pub fn addresses(&self) -> &[Address] {
        self.node.addresses()
    }

    /// The async face of the same node.
    pub fn as_async(&self) -> &Node {
        &self.node
    }

    /// See [`Node::mailbox`].
    pub fn mailbox<T: DeserializeOwned + Send + 'static>(
        &self,
        name: &str,
    ) -> Result<BlockingMailbox<T>, EndpointError> {
        Ok(BlockingMailbox {
            inner: self.node.mailbox(name)?,
            runtime: self.runtime.clone(),
        })
    }

    /// See [`Node::respond`]; the handler runs on the node's runtime.
    pub fn respond<Req, Resp, F, Fut>(&self, name: &str, handler: F) -> Result<(), EndpointError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Resp> + Send + 'static,
    {
        self.node.respond(name, handler)
    }

    /// See [`Node::sender`].
    pub fn sender<T: Serialize + DeserializeOwned + 'static>(
        &self,
        to: &Address,
        endpoint: &str,
        delivery: Delivery,
    ) -> BlockingSender<T> {
        let _context = self.runtime.enter();
        BlockingSender {
            inner: self.node.sender(to, endpoint, delivery),
            runtime: self.runtime.clone(),
        }
    }

    /// See [`Node::request`]; blocks until the reply or the timeout.
    pub fn request<Req, Resp>(
        &self,
        to: &Address,
        endpoint: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RequestError>
    where
        Req: Serialize + DeserializeOwned + 'static,
        Resp: DeserializeOwned + 'static,
    {
        self.block_on(self.node.request(to, endpoint, request, timeout))
    }

    /// See [`Node::shutdown`].
    pub fn shutdown(self, grace: Duration) -> ShutdownReport {
        let runtime = self.runtime.clone();
        runtime.block_on(self.node.shutdown(grace))
    }
}

/// A [`Mailbox`] for synchronous code.
pub struct BlockingMailbox<T> {
    inner: Mailbox<T>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<T> std::fmt::Debug for BlockingMailbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<T: 'static> BlockingMailbox<T> {
    /// Blocks until a message arrives; `None` once the node has stopped.
    pub fn recv(&mut self) -> Option<Envelope<T>> {
        self.runtime.block_on(self.inner.recv())
    }

    /// Blocks at most `timeout` for a message.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Option<Envelope<T>> {
        let inner = &mut self.inner;
        // The timer must be created inside the runtime, hence the async block.
        self.runtime
            .block_on(async move { tokio::time::timeout(timeout, inner.recv()).await })
            .ok()
            .flatten()
    }

    /// A message that has already arrived, if any.
    pub fn try_recv(&mut self) -> Option<Envelope<T>> {
        self.inner.try_recv()
    }
}

/// A [`Sender`] for synchronous code. Cheap to clone.
pub struct BlockingSender<T> {
    inner: Sender<T>,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl<T> Clone for BlockingSender<T> {
    fn clone(&self) -> Self {
        BlockingSender {
            inner: self.inner.clone(),
            runtime: self.runtime.clone(),
        }
    }
}

impl<T> std::fmt::Debug for BlockingSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<T: Serialize> BlockingSender<T> {
    /// Blocks until the delivery mode's promise is kept; see [`Sender::send`].
    pub fn send(&self, message: T) -> Result<Progress, SendError<T>> {
        self.runtime.block_on(self.inner.send(message))
    }

    /// Never blocks; see [`Sender::try_send`].
    pub fn try_send(&self, message: T) -> Result<Progress, SendError<T>> {
        self.inner.try_send(message)
    }
}
