//! Stories about laptops in villages and the commune center editing cases
//! offline and merging later.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjType, ReadDoc, ROOT};

use super::*;

/// 2025-03-10 09:00 in Hanoi (02:00 UTC), in Unix ms.
const T0: i64 = 20_157 * 86_400_000 + 2 * 3_600_000;
const MIN: i64 = 60_000;

fn author(n: u8, node: &str, name: &str) -> Author {
    Author {
        actor: ActorId::from([n; 16]),
        node_id: node.to_string(),
        name: name.to_string(),
    }
}
fn laptop_a() -> Author {
    author(0xa1, "node-a", "Laptop Thôn 3 (Lan)")
}
fn laptop_b() -> Author {
    author(0xb2, "node-b", "Laptop Thôn 5 (Minh)")
}
fn center() -> Author {
    author(0xc3, "node-c", "Center desk (Hòa)")
}

fn birth_case() -> Automerge {
    let new = NewCase {
        procedure: "birth-registration".into(),
        applicant: "Nguyễn Thị Mai".into(),
        village: "Thôn 3".into(),
        fields: vec![
            ("phone".into(), "0912 345 678".into()),
            ("child-name".into(), "Nguyễn Văn An".into()),
            ("child-birth-date".into(), "2025-03-01".into()),
        ],
    };
    create("K7QF2M-0001", &new, &laptop_a(), T0).unwrap()
}

/// A second replica of `doc`, as a peer would load it from bytes.
fn replica(doc: &Automerge) -> Automerge {
    Automerge::load(&doc.save()).unwrap()
}

/// Exchange all changes between two replicas.
fn sync(a: &mut Automerge, b: &mut Automerge) {
    a.merge(&mut b.clone()).unwrap();
    b.merge(&mut a.clone()).unwrap();
}

fn receive_all_required(doc: &mut Automerge, who: &Author, at: i64) {
    let proc = procedure(&view(doc).unwrap().procedure).unwrap();
    for item in proc.checklist.iter().filter(|i| i.required) {
        mark_document(doc, item.id, DocState::Received, who, at).unwrap();
    }
}

#[test]
fn every_procedure_is_well_formed() {
    let ids: Vec<&str> = procedures().iter().map(|p| p.id).collect();
    assert_eq!(
        ids,
        [
            "birth-registration",
            "household-registration",
            "certification",
            "land-survey",
            "social-insurance",
            "health-insurance"
        ]
    );
    let kebab = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    for p in procedures() {
        assert!(p.processing_days > 0 && !p.title.is_empty());
        assert!(p.checklist.iter().any(|i| i.required), "{}", p.id);
        for i in p.checklist {
            assert!(kebab(i.id), "{}", i.id);
        }
        for f in p.fields {
            assert!(kebab(f.id), "{}", f.id);
            // Procedure fields must not shadow the common fields.
            assert!(target(procedure(p.id).unwrap(), f.id).is_ok());
            assert!(![
                "applicant",
                "birth-date",
                "id-number",
                "phone",
                "village",
                "assignee"
            ]
            .contains(&f.id));
        }
        // Every procedure can be created with just the applicant.
        let new = NewCase {
            procedure: p.id.into(),
            applicant: "Trần Văn Bình".into(),
            village: "Thôn 1".into(),
            fields: vec![],
        };
        let doc = create("ABC-1", &new, &laptop_a(), T0).unwrap();
        let v = view(&doc).unwrap();
        assert_eq!(v.checklist.len(), p.checklist.len());
        assert_eq!(v.due_date, date::due_date(T0, p.processing_days));
    }
    let err = procedure("passport").unwrap_err().to_string();
    assert!(
        err.contains("passport") && err.contains("land-survey"),
        "{err}"
    );
}

#[test]
fn laptop_takes_a_birth_registration_in_the_village() {
    let doc = birth_case();
    let v = view(&doc).unwrap();
    assert_eq!(v.schema, 1);
    assert_eq!(v.code, "K7QF2M-0001");
    assert_eq!(v.procedure, "birth-registration");
    assert_eq!(v.status, Status::Received);
    assert_eq!(v.applicant.name, "Nguyễn Thị Mai");
    assert_eq!(v.applicant.village, "Thôn 3");
    assert_eq!(v.applicant.phone, "0912 345 678");
    assert_eq!(v.fields["child-name"], "Nguyễn Văn An");
    assert!(v.checklist.iter().all(|e| e.state == DocState::Missing));
    assert!(v.missing_required.contains(&"birth-notice".to_string()));
    assert!(!v
        .missing_required
        .contains(&"marriage-certificate".to_string()));
    assert_eq!(
        v.missing_fields,
        ["child-sex", "birth-place", "mother-name"]
    );
    // Created 2025-03-10 (Hanoi), 2 calendar days.
    assert_eq!(v.due_date, "2025-03-12");
    assert_eq!(v.created_at_ms, T0);
    assert_eq!(v.updated_at_ms, T0);
    assert_eq!(v.created_by, "node-a");
    assert_eq!(v.members.len(), 1);
    assert_eq!(v.members[0].name, "Laptop Thôn 3 (Lan)");
    assert_eq!(v.heads.len(), 1);
    assert!(v.conflicts.is_empty() && v.history.is_empty());

    let p = projection(&doc).unwrap();
    assert_eq!(
        p,
        Projection {
            code: "K7QF2M-0001".into(),
            procedure: "birth-registration".into(),
            status: Status::Received,
            village: "Thôn 3".into(),
            applicant: "Nguyễn Thị Mai".into(),
            due_date: "2025-03-12".into(),
            updated_at_ms: T0,
            conflicts: 0,
        }
    );

    // The JSON shape is an interface for `case show --json`.
    let json = serde_json::to_value(&v).unwrap();
    assert_eq!(json["status"], "received");
    assert_eq!(json["checklist"][0]["state"], "missing");
    assert_eq!(json["applicant"]["birth_date"], "");
    for key in [
        "code",
        "procedure",
        "procedure_title",
        "fields",
        "missing_required",
        "assignee",
        "notes",
        "questions",
        "history",
        "conflicts",
        "resolutions",
        "created_at_ms",
        "created_by",
        "due_date",
        "updated_at_ms",
        "heads",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
    let back: CaseView = serde_json::from_value(json).unwrap();
    assert_eq!(back, v);
}

#[test]
fn create_refuses_bad_input_with_actionable_errors() {
    let a = laptop_a();
    let mut new = NewCase {
        procedure: "land-surveying".into(),
        applicant: "Lê Văn C".into(),
        village: "Thôn 2".into(),
        fields: vec![],
    };
    let err = create("X-1", &new, &a, T0).unwrap_err();
    assert!(matches!(err, CaseError::UnknownProcedure { .. }));
    assert!(err.to_string().contains("land-survey"));

    new.procedure = "land-survey".into();
    new.fields = vec![("plot".into(), "12".into())];
    let err = create("X-1", &new, &a, T0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CaseError::UnknownField { .. }));
    assert!(
        msg.contains("parcel-number") && msg.contains("phone"),
        "{msg}"
    );

    new.fields = vec![("area-m2".into(), "12,5".into())];
    assert!(matches!(
        create("X-1", &new, &a, T0),
        Err(CaseError::InvalidValue { field, .. }) if field == "area-m2"
    ));

    new.fields = vec![];
    assert!(create("bad code!", &new, &a, T0).is_err());
    assert!(create("", &new, &a, T0).is_err());
    new.applicant = "   ".into();
    assert!(matches!(
        create("X-1", &new, &a, T0),
        Err(CaseError::InvalidValue { field, .. }) if field == "applicant"
    ));
}

