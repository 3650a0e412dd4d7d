//! Map keys and values: spec values ↔ bytes, following the map's layout.
//!
//! Accepted spec forms, for any layout of the right size:
//! - integers (little-endian, sized to the field or map key/value),
//! - IPv4/IPv6 addresses (network order) for 4/16-byte fields,
//! - CIDRs for LPM trie keys (`u32` prefix length, then the address),
//! - `0x…` hex: the literal bytes, exactly as many as the size,
//! - with BTF, a mapping of field names (missing fields are zero) and
//!   lists for arrays.
//!
//! Decoding goes the other way for plans and status: structs become
//! mappings, `u8[4]`/`u8[16]` become addresses, LPM keys become CIDRs.

use std::net::IpAddr;

use serde_json::{Map, Value};

use crate::net::Cidr;

/// Byte layout of a key or value.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    Int {
        size: usize,
        signed: bool,
    },
    Bytes {
        size: usize,
    },
    Array {
        size: usize,
        len: usize,
        elem: Box<Layout>,
    },
    Struct {
        size: usize,
        fields: Vec<Field>,
    },
    /// No usable type information: raw bytes of this size.
    Opaque {
        size: usize,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub layout: Layout,
}

/// How a value without type information was written in the spec, so that
/// observed bytes are shown back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    #[default]
    Auto,
    Int,
    Ip,
    Cidr,
    Hex,
}

impl Form {
    pub fn of(v: &Value) -> Form {
        match v {
            Value::Number(_) => Form::Int,
            Value::String(s) if s.starts_with("0x") => Form::Hex,
            Value::String(s) if s.contains('/') => Form::Cidr,
            Value::String(_) => Form::Ip,
            _ => Form::Auto,
        }
    }
}

impl Layout {
    pub fn size(&self) -> usize {
        match self {
            Layout::Int { size, .. }
            | Layout::Bytes { size }
            | Layout::Array { size, .. }
            | Layout::Struct { size, .. }
            | Layout::Opaque { size } => *size,
        }
    }

    /// An LPM trie key layout: `{ u32 prefixlen; u8 addr[4 or 16]; }`.
    fn lpm_addr_len(&self) -> Option<usize> {
        match self {
            Layout::Struct { fields, size } if fields.len() == 2 => {
                let first_is_len = matches!(fields[0].layout, Layout::Int { size: 4, .. }) && fields[0].offset == 0;
                match &fields[1].layout {
                    Layout::Bytes { size: n } if first_is_len && (*n == 4 || *n == 16) && *size == 4 + n => Some(*n),
                    _ => None,
                }
            }
            Layout::Opaque { size: 8 } => Some(4),
            Layout::Opaque { size: 20 } => Some(16),
            _ => None,
        }
    }
}

