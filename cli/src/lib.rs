//! The `fieldcase` command line: parsing and printing only.
//!
//! Every command opens the node in `--home`, does one thing through the
//! node facade, and prints. A command that writes prints success only after
//! the store's commit returned. Errors are one line on stderr and a
//! non-zero exit status.

mod demo;
mod output;
mod progress;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use fieldcase_node::bulk::{BulkError, Format};
use fieldcase_node::case::{self, DocState, NewCase, Status};
use fieldcase_node::net::{self, Logger, Server, SyncOptions};
use fieldcase_node::node::{Node, Role};
use fieldcase_node::notify::{ChangeListener, CHANNEL_CAPACITY};
use fieldcase_node::store::ListFilter;

pub use demo::run_demo;

/// Default port for `serve`.
pub const DEFAULT_PORT: u16 = 7420;

#[derive(Parser)]
#[command(
    name = "fieldcase",
    version,
    about = "Offline-first case sync for commune service centers and their field laptops"
)]
struct Cli {
    /// Node home folder (default: $XDG_DATA_HOME/fieldcase or ~/.local/share/fieldcase).
    #[arg(long, global = true, env = "FIELDCASE_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this node: key pair, certificate and empty store.
    Init {
        /// A name people recognise, e.g. "center" or "laptop-thon-dong".
        #[arg(long)]
        name: String,
        /// `field` for a laptop, `center` for the service center.
        #[arg(long)]
        role: String,
    },
    /// Print this node's ID.
    Id,
    /// Manage trusted peers.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Accept sync connections until Ctrl-C or SIGTERM.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
        listen: SocketAddr,
    },
    /// Sync with one peer, or with every peer that has an address.
    Sync {
        /// Peer name; omit for all peers with an address.
        peer: Option<String>,
        /// Stay connected, retry with backoff, and push edits as they happen.
        #[arg(long)]
        watch: bool,
    },
    /// Work with cases.
    #[command(subcommand)]
    Case(CaseCommand),
    /// Peers, the last successful sync with each, and cases changed since.
    Status,
    /// Show or change this node's settings.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run a center and two laptops on loopback and tell a day's story.
    Demo,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Every setting and its value.
    Show,
    /// Change a setting: `blob-max-mb N` (largest attachment accepted),
    /// `fetch all|on-demand` (which attachment bytes sync downloads).
    Set {
        /// Setting name.
        key: String,
        /// New value.
        value: String,
    },
}

#[derive(Subcommand)]
enum PeerCommand {
    /// Trust a peer by its node ID.
    Add {
        /// The peer's node ID, as `fieldcase id` prints it.
        node_id: String,
        /// A name for the peer, used by `sync NAME`.
        #[arg(long)]
        name: String,
        /// Where the peer listens, HOST:PORT.
        #[arg(long)]
        addr: Option<String>,
    },
    /// List trusted peers.
    List,
}

