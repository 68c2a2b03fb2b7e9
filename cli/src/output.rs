//! Human-readable tables and the documented JSON shapes.

use fieldcase_node::attach::FileEntry;
use fieldcase_node::bulk::ImportReport;
use fieldcase_node::case::{CaseView, ProcedureDef};
use fieldcase_node::node::now_ms;
use fieldcase_node::store::{CaseRow, PeerRow};
use serde_json::{json, Value};

/// Prints rows as a table with a header, columns padded to the widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i].saturating_sub(c.chars().count());
                format!("{c}{}", " ".repeat(pad))
            })
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// "3 min ago"-style age of a timestamp, for status tables.
pub fn age(at_ms: i64) -> String {
    let secs = ((now_ms() - at_ms) / 1000).max(0);
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86_399 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

pub fn print_peers(peers: &[PeerRow]) {
    if peers.is_empty() {
        println!("no trusted peers; add one with `fieldcase peer add NODE_ID --name NAME`");
        return;
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.node_id.clone(),
                p.addr.clone().unwrap_or_else(|| "-".into()),
                p.last_sync_at_ms.map(age).unwrap_or_else(|| "never".into()),
            ]
        })
        .collect();
    table(&["NAME", "NODE ID", "ADDRESS", "LAST SYNC"], &rows);
}

pub fn print_status(rows: &[(PeerRow, u64)]) {
    if rows.is_empty() {
        println!("no trusted peers");
        return;
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(p, changed)| {
            vec![
                p.name.clone(),
                p.addr.clone().unwrap_or_else(|| "-".into()),
                p.last_sync_at_ms.map(age).unwrap_or_else(|| "never".into()),
                changed.to_string(),
            ]
        })
        .collect();
    table(
        &["PEER", "ADDRESS", "LAST SYNC", "CASES CHANGED SINCE"],
        &rows,
    );
}

pub fn print_cases(rows: &[CaseRow]) {
    if rows.is_empty() {
        println!("no cases");
        return;
    }
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.code.clone(),
                r.projection.procedure.clone(),
                r.projection.status.clone(),
                r.projection.village.clone(),
                r.projection.applicant.clone(),
                r.projection.due_date.clone(),
                if r.projection.conflicts > 0 {
                    r.projection.conflicts.to_string()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "CODE",
            "PROCEDURE",
            "STATUS",
            "VILLAGE",
            "APPLICANT",
            "DUE",
            "CONFLICTS",
        ],
        &rows,
    );
}

/// The `case list --json` shape: an array of objects with these keys.
pub fn rows_json(rows: &[CaseRow]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                json!({
                    "code": r.code,
                    "procedure": r.projection.procedure,
                    "status": r.projection.status,
                    "village": r.projection.village,
                    "applicant": r.projection.applicant,
                    "due_date": r.projection.due_date,
                    "updated_at_ms": r.projection.updated_at_ms,
                    "conflicts": r.projection.conflicts,
                })
            })
            .collect(),
    )
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

pub fn print_case(v: &CaseView) {
    println!("{}  {} ({})", v.code, v.procedure_title, v.procedure);
    println!("status      {}", v.status);
    println!("due         {}", v.due_date);
    println!("assignee    {}", or_dash(&v.assignee));
    println!(
        "applicant   {} · born {} · ID {} · phone {} · {}",
        or_dash(&v.applicant.name),
        or_dash(&v.applicant.birth_date),
        or_dash(&v.applicant.id_number),
        or_dash(&v.applicant.phone),
        or_dash(&v.applicant.village)
    );
    println!(
        "created     by {} ({})",
        v.created_by_name,
        age(v.created_at_ms)
    );
    if !v.fields.is_empty() {
        println!("\nfields");
        for (k, val) in &v.fields {
            println!("  {k:<22} {val}");
        }
    }
    println!("\nchecklist");
    for c in &v.checklist {
        println!(
            "  [{}] {:<24} {}{}",
            match c.state.as_str() {
                "received" => "x",
                "invalid" => "!",
                _ => " ",
            },
            c.item,
            c.label,
            if c.required { "" } else { " (optional)" }
        );
    }
    if !v.attachments.is_empty() {
        println!("\nattachments (see `fieldcase case files {}`)", v.code);
        for a in &v.attachments {
            println!(
                "  {}  {:<22} {} ({}, {}) by {}{}",
                a.hash.get(..12).unwrap_or(&a.hash),
                a.item,
                a.name,
                a.media_type,
                bytes(a.size),
                a.by_name,
                if a.note.is_empty() {
                    String::new()
                } else {
                    format!(": {}", a.note)
                }
            );
        }
    }
    if !v.conflicts.is_empty() {
        println!(
            "\nCONFLICTS (resolve with `fieldcase case resolve {} FIELD VALUE`)",
            v.code
        );
        for c in &v.conflicts {
            println!("  {}", c.field);
            for cand in &c.candidates {
                println!(
                    "    '{}'  by {} ({}), {}",
                    cand.value,
                    or_dash(&cand.node_name),
                    short_id(&cand.node_id),
                    age(cand.at_ms)
                );
            }
        }
    }
    if !v.notes.is_empty() {
        println!("\nnotes");
        for n in &v.notes {
            println!("  {} ({}): {}", n.name, age(n.at_ms), n.text);
        }
    }
    if !v.questions.is_empty() {
        println!("\nquestions");
        for q in &v.questions {
            println!("  {}. {} asked: {}", q.no, q.asked_name, q.text);
            for a in &q.answers {
                println!("     -> {} answered: {}", a.name, a.text);
            }
        }
    }
    if !v.history.is_empty() {
        println!("\nhistory");
        for h in &v.history {
            println!(
                "  {} -> {} by {} ({}){}",
                h.from,
                h.to,
                h.name,
                age(h.at_ms),
                if h.applied {
                    ""
                } else {
                    "  [superseded: concurrent move]"
                }
            );
        }
    }
    if !v.resolutions.is_empty() {
        println!("\nresolved conflicts");
        for r in &v.resolutions {
            let replaced: Vec<&str> = r.replaced.iter().map(|c| c.value.as_str()).collect();
            println!(
                "  {} = '{}' by {} (was: {})",
                r.field,
                r.value,
                r.name,
                replaced.join(" | ")
            );
        }
    }
}