/// Encodes `v` into exactly `layout.size()` bytes.
pub fn encode(v: &Value, layout: &Layout) -> Result<Vec<u8>, String> {
    let size = layout.size();
    if let (Value::String(s), Layout::Bytes { size }) = (v, layout)
        && *size > 16
        && !is_hex_of(s, *size)
    {
        return encode_text(s, *size);
    }
    if let Value::String(s) = v {
        if let Some(hex) = s.strip_prefix("0x") {
            let bytes = parse_hex(hex).ok_or_else(|| format!("`{s}` is not valid hex bytes"))?;
            if bytes.len() != size {
                return Err(format!("`{s}` is {} bytes, expected {size}", bytes.len()));
            }
            return Ok(bytes);
        }
        if s.contains('/') {
            let cidr: Cidr = s.parse()?;
            let n = layout.lpm_addr_len().ok_or_else(|| {
                format!("a CIDR needs an LPM trie key (prefix length + address), this is {size} bytes")
            })?;
            let addr = cidr.addr_bytes();
            if addr.len() != n {
                return Err(format!("`{s}` is {}, the key holds {n}-byte addresses", family(&cidr.addr)));
            }
            let mut out = (cidr.len as u32).to_le_bytes().to_vec();
            out.extend(addr);
            return Ok(out);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            let bytes = crate::net::ip_bytes(&ip);
            if bytes.len() != size {
                return Err(format!("`{s}` is {} bytes, expected {size}", bytes.len()));
            }
            return Ok(bytes);
        }
    }
    match (v, layout) {
        (Value::Number(_), Layout::Int { size, signed }) => encode_int(v, *size, *signed),
        (Value::Number(_), Layout::Opaque { size }) => encode_int(v, *size, false),
        (Value::Number(_), Layout::Struct { .. }) => encode_int(v, size, false),
        (Value::Object(m), Layout::Struct { size, fields }) => {
            let mut out = vec![0u8; *size];
            for key in m.keys() {
                if !fields.iter().any(|f| &f.name == key) {
                    let names: Vec<_> = fields.iter().map(|f| format!("`{}`", f.name)).collect();
                    return Err(format!("no field `{key}` in this struct (fields: {})", names.join(", ")));
                }
            }
            for f in fields {
                if let Some(fv) = m.get(&f.name) {
                    let bytes = encode(fv, &f.layout).map_err(|e| format!("field `{}`: {e}", f.name))?;
                    out[f.offset..f.offset + bytes.len()].copy_from_slice(&bytes);
                }
            }
            Ok(out)
        }
        (Value::Array(items), Layout::Array { len, elem, .. }) => {
            if items.len() > *len {
                return Err(format!("{} items, the array holds {len}", items.len()));
            }
            let mut out = vec![0u8; size];
            for (i, item) in items.iter().enumerate() {
                let bytes = encode(item, elem).map_err(|e| format!("item {i}: {e}"))?;
                out[i * elem.size()..(i + 1) * elem.size()].copy_from_slice(&bytes);
            }
            Ok(out)
        }
        (Value::Array(items), Layout::Bytes { size }) => {
            if items.len() > *size {
                return Err(format!("{} bytes given, the field holds {size}", items.len()));
            }
            let mut out = vec![0u8; *size];
            for (i, item) in items.iter().enumerate() {
                out[i] = item.as_u64().filter(|b| *b <= 255).ok_or("byte values are 0..=255")? as u8;
            }
            Ok(out)
        }
        (Value::Object(_), _) => Err("a mapping needs BTF type information for this map (compile with `-g`)".into()),
        (Value::String(s), _) => Err(format!("`{s}` is not a number, an IP address, a CIDR or `0x` bytes")),
        (other, _) => Err(format!("cannot encode {} into {size} bytes", kind_of(other))),
    }
}

/// Whether `s` is `0x` bytes of exactly `size` bytes.
fn is_hex_of(s: &str, size: usize) -> bool {
    s.strip_prefix("0x").and_then(parse_hex).is_some_and(|b| b.len() == size)
}

/// Text in a char array longer than an address (`char name[64]`):
/// printable ASCII, NUL-padded, at least one NUL left to end it.
fn encode_text(s: &str, size: usize) -> Result<Vec<u8>, String> {
    if !s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!("`{s}`: text in a char array is printable ASCII"));
    }
    if s.len() >= size {
        return Err(format!("`{s}` is {} characters, the field holds {}", s.len(), size - 1));
    }
    let mut out = s.as_bytes().to_vec();
    out.resize(size, 0);
    Ok(out)
}

/// The text a char array holds, when it is [`encode_text`]'s form and
/// does not read as `0x` bytes.
fn decode_text(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|b| *b == 0)?;
    let text = &bytes[..end];
    let printable = !text.is_empty() && text.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
    (printable && bytes[end..].iter().all(|b| *b == 0) && !text.starts_with(b"0x"))
        .then(|| String::from_utf8_lossy(text).into_owned())
}

