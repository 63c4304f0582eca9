//! NAT-facing knowledge: which addresses the world sees for us and how our NAT behaves.
//!
//! Peers report the address they observe for our QUIC socket in every `Hello`; [`observed::ObservedAddresses`]
//! aggregates those reports so that no single peer can make us advertise an address it made up.
//! [`classify`] turns that evidence and dial-back results into RFC 4787 verdicts (pure logic);
//! [`evidence`] holds what sessions report (they call into it; it knows nothing of sessions), [`probes`] is the
//! interface the prober drives the node through (the exchange implements it), and [`prober`] gathers the
//! evidence, runs the classifier and publishes the verdict.

pub mod classify;
pub mod evidence;
mod explain;
pub mod observed;
pub mod prober;
pub mod probes;
