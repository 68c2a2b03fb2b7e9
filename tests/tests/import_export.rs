//! Bulk import and export: a center starts from a backlog kept in a
//! spreadsheet.
//!
//! Stories, all through the real `fieldcase` command line:
//! - a messy spreadsheet: the good rows become cases with exactly the typed
//!   values, each bad row is reported by its line number with the case
//!   model's reason, and the exit status says something was wrong;
//! - `--dry-run` checks everything and writes nothing;
//! - export → import into another node → export keeps every field, in CSV
//!   and in JSON Lines;
//! - importing a file again (the same, fixed, or in another format) skips
//!   the rows already in, and `--again` imports them anyway;
//! - a wrong header stops the import before anything is written;
//! - thousands of rows go in bounded transactions, and a huge line is
//!   refused without stopping the rest.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use fieldcase_tests::Node;
use serde_json::Value;

fn setup() {
    fieldcase_tests::use_bin(env!("CARGO_BIN_EXE_fieldcase-under-test"));
}

fn write(node: &Node, name: &str, text: &str) -> Result<PathBuf> {
    let path = node.home().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The case shown for `code`, and its applicant and fields.
fn field(v: &Value, name: &str) -> String {
    let s = match name {
        "applicant" => &v["applicant"]["name"],
        "village" => &v["applicant"]["village"],
        "birth-date" => &v["applicant"]["birth_date"],
        "id-number" => &v["applicant"]["id_number"],
        "phone" => &v["applicant"]["phone"],
        "assignee" => &v["assignee"],
        other => &v["fields"][other],
    };
    s.as_str().unwrap_or_default().to_string()
}

const MESSY: &str = "\
procedure,applicant,village,birth-date,id-number,phone,child-name,child-sex,mother-name,certification-type,document-title,copies-count
birth-registration,Nguyễn Thị Mai,Thôn 3,1990-04-02,001190012345,0912 345 678,Trần Văn An,male,Nguyễn Thị Mai,,,
passport,Lê Văn Bình,Thôn 1,,,,,,,,,
certification,\"Phạm Văn \"\"Cường\"\", con ông Tư\",\"Xóm Chùa, Thôn 2\",,,,,,,copy,\"Bằng tốt nghiệp, THPT\",2
certification,Hoàng Thị Dung,Thôn 2,1985-02-30,,,,,,copy,Sổ hộ khẩu,1
certification,Vũ Văn Em,Thôn 4,,12345,,,,,copy,Học bạ,1
health-insurance,\"Đỗ Thị
Phương\",Thôn 5,,,,,,,,,
,,,,,,,,,,,
social-insurance,Bùi Văn Giang,Bản Nà Hẩu,1979-12-01,,,,,,,,
";

#[test]
fn messy_spreadsheet_imports_good_rows_and_reports_each_bad_line() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let file = write(&center, "backlog.csv", MESSY)?;
    let out = center.run(&["case", "import", path_str(&file)])?.failed()?;
    let text = out.stdout.clone();
    ensure!(
        text.contains("imported 3 cases, 4 invalid rows"),
        "{}",
        out.describe()
    );
    // Line numbers count the header as line 1; the quoted cell with a
    // line break makes the row starting on line 7 two lines long.
    let expect = [
        (
            "line 3: ",
            "unknown procedure 'passport'; valid procedures: birth-registration",
        ),
        (
            "line 5: ",
            "invalid birth-date: '1985-02-30' is not a real date",
        ),
        ("line 6: ", "invalid id-number: an ID number is 12 digits"),
        ("line 7: ", "invalid applicant: value must be a single line"),
    ];
    for (line, reason) in expect {
        ensure!(
            text.lines()
                .any(|l| l.starts_with(line) && l.contains(reason)),
            "no '{line}{reason}...' in:\n{text}"
        );
    }
    ensure!(text.contains("skipped 1 blank rows"), "{text}");
    ensure!(
        out.stderr.contains("4 invalid row(s) were not imported"),
        "{}",
        out.stderr
    );

    let codes = center.codes()?;
    ensure!(codes.len() == 3, "{codes:?}");
    let mai = center.show_json(&codes[0])?;
    for (name, want) in [
        ("applicant", "Nguyễn Thị Mai"),
        ("village", "Thôn 3"),
        ("birth-date", "1990-04-02"),
        ("id-number", "001190012345"),
        ("phone", "0912 345 678"),
        ("child-name", "Trần Văn An"),
        ("child-sex", "male"),
        ("mother-name", "Nguyễn Thị Mai"),
    ] {
        ensure!(field(&mai, name) == want, "{name}: {}", field(&mai, name));
    }
    ensure!(mai["status"] == "received" && mai["procedure"] == "birth-registration");
    // Quotes, commas and a doubled quote inside quoted cells survive.
    let cuong = center.show_json(&codes[1])?;
    ensure!(field(&cuong, "applicant") == "Phạm Văn \"Cường\", con ông Tư");
    ensure!(field(&cuong, "village") == "Xóm Chùa, Thôn 2");
    ensure!(field(&cuong, "document-title") == "Bằng tốt nghiệp, THPT");
    ensure!(field(&cuong, "copies-count") == "2");
    // Blank optional cells are simply not set.
    let giang = center.show_json(&codes[2])?;
    ensure!(field(&giang, "birth-date") == "1979-12-01");
    ensure!(field(&giang, "phone").is_empty() && field(&giang, "id-number").is_empty());
    ensure!(
        giang["fields"].as_object().is_some_and(|f| f.is_empty()),
        "{}",
        giang["fields"]
    );

    // The machine-readable report says the same.
    let other = Node::init("other", "center")?;
    let file = write(&other, "backlog.csv", MESSY)?;
    let out = other
        .run(&["case", "import", path_str(&file), "--json"])?
        .failed()?;
    let start = out.stdout.find('{').context("no JSON")?;
    let report: Value = serde_json::from_str(&out.stdout[start..])?;
    let lines: Vec<u64> = report["invalid"]
        .as_array()
        .context("invalid")?
        .iter()
        .filter_map(|e| e["line"].as_u64())
        .collect();
    ensure!(lines == [3, 5, 6, 7], "{lines:?}");
    ensure!(report["imported"] == 3 && report["invalid_count"] == 4 && report["rows"] == 7);
    Ok(())
}

