//! NAT-facing knowledge: which addresses the world sees for us. Peers report the address they observe for our
//! QUIC socket in every `Hello`; [`observed::ObservedAddresses`] aggregates those reports so that no single peer
//! can make us advertise an address it made up.

pub mod observed;
