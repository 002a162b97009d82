//! Which profile field each column of a sheet fills: an explicit mapping (`{"Mobile": "phones"}`) first, then the
//! headers matched automatically (case, spaces, dashes and underscores ignored; common synonyms such as "E-mail",
//! "Mobile", "Company", "Zip"; custom fields by name or label). Also the columns of an export and a row of cells
//! turned into the input object the profile checks.

use serde_json::{Map, Value};

use crate::leads::profile::{self, CustomField, Field, Kind};

/// Where a column's values go.
#[derive(Debug, Clone)]
pub enum Target {
    Email,
    Standard(&'static Field),
    Custom(String),
}

impl PartialEq for Target {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Target {
    /// The field name as a mapping and an error report write it: `email`, `city`, `custom.plan`.
    pub fn name(&self) -> String {
        match self {
            Self::Email => "email".into(),
            Self::Standard(field) => field.name.into(),
            Self::Custom(name) => format!("custom.{name}"),
        }
    }

    /// Whether several columns may fill it (their values are joined into one list).
    fn is_list(&self) -> bool {
        matches!(self, Self::Standard(field) if matches!(field.kind, Kind::TextList { .. }))
    }
}

/// The target of each column (in file order), and the headers of the columns that are not imported.
#[derive(Debug, Clone, PartialEq)]
pub struct Columns {
    pub targets: Vec<Option<Target>>,
    pub unmapped: Vec<String>,
}

/// Headers that mean a field without being its name (compared normalised, see [`key`]).
const SYNONYMS: &[(&str, &str)] = &[
    ("mail", "email"),
    ("emailaddress", "email"),
    ("mailaddress", "email"),
    ("phone", "phones"),
    ("phonenumber", "phones"),
    ("telephone", "phones"),
    ("tel", "phones"),
    ("mobile", "phones"),
    ("mobilephone", "phones"),
    ("mobilenumber", "phones"),
    ("cell", "phones"),
    ("cellphone", "phones"),
    ("company", "company_name"),
    ("organisation", "company_name"),
    ("organization", "company_name"),
    ("firstname", "first_name"),
    ("givenname", "first_name"),
    ("forename", "first_name"),
    ("lastname", "last_name"),
    ("surname", "last_name"),
    ("familyname", "last_name"),
    ("zip", "postal_code"),
    ("zipcode", "postal_code"),
    ("postcode", "postal_code"),
    ("plz", "postal_code"),
    ("street", "address"),
    ("streetaddress", "address"),
    ("state", "region"),
    ("province", "region"),
    ("countrycode", "country"),
    ("lang", "language"),
    ("tz", "timezone"),
    ("occupation", "profession"),
    ("jobtitle", "profession"),
    ("website", "company_website"),
    ("web", "company_website"),
    ("url", "company_website"),
    ("employees", "company_size"),
    ("sector", "company_sector"),
    ("industry", "company_sector"),
    ("customernumber", "customer_id"),
    ("tag", "tags"),
    ("owner", "agent"),
    ("assignedagent", "agent"),
    ("methodofcontact", "contact_method"),
    ("customer", "is_customer"),
    ("dnc", "do_not_call"),
];

/// A header compared: letters and digits only, lower-case ("E-Mail " and "e_mail" are both `email`).
pub fn key(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The target a mapping names: `email`, a standard field, or `custom.<name>` (a defined custom field). `None` for
/// an empty name, which leaves the column out.
pub fn parse_target(name: &str, defs: &[CustomField]) -> Result<Option<Target>, String> {
    let name = name.trim();
    if name.is_empty() {
        return Ok(None);
    }
    if name == "email" {
        return Ok(Some(Target::Email));
    }
    if let Some(custom) = name.strip_prefix("custom.") {
        return defs
            .iter()
            .find(|d| d.name == custom)
            .map(|d| Some(Target::Custom(d.name.clone())))
            .ok_or_else(|| format!("{name}: no such custom field (see GET /v1/lead-fields)"));
    }
    match profile::field(name) {
        Some(field) => Ok(Some(Target::Standard(field))),
        None if profile::READ_ONLY.contains(&name) => Err(format!("{name} is kept by leadflow and cannot be imported")),
        None => Err(format!(
            "{name}: not a profile field; use email, a standard field such as phones or company_name, or custom.<name>"
        )),
    }
}

/// The target a header names by itself, if any.
fn guess(header: &str, defs: &[CustomField]) -> Option<Target> {
    let wanted = key(header);
    if wanted.is_empty() {
        return None;
    }
    if wanted == "email" {
        return Some(Target::Email);
    }
    if let Some(field) = profile::FIELDS.iter().find(|f| key(f.name) == wanted) {
        return Some(Target::Standard(field));
    }
    let custom = defs
        .iter()
        .find(|d| key(&d.name) == wanted || key(&d.label) == wanted || format!("custom{}", key(&d.name)) == wanted);
    if let Some(def) = custom {
        return Some(Target::Custom(def.name.clone()));
    }
    let (_, name) = SYNONYMS.iter().find(|(synonym, _)| *synonym == wanted)?;
    if *name == "email" {
        return Some(Target::Email);
    }
    profile::field(name).map(Target::Standard)
}

/// Decides the target of every column: `mapping` (header -> field name; `""` or `null` leaves a column out) first,
/// then the headers by themselves. A field other than a list (phones, tags) is filled by one column only: a later
/// column naming it again is not imported. Fails when the mapping names a column the file does not have.
pub fn resolve(headers: &[String], mapping: &Map<String, Value>, defs: &[CustomField]) -> Result<Columns, String> {
    let mut targets: Vec<Option<Target>> = vec![None; headers.len()];
    let mut decided = vec![false; headers.len()];
    for (header, field) in mapping {
        let index = headers
            .iter()
            .position(|h| h == header.trim())
            .or_else(|| headers.iter().position(|h| key(h) == key(header)))
            .ok_or_else(|| format!("the mapping names the column \"{header}\", which the file does not have"))?;
        let name = field.as_str().unwrap_or_default();
        targets[index] = parse_target(name, defs)?;
        decided[index] = true;
    }
    for (index, header) in headers.iter().enumerate() {
        if decided[index] {
            continue;
        }
        let Some(target) = guess(header, defs) else {
            continue;
        };
        if target.is_list() || !targets.iter().flatten().any(|taken| *taken == target) {
            targets[index] = Some(target);
        }
    }
    let unmapped = headers
        .iter()
        .zip(&targets)
        .filter(|(_, target)| target.is_none())
        .map(|(header, _)| header.clone())
        .collect();
    Ok(Columns { targets, unmapped })
}

impl Columns {
    /// Whether some column holds the email address.
    pub fn has_email(&self) -> bool {
        self.targets.iter().flatten().any(|t| *t == Target::Email)
    }

    /// A row's cells as the input object the profile checks. An empty cell leaves its field as it is; tags are
    /// separated by commas, phones by commas or semicolons.
    pub fn input(&self, cells: &[String]) -> Map<String, Value> {
        let mut input = Map::new();
        let mut custom = Map::new();
        for (target, cell) in self.targets.iter().zip(cells) {
            let (Some(target), value) = (target, cell.trim()) else {
                continue;
            };
            if value.is_empty() {
                continue;
            }
            match target {
                Target::Email => {
                    input.insert("email".into(), Value::String(value.into()));
                }
                Target::Custom(name) => {
                    custom.insert(name.clone(), Value::String(value.into()));
                }
                Target::Standard(field) if target.is_list() => {
                    let separators: &[char] = if field.name == "phones" { &[',', ';'] } else { &[','] };
                    let items = input.entry(field.name).or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(items) = items {
                        items.extend(
                            value
                                .split(separators)
                                .map(str::trim)
                                .filter(|item| !item.is_empty())
                                .map(|item| Value::String(item.into())),
                        );
                    }
                }
                Target::Standard(field) => {
                    input.insert(field.name.into(), Value::String(value.into()));
                }
            }
        }
        if !custom.is_empty() {
            input.insert("custom".into(), Value::Object(custom));
        }
        input
    }
}

/// The header of every importable column: `email`, each standard field, `custom.<name>` per defined field.
pub fn importable(defs: &[CustomField]) -> Vec<String> {
    std::iter::once("email".to_string())
        .chain(profile::FIELDS.iter().map(|f| f.name.to_string()))
        .chain(defs.iter().map(|d| format!("custom.{}", d.name)))
        .collect()
}

/// The header of every exported column: `id`, `email`, each standard field, score, temperature, the times, then
/// `custom.<name>` per defined field. The export's file imports again as it is (read-only columns are left out).
pub fn exported(defs: &[CustomField]) -> Vec<String> {
    ["id", "email"]
        .into_iter()
        .map(str::to_string)
        .chain(profile::FIELDS.iter().map(|f| f.name.to_string()))
        .chain(["score", "temperature", "created_at", "updated_at"].map(str::to_string))
        .chain(defs.iter().map(|d| format!("custom.{}", d.name)))
        .collect()
}

/// One exported cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Number(f64),
}

impl Cell {
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Number(n) => n.to_string(),
        }
    }
}

