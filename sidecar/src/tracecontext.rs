//! W3C Trace Context: the `traceparent` header, and `tracestate`/`baggage` carried through.
//!
//! A [`TraceParent`] is the trace id of a run's trace and the span id of the hop that sent the
//! request. Parsing is strict, as the W3C Trace Context recommendation asks: lowercase hex only,
//! all-zero ids refused, version `ff` refused, version `00` exactly 55 characters. A higher
//! version is read as the recommendation says — at least 55 characters, the first 55 in the
//! version-00 layout, then either the end or a `-` — and only its sampled flag is kept, because
//! the other flags of an unknown version mean nothing to us. We always write version `00`.
//!
//! `tracestate` and `baggage` belong to the app and the tracing vendor: the sidecar forwards
//! them unchanged and only caps their size ([`check_passthrough`]).

use std::fmt;
use std::str::FromStr;

/// The W3C header carrying the trace id and the parent span id.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header with vendor-specific trace state, forwarded unchanged.
pub const TRACESTATE: &str = "tracestate";
/// The W3C header with application baggage, forwarded unchanged.
pub const BAGGAGE: &str = "baggage";
/// The largest `tracestate` or `baggage` value forwarded, in bytes.
pub const MAX_PASSTHROUGH_LEN: usize = 8 * 1024;

/// The `sampled` bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

/// The length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const LEN: usize = 55;

