//! The codec at its own boundary: round trips, fragmentation, limits and
//! every way input can be wrong.

use bytes::{BufMut, Bytes, BytesMut};
use courier_wire::{
    Checksum, DecodeError, EncodeError, Flags, Frame, FrameCodec, FrameKind, PayloadError,
    HEADER_LEN, LENGTH_PREFIX_LEN, PROTOCOL_VERSION,
};
use proptest::prelude::*;

fn arb_frame(max_payload: usize) -> impl Strategy<Value = Frame> {
    (
        proptest::sample::select(FrameKind::ALL.to_vec()),
        any::<u8>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..max_payload),
    )
        .prop_map(|(kind, flags, id, payload)| {
            Frame::new(kind, id, payload).with_flags(Flags::from_bits(flags))
        })
}

fn arb_codec() -> impl Strategy<Value = FrameCodec> {
    prop_oneof![Just(Checksum::Off), Just(Checksum::Crc32c)]
        .prop_map(|checksum| FrameCodec::new().max_frame_size(4096).checksum(checksum))
}

fn encode_all(codec: &FrameCodec, frames: &[Frame]) -> BytesMut {
    let mut buf = BytesMut::new();
    for frame in frames {
        codec.encode_frame(frame, &mut buf).unwrap();
    }
    buf
}

/// Feeds `wire` to the decoder in pieces of `chunk` bytes, like a socket would.
fn decode_in_chunks(codec: &FrameCodec, wire: &[u8], chunk: usize) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(frame) = codec.decode_frame(&mut buf).unwrap() {
            frames.push(frame);
        }
    }
    assert!(buf.is_empty(), "input fully consumed");
    frames
}

proptest! {
    #[test]
    fn frames_round_trip(codec in arb_codec(), frames in proptest::collection::vec(arb_frame(1000), 0..8)) {
        let wire = encode_all(&codec, &frames);
        prop_assert_eq!(decode_in_chunks(&codec, &wire, wire.len()), frames.clone());
        prop_assert_eq!(decode_in_chunks(&codec, &wire, 1), frames.clone());
        prop_assert_eq!(decode_in_chunks(&codec, &wire, 7), frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        codec in arb_codec(),
        bytes in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = codec.decode_frame(&mut buf) {}
        prop_assert!(buf.capacity() <= 2000 + LENGTH_PREFIX_LEN + codec.limit() + 64);
        let _ = codec.decode_datagram(Bytes::from(bytes));
    }

    #[test]
    fn typed_messages_round_trip(id: u64, text in ".{0,100}", numbers: Vec<u32>) {
        let codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        codec.encode_message(FrameKind::Request, id, &(&text, &numbers), &mut buf).unwrap();
        let frame = codec.decode_frame(&mut buf).unwrap().unwrap();
        let (got_text, got_numbers): (&str, Vec<u32>) = frame.decode_payload().unwrap();
        prop_assert_eq!(got_text, text.as_str());
        prop_assert_eq!(got_numbers, numbers);
        prop_assert_eq!(frame.id, id);
    }
}

#[test]
fn a_frame_split_at_every_boundary_decodes_the_same() {
    for checksum in [Checksum::Off, Checksum::Crc32c] {
        let codec = FrameCodec::new().checksum(checksum);
        let frames = [
            Frame::data(1, &b"first"[..]),
            Frame::new(FrameKind::Ping, 2, Bytes::new()),
            Frame::new(FrameKind::Response, u64::MAX, vec![0xAB; 300]),
        ];
        let wire = encode_all(&codec, &frames);
        for split in 0..=wire.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(part);
                while let Some(frame) = codec.decode_frame(&mut buf).unwrap() {
                    got.push(frame);
                }
            }
            assert_eq!(got, frames, "split at {split}");
            assert!(buf.is_empty());
        }
    }
}

#[test]
fn a_four_gib_length_prefix_is_refused_before_allocating() {
    let codec = FrameCodec::new();
    let mut buf = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
    let before = buf.capacity();
    let err = codec.decode_frame(&mut buf).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::FrameTooLarge { size, limit } if size == u32::MAX as usize && limit == codec.limit()
    ));
    assert_eq!(
        buf.capacity(),
        before,
        "no buffer growth for a hostile length"
    );
}

