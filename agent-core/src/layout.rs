//! Byte layout of the shared-memory region (see docs/change-log-format.md).

use crate::crc::crc32c;

/// Magic at offset 0 of a region.
pub const REGION_MAGIC: [u8; 8] = *b"RWNDCLOG";
/// Layout version this build writes and understands.
pub const LAYOUT_VERSION: u32 = 1;
/// Size of the header page.
pub const HEADER_SIZE: usize = 4096;
const PAGE: u64 = 4096;

// ---- immutable part, written once before the file is published ----
pub(crate) const OFF_MAGIC: usize = 0; // [u8; 8]
pub(crate) const OFF_VERSION: usize = 8; // u32
pub(crate) const OFF_BLOCK_SIZE: usize = 12; // u32
pub(crate) const OFF_UUID: usize = 16; // [u8; 16]
pub(crate) const OFF_VOLUME_SIZE: usize = 32; // u64
pub(crate) const OFF_GENERATION: usize = 40; // u64
pub(crate) const OFF_RING_CAPACITY: usize = 48; // u64
pub(crate) const OFF_BITMAP_WORDS: usize = 56; // u64 (per bitmap)
pub(crate) const OFF_ACTIVE_OFF: usize = 64; // u64
pub(crate) const OFF_PENDING_OFF: usize = 72; // u64
pub(crate) const OFF_INFLIGHT_OFF: usize = 80; // u64
pub(crate) const OFF_EXTENT_COUNT: usize = 88; // u64
pub(crate) const OFF_EXTENT_SHIFT: usize = 96; // u32 (+ u32 reserved)
pub(crate) const OFF_RING_OFF: usize = 104; // u64
pub(crate) const OFF_REGION_LEN: usize = 112; // u64
pub(crate) const OFF_CREATED_NS: usize = 120; // u64
pub(crate) const OFF_HEADER_CRC: usize = 128; // u32, CRC-32C of bytes 0..128
pub(crate) const STATIC_LEN: usize = 128;

// ---- live part: every field is an AtomicU64 ----
pub(crate) const OFF_PRODUCER_PID: usize = 192;
pub(crate) const OFF_PRODUCER_STATE: usize = 200;
pub(crate) const OFF_CONSUMER_PID: usize = 208;
pub(crate) const OFF_NEXT_SEQ: usize = 216;
pub(crate) const OFF_MODE: usize = 224;
pub(crate) const OFF_FILTERING: usize = 232;
pub(crate) const OFF_BITMAP_SINCE_NS: usize = 240;
pub(crate) const OFF_LAST_META_END: usize = 248;
pub(crate) const OFF_HEAD: usize = 256; // own cache line
pub(crate) const OFF_TAIL: usize = 320; // own cache line
pub(crate) const OFF_ACTIVE_COUNT: usize = 384;
pub(crate) const OFF_PENDING_COUNT: usize = 392;
/// Bitmap sweeps completed by consumers (a full pass over `active` taking
/// every bit set before the pass started); written by the consumer.
pub(crate) const OFF_SWEEPS_DONE: usize = 400;
/// The sweep count at which the producer may leave bitmap mode (set when it
/// entered it); written by the producer, informational for observers.
pub(crate) const OFF_BITMAP_EXIT_SWEEP: usize = 408;
pub(crate) const OFF_STATS: usize = 512; // STAT_SLOTS u64 counters

/// `producer_state` values.
pub(crate) const PRODUCER_NONE: u64 = 0;
pub(crate) const PRODUCER_RUNNING: u64 = 1;
pub(crate) const PRODUCER_CLEAN: u64 = 2;

