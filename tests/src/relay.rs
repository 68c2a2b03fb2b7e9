//! A user-space UDP relay that impairs a link between two QUIC endpoints.
