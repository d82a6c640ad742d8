//! Uploading a raw disk image into an EBS snapshot through the EBS direct APIs.
//!
//! The image is streamed: a blocking reader walks only the file's data extents (`SEEK_DATA`/
//! `SEEK_HOLE`), reads 512 KiB blocks, skips those that are all zeros, hashes the rest (SHA-256
//! per block, and the linear aggregate over them in block order) and hands them to a bounded
//! channel; up to `concurrency` `PutSnapshotBlock` calls run at once, each bounded by
//! `block_timeout` and retried with backoff (a stalled request is abandoned and sent again,
//! never waited on forever). Memory stays at about `2 × concurrency` blocks whatever the disk
//! size.
//!
//! A snapshot started from a parent (`StartSnapshot`'s `ParentSnapshotId`) reads as the parent
//! wherever it has no block of its own, so only the blocks whose content differs from the
//! parent's are written ([`Baseline`]): compared with the parent's disk image when bake still
//! has it, else with the parent's block checksums. A block that is all zeros in the new image
//! but holds data in the parent is written as zeros: skipping it would leave the parent's data
//! showing through.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Status, Tag};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt as _, StreamExt as _};
use sha2::{Digest as _, Sha256};

use super::wait::{Poll, WaitPolicy, wait_for};
use super::{AwsCallError, sdk_error};
use crate::progress::{Task, Unit};

/// The EBS direct API's block size. Fixed by AWS; never taken from StartSnapshot's answer
/// (emulators answer 512).
pub const BLOCK_SIZE: usize = 512 * 1024;

/// `PutSnapshotBlock` calls in flight. EBS direct allows 1000 requests per second per snapshot;
/// each call is latency-bound (about 30-100 ms on AWS), so 64 keep a 1 Gbit/s link busy while
/// holding at most 128 blocks (64 MiB) in memory.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// Attempts per block on top of the SDK's own retries: a block that still fails after this many
/// is not going to succeed, and the whole upload fails.
pub const BLOCK_ATTEMPTS: u32 = 4;

/// How long one `PutSnapshotBlock` attempt may take before it is abandoned and retried. A
/// 512 KiB block takes well under a second on AWS; this allows a slow link (about 140 kbit/s)
/// while bounding what a request that never answers costs.
pub const DEFAULT_BLOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// The first backoff between block attempts; doubled each time.
const BLOCK_BACKOFF: Duration = Duration::from_millis(200);

