//! The envd wire protocol shared by the in-sandbox agent (server) and Cubicle's host
//! side (client): message types ([`proto`]), the Connect JSON codec ([`connect`]) and a
//! client over the agent's unix socket ([`client`]).
//!
//! The protocol is E2B's envd; `docs/envd.md` lists what Cubicle implements and where it
//! deliberately differs.

#![warn(missing_docs)]

pub mod client;
pub mod connect;
pub mod proto;

/// The envd version Cubicle reports: the highest version any E2B SDK feature is gated on.
pub const ENVD_VERSION: &str = "0.6.4";
