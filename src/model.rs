//! The state model: desired and observed are the same shape, a set of
//! kernel objects keyed by identity.
//!
//! - a program: name → digest, function, type;
//! - an attachment: hook → program (and XDP mode);
//! - a map entry: (owning program, map, key bytes) → value bytes.
//!
//! Only maps the spec declares are *managed*: their entries are diffed.
//! Other maps (counters the datapath writes) are observed for `status` but
//! never planned.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::codec::{Form, Layout};
use crate::entries::Entries;
use crate::spec::{ProgramType, XdpMode};

/// Where a program is attached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Hook {
    Xdp {
        interface: String,
    },
    /// One slot of the TCX chain of an interface; `position` is the index
    /// in the spec's list, so swapping the program in a slot is an atomic
    /// link update.
    Tc {
        interface: String,
        direction: Direction,
        position: u32,
    },
    Tracepoint {
        event: String,
        program: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl Hook {
    pub fn interface(&self) -> Option<&str> {
        match self {
            Hook::Xdp { interface } | Hook::Tc { interface, .. } => Some(interface),
            Hook::Tracepoint { .. } => None,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Xdp { interface } => write!(f, "xdp/{interface}"),
            Hook::Tc { interface, direction, position } => {
                write!(f, "tc/{interface}/{}[{position}]", direction.as_str())
            }
            Hook::Tracepoint { event, program } => write!(f, "tracepoint/{event}/{program}"),
        }
    }
}

/// A loaded program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Program {
    pub name: String,
    #[serde(rename = "type")]
    pub program_type: ProgramType,
    pub function: String,
    /// sha256 over the object bytes and the function name: what decides
    /// whether the loaded program is the one the spec asks for.
    pub digest: String,
    /// The program whose maps this one uses (`share-maps:`), if not its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_maps: Option<String>,
    /// Where the bytecode comes from (`builtin:counter`, an object path).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Kernel program id (observed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Kernel program tag (observed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

impl Program {
    /// The program that owns the maps this program uses.
    pub fn map_owner(&self) -> &str {
        self.share_maps.as_deref().unwrap_or(&self.name)
    }
}

/// A program attached to a hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Attachment {
    pub program: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<XdpMode>,
    /// Desired only: replace a foreign program found on this hook.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub takeover: bool,
    /// Kernel link id (observed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
    /// Observed only: the hook's interface is gone, the link is defunct.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub defunct: bool,
    /// Observed only, XDP: the mode the kernel actually runs the program in
    /// (`auto` resolves to `driver` or, without driver support, `skb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_mode: Option<XdpMode>,
}

/// A map, identified by the program that owns it and its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MapRef {
    pub program: String,
    pub map: String,
}

impl fmt::Display for MapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.program, self.map)
    }
}

/// The shape of a map as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// How to show a map's keys and values (desired only; derived from BTF
/// and from how the spec wrote them).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MapCodec {
    pub key: Option<Layout>,
    pub value: Option<Layout>,
    pub key_form: Form,
    pub value_form: Form,
}

/// A map and (when managed or observed) its entries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MapState {
    pub shape: Option<MapShape>,
    /// Whether the spec declares this map's contents.
    pub managed: bool,
    pub entries: Entries,
    pub codec: MapCodec,
    /// Kernel map id (observed only).
    pub id: Option<u32>,
    /// Observed only: the program still holds this map but its pin is gone
    /// (removed by hand); it is keyed by the kernel's name for it, which is
    /// cut to [`KERNEL_NAME_MAX`] bytes.
    pub pin_missing: bool,
}

/// Longest object name the kernel keeps (`BPF_OBJ_NAME_LEN` minus the NUL).
pub const KERNEL_NAME_MAX: usize = 15;

/// A program on a declared hook that bpfsync does not own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ForeignProgram {
    pub hook: Hook,
    pub program_id: u32,
    pub program_name: String,
    /// Human-readable: the mode, and whether it is attached by a link.
    pub detail: String,
    /// XDP: the mode slot it occupies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<XdpMode>,
    /// The bpf link holding it, if any (else attached by netlink/prog
    /// attach).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_id: Option<u32>,
}

/// Desired or observed state of the node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct State {
    pub programs: BTreeMap<String, Program>,
    pub attachments: BTreeMap<Hook, Attachment>,
    pub maps: BTreeMap<MapRef, MapState>,
    /// Observed only: programs on declared hooks that are not ours.
    pub foreign: Vec<ForeignProgram>,
    /// Observed only: interfaces that exist (name → ifindex), for the
    /// interfaces the desired state names.
    pub interfaces: BTreeMap<String, u32>,
    /// Observed only: tracepoint events that exist in tracefs (None when
    /// not looked up).
    pub events: Option<Vec<String>>,
    /// Observed only: extra pinned versions of a program (name, digest),
    /// left by an interrupted apply; the planner cleans them up.
    pub stray_programs: Vec<(String, String)>,
    /// Observed only: MACs of the interfaces in `interfaces`.
    pub interface_macs: BTreeMap<String, [u8; 6]>,
    /// Observed only: usable neighbour-table entries for the next hops the
    /// desired state names, (interface, address) → MAC.
    pub neighbors: BTreeMap<(String, std::net::IpAddr), [u8; 6]>,
    /// Desired only: entries that depend on facts of the node (the mesh
    /// datapath's policies and routes), resolved against the observed node
    /// when planning.
    pub mesh: Option<NodeDependent>,
}

/// Desired map entries that depend on facts of the node — interface
/// indexes and MACs, neighbours — and so are known only once the node is
/// observed. The mesh compiler implements it; the model knows only this.
pub trait NodeFacts: Send + Sync + fmt::Debug {
    /// The entries of each map it fills, resolved against `observed`, and
    /// what could not be resolved (left as the kernel has it).
    fn resolve(&self, observed: &State) -> (BTreeMap<MapRef, Entries>, Vec<Unresolved>);
    /// Interfaces whose facts it needs, and next hops (interface, address)
    /// whose MAC must be looked up in the neighbour table.
    fn needs(&self) -> (Vec<String>, Vec<(String, std::net::IpAddr)>);
    /// Counter maps the datapath fills, keyed by a u32 id (native byte
    /// order, the key's first four bytes), with the ids still live: an
    /// entry of any other id counts something that is gone.
    fn counter_ids(&self) -> Vec<(MapRef, std::collections::BTreeSet<u32>)> {
        Vec::new()
    }
    /// A generation map (a u64 at index 0 of an array) and the maps it
    /// guards: the datapath caches decisions made from the guarded maps'
    /// entries under the generation, so every change to them must be
    /// followed by a bump.
    fn generation(&self) -> Option<(MapRef, Vec<MapRef>)> {
        None
    }
}

/// A desired object that cannot be put in place on this node as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Unresolved {
    /// What is left out: `route 10.20.0.0/16`, `policies on veth9`.
    pub what: String,
    pub message: String,
}

/// A shared [`NodeFacts`]; two are equal when they are the same one.
#[derive(Debug, Clone)]
pub struct NodeDependent(pub std::sync::Arc<dyn NodeFacts>);

impl PartialEq for NodeDependent {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}
