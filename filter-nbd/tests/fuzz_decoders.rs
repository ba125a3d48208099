//! Decoders never panic on random or mutated input, and the server survives
//! random bytes during the handshake and in transmission.

mod common;

use std::io::Write;

use common::*;
use filter_nbd::proto::*;
use proptest::prelude::*;

fn valid_option() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    let d = info_data("vol", &[INFO_NAME, INFO_BLOCK_SIZE]);
    b.extend_from_slice(&(d.len() as u32).to_be_bytes());
    b.extend_from_slice(&d);
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn option_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_option_header(&bytes);
        let _ = decode_info_request(&bytes);
        let _ = decode_meta_request(&bytes);
    }

    #[test]
    fn mutated_options_never_panic(flips in proptest::collection::vec((0usize..64, any::<u8>()), 1..6), cut in 0usize..64) {
        let mut b = valid_option();
        for (i, v) in flips {
            let n = b.len();
            b[i % n] ^= v;
        }
        b.truncate(cut.max(1).min(b.len()));
        if let Ok(h) = decode_option_header(&b) {
            prop_assert!(h.len <= MAX_OPTION_LEN);
        }
        let _ = decode_info_request(b.get(16..).unwrap_or(&[]));
        let _ = decode_meta_request(b.get(16..).unwrap_or(&[]));
    }

    #[test]
    fn request_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), ext in any::<bool>()) {
        if let Ok(r) = decode_request(&bytes, ext) {
            let _ = r.payload_len(ext);
        }
    }

    #[test]
    fn request_roundtrip(flags in any::<u16>(), kind in any::<u16>(), handle in any::<u64>(), offset in any::<u64>(), len in any::<u32>(), ext in any::<bool>()) {
        let r = Request { flags, kind, handle, offset, len: u64::from(len) };
        let mut b = Vec::new();
        encode_request(&mut b, &r, ext);
        prop_assert_eq!(decode_request(&b, ext), Ok(r));
    }
}

/// Random garbage after a valid greeting, and after a valid GO: the server
/// answers or closes that connection, and keeps serving others.
#[test]
fn server_survives_random_bytes() {
    use rand::{Rng, SeedableRng};
    let f = serve_one(1 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..60 {
        let junk: Vec<u8> = (0..rng.gen_range(1..400)).map(|_| rng.gen()).collect();
        if i % 2 == 0 {
            let mut s = connect(&f.sock);
            greet(&mut s);
            let mut b = valid_option();
            let at = rng.gen_range(0..b.len());
            b[at] ^= rng.gen::<u8>() | 1;
            b.extend_from_slice(&junk);
            let _ = s.write_all(&b);
            let _ = s.shutdown(std::net::Shutdown::Write);
            assert_closed(&mut s);
        } else {
            let mut c = Client::go(
                &f.sock,
                "vol",
                if i % 4 == 1 {
                    Mode::Structured
                } else {
                    Mode::Extended
                },
                false,
            );
            let _ = c.s.write_all(&junk);
            let _ = c.s.shutdown(std::net::Shutdown::Write);
            assert_closed(&mut c.s);
        }
    }
    let mut c = Client::go(&f.sock, "vol", Mode::Structured, false);
    assert_eq!(c.read(0, 4).unwrap().len(), 4);
    c.disconnect();
}
