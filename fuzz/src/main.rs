//! A mutation fuzzer for Courier's decoders that runs on stable Rust.
//!
//! cargo-fuzz needs a nightly toolchain, which this project's machines do
//! not have, so this harness does the same job without compiler
//! instrumentation: it starts from a seed corpus of valid frames (every kind,
//! with and without checksums, empty to large payloads), mutates them the
//! ways that break parsers (bit flips, interesting bytes and lengths,
//! insertions, deletions, splices), and feeds each input to every decoder:
//! the stream decoder whole and in random fragments, the datagram decoder,
//! and the handshake: the preamble check, and the hello that opens every
//! RPC connection (as the whole input, and as the payload of each frame it
//! decodes to), plus typed payload decoding. Inputs that produce an
//! outcome not seen before join the corpus, a cheap stand-in for coverage
//! feedback.
//!
//! It checks, for every input:
//! - no panic (a panicking input is saved under `fuzz/artifacts/` and the
//!   seed printed, so the run can be replayed);
//! - the decoder never holds more than one maximum-size frame of memory;
//! - a stream decodes to the same frames however it is fragmented;
//! - every frame decoded re-encodes to exactly the bytes it came from.
//!
//! Usage: `courier-fuzz [--seconds N] [--seed S]`

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use courier_test_support::Rng;
use courier_wire::{preamble, Checksum, Flags, Frame, FrameCodec, FrameKind, LENGTH_PREFIX_LEN};

const LIMIT: usize = 64 * 1024;
const MAX_INPUT: usize = 3 * LIMIT;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    values: Vec<u64>,
    nested: Option<(i32, &'a [u8])>,
}

fn seed_corpus() -> Vec<Vec<u8>> {
    let mut corpus = Vec::new();
    for checksum in [Checksum::Off, Checksum::Crc32c] {
        let codec = FrameCodec::new().max_frame_size(LIMIT).checksum(checksum);
        for (i, kind) in FrameKind::ALL.into_iter().enumerate() {
            for size in [0usize, 1, 17, 300, 4000] {
                let frame = Frame::new(kind, (i as u64) << 40 | size as u64, vec![i as u8; size])
                    .with_flags(Flags::from_bits((i as u8) << 1));
                let mut buf = BytesMut::new();
                codec.encode_frame(&frame, &mut buf).expect("seed fits");
                corpus.push(buf.to_vec());
            }
        }
        let mut buf = BytesMut::new();
        let sample = Sample {
            name: "fuzz",
            values: vec![1, 1 << 40, u64::MAX],
            nested: Some((-3, b"abc")),
        };
        codec
            .encode_message(FrameKind::Request, 7, &sample, &mut buf)
            .unwrap();
        corpus.push(buf.to_vec());
        // Several frames back to back.
        let mut stream = BytesMut::new();
        for id in 0..4 {
            codec
                .encode_frame(&Frame::data(id, vec![id as u8; 40]), &mut stream)
                .unwrap();
        }
        corpus.push(stream.to_vec());
        // A handshake as a client sends it: preamble, then a hello frame.
        for token in [None, Some("a-bearer-token")] {
            let hello = courier_rpc::auth::Hello {
                token: token.map(courier_rpc::Secret::new),
            };
            let mut handshake = BytesMut::from(&preamble::preamble()[..]);
            codec
                .encode_message(FrameKind::Hello, 0, &hello, &mut handshake)
                .unwrap();
            corpus.push(handshake.to_vec());
        }
    }
    corpus.push(preamble::preamble().to_vec());
    corpus.push(b"GET / HTTP/1.1\r\n\r\n".to_vec());
    corpus
}

const INTERESTING_BYTES: [u8; 8] = [0, 1, 0x7F, 0x80, 0xFF, 12, 13, 16];

fn interesting_length(rng: &mut Rng) -> u32 {
    let choices = [
        0,
        1,
        11,
        12,
        13,
        15,
        16,
        17,
        LIMIT as u32 - 1,
        LIMIT as u32,
        LIMIT as u32 + 1,
        u32::MAX,
        u32::MAX / 2,
    ];
    choices[rng.index(choices.len())]
}

