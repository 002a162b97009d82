//! Templates kept as files: finding `<name>/<language>/{subject.hbs, body.txt.hbs, body.html.hbs}` folders,
//! checking that they compile, and applying them to the `templates` table (a new version only when content changed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use deadpool_postgres::GenericClient;

/// The subject template file of a template folder.
pub const SUBJECT_FILE: &str = "subject.hbs";
/// The plain-text body template file of a template folder.
pub const BODY_TEXT_FILE: &str = "body.txt.hbs";
/// The HTML body template file of a template folder.
pub const BODY_HTML_FILE: &str = "body.html.hbs";

const TEMPLATE_FILES: [&str; 3] = [SUBJECT_FILE, BODY_TEXT_FILE, BODY_HTML_FILE];

/// One template in one language, as read from its folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    pub name: String,
    pub language: String,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
}

/// What applying a template did to the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The template did not exist in this language: stored as version 1.
    Created,
    /// The content differed: stored with the version bumped.
    Updated,
    /// The stored content is the same: left alone, version unchanged.
    Unchanged,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Unchanged => "unchanged",
        }
    }
}

/// The outcome of applying one [`TemplateSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedTemplate {
    pub name: String,
    pub language: String,
    /// The version stored after applying.
    pub version: i32,
    pub change: Change,
}

/// Checks a template name: `[a-z0-9][a-z0-9_-]*`, at most 100 characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !first_ok || !rest_ok || name.len() > 100 {
        return Err(format!(
            "template name {name:?} is not valid: use lower-case letters, digits, '_' and '-', starting with a \
             letter or digit"
        ));
    }
    Ok(())
}