#[test]
fn set_field_validates_names_and_values() {
    let mut doc = birth_case();
    let a = laptop_a();
    let at = T0 + MIN;
    let set = |doc: &mut Automerge, f: &str, v: &str| set_field(doc, f, v, &a, at);

    set(&mut doc, "birth-date", "1995-07-14").unwrap();
    set(&mut doc, "id-number", "001195012345").unwrap();
    set(&mut doc, "phone", "+84 912 345 678").unwrap();
    set(&mut doc, "child-sex", "female").unwrap();
    set(&mut doc, "assignee", "Cán bộ tư pháp Hòa").unwrap();
    set(&mut doc, "village", "  Thôn 4 ").unwrap();
    let v = view(&doc).unwrap();
    assert_eq!(v.applicant.birth_date, "1995-07-14");
    assert_eq!(v.applicant.village, "Thôn 4", "values are trimmed");
    assert_eq!(v.assignee, "Cán bộ tư pháp Hòa");
    assert_eq!(v.fields["child-sex"], "female");

    let bad = [
        ("birth-date", "1995-02-29", "28 days"),
        ("birth-date", "14/07/1995", "YYYY-MM-DD"),
        ("birth-date", "2031-01-01", "future"),
        ("child-birth-date", "2025-03-11", "future"),
        ("phone", "09l2345678", "digits"),
        ("id-number", "12345", "12 digits"),
        ("child-sex", "boy", "male, female"),
        ("child-name", "", "required"),
        ("applicant", "", "required"),
        ("mother-name", "Mai\nLan", "single line"),
    ];
    for (f, val, why) in bad {
        let err = set(&mut doc, f, val).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, CaseError::InvalidValue { .. }),
            "{f}={val}: {msg}"
        );
        assert!(msg.contains(why), "{f}={val}: {msg}");
    }
    let long = "x".repeat(MAX_FIELD_CHARS + 1);
    assert!(set(&mut doc, "birth-place", &long)
        .unwrap_err()
        .to_string()
        .contains("limit is 1000"));
    assert!(set(&mut doc, "birth-place", &"x".repeat(MAX_FIELD_CHARS)).is_ok());

    // Optional fields can be cleared.
    set(&mut doc, "father-name", "Nguyễn Văn Hùng").unwrap();
    set(&mut doc, "father-name", "").unwrap();
    assert!(!view(&doc).unwrap().fields.contains_key("father-name"));

    // Field names belong to the procedure; the error lists valid ones.
    let err = set(&mut doc, "parcel-number", "12")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("child-name") && err.contains("assignee"),
        "{err}"
    );
    let err = mark_document(&mut doc, "site-sketch", DocState::Received, &a, at).unwrap_err();
    assert!(matches!(err, CaseError::UnknownItem { .. }));
    assert!(err.to_string().contains("birth-notice"));

    // Checklist items are also addressable as doc:<item>.
    set(&mut doc, "doc:birth-notice", "received").unwrap();
    assert!(set(&mut doc, "doc:birth-notice", "lost").is_err());
    let v = view(&doc).unwrap();
    assert_eq!(v.checklist[1].item, "birth-notice");
    assert_eq!(v.checklist[1].state, DocState::Received);
}

#[test]
fn workflow_rules_explain_why_a_move_is_refused() {
    let mut doc = birth_case();
    let c = center();
    let err = change_status(&mut doc, Status::Processing, &c, T0 + MIN).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CaseError::InvalidTransition { .. }));
    assert!(
        msg.contains("birth-notice (missing)") && msg.contains("mother-id"),
        "{msg}"
    );
    assert!(
        !msg.contains("father-id"),
        "optional items do not block: {msg}"
    );

    mark_document(&mut doc, "mother-id", DocState::Invalid, &c, T0 + MIN).unwrap();
    let msg = change_status(&mut doc, Status::Processing, &c, T0 + MIN)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("mother-id (invalid)"), "{msg}");

    let msg = change_status(&mut doc, Status::Delivered, &c, T0 + MIN)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("can only move to needs-documents, processing, rejected"),
        "{msg}"
    );
    let msg = change_status(&mut doc, Status::Received, &c, T0 + MIN)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("already received"), "{msg}");

    change_status(&mut doc, Status::NeedsDocuments, &c, T0 + 2 * MIN).unwrap();
    let msg = change_status(&mut doc, Status::Received, &c, T0 + 3 * MIN)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("required documents not received"), "{msg}");
    receive_all_required(&mut doc, &c, T0 + 4 * MIN);
    change_status(&mut doc, Status::Processing, &c, T0 + 5 * MIN).unwrap();
    // The center finds a forged document: back to needs-documents on purpose.
    change_status(&mut doc, Status::NeedsDocuments, &c, T0 + 6 * MIN).unwrap();
    change_status(&mut doc, Status::Processing, &c, T0 + 7 * MIN).unwrap();
    change_status(&mut doc, Status::ResultReady, &c, T0 + 8 * MIN).unwrap();
    change_status(&mut doc, Status::Delivered, &c, T0 + 9 * MIN).unwrap();
    let v = view(&doc).unwrap();
    assert_eq!(v.status, Status::Delivered);
    assert_eq!(v.history.len(), 6);
    assert!(v.history.iter().all(|h| h.applied));
    assert_eq!(v.updated_at_ms, T0 + 9 * MIN);
    let msg = change_status(&mut doc, Status::Rejected, &c, T0 + 10 * MIN)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("final"), "{msg}");
}

