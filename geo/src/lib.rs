//! The geo role: an authoritative DNS server answering with the nearest healthy
//! edges. Built in a later milestone; this crate currently holds nothing else.
