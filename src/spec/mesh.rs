//! What a spec says about the built-in mesh datapath: whether it uses it,
//! on which interfaces, and the program names it reserves. Here, not in
//! `mesh/`, because the spec's own checks need it and `spec` sits below
//! `mesh` (which compiles policies and routes into map entries).

use std::collections::BTreeMap;

use super::{NodeSpec, XdpMode};

/// Program names of the mesh datapath (implicit when the spec uses it).
pub const PROGRAM: &str = "mesh";
pub const EGRESS_PROGRAM: &str = "mesh_egress";
pub const REDIRECT_ERR_PROGRAM: &str = "mesh_redirect_err";
/// The tracepoint it counts failed redirects on.
pub const REDIRECT_ERR_EVENT: &str = "xdp/xdp_redirect_err";
/// Every program name the mesh datapath reserves.
pub const PROGRAMS: [&str; 3] = [PROGRAM, EGRESS_PROGRAM, REDIRECT_ERR_PROGRAM];

/// Whether the spec uses the mesh datapath at all.
pub fn in_use(spec: &NodeSpec) -> bool {
    !spec.routes.is_empty() || !spec.policies.is_empty() || spec.interfaces.iter().any(|i| i.mesh.is_some())
}

/// The interfaces that run the mesh datapath and why (for messages):
/// declared with `mesh:`, selected by a policy, or used by a route.
pub fn interfaces(spec: &NodeSpec) -> BTreeMap<String, (XdpMode, String)> {
    let mut out: BTreeMap<String, (XdpMode, String)> = BTreeMap::new();
    for i in &spec.interfaces {
        if let Some(m) = &i.mesh {
            out.insert(i.name.clone(), (m.mode, "it declares `mesh`".into()));
        }
    }
    for p in &spec.policies {
        for i in &p.interfaces {
            out.entry(i.clone()).or_insert((XdpMode::Auto, format!("policy `{}` selects it", p.name)));
        }
    }
    for r in &spec.routes {
        for hop in std::iter::once(&r.via).chain(&r.fallback) {
            out.entry(hop.interface.clone()).or_insert((XdpMode::Auto, format!("route `{}` uses it", r.prefix)));
        }
    }
    out
}
