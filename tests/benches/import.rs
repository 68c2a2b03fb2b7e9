//! Bulk import and export at backlog scale: 100,000 generated rows — all
//! six procedures, Vietnamese names, villages and addresses, the fields an
//! officer would type from a paper register — imported through the real
//! `Node` API into a fresh store (real SQLite, WAL, `synchronous=FULL`),
//! then exported as CSV and JSON Lines, and the CSV export imported into a
//! second fresh node. Prints wall times and rates. Seeded, so every run
//! reads the same file.
//!
//! Run: `cargo bench -p fieldcase-tests --bench import [ROWS]` (release
//! build; ROWS defaults to 100,000).

use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use fieldcase_node::bulk::{export_columns, Format};
use fieldcase_node::node::{Node, Role};
use rand::seq::IndexedRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SEED: u64 = 20_250_301;
const DEFAULT_ROWS: usize = 100_000;

const SURNAMES: &[&str] = &[
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng", "Bùi", "Đỗ",
    "Hồ", "Ngô", "Dương", "Lý", "Lò", "Hà", "Triệu",
];
const MIDDLE_M: &[&str] = &["Văn", "Hữu", "Đức", "Minh", "Quang", "Công", "Thành"];
const MIDDLE_F: &[&str] = &["Thị", "Ngọc", "Thu", "Thanh", "Kim", "Mỹ"];
const GIVEN_M: &[&str] = &[
    "An", "Bình", "Cường", "Dũng", "Hùng", "Long", "Nam", "Quân", "Sơn", "Tuấn", "Việt", "Phúc",
    "Khải", "Lâm",
];
const GIVEN_F: &[&str] = &[
    "Hà", "Hạnh", "Hoa", "Lan", "Mai", "Phương", "Thảo", "Trang", "Yến", "Linh", "Ngân", "Huệ",
    "Nhung", "Xuân",
];
const VILLAGES: &[&str] = &[
    "Thôn 1",
    "Thôn 2",
    "Thôn 3",
    "Thôn 4",
    "Thôn 5",
    "Thôn Đông",
    "Thôn Tây",
    "Thôn Trung",
    "Ấp Tân Phú",
    "Ấp Phước Lợi",
    "Bản Nà Hẩu",
    "Bản Khe Ván",
    "Xóm Đồng",
    "Xóm Chùa",
    "Làng Mới",
];
const ETHNICITIES: &[&str] = &[
    "Kinh", "Kinh", "Kinh", "Tày", "Thái", "Mường", "H'Mông", "Dao",
];
const RELATIONSHIPS: &[&str] = &["vợ", "chồng", "con", "con", "cháu", "bố", "mẹ", "em"];
const DOCUMENTS: &[&str] = &[
    "Giấy khai sinh",
    "Sổ hộ khẩu",
    "Bằng tốt nghiệp THPT",
    "Hợp đồng mua bán đất",
    "Giấy chứng nhận quyền sử dụng đất",
    "Học bạ",
];
const LAND_USES: &[&str] = &["ONT", "LUC", "CLN", "BHK", "NTS"];
const CLINICS: &[&str] = &[
    "Trạm Y tế xã Tân Phú",
    "Trung tâm Y tế huyện",
    "Phòng khám đa khoa khu vực",
];
const OFFICERS: &[&str] = &["Lan (một cửa)", "Hùng (địa chính)", "Mai (tư pháp)", ""];

struct Gen {
    rng: ChaCha8Rng,
}

