//! OpenTelemetry (feature `otel`): Courier's trace context in and out of
//! the OpenTelemetry context that tracing-opentelemetry keeps on `tracing`
//! spans, so a call's server span is exported as a child of its caller's.

use courier_transport::trace::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes the caller's span (`parent`, from the request's `traceparent`) the
/// OpenTelemetry parent of the handler's `span`.
pub(crate) fn set_parent(span: &tracing::Span, parent: &TraceContext) {
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.span_id),
        flags,
        true,
        TraceState::default(),
    );
    // Refused only when no OpenTelemetry layer is installed: nothing to
    // export to, so nothing lost.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The OpenTelemetry span the caller runs in, as a trace context; `None`
/// when the current `tracing` span is not tracked by OpenTelemetry.
pub(crate) fn current() -> Option<TraceContext> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return None;
    }
    Some(TraceContext {
        trace_id: span_context.trace_id().to_bytes(),
        span_id: span_context.span_id().to_bytes(),
        sampled: span_context.is_sampled(),
    })
}
