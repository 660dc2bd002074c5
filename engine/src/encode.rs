//! Page batches: classifying, encoding and decoding guest pages (one batch = one application
//! message on a lane).
//!
//! ## Format
//!
//! All integers little-endian.
//!
//! ```text
//! batch  := count:u32 flags:u32(=0) record{count}        (nothing after the last record)
//! record := gpa:u64 epoch:u32 class:u8 0:u8 0:u16 len:u32 payload[len]
//! ```
//!
//! | class | value | payload |
//! |---|---|---|
//! | zero | 1 | none (`len` 0) |
//! | duplicate | 2 | `u32` index of an earlier record of the same batch with the same content (`len` 4) |
//! | compressed | 3 | a zstd frame that decompresses to exactly one page (`0 < len < PAGE_SIZE`; a page zstd does not shrink is sent raw) |
//! | raw | 4 | the page (`len` = `PAGE_SIZE`) |
//! | lz4 | 5 | an LZ4 block that decompresses to exactly one page (`0 < len < PAGE_SIZE`) |
//!
//! Class 0 and unknown classes are rejected, as are non-zero flags or reserved bytes, `count >
//! MAX_BATCH_PAGES`, unaligned addresses and trailing bytes. `gpa` is page aligned; `epoch` is
//! the harvest number the page was read in (DESIGN §4.1: the destination keeps the newest).
//!
//! The decoder validates a whole batch (every header, bound, address, duplicate index, zstd
//! frame and LZ4 block) before it applies any page: a malformed batch writes nothing.
//!
//! Which compressor the encoder uses ([`Codec`]) is the sender's choice, page by page: a
//! decoder accepts any mix.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::ops::{Add, AddAssign};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::memory::PAGE_SIZE;

/// Bytes of the batch header (`count`, `flags`).
pub const BATCH_HEADER_LEN: usize = 8;
/// Bytes of a record header (`gpa`, `epoch`, `class`, reserved, `len`).
pub const RECORD_HEADER_LEN: usize = 20;
/// The most pages a batch may hold; the decoder rejects larger counts before allocating.
pub const MAX_BATCH_PAGES: usize = 4096;
/// Default pages per batch (1 MiB of guest memory).
pub const DEFAULT_BATCH_PAGES: usize = 256;

/// Largest encoding of a batch of `pages` pages (every page raw).
pub const fn max_encoded_len(pages: usize) -> usize {
    BATCH_HEADER_LEN + pages * (RECORD_HEADER_LEN + PAGE_SIZE)
}

/// How a page travels. `0` is never a valid class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageClass {
    /// All zero bytes; no payload.
    Zero = 1,
    /// Same content as an earlier record of the batch; payload is that record's index.
    Dup = 2,
    /// zstd-compressed.
    Zstd = 3,
    /// Sent as is.
    Raw = 4,
    /// LZ4-compressed (block format).
    Lz4 = 5,
}

impl PageClass {
    /// Parses a wire value; `None` for 0 and unknown values.
    pub fn from_wire(v: u8) -> Option<Self> {
        match v {
            1 => Some(PageClass::Zero),
            2 => Some(PageClass::Dup),
            3 => Some(PageClass::Zstd),
            4 => Some(PageClass::Raw),
            5 => Some(PageClass::Lz4),
            _ => None,
        }
    }

    /// The report's name for the class.
    pub fn as_str(self) -> &'static str {
        match self {
            PageClass::Zero => "zero",
            PageClass::Dup => "duplicate",
            PageClass::Zstd => "compressed",
            PageClass::Raw => "raw",
            PageClass::Lz4 => "lz4",
        }
    }

    /// Whether `len` is a valid payload length for this class.
    fn len_ok(self, len: usize) -> bool {
        match self {
            PageClass::Zero => len == 0,
            PageClass::Dup => len == 4,
            PageClass::Zstd | PageClass::Lz4 => len > 0 && len < PAGE_SIZE,
            PageClass::Raw => len == PAGE_SIZE,
        }
    }
}

impl fmt::Display for PageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Pages and wire bytes (record headers included) of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassStats {
    pub pages: u64,
    pub bytes: u64,
}

impl AddAssign for ClassStats {
    fn add_assign(&mut self, o: Self) {
        self.pages += o.pages;
        self.bytes += o.bytes;
    }
}