fn mutate(input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
    for _ in 0..1 + rng.index(4) {
        let len = input.len();
        match rng.index(9) {
            0 if len > 0 => {
                let i = rng.index(len);
                input[i] ^= 1 << rng.index(8);
            }
            1 if len > 0 => {
                let i = rng.index(len);
                input[i] = INTERESTING_BYTES[rng.index(INTERESTING_BYTES.len())];
            }
            2 if len > 0 => {
                let i = rng.index(len);
                input[i] = rng.next_u64() as u8;
            }
            3 => {
                // Overwrite a length prefix (at the start or anywhere).
                let at = if rng.index(2) == 0 {
                    0
                } else {
                    rng.index(len + 1)
                };
                let bytes = interesting_length(rng).to_le_bytes();
                for (k, b) in bytes.iter().enumerate() {
                    if at + k < input.len() {
                        input[at + k] = *b;
                    }
                }
            }
            4 => {
                let at = rng.index(len + 1);
                let count = 1 + rng.index(16);
                let bytes: Vec<u8> = (0..count).map(|_| rng.next_u64() as u8).collect();
                input.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let start = rng.index(len);
                let end = (start + 1 + rng.index(32)).min(len);
                input.drain(start..end);
            }
            6 if len > 0 => {
                let cut = rng.index(len);
                input.truncate(cut);
            }
            7 => {
                let other = &corpus[rng.index(corpus.len())];
                let at = rng.index(len + 1);
                let from = rng.index(other.len() + 1);
                let to = (from + rng.index(other.len() - from + 1)).min(other.len());
                input.splice(at..at, other[from..to].iter().copied());
            }
            _ if len > 1 => {
                let start = rng.index(len);
                let end = (start + 1 + rng.index(64)).min(len);
                let copy = input[start..end].to_vec();
                let at = rng.index(input.len() + 1);
                input.splice(at..at, copy);
            }
            _ => input.push(rng.next_u64() as u8),
        }
    }
    input.truncate(MAX_INPUT);
}

/// Decodes `input` as a stream fed in pieces; returns the frames and a short
/// description of how it ended. Checks the memory bound and re-encoding.
fn decode_stream(codec: &FrameCodec, input: &[u8], pieces: &[usize]) -> (Vec<Frame>, String) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut piece_index = 0;
    loop {
        let before = buf.clone();
        match codec.decode_frame(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = before.len() - buf.len();
                check_reencode(codec, &frame, &before[..consumed]);
                frames.push(frame);
            }
            Ok(None) => {
                if fed == input.len() {
                    let end = if buf.is_empty() {
                        "end".to_string()
                    } else {
                        format!("truncated:{}", buf.len().min(20))
                    };
                    return (frames, end);
                }
                let size = pieces[piece_index % pieces.len()].max(1);
                piece_index += 1;
                let next = (fed + size).min(input.len());
                buf.extend_from_slice(&input[fed..next]);
                fed = next;
            }
            Err(err) => {
                let name = format!("{err:?}");
                return (
                    frames,
                    name.split([' ', '(', '{']).next().unwrap_or("").to_string(),
                );
            }
        }
        assert!(
            buf.capacity() <= input.len() + LENGTH_PREFIX_LEN + codec.limit() + 8 * 1024,
            "decoder holds {} bytes for a {}-byte input",
            buf.capacity(),
            input.len()
        );
    }
}

fn check_reencode(codec: &FrameCodec, frame: &Frame, original: &[u8]) {
    let had_checksum = original.get(6).is_some_and(|flags| flags & 1 == 1);
    let policy = if had_checksum {
        Checksum::Crc32c
    } else {
        Checksum::Off
    };
    let mut again = BytesMut::new();
    codec
        .checksum(policy)
        .encode_frame(frame, &mut again)
        .expect("a decoded frame re-encodes");
    assert_eq!(
        &again[..],
        original,
        "re-encoding a decoded frame changed its bytes"
    );
}