#[test]
fn dry_run_checks_everything_and_writes_nothing() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let file = write(&center, "backlog.csv", MESSY)?;
    let out = center
        .run(&["case", "import", path_str(&file), "--dry-run"])?
        .failed()?;
    ensure!(
        out.stdout
            .contains("dry run: 3 valid rows would be imported, 4 invalid rows"),
        "{}",
        out.describe()
    );
    ensure!(
        out.stdout.contains("line 5: invalid birth-date"),
        "{}",
        out.stdout
    );
    ensure!(center.codes()?.is_empty());
    let status = center.ok(&["status"])?;
    ensure!(
        status.stdout.contains(" 0 local updates"),
        "{}",
        status.stdout
    );

    // A clean file passes a dry run with status 0 and still writes nothing.
    let clean: String = MESSY
        .lines()
        .enumerate()
        .filter(|(i, _)| [0, 1, 3, 9].contains(i))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let file = write(&center, "clean.csv", &clean)?;
    let out = center.ok(&["case", "import", path_str(&file), "--dry-run"])?;
    ensure!(
        out.stdout
            .contains("3 valid rows would be imported, 0 invalid"),
        "{}",
        out.stdout
    );
    ensure!(center.codes()?.is_empty());
    let out = center.ok(&["case", "import", path_str(&file)])?;
    ensure!(
        out.stdout.contains("imported 3 cases, 0 invalid rows"),
        "{}",
        out.stdout
    );
    ensure!(center.codes()?.len() == 3);
    Ok(())
}