#[test]
fn concurrent_status_moves_never_send_a_case_backwards_in_either_merge_order() {
    let mut base = birth_case();
    receive_all_required(&mut base, &laptop_a(), T0 + MIN);
    let mut a = replica(&base);
    let mut b = replica(&base);
    // Center starts processing; meanwhile laptop B (offline) asks for documents.
    change_status(&mut a, Status::Processing, &center(), T0 + 2 * MIN).unwrap();
    change_status(&mut b, Status::NeedsDocuments, &laptop_b(), T0 + 3 * MIN).unwrap();

    let mut ab = a.clone();
    ab.merge(&mut b.clone()).unwrap();
    let mut ba = b.clone();
    ba.merge(&mut a.clone()).unwrap();
    let (vab, vba) = (view(&ab).unwrap(), view(&ba).unwrap());
    assert_eq!(vab.status, Status::Processing);
    assert_eq!(vab.status, vba.status);
    assert_eq!(vab.history, vba.history, "same list order on every replica");
    assert_eq!(vab.heads, vba.heads);
    let superseded: Vec<_> = vab.history.iter().filter(|h| !h.applied).collect();
    assert_eq!(superseded.len(), 1);
    assert_eq!(superseded[0].to, Status::NeedsDocuments);
    assert_eq!(superseded[0].by, "node-b");

    // Work continues sequentially from the derived status on either replica.
    change_status(&mut ba, Status::ResultReady, &center(), T0 + 4 * MIN).unwrap();
    sync(&mut ab, &mut ba);
    assert_eq!(view(&ab).unwrap().status, Status::ResultReady);
    assert_eq!(view(&ab).unwrap(), view(&ba).unwrap());
}

#[test]
fn concurrent_rejection_wins_over_a_lower_move() {
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    change_status(&mut a, Status::NeedsDocuments, &laptop_a(), T0 + MIN).unwrap();
    change_status(&mut a, Status::Rejected, &laptop_a(), T0 + 2 * MIN).unwrap();
    change_status(&mut b, Status::NeedsDocuments, &laptop_b(), T0 + 3 * MIN).unwrap();
    for (x, y) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
        let (mut x, mut y) = (x, y);
        x.merge(&mut y).unwrap();
        let v = view(&x).unwrap();
        assert_eq!(v.status, Status::Rejected);
        assert_eq!(v.history.len(), 3);
    }
}

#[test]
fn concurrent_phone_edits_conflict_and_the_center_resolves_them() {
    // Laptop A and laptop B both edit the phone offline.
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    let mut c = replica(&base);
    set_field(&mut a, "phone", "0912 000 111", &laptop_a(), T0 + MIN).unwrap();
    set_field(&mut b, "phone", "0987 222 333", &laptop_b(), T0 + 2 * MIN).unwrap();
    sync(&mut a, &mut b);

    // After merge the conflict shows both values with node and time.
    let va = view(&a).unwrap();
    assert_eq!(va.conflicts, view(&b).unwrap().conflicts);
    assert_eq!(va.conflicts.len(), 1);
    let k = &va.conflicts[0];
    assert_eq!(k.field, "phone");
    assert_eq!(
        k.candidates,
        vec![
            ConflictCandidate {
                value: "0912 000 111".into(),
                node_id: "node-a".into(),
                node_name: "Laptop Thôn 3 (Lan)".into(),
                at_ms: T0 + MIN,
            },
            ConflictCandidate {
                value: "0987 222 333".into(),
                node_id: "node-b".into(),
                node_name: "Laptop Thôn 5 (Minh)".into(),
                at_ms: T0 + 2 * MIN,
            },
        ]
    );
    assert_eq!(projection(&a).unwrap().conflicts, 1);

    // The center gets the merged doc and resolves with the number the citizen confirms.
    sync(&mut c, &mut a);
    resolve(&mut c, "phone", "0987 222 333", &center(), T0 + 10 * MIN).unwrap();
    let vc = view(&c).unwrap();
    assert!(vc.conflicts.is_empty());
    assert_eq!(vc.applicant.phone, "0987 222 333");
    assert_eq!(vc.resolutions.len(), 1);
    assert_eq!(vc.resolutions[0].field, "phone");
    assert_eq!(vc.resolutions[0].by, "node-c");
    assert_eq!(vc.resolutions[0].replaced, k.candidates);

    // After sync everywhere the conflict is gone on every replica.
    sync(&mut a, &mut c);
    sync(&mut b, &mut c);
    for d in [&a, &b, &c] {
        let v = view(d).unwrap();
        assert!(v.conflicts.is_empty());
        assert_eq!(v.applicant.phone, "0987 222 333");
        assert_eq!(v.heads, vc.heads);
    }
    // Nothing left to resolve.
    let err = resolve(&mut a, "phone", "0912 000 111", &laptop_a(), T0 + 11 * MIN).unwrap_err();
    assert!(matches!(err, CaseError::NoConflict { field } if field == "phone"));
    assert!(matches!(
        resolve(&mut a, "fax", "1", &laptop_a(), T0),
        Err(CaseError::UnknownField { .. })
    ));
}

