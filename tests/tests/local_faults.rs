//! Local faults, driven through the real CLI: a store file overwritten with
//! garbage, a WAL torn by a crash, a full disk, and one damaged case.
//!
//! Each time the CLI says what is wrong in one line, exits non-zero, never
//! panics, never claims a write it did not make, and never loses or
//! invents an acknowledged write.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use fieldcase_node::node::DB_FILE;
use fieldcase_tests::{run_bounded, seeded_rng, Node, Output, COMMAND_TIMEOUT};
use rand::RngExt;

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

/// A failed command said what went wrong in one `error:` line, and did
/// not panic.
fn one_clear_error(out: &Output, what: &str) -> Result<String> {
    ensure!(
        !out.success(),
        "{what}: the command succeeded:\n{}",
        out.describe()
    );
    ensure!(
        !out.stderr.contains("panicked") && !out.stderr.contains("RUST_BACKTRACE"),
        "{what}: the CLI panicked:\n{}",
        out.describe()
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{what}: expected one `error:` line, got:\n{}",
        out.describe()
    );
    eprintln!("{what}: {}", lines[0]);
    Ok(lines[0].to_string())
}

fn integrity_ok(db: &Path) -> Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    let verdict: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    ensure!(
        verdict == "ok",
        "integrity_check on {}: {verdict}",
        db.display()
    );
    Ok(())
}

fn new_case(node: &Node, n: usize) -> Result<Output> {
    node.run(&[
        "case",
        "new",
        "--procedure",
        "certification",
        "--applicant",
        &format!("Applicant {n}"),
        "--village",
        "Thon Dong",
    ])
}

#[test]
fn a_store_file_overwritten_with_garbage_gives_one_clear_error() -> Result<()> {
    setup();
    let (mut rng, _) = seeded_rng("local_faults_garbage", 0x6A7BA6E);
    let node = Node::init("laptop-dong", "field")?;
    node.case_new("certification", "Pham Thi Em", "Thon Dong", &[])?;
    let db = node.home().join(DB_FILE);
    let len = std::fs::metadata(&db)?.len() as usize;
    let mut garbage = vec![0u8; len];
    rng.fill(&mut garbage[..]);
    std::fs::write(&db, &garbage)?;
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(node.home().join(format!("{DB_FILE}{side}")));
    }
    for args in [
        &["case", "list"][..],
        &[
            "case",
            "new",
            "--procedure",
            "certification",
            "--applicant",
            "X",
            "--village",
            "Y",
        ],
        &["peer", "list"],
    ] {
        let out = node.run(args)?;
        let line = one_clear_error(&out, &args.join(" "))?;
        ensure!(
            line.contains(DB_FILE),
            "the error should name the damaged file: {line}"
        );
        ensure!(
            out.stdout.trim().is_empty(),
            "printed output: {}",
            out.stdout
        );
    }
    Ok(())
}

/// Writes acknowledged by the CLI (it printed the case code), each with the
/// WAL length right after it.
struct Acked {
    code: String,
    wal_len: u64,
}

fn copy_dir(from: &Path, to: &Path, skip: &[&str]) -> Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name.to_str() == Some(*s)) {
            continue;
        }
        let dst = to.join(&name);
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&dst)?;
            copy_dir(&entry.path(), &dst, skip)?;
        } else {
            std::fs::copy(entry.path(), &dst)?;
        }
    }
    Ok(())
}