/// GiB, for the volume size.
const GIB: u64 = 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("failed to read the disk image `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the disk image `{}` is {size} bytes, more than the {volume_gib} GiB volume it is for",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        volume_gib: u64,
    },
    #[error("failed to start a snapshot in {region}")]
    Start {
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to upload block {index} of snapshot {snapshot_id} after {attempts} attempts")]
    Block {
        snapshot_id: String,
        index: i32,
        attempts: u32,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to complete snapshot {snapshot_id}")]
    Complete {
        snapshot_id: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to read the blocks of parent snapshot {snapshot_id}")]
    ParentBlocks {
        snapshot_id: String,
        #[source]
        source: AwsCallError,
    },
    #[error("snapshot {snapshot_id} did not complete")]
    Wait {
        snapshot_id: String,
        #[source]
        source: super::wait::WaitError,
    },
}

/// The snapshot to start.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    pub volume_size_gib: u64,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub encrypted: bool,
    /// A key ARN (StartSnapshot takes ARNs only; resolve aliases first).
    pub kms_key_arn: Option<String>,
    /// Idempotency token: a repeated StartSnapshot with it returns the same snapshot.
    pub client_token: String,
    /// The snapshot this one starts from. EBS refuses `Encrypted` next to it, and the child is
    /// encrypted as its parent is: `encrypted` and `kms_key_arn` are then not sent (the caller
    /// checked that the parent's encryption is what it wants).
    pub parent_snapshot_id: Option<String>,
}

/// What the new image is compared with, to find the blocks to write.
#[derive(Debug, Clone, Default)]
pub enum Baseline {
    /// An empty snapshot: every non-zero block is written.
    #[default]
    Empty,
    /// The parent snapshot's disk image, here: a block is written where the two images differ,
    /// zeros included.
    Image(PathBuf),
    /// The parent snapshot's blocks, each its base64 SHA-256 (what `GetSnapshotBlock` answers)
    /// by block index: a block is written where its checksum differs from the parent's block
    /// (zeros included), or where the parent has none and it is not all zeros.
    Checksums(BTreeMap<u64, String>),
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlocksWritten {
    /// Blocks sent (`CompleteSnapshot`'s `ChangedBlocksCount`).
    pub changed_blocks: u64,
    /// Of those, all-zero blocks written over a parent's data.
    pub zero_blocks: u64,
    /// Base64 SHA-256 over the blocks' SHA-256 digests in block order (EBS's `LINEAR`).
    pub checksum: String,
}

/// Uploads disk images through one region's EBS direct API.
#[derive(Debug, Clone)]
pub struct SnapshotUploader {
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    region: String,
    pub concurrency: usize,
    /// The limit of one `PutSnapshotBlock` attempt.
    pub block_timeout: Duration,
    pub wait: WaitPolicy,
}

impl SnapshotUploader {
    pub fn new(ebs: aws_sdk_ebs::Client, ec2: aws_sdk_ec2::Client, region: &str) -> Self {
        SnapshotUploader {
            ebs,
            ec2,
            region: region.to_owned(),
            concurrency: DEFAULT_CONCURRENCY,
            block_timeout: DEFAULT_BLOCK_TIMEOUT,
            wait: WaitPolicy::SNAPSHOT,
        }
    }

    /// Starts a snapshot (empty, or reading as its parent); returns its id.
    pub async fn start(&self, request: &SnapshotRequest) -> Result<String, UploadError> {
        let mut call = self
            .ebs
            .start_snapshot()
            .volume_size(request.volume_size_gib as i64)
            .description(&request.description)
            .client_token(&request.client_token)
            .set_tags(Some(
                request
                    .tags
                    .iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ));
        match &request.parent_snapshot_id {
            Some(parent) => call = call.parent_snapshot_id(parent),
            None => {
                call = call.encrypted(request.encrypted);
                if let Some(arn) = &request.kms_key_arn {
                    call = call.kms_key_arn(arn);
                }
            }
        }
        let out = call.send().await.map_err(|e| UploadError::Start {
            region: self.region.clone(),
            source: AwsCallError::from_sdk(&e),
        })?;
        out.snapshot_id()
            .map(str::to_owned)
            .ok_or_else(|| UploadError::Start {
                region: self.region.clone(),
                source: AwsCallError("StartSnapshot answered without a snapshot id".into()),
            })
    }

    /// Writes the image's non-zero blocks into an empty snapshot.
    pub async fn put_blocks(
        &self,
        snapshot_id: &str,
        image: &Path,
        volume_size_gib: u64,
    ) -> Result<BlocksWritten, UploadError> {
        self.put_changed_blocks(snapshot_id, image, volume_size_gib, Baseline::Empty)
            .await
    }

    /// Writes the blocks of the image that differ from `baseline` (what the snapshot reads as
    /// before any write) into the snapshot.
    pub async fn put_changed_blocks(
        &self,
        snapshot_id: &str,
        image: &Path,
        volume_size_gib: u64,
        baseline: Baseline,
    ) -> Result<BlocksWritten, UploadError> {
        let file = File::open(image).map_err(|source| UploadError::Read {
            path: image.to_path_buf(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| UploadError::Read {
                path: image.to_path_buf(),
                source,
            })?
            .len();
        if size > volume_size_gib * GIB {
            return Err(UploadError::TooLarge {
                path: image.to_path_buf(),
                size,
                volume_gib: volume_size_gib,
            });
        }
        let (sender, receiver) = tokio::sync::mpsc::channel::<Block>(self.concurrency.max(1));
        let path = image.to_path_buf();
        let reader = tokio::task::spawn_blocking(move || {
            read_blocks(&file, &path, size, &baseline, &sender)
        });
        let blocks = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|block| (block, receiver))
        });
        // Boxed, not pinned on the stack: dropping it must drop the receiver.
        let mut uploads = Box::pin(
            blocks
                .map(|block| {
                    let index = block.index;
                    self.put_block(snapshot_id, block)
                        .map(move |result| result.map(|()| index))
                })
                .buffer_unordered(self.concurrency.max(1)),
        );
        // How far into the image the sent blocks reach: holes and unchanged blocks are skipped,
        // so that, not the bytes sent, is what moves toward the end.
        let progress = Task::new(format!("EBS upload {snapshot_id}"), Some(size), Unit::Bytes);
        let (mut sent, mut reached) = (0u64, 0u64);
        let mut failure = None;
        while let Some(result) = uploads.next().await {
            match result {
                Ok(index) => {
                    sent += 1;
                    reached = reached
                        .max((index as u64 + 1) * BLOCK_SIZE as u64)
                        .min(size);
                    progress.set(reached);
                    progress.message(format!("{sent} blocks sent"));
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(progress);
        // Dropping the stream drops the receiver, which stops the reader.
        drop(uploads);
        let read = reader.await.expect("the block reader does not panic");
        if let Some(e) = failure {
            return Err(e);
        }
        read
    }

    async fn put_block(&self, snapshot_id: &str, block: Block) -> Result<(), UploadError> {
        let mut delay = BLOCK_BACKOFF;
        let mut attempt = 1;
        loop {
            let call = self
                .ebs
                .put_snapshot_block()
                .snapshot_id(snapshot_id)
                .block_index(block.index)
                .data_length(BLOCK_SIZE as i32)
                .checksum(&block.checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .block_data(ByteStream::from(block.data.clone()))
                .send();
            let failure = match tokio::time::timeout(self.block_timeout, call).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => sdk_error(&e),
                // Dropping the call closes its connection; the block is sent again.
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(self.block_timeout)
                ),
            };
            if attempt >= BLOCK_ATTEMPTS {
                return Err(UploadError::Block {
                    snapshot_id: snapshot_id.to_owned(),
                    index: block.index,
                    attempts: attempt,
                    source: AwsCallError(failure),
                });
            }
            tracing::debug!(
                "block {} of {snapshot_id}: attempt {attempt} failed: {failure}",
                block.index
            );
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }

    /// The blocks `snapshot_id` holds, each its base64 SHA-256 as `GetSnapshotBlock` answers it
    /// (empty when EBS gives none, which no block matches), by block index. Reads every block:
    /// EBS lists blocks without their checksums.
    pub async fn block_checksums(
        &self,
        snapshot_id: &str,
    ) -> Result<BTreeMap<u64, String>, UploadError> {
        let failed = |source| UploadError::ParentBlocks {
            snapshot_id: snapshot_id.to_owned(),
            source,
        };
        let mut pages = self
            .ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot_id)
            .into_paginator()
            .send();
        let mut listed = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| failed(AwsCallError::from_sdk(&e)))?;
            for block in page.blocks() {
                if let (Some(index), Some(token)) = (block.block_index(), block.block_token()) {
                    listed.push((index, token.to_owned()));
                }
            }
        }
        let mut reads = Box::pin(
            futures_util::stream::iter(listed)
                .map(|(index, token)| async move {
                    let out = self
                        .ebs
                        .get_snapshot_block()
                        .snapshot_id(snapshot_id)
                        .block_index(index)
                        .block_token(token)
                        .send()
                        .await
                        .map_err(|e| AwsCallError::from_sdk(&e))?;
                    let checksum = out.checksum().unwrap_or_default().to_owned();
                    // Read to the end, so that the connection can be used again.
                    out.block_data
                        .collect()
                        .await
                        .map_err(|e| AwsCallError(format!("block {index}: {e}")))?;
                    Ok::<_, AwsCallError>((u64::try_from(index).unwrap_or(u64::MAX), checksum))
                })
                .buffer_unordered(self.concurrency.max(1)),
        );
        let mut checksums = BTreeMap::new();
        while let Some(read) = reads.next().await {
            let (index, checksum) = read.map_err(failed)?;
            checksums.insert(index, checksum);
        }
        Ok(checksums)
    }

    /// Seals the snapshot.
    pub async fn complete(
        &self,
        snapshot_id: &str,
        written: &BlocksWritten,
    ) -> Result<(), UploadError> {
        self.ebs
            .complete_snapshot()
            .snapshot_id(snapshot_id)
            .changed_blocks_count(written.changed_blocks as i32)
            .checksum(&written.checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
            .send()
            .await
            .map(|out| {
                if out.status() == Some(&Status::Error) {
                    tracing::warn!("CompleteSnapshot reported an error status for {snapshot_id}");
                }
            })
            .map_err(|e| UploadError::Complete {
                snapshot_id: snapshot_id.to_owned(),
                source: AwsCallError::from_sdk(&e),
            })
    }

    /// Waits until EC2 shows the snapshot `completed`.
    pub async fn wait_completed(&self, snapshot_id: &str) -> Result<(), UploadError> {
        wait_for(self.wait, snapshot_id, || async {
            let out = self
                .ec2
                .describe_snapshots()
                .snapshot_ids(snapshot_id)
                .send()
                .await
                .map_err(|e| sdk_error(&e))?;
            let state = out
                .snapshots()
                .first()
                .and_then(|s| s.state())
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| "missing".into());
            Ok(match state.as_str() {
                "completed" => Poll::Ready,
                "error" | "recoverable" | "missing" => Poll::Failed(state),
                _ => Poll::Pending(state),
            })
        })
        .await
        .map_err(|source| UploadError::Wait {
            snapshot_id: snapshot_id.to_owned(),
            source,
        })
    }
}

/// A non-zero block, ready to send.
#[derive(Debug)]
struct Block {
    index: i32,
    data: Bytes,
    /// Base64 SHA-256 of `data`.
    checksum: String,
}

/// The file's data extents as `[start, end)` byte ranges; the whole file when the file system
/// cannot tell.
fn data_extents(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let start = match seek(file, SeekFrom::Data(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
                return Ok(vec![(0, size)]);
            }
            Err(e) => return Err(e.into()),
        };
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        extents.push((start, end));
        offset = end;
    }
    Ok(extents)
}

