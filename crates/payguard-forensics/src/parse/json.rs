//! A minimal JSON object scanner for payguard and tracing-subscriber JSON lines.
//!
//! Why not serde_json for the whole line: this one flattens nested objects into one callback,
//! counts arrays without building them, borrows the line for every string without escapes, and
//! tells a cut-off line (`JErr::Eof`) from one that is not JSON (`JErr::Bad`).

use super::fields::Val;

/// Why a JSON scan stopped.
pub(super) enum JErr {
    /// The line ended inside the object.
    Eof,
    /// Not JSON.
    Bad,
}

/// A minimal JSON object scanner: flattens nested objects (tracing's `fields`, `span`) into one
/// callback, skips arrays except to count them, and never allocates unless a string has escapes.
pub(super) struct Json<'a> {
    pub(super) b: &'a [u8],
    pub(super) i: usize,
}

const JSON_DEPTH_MAX: u32 = 8;

/// The first `"` or `\\` in `b`, looked for eight bytes at a time in a `u64`. JSON keys and
/// values here are mostly 2 to 24 bytes: `memchr2`'s call and vector setup cost more than that
/// (measured over a whole run: ~90 instructions per string with it; BENCHMARKS.md).
pub(super) fn quote_or_escape(b: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // The high bit of the lowest byte equal to `c` is set (bytes above it may be too).
    let eq = |w: u64, c: u8| {
        let x = w ^ (LO * c as u64);
        x.wrapping_sub(LO) & !x & HI
    };
    let mut words = b.chunks_exact(8);
    for (k, w) in (&mut words).enumerate() {
        let w = u64::from_le_bytes(w.try_into().expect("chunks of eight"));
        let m = eq(w, b'"') | eq(w, b'\\');
        if m != 0 {
            return Some(k * 8 + (m.trailing_zeros() / 8) as usize);
        }
    }
    let done = b.len() - words.remainder().len();
    let tail = words
        .remainder()
        .iter()
        .position(|&c| c == b'"' || c == b'\\');
    tail.map(|p| done + p)
}

impl<'a> Json<'a> {
    fn peek(&self) -> Result<u8, JErr> {
        self.b.get(self.i).copied().ok_or(JErr::Eof)
    }
    pub(super) fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    /// After the opening quote: returns the raw contents and whether it has escapes.
    fn string(&mut self) -> Result<(&'a [u8], bool), JErr> {
        let s = self.i;
        let mut esc = false;
        loop {
            let rel = quote_or_escape(&self.b[self.i..]).ok_or(JErr::Eof)?;
            self.i += rel;
            if self.b[self.i] == b'\\' {
                esc = true;
                self.i += 2;
                if self.i > self.b.len() {
                    return Err(JErr::Eof);
                }
            } else {
                let raw = &self.b[s..self.i];
                self.i += 1;
                return Ok((raw, esc));
            }
        }
    }
    fn literal(&mut self) -> Result<&'a [u8], JErr> {
        let s = self.i;
        while self.i < self.b.len()
            && (self.b[self.i].is_ascii_alphanumeric()
                || matches!(self.b[self.i], b'-' | b'+' | b'.'))
        {
            self.i += 1;
        }
        if self.i == self.b.len() {
            return Err(JErr::Eof);
        }
        if self.i == s {
            return Err(JErr::Bad);
        }
        Ok(&self.b[s..self.i])
    }
    /// Skips any value; returns the item count when it was an array.
    fn skip(&mut self, depth: u32) -> Result<u32, JErr> {
        if depth > JSON_DEPTH_MAX {
            return Err(JErr::Bad);
        }
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string()?;
                Ok(0)
            }
            b'{' => {
                self.i += 1;
                self.object(depth + 1, &mut |_, _| {})?;
                Ok(0)
            }
            b'[' => {
                self.i += 1;
                let mut n = 0;
                loop {
                    self.ws();
                    if self.peek()? == b']' {
                        self.i += 1;
                        return Ok(n);
                    }
                    self.skip(depth + 1)?;
                    n += 1;
                    self.ws();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Ok(n);
                        }
                        _ => return Err(JErr::Bad),
                    }
                }
            }
            _ => {
                self.literal()?;
                Ok(0)
            }
        }
    }
    /// After the opening brace.
    pub(super) fn object(
        &mut self,
        depth: u32,
        f: &mut dyn FnMut(&'a [u8], Val<'a>),
    ) -> Result<(), JErr> {
        if depth > JSON_DEPTH_MAX {
            return Err(JErr::Bad);
        }
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return Err(JErr::Bad);
            }
            self.i += 1;
            let (key, _) = self.string()?;
            self.ws();
            if self.peek()? != b':' {
                return Err(JErr::Bad);
            }
            self.i += 1;
            self.ws();
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    let start = self.i - 1;
                    let (raw, esc) = self.string()?;
                    if esc {
                        let quoted = &self.b[start..self.i];
                        match serde_json::from_slice::<String>(quoted) {
                            Ok(s) => f(key, Val::Owned(s.into_bytes())),
                            Err(_) => return Err(JErr::Bad),
                        }
                    } else {
                        f(key, Val::Raw(raw));
                    }
                }
                b'{' => {
                    self.i += 1;
                    self.object(depth + 1, f)?;
                }
                b'[' => {
                    let n = self.skip(depth + 1)?;
                    f(key, Val::Count(n));
                }
                _ => {
                    let lit = self.literal()?;
                    if lit != b"null" {
                        f(key, Val::Raw(lit));
                    }
                }
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(JErr::Bad),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::quote_or_escape;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// The word-at-a-time search finds what `memchr2` finds, at every length and position
        /// (bytes drawn mostly from the two it looks for and their neighbours in every bit).
        #[test]
        fn finds_what_memchr2_finds(b in prop::collection::vec(
            prop_oneof![Just(b'"'), Just(b'\\'), Just(b'!'), Just(b'#'), Just(0xa2u8), Just(0xdcu8), any::<u8>()],
            0..40,
        ), skip in 0usize..40) {
            let b = &b[skip.min(b.len())..];
            prop_assert_eq!(quote_or_escape(b), memchr::memchr2(b'"', b'\\', b));
        }
    }
}