/// Checks a template language: lower-case BCP 47 such as `en`, `de`, `pt-br`, `zh-hant`.
pub fn validate_language(language: &str) -> Result<(), String> {
    let mut parts = language.split('-');
    let primary_ok = parts
        .next()
        .is_some_and(|p| (2..=3).contains(&p.len()) && p.chars().all(|c| c.is_ascii_lowercase()));
    let rest_ok =
        parts.all(|p| (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    if !primary_ok || !rest_ok {
        return Err(format!(
            "template language {language:?} is not valid: use a lower-case BCP 47 tag such as en, de or pt-br"
        ));
    }
    Ok(())
}

/// Finds every template folder under `root` (recursively), reads and compiles it.
///
/// A template folder is one holding any of the three template files; all three are required. The folder's name
/// is the language and its parent's name the template name. The result is sorted by name, then language.
pub fn find_templates(root: &Path) -> anyhow::Result<Vec<TemplateSpec>> {
    let meta = std::fs::metadata(root).with_context(|| format!("failed to read {}", root.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{} is not a folder", root.display());
    }
    let mut folders = Vec::new();
    collect_template_folders(root, &mut folders)?;

    let mut found: BTreeMap<(String, String), (TemplateSpec, PathBuf)> = BTreeMap::new();
    for folder in folders {
        let spec = read_template_folder(&folder)?;
        let key = (spec.name.clone(), spec.language.clone());
        if let Some((_, first)) = found.get(&key) {
            anyhow::bail!(
                "template {} ({}) is defined twice: {} and {}",
                spec.name,
                spec.language,
                first.display(),
                folder.display()
            );
        }
        found.insert(key, (spec, folder));
    }
    Ok(found.into_values().map(|(spec, _)| spec).collect())
}

fn collect_template_folders(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("failed to list {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .with_context(|| format!("failed to list {}", dir.display()))?;
    entries.sort();
    if TEMPLATE_FILES.iter().any(|f| dir.join(f).is_file()) {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !hidden && path.is_dir() {
            collect_template_folders(&path, out)?;
        }
    }
    Ok(())
}

fn read_template_folder(folder: &Path) -> anyhow::Result<TemplateSpec> {
    let language = folder_name(folder)?;
    let parent = folder.parent().with_context(|| {
        format!(
            "{}: a template folder must sit inside a folder named after the template",
            folder.display()
        )
    })?;
    let name = folder_name(parent)?;
    validate_name(&name).map_err(|e| anyhow::anyhow!("{}: {e}", parent.display()))?;
    validate_language(&language).map_err(|e| anyhow::anyhow!("{}: {e}", folder.display()))?;

    let mut sources = Vec::with_capacity(3);
    for file in TEMPLATE_FILES {
        let path = folder.join(file);
        if !path.is_file() {
            anyhow::bail!(
                "{}: missing (a template needs {})",
                path.display(),
                TEMPLATE_FILES.join(", ")
            );
        }
        let source = std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))?;
        check_compiles(&source, &path.display().to_string())?;
        sources.push(source);
    }
    let mut sources = sources.into_iter();
    let (subject, body_text, body_html) = match (sources.next(), sources.next(), sources.next()) {
        (Some(s), Some(t), Some(h)) => (s, t, h),
        _ => anyhow::bail!("{}: incomplete template", folder.display()),
    };
    if subject.trim().is_empty() {
        anyhow::bail!("{}: the subject is empty", folder.join(SUBJECT_FILE).display());
    }
    Ok(TemplateSpec {
        name,
        language,
        subject,
        body_text,
        body_html,
    })
}

fn folder_name(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: the folder name is not valid UTF-8", path.display()))
}

/// Compiles one template source; the error names `origin` (a file, or `name/language/part`) and the line.
pub fn check_compiles(source: &str, origin: &str) -> anyhow::Result<()> {
    compile(source, origin).map(|_| ()).map_err(anyhow::Error::msg)
}

/// Compiles a Handlebars template; the error message names `origin` and, when known, the line and column.
pub(crate) fn compile(source: &str, origin: &str) -> Result<handlebars::Template, String> {
    handlebars::Template::compile_with_name(source, origin.to_string()).map_err(|e| match e.pos() {
        Some((line, column)) => format!("{origin}: line {line}, column {column}: {}", e.reason()),
        None => format!("{origin}: {}", e.reason()),
    })
}

impl TemplateSpec {
    /// Checks the name and language and that every part compiles (for specs that did not come from files).
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_name(&self.name).map_err(anyhow::Error::msg)?;
        validate_language(&self.language).map_err(anyhow::Error::msg)?;
        for (part, source) in [
            (SUBJECT_FILE, &self.subject),
            (BODY_TEXT_FILE, &self.body_text),
            (BODY_HTML_FILE, &self.body_html),
        ] {
            check_compiles(source, &format!("{}/{}/{part}", self.name, self.language))?;
        }
        Ok(())
    }
}

/// Upserts every spec into `templates`, bumping `version` only when the content changed.
///
/// Pass a transaction to apply all or nothing. Each spec is validated first, so nothing is written if any is bad.
pub async fn apply(client: &impl GenericClient, specs: &[TemplateSpec]) -> anyhow::Result<Vec<AppliedTemplate>> {
    for spec in specs {
        spec.validate()?;
    }
    let mut applied = Vec::with_capacity(specs.len());
    for spec in specs {
        // xmax = 0 on the returned row: it was inserted, not updated. No row: the content was the same.
        let row = client
            .query_opt(
                "INSERT INTO templates AS t (name, language, subject, body_text, body_html)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name, language) DO UPDATE
                    SET subject = EXCLUDED.subject,
                        body_text = EXCLUDED.body_text,
                        body_html = EXCLUDED.body_html,
                        version = t.version + 1,
                        updated_at = now()
                  WHERE (t.subject, t.body_text, t.body_html)
                        IS DISTINCT FROM (EXCLUDED.subject, EXCLUDED.body_text, EXCLUDED.body_html)
                 RETURNING t.version, (t.xmax = 0) AS inserted",
                &[
                    &spec.name,
                    &spec.language,
                    &spec.subject,
                    &spec.body_text,
                    &spec.body_html,
                ],
            )
            .await
            .with_context(|| format!("failed to store template {} ({})", spec.name, spec.language))?;
        let (version, change) = match row {
            Some(row) => {
                let inserted: bool = row.get(1);
                (row.get(0), if inserted { Change::Created } else { Change::Updated })
            }
            None => {
                let row = client
                    .query_one(
                        "SELECT version FROM templates WHERE name = $1 AND language = $2",
                        &[&spec.name, &spec.language],
                    )
                    .await
                    .with_context(|| format!("failed to read template {} ({})", spec.name, spec.language))?;
                (row.get(0), Change::Unchanged)
            }
        };
        tracing::info!(
            template = %spec.name,
            language = %spec.language,
            version,
            change = change.as_str(),
            "applied template"
        );
        applied.push(AppliedTemplate {
            name: spec.name.clone(),
            language: spec.language.clone(),
            version,
            change,
        });
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("leadflow-templates-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn write(dir: &Path, files: &[(&str, &str)]) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
    }

    const GOOD: [(&str, &str); 3] = [
        (SUBJECT_FILE, "Hello {{lead.name}}"),
        (BODY_TEXT_FILE, "Hi {{lead.name}},\nyour cart is waiting."),
        (BODY_HTML_FILE, "<p>Hi {{lead.name}}</p>"),
    ];

    #[test]
    fn template_folders_are_found_recursively_with_name_and_language() {
        let root = scratch("found");
        write(&root.join("cart/cart-reminder/en"), &GOOD);
        write(&root.join("cart/cart-reminder/pt-br"), &GOOD);
        write(&root.join("trial_end/de"), &GOOD);
        write(&root.join(".git/x/en"), &[("subject.hbs", "{{#if}")]);
        let specs = find_templates(&root).unwrap();
        let keys: Vec<(String, String)> = specs.iter().map(|s| (s.name.clone(), s.language.clone())).collect();
        assert_eq!(
            keys,
            vec![
                ("cart-reminder".to_string(), "en".to_string()),
                ("cart-reminder".to_string(), "pt-br".to_string()),
                ("trial_end".to_string(), "de".to_string()),
            ]
        );
        assert_eq!(specs[0].subject, "Hello {{lead.name}}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let root = scratch("missing");
        write(&root.join("welcome/en"), &GOOD[..2]);
        let err = find_templates(&root).unwrap_err().to_string();
        assert!(err.contains("welcome/en/body.html.hbs"), "{err}");
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_template_that_does_not_compile_names_the_file_and_line() {
        let root = scratch("broken");
        write(
            &root.join("welcome/en"),
            &[
                (SUBJECT_FILE, "Hello"),
                (BODY_TEXT_FILE, "line one\nline two {{#if lead.name}}\nno end"),
                (BODY_HTML_FILE, "<p></p>"),
            ],
        );
        let err = find_templates(&root).unwrap_err().to_string();
        assert!(err.contains("welcome/en/body.txt.hbs"), "{err}");
        assert!(err.contains("line "), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bad_names_and_languages_are_refused() {
        for good in ["en", "de", "pt-br", "zh-hant", "es-419"] {
            assert!(validate_language(good).is_ok(), "{good}");
        }
        for bad in ["EN", "e", "english", "pt_BR", "pt-", "de-AT", ""] {
            assert!(validate_language(bad).is_err(), "{bad}");
        }
        for good in ["welcome", "cart-reminder-2", "0day", "trial_end"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["Welcome", "-x", "_x", "a b", "", "a.b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }

        let root = scratch("badlang");
        write(&root.join("welcome/EN"), &GOOD);
        let err = find_templates(&root).unwrap_err().to_string();
        assert!(err.contains("\"EN\""), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_root_is_an_error() {
        let root = scratch("nothing");
        assert!(find_templates(&root).is_err());
    }
}