/// The block indexes covering the extents, in order, without repeats.
fn block_indexes(extents: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    let block = BLOCK_SIZE as u64;
    let mut next = 0u64;
    extents.iter().flat_map(move |&(start, end)| {
        let first = (start / block).max(next);
        let last = end.div_ceil(block);
        next = next.max(last);
        first..last
    })
}

fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    chunks.remainder().iter().all(|b| *b == 0)
        && chunks
            .into_iter()
            .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// The parent's side of the comparison, opened.
enum Before {
    Empty,
    Image {
        file: File,
        path: PathBuf,
        size: u64,
    },
    Checksums(BTreeMap<u64, String>),
}

/// The block indexes to look at, in order: those covering the image's data, and those where
/// the parent may hold data.
fn candidate_indexes(ours: &[(u64, u64)], before: &Before) -> Result<Vec<u64>, UploadError> {
    let mut indexes: std::collections::BTreeSet<u64> = block_indexes(ours).collect();
    match before {
        Before::Empty => {}
        Before::Image { file, path, size } => {
            let theirs = data_extents(file, *size).map_err(|source| UploadError::Read {
                path: path.clone(),
                source,
            })?;
            indexes.extend(block_indexes(&theirs));
        }
        Before::Checksums(checksums) => indexes.extend(checksums.keys().copied()),
    }
    Ok(indexes.into_iter().collect())
}