/// Fills a node with cases touching every kind of field: all six
/// procedures, applicant fields, assignee, procedure fields with commas and
/// quotes, and checklist states.
fn varied_cases(node: &Node) -> Result<()> {
    node.case_new(
        "birth-registration",
        "Nguyễn Thị Mai",
        "Thôn 3",
        &[
            ("birth-date", "1990-04-02"),
            ("id-number", "001190012345"),
            ("phone", "+84 912 345 678"),
            ("assignee", "Lan (tư pháp)"),
            ("child-name", "Trần Văn An"),
            ("child-birth-date", "2025-01-15"),
            ("child-sex", "male"),
            ("birth-place", "Trạm Y tế xã, Thôn 3"),
            ("ethnicity", "Kinh"),
            ("mother-name", "Nguyễn Thị Mai"),
            ("doc:birth-notice", "received"),
            ("doc:father-id", "invalid"),
        ],
    )?;
    node.case_new(
        "household-registration",
        "Lê \"Ba\" Văn Bình",
        "Ấp Tân Phú",
        &[
            ("address", "Số 12, tổ 3, Ấp Tân Phú"),
            ("household-head", "Lê Văn Cả"),
            ("relationship-to-head", "con"),
            ("move-in-date", "2020-06-30"),
        ],
    )?;
    node.case_new(
        "certification",
        "Phạm Văn Cường",
        "Xóm Chùa",
        &[
            ("certification-type", "signature"),
            ("document-title", "Hợp đồng mua bán đất; bản sao"),
            ("copies-count", "3"),
        ],
    )?;
    node.case_new(
        "land-survey",
        "Hoàng Thị Dung",
        "Bản Nà Hẩu",
        &[
            ("parcel-number", "215"),
            ("map-sheet", "07"),
            ("area-m2", "1250.5"),
            ("land-use-purpose", "ONT"),
            ("land-origin", "thừa kế, từ 1995"),
            ("doc:site-sketch", "received"),
        ],
    )?;
    node.case_new(
        "social-insurance",
        "Vũ Văn Em",
        "Thôn Đông",
        &[
            ("contribution-plan", "quarterly"),
            ("income-basis", "2500000"),
            ("start-date", "2026-01-01"),
        ],
    )?;
    node.case_new(
        "health-insurance",
        "Đỗ Thị Phương",
        "Thôn Tây",
        &[
            ("household-size", "4"),
            ("registered-clinic", "Trạm Y tế xã Tân Phú"),
            ("beneficiary-group", "HGĐ"),
        ],
    )?;
    // A case edited after creation exports its current values.
    let codes = node.codes()?;
    node.ok(&["case", "set", &codes[0], "phone", "0987 000 111"])?;
    Ok(())
}

fn export(node: &Node, format: &str) -> Result<String> {
    Ok(node.ok(&["case", "export", "--format", format])?.stdout)
}

/// CSV export lines without the read-only columns (the first five, which
/// never contain commas). Field values are single-line, so a line is a row.
fn writable_csv(text: &str) -> Vec<String> {
    text.trim_start_matches('\u{feff}')
        .lines()
        .map(|l| l.splitn(6, ',').nth(5).unwrap_or_default().to_string())
        .collect()
}

/// JSON Lines export objects without the read-only keys.
fn writable_jsonl(text: &str) -> Result<Vec<Value>> {
    text.lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l)?;
            let m = v.as_object_mut().context("not an object")?;
            for k in ["code", "status", "due_date", "created_at_ms", "conflicts"] {
                m.remove(k);
            }
            Ok(v)
        })
        .collect()
}

