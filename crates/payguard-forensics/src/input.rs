//! Input sources: paths to files, folders, `.gz`/`.zst` files and stdin, read as newline-aligned chunks.
//!
//! Why: forensics must stream inputs far larger than memory and must keep going when one file is
//! damaged. A source reads a bounded chunk at a time (`read_chunk_bytes`), keeps the partial last
//! line for the next chunk, and on a read or decompression error keeps what it read so far and
//! records the error instead of failing the run.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::ForensicsError;
use crate::limits::{LOG_LINE_BYTES_MAX, PARSE_PIECE_BYTES, READ_CHUNK_BYTES};

/// Where a source's bytes come from.
#[derive(Debug, Clone)]
pub enum Origin {
    Path(PathBuf),
    Stdin,
}

/// One input file as named in reports.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// The path as given or found while walking a folder (`-` for stdin).
    pub name: String,
    /// The host of lines without `inst`/`host`: the file name without extensions.
    pub default_host: String,
    pub origin: Origin,
}

/// Lists every input file. A path that does not exist or cannot be opened is an error.
pub fn list_inputs(paths: &[String]) -> Result<Vec<FileInfo>, Vec<ForensicsError>> {
    let mut out = Vec::new();
    let mut errs = Vec::new();
    for p in paths {
        if p == "-" {
            out.push(FileInfo {
                name: "-".into(),
                default_host: "stdin".into(),
                origin: Origin::Stdin,
            });
            continue;
        }
        let path = PathBuf::from(p);
        match std::fs::metadata(&path) {
            Err(e) => errs.push(ForensicsError::Unreadable {
                path,
                reason: e.to_string(),
            }),
            Ok(m) if m.is_dir() => {
                let mut found = Vec::new();
                for entry in walkdir::WalkDir::new(&path)
                    .follow_links(true)
                    .sort_by_file_name()
                {
                    match entry {
                        Ok(e) if e.file_type().is_file() => found.push(e.into_path()),
                        Ok(_) => {}
                        Err(e) => errs.push(ForensicsError::Unreadable {
                            path: e
                                .path()
                                .map(Path::to_path_buf)
                                .unwrap_or_else(|| path.clone()),
                            reason: e.to_string(),
                        }),
                    }
                }
                if found.is_empty() {
                    // Nothing analysed must not read as "no incident".
                    errs.push(ForensicsError::Unreadable {
                        path: path.clone(),
                        reason: "the folder has no files".into(),
                    });
                }
                for f in found {
                    push_file(&mut out, &mut errs, f);
                }
            }
            Ok(_) => push_file(&mut out, &mut errs, path),
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

fn push_file(out: &mut Vec<FileInfo>, errs: &mut Vec<ForensicsError>, path: PathBuf) {
    if let Err(e) = File::open(&path) {
        errs.push(ForensicsError::Unreadable {
            path,
            reason: e.to_string(),
        });
        return;
    }
    out.push(FileInfo {
        name: path.display().to_string(),
        default_host: host_from_path(&path),
        origin: Origin::Path(path),
    });
}

/// `pay-3.log.gz` → `pay-3`; `pay-3.log.1` → `pay-3`; `pay-3.jsonl.zst` → `pay-3`.
pub fn host_from_path(path: &Path) -> String {
    let mut name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into());
    const EXTS: [&str; 11] = [
        "gz", "zst", "zstd", "log", "txt", "json", "jsonl", "ndjson", "out", "err", "logfmt",
    ];
    while let Some(dot) = name.rfind('.') {
        if dot == 0 {
            break;
        }
        let ext = &name[dot + 1..];
        let known = EXTS.iter().any(|e| e.eq_ignore_ascii_case(ext))
            || (!ext.is_empty() && ext.bytes().all(|b| b.is_ascii_digit()));
        if !known {
            break;
        }
        name.truncate(dot);
    }
    name
}

/// A chunk of whole lines from one file, cut into pieces for parallel parsing.
pub struct Chunk {
    pub file: u16,
    pub data: Arc<Vec<u8>>,
    /// Byte ranges of `data`, each ending at a newline (the last may not when the file ends).
    pub pieces: Vec<(usize, usize)>,
    /// Whether this is the file's last chunk.
    pub last: bool,
    /// Lines longer than a whole chunk that were dropped while reading it.
    pub overlong_lines: u64,
}

/// A file being read.
pub struct Source {
    pub file: u16,
    origin: Origin,
    reader: Option<Box<dyn Read + Send>>,
    carry: Vec<u8>,
    /// Nothing more will come from this source.
    pub done: bool,
    /// Decompressed bytes handed out in chunks so far.
    pub bytes_read: u64,
    /// Bytes a chunk is filled to (`read_chunk_bytes`, or less for a short clock sample).
    chunk_bytes: usize,
    /// A read or decompression error; the bytes before it were analysed.
    pub error: Option<String>,
    /// Inside a line longer than a chunk: drop bytes until the next newline.
    skipping_long: bool,
}

impl Source {
    pub fn new(file: u16, info: &FileInfo) -> Self {
        Source {
            file,
            origin: info.origin.clone(),
            reader: None,
            carry: Vec::new(),
            done: false,
            bytes_read: 0,
            chunk_bytes: READ_CHUNK_BYTES,
            error: None,
            skipping_long: false,
        }
    }

    fn open(&self) -> std::io::Result<Box<dyn Read + Send>> {
        let raw: Box<dyn Read + Send> = match &self.origin {
            Origin::Stdin => Box::new(std::io::stdin()),
            Origin::Path(p) => Box::new(File::open(p)?),
        };
        let mut br = BufReader::with_capacity(256 * 1024, raw);
        // Decompress by content, not by name: a rotated `.log` may well be gzip.
        let head = br.fill_buf()?;
        if head.starts_with(&[0x1f, 0x8b]) {
            Ok(Box::new(flate2::read::MultiGzDecoder::new(br)))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
        } else {
            Ok(Box::new(br))
        }
    }

    /// Reads the next chunk; `None` when the source is finished.
    pub fn read_chunk(&mut self) -> Option<Chunk> {
        if self.done {
            return None;
        }
        if self.reader.is_none() {
            match self.open() {
                Ok(r) => self.reader = Some(r),
                Err(e) => {
                    self.error = Some(format!("cannot open: {e}"));
                    self.done = true;
                    return Some(self.empty_last());
                }
            }
        }
        let chunk_bytes = self.chunk_bytes;
        let mut buf = take_buffer(chunk_bytes + self.carry.len() + 1);
        buf.append(&mut self.carry);
        let mut overlong = 0u64;
        let mut eof = false;
        let reader = self.reader.as_mut().expect("opened above");
        while buf.len() < chunk_bytes {
            let want = (chunk_bytes - buf.len()) as u64;
            let before = buf.len();
            match reader.by_ref().take(want).read_to_end(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        "truncated or corrupt compressed data"
                    } else {
                        "read error"
                    };
                    self.error = Some(format!("{what}: {e}"));
                    eof = true;
                    break;
                }
            }
            if self.skipping_long {
                match memchr::memchr(b'\n', &buf[before..]) {
                    Some(p) => {
                        buf.drain(..before + p + 1);
                        self.skipping_long = false;
                    }
                    None => buf.truncate(before),
                }
            }
        }
        if eof {
            self.done = true;
            self.reader = None;
        } else {
            match memchr::memrchr(b'\n', &buf) {
                Some(p) => self.carry.extend_from_slice(&buf[p + 1..]),
                None => {
                    // One line fills a whole chunk: far past `log_line_bytes_max`, drop it.
                    overlong += 1;
                    self.skipping_long = true;
                    buf.clear();
                }
            }
            let keep = buf.len() - self.carry.len();
            buf.truncate(keep);
        }
        let pieces = split_pieces(&buf);
        self.bytes_read += buf.len() as u64;
        Some(Chunk {
            file: self.file,
            data: Arc::new(buf),
            pieces,
            last: self.done,
            overlong_lines: overlong,
        })
    }

    /// Fills chunks to about `bytes` from now on (`read_chunk_bytes` at most, and never less
    /// than twice `log_line_bytes_max`, so a line that fits the limit always fits a chunk).
    pub fn set_chunk_bytes(&mut self, bytes: u64) {
        let floor = 2 * LOG_LINE_BYTES_MAX as u64;
        self.chunk_bytes = bytes.clamp(floor, READ_CHUNK_BYTES as u64) as usize;
    }

    fn empty_last(&self) -> Chunk {
        Chunk {
            file: self.file,
            data: Arc::new(Vec::new()),
            pieces: Vec::new(),
            last: true,
            overlong_lines: 0,
        }
    }
}