/// Reads block `index` of a `size`-byte file into `buffer` (zeros past the end).
fn read_block(file: &File, size: u64, index: u64, buffer: &mut [u8]) -> std::io::Result<()> {
    buffer.fill(0);
    let offset = index * BLOCK_SIZE as u64;
    if offset < size {
        let wanted = ((size - offset) as usize).min(BLOCK_SIZE);
        file.read_exact_at(&mut buffer[..wanted], offset)?;
    }
    Ok(())
}

/// The blocking side: reads, compares and hashes blocks in order and sends those to write.
fn read_blocks(
    file: &File,
    path: &Path,
    size: u64,
    baseline: &Baseline,
    sender: &tokio::sync::mpsc::Sender<Block>,
) -> Result<BlocksWritten, UploadError> {
    let read_error = |source| UploadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let before = match baseline {
        Baseline::Empty => Before::Empty,
        Baseline::Image(parent) => {
            let parent_error = |source| UploadError::Read {
                path: parent.clone(),
                source,
            };
            let file = File::open(parent).map_err(parent_error)?;
            let size = file.metadata().map_err(parent_error)?.len();
            Before::Image {
                file,
                path: parent.clone(),
                size,
            }
        }
        Baseline::Checksums(checksums) => Before::Checksums(checksums.clone()),
    };
    let extents = data_extents(file, size).map_err(read_error)?;
    let mut aggregate = Sha256::new();
    let mut changed = 0u64;
    let mut zeros = 0u64;
    let mut theirs = vec![0u8; BLOCK_SIZE];
    for index in candidate_indexes(&extents, &before)? {
        let mut buffer = BytesMut::zeroed(BLOCK_SIZE);
        read_block(file, size, index, &mut buffer).map_err(read_error)?;
        let zero = is_zero(&buffer);
        let digest = match &before {
            Before::Empty => {
                if zero {
                    continue;
                }
                Sha256::digest(&buffer)
            }
            Before::Image { file, path, size } => {
                read_block(file, *size, index, &mut theirs).map_err(|source| {
                    UploadError::Read {
                        path: path.clone(),
                        source,
                    }
                })?;
                if theirs[..] == buffer[..] {
                    continue;
                }
                Sha256::digest(&buffer)
            }
            Before::Checksums(checksums) => {
                let digest = Sha256::digest(&buffer);
                match checksums.get(&index) {
                    Some(theirs) if *theirs == BASE64.encode(digest) => continue,
                    None if zero => continue,
                    _ => digest,
                }
            }
        };
        aggregate.update(digest);
        changed += 1;
        zeros += u64::from(zero);
        let block = Block {
            index: i32::try_from(index).expect("a 16 TiB volume has fewer than 2^31 blocks"),
            data: buffer.freeze(),
            checksum: BASE64.encode(digest),
        };
        if sender.blocking_send(block).is_err() {
            // The uploader stopped (a block failed): its error is the one to report.
            break;
        }
    }
    Ok(BlocksWritten {
        changed_blocks: changed,
        zero_blocks: zeros,
        checksum: BASE64.encode(aggregate.finalize()),
    })
}

