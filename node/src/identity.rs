//! Node identity: the key pair a node is known by, the node ID derived from
//! it, and the TLS configurations that let two nodes prove their keys to
//! each other over QUIC.
//!
//! A node's identity *is* its public key. The node ID is a hash of the
//! certificate's SubjectPublicKeyInfo, so anyone holding the certificate can
//! recompute it and nobody can claim an ID without holding the matching
//! private key (the TLS 1.3 handshake signature proves that).
//!
//! What this module must never do:
//! - decide trust. The verifiers here only check that the peer's
//!   certificate is well-formed and that the peer signed the handshake with
//!   its key. Whether that key belongs to a peer we trust is decided by the
//!   caller *after* the handshake (see [`peer_node_id`]), so the connection
//!   can be closed with a reason a person can read on both sides instead of
//!   an opaque TLS alert;
//! - touch the case store or the network by itself: it builds configs, it
//!   does not open sockets;
//! - panic on anything read from disk or received from a peer.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::PublicKeyData;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// ALPN protocol identifier. Each application protocol owns one ALPN, so a
/// stray client speaking something else fails the handshake early.
pub const ALPN: &[u8] = b"fieldcase";

/// TLS server name used by clients. Our verifier ignores names (identity is
/// the key, not a DNS name), but rustls needs a syntactically valid one.
pub const SERVER_NAME: &str = "fieldcase.node";

/// File holding the PKCS#8 private key (PEM, mode 0600).
pub const KEY_FILE: &str = "node.key";

/// File holding the self-signed certificate (DER).
pub const CERT_FILE: &str = "node.cert";

/// Longest node name we accept, in bytes. Names appear in certificates, on
/// screens and in log lines; a bound keeps all three sane.
pub const NODE_NAME_BYTES_MAX: usize = 64;

/// Keep-alive interval. A field laptop often sits behind a phone hotspot
/// whose NAT forgets idle UDP mappings after ~30 s; pinging every 5 s keeps
/// the mapping alive and detects a dead link quickly, at a cost of a few
/// bytes per ping.
pub const KEEP_ALIVE_INTERVAL_MS: u64 = 5_000;

/// Idle timeout. With keep-alives every 5 s, 30 s of silence means six
/// missed pings: the peer is gone (laptop closed, walked out of range).
/// Short enough that a sync command gives up in a time a person will wait,
/// long enough to ride out a brief radio dropout.
pub const IDLE_TIMEOUT_MS: u64 = 30_000;

/// Concurrent bidirectional streams a peer may open. Sync uses a handful;
/// the bound stops a misbehaving peer from making us track thousands.
pub const STREAMS_BIDI_MAX: u32 = 64;

/// Concurrent unidirectional streams a peer may open (same reasoning).
pub const STREAMS_UNI_MAX: u32 = 64;

/// Per-stream receive window: the most unread data a peer can park in one
/// stream's buffer (a memory bound per stream: 4 blob streams at most). It
/// is no longer the brake on a blob's data in flight: quinn's BBR used to
/// overfill cellular queues and this window was all that held it back;
/// [`crate::congestion`] now keeps the window near twice the measured
/// bandwidth-delay product (130 KB on village 3G, 40 KB at the edge of
/// coverage), well below it. 320 KB still covers a 2 Mbit/s link's BDP with
/// queueing four times over, so flow control never idles a 3G link.
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 320 * 1024;

/// Per-connection receive window: the most unread data a peer can park in
/// our memory across all its streams.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

/// Per-connection send window: the most unacknowledged data we buffer.
pub const CONNECTION_SEND_WINDOW_BYTES: u64 = 8 * 1024 * 1024;

/// Connection attempts the server holds before answering. A commune center
/// has tens of laptops, not thousands.
pub const INCOMING_CONNECTIONS_MAX: usize = 64;

/// Length of a node ID in bytes (160 bits).
pub const NODE_ID_BYTES: usize = 20;

/// Crockford base32 alphabet: no I, L, O, U, so a spoken or handwritten ID
/// cannot be misread.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Base32 characters in a node ID: 160 bits / 5 bits per character.
const NODE_ID_CHARS: usize = 32;

