//! Observed-state snapshots as YAML: the `observed.yaml` of golden cases,
//! `bpfsync status --snapshot`, and `bpfsync plan --observed FILE` (plan in
//! CI without touching a kernel).
//!
//! ```yaml
//! programs:
//!   counter: { type: xdp, function: xdp_counter, digest: "@desired", id: 41 }
//! attachments:
//!   - { hook: { kind: xdp, interface: veth0 }, program: counter, mode: skb }
//! maps:
//!   - program: counter
//!     map: counter_config
//!     entries: { "0x00000000": "0x01000000" }
//! interfaces: { veth0: 2 }
//! interface-macs: { veth0: "02:00:00:00:00:02" }
//! neighbors:
//!   - { interface: veth0, address: 10.0.0.2, mac: "02:00:00:00:01:02" }
//! ```
//! `digest: "@desired"` stands for "the digest the spec asks for", so golden
//! cases do not change when the built-in objects are rebuilt. `generate`
//! fills a map with `count` entries `u32 i → u32 i` (big cases).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::entries::Entries;
use crate::model::{Attachment, ForeignProgram, Hook, MapRef, MapShape, MapState, Program, State};
use crate::spec::{ProgramType, XdpMode};

pub const DESIRED_DIGEST: &str = "@desired";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Snapshot {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub programs: BTreeMap<String, SnapProgram>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<SnapAttachment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub maps: Vec<SnapMap>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<ForeignProgram>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub interfaces: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stray_programs: Vec<SnapStray>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub interface_macs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neighbors: Vec<SnapNeighbor>,
}