/// Runs every decoder on one input; returns an outcome signature.
fn run_one(input: &[u8], rng_pieces: &[usize]) -> String {
    let mut signature = String::new();
    for checksum in [Checksum::Off, Checksum::Crc32c] {
        let codec = FrameCodec::new().max_frame_size(LIMIT).checksum(checksum);
        let (whole, end) = decode_stream(&codec, input, &[input.len().max(1)]);
        let (fragmented, end2) = decode_stream(&codec, input, rng_pieces);
        assert_eq!(
            whole, fragmented,
            "fragmentation changed the frames decoded"
        );
        assert_eq!(end, end2, "fragmentation changed how decoding ended");
        signature.push_str(&format!("{}:{end};", whole.len().min(3)));
        for frame in &whole {
            // Typed decoding of arbitrary payloads must fail cleanly.
            let _ = frame.decode_payload::<Sample<'_>>();
            let _ = frame.decode_payload::<Vec<String>>();
            let _ = courier_rpc::auth::decode_hello(&frame.payload);
        }
        // The bytes after a preamble, as a server reads a handshake.
        if let Some(rest) = input.get(preamble::PREAMBLE_LEN..) {
            let (after, _) = decode_stream(&codec, rest, rng_pieces);
            for frame in after.iter().filter(|f| f.kind == FrameKind::Hello) {
                signature.push_str(match courier_rpc::auth::decode_hello(&frame.payload) {
                    Ok(_) => "hello-ok;",
                    Err(_) => "hello-err;",
                });
            }
        }
        match codec.decode_datagram(Bytes::copy_from_slice(input)) {
            Ok(_) => signature.push_str("dgram-ok;"),
            Err(err) => signature.push_str(
                format!("{err:?}")
                    .split([' ', '(', '{'])
                    .next()
                    .unwrap_or(""),
            ),
        }
    }
    if let Some(first) = input.get(..preamble::PREAMBLE_LEN) {
        let first: [u8; preamble::PREAMBLE_LEN] = first.try_into().unwrap();
        signature.push_str(if preamble::check(&first).is_ok() {
            ";pre-ok"
        } else {
            ";pre-err"
        });
    }
    signature
}

fn main() {
    let mut seconds = 60u64;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().and_then(|v| v.parse().ok());
        match (arg.as_str(), value) {
            ("--seconds", Some(v)) => seconds = v,
            ("--seed", Some(v)) => seed = v,
            _ => {
                eprintln!("usage: courier-fuzz [--seconds N] [--seed S]");
                std::process::exit(2);
            }
        }
    }
    println!("fuzzing the frame decoders and the handshake for {seconds} s, seed {seed} (replay with --seed {seed})");
    let mut rng = Rng(seed);
    let mut corpus = seed_corpus();
    let seeds = corpus.len();
    let mut seen = HashSet::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tried = 0u64;
    // Panics are caught and reported below; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    while Instant::now() < deadline {
        for _ in 0..256 {
            let mut input = corpus[rng.index(corpus.len())].clone();
            mutate(&mut input, &corpus, &mut rng);
            let pieces: Vec<usize> = (0..8).map(|_| 1 + rng.index(40)).collect();
            let outcome = catch_unwind(AssertUnwindSafe(|| run_one(&input, &pieces)));
            tried += 1;
            match outcome {
                Ok(signature) => {
                    if seen.insert(signature) && corpus.len() < 10_000 {
                        corpus.push(input);
                    }
                }
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("artifacts");
                    let _ = std::fs::create_dir_all(&dir);
                    let path = dir.join(format!("crash-{seed}-{tried}.bin"));
                    let _ = std::fs::write(&path, &input);
                    eprintln!("FAILURE after {tried} inputs: {message}");
                    eprintln!(
                        "input saved to {}; replay with --seed {seed}",
                        path.display()
                    );
                    std::process::exit(1);
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "fuzz: {tried} inputs in {elapsed:.1} s ({:.0}/s), no failures; corpus grew from {seeds} seeds to {} inputs, {} distinct outcomes",
        tried as f64 / elapsed,
        corpus.len(),
        seen.len()
    );
}