impl Gen {
    fn pick<'a>(&mut self, from: &'a [&'a str]) -> &'a str {
        from.choose(&mut self.rng).copied().unwrap_or("")
    }
    fn person(&mut self, female: bool) -> String {
        let (mid, given) = if female {
            (self.pick(MIDDLE_F), self.pick(GIVEN_F))
        } else {
            (self.pick(MIDDLE_M), self.pick(GIVEN_M))
        };
        format!("{} {mid} {given}", self.pick(SURNAMES))
    }
    fn date(&mut self, from_year: u32, to_year: u32) -> String {
        let y = self.rng.random_range(from_year..=to_year);
        let m = self.rng.random_range(1..=12u32);
        let d = self.rng.random_range(1..=28u32);
        format!("{y:04}-{m:02}-{d:02}")
    }
    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.rng.random_range(0..10u8)))
            .collect()
    }
    fn chance(&mut self, percent: u32) -> bool {
        self.rng.random_range(0..100u32) < percent
    }

    /// One row as (column, value) pairs; columns left out are blank.
    fn row(&mut self, i: usize) -> Vec<(&'static str, String)> {
        let female = self.chance(55);
        let village = self.pick(VILLAGES).to_string();
        let mut r = vec![
            ("applicant", self.person(female)),
            ("village", village.clone()),
            ("birth-date", self.date(1945, 2004)),
        ];
        if self.chance(85) {
            let province = self.rng.random_range(1..=96u32);
            let id = format!("0{province:02}{}", self.digits(9));
            r.push(("id-number", id));
        }
        if self.chance(70) {
            let phone = format!("09{} {} {}", self.digits(2), self.digits(3), self.digits(3));
            r.push(("phone", phone));
        }
        let officer = self.pick(OFFICERS).to_string();
        if !officer.is_empty() {
            r.push(("assignee", officer));
        }
        let procedure = match i % 6 {
            0 => {
                let child_female = self.chance(50);
                r.push(("child-name", self.person(child_female)));
                r.push(("child-birth-date", self.date(2024, 2025)));
                let sex = if child_female { "female" } else { "male" };
                r.push(("child-sex", sex.into()));
                r.push(("birth-place", format!("Trạm Y tế xã, {village}")));
                r.push(("ethnicity", self.pick(ETHNICITIES).into()));
                r.push(("mother-name", self.person(true)));
                if self.chance(80) {
                    r.push(("father-name", self.person(false)));
                }
                r.push(("doc:birth-notice", "received".into()));
                "birth-registration"
            }
            1 => {
                let house = self.rng.random_range(1..=200u32);
                r.push(("address", format!("Số {house}, {village}")));
                r.push(("household-head", self.person(false)));
                r.push(("relationship-to-head", self.pick(RELATIONSHIPS).into()));
                if self.chance(60) {
                    let from = self.pick(VILLAGES);
                    r.push(("previous-address", format!("{from}, xã Tân Lập")));
                }
                r.push(("move-in-date", self.date(2015, 2024)));
                "household-registration"
            }
            2 => {
                let copy = self.chance(80);
                let kind = if copy { "copy" } else { "signature" };
                r.push(("certification-type", kind.into()));
                r.push(("document-title", self.pick(DOCUMENTS).into()));
                r.push(("copies-count", self.rng.random_range(1..=10u32).to_string()));
                "certification"
            }
            3 => {
                r.push((
                    "parcel-number",
                    self.rng.random_range(1..=900u32).to_string(),
                ));
                r.push(("map-sheet", self.rng.random_range(1..=60u32).to_string()));
                let area = self.rng.random_range(400..=50_000u32);
                r.push(("area-m2", format!("{}.{}", area / 10, area % 10)));
                r.push(("land-use-purpose", self.pick(LAND_USES).into()));
                r.push(("land-address", format!("Cánh đồng {village}")));
                if self.chance(50) {
                    r.push(("land-origin", "thừa kế".into()));
                }
                "land-survey"
            }
            4 => {
                let plan = ["monthly", "quarterly", "semiannual", "annual"];
                r.push(("contribution-plan", plan[i % 4].into()));
                let income = self.rng.random_range(15..=60u32) * 100_000;
                r.push(("income-basis", income.to_string()));
                r.push(("start-date", self.date(2025, 2026)));
                if self.chance(30) {
                    r.push(("insurance-number", self.digits(10)));
                }
                "social-insurance"
            }
            _ => {
                r.push((
                    "household-size",
                    self.rng.random_range(1..=8u32).to_string(),
                ));
                r.push(("registered-clinic", self.pick(CLINICS).into()));
                if self.chance(40) {
                    r.push(("beneficiary-group", "HGĐ".into()));
                }
                "health-insurance"
            }
        };
        let has_form = !matches!(procedure, "certification" | "land-survey");
        if has_form && self.chance(50) {
            r.push(("doc:declaration-form", "received".into()));
        }
        r.insert(0, ("procedure", procedure.into()));
        r
    }
}

fn csv_cell(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
}

