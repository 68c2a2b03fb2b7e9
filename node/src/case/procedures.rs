//! The six administrative procedures the commune center handles, as static data.
//!
//! Why static data: every node (field laptop or center desktop) must agree on
//! which checklist items and fields a procedure has, without a network round
//! trip; the definitions travel with the binary, and a case document only
//! stores the procedure id.
//!
//! Processing times are given in **calendar days** (not working days). The
//! legal deadlines are in working days, but holidays differ per year and per
//! province; calendar days are a simple, predictable approximation that every
//! replica computes identically. The numbers are chosen so that the calendar
//! deadline is never earlier than the legal one for a normal week.

use super::CaseError;

/// One document on a procedure's checklist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemDef {
    /// Stable kebab-case id, used as the key in the case's `checklist` map and
    /// on the CLI as `doc:<id>`.
    pub id: &'static str,
    /// Human-readable label shown to officers.
    pub label: &'static str,
    /// Required items must be `received` before the case can go to processing.
    pub required: bool,
}

/// How a procedure field's value is checked before it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// Free single-line text.
    Text,
    /// A `YYYY-MM-DD` date.
    Date,
    /// A `YYYY-MM-DD` date that cannot be in the future (birth dates).
    PastDate,
    /// A whole number, at least 1 (counts, money in VND).
    Integer,
    /// A positive decimal number like `125.5` (areas).
    Decimal,
    /// One of a fixed set of values.
    Choice(&'static [&'static str]),
}

/// One procedure-specific field (beyond the applicant fields every case has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldDef {
    /// Stable kebab-case id, used as key in the case's `fields` map and on the CLI.
    pub id: &'static str,
    /// Human-readable label.
    pub label: &'static str,
    /// Required fields cannot be set to an empty value; they are listed in
    /// `missing_fields` of the case view until filled.
    pub required: bool,
    /// How values are validated.
    pub kind: FieldKind,
}

/// A procedure definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcedureDef {
    /// Stable id stored in the case document (`procedure` key).
    pub id: &'static str,
    /// Title shown to officers.
    pub title: &'static str,
    /// Documents the citizen must (or may) bring.
    pub checklist: &'static [ItemDef],
    /// Procedure-specific fields.
    pub fields: &'static [FieldDef],
    /// Processing time in calendar days (see module docs), from which the due
    /// date is computed from the creation date.
    pub processing_days: u32,
}

impl ProcedureDef {
    /// Look up a checklist item of this procedure.
    pub fn item(&self, id: &str) -> Option<&'static ItemDef> {
        self.checklist.iter().find(|i| i.id == id)
    }

    /// Look up a procedure field of this procedure.
    pub fn field(&self, id: &str) -> Option<&'static FieldDef> {
        self.fields.iter().find(|f| f.id == id)
    }
}

const fn item(id: &'static str, label: &'static str, required: bool) -> ItemDef {
    ItemDef {
        id,
        label,
        required,
    }
}

const fn field(id: &'static str, label: &'static str, required: bool, kind: FieldKind) -> FieldDef {
    FieldDef {
        id,
        label,
        required,
        kind,
    }
}

use FieldKind::{Choice, Date, Decimal, Integer, PastDate, Text};

