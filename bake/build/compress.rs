//! Compressing a layer tar into a blob while computing its DiffID, digest and size in the same
//! streaming pass (FORMATS.md A3): tar bytes → sha256 (DiffID) → compressor → sha256 + byte
//! count (digest, size) → the output. Nothing is ever re-read.
//!
//! Compressed bytes define the layer digest, so every knob that changes them is fixed here and
//! named in [`Blob::compressor`] for the build record:
//!
//! - gzip is deflate from zlib-rs (the one backend pinned in `Cargo.toml`), compressed in
//!   parallel pigz-style: the input is cut into [`GZIP_CHUNK`]-sized chunks, each compressed on
//!   its own (primed with the previous chunk's last [`DEFLATE_WINDOW`] bytes) and ended with a
//!   sync flush, and the pieces are concatenated into one gzip member. Chunk boundaries depend
//!   only on the input, so the bytes are the same for any number of workers.
//!   zlib-rs's level 1 is its "quick" strategy: about 20% larger output than GNU gzip's level 1
//!   (ratio 0.357 against 0.298 on a tar of `/usr/include` and `/usr/sbin`), at twice the speed.
//! - zstd is libzstd's multithreaded mode, which produces the same frame for any number of
//!   workers ≥ 1 (but a different one for 0, the single-threaded mode, so it is never used).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, FlushCompress};
use oci_spec::image::{Digest, MediaType, Sha256Digest};
use sha2::{Digest as _, Sha256};

use crate::recipe::Compression;

/// Size of the independently compressed gzip chunks. Large enough that the per-chunk sync
/// marker (5 bytes) and the restarted compressor cost nothing measurable (level 6 on a 228 MB
/// tar of `/usr/include` and `/usr/sbin`: ratio 0.2592 chunked, 0.2593 as one stream); small
/// enough that a pool of workers has work on layers of a few MiB. Changing it changes every
/// gzip layer digest.
pub const GZIP_CHUNK: usize = 1 << 20;

/// Deflate's window: a chunk is primed with this much of the previous chunk's input so that
/// matches can reach back across the chunk boundary, as pigz does (same tar: ratio 0.2598
/// without priming, 0.2592 with it, at no measurable cost in speed).
pub const DEFLATE_WINDOW: usize = 32 << 10;

/// Chunks in flight (queued, compressing, or compressed and waiting their turn) per worker.
/// Two keeps every worker busy while the writer drains results in order, and bounds memory to
/// about `2 × workers × 2 MiB`.
const IN_FLIGHT_PER_WORKER: usize = 2;

/// The version of the deflate engine behind flate2. Kept by hand because flate2 does not expose
/// it; a unit test checks it against `Cargo.lock`, so a dependency update that would silently
/// change gzip digests fails the tests instead.
const ZLIB_RS_VERSION: &str = "0.6.8";

/// The raw-deflate bytes of an empty final block (fixed Huffman, BFINAL set, end-of-block
/// only): what ends the concatenation of sync-flushed chunks.
const DEFLATE_FINAL_EMPTY_BLOCK: [u8; 2] = [0x03, 0x00];

/// The gzip header with no name, no comment, mtime 0 and OS 255 ("unknown"), so that it says
/// nothing about the host or the time. Byte 8 (XFL) is filled in from the level.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 0x08, 0x00, 0, 0, 0, 0, 0x00, 0xff];

/// A compressed layer blob and its identities.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Blob {
    /// `sha256:` of the uncompressed tar: goes into the image config's `rootfs.diff_ids`.
    pub diff_id: Digest,
    /// `sha256:` of the compressed bytes: the blob's name and its manifest descriptor digest.
    pub digest: Digest,
    /// Length of the compressed bytes.
    pub size: u64,
    /// Length of the uncompressed tar.
    pub uncompressed_size: u64,
    /// `application/vnd.oci.image.layer.v1.tar+gzip` or `…+zstd`.
    pub media_type: MediaType,
    /// Everything that determines the compressed bytes besides the input, such as
    /// `gzip/zlib-rs-0.6.8/level6/chunk1MiB/dict32KiB`, for the build record.
    pub compressor: String,
}

