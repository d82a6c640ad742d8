//! Measures layer compression throughput by hand: `cargo run --example layer_throughput --
//! <file.tar> [workers]` compresses the file (read into memory first, so the disk is not
//! measured) with gzip levels 1 and 6 and zstd level 3 and prints MB/s and the ratio.
//!
//! Not a test: timings depend on the machine and its load, and tests never assert durations.
//! Build with `--config 'profile.dev.package.bake.opt-level=3'` (or release) for real numbers.

use std::io::Write;
use std::num::NonZeroUsize;
use std::time::Instant;

use bake::build::compress::BlobWriter;
use bake::recipe::Compression;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: layer_throughput <file.tar> [workers]");
    let workers: usize = args
        .next()
        .map_or(2, |w| w.parse().expect("workers is a number"));
    let workers = NonZeroUsize::new(workers).expect("at least one worker");
    let data = fs_err::read(&path).expect("readable input");
    let megabytes = data.len() as f64 / 1e6;
    println!("{path}: {megabytes:.1} MB, {workers} workers");
    for compression in [
        Compression::Gzip(1),
        Compression::Gzip(6),
        Compression::Zstd(3),
    ] {
        let start = Instant::now();
        let mut writer = BlobWriter::new(std::io::sink(), compression, workers).unwrap();
        writer.write_all(&data).unwrap();
        let (_, blob) = writer.finish().unwrap();
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "{:<55} {:>7.1} MB/s  ratio {:.4}  {}",
            blob.compressor,
            megabytes / seconds,
            blob.size as f64 / data.len() as f64,
            blob.digest
        );
    }
}
