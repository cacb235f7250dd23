//! `key=value` text: the pairs of logfmt lines, of payguard text lines after the event name,
//! and of tracing messages like "event: k=v, ...".
//!
//! Why apart: one scanner serves three formats; it never allocates unless a quoted value has
//! escapes.

use super::fields::Val;

/// Scans `key=value` pairs separated by spaces and/or commas; values may be quoted ("...",
/// with backslash escapes) or bracketed ([a,b]). Words without `=` are skipped.
pub(super) fn scan_kv<'a>(b: &'a [u8], f: &mut dyn FnMut(&'a [u8], Val<'a>)) {
    let mut i = 0;
    let n = b.len();
    while i < n {
        while i < n && matches!(b[i], b' ' | b',' | b'\t' | b';') {
            i += 1;
        }
        let ks = i;
        while i < n && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'@' | b'-')) {
            i += 1;
        }
        if i == ks || i >= n || b[i] != b'=' {
            // Not a pair: skip the word.
            while i < n && !matches!(b[i], b' ' | b',' | b'\t') {
                i += 1;
            }
            continue;
        }
        let key = &b[ks..i];
        i += 1;
        if i < n && b[i] == b'"' {
            i += 1;
            let vs = i;
            let mut esc = false;
            while i < n && b[i] != b'"' {
                if b[i] == b'\\' {
                    esc = true;
                    i += 1;
                }
                i += 1;
            }
            let ve = i.min(n);
            i = (i + 1).min(n);
            let raw = &b[vs..ve];
            if esc {
                f(key, Val::Owned(unescape_simple(raw)));
            } else {
                f(key, Val::Raw(raw));
            }
        } else if i < n && b[i] == b'[' {
            let vs = i;
            while i < n && b[i] != b']' {
                i += 1;
            }
            i = (i + 1).min(n);
            f(key, Val::Raw(&b[vs..i]));
        } else {
            let vs = i;
            while i < n && !matches!(b[i], b' ' | b',' | b'\t') {
                i += 1;
            }
            f(key, Val::Raw(&b[vs..i]));
        }
    }
}

fn unescape_simple(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'\\' && i + 1 < raw.len() {
            out.push(match raw[i + 1] {
                b'n' => b'\n',
                b't' => b'\t',
                c => c,
            });
            i += 2;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    out
}
