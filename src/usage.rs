//! Token usage of LLM answers, read as the answer passes (never delaying it): the `usage` object of an
//! OpenAI-style JSON answer, or of the last SSE event that carries one (OpenAI's final chunk, Anthropic's
//! `message_start`/`message_delta`). Logged with the payment when the answer ends; the base for per-token billing.

use crate::body::{Body, BoxError};
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use serde_json::Value;
use std::pin::Pin;
use std::task::{Context, Poll};

/// JSON answers larger than this are not inspected (their usage is not recorded).
const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;
/// An SSE line longer than this is skipped rather than buffered.
const MAX_LINE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// OpenAI's `prompt_tokens`/`completion_tokens`, or Anthropic's `input_tokens`/`output_tokens`, with the
    /// prompt tokens Anthropic counts apart when a prompt is cached (`cache_creation_input_tokens`,
    /// `cache_read_input_tokens`): a cached prompt is still a prompt.
    fn from_json(usage: &Value) -> Option<Usage> {
        let get = |a: &str, b: &str| usage.get(a).or_else(|| usage.get(b)).and_then(Value::as_u64);
        let cached = ["cache_creation_input_tokens", "cache_read_input_tokens"]
            .iter()
            .filter_map(|field| usage.get(*field).and_then(Value::as_u64))
            .fold(0u64, u64::saturating_add);
        let prompt = get("prompt_tokens", "input_tokens").map(|tokens| tokens.saturating_add(cached));
        let completion = get("completion_tokens", "output_tokens");
        (prompt.is_some() || completion.is_some())
            .then(|| Usage { prompt_tokens: prompt.unwrap_or(0), completion_tokens: completion.unwrap_or(0) })
    }

    /// Later events refine earlier ones (Anthropic sends input tokens first, output tokens at the end).
    fn merge(self, later: Usage) -> Usage {
        Usage {
            prompt_tokens: if later.prompt_tokens > 0 { later.prompt_tokens } else { self.prompt_tokens },
            completion_tokens: if later.completion_tokens > 0 {
                later.completion_tokens
            } else {
                self.completion_tokens
            },
        }
    }
}

/// The usage of a whole JSON answer, read at once.
pub fn of_json_answer(body: &[u8]) -> Option<Usage> {
    let answer = serde_json::from_slice::<Value>(body).ok()?;
    answer.get("usage").and_then(Usage::from_json)
}

/// What the tap saw of an answer by its end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tapped {
    pub usage: Option<Usage>,
    /// Whether the answer ended (rather than broke or was dropped half-way).
    pub complete: bool,
    /// Bytes of generated text in an SSE answer's deltas; of the whole body otherwise.
    pub content_bytes: u64,
}

/// Called once with what was found, when the answer ends (or is dropped half-way).
pub type OnEnd = Box<dyn FnOnce(Tapped) + Send>;

/// Wraps an answer's body and watches it for usage.
pub struct UsageTap {
    inner: Body,
    sse: bool,
    /// Only JSON answers are buffered (to read their `usage` at the end); anything else passes untouched.
    json: bool,
    pending: BytesMut,
    usage: Option<Usage>,
    content_bytes: u64,
    /// Whether an SSE answer spoke a format the tap reads (deltas, choices or usage). One that never did
    /// (another API behind a per-token route) is measured by the bytes of its events instead: never 0.
    recognized: bool,
    /// Bytes of an SSE answer's `data:` payloads, but `[DONE]`.
    event_bytes: u64,
    on_end: Option<OnEnd>,
}

impl UsageTap {
    pub fn new(inner: Body, content_type: Option<&str>, on_end: OnEnd) -> UsageTap {
        let sse = content_type.is_some_and(|c| c.starts_with("text/event-stream"));
        let json = content_type.is_some_and(|c| c.starts_with("application/json") || c.contains("+json"));
        UsageTap {
            inner,
            sse,
            json,
            pending: BytesMut::new(),
            usage: None,
            content_bytes: 0,
            recognized: false,
            event_bytes: 0,
            on_end: Some(on_end),
        }
    }

    /// What it has seen so far, of an answer not over yet.
    pub fn so_far(&self) -> Tapped {
        Tapped { usage: self.usage, complete: false, content_bytes: self.content() }
    }

    fn content(&self) -> u64 {
        if self.sse && !self.recognized {
            return self.event_bytes;
        }
        self.content_bytes
    }