/// Characters per dash-separated group when displayed.
const NODE_ID_GROUP_CHARS: usize = 4;

/// Characters of the ID used as case-code prefix.
const SHORT_PREFIX_CHARS: usize = 6;

/// Failures of identity operations. Each message is one line a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file of the identity does not exist; the node was probably never initialised.
    #[error("identity file {path} is missing; initialise this node first")]
    Missing { path: PathBuf },
    /// A file of the identity exists but cannot be parsed.
    #[error("identity file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// The key and the certificate on disk belong to different identities.
    #[error(
        "identity files in {dir} do not belong together: {CERT_FILE} was not made for {KEY_FILE}"
    )]
    Mismatch { dir: PathBuf },
    /// Saving would replace an existing key, which would silently change this node's ID.
    #[error("an identity already exists in {dir}; refusing to overwrite it (this node would lose its ID)")]
    AlreadyExists { dir: PathBuf },
    /// The operating system refused a file operation.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node name is empty, too long or contains control characters.
    #[error("invalid node name: {0}")]
    InvalidName(String),
    /// The key pair or certificate could not be created.
    #[error("cannot create the node key or certificate: {0}")]
    Generate(String),
    /// A certificate is not well-formed X.509.
    #[error("certificate is not well-formed: {0}")]
    BadCertificate(String),
    /// The TLS or QUIC configuration could not be built.
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
    /// The peer finished the handshake without a certificate (should not happen with our configs).
    #[error("the peer did not present a certificate")]
    NoPeerCertificate,
}

/// Why a typed node ID was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdParseError {
    /// Too few or too many characters after removing dashes and spaces.
    #[error("a node ID has {NODE_ID_CHARS} letters and digits, but {found} were given")]
    WrongLength { found: usize },
    /// A character outside the alphabet (position counts from 1 in the text as typed).
    #[error("'{ch}' at position {position} cannot appear in a node ID (use digits 0-9 and letters A-Z except U)")]
    BadChar { ch: char, position: usize },
    /// The last character carries bits beyond the 160 of the ID, so this was not produced by us.
    #[error("the last character of the node ID is not valid; check it was copied correctly")]
    NonCanonical,
}

/// A node's ID: the first 20 bytes of SHA-256 over its certificate's
/// SubjectPublicKeyInfo. 160 bits is far beyond what anyone could brute-force
/// to impersonate one of a commune's few dozen nodes, and still short
/// enough (32 characters) to read aloud over the phone.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId([u8; NODE_ID_BYTES]);

impl NodeId {
    /// Wraps raw bytes (e.g. read back from storage).
    pub fn from_bytes(bytes: [u8; NODE_ID_BYTES]) -> NodeId {
        NodeId(bytes)
    }

    /// The raw 20 bytes.
    pub fn as_bytes(&self) -> &[u8; NODE_ID_BYTES] {
        &self.0
    }

    /// Derives the ID from a SubjectPublicKeyInfo DER (outer SEQUENCE included).
    pub fn from_spki_der(spki: &[u8]) -> NodeId {
        let digest = ring::digest::digest(&ring::digest::SHA256, spki);
        let mut id = [0u8; NODE_ID_BYTES];
        id.copy_from_slice(&digest.as_ref()[..NODE_ID_BYTES]);
        NodeId(id)
    }