#[test]
fn a_torn_wal_loses_only_writes_whose_frames_were_cut() -> Result<()> {
    setup();
    let (mut rng, seed) = seeded_rng("local_faults_wal", 0x0DDBA11);
    let node = Node::init("laptop-dong", "field")?;
    let db = node.home().join(DB_FILE);
    let wal: PathBuf = node.home().join(format!("{DB_FILE}-wal"));
    // One reader holds the database open, so no CLI process is the last
    // connection and none checkpoints the WAL away when it exits: every
    // write below stays in the WAL, in order.
    let holder = rusqlite::Connection::open(&db)?;
    let _: i64 = holder.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
    let base = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);

    let mut acked = Vec::new();
    for n in 0..12 {
        let out = new_case(&node, n)?.ok()?;
        acked.push(Acked {
            code: out.last_line(),
            wal_len: std::fs::metadata(&wal)?.len(),
        });
    }
    // A writer killed with SIGKILL at a random moment: it may or may not
    // have committed; it never acknowledged.
    let mut writer = node
        .command(&[
            "case",
            "new",
            "--procedure",
            "certification",
            "--applicant",
            "Killed Writer",
            "--village",
            "Thon Dong",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
    writer.kill()?;
    writer.wait()?;

    // The crash image: the files as they are on disk now.
    let image = tempfile::tempdir()?;
    copy_dir(node.home(), image.path(), &[&format!("{DB_FILE}-shm")])?;
    let full = std::fs::metadata(image.path().join(format!("{DB_FILE}-wal")))?.len();
    let last_acked = acked.last().expect("writes").wal_len;
    ensure!(full >= last_acked, "the WAL shrank: {full} < {last_acked}");
    drop(holder);

    // Tear the WAL at odd lengths, each on a fresh copy of the image: at
    // the start, between writes, and inside the last write's frames.
    let mut cuts: Vec<u64> = (0..5).map(|_| rng.random_range(base..full) | 1).collect();
    cuts.push((acked[5].wal_len + 1) | 1);
    cuts.push((last_acked - 3) | 1);
    for cut in cuts {
        let what = format!("WAL cut to {cut} of {full} bytes (seed {seed})");
        let copy = Node::new("laptop-copy");
        copy_dir(image.path(), copy.home(), &[])?;
        let copy_wal = copy.home().join(format!("{DB_FILE}-wal"));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy_wal)?
            .set_len(cut)?;
        // The store opens, and holds exactly the acknowledged writes whose
        // WAL frames survived whole, plus at most the killed writer's.
        let codes = copy.codes().with_context(|| what.clone())?;
        let must: Vec<&str> = acked
            .iter()
            .filter(|a| a.wal_len <= cut)
            .map(|a| a.code.as_str())
            .collect();
        let lost: Vec<&str> = acked
            .iter()
            .filter(|a| a.wal_len > cut)
            .map(|a| a.code.as_str())
            .collect();
        for c in &must {
            ensure!(
                codes.iter().any(|x| x == c),
                "{what}: lost {c}; holds {codes:?}"
            );
        }
        for c in &lost {
            ensure!(
                !codes.iter().any(|x| x == c),
                "{what}: {c} appeared though its frames were cut"
            );
        }
        let extra: Vec<&String> = codes
            .iter()
            .filter(|c| !must.contains(&c.as_str()))
            .collect();
        ensure!(
            extra.len() <= usize::from(cut > last_acked),
            "{what}: unexpected cases {extra:?}"
        );
        // Every surviving case reads back whole.
        for c in &codes {
            copy.show_json(c)
                .with_context(|| format!("{what}: case {c}"))?;
        }
        integrity_ok(&copy.home().join(DB_FILE)).context(what.clone())?;
        eprintln!(
            "{what}: {} acknowledged writes survive, {} cut",
            must.len(),
            lost.len()
        );
    }
    Ok(())
}

/// Makes the node's home a small filesystem that is nearly full: a real
/// tmpfs mounted over it when this process may mount (root), else a file
/// size limit (RLIMIT_FSIZE) on the CLI processes, with SIGXFSZ ignored so
/// a write past it fails with EFBIG instead of killing the process.
enum FullDisk {
    Tmpfs {
        home: PathBuf,
        filler: PathBuf,
    },
    FileSizeLimit {
        bytes: u64,
        cases: usize,
        _holder: Option<rusqlite::Connection>,
    },
}

impl FullDisk {
    fn squeeze(node: &Node) -> Result<FullDisk> {
        let home = node.home().to_path_buf();
        let saved = tempfile::tempdir()?;
        copy_dir(&home, saved.path(), &[])?;
        // FIELDCASE_TEST_NO_MOUNT=1 takes the fallback even as root.
        let may_mount = std::env::var_os("FIELDCASE_TEST_NO_MOUNT").is_none();
        let mounted = may_mount
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
                .arg(&home)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
        if !mounted {
            eprintln!("cannot mount a tmpfs here; limiting file size with RLIMIT_FSIZE instead");
            // A held connection keeps the WAL from being checkpointed
            // away, so it only grows; once it is past the WAL index size
            // (32 KiB), a limit at its current length fails the next
            // write's WAL frames and nothing else.
            let db = home.join(DB_FILE);
            let holder = rusqlite::Connection::open(&db)?;
            let _: i64 =
                holder.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
            let wal = home.join(format!("{DB_FILE}-wal"));
            let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
            let mut n = 1000;
            while wal_len() < 40 * 1024 {
                new_case(node, n)?.ok()?;
                n += 1;
            }
            return Ok(FullDisk::FileSizeLimit {
                bytes: wal_len(),
                cases: n - 1000,
                _holder: Some(holder),
            });
        }
        copy_dir(saved.path(), &home, &[])?;
        // Fill it, leaving a few kilobytes: less than one case write needs
        // in WAL frames.
        let filler = home.join("filler");
        let free = nix_free_bytes(&home)?;
        std::fs::write(&filler, vec![0u8; free.saturating_sub(6 * 1024) as usize])?;
        Ok(FullDisk::Tmpfs { home, filler })
    }