/// Pages by class and wire bytes of one or more batches (the report's "pages by class").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    pub zero: ClassStats,
    pub duplicate: ClassStats,
    pub compressed: ClassStats,
    pub raw: ClassStats,
    #[serde(default)]
    pub lz4: ClassStats,
    /// Wire bytes of the batches, headers included.
    pub wire_bytes: u64,
    /// Batches counted.
    pub batches: u64,
}

impl BatchStats {
    /// The counters of one class.
    pub fn class(&self, class: PageClass) -> &ClassStats {
        match class {
            PageClass::Zero => &self.zero,
            PageClass::Dup => &self.duplicate,
            PageClass::Zstd => &self.compressed,
            PageClass::Raw => &self.raw,
            PageClass::Lz4 => &self.lz4,
        }
    }

    fn class_mut(&mut self, class: PageClass) -> &mut ClassStats {
        match class {
            PageClass::Zero => &mut self.zero,
            PageClass::Dup => &mut self.duplicate,
            PageClass::Zstd => &mut self.compressed,
            PageClass::Raw => &mut self.raw,
            PageClass::Lz4 => &mut self.lz4,
        }
    }

    fn count(&mut self, class: PageClass, payload_len: usize) {
        let c = self.class_mut(class);
        c.pages += 1;
        c.bytes += (RECORD_HEADER_LEN + payload_len) as u64;
    }

    /// Pages of every class.
    pub fn pages(&self) -> u64 {
        self.zero.pages
            + self.duplicate.pages
            + self.compressed.pages
            + self.raw.pages
            + self.lz4.pages
    }

    /// Compression ratio: guest bytes carried per wire byte (0 when nothing was sent).
    pub fn compression_ratio(&self) -> f64 {
        if self.wire_bytes == 0 {
            0.0
        } else {
            (self.pages() * PAGE_SIZE as u64) as f64 / self.wire_bytes as f64
        }
    }
}

impl AddAssign for BatchStats {
    fn add_assign(&mut self, o: Self) {
        self.zero += o.zero;
        self.duplicate += o.duplicate;
        self.compressed += o.compressed;
        self.raw += o.raw;
        self.lz4 += o.lz4;
        self.wire_bytes += o.wire_bytes;
        self.batches += o.batches;
    }
}

impl Add for BatchStats {
    type Output = Self;
    fn add(mut self, o: Self) -> Self {
        self += o;
        self
    }
}

/// Whether a page is all zero bytes (compared 16 bytes at a time, stopping at the first
/// non-zero 64-byte block).
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(64).all(|block| {
        block
            .chunks_exact(16)
            .map(|w| u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16])))
            .fold(0, |acc, w| acc | w)
            == 0
    })
}

/// How the encoder compresses pages that are neither zero nor duplicates (a page the codec
/// does not shrink goes raw).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// No compression: for lanes faster than the cores can compress.
    Raw,
    /// zstd at [`EncoderConfig::zstd_level`]: the best ratio.
    #[default]
    Zstd,
    /// LZ4: about half zstd's CPU to compress and a fraction to decompress, for a little more
    /// on the wire.
    Lz4,
}

impl Codec {
    /// Every codec, in the order the probe tries them.
    pub const ALL: [Codec; 3] = [Codec::Zstd, Codec::Lz4, Codec::Raw];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::Raw => "raw",
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }

    /// A number for an atomic, and back.
    pub fn to_u8(self) -> u8 {
        self as u8
    }
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Codec::Raw,
            2 => Codec::Lz4,
            _ => Codec::Zstd,
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Tuning of the encoder (STYLE 16).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EncoderConfig {
    /// zstd level. Default 1: fast enough to keep up with a 10 Gbit/s lane per core.
    pub zstd_level: i32,
    /// Send a page identical to an earlier one of the same batch as a reference. Default true.
    pub dedup: bool,
    /// Pages per batch, 1 to [`MAX_BATCH_PAGES`]. Default [`DEFAULT_BATCH_PAGES`].
    pub max_pages: usize,
    /// How pages that are neither zero nor duplicates are compressed. Default zstd.
    pub codec: Codec,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self {
            zstd_level: 1,
            dedup: true,
            max_pages: DEFAULT_BATCH_PAGES,
            codec: Codec::Zstd,
        }
    }
}

/// Errors from the encoder.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("batch is full ({max} pages)")]
    Full { max: usize },
    #[error("gpa {gpa:#x} is not page aligned")]
    UnalignedGpa { gpa: u64 },
}