#[test]
fn equal_concurrent_values_are_not_a_conflict() {
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    set_field(&mut a, "birth-place", "Trạm y tế xã", &laptop_a(), T0 + MIN).unwrap();
    set_field(&mut b, "birth-place", "Trạm y tế xã", &laptop_b(), T0 + MIN).unwrap();
    sync(&mut a, &mut b);
    // Automerge does keep both ops...
    let fields = a.get(ROOT, "fields").unwrap().unwrap().1;
    assert_eq!(a.get_all(&fields, "birth-place").unwrap().len(), 2);
    // ...but they agree, so nobody is asked to choose.
    assert!(view(&a).unwrap().conflicts.is_empty());
    assert!(matches!(
        resolve(&mut a, "birth-place", "x", &center(), T0),
        Err(CaseError::NoConflict { .. })
    ));
}

#[test]
fn conflicting_document_states_block_processing_until_resolved() {
    let mut base = birth_case();
    receive_all_required(&mut base, &laptop_a(), T0 + MIN);
    mark_document(
        &mut base,
        "birth-notice",
        DocState::Missing,
        &laptop_a(),
        T0 + MIN,
    )
    .unwrap();
    let mut a = replica(&base);
    let mut b = replica(&base);
    mark_document(
        &mut a,
        "birth-notice",
        DocState::Received,
        &laptop_a(),
        T0 + 2 * MIN,
    )
    .unwrap();
    mark_document(
        &mut b,
        "birth-notice",
        DocState::Invalid,
        &laptop_b(),
        T0 + 2 * MIN,
    )
    .unwrap();
    sync(&mut a, &mut b);
    let v = view(&a).unwrap();
    assert_eq!(v.conflicts.len(), 1);
    assert_eq!(v.conflicts[0].field, "doc:birth-notice");
    assert_eq!(v.missing_required, ["birth-notice"]);
    let msg = change_status(&mut a, Status::Processing, &center(), T0 + 3 * MIN)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("birth-notice (conflicting states"), "{msg}");
    assert!(resolve(&mut a, "doc:birth-notice", "perhaps", &center(), T0).is_err());
    resolve(
        &mut a,
        "doc:birth-notice",
        "received",
        &center(),
        T0 + 4 * MIN,
    )
    .unwrap();
    change_status(&mut a, Status::Processing, &center(), T0 + 5 * MIN).unwrap();
}

#[test]
fn concurrent_notes_are_all_kept_in_the_same_order_everywhere() {
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    add_note(
        &mut a,
        "Citizen will bring the marriage certificate on Friday",
        &laptop_a(),
        T0 + MIN,
    )
    .unwrap();
    add_note(
        &mut a,
        "Called the hospital to confirm",
        &laptop_a(),
        T0 + 2 * MIN,
    )
    .unwrap();
    add_note(
        &mut b,
        "Father works in Hà Nội, cannot come",
        &laptop_b(),
        T0 + MIN,
    )
    .unwrap();
    let mut ab = a.clone();
    ab.merge(&mut b.clone()).unwrap();
    let mut ba = b.clone();
    ba.merge(&mut a.clone()).unwrap();
    let (nab, nba) = (view(&ab).unwrap().notes, view(&ba).unwrap().notes);
    assert_eq!(nab.len(), 3);
    assert_eq!(nab, nba);
    // A's two notes stay in A's order.
    let ia = nab
        .iter()
        .position(|n| n.text.starts_with("Citizen"))
        .unwrap();
    let ia2 = nab
        .iter()
        .position(|n| n.text.starts_with("Called"))
        .unwrap();
    assert!(ia < ia2);
    assert!(nab
        .iter()
        .any(|n| n.by == "node-b" && n.name == "Laptop Thôn 5 (Minh)"));

    assert!(add_note(&mut ab, "  ", &laptop_a(), T0).is_err());
    let err = add_note(&mut ab, &"n".repeat(MAX_TEXT_CHARS + 1), &laptop_a(), T0).unwrap_err();
    assert!(err.to_string().contains("limit is 4000"));
    add_note(&mut ab, "line one\nline two", &laptop_a(), T0).unwrap();
}

#[test]
fn questions_and_answers_cross_between_center_and_laptop() {
    let mut c = birth_case();
    assert_eq!(
        ask(
            &mut c,
            "Is the mother's ID card still valid?",
            &center(),
            T0 + MIN
        )
        .unwrap(),
        1
    );
    assert_eq!(
        ask(
            &mut c,
            "Which hospital issued the birth notice?",
            &center(),
            T0 + MIN
        )
        .unwrap(),
        2
    );
    let mut a = replica(&c);
    answer(&mut a, 2, "Bệnh viện huyện", &laptop_a(), T0 + 5 * MIN).unwrap();
    answer(
        &mut c,
        2,
        "Checking with the hospital too",
        &center(),
        T0 + 6 * MIN,
    )
    .unwrap();
    sync(&mut a, &mut c);
    let v = view(&a).unwrap();
    assert_eq!(v.questions.len(), 2);
    assert_eq!(v.questions[1].no, 2);
    assert_eq!(
        v.questions[1].answers.len(),
        2,
        "concurrent answers are both kept"
    );
    assert!(v.questions[0].answers.is_empty());
    assert_eq!(v.questions, view(&c).unwrap().questions);
    for no in [0, 3] {
        assert!(matches!(
            answer(&mut a, no, "?", &laptop_a(), T0),
            Err(CaseError::NoSuchQuestion { count: 2, .. })
        ));
    }
}

