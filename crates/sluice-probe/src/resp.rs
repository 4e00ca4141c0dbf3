//! The part of RESP (the Redis serialization protocol, version 2) that the `redis` check needs:
//! encoding commands, and parsing one reply element at a time from a byte buffer.
//!
//! The parser never panics and never asks for more than [`LINE_MAX`] bytes of a line or
//! [`BULK_MAX`] bytes of a bulk string: the caller's read limit bounds everything else.

/// The longest line (simple string, error, integer, length header) accepted.
pub(crate) const LINE_MAX: usize = 4096;

/// The longest bulk string accepted; the `redis` check needs only short ones (`master`).
pub(crate) const BULK_MAX: usize = 4096;

/// One RESP2 element. For an array only the header is parsed; its elements follow it in the
/// buffer and are parsed one by one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Element<'a> {
    /// `+OK`: the text after `+`.
    Simple(&'a [u8]),
    /// `-ERR ...`: the text after `-`.
    Error(&'a [u8]),
    /// `:42`.
    Integer(i64),
    /// `$6\r\nmaster\r\n`; `None` for the null bulk string `$-1`.
    Bulk(Option<&'a [u8]>),
    /// `*3`: the element count; `None` for the null array `*-1`.
    Array(Option<usize>),
}

/// The result of parsing from the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// An element and the number of bytes it took.
    Done(Element<'a>, usize),
    /// The buffer holds a valid beginning: read more.
    Incomplete,
    /// Not RESP2; says what is wrong.
    Invalid(&'static str),
}

/// A command as a RESP array of bulk strings, appended to `out`.
pub(crate) fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one element from the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Parsed<'_> {
    let Some(&kind) = buf.first() else {
        return Parsed::Incomplete;
    };
    let (line, after_line) = match line(&buf[1..]) {
        Line::Done(line, len) => (line, 1 + len),
        Line::Incomplete => return Parsed::Incomplete,
        Line::TooLong => return Parsed::Invalid("line too long"),
    };
    match kind {
        b'+' => Parsed::Done(Element::Simple(line), after_line),
        b'-' => Parsed::Done(Element::Error(line), after_line),
        b':' => match integer(line) {
            Some(value) => Parsed::Done(Element::Integer(value), after_line),
            None => Parsed::Invalid("bad integer"),
        },
        b'$' => match length(line) {
            Length::Null => Parsed::Done(Element::Bulk(None), after_line),
            Length::Invalid => Parsed::Invalid("bad bulk string length"),
            Length::Count(len) if len > BULK_MAX => Parsed::Invalid("bulk string too long"),
            Length::Count(len) => {
                let body = &buf[after_line..];
                if body.len() < len + 2 {
                    Parsed::Incomplete
                } else if &body[len..len + 2] != b"\r\n" {
                    Parsed::Invalid("bulk string not followed by CRLF")
                } else {
                    Parsed::Done(Element::Bulk(Some(&body[..len])), after_line + len + 2)
                }
            }
        },
        b'*' => match length(line) {
            Length::Null => Parsed::Done(Element::Array(None), after_line),
            Length::Invalid => Parsed::Invalid("bad array length"),
            Length::Count(count) => Parsed::Done(Element::Array(Some(count)), after_line),
        },
        _ => Parsed::Invalid("unknown reply type"),
    }
}

enum Line<'a> {
    /// The line without its CRLF, and its length with it.
    Done(&'a [u8], usize),
    Incomplete,
    TooLong,
}

fn line(buf: &[u8]) -> Line<'_> {
    let window = &buf[..buf.len().min(LINE_MAX + 2)];
    match window.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => Line::Done(&buf[..end], end + 2),
        None if buf.len() >= LINE_MAX + 2 => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// A decimal `i64`: an optional `-`, then 1 to 19 digits, nothing else.
fn integer(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix(b"-") {
        Some(digits) => (true, digits),
        None => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut value: i64 = 0;
    for &digit in digits {
        value = value
            .checked_mul(10)?
            .checked_add(i64::from(digit - b'0'))?;
    }
    Some(if negative { -value } else { value })
}

enum Length {
    Count(usize),
    Null,
    Invalid,
}

fn length(text: &[u8]) -> Length {
    match integer(text) {
        Some(-1) => Length::Null,
        Some(len) => usize::try_from(len).map_or(Length::Invalid, Length::Count),
        None => Length::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"AUTH", b"p w"]);
        encode_command(&mut out, &[b"PING"]);
        assert_eq!(
            out,
            b"*2\r\n$4\r\nAUTH\r\n$3\r\np w\r\n*1\r\n$4\r\nPING\r\n"
        );
    }

    #[test]
    fn replies() {
        assert_eq!(
            parse(b"+PONG\r\n"),
            Parsed::Done(Element::Simple(b"PONG"), 7)
        );
        assert_eq!(
            parse(b"-NOAUTH Authentication required.\r\n+OK\r\n"),
            Parsed::Done(Element::Error(b"NOAUTH Authentication required."), 34)
        );
        assert_eq!(parse(b":-12\r\n"), Parsed::Done(Element::Integer(-12), 6));
        assert_eq!(
            parse(b"$6\r\nmaster\r\n:0\r\n"),
            Parsed::Done(Element::Bulk(Some(b"master")), 12)
        );
        assert_eq!(parse(b"$-1\r\n"), Parsed::Done(Element::Bulk(None), 5));
        assert_eq!(parse(b"*3\r\n$6"), Parsed::Done(Element::Array(Some(3)), 4));
        assert_eq!(parse(b"*-1\r\n"), Parsed::Done(Element::Array(None), 5));
        assert_eq!(
            parse(b"$0\r\n\r\n"),
            Parsed::Done(Element::Bulk(Some(b"")), 6)
        );
    }

    #[test]
    fn incomplete_until_the_last_byte() {
        let whole: &[u8] = b"$6\r\nmaster\r\n";
        for len in 0..whole.len() {
            assert_eq!(parse(&whole[..len]), Parsed::Incomplete, "{len}");
        }
    }

    #[test]
    fn invalid_replies() {
        for bad in [
            &b"PONG\r\n"[..],
            b"\x00\xff\r\n",
            b":12a\r\n",
            b":\r\n",
            b":99999999999999999999\r\n",
            b"$-2\r\n",
            b"$4\r\nmasterxx\r\n",
            b"$99999999\r\n",
            b"*-5\r\n",
            b"_\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{}",
                bad.escape_ascii()
            );
        }
        let endless = vec![b'+'; LINE_MAX + 3];
        assert_eq!(parse(&endless), Parsed::Invalid("line too long"));
    }

    #[test]
    fn never_panics() {
        // Every prefix of real replies, every one-byte change to them, and pseudo-random bytes.
        let replies: [&[u8]; 4] = [
            b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n",
            b"$-1\r\n:-9223372036854775808\r\n",
            b"-ERR x\r\n$3\r\nabc\r\n",
            b":9223372036854775807\r\n*-1\r\n",
        ];
        for reply in replies {
            for len in 0..=reply.len() {
                check_consistent(&reply[..len]);
                for at in 0..len {
                    for byte in [0u8, b'\r', b'\n', b'-', b'9', b'$', b'*', 0xff] {
                        let mut changed = reply[..len].to_vec();
                        changed[at] = byte;
                        check_consistent(&changed);
                    }
                }
            }
        }
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let alphabet = b"+-:$*\r\n0123-9x";
            let bytes: Vec<u8> = (0..len)
                .map(|i| alphabet[((state >> (i % 8 * 8)) as usize + i) % alphabet.len()])
                .collect();
            check_consistent(&bytes);
        }
    }

    /// A parsed element never claims more bytes than the buffer holds.
    fn check_consistent(bytes: &[u8]) {
        if let Parsed::Done(_, len) = parse(bytes) {
            assert!(len <= bytes.len(), "{}", bytes.escape_ascii());
        }
    }
}
