//! Every class of bad input gets the right error (or closes only its own
//! connection), the server keeps serving, and the backing never changes.

mod common;

use std::io::Write;

use common::*;
use filter_nbd::proto::*;
use filter_nbd::ServerOptions;

const SIZE: u64 = 1 << 20;

fn fixture() -> Fixture {
    let mut s = Spec::rw("vol", SIZE);
    s.fill = 0x5a;
    let mut ro = Spec::rw("ro", SIZE);
    ro.fill = 0x33;
    ro.read_only = true;
    serve(vec![s, ro], ServerOptions::default())
}

/// The server still serves a fresh client, and both backings are unchanged.
fn assert_healthy(f: &Fixture) {
    let mut c = Client::go(&f.sock, "vol", Mode::Structured, false);
    assert_eq!(c.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    c.disconnect();
    assert!(
        read_file(&f.files[0]).iter().all(|&b| b == 0x5a),
        "rw backing changed"
    );
    assert!(
        read_file(&f.files[1]).iter().all(|&b| b == 0x33),
        "ro backing changed"
    );
}

#[test]
fn bad_handshake_magic_closes_only_that_connection() {
    let f = fixture();
    let mut s = connect(&f.sock);
    greet(&mut s);
    s.write_all(&[0xde; 16]).unwrap();
    assert_closed(&mut s);
    assert_healthy(&f);
}

#[test]
fn absurd_option_length_closes() {
    let f = fixture();
    let mut s = connect(&f.sock);
    greet(&mut s);
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    s.write_all(&b).unwrap();
    assert_closed(&mut s);
    assert_healthy(&f);
}

#[test]
fn truncated_handshake_and_unknown_client_flags() {
    let f = fixture();
    {
        let mut s = connect(&f.sock);
        greet(&mut s);
        s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
        drop(s); // mid-option disconnect
    }
    {
        let mut s = connect(&f.sock);
        let mut g = [0u8; 18];
        std::io::Read::read_exact(&mut s, &mut g).unwrap();
        s.write_all(&0x8000_0000u32.to_be_bytes()).unwrap();
        assert_closed(&mut s);
    }
    {
        let s = connect(&f.sock);
        drop(s); // before the client flags
    }
    assert_healthy(&f);
}

#[test]
fn unknown_options_and_bad_option_data_keep_going() {
    let f = fixture();
    let mut s = connect(&f.sock);
    greet(&mut s);
    for (opt, data, want) in [
        (999u32, vec![1u8, 2, 3], REP_ERR_UNSUP),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (OPT_INFO, vec![0, 0, 0, 200, 1], REP_ERR_INVALID), // name length past end
        (OPT_GO, info_data("nope", &[]), REP_ERR_UNKNOWN),
        (OPT_LIST, vec![1], REP_ERR_INVALID),
        (
            OPT_SET_META_CONTEXT,
            meta_data("vol", &[BASE_ALLOCATION]),
            REP_ERR_INVALID,
        ), // no structured replies yet
        (OPT_STRUCTURED_REPLY, vec![1], REP_ERR_INVALID),
    ] {
        send_opt(&mut s, opt, &data);
        let (o, ty, _) = read_opt_reply(&mut s);
        assert_eq!((o, ty), (opt, want), "option {opt}");
    }
    send_opt(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = read_opt_reply(&mut s);
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_SERVER);
        let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, vec!["vol", "ro"]);
    send_opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(read_opt_reply(&mut s).1, REP_ACK);
    assert_closed(&mut s);
    assert_healthy(&f);
}

#[test]
fn export_name_of_unknown_export_closes() {
    let f = fixture();
    let mut s = connect(&f.sock);
    greet(&mut s);
    send_opt(&mut s, OPT_EXPORT_NAME, b"missing");
    assert_closed(&mut s);
    assert_healthy(&f);
}

#[test]
fn out_of_range_requests() {
    let f = fixture();
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::go(&f.sock, "vol", mode, mode != Mode::Simple);
        assert_eq!(c.read(SIZE - 10, 20), Err(EINVAL));
        assert_eq!(c.read(u64::MAX - 5, 10), Err(EINVAL)); // overflow
        assert_eq!(c.write(SIZE - 2, &[1, 2, 3, 4]), ENOSPC);
        assert_eq!(c.write(u64::MAX - 1, &[1, 2, 3, 4]), EINVAL);
        assert_eq!(c.call(CMD_TRIM, 0, SIZE, 4096, &[]).error, EINVAL);
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, 0, SIZE - 4096, 8192, &[]).error,
            ENOSPC
        );
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, 0, u64::MAX - 4095, 8192, &[])
                .error,
            EINVAL
        );
        if mode != Mode::Simple {
            assert_eq!(c.call(CMD_BLOCK_STATUS, 0, SIZE, 1, &[]).error, EINVAL);
        }
        // The connection still works.
        assert_eq!(c.read(0, 16).unwrap(), vec![0x5a; 16]);
        c.disconnect();
    }
    assert_healthy(&f);
}

