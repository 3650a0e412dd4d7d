//! A minimal reader of BTF type information: enough to turn the key and
//! value types of a map into byte layouts that spec entries are encoded
//! with. Format: <https://docs.kernel.org/bpf/btf.html>.

use crate::codec::{Field, Layout};

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct RawType {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    size_or_type: u32,
    /// Kind-specific data following the common header.
    extra: Vec<u32>,
}

/// Parsed BTF types of one object.
#[derive(Debug, Clone)]
pub struct Btf {
    types: Vec<RawType>, // index 0 is the void type
    strings: Vec<u8>,
}

impl Btf {
    pub fn parse(data: &[u8]) -> Option<Btf> {
        let u32_at =
            |off: usize| -> Option<u32> { data.get(off..off + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap())) };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != 0xeb9f {
            return None;
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len)?.to_vec();
        let mut types = vec![RawType { name_off: 0, kind: 0, kind_flag: false, size_or_type: 0, extra: vec![] }];
        let mut off = hdr_len + type_off;
        let end = off + type_len;
        while off < end {
            let name_off = u32_at(off)?;
            let info = u32_at(off + 4)?;
            let size_or_type = u32_at(off + 8)?;
            off += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let words = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 1,
                KIND_ARRAY => 3,
                KIND_STRUCT | KIND_UNION => 3 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 2 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 3 * vlen,
                _ => 0,
            } as usize;
            let mut extra = Vec::with_capacity(words);
            for i in 0..words {
                extra.push(u32_at(off + 4 * i)?);
            }
            off += 4 * words;
            types.push(RawType { name_off, kind, kind_flag: info >> 31 == 1, size_or_type, extra });
        }
        Some(Btf { types, strings })
    }

    fn name(&self, off: u32) -> String {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end]).into_owned()
    }

    /// The members of the enum named `name` (`enum skb_drop_reason` →
    /// `skb_drop_reason`) with their values, when the BTF has it.
    pub fn enum_values(&self, name: &str) -> Option<Vec<(String, i64)>> {
        let t =
            self.types.iter().find(|t| matches!(t.kind, KIND_ENUM | KIND_ENUM64) && self.name(t.name_off) == name)?;
        let signed = t.kind_flag;
        let members = if t.kind == KIND_ENUM {
            t.extra
                .chunks_exact(2)
                .map(|m| (self.name(m[0]), if signed { m[1] as i32 as i64 } else { m[1] as i64 }))
                .collect()
        } else {
            t.extra.chunks_exact(3).map(|m| (self.name(m[0]), ((m[2] as u64) << 32 | m[1] as u64) as i64)).collect()
        };
        Some(members)
    }

    /// The layout of the struct named `name` (`struct route_key` →
    /// `route_key`), when the object's BTF has it.
    pub fn struct_layout(&self, name: &str) -> Option<Layout> {
        let id = self.types.iter().position(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name)?;
        self.layout(id as u32)
    }

    /// The byte layout of type `id`, or `None` when it is not a plain data
    /// type (bitfields, functions, …); callers then fall back to raw bytes.
    pub fn layout(&self, id: u32) -> Option<Layout> {
        self.layout_depth(id, 0)
    }

    fn layout_depth(&self, id: u32, depth: usize) -> Option<Layout> {
        if depth > 32 {
            return None;
        }
        let t = self.types.get(id as usize)?;
        match t.kind {
            KIND_INT => {
                let encoding = t.extra[0] >> 24;
                let bits = t.extra[0] & 0xff;
                let bit_offset = (t.extra[0] >> 16) & 0xff;
                if bit_offset != 0 || bits != t.size_or_type * 8 {
                    return None;
                }
                Some(Layout::Int { size: t.size_or_type as usize, signed: encoding & 1 == 1 })
            }
            KIND_ENUM | KIND_ENUM64 => Some(Layout::Int { size: t.size_or_type as usize, signed: t.kind_flag }),
            KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                self.layout_depth(t.size_or_type, depth + 1)
            }
            KIND_ARRAY => {
                let elem = self.layout_depth(t.extra[0], depth + 1)?;
                let len = t.extra[2] as usize;
                if matches!(elem, Layout::Int { size: 1, .. }) {
                    Some(Layout::Bytes { size: len })
                } else {
                    Some(Layout::Array { size: elem.size() * len, len, elem: Box::new(elem) })
                }
            }
            KIND_STRUCT => {
                let mut fields = Vec::new();
                for m in t.extra.chunks(3) {
                    let (name_off, type_id, offset) = (m[0], m[1], m[2]);
                    let bit_offset = if t.kind_flag {
                        if offset >> 24 != 0 {
                            return None; // bitfield
                        }
                        offset & 0xff_ffff
                    } else {
                        offset
                    };
                    if bit_offset % 8 != 0 {
                        return None;
                    }
                    let layout = self.layout_depth(type_id, depth + 1)?;
                    fields.push(Field { name: self.name(name_off), offset: (bit_offset / 8) as usize, layout });
                }
                Some(Layout::Struct { size: t.size_or_type as usize, fields })
            }
            KIND_UNION | KIND_FLOAT => Some(Layout::Opaque { size: t.size_or_type as usize }),
            KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FUNC_PROTO | KIND_VAR | KIND_DATASEC | KIND_DECL_TAG => None,
            _ => None,
        }
    }
}
