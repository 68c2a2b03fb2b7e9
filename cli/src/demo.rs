//! `fieldcase demo`: a day in the life of a commune center and two field
//! laptops, with real stores in a temporary folder and real QUIC on
//! loopback. Every step prints what each node sees.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use fieldcase_node::case::{self, DocState, NewCase, Status};
use fieldcase_node::net::{self, Server, SyncOptions};
use fieldcase_node::node::{Node, Role};
use fieldcase_node::store::ListFilter;

use crate::output;

struct Site {
    name: &'static str,
    home: PathBuf,
}

impl Site {
    fn node(&self) -> Result<Node> {
        Ok(Node::open(&self.home)?)
    }
}

fn step(n: u32, title: &str) {
    println!("\n=== {n}. {title} ===");
}

fn show_list(site: &Site) -> Result<()> {
    println!("-- {} sees:", site.name);
    output::print_cases(&site.node()?.list(&ListFilter::default())?);
    Ok(())
}

async fn sync(laptop: &Site, center_name: &str) -> Result<()> {
    let node = laptop.node()?;
    let peer = node.peer(center_name)?;
    drop(node);
    let report = net::sync_with(
        &laptop.home,
        &peer,
        SyncOptions {
            live: false,
            changes: None,
            log: std::sync::Arc::new(|_: &str| {}),
            progress: fieldcase_node::transfer::no_progress(),
            only_blob: None,
        },
    )
    .await
    .with_context(|| format!("{} could not sync", laptop.name))?;
    println!("{}: {}", laptop.name, report.summary());
    Ok(())
}

fn new_case(
    site: &Site,
    procedure: &str,
    applicant: &str,
    village: &str,
    fields: &[(&str, &str)],
) -> Result<String> {
    let code = site.node()?.new_case(&NewCase {
        procedure: procedure.into(),
        applicant: applicant.into(),
        village: village.into(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    })?;
    println!(
        "{} took {procedure} for {applicant} ({village}): {code}",
        site.name
    );
    Ok(code)
}

/// Deterministic bytes standing in for a phone photo (JPEG magic first).
fn fake_scan(len: usize, seed: u32) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8, 0xff, 0xe0];
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.push(x as u8);
    }
    out
}

/// Runs the demo in a fresh temporary folder.
pub fn run_demo() -> Result<()> {
    let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(story(dir.path()))
}

