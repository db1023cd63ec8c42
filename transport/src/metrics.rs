//! The Prometheus scrape endpoint both daemons serve with `--metrics-listen ADDR`
//! (`GET /metrics`, text format), fed by the `metrics` facade the daemons record into. Without
//! it, recording is a no-op. `docs/metrics.md` lists every metric.

use std::net::SocketAddr;

/// Serve the metrics at `addr` (call inside the Tokio runtime; once per process).
pub fn serve(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        // Cycle and epoch durations: from a few ms (idle) to many minutes (a first full copy).
        .set_buckets(&[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
        ])
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install()
        .map_err(|e| format!("serving metrics on {addr}: {e}"))
}
