//! The vendor's words as the gateway's statuses use them: Infobip's field
//! names in proto spelling, its messageId as an AIP-193 reason, and text cut
//! to a bound.

/// Infobip's camelCase field names, as the proto spells them.
pub(super) fn proto_field(vendor: &str) -> String {
    let mut out = String::with_capacity(vendor.len() + 4);
    for c in vendor.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// A vendor messageId as an AIP-193 reason: UPPER_SNAKE_CASE, at most 63 chars.
pub(super) fn reason_from_vendor(id: &str) -> String {
    let mut r: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    while r.ends_with('_') {
        r.pop();
    }
    r.trim_start_matches(|c: char| c == '_' || c.is_ascii_digit())
        .to_owned()
}

/// `s` cut to at most `max` bytes (on a character boundary), with `…`.
pub(super) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