    /// Derives the ID from a DER X.509 certificate, as received from a peer.
    pub fn from_cert_der(der: &[u8]) -> Result<NodeId, IdentityError> {
        let cert = CertificateDer::from(der);
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| IdentityError::BadCertificate(format!("{e:?}")))?;
        Ok(NodeId::from_spki_der(&ee.subject_public_key_info()))
    }

    /// The base32 text without dashes, 32 characters.
    fn base32(&self) -> [u8; NODE_ID_CHARS] {
        let mut out = [0u8; NODE_ID_CHARS];
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        let mut n = 0;
        for &b in &self.0 {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                out[n] = CROCKFORD[((acc >> bits) & 31) as usize];
                n += 1;
            }
        }
        // 160 is a multiple of 5, so no bits are left over.
        debug_assert_eq!(bits, 0);
        debug_assert_eq!(n, NODE_ID_CHARS);
        out
    }

    /// First six base32 characters, e.g. `K7QF2M`: the prefix of case codes
    /// made on this node, so codes from different laptops never collide and
    /// a clerk can tell which laptop a case came from.
    pub fn short_prefix(&self) -> String {
        let b = self.base32();
        b[..SHORT_PREFIX_CHARS].iter().map(|&c| c as char).collect()
    }

    /// Automerge actor ID for changes made on this node, so the history of a
    /// case shows which node made each edit.
    pub fn actor_id(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.base32();
        for (i, group) in b.chunks(NODE_ID_GROUP_CHARS).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            for &c in group {
                write!(f, "{}", c as char)?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Value of one typed character, with the Crockford look-alike mappings.
fn crockford_value(c: char) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        'I' | 'L' => '1',
        'O' => '0',
        other => other,
    };
    CROCKFORD
        .iter()
        .position(|&a| a as char == c)
        .and_then(|p| u8::try_from(p).ok())
}

impl FromStr for NodeId {
    type Err = NodeIdParseError;

    /// Accepts what a person might type: any case, dashes and spaces
    /// anywhere, `I`/`L` for `1` and `O` for `0`.
    fn from_str(s: &str) -> Result<NodeId, NodeIdParseError> {
        let mut values = Vec::with_capacity(NODE_ID_CHARS);
        for (i, ch) in s.chars().enumerate() {
            if ch == '-' || ch == ' ' {
                continue;
            }
            match crockford_value(ch) {
                Some(v) => values.push(v),
                None => {
                    return Err(NodeIdParseError::BadChar {
                        ch,
                        position: i + 1,
                    })
                }
            }
        }
        if values.len() != NODE_ID_CHARS {
            return Err(NodeIdParseError::WrongLength {
                found: values.len(),
            });
        }
        let mut out = [0u8; NODE_ID_BYTES];
        let mut acc: u32 = 0;
        let mut bits = 0u32;
        let mut n = 0;
        for v in values {
            acc = (acc << 5) | u32::from(v);
            bits += 5;
            if bits >= 8 {
                bits -= 8;
                out[n] = ((acc >> bits) & 0xff) as u8;
                n += 1;
            }
        }
        if bits != 0 || n != NODE_ID_BYTES {
            return Err(NodeIdParseError::NonCanonical);
        }
        Ok(NodeId(out))
    }
}