#[test]
fn garbage_documents_are_malformed_not_panics() {
    let is_malformed = |doc: &Automerge| matches!(validate(doc), Err(CaseError::Malformed(_)));

    assert!(is_malformed(&Automerge::new()));

    // Wrong type for `schema`.
    let mut doc = Automerge::new();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put(ROOT, "schema", "one")?;
        Ok(())
    })
    .unwrap();
    assert!(is_malformed(&doc));

    // Variations on a real case.
    type Tamper =
        fn(&mut automerge::transaction::Transaction<'_>) -> Result<(), automerge::AutomergeError>;
    let tampers: [(&str, Tamper); 10] = [
        ("oversized note", |tx| {
            let (_, notes) = tx.get(ROOT, "notes")?.unwrap();
            let n = tx.insert_object(&notes, 0, ObjType::Map)?;
            for k in ["author", "author_name"] {
                tx.put(&n, k, "x")?;
            }
            tx.put(&n, "at_ms", 1i64)?;
            tx.put(&n, "text", "spam ".repeat(10_000))
        }),
        ("schema 2", |tx| tx.put(ROOT, "schema", 2u64)),
        ("unknown procedure", |tx| {
            tx.put(ROOT, "procedure", "passport")
        }),
        ("applicant is a list", |tx| {
            tx.put_object(ROOT, "applicant", ObjType::List).map(|_| ())
        }),
        ("notes is a map", |tx| {
            tx.put_object(ROOT, "notes", ObjType::Map).map(|_| ())
        }),
        ("bad checklist state", |tx| {
            let (_, cl) = tx.get(ROOT, "checklist")?.unwrap();
            tx.put(&cl, "birth-notice", "maybe")
        }),
        ("foreign checklist item", |tx| {
            let (_, cl) = tx.get(ROOT, "checklist")?.unwrap();
            tx.put(&cl, "site-sketch", "missing")
        }),
        ("bad status event", |tx| {
            let (_, ev) = tx.get(ROOT, "status_events")?.unwrap();
            let e = tx.insert_object(&ev, 0, ObjType::Map)?;
            for k in ["by", "name", "from"] {
                tx.put(&e, k, "received")?;
            }
            tx.put(&e, "at_ms", 1i64)?;
            tx.put(&e, "to", "archived")
        }),
        ("code with spaces", |tx| tx.put(ROOT, "code", "K7 QF")),
        ("phone is a number", |tx| {
            let (_, ap) = tx.get(ROOT, "applicant")?.unwrap();
            tx.put(&ap, "phone", 912i64)
        }),
    ];
    for (what, tamper) in tampers {
        let mut doc = birth_case();
        doc.transact(tamper).unwrap();
        assert!(is_malformed(&doc), "{what}: {:?}", validate(&doc));
        // Mutations refuse too, without panicking.
        assert!(
            matches!(
                add_note(&mut doc, "hello", &laptop_a(), T0),
                Err(CaseError::Malformed(_))
            ),
            "{what}"
        );
        assert!(projection(&doc).is_err());
    }

    // A peer's concurrent non-text value in a scalar slot is malformed too.
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    set_field(&mut a, "phone", "0912 000 111", &laptop_a(), T0 + MIN).unwrap();
    b.set_actor(ActorId::from([9u8; 16]));
    b.transact::<_, _, automerge::AutomergeError>(|tx| {
        let (_, ap) = tx.get(ROOT, "applicant")?.unwrap();
        tx.put_object(&ap, "phone", ObjType::Map)?;
        Ok(())
    })
    .unwrap();
    a.merge(&mut b).unwrap();
    assert!(matches!(validate(&a), Err(CaseError::Malformed(_))));
}

#[test]
fn validate_code_refuses_a_document_for_another_case() {
    let doc = birth_case();
    validate(&doc).unwrap();
    validate_code(&doc, "K7QF2M-0001").unwrap();
    let err = validate_code(&doc, "K7QF2M-0002").unwrap_err();
    assert!(matches!(err, CaseError::CodeMismatch { .. }));
    assert!(err.to_string().contains("K7QF2M-0002"));
}

#[test]
fn members_record_each_writer_once() {
    let mut doc = birth_case();
    let b = laptop_b();
    let before = doc.get_heads();
    set_field(&mut doc, "phone", "0912 111 222", &b, T0 + MIN).unwrap();
    set_field(&mut doc, "phone", "0912 111 223", &b, T0 + 2 * MIN).unwrap();
    let v = view(&doc).unwrap();
    assert_eq!(v.members.len(), 2);
    assert!(v
        .members
        .iter()
        .any(|m| m.node_id == "node-b" && m.actor == b.actor.to_hex_string()));
    // The second write by B did not rewrite its member record.
    let changes = doc.get_changes(&before);
    assert_eq!(changes.len(), 2);
    assert!(changes[1].len() < changes[0].len());
    assert!(changes.iter().all(|c| c.actor_id() == &b.actor));
}

#[test]
fn resolving_with_either_candidate_clears_the_conflict_everywhere() {
    for pick in ["Trạm y tế xã Tân Lập", "Bệnh viện đa khoa huyện"] {
        let base = birth_case();
        let mut a = replica(&base);
        let mut b = replica(&base);
        set_field(
            &mut a,
            "birth-place",
            "Trạm y tế xã Tân Lập",
            &laptop_a(),
            T0 + MIN,
        )
        .unwrap();
        set_field(
            &mut b,
            "birth-place",
            "Bệnh viện đa khoa huyện",
            &laptop_b(),
            T0 + MIN,
        )
        .unwrap();
        sync(&mut a, &mut b);
        let mut c = replica(&a);
        // Meanwhile laptop A, not yet synced with the center, edits something else.
        set_field(&mut a, "assignee", "Hòa", &laptop_a(), T0 + 2 * MIN).unwrap();
        resolve(&mut c, "birth-place", pick, &center(), T0 + 3 * MIN).unwrap();
        sync(&mut a, &mut c);
        sync(&mut b, &mut c);
        sync(&mut a, &mut b);
        for d in [&a, &b, &c] {
            let v = view(d).unwrap();
            assert!(v.conflicts.is_empty(), "{pick}: {:?}", v.conflicts);
            assert_eq!(v.fields["birth-place"], pick);
            assert_eq!(v.assignee, "Hòa");
            assert_eq!(v.resolutions.len(), 1);
            assert_eq!(v.resolutions[0].replaced.len(), 2);
        }
    }
}

#[test]
fn conflicts_on_assignee_and_applicant_name_use_cli_names() {
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    set_field(&mut a, "assignee", "Hòa", &laptop_a(), T0 + MIN).unwrap();
    set_field(&mut b, "assignee", "Tuấn", &laptop_b(), T0 + MIN).unwrap();
    set_field(
        &mut a,
        "applicant",
        "Nguyễn Thị Mai Anh",
        &laptop_a(),
        T0 + MIN,
    )
    .unwrap();
    set_field(&mut b, "applicant", "Nguyễn Thị Mại", &laptop_b(), T0 + MIN).unwrap();
    sync(&mut a, &mut b);
    let v = view(&a).unwrap();
    let names: Vec<&str> = v.conflicts.iter().map(|c| c.field.as_str()).collect();
    assert_eq!(names, ["applicant", "assignee"]);
    // Same time: candidates are ordered by node id, then value.
    assert_eq!(v.conflicts[0].candidates[0].node_id, "node-a");
    assert_eq!(v.conflicts, view(&b).unwrap().conflicts);
}