/// A failure to compress a layer. The output's own errors come through as [`Self::Write`].
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("failed to write the compressed layer")]
    Write(#[source] io::Error),
    #[error("failed to set up the {algorithm} compressor at level {level}")]
    Setup {
        algorithm: &'static str,
        level: i32,
        #[source]
        source: io::Error,
    },
}

/// The OCI media type of a layer compressed with `compression`.
pub fn media_type(compression: Compression) -> MediaType {
    match compression {
        Compression::Gzip(_) => MediaType::ImageLayerGzip,
        Compression::Zstd(_) => MediaType::ImageLayerZstd,
    }
}

/// A [`Write`] that takes a layer tar and writes the compressed blob to `W`.
///
/// Call [`BlobWriter::finish`] at the end: dropping it loses the end of the stream.
pub struct BlobWriter<W: Write> {
    diff_id: Sha256,
    uncompressed_size: u64,
    encoder: Encoder<W>,
    media_type: MediaType,
    compressor: String,
    /// Uncompressed bytes written, told in [`crate::progress::STEP`]s.
    progress: Option<(crate::progress::Task, u64)>,
}

enum Encoder<W: Write> {
    Gzip(ParallelGzip<Hashing<W>>),
    Zstd(zstd::stream::write::Encoder<'static, Hashing<W>>),
}

impl<W: Write> BlobWriter<W> {
    /// Starts a blob on `out`, compressing with `workers` threads. The compressed bytes do not
    /// depend on `workers`.
    pub fn new(
        out: W,
        compression: Compression,
        workers: NonZeroUsize,
    ) -> Result<Self, CompressError> {
        let out = Hashing::new(out);
        let (encoder, compressor) = match compression {
            Compression::Gzip(level) => {
                // zlib levels stop at 9; the recipe validates 1 to 9 already.
                let level = level.min(9);
                (
                    Encoder::Gzip(ParallelGzip::new(out, level, workers)),
                    format!(
                        "gzip/zlib-rs-{ZLIB_RS_VERSION}/level{level}/chunk{}KiB/dict{}KiB/stored-above-{STORE_ABOVE_BITS_PER_BYTE}bits",
                        GZIP_CHUNK >> 10,
                        DEFLATE_WINDOW >> 10
                    ),
                )
            }
            Compression::Zstd(level) => {
                let setup = |source| CompressError::Setup {
                    algorithm: "zstd",
                    level,
                    source,
                };
                let mut encoder = zstd::stream::write::Encoder::new(out, level).map_err(setup)?;
                // Workers ≥ 1 always: 0 selects the single-threaded code path, whose frames
                // differ from the multithreaded one's.
                let threads = u32::try_from(workers.get()).unwrap_or(u32::MAX);
                encoder.multithread(threads).map_err(setup)?;
                encoder.include_checksum(true).map_err(setup)?;
                (
                    Encoder::Zstd(encoder),
                    format!(
                        "zstd/libzstd-{}/level{level}/multithreaded/checksum",
                        zstd::zstd_safe::version_string()
                    ),
                )
            }
        };
        Ok(Self {
            diff_id: Sha256::new(),
            uncompressed_size: 0,
            encoder,
            media_type: media_type(compression),
            compressor,
            progress: None,
        })
    }

    /// Shows the uncompressed bytes written (and their rate) as `task`'s progress.
    pub fn with_progress(mut self, task: crate::progress::Task) -> Self {
        self.progress = Some((task, 0));
        self
    }