#[test]
fn export_import_export_keeps_every_field_in_csv_and_jsonl() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    varied_cases(&center)?;
    let csv = export(&center, "csv")?;
    let jsonl = export(&center, "jsonl")?;
    ensure!(
        csv.starts_with('\u{feff}'),
        "CSV export starts with a byte-order mark"
    );
    ensure!(csv.lines().count() == 7 && jsonl.lines().count() == 6);
    ensure!(csv.contains("\"Lê \"\"Ba\"\" Văn Bình\""), "{csv}");
    ensure!(jsonl.contains("\"phone\":\"0987 000 111\""), "{jsonl}");

    // CSV: export, import into a fresh node, export again.
    let laptop = Node::init("laptop", "field")?;
    let file = write(&laptop, "from-center.csv", &csv)?;
    let out = laptop.ok(&["case", "import", path_str(&file)])?;
    ensure!(
        out.stdout.contains("imported 6 cases, 0 invalid rows"),
        "{}",
        out.stdout
    );
    ensure!(
        out.stdout.contains(
            "ignored read-only columns: code, status, due_date, created_at_ms, conflicts"
        ),
        "{}",
        out.stdout
    );
    let again = export(&laptop, "csv")?;
    ensure!(
        writable_csv(&again) == writable_csv(&csv),
        "CSV round trip changed fields:\n{csv}\n---\n{again}"
    );
    // The copies are new cases of this node: own codes, received.
    let codes = laptop.codes()?;
    ensure!(codes
        .iter()
        .all(|c| !center.codes().unwrap_or_default().contains(c)));

    // JSON Lines: the same, and across formats.
    let desk = Node::init("desk", "center")?;
    let file = write(&desk, "from-center.jsonl", &jsonl)?;
    desk.ok(&["case", "import", path_str(&file)])?;
    ensure!(writable_jsonl(&export(&desk, "jsonl")?)? == writable_jsonl(&jsonl)?);
    ensure!(writable_jsonl(&export(&laptop, "jsonl")?)? == writable_jsonl(&jsonl)?);
    ensure!(writable_csv(&export(&desk, "csv")?) == writable_csv(&csv));

    // --out writes a file and takes the format from its extension.
    let out_file = center.home().join("all.jsonl");
    let out = center.ok(&["case", "export", "--out", path_str(&out_file)])?;
    ensure!(out.stdout.contains("exported 6 cases"), "{}", out.stdout);
    ensure!(std::fs::read_to_string(&out_file)? == jsonl);
    Ok(())
}

const TWO_JSONL: &str = "{\"procedure\":\"certification\",\"applicant\":\"Ngô Văn Hải\",\"village\":\"Thôn 1\",\"copies-count\":2,\"certification-type\":\"copy\",\"document-title\":\"Học bạ\"}\n\
{\"procedure\":\"health-insurance\",\"applicant\":\"Lý Thị Huệ\",\"village\":\"Thôn 2\",\"phone\":null}\n";

#[test]
fn importing_a_file_again_skips_the_rows_already_in_whatever_the_format() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let file = write(&center, "two.jsonl", TWO_JSONL)?;
    let first = center.ok(&["case", "import", path_str(&file)])?;
    ensure!(
        first.stdout.contains("imported 2 cases, 0 invalid rows"),
        "{}",
        first.stdout
    );
    let codes = center.codes()?;
    ensure!(codes.len() == 2, "{codes:?}");

    // The clerk is not sure the import went through and runs it again.
    let second = center.ok(&["case", "import", path_str(&file)])?;
    ensure!(
        second
            .stdout
            .contains("imported 0 cases, 0 invalid rows, 2 imported before (skipped)"),
        "{}",
        second.stdout
    );
    for (line, code) in [(1, &codes[0]), (2, &codes[1])] {
        ensure!(
            second
                .stdout
                .contains(&format!("line {line}: imported before as {code}")),
            "{}",
            second.stdout
        );
    }
    // The same rows typed into a spreadsheet, columns in another order.
    let csv = "village,applicant,procedure,document-title,certification-type,copies-count,phone\n\
               Thôn 2,Lý Thị Huệ,health-insurance,,,,\n\
               Thôn 1,Ngô Văn Hải,certification,Học bạ,copy,2,\n";
    let file_csv = write(&center, "two.csv", csv)?;
    let third = center.ok(&["case", "import", path_str(&file_csv), "--dry-run"])?;
    ensure!(
        third
            .stdout
            .contains("dry run: 0 valid rows would be imported, 0 invalid rows, 2 imported before"),
        "{}",
        third.stdout
    );
    ensure!(center.codes()?.len() == 2);

    // Two more applications with the same details, on purpose.
    let again = center.ok(&["case", "import", path_str(&file), "--again"])?;
    ensure!(
        again.stdout.contains("imported 2 cases, 0 invalid rows"),
        "{}",
        again.stdout
    );
    let codes = center.codes()?;
    ensure!(codes.len() == 4, "{codes:?}");
    let names: Vec<String> = codes
        .iter()
        .map(|c| Ok(field(&center.show_json(c)?, "applicant")))
        .collect::<Result<_>>()?;
    ensure!(names == ["Ngô Văn Hải", "Lý Thị Huệ", "Ngô Văn Hải", "Lý Thị Huệ"]);
    ensure!(field(&center.show_json(&codes[0])?, "copies-count") == "2");
    Ok(())
}