/// A usable neighbour-table entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SnapNeighbor {
    pub interface: String,
    pub address: std::net::IpAddr,
    pub mac: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SnapProgram {
    #[serde(rename = "type")]
    pub program_type: ProgramType,
    pub function: String,
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_maps: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SnapAttachment {
    pub hook: Hook,
    pub program: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<XdpMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub defunct: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SnapMap {
    pub program: String,
    pub map: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<MapShape>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub entries: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<Generate>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Generate {
    pub count: u32,
    /// Entries whose value differs from `i`: index → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub except: BTreeMap<u32, u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SnapStray {
    pub program: String,
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid snapshot")]
    Yaml(#[from] serde_yaml::Error),
    #[error("`{value}` in map `{map}` is not `0x` hex bytes")]
    Hex { map: String, value: String },
    #[error("`{value}` (MAC of `{interface}`) is not a MAC address")]
    Mac { interface: String, value: String },
}

fn unhex(map: &str, s: &str) -> Result<Vec<u8>, SnapshotError> {
    codec::unhex(s).ok_or_else(|| SnapshotError::Hex { map: map.to_string(), value: s.to_string() })
}

impl Snapshot {
    pub fn parse(text: &str) -> Result<Snapshot, SnapshotError> {
        if text.trim().is_empty() {
            return Ok(Snapshot::default());
        }
        Ok(serde_yaml::from_str(text)?)
    }

    /// The observed state this snapshot describes; `@desired` digests take
    /// the digest of the same program in `desired`.
    pub fn to_state(&self, desired: &State) -> Result<State, SnapshotError> {
        let mut s = State::default();
        for (name, p) in &self.programs {
            let digest = if p.digest == DESIRED_DIGEST {
                desired.programs.get(name).map(|d| d.digest.clone()).unwrap_or_default()
            } else {
                p.digest.clone()
            };
            s.programs.insert(
                name.clone(),
                Program {
                    name: name.clone(),
                    program_type: p.program_type,
                    function: p.function.clone(),
                    digest,
                    share_maps: p.share_maps.clone(),
                    source: String::new(),
                    id: p.id,
                    tag: p.tag.clone(),
                },
            );
        }
        for a in &self.attachments {
            s.attachments.insert(
                a.hook.clone(),
                Attachment {
                    program: a.program.clone(),
                    mode: a.mode,
                    takeover: false,
                    link_id: a.link_id,
                    defunct: a.defunct,
                    running_mode: None,
                },
            );
        }
        for m in &self.maps {
            let r = MapRef { program: m.program.clone(), map: m.map.clone() };
            let mut pairs = Vec::new();
            for (k, v) in &m.entries {
                pairs.push((unhex(&m.map, k)?, unhex(&m.map, v)?));
            }
            if let Some(g) = &m.generate {
                for i in 0..g.count {
                    let v = g.except.get(&i).copied().unwrap_or(i);
                    pairs.push((i.to_le_bytes().to_vec(), v.to_le_bytes().to_vec()));
                }
            }
            if let Some((k0, v0)) = pairs.first()
                && pairs.iter().any(|(k, v)| k.len() != k0.len() || v.len() != v0.len())
            {
                return Err(SnapshotError::Hex { map: m.map.clone(), value: "entries of different sizes".into() });
            }
            let entries: Entries = pairs.into_iter().collect();
            // A shape left out means "as desired".
            let shape = m.shape.or_else(|| desired.maps.get(&r).and_then(|d| d.shape));
            s.maps.insert(r, MapState { shape, managed: true, entries, ..Default::default() });
        }
        // Maps of observed programs that the snapshot leaves out exist as
        // desired, with no entries.
        for (r, d) in &desired.maps {
            let owner_loaded = s.programs.contains_key(&r.program);
            if owner_loaded && !s.maps.contains_key(r) {
                s.maps.insert(r.clone(), MapState { shape: d.shape, managed: true, ..Default::default() });
            }
        }
        s.foreign = self.foreign.clone();
        s.interfaces = self.interfaces.clone();
        s.events = self.events.clone();
        s.stray_programs = self.stray_programs.iter().map(|x| (x.program.clone(), x.digest.clone())).collect();
        let mac = |interface: &str, value: &str| {
            crate::net::parse_mac(value)
                .ok_or_else(|| SnapshotError::Mac { interface: interface.to_string(), value: value.to_string() })
        };
        for (i, m) in &self.interface_macs {
            s.interface_macs.insert(i.clone(), mac(i, m)?);
        }
        for n in &self.neighbors {
            s.neighbors.insert((n.interface.clone(), n.address), mac(&n.interface, &n.mac)?);
        }
        Ok(s)
    }

    /// A snapshot of an observed state (entries of every map read).
    pub fn from_state(state: &State) -> Snapshot {
        Snapshot {
            programs: state
                .programs
                .iter()
                .map(|(n, p)| {
                    (
                        n.clone(),
                        SnapProgram {
                            program_type: p.program_type,
                            function: p.function.clone(),
                            digest: p.digest.clone(),
                            share_maps: p.share_maps.clone(),
                            id: p.id,
                            tag: p.tag.clone(),
                        },
                    )
                })
                .collect(),
            attachments: state
                .attachments
                .iter()
                .map(|(h, a)| SnapAttachment {
                    hook: h.clone(),
                    program: a.program.clone(),
                    mode: a.mode,
                    link_id: a.link_id,
                    defunct: a.defunct,
                })
                .collect(),
            maps: state
                .maps
                .iter()
                .map(|(r, m)| SnapMap {
                    program: r.program.clone(),
                    map: r.map.clone(),
                    shape: m.shape,
                    entries: m.entries.iter().map(|(k, v)| (codec::hex(k), codec::hex(v))).collect(),
                    generate: None,
                })
                .collect(),
            foreign: state.foreign.clone(),
            interfaces: state.interfaces.clone(),
            events: state.events.clone(),
            stray_programs: state
                .stray_programs
                .iter()
                .map(|(p, d)| SnapStray { program: p.clone(), digest: d.clone() })
                .collect(),
            interface_macs: state.interface_macs.iter().map(|(i, m)| (i.clone(), crate::mesh::mac_string(m))).collect(),
            neighbors: state
                .neighbors
                .iter()
                .map(|((i, a), m)| SnapNeighbor { interface: i.clone(), address: *a, mac: crate::mesh::mac_string(m) })
                .collect(),
        }
    }
}