fn blob(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

fn photo(bytes: &[u8], item: &str, name: &str) -> AttachmentMeta {
    AttachmentMeta {
        hash: blob(bytes),
        size: bytes.len() as u64,
        media_type: "image/jpeg".into(),
        name: name.into(),
        item: item.into(),
        note: String::new(),
    }
}

fn state_of(doc: &Automerge, item: &str) -> DocState {
    view(doc)
        .unwrap()
        .checklist
        .into_iter()
        .find(|e| e.item == item)
        .unwrap()
        .state
}

#[test]
fn concurrent_attachments_are_all_kept_in_the_same_order_everywhere() {
    let base = birth_case();
    assert!(view(&base).unwrap().attachments.is_empty());
    let mut a = replica(&base);
    let mut b = replica(&base);
    let mut notice = photo(b"notice scan", "birth-notice", "IMG_0001.jpg");
    notice.note = "  Stamped by the district hospital\nsecond page missing ".into();
    attach(&mut a, &notice, false, &laptop_a(), T0 + MIN).unwrap();
    attach(
        &mut a,
        &photo(b"mother id front", "mother-id", "id-front.jpg"),
        false,
        &laptop_a(),
        T0 + 2 * MIN,
    )
    .unwrap();
    let mut form = photo(b"%PDF form", "declaration-form", "to khai.pdf");
    form.media_type = " Application/PDF ".into();
    attach(&mut b, &form, false, &laptop_b(), T0 + MIN).unwrap();

    let mut ab = a.clone();
    ab.merge(&mut b.clone()).unwrap();
    let mut ba = b.clone();
    ba.merge(&mut a.clone()).unwrap();
    let (lab, lba) = (
        view(&ab).unwrap().attachments,
        view(&ba).unwrap().attachments,
    );
    assert_eq!(lab.len(), 3);
    assert_eq!(lab, lba);
    let pos = |name: &str| lab.iter().position(|x| x.name == name).unwrap();
    assert!(pos("IMG_0001.jpg") < pos("id-front.jpg"), "A's order kept");
    let n = &lab[pos("IMG_0001.jpg")];
    assert_eq!(n.hash, blob(b"notice scan"));
    assert_eq!(n.size, 11);
    assert_eq!(n.item, "birth-notice");
    assert_eq!(
        n.note,
        "Stamped by the district hospital\nsecond page missing"
    );
    assert_eq!(
        (n.by.as_str(), n.by_name.as_str(), n.at_ms),
        ("node-a", "Laptop Thôn 3 (Lan)", T0 + MIN)
    );
    let f = &lab[pos("to khai.pdf")];
    assert_eq!(f.media_type, "application/pdf");
    assert_eq!(f.by, "node-b");

    // The JSON shape is an interface for `case show --json`.
    let json = serde_json::to_value(view(&ab).unwrap()).unwrap();
    let first = &json["attachments"][0];
    for key in [
        "hash",
        "size",
        "media_type",
        "name",
        "item",
        "note",
        "by",
        "by_name",
        "at_ms",
    ] {
        assert!(first.get(key).is_some(), "missing {key}");
    }
    let back: CaseView = serde_json::from_value(json).unwrap();
    assert_eq!(back, view(&ab).unwrap());

    // The same file for the same item again adds nothing and writes nothing;
    // for another item it is a new entry (one scan showing two papers).
    let heads = ab.get_heads();
    let mut again = photo(b"notice scan", "birth-notice", "other-name.jpg");
    again.hash = again.hash.to_uppercase();
    attach(&mut ab, &again, false, &center(), T0 + 3 * MIN).unwrap();
    assert_eq!(ab.get_heads(), heads);
    attach(
        &mut ab,
        &photo(b"notice scan", "father-id", "IMG_0001.jpg"),
        false,
        &center(),
        T0 + 3 * MIN,
    )
    .unwrap();
    assert_eq!(view(&ab).unwrap().attachments.len(), 4);
    assert_eq!(ab.get_changes(&heads).len(), 1, "one change");
}

#[test]
fn attaching_with_mark_received_moves_only_missing_items() {
    let mut doc = birth_case();
    assert_eq!(state_of(&doc, "birth-notice"), DocState::Missing);
    let heads = doc.get_heads();
    attach(
        &mut doc,
        &photo(b"notice", "birth-notice", "n.jpg"),
        true,
        &laptop_a(),
        T0 + MIN,
    )
    .unwrap();
    assert_eq!(state_of(&doc, "birth-notice"), DocState::Received);
    assert_eq!(
        doc.get_changes(&heads).len(),
        1,
        "attach + mark in one change"
    );

    // An officer refused the paper: a new photo does not overrule that.
    mark_document(
        &mut doc,
        "mother-id",
        DocState::Invalid,
        &center(),
        T0 + MIN,
    )
    .unwrap();
    attach(
        &mut doc,
        &photo(b"id", "mother-id", "id.jpg"),
        true,
        &laptop_a(),
        T0 + 2 * MIN,
    )
    .unwrap();
    assert_eq!(state_of(&doc, "mother-id"), DocState::Invalid);
    assert_eq!(view(&doc).unwrap().attachments.len(), 2);

    // Without the flag nothing is marked.
    attach(
        &mut doc,
        &photo(b"form", "declaration-form", "f.jpg"),
        false,
        &laptop_a(),
        T0 + 2 * MIN,
    )
    .unwrap();
    assert_eq!(state_of(&doc, "declaration-form"), DocState::Missing);
    // Re-attaching the same file with the flag marks it, without a new entry.
    attach(
        &mut doc,
        &photo(b"form", "declaration-form", "f.jpg"),
        true,
        &laptop_a(),
        T0 + 3 * MIN,
    )
    .unwrap();
    assert_eq!(state_of(&doc, "declaration-form"), DocState::Received);
    assert_eq!(view(&doc).unwrap().attachments.len(), 3);

    // A conflicting state is left for `resolve`, even when the value that
    // currently wins is `missing`.
    mark_document(
        &mut doc,
        "father-id",
        DocState::Received,
        &center(),
        T0 + 3 * MIN,
    )
    .unwrap();
    let mut a = replica(&doc);
    let mut b = replica(&doc);
    mark_document(
        &mut a,
        "father-id",
        DocState::Invalid,
        &laptop_a(),
        T0 + 4 * MIN,
    )
    .unwrap();
    mark_document(
        &mut b,
        "father-id",
        DocState::Missing,
        &laptop_b(),
        T0 + 4 * MIN,
    )
    .unwrap();
    sync(&mut a, &mut b);
    assert_eq!(state_of(&a, "father-id"), DocState::Missing);
    attach(
        &mut a,
        &photo(b"father", "father-id", "dad.jpg"),
        true,
        &center(),
        T0 + 5 * MIN,
    )
    .unwrap();
    let v = view(&a).unwrap();
    assert!(v.conflicts.iter().any(|c| c.field == "doc:father-id"));
    assert_eq!(state_of(&a, "father-id"), DocState::Missing);
    assert_eq!(v.attachments.len(), 4);
}

#[test]
fn attach_refuses_bad_input_with_actionable_errors() {
    let mut doc = birth_case();
    let heads = doc.get_heads();
    let try_attach = |doc: &mut Automerge, m: &AttachmentMeta| {
        attach(doc, m, true, &laptop_a(), T0 + MIN).map_err(|e| e.to_string())
    };
    let good = photo(b"x", "birth-notice", "x.jpg");

    let err = try_attach(
        &mut doc,
        &AttachmentMeta {
            item: "site-sketch".into(),
            ..good.clone()
        },
    )
    .unwrap_err();
    assert!(
        err.contains("site-sketch") && err.contains("birth-notice, mother-id"),
        "{err}"
    );
    assert!(matches!(
        attach(
            &mut doc,
            &AttachmentMeta {
                item: "x".into(),
                ..good.clone()
            },
            false,
            &laptop_a(),
            T0
        ),
        Err(CaseError::UnknownItem { .. })
    ));
    for (hash, why) in [
        ("abc", "short"),
        (&"g".repeat(64), "not hex"),
        (&"a".repeat(65), "long"),
        ("", "empty"),
    ] {
        let err = try_attach(
            &mut doc,
            &AttachmentMeta {
                hash: hash.to_string(),
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(err.contains("hash"), "{why}: {err}");
    }
    for size in [0, MAX_ATTACHMENT_BYTES + 1] {
        let err = try_attach(
            &mut doc,
            &AttachmentMeta {
                size,
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(err.contains("size"), "{err}");
    }
    for mt in [
        "jpeg",
        "image/",
        "/jpeg",
        "image/jpeg; q=1",
        "image/jp eg",
        "ảnh/jpeg",
    ] {
        let err = try_attach(
            &mut doc,
            &AttachmentMeta {
                media_type: mt.into(),
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(err.contains("media type"), "{mt}: {err}");
    }
    for name in ["", "  ", "photos/", "..", "C:\\Users\\..", "\u{7}\u{202e}"] {
        let err = try_attach(
            &mut doc,
            &AttachmentMeta {
                name: name.into(),
                ..good.clone()
            },
        )
        .unwrap_err();
        assert!(err.contains("attachment name"), "{name:?}: {err}");
    }
    let err = try_attach(
        &mut doc,
        &AttachmentMeta {
            name: "n".repeat(MAX_ATTACHMENT_NAME_CHARS + 1),
            ..good.clone()
        },
    )
    .unwrap_err();
    assert!(err.contains("limit is 255"), "{err}");
    let err = try_attach(
        &mut doc,
        &AttachmentMeta {
            note: "n".repeat(MAX_TEXT_CHARS + 1),
            ..good.clone()
        },
    )
    .unwrap_err();
    assert!(err.contains("limit is 4000"), "{err}");
    assert!(try_attach(
        &mut doc,
        &AttachmentMeta {
            note: "bell\u{7}".into(),
            ..good.clone()
        }
    )
    .is_err());
    assert!(attach(
        &mut doc,
        &good,
        false,
        &Author {
            name: " ".into(),
            ..laptop_a()
        },
        T0
    )
    .is_err());
    assert_eq!(doc.get_heads(), heads, "nothing was written");

    // Names are reduced to a plain file name.
    for (given, stored) in [
        ("C:\\Users\\Lan\\Pictures\\IMG_0001.JPG", "IMG_0001.JPG"),
        ("/sdcard/DCIM/../../etc/passwd", "passwd"),
        ("C:giay chung sinh.jpg", "giay chung sinh.jpg"),
        (
            " Giấy\u{0}khai sinh\u{202e}gpj.exe ",
            "Giấykhai sinhgpj.exe",
        ),
    ] {
        assert_eq!(sanitize_file_name(given).unwrap(), stored);
        assert_eq!(sanitize_file_name(stored).unwrap(), stored, "idempotent");
    }

    // One hash cannot be recorded with two sizes.
    try_attach(&mut doc, &good).unwrap();
    let err = try_attach(
        &mut doc,
        &AttachmentMeta {
            size: 2,
            item: "mother-id".into(),
            ..good.clone()
        },
    )
    .unwrap_err();
    assert!(err.contains("already attached with size 1"), "{err}");
}

#[test]
fn attachments_from_peers_are_checked() {
    type Tamper = fn(
        &mut automerge::transaction::Transaction<'_>,
        &automerge::ObjId,
    ) -> Result<(), automerge::AutomergeError>;
    /// A well-formed entry written field by field, like a peer would.
    fn entry(
        tx: &mut automerge::transaction::Transaction<'_>,
        list: &automerge::ObjId,
    ) -> Result<automerge::ObjId, automerge::AutomergeError> {
        let idx = tx.length(list);
        let e = tx.insert_object(list, idx, ObjType::Map)?;
        tx.put(&e, "hash", blake3::hash(b"peer").to_hex().as_str())?;
        tx.put(&e, "size", 4u64)?;
        for (k, v) in [
            ("media_type", "image/png"),
            ("name", "scan.png"),
            ("item", "birth-notice"),
            ("note", ""),
            ("by", "node-x"),
            ("by_name", "Laptop X"),
        ] {
            tx.put(&e, k, v)?;
        }
        tx.put(&e, "at_ms", 1i64)?;
        Ok(e)
    }
    let tampers: [(&str, Tamper); 12] = [
        ("uppercase hash", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "hash", blake3::hash(b"peer").to_hex().to_uppercase())
        }),
        ("short hash", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "hash", "abcd")
        }),
        ("size as signed int", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "size", -4i64)
        }),
        ("zero size", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "size", 0u64)
        }),
        ("huge size", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "size", u64::MAX)
        }),
        ("path in name", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "name", "../../.ssh/authorized_keys")
        }),
        ("foreign item", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "item", "site-sketch")
        }),
        ("oversized note", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "note", "spam ".repeat(1_000))
        }),
        ("bad media type", |tx, l| {
            let e = entry(tx, l)?;
            tx.put(&e, "media_type", "text/html; charset=utf-8")
        }),
        ("missing key", |tx, l| {
            let e = entry(tx, l)?;
            tx.delete(&e, "by")
        }),
        ("entry is a string", |tx, l| tx.insert(l, 0, "hello")),
        ("one hash, two sizes", |tx, l| {
            entry(tx, l)?;
            let e = entry(tx, l)?;
            tx.put(&e, "size", 5u64)
        }),
    ];
    // The well-formed entry itself is accepted.
    let mut ok = birth_case();
    ok.transact::<_, _, automerge::AutomergeError>(|tx| {
        let (_, l) = tx.get(ROOT, "attachments")?.unwrap();
        entry(tx, &l).map(|_| ())
    })
    .unwrap();
    validate(&ok).unwrap();
    assert_eq!(view(&ok).unwrap().attachments[0].name, "scan.png");

    for (what, tamper) in tampers {
        let mut doc = birth_case();
        doc.transact::<_, _, automerge::AutomergeError>(|tx| {
            let (_, l) = tx.get(ROOT, "attachments")?.unwrap();
            tamper(tx, &l)
        })
        .unwrap();
        assert!(
            matches!(validate(&doc), Err(CaseError::Malformed(_))),
            "{what}: {:?}",
            validate(&doc)
        );
        assert!(
            matches!(
                attach(
                    &mut doc,
                    &photo(b"p", "birth-notice", "p.jpg"),
                    true,
                    &laptop_a(),
                    T0
                ),
                Err(CaseError::Malformed(_))
            ),
            "{what}"
        );
    }
    let mut doc = birth_case();
    doc.transact::<_, _, automerge::AutomergeError>(|tx| {
        tx.put_object(ROOT, "attachments", ObjType::Map).map(|_| ())
    })
    .unwrap();
    assert!(matches!(validate(&doc), Err(CaseError::Malformed(_))));
}

