//! W3C trace context, so one request can be followed across processes.
//!
//! A [`TraceContext`] names a trace (16 bytes shared by every operation of
//! one request) and the operation that caused the current one (8 bytes). It
//! travels as the `traceparent` header of the
//! [W3C Trace Context](https://www.w3.org/TR/trace-context/) recommendation,
//! so tools that speak it (OpenTelemetry among them) can join in. The type
//! is courier-wire's ([`courier_wire::trace`]), re-exported here.
//!
//! Within a process the context is a tokio task-local: [`scope`] runs a
//! future with a context current, [`current`] reads it. Courier's clients
//! read it when they send (a call, a publish) and its servers make the
//! sender's context, with a fresh span id, current while they handle what
//! arrived. Spawned tasks do not inherit it: pass the context along.
//!
//! ```
//! use courier_transport::trace::{self, TraceContext};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let root = TraceContext::root();
//! let header = root.to_traceparent();
//! assert_eq!(TraceContext::parse(&header), Some(root));
//!
//! assert_eq!(trace::current(), None);
//! trace::scope(root, async move {
//!     // A client sending from here carries the trace on.
//!     assert_eq!(trace::current().unwrap().trace_id, root.trace_id);
//! })
//! .await;
//! # }
//! ```

use std::future::Future;

pub use courier_wire::trace::TraceContext;

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The context of the task running now, if one was made current.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|ctx| *ctx).ok()
}

/// Runs `future` with `ctx` current (see [`current`]).
pub async fn scope<F: Future>(ctx: TraceContext, future: F) -> F::Output {
    CURRENT.scope(ctx, future).await
}

/// Runs `f` with `ctx` current, synchronously.
pub fn sync_scope<R>(ctx: TraceContext, f: impl FnOnce() -> R) -> R {
    CURRENT.sync_scope(ctx, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scope_sets_the_current_context_for_its_future_only() {
        let ctx = TraceContext::root();
        assert_eq!(current(), None);
        let seen = scope(ctx, async {
            tokio::task::yield_now().await;
            current()
        })
        .await;
        assert_eq!(seen, Some(ctx));
        assert_eq!(current(), None);
        assert_eq!(sync_scope(ctx, current), Some(ctx));
    }
}
