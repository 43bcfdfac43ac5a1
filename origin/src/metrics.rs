//! The origin's metrics, registered in the registry the caller passes in.
//!
//! - `cdn_response_bytes_total`: body bytes sent.
//! - `cdn_request_duration_seconds`: from the request to the end of its response body.
//! - `cdn_origin_responses_total{status="2xx|3xx|4xx|5xx"}`: responses by status class.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use cdn_node::listener::{Body, BoxError};
use http::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};
use tokio::time::Instant;

/// The origin's metric handles.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    bytes: IntCounter,
    duration: Histogram,
    /// By status class: 2xx, 3xx, 4xx, 5xx.
    responses: [IntCounter; 4],
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let bytes = IntCounter::with_opts(Opts::new("cdn_response_bytes_total", "Response body bytes sent"))?;
        let duration = Histogram::with_opts(HistogramOpts::new(
            "cdn_request_duration_seconds",
            "Time from a request to the end of its response body",
        ))?;
        let by_status = IntCounterVec::new(
            Opts::new("cdn_origin_responses_total", "Responses of the origin by status class"),
            &["status"],
        )?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(by_status.clone()))?;
        let class = |label: &str| by_status.with_label_values(&[label]);
        let responses = [class("2xx"), class("3xx"), class("4xx"), class("5xx")];
        Ok(Self { bytes, duration, responses })
    }

    /// Counts `response` and wraps its body so that bytes and duration are recorded
    /// as it is sent.
    pub(crate) fn record(&self, response: Response<Body>, start: Instant) -> Response<Body> {
        let class = usize::from(response.status().as_u16() / 100);
        if let Some(counter) = class.checked_sub(2).and_then(|i| self.responses.get(i)) {
            counter.inc();
        }
        response.map(|inner| {
            Metered { inner, bytes: self.bytes.clone(), duration: self.duration.clone(), start, done: false }
                .boxed_unsync()
        })
    }
}

/// A body that counts its data and observes the duration when it ends or is dropped.
struct Metered {
    inner: Body,
    bytes: IntCounter,
    duration: Histogram,
    start: Instant,
    done: bool,
}

impl Metered {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.duration.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.finish();
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes.inc_by(data.len() as u64);
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.finish(),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use cdn_node::listener::full;
    use http::StatusCode;

    use super::*;

    #[tokio::test]
    async fn counts_statuses_bytes_and_durations() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        assert!(Metrics::register(&registry).is_err(), "names are taken once per registry");
        let ok = metrics.record(Response::new(full("hello")), Instant::now());
        let body = ok.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        let mut missing = Response::new(full("no"));
        *missing.status_mut() = StatusCode::NOT_FOUND;
        drop(metrics.record(missing, Instant::now()));
        let mut informational = Response::new(full(""));
        *informational.status_mut() = StatusCode::CONTINUE;
        drop(metrics.record(informational, Instant::now()));

        assert_eq!(metrics.bytes.get(), 5);
        assert_eq!(metrics.duration.get_sample_count(), 3);
        let counts: Vec<u64> = metrics.responses.iter().map(IntCounter::get).collect();
        assert_eq!(counts, [1, 0, 1, 0]);
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_owned()).collect();
        assert_eq!(names, ["cdn_origin_responses_total", "cdn_request_duration_seconds", "cdn_response_bytes_total"]);
    }
}
