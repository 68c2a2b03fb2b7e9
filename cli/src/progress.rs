//! Per-blob progress: a bar redrawn in place when stderr is a terminal,
//! plain lines (start, every quarter, end) when it is not, so logs and
//! scripts get readable output.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use fieldcase_node::transfer::{BlobProgress, ProgressSink};

use crate::output::bytes;

const BAR_WIDTH: usize = 30;

/// The sink the CLI hands to syncs.
pub fn sink() -> ProgressSink {
    let tty = std::io::stderr().is_terminal();
    // Last quarter printed per blob, for the plain-line mode.
    let quarters: Arc<Mutex<std::collections::HashMap<String, u64>>> = Arc::default();
    Arc::new(move |p: &BlobProgress| {
        let mut err = std::io::stderr().lock();
        match p {
            BlobProgress::Started {
                hash,
                size,
                offset,
                peer,
            } => {
                let short = &hash[..12.min(hash.len())];
                if *offset > 0 {
                    let _ = writeln!(
                        err,
                        "file {short} ({}) from {peer}: resuming at {}",
                        bytes(*size),
                        bytes(*offset)
                    );
                } else {
                    let _ = writeln!(err, "file {short} ({}) from {peer}", bytes(*size));
                }
            }
            BlobProgress::Advanced { hash, done, size } => {
                let short = &hash[..12.min(hash.len())];
                let pct = done * 100 / (*size).max(1);
                if tty {
                    let filled = (pct as usize * BAR_WIDTH) / 100;
                    let _ = write!(
                        err,
                        "\r  [{}{}] {pct:>3}% {short} {}/{}",
                        "#".repeat(filled),
                        " ".repeat(BAR_WIDTH - filled),
                        bytes(*done),
                        bytes(*size)
                    );
                    let _ = err.flush();
                } else {
                    let q = pct / 25;
                    let mut seen = quarters.lock().unwrap_or_else(|e| e.into_inner());
                    if seen.get(hash) != Some(&q) {
                        seen.insert(hash.clone(), q);
                        let _ = writeln!(
                            err,
                            "  {short}: {pct}% ({} of {})",
                            bytes(*done),
                            bytes(*size)
                        );
                    }
                }
            }
            BlobProgress::Finished { hash, ok, message } => {
                let short = &hash[..12.min(hash.len())];
                if tty {
                    let _ = writeln!(err);
                }
                let _ = writeln!(
                    err,
                    "  {short}: {}{message}",
                    if *ok { "" } else { "not stored: " }
                );
            }
        }
    })
}
