//! Self-healing (groundwork): the pure decisions of the loop that moves a
//! route to its declared fallback when the primary degrades, and back.
//! [`health`] turns probe results and link and neighbour state into a
//! hop's health; [`detector`] decides per route; [`patch`] is the JSON
//! Patch (with `test` guards) a proposal carries against the spec;
//! [`probe`] sends ICMP echoes through a hop's own interface. Probing, proposals, the
//! overlay and the agent's wiring come on top (issue #12); nothing here
//! touches the kernel or the spec yet.

pub mod detector;
pub mod health;
pub mod patch;
pub mod probe;
