//! `bpfsync schema`: prints the JSON Schema of the spec.

use super::Exit;

pub fn run() -> anyhow::Result<Exit> {
    print!("{}", crate::spec::SCHEMA);
    Ok(0)
}