#[derive(Subcommand)]
enum CaseCommand {
    /// Take a new application; prints its code.
    New {
        /// Procedure id (see `case fields`).
        #[arg(long)]
        procedure: String,
        /// Applicant's full name.
        #[arg(long)]
        applicant: String,
        /// Applicant's village.
        #[arg(long)]
        village: String,
        /// More fields, FIELD=VALUE (repeatable).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        set: Vec<String>,
    },
    /// List cases.
    List {
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Only this village.
        #[arg(long)]
        village: Option<String>,
        /// Only this procedure.
        #[arg(long)]
        procedure: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one case with its checklist, notes, history and conflicts.
    Show {
        /// Case code.
        code: String,
        /// Machine-readable output (includes heads).
        #[arg(long)]
        json: bool,
    },
    /// Set a field.
    Set {
        /// Case code.
        code: String,
        /// Field name (kebab-case).
        field: String,
        /// New value.
        value: String,
    },
    /// Mark a checklist item received, missing or invalid.
    Doc {
        /// Case code.
        code: String,
        /// Checklist item id.
        item: String,
        /// received | missing | invalid
        state: String,
    },
    /// Change the status.
    Status {
        /// Case code.
        code: String,
        /// New status.
        status: String,
    },
    /// Add a note.
    Note {
        /// Case code.
        code: String,
        /// The note.
        text: String,
    },
    /// Record a citizen's question.
    Ask {
        /// Case code.
        code: String,
        /// The question.
        text: String,
    },
    /// Answer a question.
    Answer {
        /// Case code.
        code: String,
        /// Question number, as `case show` lists it.
        question_no: usize,
        /// The answer.
        text: String,
    },
    /// Resolve a conflict by choosing or typing a value.
    Resolve {
        /// Case code.
        code: String,
        /// Conflicting field.
        field: String,
        /// The value to keep.
        value: String,
    },
    /// Attach a photographed or scanned document to a checklist item.
    Attach {
        /// Case code.
        code: String,
        /// Checklist item the document supports.
        item: String,
        /// The file (photo, scan, PDF).
        file: PathBuf,
        /// A note about the document.
        #[arg(long, default_value = "")]
        note: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List a case's attachments and whether their bytes are here.
    Files {
        /// Case code.
        code: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Write an attachment out, verifying its hash; fetches it from a peer
    /// first if this node holds only its metadata.
    Open {
        /// Case code.
        code: String,
        /// The attachment's hash (or a unique prefix of 8+ characters).
        hash: String,
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
    /// Import cases from a CSV file (header row) or JSON Lines, the same
    /// fields as `case new`. Invalid rows are listed by line and skipped;
    /// the valid rows are imported (unless --dry-run) and the exit status
    /// is non-zero if any row was invalid. A row imported before (the same
    /// content, the same copy of it in its file) is skipped and listed with
    /// its case code, so a file can be imported again after a failure or
    /// after fixing its invalid rows.
    Import {
        /// The file (`-` for standard input, which needs --format).
        file: PathBuf,
        /// csv | jsonl (default: from the file extension).
        #[arg(long)]
        format: Option<String>,
        /// Check every row and report, writing nothing.
        #[arg(long)]
        dry_run: bool,
        /// Import rows even if an identical row was imported before.
        #[arg(long)]
        again: bool,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
    },
    /// Export every case as CSV or JSON Lines (importable again).
    Export {
        /// csv | jsonl (default: from --out's extension, else csv).
        #[arg(long)]
        format: Option<String>,
        /// Write here instead of standard output (replaced only once the
        /// export is complete).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List a procedure's fields and checklist items.
    Fields {
        /// Procedure id.
        procedure: String,
    },
}

/// Entry point shared by the `fieldcase` binary and the test crate's copy.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut line = format!("error: {e}");
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !line.contains(&cause) {
                    line.push_str(&format!(": {cause}"));
                }
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

fn default_home() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("fieldcase"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            anyhow!("cannot find a home folder; pass --home DIR or set FIELDCASE_HOME")
        })?;
    Ok(PathBuf::from(home).join(".local/share/fieldcase"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    let home = match cli.home {
        Some(h) => h,
        None => default_home()?,
    };
    match cli.command {
        Command::Init { name, role } => {
            let role: Role = role.parse()?;
            let id = Node::init(&home, &name, role)?;
            println!(
                "initialised {} node '{name}' in {}",
                role.as_str(),
                home.display()
            );
            println!("node ID (read it aloud to peers):");
            println!("{id}");
        }
        Command::Id => {
            let node = Node::open(&home)?;
            println!("{}", node.node_id());
        }
        Command::Peer(PeerCommand::Add {
            node_id,
            name,
            addr,
        }) => {
            if let Some(a) = &addr {
                validate_addr(a)?;
            }
            let mut node = Node::open(&home)?;
            let id = node.add_peer(&node_id, &name, addr.as_deref())?;
            println!("trusted peer '{name}' ({id})");
        }
        Command::Peer(PeerCommand::List) => {
            let node = Node::open(&home)?;
            output::print_peers(&node.peers()?);
        }
        Command::Serve { listen } => serve(&home, listen)?,
        Command::Sync { peer, watch } => sync(&home, peer, watch)?,
        Command::Case(cmd) => case_command(&home, cmd)?,
        Command::Status => {
            let mut node = Node::open(&home)?;
            let seq = node.store().update_seq()?;
            let mut rows = Vec::new();
            for p in node.peers()? {
                let changed = node.store().changed_since(p.last_sync_seq.unwrap_or(0))?;
                rows.push((p, changed));
            }
            println!(
                "node '{}' ({}), role {}, {} local updates",
                node.name(),
                node.node_id(),
                node.role().as_str(),
                seq
            );
            output::print_status(&rows);
        }
        Command::Demo => run_demo()?,
        Command::Config(ConfigCommand::Show) => {
            let mut node = Node::open(&home)?;
            for (k, v) in fieldcase_node::config::show(node.store())? {
                println!("{k} = {v}");
            }
        }
        Command::Config(ConfigCommand::Set { key, value }) => {
            let mut node = Node::open(&home)?;
            fieldcase_node::config::set(node.store(), &key, &value)
                .map_err(fieldcase_node::node::NodeError::from)?;
            println!("{key} = {value}");
        }
    }
    Ok(())
}

fn validate_addr(a: &str) -> Result<()> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("address '{a}' must be HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("address '{a}' must be HOST:PORT with a port from 0 to 65535");
    }
    Ok(())
}

fn stdout_logger() -> Logger {
    std::sync::Arc::new(|line: &str| println!("{line}"))
}

/// Resolves when Ctrl-C or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn serve(home: &Path, listen: SocketAddr) -> Result<()> {
    let node = Node::open(home)?;
    drop(node);
    let rt = runtime()?;
    rt.block_on(async {
        let server = Server::bind(home, listen, stdout_logger())?;
        let addr = server.local_addr()?;
        println!("listening on {addr}");
        server.run(shutdown_signal()).await?;
        println!("shut down cleanly");
        Ok(())
    })
}

fn sync(home: &Path, peer: Option<String>, watch: bool) -> Result<()> {
    let node = Node::open(home)?;
    let peers = match &peer {
        Some(name) => vec![node.peer(name)?],
        None => {
            let all: Vec<_> = node
                .peers()?
                .into_iter()
                .filter(|p| p.addr.is_some())
                .collect();
            if all.is_empty() {
                bail!("no peer has an address; add one with `fieldcase peer add ID --name NAME --addr HOST:PORT`");
            }
            all
        }
    };
    drop(node);
    let rt = runtime()?;
    rt.block_on(async {
        if watch {
            let (changes, _) = tokio::sync::broadcast::channel(CHANNEL_CAPACITY);
            let _listener = ChangeListener::bind(home, changes.clone())
                .context("cannot listen for local changes")?;
            let (stop, _) = tokio::sync::broadcast::channel(1);
            let mut tasks = tokio::task::JoinSet::new();
            for p in peers {
                println!(
                    "watching {} at {}",
                    p.name,
                    p.addr.clone().unwrap_or_default()
                );
                tasks.spawn(net::watch(
                    home.to_path_buf(),
                    p,
                    changes.clone(),
                    stdout_logger(),
                    progress::sink(),
                    stop.subscribe(),
                ));
            }
            shutdown_signal().await;
            let _ = stop.send(());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            return Ok(());
        }
        let mut failed = 0;
        let n = peers.len();
        for p in peers {
            let opts = SyncOptions {
                live: false,
                changes: None,
                log: stdout_logger(),
                progress: progress::sink(),
                only_blob: None,
            };
            match net::sync_resuming(home, &p, opts).await {
                Ok(report) => println!("{}", report.summary()),
                Err(e) => {
                    eprintln!("error: {e}");
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            bail!("{failed} of {n} syncs failed");
        }
        Ok(())
    })
}

/// Fetches one attachment's bytes from the first peer that has them.
fn fetch_on_demand(node: &mut Node, hash: &str) -> Result<()> {
    let home = node.home().to_path_buf();
    let peers: Vec<_> = node
        .peers()?
        .into_iter()
        .filter(|p| p.addr.is_some())
        .collect();
    if peers.is_empty() {
        bail!("the bytes of {hash} are not on this node and no peer has an address to fetch them from");
    }
    let rt = runtime()?;
    let mut errors = Vec::new();
    for p in peers {
        let opts = SyncOptions {
            live: false,
            changes: None,
            log: stdout_logger(),
            progress: progress::sink(),
            only_blob: Some(hash.to_string()),
        };
        match rt.block_on(net::sync_resuming(&home, &p, opts)) {
            Ok(report) if report.blobs.fetched > 0 => return Ok(()),
            Ok(_) => errors.push(format!("{} does not have it", p.name)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    bail!("could not fetch {hash}: {}", errors.join("; "))
}

fn parse_set(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| anyhow!("--set expects FIELD=VALUE, got '{p}'"))
        })
        .collect()
}

/// The format named by `--format`, else implied by the file name.
fn bulk_format(given: Option<&str>, path: Option<&Path>) -> Result<Option<Format>> {
    match given {
        Some(f) => Ok(Some(f.parse()?)),
        None => Ok(path.and_then(Format::from_path)),
    }
}

fn import(
    node: &mut Node,
    file: &Path,
    format: Option<&str>,
    dry_run: bool,
    again: bool,
    json: bool,
) -> Result<()> {
    let stdin = file.as_os_str() == "-";
    let format = bulk_format(format, (!stdin).then_some(file))?.ok_or_else(|| {
        anyhow!(
            "cannot tell the format of {} from its name; pass --format csv or --format jsonl",
            file.display()
        )
    })?;
    let report = if stdin {
        node.import(std::io::stdin().lock(), format, dry_run, again)?
    } else {
        let f =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        node.import(f, format, dry_run, again)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        output::print_import(&report);
    }
    if report.invalid_count > 0 {
        if dry_run {
            bail!(
                "{} invalid row(s); nothing was written (dry run)",
                report.invalid_count
            );
        }
        bail!(
            "{} invalid row(s) were not imported; the {} valid row(s) were. Fix the invalid \
             rows and import the file again: the rows already imported are skipped",
            report.invalid_count,
            report.imported
        );
    }
    Ok(())
}

fn export(node: &Node, format: Option<&str>, out: Option<&Path>) -> Result<()> {
    let format = bulk_format(format, out)?.unwrap_or(Format::Csv);
    let report = match out {
        None => node.export(std::io::stdout().lock(), format)?,
        Some(path) => {
            // Written beside the target and renamed at the end, so a failed
            // export never leaves a truncated file under the real name.
            let mut name = path
                .file_name()
                .ok_or_else(|| anyhow!("--out {} is not a file name", path.display()))?
                .to_os_string();
            name.push(".partial");
            let tmp = path.with_file_name(name);
            let f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let written = node.export(&f, format).and_then(|r| {
                f.sync_all().map_err(BulkError::Write)?;
                Ok(r)
            });
            let report = match written {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e.into());
                }
            };
            std::fs::rename(&tmp, path).with_context(|| {
                format!("cannot rename {} to {}", tmp.display(), path.display())
            })?;
            println!("exported {} cases to {}", report.exported, path.display());
            report
        }
    };
    if report.damaged_count > 0 {
        bail!(
            "{} damaged case(s) were left out ({}); they will be re-fetched from a peer at the \
             next sync",
            report.damaged_count,
            report.damaged.join(", ")
        );
    }
    Ok(())
}

fn case_command(home: &Path, cmd: CaseCommand) -> Result<()> {
    if let CaseCommand::Fields { procedure } = &cmd {
        output::print_fields(case::procedure(procedure)?);
        return Ok(());
    }
    let mut node = Node::open(home)?;
    match cmd {
        CaseCommand::New {
            procedure,
            applicant,
            village,
            set,
        } => {
            let new = NewCase {
                procedure,
                applicant,
                village,
                fields: parse_set(&set)?,
            };
            let code = node.new_case(&new)?;
            println!("{code}");
        }
        CaseCommand::List {
            status,
            village,
            procedure,
            json,
        } => {
            if let Some(s) = &status {
                s.parse::<Status>()?;
            }
            if let Some(p) = &procedure {
                case::procedure(p)?;
            }
            let rows = node.list(&ListFilter {
                status,
                village,
                procedure,
            })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&output::rows_json(&rows))?
                );
            } else {
                output::print_cases(&rows);
            }
        }
        CaseCommand::Show { code, json } => {
            let view = node.show(&code)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                output::print_case(&view);
            }
        }
        CaseCommand::Set { code, field, value } => {
            node.update(&code, |doc, a, now| {
                case::set_field(doc, &field, &value, a, now)
            })?;
            println!("{code}: {field} = {value}");
        }
        CaseCommand::Doc { code, item, state } => {
            let state: DocState = state.parse()?;
            node.update(&code, |doc, a, now| {
                case::mark_document(doc, &item, state, a, now)
            })?;
            println!("{code}: {item} marked {state}");
        }
        CaseCommand::Status { code, status } => {
            let to: Status = status.parse()?;
            node.update(&code, |doc, a, now| case::change_status(doc, to, a, now))?;
            println!("{code}: status is now {to}");
        }
        CaseCommand::Note { code, text } => {
            node.update(&code, |doc, a, now| case::add_note(doc, &text, a, now))?;
            println!("{code}: note added");
        }
        CaseCommand::Ask { code, text } => {
            let no = node.update(&code, |doc, a, now| case::ask(doc, &text, a, now))?;
            println!("{code}: question {no} recorded");
        }
        CaseCommand::Answer {
            code,
            question_no,
            text,
        } => {
            node.update(&code, |doc, a, now| {
                case::answer(doc, question_no, &text, a, now)
            })?;
            println!("{code}: question {question_no} answered");
        }
        CaseCommand::Resolve { code, field, value } => {
            node.update(&code, |doc, a, now| {
                case::resolve(doc, &field, &value, a, now)
            })?;
            println!("{code}: conflict on {field} resolved as '{value}'");
        }
        CaseCommand::Fields { procedure } => output::print_fields(case::procedure(&procedure)?),
        CaseCommand::Import {
            file,
            format,
            dry_run,
            again,
            json,
        } => import(&mut node, &file, format.as_deref(), dry_run, again, json)?,
        CaseCommand::Export { format, out } => export(&node, format.as_deref(), out.as_deref())?,
        CaseCommand::Attach {
            code,
            item,
            file,
            note,
            json,
        } => {
            let a = node.attach_file(&code, &item, &file, &note)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                println!(
                    "{code}: attached {} ({}, {}) to {item}",
                    a.name,
                    a.media_type,
                    output::bytes(a.size)
                );
                println!("{}", a.hash);
            }
        }
        CaseCommand::Files { code, json } => {
            let files = node.files(&code)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&files)?);
            } else {
                output::print_files(&files);
            }
        }
        CaseCommand::Open { code, hash, out } => {
            let file = node.find_file(&code, &hash)?;
            let blobs = node.blobs()?;
            let h = fieldcase_node::blobs::parse_hash(&file.hash)
                .map_err(fieldcase_node::node::NodeError::from)?;
            if !blobs.has(&h) {
                fetch_on_demand(&mut node, &file.hash)?;
            }
            let n = blobs
                .export(&h, &out)
                .map_err(fieldcase_node::node::NodeError::from)?;
            println!(
                "wrote {} ({}) to {}; hash verified",
                file.name,
                output::bytes(n),
                out.display()
            );
        }
    }
    Ok(())
}