/// Why a trace header is refused. The sidecar then starts a fresh trace; it never fails a call
/// over a bad `traceparent`, but it says why in its logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceContextError {
    #[error(
        "traceparent is {len} characters; version 00 has exactly 55 (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>)"
    )]
    Length { len: usize },
    #[error(
        "traceparent field {field} is not lowercase hex of the right length; write 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>"
    )]
    Hex { field: &'static str },
    #[error("traceparent is missing the '-' after its {field}")]
    Separator { field: &'static str },
    #[error("traceparent version ff is forbidden by the W3C Trace Context recommendation")]
    ForbiddenVersion,
    #[error("traceparent {field} is all zeros, which the W3C Trace Context recommendation forbids")]
    ZeroId { field: &'static str },
    #[error("{header} is {len} bytes, over the {MAX_PASSTHROUGH_LEN}-byte limit; send less state")]
    TooLarge { header: &'static str, len: usize },
}

/// The `traceparent` of one hop: the run's trace id, the sending span's id and the trace flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The span id of the sender (W3C calls it `parent-id`).
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header value strictly (see the module doc).
    pub fn parse(value: &str) -> Result<Self, TraceContextError> {
        let b = value.as_bytes();
        if b.len() < LEN {
            return Err(TraceContextError::Length { len: b.len() });
        }
        let mut version = [0u8; 1];
        decode_hex(&b[0..2], &mut version, "version")?;
        let future = match version[0] {
            0x00 if b.len() == LEN => false,
            0x00 => return Err(TraceContextError::Length { len: b.len() }),
            0xff => return Err(TraceContextError::ForbiddenVersion),
            _ => true,
        };
        separator(b, 2, "version")?;
        let mut trace_id = [0u8; 16];
        decode_hex(&b[3..35], &mut trace_id, "trace-id")?;
        separator(b, 35, "trace-id")?;
        let mut parent_id = [0u8; 8];
        decode_hex(&b[36..52], &mut parent_id, "parent-id")?;
        separator(b, 52, "parent-id")?;
        let mut flags = [0u8; 1];
        decode_hex(&b[53..55], &mut flags, "trace-flags")?;
        if future && b.len() > LEN && b[LEN] != b'-' {
            return Err(TraceContextError::Separator {
                field: "trace-flags",
            });
        }
        if trace_id == [0; 16] {
            return Err(TraceContextError::ZeroId { field: "trace-id" });
        }
        if parent_id == [0; 8] {
            return Err(TraceContextError::ZeroId { field: "parent-id" });
        }
        let flags = if future { flags[0] & SAMPLED } else { flags[0] };
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace: random trace and span ids, sampled. Sampling decisions belong to telemetry,
    /// which may clear [`SAMPLED`].
    pub fn new_root() -> Self {
        Self {
            trace_id: random_id(),
            parent_id: random_id(),
            flags: SAMPLED,
        }
    }

    /// The next span of the same trace: same trace id and flags, a new random span id.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            parent_id: random_id(),
            flags: self.flags,
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex characters (the form tracing backends show).
    pub fn trace_id_hex(&self) -> String {
        hex_string(&self.trace_id)
    }

    /// The parent span id as 16 lowercase hex characters.
    pub fn parent_id_hex(&self) -> String {
        hex_string(&self.parent_id)
    }
}

impl FromStr for TraceParent {
    type Err = TraceContextError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// The version-00 header value, written without allocating.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        write_hex(f, &self.trace_id)?;
        f.write_str("-")?;
        write_hex(f, &self.parent_id)?;
        f.write_str("-")?;
        write_hex(f, &[self.flags])
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

/// Written as its header value, so a context carrying it stays readable.
impl serde::Serialize for TraceParent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TraceParent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = TraceParent;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a W3C traceparent string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TraceParent, E> {
                TraceParent::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Checks a `tracestate` or `baggage` value before it is forwarded unchanged.
pub fn check_passthrough(header: &'static str, value: &str) -> Result<(), TraceContextError> {
    if value.len() > MAX_PASSTHROUGH_LEN {
        return Err(TraceContextError::TooLarge {
            header,
            len: value.len(),
        });
    }
    Ok(())
}

/// Parses a 32-character lowercase hex trace id; all zeros is invalid.
pub fn parse_trace_id(hex: &str) -> Result<[u8; 16], TraceContextError> {
    let mut id = [0u8; 16];
    decode_hex(hex.as_bytes(), &mut id, "trace-id")?;
    if id == [0; 16] {
        return Err(TraceContextError::ZeroId { field: "trace-id" });
    }
    Ok(id)
}

/// Parses a 16-character lowercase hex span id; all zeros is invalid.
pub fn parse_span_id(hex: &str) -> Result<[u8; 8], TraceContextError> {
    let mut id = [0u8; 8];
    decode_hex(hex.as_bytes(), &mut id, "parent-id")?;
    if id == [0; 8] {
        return Err(TraceContextError::ZeroId { field: "parent-id" });
    }
    Ok(id)
}

/// Writes `bytes` as lowercase hex.
pub fn write_hex(out: &mut impl fmt::Write, bytes: &[u8]) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Through a buffer: one `write_str` per 32 bytes, not a formatter call per digit.
    let mut buf = [0u8; 64];
    for chunk in bytes.chunks(32) {
        for (pair, &byte) in buf.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        let digits = &buf[..chunk.len() * 2];
        // Only ASCII hex digits were written.
        out.write_str(std::str::from_utf8(digits).map_err(|_| fmt::Error)?)?;
    }
    Ok(())
}

fn hex_string(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    // Writing into a String cannot fail.
    let _ = write_hex(&mut s, bytes);
    s
}

fn separator(b: &[u8], at: usize, field: &'static str) -> Result<(), TraceContextError> {
    match b.get(at) {
        Some(b'-') => Ok(()),
        _ => Err(TraceContextError::Separator { field }),
    }
}

/// Decodes lowercase hex into exactly `out.len()` bytes.
fn decode_hex(hex: &[u8], out: &mut [u8], field: &'static str) -> Result<(), TraceContextError> {
    if hex.len() != out.len() * 2 {
        return Err(TraceContextError::Hex { field });
    }
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
            return Err(TraceContextError::Hex { field });
        };
        *byte = hi << 4 | lo;
    }
    Ok(())
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// A random, non-zero id. Trace and span ids must be unique, not secret: they come from a
/// thread-local generator seeded from the system's randomness (`fastrand`), without the system
/// call per id that drawing from the kernel costs on every request.
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    fastrand::fill(&mut id);
    if id.iter().all(|&b| b == 0) {
        fallback_id(&mut id);
    }
    id
}

fn fallback_id(id: &mut [u8]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut state = nanos ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
    for chunk in id.chunks_mut(8) {
        // SplitMix64: cheap and well mixed.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let bytes = (z | 1).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_parses_and_prints_back() {
        let tp = TraceParent::parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 0x01);
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), SPEC_EXAMPLE);
    }

    #[test]
    fn the_spec_example_not_sampled_keeps_its_flags() {
        let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
            .parse()
            .unwrap();
        assert!(!tp.sampled());
        // Level 2's random flag and other version-00 flags pass through.
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03").unwrap();
        assert_eq!(tp.flags, 0x03);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let cases = [
            ("", "empty"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                "short",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
                "v00 too long",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "uppercase",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "zero trace",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "zero parent",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "bad version",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separator",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
                "short trace",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                "bad flags",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7+01",
                "flags sep",
            ),
            (
                " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "leading space",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0é736-00f067aa0ba902b7-01",
                "non-ascii",
            ),
        ];
        for (value, why) in cases {
            assert!(
                TraceParent::parse(value).is_err(),
                "accepted {why}: {value:?}"
            );
        }
    }

    #[test]
    fn a_future_version_is_read_as_far_as_version_00_goes() {
        let tp = TraceParent::parse(
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-bring",
        )
        .unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(tp.sampled());
        // Only the sampled flag of an unknown version is kept, and we write version 00.
        let tp =
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff").unwrap();
        assert_eq!(tp.flags, SAMPLED);
        assert!(tp.to_string().starts_with("00-"));
        // The part after the first 55 characters must be separated by '-'.
        assert_eq!(
            TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            Err(TraceContextError::Separator {
                field: "trace-flags"
            })
        );
        // Shorter than 55 is refused for every version.
        assert!(
            TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7").is_err()
        );
    }

    #[test]
    fn a_child_span_keeps_the_trace_and_gets_a_new_span_id() {
        let root = TraceParent::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.flags, root.flags);
        assert_ne!(child.parent_id, root.parent_id);
        assert_ne!(TraceParent::new_root().trace_id, root.trace_id);
        assert_eq!(TraceParent::parse(&child.to_string()), Ok(child));
    }

    #[test]
    fn the_fallback_ids_are_never_zero_and_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        fallback_id(&mut a);
        fallback_id(&mut b);
        assert_ne!(a, [0; 16]);
        assert_ne!(a, b);
    }

    #[test]
    fn hex_is_written_across_buffer_chunks() {
        let bytes: Vec<u8> = (0..=80).collect();
        let mut out = String::new();
        write_hex(&mut out, &bytes).unwrap();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(out, expected);
        let mut empty = String::new();
        write_hex(&mut empty, &[]).unwrap();
        assert_eq!(empty, "");
    }

    #[test]
    fn hex_ids_parse_strictly() {
        assert_eq!(
            parse_span_id("00f067aa0ba902b7"),
            Ok([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert!(parse_span_id("00F067AA0BA902B7").is_err());
        assert!(parse_span_id("0000000000000000").is_err());
        assert!(parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736").is_ok());
        assert!(parse_trace_id("4bf92f3577b34da6").is_err());
    }

    #[test]
    fn oversized_tracestate_and_baggage_are_refused() {
        assert!(check_passthrough(TRACESTATE, "congo=t61rcWkgMzE").is_ok());
        let big = "k=v,".repeat(MAX_PASSTHROUGH_LEN / 4 + 1);
        assert_eq!(
            check_passthrough(BAGGAGE, &big),
            Err(TraceContextError::TooLarge {
                header: BAGGAGE,
                len: big.len()
            })
        );
    }

    #[test]
    fn a_traceparent_serializes_as_its_header_value() {
        let tp = TraceParent::parse(SPEC_EXAMPLE).unwrap();
        let json = serde_json::to_string(&tp).unwrap();
        assert_eq!(json, format!("\"{SPEC_EXAMPLE}\""));
        assert_eq!(serde_json::from_str::<TraceParent>(&json).unwrap(), tp);
        assert!(serde_json::from_str::<TraceParent>("\"00-zz\"").is_err());
    }

    proptest! {
        #[test]
        fn any_valid_traceparent_round_trips(
            trace_id in any::<[u8; 16]>().prop_filter("non-zero", |t| *t != [0; 16]),
            parent_id in any::<[u8; 8]>().prop_filter("non-zero", |p| *p != [0; 8]),
            flags in any::<u8>(),
        ) {
            let tp = TraceParent { trace_id, parent_id, flags };
            prop_assert_eq!(TraceParent::parse(&tp.to_string()), Ok(tp));
        }

        #[test]
        fn arbitrary_text_never_panics(s in "\\PC{0,80}") {
            let _ = TraceParent::parse(&s);
        }
    }
}
