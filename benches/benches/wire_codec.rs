//! Encode and decode throughput of the frame codec (frames/s and bytes/s).

use bytes::BytesMut;
use courier_wire::{Checksum, Frame, FrameCodec, FrameKind};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

const SIZES: [usize; 3] = [64, 1024, 64 * 1024];

fn codecs() -> [(&'static str, FrameCodec); 2] {
    [
        ("plain", FrameCodec::new()),
        ("crc32c", FrameCodec::new().checksum(Checksum::Crc32c)),
    ]
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, codec) in codecs() {
        for size in SIZES {
            let frame = Frame::data(42, vec![7u8; size]);
            let wire_len = (frame.body_len() + 4) as u64;
            group.throughput(Throughput::ElementsAndBytes {
                elements: 1,
                bytes: wire_len,
            });
            let mut buf = BytesMut::with_capacity(size + 64);
            group.bench_with_input(BenchmarkId::new(name, size), &frame, |b, frame| {
                b.iter(|| {
                    buf.clear();
                    codec.encode_frame(black_box(frame), &mut buf).unwrap();
                    black_box(&buf);
                })
            });
        }
    }
    group.finish();
}

fn encode_message(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode_message");
    let codec = FrameCodec::new();
    for size in SIZES {
        let value = (42u64, "subject.name", vec![7u8; size]);
        group.throughput(Throughput::ElementsAndBytes {
            elements: 1,
            bytes: size as u64,
        });
        let mut buf = BytesMut::with_capacity(size + 64);
        group.bench_with_input(BenchmarkId::new("postcard", size), &value, |b, value| {
            b.iter(|| {
                buf.clear();
                codec
                    .encode_message(FrameKind::Data, 1, black_box(value), &mut buf)
                    .unwrap();
                black_box(&buf);
            })
        });
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, codec) in codecs() {
        for size in SIZES {
            let mut wire = BytesMut::new();
            codec
                .encode_frame(&Frame::data(42, vec![7u8; size]), &mut wire)
                .unwrap();
            let wire = wire.freeze();
            group.throughput(Throughput::ElementsAndBytes {
                elements: 1,
                bytes: wire.len() as u64,
            });
            group.bench_with_input(BenchmarkId::new(name, size), &wire, |b, wire| {
                // The input copy is setup, not timed.
                b.iter_batched(
                    || BytesMut::from(&wire[..]),
                    |mut buf| black_box(codec.decode_frame(&mut buf).unwrap().unwrap()),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, encode, encode_message, decode);
criterion_main!(benches);