static PROCEDURES: [ProcedureDef; 6] = [
    ProcedureDef {
        id: "birth-registration",
        title: "Birth registration (Đăng ký khai sinh)",
        checklist: &[
            item("declaration-form", "Birth registration declaration form", true),
            item("birth-notice", "Hospital birth notice (giấy chứng sinh) or witness statement", true),
            item("mother-id", "Mother's citizen ID card", true),
            item("father-id", "Father's citizen ID card (when the father is registered)", false),
            item("marriage-certificate", "Parents' marriage certificate", false),
            item("authorization", "Authorization letter (when a relative files on the parents' behalf)", false),
        ],
        fields: &[
            field("child-name", "Child's full name", true, Text),
            field("child-birth-date", "Child's date of birth", true, PastDate),
            field("child-sex", "Child's sex (male/female)", true, Choice(&["male", "female"])),
            field("birth-place", "Place of birth", true, Text),
            field("ethnicity", "Ethnicity", false, Text),
            field("mother-name", "Mother's full name", true, Text),
            field("father-name", "Father's full name", false, Text),
        ],
        processing_days: 2,
    },
    ProcedureDef {
        id: "household-registration",
        title: "Permanent residence registration (Đăng ký thường trú)",
        checklist: &[
            item("declaration-form", "Residence information change declaration (form CT01)", true),
            item("id-card", "Applicant's citizen ID card", true),
            item("residence-proof", "Proof of lawful residence (ownership papers, lease or loan contract)", true),
            item("owner-consent", "Written consent of the household head or home owner", false),
            item("relationship-proof", "Proof of family relationship with the household head", false),
        ],
        fields: &[
            field("address", "Registered address (hamlet, house number)", true, Text),
            field("household-head", "Full name of the household head", true, Text),
            field("relationship-to-head", "Relationship to the household head", true, Text),
            field("previous-address", "Previous permanent address", false, Text),
            field("move-in-date", "Date moved in", false, PastDate),
        ],
        processing_days: 10,
    },
    ProcedureDef {
        id: "certification",
        title: "Certification of copies and signatures (Chứng thực)",
        checklist: &[
            item("original-document", "Original document (bản chính) to compare against", true),
            item("copies", "Copies to be certified", true),
            item("id-card", "Requester's citizen ID card", true),
            item("signed-document", "Document to be signed in front of the officer (signature certification)", false),
        ],
        fields: &[
            field("certification-type", "Type (copy/signature)", true, Choice(&["copy", "signature"])),
            field("document-title", "Title of the document", true, Text),
            field("copies-count", "Number of certified copies", true, Integer),
            field("document-language", "Language of the document", false, Text),
        ],
        processing_days: 2,
    },
    ProcedureDef {
        id: "land-survey",
        title: "Land measurement registration for a land-use-right certificate (Đo đạc, đăng ký đất đai)",
        checklist: &[
            item("request-form", "Request form for land registration and measurement", true),
            item("land-certificate", "Old land-use-right certificate or proof of land origin", true),
            item("id-card", "Land user's citizen ID card", true),
            item("site-sketch", "Sketch of the land parcel", true),
            item("neighbor-confirmation", "Boundary confirmation signed by adjoining land users", true),
            item("tax-receipt", "Land-use tax payment receipts", false),
            item("power-of-attorney", "Power of attorney (when filed by a representative)", false),
        ],
        fields: &[
            field("parcel-number", "Parcel number (số thửa)", true, Text),
            field("map-sheet", "Cadastral map sheet number (tờ bản đồ số)", true, Text),
            field("area-m2", "Declared area in square metres", true, Decimal),
            field("land-use-purpose", "Land use purpose (e.g. ONT residential, LUC rice)", true, Text),
            field("land-address", "Location of the parcel", false, Text),
            field("land-origin", "Origin of land use (inherited, allocated, purchased...)", false, Text),
        ],
        processing_days: 30,
    },
    ProcedureDef {
        id: "social-insurance",
        title: "Voluntary social insurance registration (Đăng ký BHXH tự nguyện)",
        checklist: &[
            item("declaration-form", "Participation declaration (form TK1-TS)", true),
            item("id-card", "Participant's citizen ID card", true),
            item("old-insurance-book", "Existing social insurance book, if any", false),
            item("bank-account", "Bank account details for refunds and benefits", false),
        ],
        fields: &[
            field("contribution-plan", "Payment schedule (monthly/quarterly/semiannual/annual)", true, Choice(&["monthly", "quarterly", "semiannual", "annual"])),
            field("income-basis", "Chosen monthly income basis in VND", true, Integer),
            field("start-date", "Contribution start date", true, Date),
            field("insurance-number", "Existing social insurance number", false, Text),
        ],
        processing_days: 7,
    },
    ProcedureDef {
        id: "health-insurance",
        title: "Household health insurance card (Cấp thẻ BHYT hộ gia đình)",
        checklist: &[
            item("declaration-form", "Participation declaration (form TK1-TS)", true),
            item("id-card", "Applicant's citizen ID card", true),
            item("member-list", "List of participating household members (form DK01)", true),
            item("priority-proof", "Proof of priority group (poor or near-poor household, ethnic minority...)", false),
        ],
        fields: &[
            field("household-size", "Number of household members enrolling", true, Integer),
            field("registered-clinic", "Initial registered health facility", true, Text),
            field("beneficiary-group", "Beneficiary group code", false, Text),
            field("card-number", "Existing health insurance card number", false, Text),
        ],
        processing_days: 5,
    },
];

/// All procedures the center handles, in a fixed display order.
pub fn procedures() -> &'static [ProcedureDef] {
    &PROCEDURES
}

/// Look up a procedure by id. The error lists the valid ids so the CLI can
/// print something actionable.
pub fn procedure(id: &str) -> Result<&'static ProcedureDef, CaseError> {
    PROCEDURES
        .iter()
        .find(|p| p.id == id)
        .ok_or_else(|| CaseError::UnknownProcedure {
            given: id.to_string(),
            valid: PROCEDURES.iter().map(|p| p.id.to_string()).collect(),
        })
}