/// Keys are already xxh3 hashes: use them as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashIndex = HashMap<u64, (u32, usize), BuildHasherDefault<IdentityHasher>>;

/// Builds one batch at a time. Buffers (output, zstd context and scratch, dedup index and the
/// kept pages it compares against) are reused from batch to batch: after the first batches,
/// pushing a page does not allocate.
pub struct BatchEncoder {
    cfg: EncoderConfig,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    out: Vec<u8>,
    count: u32,
    stats: BatchStats,
    /// Compressed output of one page (room for LZ4's worst case).
    scratch: Vec<u8>,
    /// xxh3 of a page → (its record index, its offset in `kept`).
    index: HashIndex,
    /// Bytes of the pages in `index`, for the byte compare before claiming a duplicate.
    kept: Vec<u8>,
}

impl fmt::Debug for BatchEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchEncoder")
            .field("cfg", &self.cfg)
            .field("count", &self.count)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl BatchEncoder {
    /// An empty encoder. `max_pages` is clamped to `1..=MAX_BATCH_PAGES` and `zstd_level` to
    /// zstd's levels. If no zstd context can be had (out of memory), pages that are neither
    /// zero nor duplicates are sent raw: every batch stays valid.
    pub fn new(mut cfg: EncoderConfig) -> Self {
        cfg.max_pages = cfg.max_pages.clamp(1, MAX_BATCH_PAGES);
        let levels = zstd::compression_level_range();
        cfg.zstd_level = cfg.zstd_level.clamp(*levels.start(), *levels.end());
        let compressor = match zstd::bulk::Compressor::new(cfg.zstd_level) {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("no zstd context ({e}): sending pages uncompressed");
                None
            }
        };
        let mut enc = Self {
            compressor,
            out: Vec::with_capacity(max_encoded_len(cfg.max_pages.min(64))),
            count: 0,
            stats: BatchStats::default(),
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            index: HashIndex::default(),
            kept: Vec::new(),
            cfg,
        };
        enc.reset();
        enc
    }

    /// The configuration in use (with `max_pages` clamped).
    pub fn config(&self) -> &EncoderConfig {
        &self.cfg
    }

    /// The codec for the pages pushed from now on.
    pub fn set_codec(&mut self, codec: Codec) {
        self.cfg.codec = codec;
    }

    /// Pages in the current batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the current batch has no page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the current batch holds `max_pages` pages.
    pub fn is_full(&self) -> bool {
        self.len() >= self.cfg.max_pages
    }

    /// Wire bytes of the current batch so far.
    pub fn encoded_len(&self) -> usize {
        self.out.len()
    }

    /// Appends a page read in harvest `epoch`, classified as zero, duplicate (of an earlier page
    /// of this batch, byte-compared), compressed (if the codec shrinks it) or raw.
    pub fn push(
        &mut self,
        gpa: u64,
        epoch: u32,
        page: &[u8; PAGE_SIZE],
    ) -> Result<PageClass, EncodeError> {
        if self.is_full() {
            return Err(EncodeError::Full {
                max: self.cfg.max_pages,
            });
        }
        if gpa % PAGE_SIZE as u64 != 0 {
            return Err(EncodeError::UnalignedGpa { gpa });
        }
        let record = self.count;
        let (class, payload_len) = if is_zero_page(page) {
            put_record(&mut self.out, gpa, epoch, PageClass::Zero, &[]);
            (PageClass::Zero, 0)
        } else {
            let hash = self.cfg.dedup.then(|| xxh3_64(page));
            let earlier = hash
                .and_then(|h| self.index.get(&h))
                .filter(|&&(_, at)| self.kept[at..at + PAGE_SIZE] == page[..]);
            if let Some(&(original, _)) = earlier {
                let payload = original.to_le_bytes();
                put_record(&mut self.out, gpa, epoch, PageClass::Dup, &payload);
                (PageClass::Dup, payload.len())
            } else {
                let compressed = match (self.cfg.codec, &mut self.compressor) {
                    // A destination smaller than the page: zstd fails when it cannot shrink it.
                    (Codec::Zstd, Some(c)) => c
                        .compress_to_buffer(&page[..], &mut self.scratch[..PAGE_SIZE - 1])
                        .ok()
                        .map(|n| (PageClass::Zstd, n)),
                    (Codec::Lz4, _) => lz4_flex::block::compress_into(&page[..], &mut self.scratch)
                        .ok()
                        .map(|n| (PageClass::Lz4, n)),
                    _ => None,
                };
                let sent = match compressed {
                    Some((class, n)) if n > 0 && n < PAGE_SIZE => {
                        let frame = &self.scratch[..n];
                        put_record(&mut self.out, gpa, epoch, class, frame);
                        (class, n)
                    }
                    _ => {
                        put_record(&mut self.out, gpa, epoch, PageClass::Raw, page);
                        (PageClass::Raw, PAGE_SIZE)
                    }
                };
                if let Some(h) = hash {
                    // On a hash collision with different content, the first page keeps the slot.
                    if let Entry::Vacant(e) = self.index.entry(h) {
                        e.insert((record, self.kept.len()));
                        self.kept.extend_from_slice(page);
                    }
                }
                sent
            }
        };
        self.stats.count(class, payload_len);
        self.count += 1;
        Ok(class)
    }

    /// Ends the batch: returns its encoding and statistics, and starts an empty one.
    pub fn finish(&mut self) -> (Vec<u8>, BatchStats) {
        let mut out = Vec::with_capacity(self.out.capacity());
        let stats = self.finish_into(&mut out);
        (out, stats)
    }

    /// Ends the batch into `out` (replacing its content), keeping `out`'s old allocation for
    /// the next batch: a caller that hands buffers back encodes without allocating.
    pub fn finish_into(&mut self, out: &mut Vec<u8>) -> BatchStats {
        self.out[0..4].copy_from_slice(&self.count.to_le_bytes());
        let mut stats = self.stats;
        stats.wire_bytes = self.out.len() as u64;
        stats.batches = 1;
        std::mem::swap(&mut self.out, out);
        self.reset();
        stats
    }

    /// Clears the current batch.
    fn reset(&mut self) {
        self.out.clear();
        self.out.extend_from_slice(&[0; BATCH_HEADER_LEN]);
        self.count = 0;
        self.stats = BatchStats::default();
        self.index.clear();
        self.kept.clear();
    }
}

