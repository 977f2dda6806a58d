//! Every message type's decoder, `pcb_schemas::decode::<T>`, on arbitrary payloads and schema
//! headers. Every stage decodes what arrives on its subjects, and any client can publish
//! there: a payload must be decoded or refused with a `CodecError`, never panic a stage.
//!
//! Input: the first byte picks the message type (low 4 bits) and the schema header (the next
//! 2 bits: none, the type's own, or another type's); the rest is the MessagePack payload.
//!
//! When a payload decodes, the value must survive `encode` and `decode` again: the second
//! decode equals the first (when the value equals itself, i.e. holds no NaN), and encoding
//! both gives the same bytes. Its `msg_id` (the JetStream dedup id, computed from decoded
//! fields) must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcb_schemas::{
    decode, encode, CodecError, DeadLetter, Detection, EncodedImage, Envelope, ModelEvent,
    RawImage, ShardRecord, TrainCandidate, TrainProgress,
};
use std::fmt::Debug;

/// Every `Envelope` implementation in `schemas/src/messages.rs`.
const SCHEMAS: [&str; 8] = [
    RawImage::SCHEMA,
    EncodedImage::SCHEMA,
    ShardRecord::SCHEMA,
    DeadLetter::SCHEMA,
    Detection::SCHEMA,
    ModelEvent::SCHEMA,
    TrainProgress::SCHEMA,
    TrainCandidate::SCHEMA,
];

fn check<T: Envelope + PartialEq + Debug>(payload: &[u8], header_mode: u8) {
    let other = SCHEMAS
        .iter()
        .copied()
        .find(|s| *s != T::SCHEMA)
        .unwrap_or("none");
    let header = match header_mode {
        0 => None,
        1 | 3 => Some(T::SCHEMA),
        _ => Some(other),
    };
    let first = match decode::<T>(payload, header) {
        Ok(value) => value,
        Err(CodecError::WrongSchema { .. }) => {
            assert_eq!(header, Some(other), "WrongSchema for the type's own schema");
            return;
        }
        Err(_) => return,
    };
    assert_ne!(header, Some(other), "decoded under another type's schema");
    let _ = first.msg_id();
    let bytes = encode(&first).expect("a decoded message must encode");
    let second: T = decode(&bytes, Some(T::SCHEMA))
        .unwrap_or_else(|e| panic!("re-encoded {} does not decode: {e}", T::SCHEMA));
    #[allow(clippy::eq_op)]
    if first == first {
        assert_eq!(first, second, "{} changed in a round trip", T::SCHEMA);
    }
    let again = encode(&second).expect("encode the round-tripped message");
    assert_eq!(
        bytes,
        again,
        "{} encodes differently after a round trip",
        T::SCHEMA
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let header_mode = (selector >> 4) & 3;
    match selector & 0x0f {
        0 | 8 => check::<RawImage>(payload, header_mode),
        1 | 9 => check::<EncodedImage>(payload, header_mode),
        2 | 10 => check::<ShardRecord>(payload, header_mode),
        3 | 11 => check::<DeadLetter>(payload, header_mode),
        4 | 12 => check::<Detection>(payload, header_mode),
        5 | 13 => check::<ModelEvent>(payload, header_mode),
        6 | 14 => check::<TrainProgress>(payload, header_mode),
        _ => check::<TrainCandidate>(payload, header_mode),
    }
});