/// Chunk buffers kept for reuse: a fresh 4 MiB buffer costs page faults on every chunk.
static BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept in [`BUFFERS`] at most.
const READ_BUFFERS_POOLED_MAX: usize = 16;

fn take_buffer(cap: usize) -> Vec<u8> {
    let mut v = BUFFERS
        .lock()
        .ok()
        .and_then(|mut b| b.pop())
        .unwrap_or_default();
    v.clear();
    v.reserve(cap);
    v
}

/// Returns a chunk's buffer once nothing refers to it.
pub fn give_back(v: Vec<u8>) {
    if let Ok(mut b) = BUFFERS.lock() {
        if b.len() < READ_BUFFERS_POOLED_MAX {
            b.push(v);
        }
    }
}

/// Cuts `buf` into ranges of about `parse_piece_bytes`, each ending after a newline.
fn split_pieces(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut s = 0;
    while s < buf.len() {
        let target = (s + PARSE_PIECE_BYTES).min(buf.len());
        let e = if target == buf.len() {
            buf.len()
        } else {
            match memchr::memchr(b'\n', &buf[target..]) {
                Some(p) => target + p + 1,
                None => buf.len(),
            }
        };
        out.push((s, e));
        s = e;
    }
    out
}

// Compile-time check that a maximal line fits in a chunk, so only absurd lines take the drop path.
const _: () = assert!(LOG_LINE_BYTES_MAX < READ_CHUNK_BYTES);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_names() {
        assert_eq!(host_from_path(Path::new("/x/pay-3.log.gz")), "pay-3");
        assert_eq!(host_from_path(Path::new("pay-3.log.1")), "pay-3");
        assert_eq!(host_from_path(Path::new("pay-3.jsonl.zst")), "pay-3");
        assert_eq!(host_from_path(Path::new("incident.txt")), "incident");
        assert_eq!(host_from_path(Path::new("node.a")), "node.a");
    }

    #[test]
    fn pieces_end_at_newlines() {
        let mut buf = Vec::new();
        for i in 0..200_000 {
            buf.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let p = split_pieces(&buf);
        assert!(p.len() > 1);
        assert_eq!(p.last().unwrap().1, buf.len());
        for (s, e) in &p {
            assert_eq!(buf[e - 1], b'\n');
            assert!(s < e);
        }
    }
}
