//! Network namespaces and veth pairs: the demo's sandbox and the tests'.
