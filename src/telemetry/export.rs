//! The OTLP span exporter, counted and logged: an export that fails drops its batch, and an
//! operator must see that (`raftchat_spans_dropped_total`, one log line when exports start
//! failing and one when they work again) instead of traces silently going missing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use prometheus::IntCounter;

/// The exporter's counters; registered by `metrics::Metrics`.
#[derive(Clone)]
pub struct ExportCounters {
    pub exported: IntCounter,
    pub dropped: IntCounter,
}

impl ExportCounters {
    pub fn new() -> prometheus::Result<ExportCounters> {
        Ok(ExportCounters {
            exported: IntCounter::new(
                "raftchat_spans_exported_total",
                "Spans sent to the OTLP collector.",
            )?,
            dropped: IntCounter::new(
                "raftchat_spans_dropped_total",
                "Spans lost because an OTLP export failed (the collector is down, slow or refusing).",
            )?,
        })
    }
}

#[derive(Debug)]
pub struct CountingExporter<E> {
    inner: E,
    counters: Counters,
    failing: Arc<AtomicBool>,
}

/// `IntCounter` is not `Debug`, which the exporter trait wants.
#[derive(Clone)]
struct Counters(ExportCounters);

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportCounters")
    }
}

impl<E> CountingExporter<E> {
    pub fn new(inner: E, counters: ExportCounters) -> CountingExporter<E> {
        CountingExporter {
            inner,
            counters: Counters(counters),
            failing: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.counters.0.exported.inc_by(spans);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("exporting traces works again");
                }
            }
            Err(e) => {
                self.counters.0.dropped.inc_by(spans);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, spans, "exporting traces failed; spans are dropped until it works again");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