/// The `sha256:` digest of a file, streamed.
pub fn file_digest(path: &Path) -> Result<String, UploadError> {
    use std::io::Read;
    let read_error = |source| UploadError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(crate::id::Digest::from_hasher(hasher).to_string())
}

/// The volume size (GiB) a disk image needs at least.
pub fn min_volume_gib(size: u64) -> u64 {
    size.div_ceil(GIB).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn extents_skip_holes_and_blocks_cover_them_once() {
        let mut file = tempfile::tempfile().unwrap();
        let size = 16 * BLOCK_SIZE as u64;
        file.set_len(size).unwrap();
        // Data in block 1 (end), across blocks 5-6, and in block 15.
        file.write_all_at(&[1; 10], 2 * BLOCK_SIZE as u64 - 10)
            .unwrap();
        file.write_all_at(&[2; 100], 6 * BLOCK_SIZE as u64 - 50)
            .unwrap();
        file.write_all_at(&[3; 1], size - 1).unwrap();
        file.flush().unwrap();
        let extents = data_extents(&file, size).unwrap();
        let blocks: Vec<u64> = block_indexes(&extents).collect();
        for b in [1, 5, 6, 15] {
            assert!(blocks.contains(&b), "block {b} missing from {blocks:?}");
        }
        let mut sorted = blocks.clone();
        sorted.dedup();
        assert_eq!(sorted, blocks, "no block twice");
        // The file system may report whole pages or more as data, never less; but it must not
        // report everything for a file that is mostly holes.
        assert!(blocks.len() < 16, "{blocks:?}");
    }

    #[test]
    fn overlapping_extents_give_each_block_once() {
        let blocks: Vec<u64> =
            block_indexes(&[(0, 10), (20, 600_000), (700_000, 1_100_000)]).collect();
        assert_eq!(blocks, vec![0, 1, 2]);
    }

    #[test]
    fn zero_detection() {
        let mut block = vec![0u8; BLOCK_SIZE];
        assert!(is_zero(&block));
        block[BLOCK_SIZE - 1] = 1;
        assert!(!is_zero(&block));
        block[BLOCK_SIZE - 1] = 0;
        block[3] = 1;
        assert!(!is_zero(&block));
    }

    #[tokio::test]
    async fn reader_sends_non_zero_blocks_with_checksums_and_the_linear_aggregate() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let size = 5 * BLOCK_SIZE as u64 + 1000; // a partial last block, padded with zeros
        file.as_file().set_len(size).unwrap();
        file.as_file()
            .write_all_at(&[7; 4096], BLOCK_SIZE as u64)
            .unwrap();
        // Written zeros are data to the file system but not to EBS: skipped.
        file.as_file()
            .write_all_at(&[0; 8192], 3 * BLOCK_SIZE as u64)
            .unwrap();
        file.as_file()
            .write_all_at(&[9; 10], 5 * BLOCK_SIZE as u64 + 990)
            .unwrap();
        file.flush().unwrap();
        let (sender, mut receiver) = tokio::sync::mpsc::channel(16);
        let path = file.path().to_path_buf();
        let handle = file.reopen().unwrap();
        let written = tokio::task::spawn_blocking(move || {
            read_blocks(&handle, &path, size, &Baseline::Empty, &sender)
        })
        .await
        .unwrap()
        .unwrap();
        let mut blocks = Vec::new();
        while let Some(block) = receiver.recv().await {
            blocks.push(block);
        }
        assert_eq!(
            blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
            vec![1, 5]
        );
        assert!(blocks.iter().all(|b| b.data.len() == BLOCK_SIZE));
        let mut expected_last = vec![0u8; BLOCK_SIZE];
        expected_last[990..1000].fill(9);
        assert_eq!(&blocks[1].data[..], &expected_last[..]);
        let mut aggregate = Sha256::new();
        for block in &blocks {
            let digest = Sha256::digest(&block.data);
            assert_eq!(block.checksum, BASE64.encode(digest));
            aggregate.update(digest);
        }
        assert_eq!(written.changed_blocks, 2);
        assert_eq!(written.zero_blocks, 0);
        assert_eq!(written.checksum, BASE64.encode(aggregate.finalize()));
    }

    /// Runs the reader over `image` against `baseline`; the blocks it sends and its totals.
    async fn sent(image: &Path, baseline: Baseline) -> (Vec<Block>, BlocksWritten) {
        let (sender, mut receiver) = tokio::sync::mpsc::channel(64);
        let path = image.to_path_buf();
        let written = tokio::task::spawn_blocking(move || {
            let file = File::open(&path).unwrap();
            let size = file.metadata().unwrap().len();
            read_blocks(&file, &path, size, &baseline, &sender)
        })
        .await
        .unwrap()
        .unwrap();
        let mut blocks = Vec::new();
        while let Some(block) = receiver.recv().await {
            blocks.push(block);
        }
        (blocks, written)
    }

    /// A sparse image of 8 blocks with `fill` bytes at the start of the given blocks.
    fn image(dir: &Path, name: &str, blocks: &[(u64, u8)]) -> PathBuf {
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        file.set_len(8 * BLOCK_SIZE as u64).unwrap();
        for &(index, fill) in blocks {
            file.write_all_at(&[fill; 1000], index * BLOCK_SIZE as u64)
                .unwrap();
        }
        path
    }

    #[tokio::test]
    async fn against_the_parents_image_only_differing_blocks_are_sent_and_new_zeros_too() {
        let dir = tempfile::tempdir().unwrap();
        let parent = image(dir.path(), "v1", &[(0, 1), (2, 2), (5, 5), (7, 7)]);
        // Block 2 changed, block 5 became zeros (written zeros), block 7 a hole, block 3 new.
        let child = image(dir.path(), "v2", &[(0, 1), (2, 9), (3, 3), (5, 0)]);
        let (blocks, written) = sent(&child, Baseline::Image(parent)).await;
        assert_eq!(
            blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
            vec![2, 3, 5, 7]
        );
        assert!(blocks[2].data.iter().all(|b| *b == 0));
        assert!(blocks[3].data.iter().all(|b| *b == 0));
        assert_eq!(blocks[0].data[0], 9);
        assert_eq!((written.changed_blocks, written.zero_blocks), (4, 2));
        let mut aggregate = Sha256::new();
        for block in &blocks {
            aggregate.update(Sha256::digest(&block.data));
        }
        assert_eq!(written.checksum, BASE64.encode(aggregate.finalize()));
    }

    #[tokio::test]
    async fn against_the_parents_checksums_the_same_blocks_are_sent() {
        let dir = tempfile::tempdir().unwrap();
        let parent = image(dir.path(), "v1", &[(0, 1), (2, 2), (5, 5), (7, 7)]);
        let child = image(dir.path(), "v2", &[(0, 1), (2, 9), (3, 3), (5, 0)]);
        // What GetSnapshotBlock answers for the parent's blocks (block 6: a zero block the
        // parent holds, which stays zero: not sent again).
        let mut checksums = BTreeMap::new();
        let mut buffer = vec![0u8; BLOCK_SIZE];
        let file = File::open(&parent).unwrap();
        for index in [0u64, 2, 5, 6, 7] {
            read_block(&file, 8 * BLOCK_SIZE as u64, index, &mut buffer).unwrap();
            checksums.insert(index, BASE64.encode(Sha256::digest(&buffer)));
        }
        let (blocks, written) = sent(&child, Baseline::Checksums(checksums)).await;
        assert_eq!(
            blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
            vec![2, 3, 5, 7]
        );
        assert_eq!((written.changed_blocks, written.zero_blocks), (4, 2));
        // The same image against an empty snapshot: its non-zero blocks.
        let (blocks, written) = sent(&child, Baseline::Empty).await;
        assert_eq!(
            blocks.iter().map(|b| b.index).collect::<Vec<_>>(),
            vec![0, 2, 3]
        );
        assert_eq!(written.zero_blocks, 0);
    }

    #[test]
    fn volume_sizes() {
        assert_eq!(min_volume_gib(1), 1);
        assert_eq!(min_volume_gib(GIB), 1);
        assert_eq!(min_volume_gib(GIB + 1), 2);
    }
}