/// Indices of the statistics counters (u64 each, at `OFF_STATS + 8*i`).
#[allow(dead_code)]
pub(crate) mod stat {
    pub const WRITES: usize = 0;
    pub const WRITE_BYTES: usize = 1;
    pub const READS: usize = 2;
    pub const READ_BYTES: usize = 3;
    pub const ZERO_OPS: usize = 4;
    pub const ZERO_BYTES: usize = 5;
    pub const ABORTS: usize = 6;
    pub const DATA_RECORDS: usize = 7;
    pub const METADATA_RECORDS: usize = 8;
    pub const ZERO_RECORDS: usize = 9;
    pub const BITMAP_WRITES: usize = 10;
    pub const DATA_TO_METADATA: usize = 11;
    pub const METADATA_TO_BITMAP: usize = 12;
    pub const BITMAP_TO_DATA: usize = 13;
    pub const METADATA_TO_DATA: usize = 14;
    pub const DATA_TO_BITMAP: usize = 15;
    pub const RECORDS_DRAINED: usize = 16;
    pub const BYTES_DRAINED: usize = 17;
    pub const RECORDS_COMMITTED: usize = 18;
    pub const BYTES_COMMITTED: usize = 19;
    pub const TAGS_INSERTED: usize = 20;
    pub const TAGS_REFUSED: usize = 21;
    pub const BITMAP_BATCHES: usize = 22;
    pub const BITMAP_BLOCKS_DRAINED: usize = 23;
    pub const BITMAP_BLOCKS_COMMITTED: usize = 24;
    pub const RECOVERIES: usize = 25;
    pub const CONSUMER_ATTACHES: usize = 26;
    pub const AL_UPDATES: usize = 27;
    pub const PERSISTS: usize = 28;
    pub const PERSIST_ERRORS: usize = 29;
    pub const OVERSIZE_METADATA: usize = 30;
    pub const FILTERING_STOPS: usize = 31;
    pub const WRITE_HIST: usize = 32; // 15 buckets
    /// Bitmap → data transitions taken with bits still set (after a sweep).
    pub const BITMAP_SWEEP_EXITS: usize = 47;
    pub const READ_HIST: usize = 48; // 15 buckets
    pub const SLOTS: usize = 64;
}

/// Number of IO-size histogram buckets: 512B,1K,...,4M,>4M.
pub const HIST_BUCKETS: usize = 15;

/// Histogram bucket of an IO of `len` bytes.
pub(crate) fn hist_bucket(len: u64) -> usize {
    if len <= 512 {
        return 0;
    }
    let ceil_log2 = 64 - (len - 1).leading_zeros() as usize;
    (ceil_log2 - 9).min(HIST_BUCKETS - 1)
}