#[test]
fn a_large_but_legal_length_reserves_at_most_the_limit() {
    let codec = FrameCodec::new().max_frame_size(1 << 20);
    let mut buf = BytesMut::new();
    buf.put_u32_le(1 << 20);
    buf.put_slice(&[PROTOCOL_VERSION, FrameKind::Data.as_u8(), 0, 0]);
    buf.put_u64_le(9);
    assert!(codec.decode_frame(&mut buf).unwrap().is_none());
    assert!(buf.capacity() <= (1 << 20) + LENGTH_PREFIX_LEN + 64);
}

fn header(length: u32, version: u8, kind: u8, flags: u8, reserved: u8) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32_le(length);
    buf.put_slice(&[version, kind, flags, reserved]);
    buf.put_u64_le(0);
    buf
}

#[test]
fn each_kind_of_bad_header_has_its_own_error() {
    let codec = FrameCodec::new();
    let check = |mut buf: BytesMut| codec.decode_frame(&mut buf).unwrap_err();

    assert!(matches!(
        check(header(3, PROTOCOL_VERSION, 2, 0, 0)),
        DecodeError::LengthTooShort {
            length: 3,
            minimum: HEADER_LEN
        }
    ));
    assert!(matches!(
        check(header(100, 99, 2, 0, 0)),
        DecodeError::UnsupportedVersion {
            found: 99,
            supported: PROTOCOL_VERSION
        }
    ));
    assert!(matches!(
        check(header(100, PROTOCOL_VERSION, 0, 0, 0)),
        DecodeError::UnknownKind(0)
    ));
    assert!(matches!(
        check(header(100, PROTOCOL_VERSION, 200, 0, 0)),
        DecodeError::UnknownKind(200)
    ));
    assert!(matches!(
        check(header(100, PROTOCOL_VERSION, 2, 0, 7)),
        DecodeError::ReservedNotZero(7)
    ));
}

#[test]
fn checksums_catch_corruption_and_are_enforced_when_required() {
    let strict = FrameCodec::new().checksum(Checksum::Crc32c);
    let lax = FrameCodec::new();
    let frame = Frame::data(5, &b"payload"[..]);

    let mut wire = BytesMut::new();
    strict.encode_frame(&frame, &mut wire).unwrap();
    // With checksums required, every single-bit flip anywhere in the frame is
    // refused (a flip in the length prefix may also just ask for more bytes).
    for i in 0..wire.len() {
        for bit in 0..8 {
            let mut damaged = wire.clone();
            damaged[i] ^= 1 << bit;
            match strict.decode_frame(&mut damaged) {
                Err(_) => {}
                Ok(None) if i < LENGTH_PREFIX_LEN => {}
                other => panic!("byte {i} bit {bit} flipped went unnoticed: {other:?}"),
            }
        }
    }
    // A codec that does not require checksums still verifies one that is present.
    let mut damaged = wire.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(matches!(
        lax.decode_frame(&mut damaged),
        Err(DecodeError::ChecksumMismatch { .. })
    ));

    let mut plain = BytesMut::new();
    lax.encode_frame(&frame, &mut plain).unwrap();
    assert!(matches!(
        strict.decode_frame(&mut plain),
        Err(DecodeError::MissingChecksum)
    ));
}

#[test]
fn datagrams_must_hold_exactly_one_frame() {
    let codec = FrameCodec::new().checksum(Checksum::Crc32c);
    let mut wire = BytesMut::new();
    codec
        .encode_frame(&Frame::data(1, &b"x"[..]), &mut wire)
        .unwrap();
    let good = wire.clone().freeze();
    assert_eq!(codec.decode_datagram(good.clone()).unwrap().id, 1);

    let mut long = wire.clone();
    long.put_u8(0);
    assert!(matches!(
        codec.decode_datagram(long.freeze()),
        Err(DecodeError::LengthMismatch { .. })
    ));
    assert!(matches!(
        codec.decode_datagram(good.slice(..10)),
        Err(DecodeError::Truncated { received: 10, .. })
    ));
}