#[test]
fn cases_from_before_attachments_get_the_list_on_first_attach_without_losses() {
    // A case written by an older node has no `attachments` key.
    let mut old = birth_case();
    old.transact::<_, _, automerge::AutomergeError>(|tx| tx.delete(ROOT, "attachments"))
        .unwrap();
    assert!(old.get(ROOT, "attachments").unwrap().is_none());
    validate(&old).unwrap();
    assert!(view(&old).unwrap().attachments.is_empty());

    // Two laptops attach concurrently: each creates the list.
    let mut a = replica(&old);
    let mut b = replica(&old);
    attach(
        &mut a,
        &photo(b"a", "birth-notice", "a.jpg"),
        true,
        &laptop_a(),
        T0 + MIN,
    )
    .unwrap();
    attach(
        &mut b,
        &photo(b"b", "mother-id", "b.jpg"),
        false,
        &laptop_b(),
        T0 + MIN,
    )
    .unwrap();
    sync(&mut a, &mut b);
    let (va, vb) = (view(&a).unwrap(), view(&b).unwrap());
    assert_eq!(va.attachments.len(), 2, "neither list is lost");
    assert_eq!(va.attachments, vb.attachments);
    assert!(va.conflicts.is_empty());
    // Later attachments go to one list and everything stays visible.
    attach(
        &mut b,
        &photo(b"c", "father-id", "c.jpg"),
        false,
        &center(),
        T0 + 2 * MIN,
    )
    .unwrap();
    sync(&mut a, &mut b);
    assert_eq!(view(&a).unwrap().attachments.len(), 3);
    assert_eq!(view(&a).unwrap().attachments, view(&b).unwrap().attachments);
    // The same-item dedupe sees entries in every list.
    let heads = a.get_heads();
    attach(
        &mut a,
        &photo(b"b", "mother-id", "b.jpg"),
        false,
        &center(),
        T0,
    )
    .unwrap();
    attach(
        &mut a,
        &photo(b"a", "birth-notice", "a.jpg"),
        false,
        &center(),
        T0,
    )
    .unwrap();
    assert_eq!(a.get_heads(), heads);
}

/// The one-pass reader behind `view` must read exactly what autosurgeon
/// reads key by key, conflicts included (the same winner per key).
#[test]
fn one_pass_hydration_reads_what_key_by_key_hydration_reads() {
    let base = birth_case();
    let mut a = replica(&base);
    let mut b = replica(&base);
    set_field(&mut a, "phone", "0912 000 111", &laptop_a(), T0 + MIN).unwrap();
    set_field(&mut b, "phone", "0987 222 333", &laptop_b(), T0 + 2 * MIN).unwrap();
    add_note(
        &mut a,
        "father brings the ID on Friday",
        &laptop_a(),
        T0 + 3 * MIN,
    )
    .unwrap();
    mark_document(
        &mut b,
        "birth-notice",
        DocState::Received,
        &laptop_b(),
        T0 + 4 * MIN,
    )
    .unwrap();
    sync(&mut a, &mut b);
    assert_eq!(view(&a).unwrap().conflicts.len(), 1, "a real conflict");
    for d in [&base, &a, &b] {
        let key_by_key: doc::CaseDoc = autosurgeon::hydrate(d).unwrap();
        assert_eq!(
            doc::hydrate_case(&doc::OnePass::new(d)).unwrap(),
            key_by_key
        );
    }
}