/// This node's key pair and self-signed certificate.
///
/// `Debug` is implemented by hand so the private key never ends up in a log.
#[derive(Clone)]
pub struct Identity {
    /// Human name (certificate subject CN), e.g. "Laptop Thôn 3".
    name: String,
    /// PKCS#8 DER of the Ed25519 private key.
    key_pkcs8_der: Vec<u8>,
    /// DER of the self-signed certificate presented in every handshake.
    cert: CertificateDer<'static>,
    /// Derived from `cert`; cached because every connection compares it.
    node_id: NodeId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn validate_name(name: &str) -> Result<(), IdentityError> {
    if name.trim().is_empty() {
        return Err(IdentityError::InvalidName("it is empty".into()));
    }
    if name.len() > NODE_NAME_BYTES_MAX {
        return Err(IdentityError::InvalidName(format!(
            "it is longer than {NODE_NAME_BYTES_MAX} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(IdentityError::InvalidName(
            "it contains control characters".into(),
        ));
    }
    Ok(())
}

impl Identity {
    /// Creates a fresh Ed25519 key pair and a self-signed certificate whose
    /// subject CN is `name`. The certificate is valid from 1975 to 4096
    /// (rcgen's default): field laptops have unreliable clocks and nodes
    /// are revoked by removing them from trust lists, not by expiry.
    pub fn generate(name: &str) -> Result<Identity, IdentityError> {
        validate_name(name)?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let cert_der = cert.der().clone();
        let node_id = NodeId::from_spki_der(&key.subject_public_key_info());
        // Check before writing, check again after reading: the ID computed
        // from our key must equal the one a peer computes from the cert.
        let from_cert = NodeId::from_cert_der(&cert_der)?;
        if from_cert != node_id {
            return Err(IdentityError::Generate(
                "certificate public key differs from the generated key".into(),
            ));
        }
        Ok(Identity {
            name: name.to_string(),
            key_pkcs8_der: key.serialize_der(),
            cert: cert_der,
            node_id,
        })
    }

    /// The node's human name (certificate CN).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's ID.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The certificate presented to peers.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }

    /// Writes `node.cert` then `node.key` into `dir` (created if missing),
    /// each atomically (temp file, fsync, rename, fsync dir), the key with
    /// mode 0600.
    ///
    /// Refuses to run if `node.key` already exists: replacing the key
    /// changes the node ID, and every peer that trusts this node would
    /// silently stop trusting it. The key is written last so its presence
    /// marks a complete identity; a crash after the certificate but before
    /// the key leaves a state that `save` can simply redo.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
            action: "create directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let key_path = dir.join(KEY_FILE);
        match fs::symlink_metadata(&key_path) {
            Ok(_) => {
                return Err(IdentityError::AlreadyExists {
                    dir: dir.to_path_buf(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IdentityError::Io {
                    action: "check",
                    path: key_path,
                    source,
                })
            }
        }
        write_atomic(dir, CERT_FILE, self.cert.as_ref(), 0o644)?;
        let pem = pem_encode("PRIVATE KEY", &self.key_pkcs8_der);
        write_atomic(dir, KEY_FILE, pem.as_bytes(), 0o600)?;
        Ok(())
    }

    /// Reads an identity saved by [`Identity::save`], checking that the key
    /// is Ed25519 and that the certificate was made for that key.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let key_path = dir.join(KEY_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_bytes = read_file(&key_path)?;
        let cert_bytes = read_file(&cert_path)?;

        let key_text = String::from_utf8(key_bytes).map_err(|_| IdentityError::Corrupt {
            path: key_path.clone(),
            reason: "not a text (PEM) file".into(),
        })?;
        let key = rcgen::KeyPair::from_pem(&key_text).map_err(|e| IdentityError::Corrupt {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        if key.algorithm() != &rcgen::PKCS_ED25519 {
            return Err(IdentityError::Corrupt {
                path: key_path,
                reason: "not an Ed25519 key".into(),
            });
        }

        let cert = CertificateDer::from(cert_bytes);
        let (cert_spki, name) = {
            let ee =
                webpki::EndEntityCert::try_from(&cert).map_err(|e| IdentityError::Corrupt {
                    path: cert_path.clone(),
                    reason: format!("not a valid certificate ({e:?})"),
                })?;
            let name = common_name(ee.subject()).ok_or_else(|| IdentityError::Corrupt {
                path: cert_path.clone(),
                reason: "certificate has no readable node name (subject CN)".into(),
            })?;
            (ee.subject_public_key_info(), name)
        };
        if cert_spki.as_ref() != key.subject_public_key_info().as_slice() {
            return Err(IdentityError::Mismatch {
                dir: dir.to_path_buf(),
            });
        }
        Ok(Identity {
            name,
            key_pkcs8_der: key.serialize_der(),
            node_id: NodeId::from_spki_der(cert_spki.as_ref()),
            cert,
        })
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            IdentityError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            IdentityError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Writes `dir/name` so that after a crash the file holds either the old
/// content or the new one, never a torn mix: write a temp file, fsync it,
/// rename over the target, fsync the directory so the rename itself is durable.
fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp_path = dir.join(format!(".{name}.tmp"));
    let final_path = dir.join(name);
    let io = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io {
            action,
            path,
            source,
        }
    };
    // A temp file left by an earlier crash is garbage; remove it so
    // `create_new` below can apply the right permissions from the start.
    match fs::remove_file(&tmp_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("remove stale", &tmp_path)(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp_path).map_err(io("create", &tmp_path))?;
    file.write_all(data).map_err(io("write", &tmp_path))?;
    file.sync_all().map_err(io("sync", &tmp_path))?;
    drop(file);
    fs::rename(&tmp_path, &final_path).map_err(io("rename into", &final_path))?;
    #[cfg(unix)]
    {
        let d = fs::File::open(dir).map_err(io("open directory", dir))?;
        d.sync_all().map_err(io("sync directory", dir))?;
    }
    Ok(())
}

/// Minimal PEM encoder (64-column base64). PEM keeps the key file
/// recognisable and inspectable (`openssl asn1parse`); the content is
/// ring's PKCS#8 v2 (RFC 5958, public key included), which some OpenSSL
/// builds cannot load with `openssl pkey`.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Reads one DER TLV: returns (tag, contents, rest). Only definite lengths
/// up to 4 length bytes, which covers anything in a certificate.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Extracts the first CommonName from the contents of an X.509 Name
/// (sequence of RDN sets). Used to show a peer's self-chosen name to a
/// person; it is a label, never a basis for trust.
fn common_name(mut name: &[u8]) -> Option<String> {
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (set_tag, mut set, rest) = der_tlv(name)?;
        name = rest;
        if set_tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (seq_tag, atv, rest) = der_tlv(set)?;
            set = rest;
            if seq_tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, value) = der_tlv(atv)?;
            if oid_tag == 0x06 && oid == OID_CN {
                let (_, text, _) = der_tlv(value)?;
                return Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    None
}

/// The human name (subject CN) in a peer's certificate, for messages such
/// as "Laptop Thôn 3 (K7QF-…) is not in the trust list". A peer chooses its
/// own name, so this is a label only; trust goes by [`NodeId`].
pub fn cert_name(der: &[u8]) -> Option<String> {
    let cert = CertificateDer::from(der);
    let ee = webpki::EndEntityCert::try_from(&cert).ok()?;
    common_name(ee.subject())
}

/// Verifier used on both sides: accepts any well-formed certificate and
/// checks the handshake signature against its key. See the module comment
/// for why trust is decided after the handshake.
#[derive(Debug)]
struct SelfSignedVerifier {
    /// The ring provider's algorithms; fixed here rather than taken from a
    /// process-wide default, which another crate could have changed.
    algorithms: WebPkiSupportedAlgorithms,
}

impl SelfSignedVerifier {
    fn new(provider: &CryptoProvider) -> SelfSignedVerifier {
        SelfSignedVerifier {
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// Our nodes present exactly one certificate. A chain means something
    /// else is talking to us; refusing it also bounds parsing work.
    fn check_cert(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        Ok(())
    }

    /// TLS 1.2 is disabled in our configs, so this should never be called;
    /// refuse rather than verify with weaker semantics.
    fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "TLS 1.2 is not supported by fieldcase".into(),
        ))
    }
}

impl ServerCertVerifier for SelfSignedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check_cert(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for SelfSignedVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No CA: any self-signed cert may be offered.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check_cert(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The one datagram size path MTU discovery tries (quinn's default upper
/// bound: 1500-byte Ethernet minus IPv6 and UDP headers).
pub const MTU_PROBE_BYTES: u16 = 1452;

/// Smallest MTU step the discovery takes: more than half of 1452 - 1200,
/// so the binary search has no middle step and probes only 1452.
pub const MTU_PROBE_MIN_CHANGE: u16 = 250;

/// QUIC transport limits shared by both sides. Every value bounds
/// something the peer controls; see the constants for the reasoning.
pub fn transport_config() -> Result<quinn::TransportConfig, IdentityError> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(Duration::from_millis(IDLE_TIMEOUT_MS))
        .map_err(|e| IdentityError::Tls(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(Duration::from_millis(KEEP_ALIVE_INTERVAL_MS)))
        .max_concurrent_bidi_streams(STREAMS_BIDI_MAX.into())
        .max_concurrent_uni_streams(STREAMS_UNI_MAX.into())
        .stream_receive_window(STREAM_RECEIVE_WINDOW_BYTES.into())
        .receive_window(CONNECTION_RECEIVE_WINDOW_BYTES.into())
        .send_window(CONNECTION_SEND_WINDOW_BYTES)
        // The protocol does not use datagrams; don't buffer any.
        .datagram_receive_buffer_size(None)
        // One path MTU probe, not a binary search: quinn's default search
        // sent padded probes from 1326 up to 1452 bytes in both directions,
        // 11 KB of the 17 KB a reconnect with nothing to sync put on the
        // wire (`sync_scale` benchmark), and field laptops reconnect many
        // times a day. Not probing at all costs attachments 4 points of
        // goodput on village 3G (81 % instead of 85 %, blob benchmark): with
        // a minimum change of 250 bytes the search probes the upper bound
        // (1452) once and stops, or stays at 1200 if that probe is lost.
        .mtu_discovery_config(Some({
            let mut m = quinn::MtuDiscoveryConfig::default();
            m.upper_bound(MTU_PROBE_BYTES)
                .minimum_change(MTU_PROBE_MIN_CHANGE);
            m
        }))
        // Village links lose packets for reasons that are not congestion
        // (weak signal, handovers): loss-based controllers (Cubic, NewReno)
        // collapse at 3% random loss, and quinn's BBR overfills the
        // bottleneck queue. See `crate::congestion` for the one we use.
        .congestion_controller_factory(std::sync::Arc::new(crate::congestion::RateCappedConfig));
    Ok(t)
}

/// QUIC server config: TLS 1.3 only, ALPN `fieldcase`, client certificate
/// mandatory. After accepting, call [`peer_node_id`] and check the trust list.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(SelfSignedVerifier::new(&provider));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert.clone()], identity.private_key())
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session tickets. A ticket only pays off when the client resumes
    // with it, and ours never do: `fieldcase sync` is a new process (and
    // a new client config) every time, so the two tickets rustls sends by
    // default were 162 bytes of every handshake thrown away unread.
    tls.send_tls13_tickets = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()?));
    config.max_incoming(INCOMING_CONNECTIONS_MAX);
    Ok(config)
}

/// Endpoint settings for an outgoing sync: connection IDs of length zero
/// on our side. A `sync` endpoint carries exactly one connection to one
/// peer, so the peer needs no connection ID to reach it (quinn routes by
/// the peer's address). This drops 8 bytes from every packet the peer
/// sends us and the connection IDs each side would otherwise issue for
/// migration (four `NEW_CONNECTION_ID` frames from us, and three of the
/// peer's four, since we then allow it only two active IDs): about 300
/// bytes of every handshake. Our own address may still change (NAT
/// rebinding): the peer keeps identifying us by *its* connection ID.
/// Plain QUIC: any peer, old or new, accepts it.
pub fn client_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(0)));
    config
}

/// QUIC client config presenting our certificate. Connect with server name
/// [`SERVER_NAME`]; after connecting, compare [`peer_node_id`] with the
/// node ID you meant to reach.
pub fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = Arc::new(SelfSignedVerifier::new(&provider));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert.clone()], identity.private_key())
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| IdentityError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()?));
    Ok(config)
}