/// A lead (its row as JSON, `to_jsonb(l)`) as the cells of `columns` (from [`exported`]).
pub fn cells(lead: &Value, columns: &[String]) -> Vec<Cell> {
    columns
        .iter()
        .map(|column| {
            let value = match column.strip_prefix("custom.") {
                Some(name) => &lead["custom"][name],
                None => &lead[column.as_str()],
            };
            match value {
                Value::Number(n) => n.as_f64().map_or_else(|| Cell::Text(n.to_string()), Cell::Number),
                other => Cell::Text(plain(other)),
            }
        })
        .collect()
}

/// A JSON value as a cell's text: lists joined with ", ".
fn plain(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(plain).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::leads::profile::CustomKind;

    fn defs() -> Vec<CustomField> {
        vec![CustomField {
            name: "plan".into(),
            label: "Plan chosen".into(),
            kind: CustomKind::Choice,
            choices: vec!["Basic".into()],
        }]
    }

    fn names(columns: &Columns) -> Vec<Option<String>> {
        columns.targets.iter().map(|t| t.as_ref().map(Target::name)).collect()
    }

    fn headers(raw: &[&str]) -> Vec<String> {
        raw.iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn headers_match_fields_by_name_synonym_and_custom_label() {
        let columns = resolve(
            &headers(&[
                "E-Mail",
                "First Name",
                "Mobile",
                "Phone",
                "Company",
                "ZIP",
                "Plan chosen",
                "Shoe size",
            ]),
            &Map::new(),
            &defs(),
        )
        .unwrap();
        assert_eq!(
            names(&columns),
            [
                Some("email".to_string()),
                Some("first_name".into()),
                Some("phones".into()),
                Some("phones".into()),
                Some("company_name".into()),
                Some("postal_code".into()),
                Some("custom.plan".into()),
                None
            ]
        );
        assert_eq!(columns.unmapped, ["Shoe size"]);
    }

    #[test]
    fn an_explicit_mapping_wins_and_a_field_is_filled_once() {
        let mapping = json!({"Contact": "email", "E-mail": "", "Town": "city"});
        let columns = resolve(
            &headers(&["Contact", "E-mail", "Town", "City", "created_at"]),
            mapping.as_object().unwrap(),
            &defs(),
        )
        .unwrap();
        assert_eq!(
            names(&columns),
            [Some("email".to_string()), None, Some("city".into()), None, None]
        );
        assert_eq!(columns.unmapped, ["E-mail", "City", "created_at"]);
    }

    #[test]
    fn a_mapping_naming_an_unknown_column_or_field_is_refused() {
        let missing = json!({"Nope": "city"});
        assert!(resolve(&headers(&["Email"]), missing.as_object().unwrap(), &[]).is_err());
        assert!(parse_target("custom.nope", &defs()).is_err());
        assert!(parse_target("score", &defs()).is_err());
        assert!(parse_target("phone", &defs()).is_err());
    }

    #[test]
    fn a_row_becomes_an_input_object_with_lists_split() {
        let columns = resolve(
            &headers(&["Email", "Tags", "Mobile", "Phone", "City", "Plan chosen"]),
            &Map::new(),
            &defs(),
        )
        .unwrap();
        let cells = headers(&["a@example.com", "fair, vip ,", "+49 1; +49 2", "+49 3", "", "basic"]);
        assert_eq!(
            Value::Object(columns.input(&cells)),
            json!({"email": "a@example.com", "tags": ["fair", "vip"], "phones": ["+49 1", "+49 2", "+49 3"],
                   "custom": {"plan": "basic"}})
        );
    }

    #[test]
    fn an_exported_lead_reads_as_cells() {
        let lead = json!({"id": 7, "email": "a@example.com", "phones": ["1", "2"], "custom": {"plan": "Basic"},
                          "score": 2.5, "city": null});
        let columns = headers(&["id", "email", "phones", "city", "score", "custom.plan"]);
        assert_eq!(
            cells(&lead, &columns),
            [
                Cell::Number(7.0),
                Cell::Text("a@example.com".into()),
                Cell::Text("1, 2".into()),
                Cell::Text(String::new()),
                Cell::Number(2.5),
                Cell::Text("Basic".into())
            ]
        );
    }
}