/// Writes `rows` generated rows as CSV with the export's columns (the
/// read-only ones left out), as a spreadsheet would hold them.
fn write_csv(path: &Path, rows: usize) -> anyhow::Result<u64> {
    let columns: Vec<String> = export_columns()
        .into_iter()
        .filter(|c| !fieldcase_node::bulk::READ_ONLY_COLUMNS.contains(&c.as_str()))
        .collect();
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "{}", columns.join(","))?;
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(SEED),
    };
    for i in 0..rows {
        let row = g.row(i);
        let line: Vec<String> = columns
            .iter()
            .map(|c| {
                row.iter()
                    .find(|(k, _)| k == c)
                    .map(|(_, v)| csv_cell(v))
                    .unwrap_or_default()
            })
            .collect();
        writeln!(out, "{}", line.join(","))?;
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

fn fresh(dir: &Path, name: &str) -> anyhow::Result<Node> {
    let home = dir.join(name);
    Node::init(&home, name, Role::Center)?;
    Ok(Node::open(&home)?)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// CPU seconds (user + system, all threads) this process has used. Wall
/// time on a shared machine depends on the neighbours; CPU time less so.
fn cpu() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Peak resident memory of this process, in MB (`VmHWM`).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs `f`, returning its value, wall time and CPU seconds.
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<(T, Duration, f64)> {
    let (t, c) = (Instant::now(), cpu());
    let v = f()?;
    Ok((v, t.elapsed(), cpu() - c))
}

fn main() -> anyhow::Result<()> {
    let rows: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.replace('_', "").parse().ok())
        .unwrap_or(DEFAULT_ROWS);
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("backlog.csv");
    let size = write_csv(&input, rows)?;
    println!(
        "generated {rows} rows ({:.1} MB CSV, all six procedures)",
        size as f64 / 1e6
    );

    let mut center = fresh(dir.path(), "center")?;
    let (dry, dry_t, dry_c) =
        timed(|| Ok(center.import(std::fs::File::open(&input)?, Format::Csv, true, false)?))?;
    anyhow::ensure!(
        dry.valid == rows as u64,
        "dry run: {} invalid, first {:?}",
        dry.invalid_count,
        dry.invalid.first()
    );
    let (report, import_t, import_c) =
        timed(|| Ok(center.import(std::fs::File::open(&input)?, Format::Csv, false, false)?))?;
    anyhow::ensure!(
        report.imported == rows as u64 && report.invalid_count == 0,
        "import: {} imported, {} invalid, first {:?}",
        report.imported,
        report.invalid_count,
        report.invalid.first()
    );
    let import_rss = peak_rss_mb();
    let db = std::fs::metadata(center.home().join("fieldcase.db"))?.len()
        + std::fs::metadata(center.home().join("fieldcase.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);

    let csv_out = dir.path().join("export.csv");
    let (e, export_t, export_c) =
        timed(|| Ok(center.export(std::fs::File::create(&csv_out)?, Format::Csv)?))?;
    anyhow::ensure!(e.exported == rows as u64, "exported {}", e.exported);
    let jsonl_out = dir.path().join("export.jsonl");
    let (_, jsonl_t, jsonl_c) =
        timed(|| Ok(center.export(std::fs::File::create(&jsonl_out)?, Format::Jsonl)?))?;

    let mut other = fresh(dir.path(), "other")?;
    let (again, again_t, again_c) =
        timed(|| Ok(other.import(std::fs::File::open(&csv_out)?, Format::Csv, false, false)?))?;
    anyhow::ensure!(
        again.imported == rows as u64,
        "re-import: {} imported, first invalid {:?}",
        again.imported,
        again.invalid.first()
    );

    let mb = |p: &Path| std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1e6);
    let line = |what: String, d: Duration, c: f64| {
        println!(
            "| {what} | {:.1} s | {:.1} s | {:.0} rows/s |",
            secs(d),
            c,
            rows as f64 / secs(d)
        )
    };
    println!();
    println!("| step, {rows} rows | wall | CPU (all threads) | rate (wall) |");
    println!("|---|---|---|---|");
    line("validate only (`--dry-run`)".into(), dry_t, dry_c);
    line(
        format!(
            "import CSV into a fresh store ({} transactions)",
            report.batches
        ),
        import_t,
        import_c,
    );
    line(
        format!("export CSV ({:.1} MB)", mb(&csv_out)),
        export_t,
        export_c,
    );
    line(
        format!("export JSON Lines ({:.1} MB)", mb(&jsonl_out)),
        jsonl_t,
        jsonl_c,
    );
    line(
        "import the CSV export into another fresh store".into(),
        again_t,
        again_c,
    );
    println!();
    println!(
        "store after import: {:.1} MB; peak RSS during import {:.0} MB, overall {:.0} MB",
        db as f64 / 1e6,
        import_rss,
        peak_rss_mb()
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "{} CPUs, load average {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}