/// The peer's certificate chain from a finished handshake.
fn peer_certs(conn: &quinn::Connection) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let any = conn
        .peer_identity()
        .ok_or(IdentityError::NoPeerCertificate)?;
    let certs = any
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::NoPeerCertificate)?;
    Ok(*certs)
}

/// The peer's node ID, computed from the certificate it proved it holds
/// the key for. This is the value to check against the trust list.
pub fn peer_node_id(conn: &quinn::Connection) -> Result<NodeId, IdentityError> {
    let certs = peer_certs(conn)?;
    let first = certs.first().ok_or(IdentityError::NoPeerCertificate)?;
    NodeId::from_cert_der(first.as_ref())
}

/// The name the peer gave itself (its certificate CN), for messages only.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let certs = peer_certs(conn).ok()?;
    cert_name(certs.first()?.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_display_roundtrip() {
        let id = NodeId::from_bytes([
            0xa5, 0x01, 0xff, 0x00, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11, 0x22,
            0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
        ]);
        let text = id.to_string();
        assert_eq!(text.len(), 32 + 7);
        assert_eq!(text.split('-').count(), 8);
        assert!(text.split('-').all(|g| g.len() == 4));
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        // As a person might type it: lower case, spaces, look-alikes.
        let typed = text
            .to_lowercase()
            .replace('-', " ")
            .replace('1', "l")
            .replace('0', "o");
        assert_eq!(typed.parse::<NodeId>(), Ok(id));
        assert_eq!(id.short_prefix(), text.replace('-', "")[..6]);
        assert_eq!(id.actor_id().to_bytes(), &id.as_bytes()[..]);
    }

    #[test]
    fn node_id_known_encoding() {
        let zero = NodeId::from_bytes([0; 20]);
        assert_eq!(zero.to_string(), "0000-0000-0000-0000-0000-0000-0000-0000");
        let ones = NodeId::from_bytes([0xff; 20]);
        assert_eq!(ones.to_string(), "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ");
    }

    #[test]
    fn node_id_parse_errors() {
        assert_eq!(
            "ABC".parse::<NodeId>(),
            Err(NodeIdParseError::WrongLength { found: 3 })
        );
        assert_eq!(
            "0000-000U".parse::<NodeId>(),
            Err(NodeIdParseError::BadChar {
                ch: 'U',
                position: 9
            })
        );
        let long = "0".repeat(33);
        assert_eq!(
            long.parse::<NodeId>(),
            Err(NodeIdParseError::WrongLength { found: 33 })
        );
    }

    #[test]
    fn generate_save_load_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let id = Identity::generate("Laptop Thôn 3").unwrap();
        id.save(&home).unwrap();
        let loaded = Identity::load(&home).unwrap();
        assert_eq!(loaded.node_id(), id.node_id());
        assert_eq!(loaded.name(), "Laptop Thôn 3");
        assert_eq!(loaded.cert_der(), id.cert_der());
        assert_eq!(NodeId::from_cert_der(id.cert_der()).unwrap(), id.node_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(home.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Never overwrite an identity.
        let other = Identity::generate("other").unwrap();
        assert!(matches!(
            other.save(&home),
            Err(IdentityError::AlreadyExists { .. })
        ));
        assert_eq!(Identity::load(&home).unwrap().node_id(), id.node_id());
        // Debug must not leak the key.
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    #[test]
    fn load_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Missing { .. })
        ));
        let id = Identity::generate("a").unwrap();
        id.save(dir.path()).unwrap();

        let key_path = dir.path().join(KEY_FILE);
        let good_key = fs::read(&key_path).unwrap();
        fs::write(&key_path, b"-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
        fs::write(&key_path, [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
        fs::write(&key_path, &good_key).unwrap();

        let cert_path = dir.path().join(CERT_FILE);
        fs::write(&cert_path, b"not a cert").unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
        // A valid cert that belongs to another key.
        let other = Identity::generate("b").unwrap();
        fs::write(&cert_path, other.cert_der()).unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Mismatch { .. })
        ));
        assert!(matches!(
            NodeId::from_cert_der(b"junk"),
            Err(IdentityError::BadCertificate(_))
        ));
    }

    #[test]
    fn invalid_names_are_refused() {
        assert!(Identity::generate("  ").is_err());
        assert!(Identity::generate(&"x".repeat(65)).is_err());
        assert!(Identity::generate("a\nb").is_err());
    }

    #[tokio::test]
    async fn quic_handshake_both_sides_learn_peer_id() {
        let server_id = Identity::generate("center").unwrap();
        let client_id = Identity::generate("laptop").unwrap();

        let server = quinn::Endpoint::server(
            server_config(&server_id).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let server_addr = server.local_addr().unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

        let accept = tokio::spawn(async move {
            let incoming = server.accept().await.unwrap();
            let conn = incoming.await.unwrap();
            let peer = peer_node_id(&conn).unwrap();
            let name = peer_name(&conn);
            // Keep the connection open until the client has looked too.
            let _ = conn.closed().await;
            (peer, name)
        });

        let conn = client
            .connect_with(client_config(&client_id).unwrap(), server_addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(peer_node_id(&conn).unwrap(), server_id.node_id());
        assert_eq!(peer_name(&conn).as_deref(), Some("center"));
        assert_eq!(
            conn.handshake_data()
                .unwrap()
                .downcast::<quinn::crypto::rustls::HandshakeData>()
                .unwrap()
                .protocol,
            Some(ALPN.to_vec())
        );
        conn.close(0u32.into(), b"done");

        let (seen, name) = accept.await.unwrap();
        assert_eq!(seen, client_id.node_id());
        assert_eq!(name.as_deref(), Some("laptop"));
        client.wait_idle().await;
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let server_id = Identity::generate("center").unwrap();
        let server = quinn::Endpoint::server(
            server_config(&server_id).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let server_side = tokio::spawn(async move {
            match server.accept().await {
                Some(incoming) => incoming.await.is_ok(),
                None => true,
            }
        });
        let provider = provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SelfSignedVerifier::new(&provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let result = client
            .connect_with(quinn::ClientConfig::new(Arc::new(quic)), addr, SERVER_NAME)
            .unwrap()
            .await;
        // In TLS 1.3 the client may finish before the server checks its
        // certificate; either way the connection must not survive.
        if let Ok(conn) = result {
            let reason = conn.closed().await;
            assert!(!matches!(reason, quinn::ConnectionError::LocallyClosed));
        }
        assert!(
            !server_side.await.unwrap(),
            "server must refuse a client without a certificate"
        );
    }

    /// The server config of a node from before session tickets were
    /// turned off (rustls' default: two tickets per handshake).
    fn old_style_server_config(identity: &Identity) -> quinn::ServerConfig {
        let provider = provider();
        let verifier = Arc::new(SelfSignedVerifier::new(&provider));
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![identity.cert.clone()], identity.private_key())
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::new(transport_config().unwrap()));
        config
    }

    /// A client endpoint as `net::sync_with` builds it (`new`) or as a
    /// node from before zero-length connection IDs did (`quinn`'s default).
    fn client_endpoint(new: bool) -> quinn::Endpoint {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = if new {
            client_endpoint_config()
        } else {
            quinn::EndpointConfig::default()
        };
        quinn::Endpoint::new(config, None, socket, quinn::default_runtime().unwrap()).unwrap()
    }

    /// One handshake plus a request and its answer on a stream; both sides
    /// must learn the other's node ID. Returns the client's counters.
    async fn ping_pong(new_client: bool, new_server: bool) -> quinn::ConnectionStats {
        let server_id = Identity::generate("center").unwrap();
        let client_id = Identity::generate("laptop").unwrap();
        let config = if new_server {
            server_config(&server_id).unwrap()
        } else {
            old_style_server_config(&server_id)
        };
        let server = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let expected_client = client_id.node_id();
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            assert_eq!(peer_node_id(&conn).unwrap(), expected_client);
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            assert_eq!(recv.read_to_end(64).await.unwrap(), b"ping");
            send.write_all(b"pong").await.unwrap();
            send.finish().unwrap();
            let _ = conn.closed().await;
        });
        let client = client_endpoint(new_client);
        let conn = client
            .connect_with(client_config(&client_id).unwrap(), addr, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(peer_node_id(&conn).unwrap(), server_id.node_id());
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"ping").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"pong");
        let stats = conn.stats();
        conn.close(0u32.into(), b"done");
        tokio::time::timeout(Duration::from_secs(10), accept)
            .await
            .expect("server side finished")
            .unwrap();
        stats
    }

    #[tokio::test]
    async fn new_and_old_style_nodes_interoperate() {
        for (new_client, new_server) in [(true, false), (false, true), (true, true)] {
            ping_pong(new_client, new_server).await;
        }
    }

    #[tokio::test]
    async fn handshake_sends_no_tickets_and_no_spare_connection_ids() {
        let old = ping_pong(false, false).await;
        let new = ping_pong(true, true).await;
        // What the changes took out, counted in frames (byte counts move
        // with ACK timing): the two session tickets were one CRYPTO frame
        // after the handshake, and the peers issued each other 4 spare
        // connection IDs (one more to replace the one retired).
        assert_eq!(old.frame_rx.crypto - new.frame_rx.crypto, 1);
        assert_eq!(new.frame_tx.new_connection_id, 0);
        assert!(new.frame_rx.new_connection_id <= 1, "{:?}", new.frame_rx);
        assert!(old.frame_tx.new_connection_id >= 4);
        let bytes = |s: &quinn::ConnectionStats| s.udp_tx.bytes + s.udp_rx.bytes;
        assert!(
            bytes(&new) + 300 < bytes(&old),
            "new {} bytes, old {}",
            bytes(&new),
            bytes(&old)
        );
    }
}