    fn inspect(&mut self, data: &Bytes) {
        if !self.sse {
            self.content_bytes = self.content_bytes.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
        }
        if self.json {
            if self.pending.len() + data.len() <= MAX_JSON_BYTES {
                self.pending.extend_from_slice(data);
            }
            return;
        }
        if !self.sse {
            return;
        }
        self.pending.extend_from_slice(data);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line = self.pending.split_to(end + 1);
            self.sse_line(&line);
        }
        if self.pending.len() > MAX_LINE_BYTES {
            // Too long to read, yet delivered: counted whole, generated text or not.
            let dropped = u64::try_from(self.pending.len()).unwrap_or(u64::MAX);
            self.event_bytes = self.event_bytes.saturating_add(dropped);
            self.content_bytes = self.content_bytes.saturating_add(dropped);
            self.pending.clear();
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let payload = data.trim_ascii();
        if payload != b"[DONE]" {
            self.event_bytes = self.event_bytes.saturating_add(u64::try_from(payload.len()).unwrap_or(u64::MAX));
        }
        if !self.recognized {
            self.recognized = in_a_known_format(payload);
        }
        self.content_bytes = self.content_bytes.saturating_add(delta_text_bytes(data));
        // Cheap pre-check: most events carry no usage.
        if !data.windows(7).any(|w| w == b"\"usage\"") {
            return;
        }
        if let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            // OpenAI chat's final chunk, Anthropic's `message_start` and `message_delta`, OpenAI responses'
            // `response.completed`.
            let usage = event
                .get("usage")
                .or_else(|| event.get("message").and_then(|m| m.get("usage")))
                .or_else(|| event.get("response").and_then(|r| r.get("usage")));
            if let Some(found) = usage.and_then(Usage::from_json) {
                self.usage = Some(self.usage.map_or(found, |u| u.merge(found)));
            }
        }
    }

    fn finish(&mut self, complete: bool) {
        let Some(on_end) = self.on_end.take() else { return };
        // A cut-short JSON answer does not parse, so it reports no usage.
        if self.json {
            self.usage = serde_json::from_slice::<Value>(&self.pending)
                .ok()
                .and_then(|answer| answer.get("usage").and_then(Usage::from_json));
        }
        on_end(Tapped { usage: self.usage, complete, content_bytes: self.content() });
    }
}

/// Whether an SSE event is of a format the tap reads, by its top-level fields (what a model writes lands in
/// strings and nested objects, never there): OpenAI chat and legacy completions (`choices`), Anthropic and
/// OpenAI responses (`delta`, `usage`, `message.usage`, `response.usage`).
fn in_a_known_format(payload: &[u8]) -> bool {
    let labelled = |label: &[u8]| payload.windows(label.len()).any(|w| w == label);
    if !(labelled(b"\"delta\"") || labelled(b"\"choices\"") || labelled(b"\"usage\"")) {
        return false;
    }
    let Ok(Value::Object(event)) = serde_json::from_slice::<Value>(payload) else { return false };
    let has_usage = |value: Option<&Value>| value.and_then(|v| v.get("usage")).is_some_and(Value::is_object);
    event.get("choices").is_some_and(Value::is_array)
        || event.contains_key("delta")
        || event.get("usage").is_some_and(Value::is_object)
        || has_usage(event.get("message"))
        || has_usage(event.get("response"))
}

/// The bytes of generated output an SSE event carries: every string of its deltas (OpenAI chat's
/// `choices[].delta`, text and tool-call arguments and reasoning alike; Anthropic's `delta`; OpenAI responses'
/// `delta` string), and the `choices[].text` of OpenAI's legacy completions.
fn delta_text_bytes(data: &[u8]) -> u64 {
    if !data.windows(7).any(|w| w == b"\"delta\"" || w == b"\"text\":") {
        return 0;
    }
    let Ok(event) = serde_json::from_slice::<Value>(data.trim_ascii()) else { return 0 };
    let choices = event.get("choices").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let chat: u64 = choices.iter().filter_map(|choice| choice.get("delta")).map(string_bytes).sum();
    let legacy: u64 = choices.iter().filter_map(|choice| choice.get("text")?.as_str()).map(|t| t.len() as u64).sum();
    chat + legacy + event.get("delta").map_or(0, string_bytes)
}

/// The bytes of every string in `value` but its labels (`type`, `role`, `id`), which are not generated text.
fn string_bytes(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.len() as u64,
        Value::Array(items) => items.iter().map(string_bytes).sum(),
        Value::Object(fields) => fields
            .iter()
            .filter(|(key, _)| !matches!(key.as_str(), "type" | "role" | "id"))
            .map(|(_, value)| string_bytes(value))
            .sum(),
        _ => 0,
    }
}