fn round_page(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Geometry of a region, derived from (volume size, block size, ring capacity,
/// extent shift) and checked against what the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub volume_size: u64,
    pub block_size: u32,
    pub block_shift: u32,
    pub blocks: u64,
    pub bitmap_words: u64,
    pub active_off: u64,
    pub pending_off: u64,
    pub extent_shift: u32,
    pub extent_count: u64,
    pub inflight_off: u64,
    pub ring_off: u64,
    pub ring_capacity: u64,
    pub region_len: u64,
}

impl Layout {
    pub(crate) fn compute(
        volume_size: u64,
        block_size: u32,
        ring_capacity: u64,
        extent_shift: u32,
    ) -> Option<Layout> {
        if volume_size == 0
            || !block_size.is_power_of_two()
            || !(4096..=(1 << 20)).contains(&block_size)
        {
            return None;
        }
        if !(12..=40).contains(&extent_shift)
            || (1u64 << extent_shift) < block_size as u64
            || ring_capacity == 0
            || ring_capacity % PAGE != 0
        {
            return None;
        }
        let blocks = volume_size.div_ceil(block_size as u64);
        let bitmap_words = blocks.div_ceil(64);
        let bitmap_bytes = round_page(bitmap_words.checked_mul(8)?);
        let extent_count = volume_size.div_ceil(1u64 << extent_shift);
        let active_off = HEADER_SIZE as u64;
        let pending_off = active_off + bitmap_bytes;
        let inflight_off = pending_off + bitmap_bytes;
        let ring_off = inflight_off.checked_add(round_page(extent_count.checked_mul(8)?))?;
        let region_len = ring_off.checked_add(ring_capacity)?;
        if region_len > (1u64 << 46) || usize::try_from(region_len).is_err() {
            return None;
        }
        Some(Layout {
            volume_size,
            block_size,
            block_shift: block_size.trailing_zeros(),
            blocks,
            bitmap_words,
            active_off,
            pending_off,
            extent_shift,
            extent_count,
            inflight_off,
            ring_off,
            ring_capacity,
            region_len,
        })
    }

    /// Serialises the immutable header part (bytes 0..132).
    pub(crate) fn encode_header(
        &self,
        uuid: [u8; 16],
        generation: u64,
        created_ns: u64,
    ) -> [u8; STATIC_LEN + 4] {
        let mut h = [0u8; STATIC_LEN + 4];
        h[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&REGION_MAGIC);
        h[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
        h[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_le_bytes());
        h[OFF_UUID..OFF_UUID + 16].copy_from_slice(&uuid);
        let put =
            |h: &mut [u8], off: usize, v: u64| h[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put(&mut h, OFF_VOLUME_SIZE, self.volume_size);
        put(&mut h, OFF_GENERATION, generation);
        put(&mut h, OFF_RING_CAPACITY, self.ring_capacity);
        put(&mut h, OFF_BITMAP_WORDS, self.bitmap_words);
        put(&mut h, OFF_ACTIVE_OFF, self.active_off);
        put(&mut h, OFF_PENDING_OFF, self.pending_off);
        put(&mut h, OFF_INFLIGHT_OFF, self.inflight_off);
        put(&mut h, OFF_EXTENT_COUNT, self.extent_count);
        h[OFF_EXTENT_SHIFT..OFF_EXTENT_SHIFT + 4].copy_from_slice(&self.extent_shift.to_le_bytes());
        put(&mut h, OFF_RING_OFF, self.ring_off);
        put(&mut h, OFF_REGION_LEN, self.region_len);
        put(&mut h, OFF_CREATED_NS, created_ns);
        let crc = crc32c(&h[..STATIC_LEN]);
        h[OFF_HEADER_CRC..OFF_HEADER_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// The decoded immutable header of a region.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub layout: Layout,
    pub uuid: [u8; 16],
    pub generation: u64,
    pub created_ns: u64,
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Decodes and validates the immutable header bytes of a region whose file is
/// `file_len` bytes long. Every field is untrusted.
pub(crate) fn decode_header(h: &[u8; STATIC_LEN + 4], file_len: u64) -> Result<Header, String> {
    if h[OFF_MAGIC..OFF_MAGIC + 8] != REGION_MAGIC {
        return Err("bad magic (not a rewind change log)".into());
    }
    let version = le_u32(h, OFF_VERSION);
    if version != LAYOUT_VERSION {
        return Err(format!(
            "layout version {version}, this build understands {LAYOUT_VERSION}"
        ));
    }
    let crc = le_u32(h, OFF_HEADER_CRC);
    if crc != crc32c(&h[..STATIC_LEN]) {
        return Err("header checksum mismatch".into());
    }
    let block_size = le_u32(h, OFF_BLOCK_SIZE);
    let volume_size = le_u64(h, OFF_VOLUME_SIZE);
    let ring_capacity = le_u64(h, OFF_RING_CAPACITY);
    let extent_shift = le_u32(h, OFF_EXTENT_SHIFT);
    let layout = Layout::compute(volume_size, block_size, ring_capacity, extent_shift)
        .ok_or_else(|| format!("impossible geometry: size {volume_size}, block {block_size}, ring {ring_capacity}, extent shift {extent_shift}"))?;
    let stored = (
        le_u64(h, OFF_BITMAP_WORDS),
        le_u64(h, OFF_ACTIVE_OFF),
        le_u64(h, OFF_PENDING_OFF),
        le_u64(h, OFF_INFLIGHT_OFF),
        le_u64(h, OFF_EXTENT_COUNT),
        le_u64(h, OFF_RING_OFF),
        le_u64(h, OFF_REGION_LEN),
    );
    let want = (
        layout.bitmap_words,
        layout.active_off,
        layout.pending_off,
        layout.inflight_off,
        layout.extent_count,
        layout.ring_off,
        layout.region_len,
    );
    if stored != want {
        return Err(format!(
            "section offsets {stored:?} do not match the geometry {want:?}"
        ));
    }
    if file_len != layout.region_len {
        return Err(format!(
            "file is {file_len} bytes, header says {}",
            layout.region_len
        ));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&h[OFF_UUID..OFF_UUID + 16]);
    Ok(Header {
        layout,
        uuid,
        generation: le_u64(h, OFF_GENERATION),
        created_ns: le_u64(h, OFF_CREATED_NS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn buckets() {
        assert_eq!(hist_bucket(1), 0);
        assert_eq!(hist_bucket(512), 0);
        assert_eq!(hist_bucket(513), 1);
        assert_eq!(hist_bucket(4096), 3);
        assert_eq!(hist_bucket(4 << 20), 13);
        assert_eq!(hist_bucket((4 << 20) + 1), 14);
        assert_eq!(hist_bucket(u64::MAX), 14);
    }
    #[test]
    fn stats_fit_header() {
        const {
            assert!(OFF_STATS + stat::SLOTS * 8 <= HEADER_SIZE);
            assert!(stat::READ_HIST + HIST_BUCKETS <= stat::SLOTS);
            assert!(stat::WRITE_HIST + HIST_BUCKETS <= stat::READ_HIST);
        }
    }
}
