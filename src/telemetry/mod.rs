//! Telemetry: the metrics registry (`metrics`), logs to stderr, and OpenTelemetry traces
//! exported over OTLP (HTTP/protobuf) when an endpoint is configured.
//!
//! Spans are batched by a background task, so tracing never waits on the exporter. Only this
//! crate's spans go to OTLP: openraft's many debug spans stay out.

mod export;
pub mod metrics;

pub use export::ExportCounters;

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, TelemetryConfig};

/// openraft logs every election and heartbeat problem at info and above; keep it to warnings.
/// openraft warns on every failed RPC; `consensus::reachability` logs peers' transitions instead.
/// The OpenTelemetry SDK's own logs (dropped spans, export errors) at warn and above.
const DEFAULT_FILTER: &str =
    "info,openraft=error,opentelemetry=warn,opentelemetry_sdk=warn,opentelemetry-otlp=warn";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("key `telemetry.otlp_endpoint`: {0}")]
    Exporter(String),
}

/// Holds the trace pipeline; `shutdown` flushes what is queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Counts exported and dropped spans (zero without an exporter).
    pub counters: ExportCounters,
}

fn fmt_layer<S>(format: LogFormat) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // Colour only for a person at a terminal: journald, docker and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    }
}

/// Logs only, for commands that are not a node.
pub fn init_logging(format: LogFormat) {
    // A second init (tests) keeps the first subscriber.
    let _ = Registry::default().with(fmt_layer(format)).try_init();
}

/// The OTLP traces URL: `telemetry.otlp_endpoint` (a base URL gets `/v1/traces`), else
/// whatever `OTEL_EXPORTER_OTLP_ENDPOINT` says, else no exporter.
fn traces_endpoint(config: &TelemetryConfig) -> Option<Option<String>> {
    match config
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        Some(url) => {
            let url = url.trim_end_matches('/');
            Some(Some(if url.ends_with("/v1/traces") {
                url.to_string()
            } else {
                format!("{url}/v1/traces")
            }))
        }
        None => std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .map(|_| None),
    }
}

/// Logs plus, when an endpoint is configured, the OTLP trace pipeline for node `node`.
/// Must run inside the tokio runtime: the batch exporter is a task on it.
pub fn init_node(config: &TelemetryConfig, node: u64) -> Result<Telemetry, TelemetryError> {
    let counters = ExportCounters::new().map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let Some(endpoint) = traces_endpoint(config) else {
        init_logging(config.log_format);
        return Ok(Telemetry {
            provider: None,
            counters,
        });
    };
    let mut builder = SpanExporter::builder().with_http();
    if let Some(url) = endpoint {
        builder = builder.with_endpoint(url);
    }
    let exporter = builder
        .with_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = export::CountingExporter::new(exporter, counters.clone());
    let resource = Resource::builder()
        .with_service_name("raftchat")
        .with_attributes([
            KeyValue::new("service.version", crate::node::VERSION),
            KeyValue::new("service.instance.id", node.to_string()),
            KeyValue::new("raftchat.node.id", node as i64),
        ])
        .build();
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    // Spans with explicit start times (`interval_span`) go through the OpenTelemetry API.
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("raftchat");
    let ours = Targets::new().with_target("raftchat", LevelFilter::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(ours);
    let _ = Registry::default()
        .with(fmt_layer(config.log_format))
        .with(otel)
        .try_init();
    Ok(Telemetry {
        provider: Some(provider),
        counters,
    })
}

impl Telemetry {
    /// Exports what is queued and stops the pipeline (bounded wait).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let done = tokio::task::spawn_blocking(move || {
                provider.shutdown_with_timeout(Duration::from_secs(3))
            });
            match tokio::time::timeout(Duration::from_secs(5), done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("raftchat: flushing traces: {e}"),
                _ => eprintln!("raftchat: flushing traces timed out"),
            }
        }
    }
}

/// Exports a span named `name` that ended now and lasted `lasted` (an interval measured
/// before it was known to be one, like a failover). Without an exporter it costs nothing.
pub fn interval_span(name: &'static str, lasted: Duration, attributes: Vec<KeyValue>) {
    use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
    let ended = std::time::SystemTime::now();
    let started = ended.checked_sub(lasted).unwrap_or(ended);
    let tracer = opentelemetry::global::tracer("raftchat");
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(started)
        .with_attributes(attributes)
        .start(&tracer);
    span.end_with_timestamp(ended);
}

/// The W3C `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span named by `traceparent`.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}