impl http_body::Body for UsageTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.inspect(data);
                }
                // hyper stops polling a body that says it has ended: this frame may be the last poll.
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UsageTap {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::full;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    async fn tap(content_type: &str, chunks: &[&'static str]) -> Option<Usage> {
        let seen = Arc::new(Mutex::new(None));
        let record = seen.clone();
        let body = full(chunks.concat());
        let mut tapped =
            UsageTap::new(body, Some(content_type), Box::new(move |tapped| *record.lock().unwrap() = tapped.usage));
        while tapped.frame().await.is_some() {}
        drop(tapped);
        let found = *seen.lock().unwrap();
        found
    }

    #[tokio::test]
    async fn openai_json_and_sse() {
        let json = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#;
        assert_eq!(tap("application/json", &[json]).await, Some(Usage { prompt_tokens: 12, completion_tokens: 30 }));
        let sse = [
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\n",
            "data: [DONE]\n\n",
        ];
        assert_eq!(tap("text/event-stream", &sse).await, Some(Usage { prompt_tokens: 5, completion_tokens: 7 }));
    }

    #[tokio::test]
    async fn anthropic_sse_merges_input_and_output() {
        let sse = [
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
        ];
        assert_eq!(tap("text/event-stream", &sse).await, Some(Usage { prompt_tokens: 25, completion_tokens: 15 }));
    }

    #[tokio::test]
    async fn the_text_streamed_is_measured_for_answers_cut_before_their_usage() {
        let sse = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hello \"}}]}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"world\"}}\n\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"!!\"}\n\n",
        );
        let seen = measured(sse).await;
        assert_eq!(seen.content_bytes, 6 + 5 + 2, "the text, not the deltas' labels");
        assert_eq!(seen.usage, None);
    }

    #[tokio::test]
    async fn cached_prompts_tool_calls_and_responses_streams_are_counted() {
        let anthropic = r#"{"usage":{"input_tokens":10,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":5}}"#;
        assert_eq!(
            tap("application/json", &[anthropic]).await,
            Some(Usage { prompt_tokens: 1110, completion_tokens: 5 })
        );
        let responses = [
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":7,\"output_tokens\":3}}}\n\n",
        ];
        assert_eq!(tap("text/event-stream", &responses).await, Some(Usage { prompt_tokens: 7, completion_tokens: 3 }));
        // With `include_usage`, every chunk says `"usage":null`: its text still counts, tool-call arguments too.
        let chunk = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"q\\\":1}\"}}]}}],\"usage\":null}\n\n";
        assert_eq!(measured(chunk).await.content_bytes, "{\"q\":1}".len() as u64);
    }

    /// What the tap measured of an SSE answer made of `events`.
    async fn measured(events: &'static str) -> Tapped {
        let seen = Arc::new(Mutex::new(Tapped::default()));
        let record = seen.clone();
        let mut tapped =
            UsageTap::new(full(events), Some("text/event-stream"), Box::new(move |t| *record.lock().unwrap() = t));
        while tapped.frame().await.is_some() {}
        drop(tapped);
        let found = *seen.lock().unwrap();
        found
    }

    #[tokio::test]
    async fn legacy_completions_count_and_a_stream_in_no_known_format_is_measured_by_its_events() {
        let legacy = "data: {\"choices\":[{\"text\":\"hello\",\"index\":0}]}\n\ndata: [DONE]\n\n";
        assert_eq!(measured(legacy).await.content_bytes, 5);
        // Another API's events behind a per-token route: their bytes, never 0.
        let other = "event: token\ndata: {\"t\":\"hello\"}\n\ndata: [DONE]\n\n";
        assert_eq!(measured(other).await.content_bytes, r#"{"t":"hello"}"#.len() as u64);
        // Another API whose model output names fields `delta` and `usage` (a tool's arguments): still not one
        // the tap reads, so still measured by its events.
        let named = "data: {\"candidates\":[{\"args\":{\"delta\":\"x\",\"usage\":{\"a\":1}}}]}\n\n";
        let expected = r#"{"candidates":[{"args":{"delta":"x","usage":{"a":1}}}]}"#.len() as u64;
        assert_eq!(measured(named).await.content_bytes, expected);
        // A chat stream that generated nothing is still nothing.
        let empty = "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(measured(empty).await.content_bytes, 0);
    }

    #[tokio::test]
    async fn answers_without_usage() {
        assert_eq!(tap("application/json", &["{\"ok\":true}"]).await, None);
        assert_eq!(tap("text/plain", &["not json"]).await, None);
    }
}
