//! One reading round: which files to read next, and their chunks read and parsed in parallel.
//!
//! Why apart: the choice of files (by watermark, within `read_lead_ms`) is what keeps an order's
//! events from every host arriving close together; it needs the engine's watermarks only.

use std::sync::Arc;

use rayon::prelude::*;

use crate::clock::MS_US;
use crate::input::{Chunk, Source};
use crate::limits::READ_LEAD_MS;
use crate::parse::LineParser;

use super::piece::{parse_piece, ParsedPiece};

/// One piece to parse: file, chunk, byte range, and whether it ends the file.
struct Job(u16, Arc<Vec<u8>>, (usize, usize), bool);

/// Reads one round: every unfinished source that is not ahead of the slowest by more than
/// `read_lead_ms` gives one chunk; all chunks are parsed in parallel.
pub fn read_round(
    sources: &mut [Source],
    parser: &LineParser,
    watermarks: &[Option<i64>],
) -> (Vec<ParsedPiece>, Vec<(u16, u64)>, bool) {
    let min = sources
        .iter()
        .filter(|s| !s.done)
        .filter_map(|s| watermarks.get(s.file as usize).copied().flatten())
        .min();
    let lead = READ_LEAD_MS * MS_US;
    let chosen: Vec<&mut Source> = sources
        .iter_mut()
        .filter(|s| !s.done)
        .filter(
            |s| match (watermarks.get(s.file as usize).copied().flatten(), min) {
                (Some(w), Some(m)) => w <= m + lead,
                _ => true,
            },
        )
        .collect();
    if chosen.is_empty() {
        return (Vec::new(), Vec::new(), false);
    }
    let (parsed, overlong) = read_parse(chosen, parser);
    (parsed, overlong, true)
}

/// One chunk of each chosen source, read and parsed in parallel: the pieces (each marked when
/// it ends its file) and the lines dropped as longer than a chunk, per file. Clock alignment's
/// sampling pass reads with this too, so the merge can take its pieces as they are.
pub fn read_parse(
    mut chosen: Vec<&mut Source>,
    parser: &LineParser,
) -> (Vec<ParsedPiece>, Vec<(u16, u64)>) {
    let chunks: Vec<Chunk> = chosen
        .par_iter_mut()
        .with_max_len(1)
        .filter_map(|s| s.read_chunk())
        .collect();
    let overlong: Vec<(u16, u64)> = chunks
        .iter()
        .filter(|c| c.overlong_lines > 0)
        .map(|c| (c.file, c.overlong_lines))
        .collect();
    let mut jobs: Vec<Job> = Vec::new();
    for c in &chunks {
        let n = c.pieces.len();
        if n == 0 && c.last {
            jobs.push(Job(c.file, Arc::clone(&c.data), (0, 0), true));
        }
        for (i, r) in c.pieces.iter().enumerate() {
            jobs.push(Job(c.file, Arc::clone(&c.data), *r, c.last && i + 1 == n));
        }
    }
    let parsed = jobs
        .par_iter()
        .with_max_len(1)
        .map(|Job(f, d, r, last)| parse_piece(parser, *f, d, *r, *last))
        .collect();
    (parsed, overlong)
}