#[test]
fn after_fixing_its_invalid_rows_the_whole_spreadsheet_is_imported_again() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let file = write(&center, "backlog.csv", MESSY)?;
    center.run(&["case", "import", path_str(&file)])?.failed()?;
    ensure!(center.codes()?.len() == 3);

    // The clerk fixes the impossible date and the short ID number in the
    // spreadsheet and imports the whole file again.
    let fixed = MESSY
        .replace("1985-02-30", "1985-02-28")
        .replace(",12345,", ",001085012345,");
    let file = write(&center, "backlog.csv", &fixed)?;
    let out = center.run(&["case", "import", path_str(&file)])?.failed()?;
    ensure!(
        out.stdout
            .contains("imported 2 cases, 2 invalid rows, 3 imported before (skipped)"),
        "{}",
        out.describe()
    );
    let codes = center.codes()?;
    ensure!(codes.len() == 5, "{codes:?}");
    let dung = center.show_json(&codes[3])?;
    ensure!(field(&dung, "applicant") == "Hoàng Thị Dung");
    ensure!(field(&dung, "birth-date") == "1985-02-28");
    Ok(())
}

#[test]
fn two_identical_rows_in_one_file_are_two_applications_each_imported_once() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let row = "{\"procedure\":\"certification\",\"applicant\":\"Ngô Văn Hải\",\"village\":\"Thôn 1\",\"copies-count\":1,\"certification-type\":\"copy\",\"document-title\":\"Giấy khai sinh\"}\n";
    let file = write(&center, "same.jsonl", &row.repeat(2))?;
    let out = center.ok(&["case", "import", path_str(&file)])?;
    ensure!(out.stdout.contains("imported 2 cases"), "{}", out.stdout);
    // A third copy added at the end is a third application.
    let file = write(&center, "same.jsonl", &row.repeat(3))?;
    let out = center.ok(&["case", "import", path_str(&file)])?;
    ensure!(
        out.stdout
            .contains("imported 1 cases, 0 invalid rows, 2 imported before (skipped)"),
        "{}",
        out.stdout
    );
    ensure!(center.codes()?.len() == 3);
    Ok(())
}

