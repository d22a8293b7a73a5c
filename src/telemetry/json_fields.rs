//! Span fields for the JSON logs, kept as a JSON object string that grows
//! by appending, each value written straight into it. tracing-subscriber's
//! own `JsonFields` collects a span's fields into a map of `serde_json`
//! values and serializes it, and re-parses the whole object on every
//! `span.record(…)`; under a flood of refusals every call opens a span, so
//! that work was most of what logging at `info` cost, even with no line
//! written. Appending keeps the same JSON (a field recorded twice appears
//! twice; a reader keeps the last, as `serde_json` does when the log line
//! embeds the span), members in the order recorded.
//!
//! OpenTelemetry's instructions (`otel.*`: the exported span's name, kind
//! and status) are left out: a log line names its span already, and every
//! call waiting in line holds its span's fields (BENCHMARKS §5).
//!
//! A mechanism: imports nothing of the crate.

use std::fmt::{self, Write};
use std::io;

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::Writer;

/// See the module docs.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AppendJsonFields;

impl<'writer> FormatFields<'writer> for AppendJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        writer.write_char('{')?;
        let mut members = Members::new(&mut writer, true);
        fields.record(&mut members);
        members.result?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let so_far = &mut current.fields;
        if so_far.is_empty() {
            so_far.push_str("{}");
        }
        if so_far.pop() != Some('}') {
            so_far.push('}');
            return Err(fmt::Error);
        }
        let kept = so_far.len();
        let first = so_far.ends_with('{');
        let mut members = Members::new(so_far, first);
        fields.record(&mut members);
        let result = members.result;
        if result.is_err() {
            // A value whose Debug failed: the object as it was.
            so_far.truncate(kept);
        }
        so_far.push('}');
        result
    }
}

/// Writes each field it visits as a JSON object member (`"name":value`,
/// comma separated) into `out`, each value serialized by `serde_json` as
/// tracing-subscriber's `JsonFields` has it (numbers, booleans, strings,
/// bytes as an array of numbers, anything else as the string of its
/// `Debug`).
struct Members<'a, W: Write> {
    out: &'a mut W,
    first: bool,
    result: fmt::Result,
}

impl<'a, W: Write> Members<'a, W> {
    fn new(out: &'a mut W, first: bool) -> Self {
        Self {
            out,
            first,
            result: Ok(()),
        }
    }

    /// Writes one member; the first error stops the rest.
    fn member(&mut self, field: &Field, value: &(impl Serialize + ?Sized)) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("otel.") {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !std::mem::replace(&mut self.first, false) {
            self.result = self.out.write_char(',');
        }
        let mut out = Utf8(&mut *self.out);
        self.result = self
            .result
            .and_then(|()| serde_json::to_writer(&mut out, name).map_err(|_| fmt::Error))
            .and_then(|()| out.0.write_char(':'))
            .and_then(|()| serde_json::to_writer(&mut out, value).map_err(|_| fmt::Error));
    }
}

impl<W: Write> Visit for Members<'_, W> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field, &value); // not finite: null
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field, &value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field, &value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field, value);
    }

    fn record_bytes(&mut self, field: &Field, value: &[u8]) {
        self.member(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name().starts_with("log.") {
            return; // log metadata, as JsonFields skips it
        }
        self.member(field, &format!("{value:?}"));
    }
}

/// `serde_json`'s output into a `fmt::Write`: it writes whole UTF-8 pieces
/// (text split only where an ASCII escape goes).
struct Utf8<'a, W: Write>(&'a mut W);

impl<W: Write> io::Write for Utf8<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let text = std::str::from_utf8(bytes).map_err(io::Error::other)?;
        self.0.write_str(text).map_err(io::Error::other)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
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

    /// The one log line `body` writes, as the gateway's JSON layer writes it.
    fn log_line(body: impl FnOnce()) -> serde_json::Value {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .fmt_fields(super::AppendJsonFields)
            .with_writer(move || writer.clone());
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), body);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        serde_json::from_str(text.trim()).unwrap()
    }

    #[test]
    fn recorded_span_fields_reach_the_log_line_as_json_otel_instructions_do_not() {
        let line = log_line(|| {
            let span = tracing::info_span!(
                "call",
                otel.name = "svc/M",
                rpc.method = "M",
                account = tracing::field::Empty,
                n = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            span.record("otel.status_code", "ERROR");
            span.record("account", "acme \"eu\"");
            span.record("n", 7);
            span.record("n", 8);
            let _a = span.enter();
            let empty = tracing::info_span!("empty", later = tracing::field::Empty);
            empty.record("later", true);
            let _b = empty.enter();
            tracing::info!(outcome = "OK", "done");
        });
        let spans = line["spans"].as_array().unwrap();
        assert_eq!(spans[0]["rpc.method"], "M", "{line}");
        let names: Vec<&String> = spans[0].as_object().unwrap().keys().collect();
        assert!(
            names.iter().all(|n| !n.starts_with("otel.")),
            "OpenTelemetry's instructions left out: {line}"
        );
        assert_eq!(spans[0]["account"], "acme \"eu\"", "{line}");
        assert_eq!(spans[0]["n"], 8, "the last value recorded: {line}");
        assert_eq!(spans[1]["later"], true, "{line}");
        assert_eq!(line["outcome"], "OK");
    }

    /// Every kind of value, and text needing every kind of escape, reads
    /// back as what was recorded, at creation and when recorded later.
    #[test]
    fn every_value_reads_back_as_recorded() {
        #[derive(Debug)]
        #[allow(dead_code)] // read through Debug only
        struct Odd(&'static str);
        let tricky =
            "quote \" backslash \\ newline \n tab \t cr \r nul \0 bell \u{7} del \u{7f} é 😀";
        let line = log_line(|| {
            let span = tracing::info_span!(
                "call",
                text = tricky,
                r#type = "raw",
                negative = -7i64,
                big = u64::MAX,
                ratio = 0.25f64,
                nan = f64::NAN,
                yes = true,
                odd = ?Odd(tricky),
                later = tracing::field::Empty,
                bytes = tracing::field::Empty,
            );
            span.record("later", tricky);
            span.record("bytes", &b"\x00\xff"[..]);
            let _in = span.enter();
            tracing::info!("done");
        });
        let span = &line["spans"][0];
        assert_eq!(span["text"], tricky, "{line}");
        assert_eq!(span["later"], tricky, "{line}");
        assert_eq!(span["type"], "raw", "{line}");
        assert_eq!(span["negative"], -7, "{line}");
        assert_eq!(span["big"], u64::MAX, "{line}");
        assert_eq!(span["ratio"], 0.25, "{line}");
        assert!(span["nan"].is_null(), "{line}");
        assert_eq!(span["yes"], true, "{line}");
        assert_eq!(span["odd"], format!("{:?}", Odd(tricky)), "{line}");
        assert_eq!(span["bytes"], serde_json::json!([0, 255]), "{line}");
    }
}