fn put_record(out: &mut Vec<u8>, gpa: u64, epoch: u32, class: PageClass, payload: &[u8]) {
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&[class as u8, 0, 0, 0]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Where in a batch a truncation was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The batch header.
    Header,
    /// The header of record `index`.
    RecordHeader { index: u32 },
    /// The payload of record `index`.
    Payload { index: u32, gpa: u64 },
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Part::Header => f.write_str("the batch header"),
            Part::RecordHeader { index } => write!(f, "the header of record {index}"),
            Part::Payload { index, gpa } => {
                write!(f, "the payload of record {index} (gpa {gpa:#x})")
            }
        }
    }
}

/// A batch that is not valid. Nothing of it was applied, except for [`DecodeError::Apply`],
/// where the records before `index` were.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("batch truncated in {at}: {need} bytes needed at offset {offset}, {have} left")]
    Truncated {
        at: Part,
        offset: usize,
        need: usize,
        have: usize,
    },
    #[error("batch flags {flags:#x} are not 0")]
    BadFlags { flags: u32 },
    #[error("batch of {count} pages exceeds the limit of {max}")]
    TooManyPages { count: u32, max: usize },
    #[error("record {index} (gpa {gpa:#x}): unknown page class {class}")]
    UnknownClass { index: u32, gpa: u64, class: u8 },
    #[error("record {index} (gpa {gpa:#x}): reserved header bytes are not 0")]
    Reserved { index: u32, gpa: u64 },
    #[error("record {index} (gpa {gpa:#x}): length {len} is not valid for a {class} page")]
    BadLength {
        index: u32,
        gpa: u64,
        class: PageClass,
        len: u32,
    },
    #[error("record {index}: gpa {gpa:#x} is not page aligned")]
    UnalignedGpa { index: u32, gpa: u64 },
    #[error("record {index}: gpa {gpa:#x} is outside guest memory")]
    GpaOutsideMemory { index: u32, gpa: u64 },
    #[error("record {index} (gpa {gpa:#x}): duplicate of record {target}, not an earlier record")]
    BadDupIndex { index: u32, gpa: u64, target: u32 },
    #[error("record {index} (gpa {gpa:#x}): zstd frame does not decompress to a page")]
    Zstd {
        index: u32,
        gpa: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "record {index} (gpa {gpa:#x}): zstd frame decompresses to {size} bytes, not {PAGE_SIZE}"
    )]
    ZstdSize { index: u32, gpa: u64, size: usize },
    #[error("record {index} (gpa {gpa:#x}): LZ4 block does not decompress to a page: {why}")]
    Lz4 { index: u32, gpa: u64, why: String },
    #[error("{extra} trailing bytes after the last record")]
    TrailingBytes { extra: usize },
    #[error("record {index} (gpa {gpa:#x}): applying the page")]
    Apply {
        index: u32,
        gpa: u64,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

/// Where a validated record's content is.
#[derive(Debug, Clone, Copy)]
enum Content {
    Zero,
    /// Offset of a raw page in the batch.
    Raw(usize),
    /// Offset of a decompressed page in the decoder's page buffer.
    Inflated(usize),
}

#[derive(Debug, Clone, Copy)]
struct Checked {
    gpa: u64,
    epoch: u32,
    content: Content,
}

/// Little-endian reader over a batch that names the part it fails in.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, at: Part) -> Result<&'a [u8], DecodeError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(DecodeError::Truncated {
                at,
                offset: self.pos,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Decodes batches, reusing its zstd context and decompressed-page buffer from batch to batch.
#[derive(Default)]
pub struct BatchDecoder {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    records: Vec<Checked>,
    /// Decompressed pages of the current batch, `PAGE_SIZE` each.
    pages: Vec<u8>,
}

impl fmt::Debug for BatchDecoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchDecoder").finish_non_exhaustive()
    }
}