fn short_id(id: &str) -> &str {
    id.get(..9).unwrap_or(id)
}

pub fn print_fields(p: &ProcedureDef) {
    println!(
        "{} ({}), processing time {} days",
        p.title, p.id, p.processing_days
    );
    println!("\nfields (set with --set FIELD=VALUE or `case set`)");
    println!("  applicant, birth-date, id-number, phone, village, assignee");
    for f in p.fields {
        println!(
            "  {:<24} {}{}",
            f.id,
            f.label,
            if f.required { " (required)" } else { "" }
        );
    }
    println!("\nchecklist (mark with `case doc CODE ITEM received|missing|invalid`)");
    for i in p.checklist {
        println!(
            "  {:<24} {}{}",
            i.id,
            i.label,
            if i.required {
                " (required)"
            } else {
                " (optional)"
            }
        );
    }
}

/// A byte count for people: "5.0 MB", "812 KB", "97 B".
pub fn bytes(n: u64) -> String {
    match n {
        0..=999 => format!("{n} B"),
        1_000..=999_999 => format!("{:.0} KB", n as f64 / 1e3),
        _ => format!("{:.1} MB", n as f64 / 1e6),
    }
}

pub fn print_files(files: &[FileEntry]) {
    if files.is_empty() {
        println!("no attachments");
        return;
    }
    let rows: Vec<Vec<String>> = files
        .iter()
        .map(|f| {
            vec![
                f.meta.hash.get(..12).unwrap_or(&f.meta.hash).to_string(),
                f.meta.item.clone(),
                f.meta.name.clone(),
                f.meta.media_type.clone(),
                bytes(f.meta.size),
                match f.local {
                    "partial" => format!("partial {}%", f.local_bytes * 100 / f.meta.size.max(1)),
                    other => other.to_string(),
                },
                f.meta.by_name.clone(),
            ]
        })
        .collect();
    table(
        &["HASH", "ITEM", "NAME", "TYPE", "SIZE", "LOCAL", "BY"],
        &rows,
    );
}

/// Rows imported before that the text report lists one by one.
const MAX_ALREADY_LISTED: usize = 20;

/// The summary of `case import`: counts, then one line per row imported
/// before (the first few) and per invalid row.
pub fn print_import(r: &ImportReport) {
    let already = match r.already_imported_count {
        0 => String::new(),
        n => format!(", {n} imported before (skipped)"),
    };
    if r.dry_run {
        println!(
            "dry run: {} valid rows would be imported, {} invalid rows{already}; nothing was written",
            r.valid - r.already_imported_count,
            r.invalid_count
        );
    } else {
        println!(
            "imported {} cases, {} invalid rows{already}",
            r.imported, r.invalid_count
        );
        if let (Some(first), Some(last)) = (&r.first_code, &r.last_code) {
            println!("codes {first} to {last}");
        }
    }
    if !r.ignored_columns.is_empty() {
        println!(
            "ignored read-only columns: {} (new cases get their own code, status and due date)",
            r.ignored_columns.join(", ")
        );
    }
    if r.blank_rows > 0 {
        println!("skipped {} blank rows", r.blank_rows);
    }
    for a in r.already_imported.iter().take(MAX_ALREADY_LISTED) {
        println!("line {}: imported before as {}", a.line, a.code);
    }
    if r.already_imported_count > MAX_ALREADY_LISTED as u64 {
        println!(
            "... and {} more rows imported before (--json lists them; --again imports them anyway)",
            r.already_imported_count - MAX_ALREADY_LISTED as u64
        );
    }
    for e in &r.invalid {
        println!("line {}: {}", e.line, e.reason);
    }
    let unlisted = r.invalid_count.saturating_sub(r.invalid.len() as u64);
    if unlisted > 0 {
        println!(
            "... and {unlisted} more invalid rows (fix these first, then run again with --dry-run)"
        );
    }
}