#[test]
fn a_wrong_header_stops_the_import_before_anything_is_written() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let cases = [
        (
            "procedure,applicant,village,telephone,Ghi chú\ncertification,A,B,1,x\n",
            "unknown column(s) 'telephone', 'Ghi chú'",
        ),
        (
            "procedure,applicant,phone\ncertification,A,0912\n",
            "missing column(s) 'village'",
        ),
        (
            "procedure,applicant,village,phone,Phone\ncertification,A,B,1,2\n",
            "column 'phone' appears more than once",
        ),
        ("", "the file is empty"),
    ];
    for (text, message) in cases {
        let file = write(&center, "bad.csv", text)?;
        let out = center.run(&["case", "import", path_str(&file)])?.failed()?;
        ensure!(
            out.stderr.contains(message),
            "{message}: {}",
            out.describe()
        );
        ensure!(out.stderr.contains("nothing was imported") || text.is_empty());
    }
    // A format that cannot be told from the name is asked for.
    let file = write(&center, "cases.txt", "procedure,applicant,village\n")?;
    let out = center.run(&["case", "import", path_str(&file)])?.failed()?;
    ensure!(out.stderr.contains("--format csv"), "{}", out.stderr);
    center.ok(&["case", "import", path_str(&file), "--format", "csv"])?;
    ensure!(center.codes()?.is_empty());
    Ok(())
}

#[test]
fn thousands_of_rows_go_in_batches_and_a_huge_line_is_refused_alone() -> Result<()> {
    setup();
    let center = Node::init("center", "center")?;
    let mut text = String::from(
        "procedure,applicant,village,copies-count,certification-type,document-title\n",
    );
    for i in 0..2500 {
        if i == 1200 {
            // Line 1202: one cell of 2 MB (over the 1 MiB row limit).
            text.push_str(&format!(
                "certification,{},Thôn 1,1,copy,x\n",
                "A".repeat(2 << 20)
            ));
            continue;
        }
        text.push_str(&format!(
            "certification,Người thứ {i},Thôn {},{},copy,Giấy tờ số {i}\n",
            i % 9 + 1,
            i % 5 + 1
        ));
    }
    let file = write(&center, "big.csv", &text)?;
    let out = center
        .run(&["case", "import", path_str(&file), "--json"])?
        .failed()?;
    let start = out.stdout.find('{').context("no JSON")?;
    let report: Value = serde_json::from_str(&out.stdout[start..])?;
    ensure!(report["imported"] == 2499, "{report}");
    ensure!(report["batches"] == 3, "{report}");
    let invalid = &report["invalid"][0];
    ensure!(invalid["line"] == 1202, "{report}");
    ensure!(
        invalid["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("longer than 1024 KiB"),
        "{report}"
    );
    let codes = center.codes()?;
    ensure!(codes.len() == 2499);
    // Codes are consecutive across batches.
    let nums: Vec<u64> = codes
        .iter()
        .filter_map(|c| c.rsplit('-').next()?.parse().ok())
        .collect();
    ensure!(nums.first() == Some(&1) && nums.last() == Some(&2499));

    // JSON Lines: each bad line is reported on its own.
    let file = write(
        &center,
        "bad.jsonl",
        "{\"procedure\":\"certification\",\"applicant\":\"A\",\"village\":\"B\"}\n\
         [1,2]\n\
         {\"procedure\":\"certification\",\"applicant\":\"A\",\"village\":\"B\",\"telephone\":\"1\"}\n\
         {not json\n\
         \n\
         {\"procedure\":\"certification\",\"applicant\":\"A\",\"village\":\"B\",\"code\":\"X-1\",\"copies-count\":[1]}\n\
         {\"procedure\":\"certification\",\"applicant\":\"C\",\"village\":\"D\",\"status\":\"delivered\"}\n",
    )?;
    let out = center.run(&["case", "import", path_str(&file)])?.failed()?;
    let t = &out.stdout;
    ensure!(t.contains("imported 2 cases, 4 invalid rows"), "{t}");
    ensure!(t.contains("line 2: the line is not a JSON object"), "{t}");
    ensure!(t.contains("line 3: unknown field(s) 'telephone'"), "{t}");
    ensure!(t.contains("line 4: not valid JSON"), "{t}");
    ensure!(
        t.contains("line 6: the value of 'copies-count' must be text"),
        "{t}"
    );
    ensure!(t.contains("ignored read-only columns: code, status"), "{t}");
    Ok(())
}