impl BatchDecoder {
    /// A decoder with empty buffers (the zstd context is created on the first compressed page).
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates a whole batch, then calls `apply(gpa, epoch, page)` for each record in order.
    ///
    /// `check_gpa(gpa)` says whether the page `[gpa, gpa + PAGE_SIZE)` lies in guest memory;
    /// it is called once per record during validation, before any `apply`. If the batch is
    /// malformed, `apply` is never called. If `apply` fails, decoding stops there with
    /// [`DecodeError::Apply`].
    pub fn decode<E>(
        &mut self,
        payload: &[u8],
        check_gpa: impl Fn(u64) -> bool,
        mut apply: impl FnMut(u64, u32, &[u8; PAGE_SIZE]) -> Result<(), E>,
    ) -> Result<BatchStats, DecodeError>
    where
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let stats = self.validate(payload, check_gpa)?;
        for (index, rec) in self.records.iter().enumerate() {
            let page = match rec.content {
                Content::Zero => &ZERO_PAGE,
                Content::Raw(at) => page_at(payload, at),
                Content::Inflated(at) => page_at(&self.pages, at),
            };
            apply(rec.gpa, rec.epoch, page).map_err(|e| DecodeError::Apply {
                index: index as u32,
                gpa: rec.gpa,
                source: e.into(),
            })?;
        }
        Ok(stats)
    }

    /// Checks every record and decompresses zstd and LZ4 pages into `self.pages`; fills
    /// `self.records`.
    fn validate(
        &mut self,
        payload: &[u8],
        check_gpa: impl Fn(u64) -> bool,
    ) -> Result<BatchStats, DecodeError> {
        self.records.clear();
        let mut r = Reader {
            buf: payload,
            pos: 0,
        };
        let header = r.take(BATCH_HEADER_LEN, Part::Header)?;
        let (count, flags) = (le_u32(&header[0..4]), le_u32(&header[4..8]));
        if flags != 0 {
            return Err(DecodeError::BadFlags { flags });
        }
        if count as usize > MAX_BATCH_PAGES {
            return Err(DecodeError::TooManyPages {
                count,
                max: MAX_BATCH_PAGES,
            });
        }
        // Every record has at least a header: a count the payload cannot hold fails here,
        // before anything is allocated for it.
        let min_len = BATCH_HEADER_LEN + count as usize * RECORD_HEADER_LEN;
        if payload.len() < min_len {
            return Err(DecodeError::Truncated {
                at: Part::Header,
                offset: BATCH_HEADER_LEN,
                need: min_len - BATCH_HEADER_LEN,
                have: payload.len() - BATCH_HEADER_LEN,
            });
        }
        self.records.reserve(count as usize);
        let mut stats = BatchStats {
            wire_bytes: payload.len() as u64,
            batches: 1,
            ..BatchStats::default()
        };
        let mut inflated = 0;
        for index in 0..count {
            let h = r.take(RECORD_HEADER_LEN, Part::RecordHeader { index })?;
            let gpa = le_u64(&h[0..8]);
            let epoch = le_u32(&h[8..12]);
            let (class, reserved, len) = (h[12], &h[13..16], le_u32(&h[16..20]));
            let Some(class) = PageClass::from_wire(class) else {
                return Err(DecodeError::UnknownClass { index, gpa, class });
            };
            if reserved != [0, 0, 0] {
                return Err(DecodeError::Reserved { index, gpa });
            }
            if gpa % PAGE_SIZE as u64 != 0 {
                return Err(DecodeError::UnalignedGpa { index, gpa });
            }
            if !check_gpa(gpa) {
                return Err(DecodeError::GpaOutsideMemory { index, gpa });
            }
            if !class.len_ok(len as usize) {
                return Err(DecodeError::BadLength {
                    index,
                    gpa,
                    class,
                    len,
                });
            }
            let at = r.pos;
            let body = r.take(len as usize, Part::Payload { index, gpa })?;
            let content = match class {
                PageClass::Zero => Content::Zero,
                PageClass::Raw => Content::Raw(at),
                PageClass::Dup => {
                    let target = le_u32(body);
                    if target >= index {
                        return Err(DecodeError::BadDupIndex { index, gpa, target });
                    }
                    self.records[target as usize].content
                }
                PageClass::Zstd | PageClass::Lz4 => {
                    let at = inflated * PAGE_SIZE;
                    if self.pages.len() < at + PAGE_SIZE {
                        self.pages.resize(at + PAGE_SIZE, 0);
                    }
                    let out = &mut self.pages[at..at + PAGE_SIZE];
                    if class == PageClass::Zstd {
                        inflate_zstd(&mut self.dctx, body, out)
                            .map_err(|source| DecodeError::Zstd { index, gpa, source })
                            .and_then(|size| match size {
                                PAGE_SIZE => Ok(()),
                                size => Err(DecodeError::ZstdSize { index, gpa, size }),
                            })?;
                    } else {
                        match lz4_flex::block::decompress_into(body, out) {
                            Ok(PAGE_SIZE) => {}
                            Ok(size) => {
                                let why = format!("{size} bytes, not {PAGE_SIZE}");
                                return Err(DecodeError::Lz4 { index, gpa, why });
                            }
                            Err(e) => {
                                let why = e.to_string();
                                return Err(DecodeError::Lz4 { index, gpa, why });
                            }
                        }
                    }
                    inflated += 1;
                    Content::Inflated(at)
                }
            };
            stats.count(class, len as usize);
            self.records.push(Checked {
                gpa,
                epoch,
                content,
            });
        }
        let extra = payload.len() - r.pos;
        if extra != 0 {
            return Err(DecodeError::TrailingBytes { extra });
        }
        Ok(stats)
    }
}

