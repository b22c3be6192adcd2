//! Node-to-node traffic: the authenticated QUIC links ([`link`]) over which nodes forward
//! requests to each other.

pub mod link;