fn encode_int(v: &Value, size: usize, signed: bool) -> Result<Vec<u8>, String> {
    if size > 16 {
        return Err(format!("an integer does not fit {size} bytes: use `0x` bytes"));
    }
    let bits = size * 8;
    let n: i128 = if let Some(u) = v.as_u64() {
        u as i128
    } else if let Some(i) = v.as_i64() {
        i as i128
    } else {
        return Err(format!("`{v}` is not an integer"));
    };
    let (min, max): (i128, i128) = if bits >= 128 {
        (if signed { i128::MIN } else { 0 }, i128::MAX)
    } else if signed {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    } else {
        (0, (1i128 << bits) - 1)
    };
    if n < min || n > max {
        return Err(format!("{n} does not fit {size} byte{} ({min}..={max})", if size == 1 { "" } else { "s" }));
    }
    Ok(n.to_le_bytes()[..size].to_vec())
}

fn family(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// `0x…` text → bytes (the inverse of [`hex`]).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    parse_hex(s.strip_prefix("0x")?)
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    // Digits only: slicing by byte pairs must never cut a multi-byte char.
    let s: Vec<u8> = s.bytes().filter(|c| *c != b'_').collect();
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decodes bytes for display, the inverse of [`encode`] where it can be.
pub fn decode(bytes: &[u8], layout: &Layout, form: Form) -> Value {
    if bytes.len() != layout.size() {
        return Value::String(hex(bytes));
    }
    if let Some(n) = layout.lpm_addr_len()
        && (form == Form::Cidr || !matches!(layout, Layout::Opaque { .. }))
    {
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap());
        if let Some(ip) = ip_from(&bytes[4..4 + n]) {
            return Value::String(format!("{ip}/{len}"));
        }
    }
    match layout {
        Layout::Int { size, signed } => decode_int(bytes, *size, *signed),
        Layout::Bytes { size } if *size == 4 || *size == 16 => {
            ip_from(bytes).map(|ip| Value::String(ip.to_string())).unwrap_or_else(|| Value::String(hex(bytes)))
        }
        Layout::Bytes { size } if *size > 16 => Value::String(decode_text(bytes).unwrap_or_else(|| hex(bytes))),
        Layout::Bytes { .. } => Value::String(hex(bytes)),
        Layout::Array { len, elem, .. } => {
            let w = elem.size();
            Value::Array((0..*len).map(|i| decode(&bytes[i * w..(i + 1) * w], elem, Form::Auto)).collect())
        }
        Layout::Struct { fields, .. } => {
            let mut m = Map::new();
            for f in fields {
                let part = &bytes[f.offset..f.offset + f.layout.size()];
                let is_padding = f.name.is_empty() || f.name.starts_with("pad") || f.name.starts_with("__pad");
                if is_padding && part.iter().all(|b| *b == 0) {
                    continue;
                }
                m.insert(f.name.clone(), decode(part, &f.layout, Form::Auto));
            }
            Value::Object(m)
        }
        Layout::Opaque { size } => match form {
            Form::Ip if *size == 4 || *size == 16 => {
                ip_from(bytes).map(|ip| Value::String(ip.to_string())).unwrap_or_else(|| Value::String(hex(bytes)))
            }
            Form::Hex => Value::String(hex(bytes)),
            _ if *size <= 8 && *size > 0 => decode_int(bytes, *size, false),
            _ => Value::String(hex(bytes)),
        },
    }
}