#[test]
fn the_sender_refuses_oversized_frames_and_leaves_the_buffer_alone() {
    let codec = FrameCodec::new().max_frame_size(100);
    let mut buf = BytesMut::from(&b"already queued"[..]);

    let err = codec
        .encode_frame(&Frame::data(1, vec![0u8; 200]), &mut buf)
        .unwrap_err();
    assert!(matches!(
        err,
        EncodeError::FrameTooLarge {
            size: 212,
            limit: 100
        }
    ));
    assert!(err.to_string().contains("212") && err.to_string().contains("100"));
    assert!(!err.is_retryable());

    let err = codec
        .encode_message(FrameKind::Data, 1, &vec![7u8; 500], &mut buf)
        .unwrap_err();
    // 500 bytes of content + 2-byte varint length + 12-byte header.
    assert!(matches!(
        err,
        EncodeError::FrameTooLarge {
            size: 514,
            limit: 100
        }
    ));
    assert_eq!(&buf[..], b"already queued");

    // And the codec still works for frames that fit.
    codec
        .encode_frame(&Frame::data(2, vec![0u8; 50]), &mut buf)
        .unwrap();
}

#[test]
fn decoder_eof_inside_a_frame_is_a_truncation_error() {
    use tokio_util::codec::Decoder;
    let mut codec = FrameCodec::new();
    let mut wire = BytesMut::new();
    codec
        .encode_frame(&Frame::data(1, vec![1u8; 40]), &mut wire)
        .unwrap();
    let mut partial = BytesMut::from(&wire[..30]);
    assert!(codec.decode(&mut partial).unwrap().is_none());
    let err = codec.decode_eof(&mut partial).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::Truncated {
            received: 30,
            expected: 56
        }
    ));
    assert!(err.is_retryable());
}

#[test]
fn payloads_of_another_type_are_refused() {
    let codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    codec
        .encode_message(FrameKind::Data, 1, &(1u32, 2u32, 3u32), &mut buf)
        .unwrap();
    let frame = codec.decode_frame(&mut buf).unwrap().unwrap();
    assert!(matches!(
        frame.decode_payload::<(u32, u32)>(),
        Err(PayloadError::TrailingBytes { count: 1 })
    ));
    assert!(matches!(
        frame.decode_payload::<(u32, u32, u32, u32)>(),
        Err(PayloadError::Malformed(_))
    ));
}

#[test]
fn a_hostile_sequence_length_inside_a_payload_does_not_allocate_it() {
    // A postcard Vec<u64> claiming 2^60 elements in a 20-byte payload.
    let mut payload = BytesMut::new();
    let mut n: u64 = 1 << 60;
    while n >= 0x80 {
        payload.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    payload.put_u8(n as u8);
    payload.put_slice(&[1; 10]);
    let frame = Frame::data(1, payload.freeze());
    assert!(frame.decode_payload::<Vec<u64>>().is_err());
}

#[test]
fn flags_keep_the_checksum_bit_for_the_codec() {
    let codec = FrameCodec::new().checksum(Checksum::Crc32c);
    let frame = Frame::data(1, Bytes::new()).with_flags(Flags::from_bits(0xFF));
    assert_eq!(frame.flags.bits(), 0xFE);
    let mut wire = BytesMut::new();
    codec.encode_frame(&frame, &mut wire).unwrap();
    let back = codec.decode_frame(&mut wire).unwrap().unwrap();
    assert_eq!(back.flags.bits(), 0xFE);
    assert!(back.flags.contains(0x80));
}

#[test]
fn frame_kinds_round_trip_through_their_wire_values() {
    for kind in FrameKind::ALL {
        assert_eq!(FrameKind::from_u8(kind.as_u8()), Some(kind));
    }
    assert_eq!(FrameKind::from_u8(0), None);
    assert_eq!(FrameKind::from_u8(FrameKind::ALL.len() as u8 + 1), None);
}