#[test]
fn read_only_export_refuses_writes() {
    let f = fixture();
    let mut c = Client::go(&f.sock, "ro", Mode::Structured, false);
    assert_ne!(c.flags & TF_READ_ONLY, 0);
    assert_eq!(c.write(0, &[9; 4096]), EPERM);
    assert_eq!(
        c.call(CMD_WRITE, CMD_FLAG_FUA, 0, 512, &[7; 512]).error,
        EPERM
    );
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).error, EPERM);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    assert_eq!(c.read(0, 8).unwrap(), vec![0x33; 8]);
    c.disconnect();
    assert_healthy(&f);
}

#[test]
fn unknown_command_and_block_status_without_context() {
    let f = fixture();
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::go(&f.sock, "vol", mode, false);
        assert_eq!(c.call(77, 0, 0, 4096, &[]).error, EINVAL);
        assert_eq!(c.call(CMD_CACHE, 0, 0, 4096, &[]).error, EINVAL);
        assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).error, EINVAL);
        assert_eq!(c.read(0, 4).unwrap(), vec![0x5a; 4]);
        c.disconnect();
    }
    assert_healthy(&f);
}

#[test]
fn oversized_write_is_discarded_and_oversized_read_refused() {
    let f = fixture();
    for mode in [Mode::Simple, Mode::Extended] {
        let mut c = Client::go(&f.sock, "vol", mode, false);
        let big = vec![0xee; (32 << 20) + 4096];
        assert_eq!(
            c.call(CMD_WRITE, 0, 0, big.len() as u64, &big).error,
            EINVAL
        );
        assert_eq!(c.read(0, (32 << 20) + 1), Err(EINVAL));
        assert_eq!(
            c.call(CMD_READ, CMD_FLAG_DF, 0, (32 << 20) + 1, &[]).error,
            EOVERFLOW
        );
        // The payload was consumed: the stream is still in sync.
        assert_eq!(c.read(0, 4).unwrap(), vec![0x5a; 4]);
        c.disconnect();
    }
    assert_healthy(&f);
}

#[test]
fn absurd_extended_payload_closes_connection() {
    let f = fixture();
    let mut c = Client::go(&f.sock, "vol", Mode::Extended, false);
    c.send(CMD_WRITE, 0, 0, 1 << 40, &[0xee; 4096]);
    assert_closed(&mut c.s);
    assert_healthy(&f);
}

#[test]
fn payload_on_non_write_command_is_discarded() {
    let f = fixture();
    let mut c = Client::go(&f.sock, "vol", Mode::Extended, false);
    let r = c.call(CMD_WRITE_ZEROES, CMD_FLAG_PAYLOAD_LEN, 0, 16, &[0xee; 16]);
    assert_eq!(r.error, EINVAL);
    assert_eq!(c.read(0, 4).unwrap(), vec![0x5a; 4]);
    c.disconnect();
    assert_healthy(&f);
}

#[test]
fn bad_request_magic_closes_connection() {
    let f = fixture();
    let mut c = Client::go(&f.sock, "vol", Mode::Structured, false);
    c.s.write_all(&[0x11; 28]).unwrap();
    assert_closed(&mut c.s);
    assert_healthy(&f);
}

#[test]
fn disconnect_mid_request_leaves_others_unaffected() {
    let f = fixture();
    let mut other = Client::go(&f.sock, "vol", Mode::Structured, false);
    {
        let mut c = Client::go(&f.sock, "vol", Mode::Structured, false);
        // Header of a 64 KiB write, then only half of the payload.
        let mut b = Vec::new();
        encode_request(
            &mut b,
            &Request {
                flags: 0,
                kind: CMD_WRITE,
                handle: 1,
                offset: 0,
                len: 65536,
            },
            false,
        );
        b.extend_from_slice(&[0xee; 32768]);
        c.s.write_all(&b).unwrap();
        // And a truncated header on a second connection.
        let mut d = Client::go(&f.sock, "vol", Mode::Simple, false);
        d.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    }
    assert_eq!(other.read(0, 4096).unwrap(), vec![0x5a; 4096]);
    other.disconnect();
    assert_healthy(&f);
}

#[test]
fn shutdown_closes_connections_still_in_handshake() {
    let f = fixture();
    let mut s = connect(&f.sock);
    greet(&mut s);
    f.stop.shutdown();
    // The connection's read side was shut down; the server closes it.
    assert_closed(&mut s);
}

#[test]
fn client_closing_with_requests_in_flight_does_not_hurt_others() {
    let f = fixture();
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::go(&f.sock, "vol", mode, false);
        for i in 0..64u64 {
            c.send(CMD_READ, 0, (i % 16) * 65536, 65536, &[]);
        }
        drop(c); // close without reading any reply
    }
    assert_healthy(&f);
}