/// Decompresses one zstd frame into `out` (one page), creating the context on first use;
/// returns its size. A frame larger than a page fails.
fn inflate_zstd(
    dctx: &mut Option<zstd::bulk::Decompressor<'static>>,
    frame: &[u8],
    out: &mut [u8],
) -> io::Result<usize> {
    let dctx = match dctx {
        Some(d) => d,
        slot => slot.insert(zstd::bulk::Decompressor::new()?),
    };
    dctx.decompress_to_buffer(frame, out)
}

fn page_at(buf: &[u8], at: usize) -> &[u8; PAGE_SIZE] {
    buf[at..at + PAGE_SIZE]
        .try_into()
        .expect("validated records hold whole pages")
}

/// Decodes one batch with a fresh [`BatchDecoder`]; see [`BatchDecoder::decode`]. Receivers
/// that decode many batches keep a `BatchDecoder` to reuse its buffers.
pub fn decode_batch<E>(
    payload: &[u8],
    check_gpa: impl Fn(u64) -> bool,
    apply: impl FnMut(u64, u32, &[u8; PAGE_SIZE]) -> Result<(), E>,
) -> Result<BatchStats, DecodeError>
where
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    BatchDecoder::new().decode(payload, check_gpa, apply)
}

#[cfg(test)]
mod tests;
