//! Span fields for the JSON logs, kept as a JSON object string that grows
//! by appending. tracing-subscriber's own `JsonFields` re-parses a span's
//! whole JSON and serializes it again on every `span.record(…)`; a call's
//! spans record a handful of fields each (ids, account, caller, outcome), so
//! under a flood of refusals that parsing was most of what logging at
//! `info` cost, even with no line written. Appending keeps the same JSON
//! (a field recorded twice appears twice; a reader keeps the last, as
//! `serde_json` does when the log line embeds the span).
//!
//! A mechanism: imports nothing of the crate.

use std::fmt;

use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::{JsonVisitor, Writer};

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AppendJsonFields;

impl<'writer> FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = JsonVisitor::new(&mut writer);
        fields.record(&mut visitor);
        visitor.finish()
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut added = String::new();
        let mut visitor = JsonVisitor::new(&mut added);
        fields.record(&mut visitor);
        visitor.finish()?;
        // `added` is `{…}`: splice its members into the object so far.
        let Some(members) = added.strip_prefix('{').and_then(|a| a.strip_suffix('}')) else {
            return Err(fmt::Error);
        };
        if members.is_empty() {
            return Ok(());
        }
        let so_far = &mut current.fields;
        if so_far.is_empty() {
            so_far.push_str(&added);
            return Ok(());
        }
        if so_far.pop() != Some('}') {
            return Err(fmt::Error);
        }
        if !so_far.ends_with('{') {
            so_far.push(',');
        }
        so_far.push_str(members);
        so_far.push('}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    /// Log lines written to a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn recorded_span_fields_reach_the_log_line_as_json() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .fmt_fields(super::AppendJsonFields)
            .with_writer(move || writer.clone());
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "call",
                rpc.method = "M",
                account = tracing::field::Empty,
                n = tracing::field::Empty
            );
            span.record("account", "acme \"eu\"");
            span.record("n", 7);
            span.record("n", 8);
            let _a = span.enter();
            let empty = tracing::info_span!("empty", later = tracing::field::Empty);
            empty.record("later", true);
            let _b = empty.enter();
            tracing::info!(outcome = "OK", "done");
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let spans = line["spans"].as_array().unwrap();
        assert_eq!(spans[0]["rpc.method"], "M", "{line}");
        assert_eq!(spans[0]["account"], "acme \"eu\"", "{line}");
        assert_eq!(spans[0]["n"], 8, "the last value recorded: {line}");
        assert_eq!(spans[1]["later"], true, "{line}");
        assert_eq!(line["outcome"], "OK");
    }
}