    /// Ends the compressed stream and returns the output and the blob's identities.
    pub fn finish(self) -> Result<(W, Blob), CompressError> {
        if let Some((task, pending)) = &self.progress {
            task.inc(*pending);
        }
        let hashing = match self.encoder {
            Encoder::Gzip(gzip) => gzip.finish(),
            Encoder::Zstd(zstd) => zstd.finish(),
        }
        .map_err(CompressError::Write)?;
        let (out, digest, size) = hashing.finish();
        let blob = Blob {
            diff_id: sha256_digest(self.diff_id),
            digest,
            size,
            uncompressed_size: self.uncompressed_size,
            media_type: self.media_type,
            compressor: self.compressor,
        };
        Ok((out, blob))
    }
}

impl<W: Write> Write for BlobWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.encoder {
            Encoder::Gzip(gzip) => gzip.write(buf)?,
            Encoder::Zstd(zstd) => zstd.write(buf)?,
        };
        self.diff_id.update(&buf[..n]);
        self.uncompressed_size += n as u64;
        if let Some((task, pending)) = &mut self.progress {
            *pending += n as u64;
            if *pending >= crate::progress::STEP {
                task.inc(std::mem::take(pending));
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Flushing a compressor mid-stream would change the bytes; only the output is flushed.
        match &mut self.encoder {
            Encoder::Gzip(gzip) => gzip.out.flush(),
            Encoder::Zstd(zstd) => zstd.get_mut().flush(),
        }
    }
}

/// `sha256:<hex>` of what a hasher has seen.
pub(crate) fn sha256_digest(hasher: Sha256) -> Digest {
    let hex = hex::encode(hasher.finalize());
    Sha256Digest::from_str(&hex)
        .expect("64 lowercase hex digits are a valid sha256 digest")
        .into()
}

/// Passes bytes through to `W`, hashing and counting them.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(self) -> (W, Digest, u64) {
        (self.inner, sha256_digest(self.hasher), self.size)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One chunk's work: its input, the input that precedes it (the dictionary), and where to send
/// the compressed bytes.
struct Job {
    input: Vec<u8>,
    dictionary: Vec<u8>,
    level: u32,
    done: SyncSender<io::Result<Vec<u8>>>,
}

/// pigz-style gzip: one member whose deflate stream is the concatenation of independently
/// compressed, sync-flushed chunks, compressed by a pool of threads and written in order.
struct ParallelGzip<W: Write> {
    out: W,
    level: u32,
    crc: crc32fast::Hasher,
    length: u64,
    /// The chunk being filled.
    buffer: Vec<u8>,
    /// The last [`DEFLATE_WINDOW`] bytes of the previous chunk.
    window: Vec<u8>,
    /// Results of dispatched chunks, oldest first.
    pending: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_pending: usize,
    pool: Pool,
    header_written: bool,
}

impl<W: Write> ParallelGzip<W> {
    fn new(out: W, level: u32, workers: NonZeroUsize) -> Self {
        Self {
            out,
            level,
            crc: crc32fast::Hasher::new(),
            length: 0,
            buffer: Vec::with_capacity(GZIP_CHUNK),
            window: Vec::new(),
            pending: VecDeque::new(),
            max_pending: IN_FLIGHT_PER_WORKER * workers.get(),
            pool: Pool::new(workers),
            header_written: false,
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(GZIP_CHUNK - self.buffer.len());
        self.buffer.extend_from_slice(&buf[..n]);
        self.crc.update(&buf[..n]);
        self.length += n as u64;
        if self.buffer.len() == GZIP_CHUNK {
            self.dispatch()?;
        }
        Ok(n)
    }

    fn write_header(&mut self) -> io::Result<()> {
        if !self.header_written {
            let mut header = GZIP_HEADER;
            // XFL as zlib sets it: 2 for the slowest level, 4 for the fastest.
            header[8] = match self.level {
                9 => 2,
                0 | 1 => 4,
                _ => 0,
            };
            self.out.write_all(&header)?;
            self.header_written = true;
        }
        Ok(())
    }

    /// Hands the full buffer to the pool, then writes finished chunks while too many are in
    /// flight.
    fn dispatch(&mut self) -> io::Result<()> {
        let input = std::mem::replace(&mut self.buffer, Vec::with_capacity(GZIP_CHUNK));
        let dictionary = std::mem::take(&mut self.window);
        self.window = input[input.len().saturating_sub(DEFLATE_WINDOW)..].to_vec();
        let (done, result) = mpsc::sync_channel(1);
        self.pool.submit(Job {
            input,
            dictionary,
            level: self.level,
            done,
        })?;
        self.pending.push_back(result);
        while self.pending.len() >= self.max_pending {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(result) = self.pending.pop_front() {
            let compressed = result
                .recv()
                .map_err(|_| io::Error::other("a gzip worker thread panicked"))??;
            self.write_header()?;
            self.out.write_all(&compressed)?;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        if !self.buffer.is_empty() {
            self.dispatch()?;
        }
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.write_header()?;
        self.out.write_all(&DEFLATE_FINAL_EMPTY_BLOCK)?;
        self.out
            .write_all(&self.crc.clone().finalize().to_le_bytes())?;
        // ISIZE is the input length modulo 2^32 (RFC 1952): the truncation is the format.
        self.out.write_all(&(self.length as u32).to_le_bytes())?;
        Ok(self.out)
    }
}

/// Worker threads taking [`Job`]s from one bounded queue. Dropping the pool closes the queue
/// and joins the threads.
struct Pool {
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(workers: NonZeroUsize) -> Self {
        let (jobs, queue) = mpsc::sync_channel::<Job>(workers.get());
        let queue = Arc::new(Mutex::new(queue));
        let workers = (0..workers.get())
            .map(|_| {
                let queue = Arc::clone(&queue);
                std::thread::spawn(move || {
                    loop {
                        // The lock is held only to take a job, not while compressing.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let result = deflate_chunk(&job.input, &job.dictionary, job.level);
                        // The writer may have gone away after an error: nobody to tell.
                        let _ = job.done.send(result);
                    }
                })
            })
            .collect();
        Self {
            jobs: Some(jobs),
            workers,
        }
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.jobs
            .as_ref()
            .expect("the queue is open until the pool drops")
            .send(job)
            .map_err(|_| io::Error::other("the gzip worker threads have stopped"))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Above this byte entropy (bits per byte) a chunk is stored, not searched: random data,
/// already-compressed files and encrypted blobs sit at 7.99–8.0 and deflate cannot shrink them,
/// yet its match search costs as much CPU as on text (text and binaries are below 7). The choice
/// depends only on the chunk's bytes, so the output stays independent of the worker count.
const STORE_ABOVE_BITS_PER_BYTE: f64 = 7.99;

/// Shannon entropy of `data` in bits per byte.
fn entropy(data: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum()
}

/// `input` as deflate stored blocks (BFINAL=0), starting and ending on a byte boundary, like
/// the sync-flushed output of [`deflate_chunk`].
fn stored_blocks(input: &[u8]) -> Vec<u8> {
    /// A stored block holds at most 65,535 bytes (its length is 16 bits).
    const MAX_STORED: usize = 65_535;
    let mut out = Vec::with_capacity(input.len() + input.len() / MAX_STORED * 5 + 5);
    for piece in input.chunks(MAX_STORED) {
        let len = piece.len() as u16;
        // Header bits BFINAL=0, BTYPE=00, then padding to the byte boundary: one zero byte.
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(piece);
    }
    out
}

/// Raw deflate of one chunk, primed with `dictionary`, ended with a sync flush (an empty stored
/// block) so that it ends on a byte boundary and the next chunk's bytes can follow it.
/// Incompressible chunks are stored as they are (see [`STORE_ABOVE_BITS_PER_BYTE`]).
fn deflate_chunk(input: &[u8], dictionary: &[u8], level: u32) -> io::Result<Vec<u8>> {
    if !input.is_empty() && entropy(input) > STORE_ABOVE_BITS_PER_BYTE {
        return Ok(stored_blocks(input));
    }
    let mut deflate = Compress::new(flate2::Compression::new(level), false);
    if !dictionary.is_empty() {
        deflate
            .set_dictionary(dictionary)
            .map_err(io::Error::other)?;
    }
    // Incompressible input grows by a few bytes per 16 KiB block; start with room for that.
    let mut out = Vec::with_capacity(input.len() + input.len() / 64 + 64);
    loop {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity() / 2 + 64);
        }
        let consumed = deflate.total_in() as usize;
        deflate
            .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        // zlib's rule: the flush is complete once a call returns with output space left over.
        if deflate.total_in() as usize == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    #[test]
    fn random_chunks_are_stored_and_still_decompress() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let random: Vec<u8> = (0..(3 << 20))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert!(entropy(&random[..GZIP_CHUNK]) > STORE_ABOVE_BITS_PER_BYTE);
        assert!(
            entropy(b"a text chunk with words and words and words") < STORE_ABOVE_BITS_PER_BYTE
        );
        let mut input = b"compressible text, ".repeat(100_000);
        input.extend_from_slice(&random);
        for workers in [1usize, 2] {
            let mut writer = BlobWriter::new(
                Vec::new(),
                Compression::Gzip(6),
                NonZeroUsize::new(workers).unwrap(),
            )
            .unwrap();
            std::io::Write::write_all(&mut writer, &input).unwrap();
            let (bytes, blob) = writer.finish().unwrap();
            // The random part is stored: barely bigger than itself.
            assert!(blob.size < random.len() as u64 + 200_000, "{}", blob.size);
            let mut decoded = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut decoded)
                .unwrap();
            assert!(
                decoded == input,
                "the stored chunks do not decode to the input"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::process::{Command, Stdio};

    use super::*;

    /// Deterministic test data: runs of text-like, compressible bytes alternating with runs of
    /// pseudo-random bytes, so that chunks compress to different sizes.
    fn mixed_data(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let words: [&[u8]; 6] = [
            b"usr/lib/",
            b"libc.so.6 ",
            b"#!/bin/sh\n",
            b"\0\0\0\0",
            b"ELF",
            b"x86_64 ",
        ];
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let run = (next() % 40_000) as usize;
            if next() % 3 == 0 {
                out.extend((0..run).map(|_| next() as u8));
            } else {
                for _ in 0..run / 8 {
                    out.extend_from_slice(words[(next() % 6) as usize]);
                }
            }
        }
        out.truncate(len);
        out
    }

    fn compress(data: &[u8], compression: Compression, workers: usize) -> (Vec<u8>, Blob) {
        let workers = NonZeroUsize::new(workers).unwrap();
        let mut writer = BlobWriter::new(Vec::new(), compression, workers).unwrap();
        // Odd write sizes: chunking must not depend on how the caller writes.
        for piece in data.chunks(77_777) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap()
    }

    fn sha256(bytes: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
    }

    /// Has the command-line `tool` test `bytes` (`-t`), an independent decoder.
    fn external_test(tool: &str, bytes: &[u8]) {
        if !crate::skip::tool(tool) {
            return;
        }
        let mut child = Command::new(tool)
            .args(["-t", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        assert!(
            child.wait().unwrap().success(),
            "`{tool} -t` rejected the output"
        );
    }

    #[test]
    fn gzip_is_identical_for_any_worker_count_and_decompresses_to_the_input() {
        // Four full chunks and a partial one.
        let data = mixed_data(4 * GZIP_CHUNK + 12_345);
        let (one, blob) = compress(&data, Compression::Gzip(6), 1);
        for workers in [2, 4] {
            let (bytes, other) = compress(&data, Compression::Gzip(6), workers);
            assert!(bytes == one, "{workers} workers changed the gzip bytes");
            assert_eq!(other, blob);
        }

        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&one[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded == data, "GzDecoder did not give back the input");
        decoded.clear();
        flate2::read::MultiGzDecoder::new(&one[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(
            decoded == data,
            "MultiGzDecoder did not give back the input"
        );
        external_test("gzip", &one);

        assert_eq!(blob.diff_id.to_string(), sha256(&data));
        assert_eq!(blob.digest.to_string(), sha256(&one));
        assert_eq!(blob.size, one.len() as u64);
        assert_eq!(blob.uncompressed_size, data.len() as u64);
        assert_eq!(blob.media_type, MediaType::ImageLayerGzip);
        assert_eq!(
            blob.compressor,
            format!(
                "gzip/zlib-rs-{ZLIB_RS_VERSION}/level6/chunk1024KiB/dict32KiB/stored-above-7.99bits"
            )
        );
        assert!(one.len() < data.len(), "the test data should compress");
        // The build record takes the blob as JSON.
        let json = serde_json::to_value(&blob).unwrap();
        assert_eq!(json["digest"], blob.digest.to_string());
        assert_eq!(
            json["media_type"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }

    #[test]
    fn gzip_header_says_nothing_about_the_host_or_time() {
        let (bytes, _) = compress(b"hello", Compression::Gzip(1), 2);
        assert_eq!(&bytes[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 0xff]);
        let (bytes, _) = compress(b"hello", Compression::Gzip(9), 2);
        assert_eq!(bytes[8], 2);
    }

    #[test]
    fn gzip_of_nothing_and_of_exactly_one_chunk_are_valid() {
        for data in [Vec::new(), mixed_data(GZIP_CHUNK)] {
            let (bytes, blob) = compress(&data, Compression::Gzip(6), 2);
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut decoded)
                .unwrap();
            assert!(decoded == data);
            assert_eq!(blob.diff_id.to_string(), sha256(&data));
            external_test("gzip", &bytes);
        }
    }

    #[test]
    fn zstd_is_identical_for_any_worker_count_and_decompresses_to_the_input() {
        // Large enough for libzstd to cut several jobs at level 3, so that workers really
        // share the frame.
        let data = mixed_data(24 << 20);
        let (one, blob) = compress(&data, Compression::Zstd(3), 1);
        for workers in [2, 4] {
            let (bytes, other) = compress(&data, Compression::Zstd(3), workers);
            assert!(bytes == one, "{workers} workers changed the zstd bytes");
            assert_eq!(other, blob);
        }
        let decoded = zstd::stream::decode_all(&one[..]).unwrap();
        assert!(decoded == data, "zstd did not give back the input");
        external_test("zstd", &one);
        assert_eq!(blob.diff_id.to_string(), sha256(&data));
        assert_eq!(blob.digest.to_string(), sha256(&one));
        assert_eq!(blob.size, one.len() as u64);
        assert_eq!(blob.media_type, MediaType::ImageLayerZstd);
        assert!(
            blob.compressor.starts_with("zstd/libzstd-1.5."),
            "{}",
            blob.compressor
        );
    }

    #[test]
    fn zlib_rs_version_in_the_build_record_matches_cargo_lock() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
        let entry = format!("name = \"zlib-rs\"\nversion = \"{ZLIB_RS_VERSION}\"");
        assert!(
            lock.contains(&entry),
            "Cargo.lock has another zlib-rs than {ZLIB_RS_VERSION}: gzip layer digests change; \
             update ZLIB_RS_VERSION deliberately"
        );
    }

    #[test]
    fn the_final_empty_block_constant_is_what_deflate_emits() {
        let mut deflate = Compress::new(flate2::Compression::new(6), false);
        let mut out = Vec::with_capacity(64);
        deflate
            .compress_vec(&[], &mut out, FlushCompress::Finish)
            .unwrap();
        assert_eq!(out, DEFLATE_FINAL_EMPTY_BLOCK);
    }
}