fn decode_int(bytes: &[u8], size: usize, signed: bool) -> Value {
    if size > 8 {
        return Value::String(hex(bytes));
    }
    let mut buf = [0u8; 8];
    buf[..size].copy_from_slice(bytes);
    let u = u64::from_le_bytes(buf);
    if signed && size > 0 && bytes[size - 1] & 0x80 != 0 {
        let shift = 64 - size * 8;
        Value::Number((((u << shift) as i64) >> shift).into())
    } else {
        Value::Number(u.into())
    }
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// One-line flow rendering of a decoded value: `{protocol: 6, port: 8080}`.
pub fn display(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        Value::Array(items) => format!("[{}]", items.iter().map(display).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => {
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", display(v))).collect();
            format!("{{{}}}", parts.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn port_key() -> Layout {
        Layout::Struct {
            size: 4,
            fields: vec![
                Field { name: "protocol".into(), offset: 0, layout: Layout::Int { size: 1, signed: false } },
                Field { name: "pad".into(), offset: 1, layout: Layout::Int { size: 1, signed: false } },
                Field { name: "port".into(), offset: 2, layout: Layout::Int { size: 2, signed: false } },
            ],
        }
    }

    #[test]
    fn integers_are_sized_and_range_checked() {
        assert_eq!(encode(&json!(1), &Layout::Opaque { size: 4 }).unwrap(), vec![1, 0, 0, 0]);
        assert!(encode(&json!(256), &Layout::Int { size: 1, signed: false }).unwrap_err().contains("does not fit"));
        assert_eq!(encode(&json!(-1), &Layout::Int { size: 2, signed: true }).unwrap(), vec![0xff, 0xff]);
        assert_eq!(decode(&[0xff, 0xff], &Layout::Int { size: 2, signed: true }, Form::Auto), json!(-1));
    }

    #[test]
    fn addresses_cidrs_and_hex() {
        assert_eq!(encode(&json!("10.0.0.1"), &Layout::Opaque { size: 4 }).unwrap(), vec![10, 0, 0, 1]);
        assert_eq!(encode(&json!("10.0.0.0/8"), &Layout::Opaque { size: 8 }).unwrap(), vec![8, 0, 0, 0, 10, 0, 0, 0]);
        assert_eq!(decode(&[8, 0, 0, 0, 10, 0, 0, 0], &Layout::Opaque { size: 8 }, Form::Cidr), json!("10.0.0.0/8"));
        assert_eq!(encode(&json!("0x0a0b"), &Layout::Opaque { size: 2 }).unwrap(), vec![10, 11]);
        assert!(encode(&json!("0x0a"), &Layout::Opaque { size: 2 }).unwrap_err().contains("expected 2"));
        assert!(encode(&json!("fd00::1"), &Layout::Opaque { size: 4 }).is_err());
    }

    #[test]
    fn char_arrays_hold_text() {
        let name = Layout::Bytes { size: 64 };
        let bytes = encode(&json!("mesh-peers"), &name).unwrap();
        assert_eq!(&bytes[..10], b"mesh-peers");
        assert!(bytes[10..].iter().all(|b| *b == 0));
        assert_eq!(decode(&bytes, &name, Form::Auto), json!("mesh-peers"));
        // A name that reads as an address is still text here.
        assert_eq!(decode(&encode(&json!("10.0.0.1"), &name).unwrap(), &name, Form::Auto), json!("10.0.0.1"));
        // Bytes that are not NUL-ended text stay hex, both ways.
        let raw = format!("0x{}", "ab".repeat(64));
        assert_eq!(decode(&encode(&json!(raw), &name).unwrap(), &name, Form::Auto), json!(raw));
        assert!(encode(&json!("x".repeat(64)), &name).unwrap_err().contains("holds 63"));
        assert!(encode(&json!("tab\there"), &name).unwrap_err().contains("printable"));
    }

    #[test]
    fn btf_structs_encode_by_field_name() {
        let bytes = encode(&json!({"protocol": 6, "port": 8080}), &port_key()).unwrap();
        assert_eq!(bytes, vec![6, 0, 0x90, 0x1f]);
        assert_eq!(decode(&bytes, &port_key(), Form::Auto), json!({"protocol": 6, "port": 8080}));
        let err = encode(&json!({"proto": 6}), &port_key()).unwrap_err();
        assert!(err.contains("no field `proto`"), "{err}");
    }
}
