use super::testimg::{build, ImageSpec};
use super::*;

#[test]
fn checksum_is_the_kernels_crc32c() {
    // The standard CRC-32C check value: crc32c("123456789") = 0xe3069283 (with the final
    // inversion the kernel's raw crc32c leaves out).
    assert_eq!(crc32c_raw(!0, b"123456789") ^ !0, 0xe306_9283);
    assert_eq!(dm_checksum(b"123456789", 0), !0xe306_9283);
}