async fn story(dir: &Path) -> Result<()> {
    let center = Site {
        name: "center",
        home: dir.join("center"),
    };
    let lap_a = Site {
        name: "laptop-dong",
        home: dir.join("laptop-dong"),
    };
    let lap_b = Site {
        name: "laptop-tay",
        home: dir.join("laptop-tay"),
    };

    step(
        0,
        "Setting up: one commune center, two field laptops, each with its own store",
    );
    let center_id = Node::init(&center.home, center.name, Role::Center)?;
    let a_id = Node::init(&lap_a.home, lap_a.name, Role::Field)?;
    let b_id = Node::init(&lap_b.home, lap_b.name, Role::Field)?;
    for (site, id) in [(&center, &center_id), (&lap_a, &a_id), (&lap_b, &b_id)] {
        println!("{:<12} node ID {id}", site.name);
    }
    let server = Server::bind(
        &center.home,
        "127.0.0.1:0".parse()?,
        std::sync::Arc::new(|line: &str| println!("   [center] {line}")),
    )?;
    let addr = server.local_addr()?.to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    println!("center listening on {addr} (QUIC, mutual TLS pinned to node IDs)");
    {
        let mut c = center.node()?;
        c.add_peer(&a_id.to_string(), lap_a.name, None)?;
        c.add_peer(&b_id.to_string(), lap_b.name, None)?;
        lap_a
            .node()?
            .add_peer(&center_id.to_string(), center.name, Some(&addr))?;
        lap_b
            .node()?
            .add_peer(&center_id.to_string(), center.name, Some(&addr))?;
    }

    step(
        1,
        "Morning, no signal: both laptops take applications in their villages",
    );
    let birth = new_case(
        &lap_a,
        "birth-registration",
        "Nguyen Van An",
        "Thon Dong",
        &[("phone", "0912 000 111"), ("child-name", "Nguyen Thi Binh")],
    )?;
    new_case(&lap_a, "health-insurance", "Tran Thi Cuc", "Thon Dong", &[])?;
    new_case(
        &lap_b,
        "land-survey",
        "Le Van Dung",
        "Thon Tay",
        &[("parcel-number", "112")],
    )?;
    new_case(&lap_b, "certification", "Pham Thi Em", "Thon Tay", &[])?;
    let scan = dir.join("birth-notice-photo.jpg");
    std::fs::write(&scan, fake_scan(300_000, 7))?;
    let a = lap_a.node()?.attach_file(
        &birth,
        "birth-notice",
        &scan,
        "photo of the hospital birth notice",
    )?;
    println!(
        "laptop-dong photographed the birth notice: {} ({} bytes, hash {}), item marked received",
        a.name,
        a.size,
        &a.hash[..12]
    );
    show_list(&lap_a)?;
    show_list(&lap_b)?;

    step(
        2,
        "Midday: laptop-dong passes the center; everyone gets the birth case",
    );
    sync(&lap_a, center.name).await?;
    sync(&lap_b, center.name).await?;
    println!("Now, offline again, three people edit case {birth} at once:");
    lap_a.node()?.update(&birth, |d, a, t| {
        case::set_field(d, "phone", "0912 345 678", a, t)
    })?;
    println!("  laptop-dong sets the father's phone to 0912 345 678");
    lap_b.node()?.update(&birth, |d, a, t| {
        case::set_field(d, "phone", "0987 654 321", a, t)
    })?;
    println!("  laptop-tay (met the mother) sets the phone to 0987 654 321");
    lap_b.node()?.update(&birth, |d, a, t| {
        case::add_note(d, "Mother says the father works in the city", a, t)
    })?;
    lap_a.node()?.update(&birth, |d, a, t| {
        case::ask(
            d,
            "When can the family collect the birth certificate?",
            a,
            t,
        )
    })?;
    lap_a.node()?.update(&birth, |d, a, t| {
        case::mark_document(d, "father-id", DocState::Received, a, t)
    })?;
    center.node()?.update(&birth, |d, a, t| {
        case::set_field(d, "assignee", "Officer Lan", a, t)
    })?;
    center.node()?.update(&birth, |d, a, t| {
        case::add_note(d, "Assigned to Officer Lan", a, t)
    })?;
    println!("  the center assigns Officer Lan and adds a note");

    step(3, "Afternoon: the laptops reach the center and sync");
    sync(&lap_a, center.name).await?;
    sync(&lap_b, center.name).await?;
    sync(&lap_a, center.name).await?;
    show_list(&center)?;
    println!("-- center's view of {birth}:");
    output::print_case(&center.node()?.show(&birth)?);

    step(4, "The center processes the cases");
    {
        let mut c = center.node()?;
        let view = c.show(&birth)?;
        for item in view
            .checklist
            .iter()
            .filter(|i| i.required && i.state != DocState::Received)
        {
            let item = item.item.clone();
            c.update(&birth, |d, a, t| {
                case::mark_document(d, &item, DocState::Received, a, t)
            })?;
        }
        c.update(&birth, |d, a, t| {
            case::resolve(d, "phone", "0912 345 678", a, t)
        })?;
        println!("center resolved the phone conflict: 0912 345 678 (the father's)");
        c.update(&birth, |d, a, t| {
            case::change_status(d, Status::Processing, a, t)
        })?;
        c.update(&birth, |d, a, t| {
            case::answer(
                d,
                1,
                "Friday morning at the commune office, or the team brings it on Saturday",
                a,
                t,
            )
        })?;
        let cert = dir.join("birth-certificate.pdf");
        let mut pdf = b"%PDF-1.7\n".to_vec();
        pdf.extend(fake_scan(120_000, 11));
        std::fs::write(&cert, pdf)?;
        c.attach_file(
            &birth,
            "declaration-form",
            &cert,
            "issued birth certificate (result for the family)",
        )?;
        println!("center attached the issued birth certificate (a PDF) to the case");
        c.update(&birth, |d, a, t| {
            case::change_status(d, Status::ResultReady, a, t)
        })?;
        println!("center: {birth} -> processing -> result-ready, question answered");
        match c.update(&birth, |d, a, t| {
            case::change_status(d, Status::Received, a, t)
        }) {
            Err(e) => println!("center tries to send it back to received: refused ({e})"),
            Ok(()) => bail!("a backwards move was accepted"),
        }
    }

    step(
        5,
        "Evening: the laptops sync again and carry the results to the villages",
    );
    sync(&lap_a, center.name).await?;
    sync(&lap_b, center.name).await?;
    show_list(&lap_b)?;
    println!("-- laptop-tay's view of {birth}:");
    output::print_case(&lap_b.node()?.show(&birth)?);

    println!("\n=== Result ===");
    let mut all_equal = true;
    let codes: Vec<String> = center
        .node()?
        .list(&ListFilter::default())?
        .into_iter()
        .map(|r| r.code)
        .collect();
    for code in &codes {
        let heads: Vec<Vec<String>> = [&center, &lap_a, &lap_b]
            .iter()
            .map(|s| s.node().and_then(|n| Ok(n.show(code)?.heads)))
            .collect::<Result<_>>()?;
        let same = heads.windows(2).all(|w| w[0] == w[1]);
        all_equal &= same;
        println!(
            "{code}: heads {} on center, laptop-dong, laptop-tay ({})",
            if same { "identical" } else { "DIFFER" },
            heads[0]
                .iter()
                .map(|h| &h[..8])
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    for site in [&center, &lap_a, &lap_b] {
        let files = site.node()?.files(&birth)?;
        let present = files.iter().filter(|f| f.local == "present").count();
        println!(
            "{}: {present} of {} attachments of {birth} present and verified",
            site.name,
            files.len()
        );
        all_equal &= present == files.len();
    }
    let resolved = center.node()?.show(&birth)?.resolutions.len();
    println!("the concurrent phone edit was surfaced as a conflict and resolved by a person ({resolved} resolution recorded)");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server_task).await;
    if !all_equal {
        bail!("replicas did not converge");
    }
    println!("all three nodes hold identical replicas");
    Ok(())
}