    fn command(&self, node: &Node, args: &[&str]) -> Command {
        let mut cmd = node.command(args);
        if let FullDisk::FileSizeLimit { bytes, .. } = *self {
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    let lim = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    /// Cases written to make room for the fallback's limit.
    fn filler_cases(&self) -> usize {
        match self {
            FullDisk::Tmpfs { .. } => 0,
            FullDisk::FileSizeLimit { cases, .. } => *cases,
        }
    }

    /// Frees the space (the tmpfs stays mounted until drop).
    fn free(&mut self) -> Result<()> {
        match self {
            FullDisk::Tmpfs { filler, .. } => std::fs::remove_file(filler)?,
            FullDisk::FileSizeLimit { bytes, .. } => *bytes = libc::RLIM_INFINITY,
        }
        Ok(())
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        if let FullDisk::Tmpfs { home, .. } = self {
            let _ = Command::new("umount").arg(&home).status();
        }
    }
}

fn nix_free_bytes(path: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an out-pointer to a zeroed struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        bail!("statvfs: {}", std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[test]
fn a_full_disk_fails_the_write_loudly_and_keeps_earlier_data() -> Result<()> {
    setup();
    let node = Node::init("laptop-dong", "field")?;
    let mut earlier = Vec::new();
    for n in 0..3 {
        earlier.push(new_case(&node, n)?.ok()?.last_line());
    }
    let before: Vec<_> = earlier
        .iter()
        .map(|c| node.show_json(c))
        .collect::<Result<_>>()?;
    let mut disk = FullDisk::squeeze(&node)?;
    // Near the 4000-character limit of a note.
    let big_note: String = "Ghi chú dài. ".repeat(300).chars().take(3_900).collect();
    for (what, args) in [
        (
            "case new on a full disk",
            vec![
                "case",
                "new",
                "--procedure",
                "certification",
                "--applicant",
                "Tran Thi Cuc",
                "--village",
                "Thon Dong",
            ],
        ),
        (
            "case note on a full disk",
            vec!["case", "note", earlier[0].as_str(), big_note.as_str()],
        ),
    ] {
        let out = run_bounded(disk.command(&node, &args), COMMAND_TIMEOUT)?;
        let line = one_clear_error(&out, what)?;
        ensure!(
            out.stdout.trim().is_empty(),
            "{what}: printed a success line: {}",
            out.stdout
        );
        // On a real full file system the message says so; under the
        // file-size limit of the fallback the disk has room and the write
        // fails with EFBIG, an I/O error.
        let says_full = line.contains("the disk is full");
        ensure!(
            says_full || (matches!(disk, FullDisk::FileSizeLimit { .. }) && line.contains("I/O")),
            "{what}: the error should say the disk is full: {line}"
        );
    }

    disk.free()?;
    let after: Vec<_> = earlier
        .iter()
        .map(|c| node.show_json(c))
        .collect::<Result<_>>()?;
    ensure!(after == before, "earlier data changed after the full disk");
    ensure!(
        node.codes()?.len() == earlier.len() + disk.filler_cases(),
        "the refused case was stored anyway"
    );
    integrity_ok(&node.home().join(DB_FILE))?;
    // Writing works again once there is room.
    let code = new_case(&node, 99)?.ok()?.last_line();
    node.ok(&["case", "note", &earlier[0], &big_note])?;
    ensure!(node.codes()?.contains(&code));
    drop(disk);
    Ok(())
}

#[test]
fn a_damaged_case_says_so_and_the_next_sync_repairs_it() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let laptop = Node::init("laptop-dong", "field")?;
    let server = center.serve()?;
    center.trust(&laptop, None)?;
    laptop.trust(&center, Some(server.addr()))?;
    let code = laptop.case_new("birth-registration", "Nguyen Van An", "Thon Dong", &[])?;
    for i in 0..3 {
        laptop.ok(&["case", "note", &code, &format!("visit {i}")])?;
    }
    laptop.sync_ok("center")?;
    let good = laptop.show_json(&code)?;

    // A change chunk on the laptop's disk is overwritten with garbage.
    {
        let conn = rusqlite::Connection::open(laptop.home().join(DB_FILE))?;
        let n = conn.execute(
            "UPDATE case_changes SET data = X'DEADBEEF' \
             WHERE id = (SELECT max(id) FROM case_changes WHERE code = ?1)",
            [&code],
        )?;
        ensure!(n == 1, "no change chunk to damage");
    }

    let out = laptop.run(&["case", "show", &code])?;
    let line = one_clear_error(&out, "case show of a damaged case")?;
    ensure!(
        line.contains("damaged") && line.contains("re-fetched"),
        "case show should say the case is damaged and will be re-fetched: {line}"
    );

    let s = laptop.sync_ok("center")?;
    ensure!(
        s.received == 1,
        "the sync should bring the case back: {s:?}"
    );
    ensure!(
        laptop.show_json(&code)? == good,
        "the repaired case is exactly the one written"
    );
    integrity_ok(&laptop.home().join(DB_FILE))?;
    Ok(())
}
